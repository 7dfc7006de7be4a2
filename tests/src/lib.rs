//! Shared helpers for FerroMQ's multi-process tests: real `fmq` processes on
//! loopback ports, a temporary profile and store per test, SIGKILL and
//! SIGTERM, the `fmq` admin commands as subprocesses, and a small raw-frame
//! STOMP client that reports failures as errors instead of panicking (a
//! killed server is an expected event in these tests).
//!
//! The HA tests build on the modules: [`pair`] (what a test asks of a pair
//! of servers, and the loopback pair), [`netns`] (network namespaces,
//! links and the pair inside them), [`load`] (producers that move to the
//! other server on error, a reconnecting consumer, drains) and [`samples`]
//! (state samples, and how long both servers served at once).

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
pub use fmq_proto::{Command, Frame};
use fmq_proto::{Item, StompCodec};
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub mod load;
pub mod netns;
pub mod pair;
pub mod power;
pub mod samples;

pub use samples::{longest_double_active, sample_states, Sample};

/// How long a server has to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `fmq` binary: `$FMQ_BIN`, else `target/release/fmq` beside the test
/// executable's `deps/` directory.
pub fn fmq_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FMQ_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FMQ_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/release/deps/t01_xxx -> target/release/fmq
    let mut candidates = Vec::new();
    if let Some(deps) = exe.parent() {
        if let Some(profile_dir) = deps.parent() {
            candidates.push(profile_dir.join("fmq"));
        }
        candidates.push(deps.join("fmq"));
    }
    candidates.push(workspace_root().join("target/release/fmq"));
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "the fmq binary is missing (looked at {}): build it with cargo build --release -p fmq-server, or set FMQ_BIN",
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free TCP port on 127.0.0.1, never the same twice in one test process.
pub fn free_port() -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seen = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if seen.insert(port) {
            return port;
        }
    }
    panic!("no free port found");
}

/// The last `lines` lines of a text file (empty if unreadable).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A profile directory and a store directory in one temporary directory,
/// from the shipped `profiles/FerroMQ/fmq.toml` with free ports and without
/// log files.
#[derive(Debug)]
pub struct TempProfile {
    root: tempfile::TempDir,
    /// The STOMP client port.
    pub port: u16,
    /// The admin port.
    pub admin_port: u16,
}

impl TempProfile {
    /// A fresh profile with free ports.
    pub fn new() -> TempProfile {
        let root = tempfile::Builder::new()
            .prefix("fmq-test-")
            .tempdir()
            .expect("temp dir");
        let shipped = workspace_root().join("profiles/FerroMQ/fmq.toml");
        let text = std::fs::read_to_string(&shipped)
            .unwrap_or_else(|e| panic!("read {}: {e}", shipped.display()));
        std::fs::create_dir_all(root.path().join("profile")).expect("mkdir profile");
        std::fs::create_dir_all(root.path().join("db")).expect("mkdir db");
        let mut p = TempProfile {
            root,
            port: free_port(),
            admin_port: free_port(),
        };
        p.write_text(&text);
        let (port, admin) = (p.port, p.admin_port);
        p.set("network", "port", &port.to_string());
        p.set("network", "admin_port", &admin.to_string());
        p.set("network", "bind_address", "\"127.0.0.1\"");
        p.set("network", "admin_bind_address", "\"127.0.0.1\"");
        p.set("log", "file", "false");
        p
    }

    /// The temporary directory holding everything.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The profile directory (holds fmq.toml).
    pub fn dir(&self) -> PathBuf {
        self.root.path().join("profile")
    }

    /// The store directory passed as -dbPath.
    pub fn db(&self) -> PathBuf {
        self.root.path().join("db")
    }

    /// Path of fmq.toml.
    pub fn file(&self) -> PathBuf {
        self.dir().join("fmq.toml")
    }

    /// Current text of fmq.toml.
    pub fn text(&self) -> String {
        std::fs::read_to_string(self.file()).expect("read fmq.toml")
    }

    /// Replaces fmq.toml.
    pub fn write_text(&mut self, text: &str) {
        std::fs::write(self.file(), text).expect("write fmq.toml");
    }

    /// Sets `key = value` (value as TOML text) in `[section]`, replacing the
    /// existing line or adding one.
    pub fn set(&mut self, section: &str, key: &str, value: &str) {
        let text = set_toml_key(&self.text(), section, key, value);
        self.write_text(&text);
    }
}

impl Default for TempProfile {
    fn default() -> Self {
        TempProfile::new()
    }
}

/// A running `fmq` server process on a [`TempProfile`].
#[derive(Debug)]
pub struct Server {
    profile: TempProfile,
    child: Option<Child>,
    starts: u32,
    db: PathBuf,
}

impl Server {
    /// Starts a server and waits until it answers on its admin port (which
    /// happens after the store is open and the broker runs).
    pub fn start(profile: TempProfile) -> Result<Server> {
        let db = profile.db();
        Server::start_on(profile, db)
    }

    /// Starts a server on a given store directory.
    pub fn start_on(profile: TempProfile, db: PathBuf) -> Result<Server> {
        let mut s = Server {
            profile,
            child: None,
            starts: 0,
            db,
        };
        s.launch()?;
        Ok(s)
    }

    /// Spawns the process without waiting; stdout/stderr go to
    /// `server-N.out` / `server-N.err` in the temporary directory.
    pub fn spawn_raw(profile: &TempProfile, db: &Path, tag: &str) -> Result<Child> {
        let out = File::create(profile.root().join(format!("{tag}.out")))?;
        let err = File::create(profile.root().join(format!("{tag}.err")))?;
        let child = ProcessCommand::new(fmq_bin())
            .arg("-profile")
            .arg(profile.dir())
            .arg("-dbPath")
            .arg(db)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("spawn fmq")?;
        Ok(child)
    }

    fn launch(&mut self) -> Result<()> {
        self.starts += 1;
        let tag = format!("server-{}", self.starts);
        let mut child = Server::spawn_raw(&self.profile, &self.db, &tag)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let tail = self.log_tail(40);
                bail!("fmq exited during start-up with {status}:\n{tail}");
            }
            if admin_status(self.profile.admin_port).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "fmq did not answer on admin port {} within {START_TIMEOUT:?}:\n{}",
                    self.profile.admin_port,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// The STOMP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.profile.port))
    }

    /// The admin port.
    pub fn admin_port(&self) -> u16 {
        self.profile.admin_port
    }

    /// The profile.
    pub fn profile(&self) -> &TempProfile {
        &self.profile
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to 30 s, then SIGKILL and fail).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("server is not running");
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "fmq did not stop within 30 s of SIGTERM:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself (after `fmq shutdown`).
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("server is not running");
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("fmq did not exit within {within:?}:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same profile and store (stopping first if
    /// running, with SIGKILL).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.launch()
    }

    /// The last lines of the current (latest) run's stdout and stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let tag = format!("server-{}", self.starts);
        let root = self.profile.root();
        format!(
            "--- {tag} stdout ---\n{}\n--- {tag} stderr ---\n{}",
            tail_file(&root.join(format!("{tag}.out")), lines),
            tail_file(&root.join(format!("{tag}.err")), lines)
        )
    }

    /// Runs `fmq ARGS...` with this server's `--admin-port` inserted after
    /// the first word (`["user", "add", "bob"]` runs
    /// `fmq user --admin-port N add bob`).
    pub fn admin(&self, args: &[&str]) -> Output {
        let port = self.profile.admin_port.to_string();
        let mut full: Vec<&str> = Vec::new();
        full.push(args[0]);
        full.push("--admin-port");
        full.push(&port);
        full.extend_from_slice(&args[1..]);
        run_fmq(&full)
    }

    /// Like [`admin`](Self::admin) but fails with the output unless it
    /// exits 0; returns stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "fmq {args:?} failed ({}): stdout {:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The status JSON from the admin port.
    pub fn status(&self) -> Result<serde_json::Value> {
        admin_status(self.profile.admin_port)
    }

    /// (pending, inflight) of a queue from `status` (names as `status`
    /// shows them: `/queue/NAME`, `durable CLIENT:NAME`); `None` if absent.
    pub fn queue_depth(&self, name: &str) -> Result<Option<(u64, u64)>> {
        let v = self.status()?;
        for q in v["queues"].as_array().into_iter().flatten() {
            if q["name"].as_str() == Some(name) {
                return Ok(Some((
                    q["pending"].as_u64().unwrap_or(0),
                    q["inflight"].as_u64().unwrap_or(0),
                )));
            }
        }
        Ok(None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the `fmq` binary with arguments, capturing output (10 s limit is
/// the admin client's own; this waits for it).
pub fn run_fmq(args: &[&str]) -> Output {
    ProcessCommand::new(fmq_bin())
        .args(args)
        .env_remove("FMQ_ADMIN_USER")
        .env_remove("FMQ_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run fmq")
}

/// Text of stdout and stderr together.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One `status` request on the admin port, speaking its JSON-lines protocol
/// directly (fast enough to poll during start-up).
pub fn admin_status(admin_port: u16) -> Result<serde_json::Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"cmd\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if v["ok"].as_bool() != Some(true) {
        bail!("status refused: {line}");
    }
    Ok(v["data"].clone())
}

/// Waits until a process exits; returns its status, or kills it and fails.
pub fn wait_child(child: &mut Child, within: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw-frame STOMP 1.2 connection.
#[derive(Debug)]
pub struct Stomp {
    /// The framed socket.
    pub io: Framed<TcpStream, StompCodec>,
    stash: std::collections::VecDeque<Frame>,
}

/// How long one [`Stomp`] wait lasts by default.
pub const WAIT: Duration = Duration::from_secs(10);

impl Stomp {
    /// Opens the TCP connection only.
    pub async fn raw(addr: SocketAddr) -> Result<Stomp> {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} timed out"))??;
        stream.set_nodelay(true)?;
        Ok(Stomp {
            io: Framed::new(stream, StompCodec::default()),
            stash: Default::default(),
        })
    }

    /// Sends CONNECT and returns the server's answer (CONNECTED or ERROR).
    pub async fn connect_frame(
        addr: SocketAddr,
        headers: &[(&str, &str)],
    ) -> Result<(Stomp, Frame)> {
        let mut c = Stomp::raw(addr).await?;
        let mut f = Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("host", "localhost")
            .header("heart-beat", "0,0");
        for (k, v) in headers {
            f = f.header(*k, *v);
        }
        c.send(f).await?;
        let reply = c
            .recv_within(WAIT)
            .await?
            .ok_or_else(|| anyhow!("no answer to CONNECT"))?;
        Ok((c, reply))
    }

    /// Connects with login and passcode and expects CONNECTED.
    pub async fn connect(addr: SocketAddr, login: &str, passcode: &str) -> Result<Stomp> {
        Stomp::connect_with(addr, &[("login", login), ("passcode", passcode)]).await
    }

    /// Connects with the given headers and expects CONNECTED.
    pub async fn connect_with(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Stomp> {
        let (c, reply) = Stomp::connect_frame(addr, headers).await?;
        if reply.command != Command::Connected {
            bail!("CONNECT refused: {}", describe(&reply));
        }
        Ok(c)
    }

    /// Writes a frame.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        self.io.send(frame).await.context("write frame")
    }

    /// The next frame within `wait`; `Ok(None)` on timeout; error when the
    /// connection closed.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Frame>> {
        if let Some(f) = self.stash.pop_front() {
            return Ok(Some(f));
        }
        self.read_wire(wait).await
    }

    async fn read_wire(&mut self, wait: Duration) -> Result<Option<Frame>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.io.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => bail!("connection closed by the server"),
                Ok(Some(Ok(Item::HeartBeat))) => continue,
                Ok(Some(Ok(Item::Frame(f)))) => return Ok(Some(f)),
                Ok(Some(Err(e))) => bail!("decode error: {e}"),
            }
        }
    }

    /// The next frame within [`WAIT`].
    pub async fn recv(&mut self) -> Result<Frame> {
        self.recv_within(WAIT)
            .await?
            .ok_or_else(|| anyhow!("no frame within {WAIT:?}"))
    }

    /// Sends a frame with a receipt header and waits for that RECEIPT;
    /// MESSAGEs arriving meanwhile are kept for [`recv`](Self::recv); an
    /// ERROR fails with its text.
    pub async fn request(&mut self, frame: Frame, receipt: &str) -> Result<()> {
        self.send(frame.header("receipt", receipt)).await?;
        loop {
            let r = self
                .read_wire(WAIT)
                .await?
                .ok_or_else(|| anyhow!("no RECEIPT {receipt} within {WAIT:?}"))?;
            match r.command {
                Command::Message => self.stash.push_back(r),
                Command::Receipt if r.get("receipt-id") == Some(receipt) => return Ok(()),
                _ => bail!("expected RECEIPT {receipt}, got {}", describe(&r)),
            }
        }
    }

    /// Sends a frame and expects an ERROR (returned), skipping MESSAGEs and
    /// RECEIPTs.
    pub async fn expect_error(&mut self, frame: Frame) -> Result<Frame> {
        self.send(frame).await?;
        loop {
            let r = self
                .read_wire(WAIT)
                .await?
                .ok_or_else(|| anyhow!("no ERROR within {WAIT:?}"))?;
            if r.command == Command::Error {
                return Ok(r);
            }
        }
    }

    /// SUBSCRIBE with a receipt.
    pub async fn subscribe(
        &mut self,
        id: &str,
        dest: &str,
        ack: &str,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let mut f = Frame::new(Command::Subscribe)
            .header("id", id)
            .header("destination", dest)
            .header("ack", ack);
        for (k, v) in extra {
            f = f.header(*k, *v);
        }
        self.request(f, &format!("sub-{id}")).await
    }

    /// SEND with a receipt.
    pub async fn publish(&mut self, dest: &str, body: &[u8], extra: &[(&str, &str)]) -> Result<()> {
        let mut f = Frame::new(Command::Send).header("destination", dest);
        for (k, v) in extra {
            f = f.header(*k, *v);
        }
        self.request(f.with_body(body.to_vec()), "send").await
    }

    /// ACK (or NACK) a MESSAGE with a receipt.
    pub async fn ack(&mut self, msg: &Frame) -> Result<()> {
        let id = msg
            .get("ack")
            .ok_or_else(|| anyhow!("MESSAGE without ack header"))?;
        let f = Frame::new(Command::Ack).header("id", id);
        self.request(f, &format!("ack-{id}")).await
    }

    /// The next MESSAGE within `wait` (`Ok(None)` on timeout; an ERROR or
    /// RECEIPT fails).
    pub async fn message_within(&mut self, wait: Duration) -> Result<Option<Frame>> {
        match self.recv_within(wait).await? {
            None => Ok(None),
            Some(f) if f.command == Command::Message => Ok(Some(f)),
            Some(f) => bail!("expected MESSAGE, got {}", describe(&f)),
        }
    }

    /// DISCONNECT with a receipt.
    pub async fn disconnect(mut self) -> Result<()> {
        self.request(Frame::new(Command::Disconnect), "bye").await
    }
}

/// One line describing a frame for assertion messages.
pub fn describe(f: &Frame) -> String {
    let headers: Vec<String> = f.headers.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!(
        "{} [{}] {:?}",
        f.command,
        headers.join(", "),
        String::from_utf8_lossy(&f.body[..f.body.len().min(200)])
    )
}

/// One admin `status` request with short timeouts (a stopped or dead
/// server must not stall a fast poll): the `data` object, or `None`.
pub fn quick_status(admin_port: u16, wait: Duration) -> Option<serde_json::Value> {
    status_at(SocketAddr::from(([127, 0, 0, 1], admin_port)), wait)
}

/// [`quick_status`] of an admin port at any address.
pub fn status_at(addr: SocketAddr, wait: Duration) -> Option<serde_json::Value> {
    let mut s = StdTcpStream::connect_timeout(&addr, wait).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.set_write_timeout(Some(wait)).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    if v["ok"].as_bool() != Some(true) {
        return None;
    }
    Some(v["data"].clone())
}

/// `ha.state` of a status object.
pub fn ha_state(status: &serde_json::Value) -> Option<String> {
    status["ha"]["state"].as_str().map(str::to_owned)
}

/// The text of a shipped profile, `profiles/NAME/fmq.toml`.
pub fn shipped_profile(name: &str) -> String {
    let path = workspace_root()
        .join("profiles")
        .join(name)
        .join("fmq.toml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A shipped replicated profile (`FerroMQ_HA_rpl/HAPrimary` or
/// `.../HASecondary`) with `(section, key, value)` changes (values as TOML
/// text).
pub fn replicated_profile(server: &str, changes: &[(&str, &str, String)]) -> String {
    let name = format!("FerroMQ_HA_rpl/{server}");
    let mut t = shipped_profile(&name);
    assert!(
        t.contains("mode = \"replicated\""),
        "profiles/{name} is not a replicated profile"
    );
    for (section, key, value) in changes {
        t = set_toml_key(&t, section, key, value);
    }
    t
}

/// Spawns `fmq ARGS`, its stdout in `dir/TAG.out` and stderr in
/// `dir/TAG.err`.
pub fn spawn_fmq(args: &[&str], dir: &Path, tag: &str) -> Result<Proc> {
    Proc::spawn(
        ProcessCommand::new(fmq_bin()).args(args),
        dir.join(format!("{tag}.out")),
        dir.join(format!("{tag}.err")),
    )
}

/// Starts `fmq gateway --listen 127.0.0.1:PORT` (output in
/// `dir/gateway.out` and `.err`) and waits until it accepts connections.
pub fn start_gateway(dir: &Path, port: u16, within: Duration) -> Result<Proc> {
    let listen = format!("127.0.0.1:{port}");
    let gw = spawn_fmq(&["gateway", "--listen", &listen], dir, "gateway")?;
    let deadline = Instant::now() + within;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("fmq gateway did not listen on {listen}:\n{}", gw.tail(20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(gw)
}

/// Sets `key = value` (value as TOML text) in `[section]` of a profile
/// text, replacing the existing line or adding one at the end of the
/// section (the text-level twin of [`TempProfile::set`]).
pub fn set_toml_key(text: &str, section: &str, key: &str, value: &str) -> String {
    let header = format!("[{section}]");
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut done = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            if current == header && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            current = t.to_owned();
        }
        let is_key = !t.starts_with('#') && t.split_once('=').is_some_and(|(k, _)| k.trim() == key);
        if current == header && is_key {
            if !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            continue;
        }
        out.push(line.to_owned());
    }
    if !done {
        if current != header {
            out.push(header);
        }
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

/// A spawned process whose stdout and stderr go to files; SIGKILLed (after
/// SIGCONT, in case it is stopped) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Mutex<Child>,
    pid: u32,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Spawns `cmd` (without `RUST_LOG`, with `NO_COLOR=1`, stdin closed),
    /// its stdout to `out` and stderr to `err`.
    pub fn spawn(cmd: &mut ProcessCommand, out: PathBuf, err: PathBuf) -> Result<Proc> {
        let child = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .context("spawn")?;
        Ok(Proc {
            pid: child.id(),
            child: Mutex::new(child),
            out,
            err,
        })
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal, unless the process has exited (once it is reaped
    /// its pid may belong to another process).
    pub fn signal(&self, sig: Signal) {
        let mut child = self.child();
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// Console output so far (stdout then stderr).
    pub fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// The last `lines` lines of stdout and of stderr.
    pub fn tail(&self, lines: usize) -> String {
        format!(
            "--- {} ---\n{}\n--- {} ---\n{}",
            self.out.display(),
            tail_file(&self.out, lines),
            self.err.display(),
            tail_file(&self.err, lines)
        )
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn wait_exit(&self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if it has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        let mut child = self.child();
        // No-ops once the process has been reaped.
        let _ = child.kill();
        let _ = child.wait();
    }
}
