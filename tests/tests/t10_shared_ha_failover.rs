//! Shared-storage HA (seed §3.1.2): a gateway responder and a primary and a
//! secondary `fmq` on one store directory and one lock file, all real
//! processes on loopback. The profiles are the shipped
//! `profiles/FerroMQ_HA_shared/{HAPrimary,HASecondary}/fmq.toml`, copied into
//! a temporary directory with the same layout (so their relative `db_path`
//! is exercised as shipped) with the ports changed and an absolute
//! `lock_file`; the last test runs the shipped relative `lock_file` too.
//!
//! - exactly one ACTIVE and one PASSIVE; the PASSIVE refuses CONNECT;
//! - SIGKILL of the ACTIVE under receipted persistent load: the PASSIVE
//!   takes over, no receipted message is lost, none is delivered twice;
//! - the killed server comes back PASSIVE;
//! - SIGSTOP of the ACTIVE never gives two ACTIVEs;
//! - no gateway, no take-over;
//! - a missing lock file and mismatched settings refuse to start;
//! - the shipped relative `lock_file = "../lock/lock.dat"` works in both.
//!
//! The tests of this file run one at a time (a file-wide mutex): each runs
//! three processes with 100 ms heartbeats, and running them side by side on
//! a small machine would measure CPU contention rather than failover.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fmq_tests::{
    describe, fmq_bin, free_port, longest_double_active, sample_states, tail_file, workspace_root,
    Command, Frame, Sample, Stomp,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The shipped fast local timings (profiles/FerroMQ_HA_shared).
const PING_MS: u64 = 100;
const ACTIVE_LOCK_MS: u64 = 200;
const PASSIVE_LOCK_MS: u64 = 500;

const PRIMARY: usize = 0;
const SECONDARY: usize = 1;
const QUEUE: &str = "/queue/ha.failover";
const BODY_LEN: usize = 1024;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test at a time in this file (see the module comment).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Sets `key = value` (value as TOML text) in `[section]` of a profile text,
/// replacing the existing line or adding one at the end of the section.
fn set_key(text: &str, section: &str, key: &str, value: &str) -> String {
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

/// Removes `key` from `[section]`.
fn remove_key(text: &str, section: &str, key: &str) -> String {
    let header = format!("[{section}]");
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.to_owned();
        }
        let is_key = !t.starts_with('#') && t.split_once('=').is_some_and(|(k, _)| k.trim() == key);
        if !(current == header && is_key) {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}

/// A spawned process, SIGKILLed (after SIGCONT, in case it is stopped) and
/// reaped on drop.
#[derive(Debug)]
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut ProcessCommand, out: PathBuf, err: PathBuf) -> Result<Proc> {
        let child = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .context("spawn fmq")?;
        Ok(Proc { child, out, err })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, sig: Signal) {
        let _ = kill(self.pid(), sig);
    }

    /// Console output so far (stdout then stderr).
    fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    fn tail(&self, lines: usize) -> String {
        format!(
            "--- {} ---\n{}\n--- {} ---\n{}",
            self.out.display(),
            tail_file(&self.out, lines),
            self.err.display(),
            tail_file(&self.err, lines)
        )
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server of the pair.
#[derive(Debug)]
struct Node {
    name: &'static str,
    dir: PathBuf,
    port: u16,
    admin: u16,
    ha: u16,
    proc_: Option<Proc>,
    starts: u32,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn proc_mut(&mut self) -> &mut Proc {
        self.proc_.as_mut().expect("server running")
    }
}

/// A gateway, two servers, a shared store and a lock file in a temporary
/// directory laid out like `profiles/FerroMQ_HA_shared`.
#[derive(Debug)]
struct Pair {
    root: tempfile::TempDir,
    gw_port: u16,
    gateway: Option<Proc>,
    nodes: [Node; 2],
}

impl Pair {
    /// Profiles from the shipped ones with free ports; the lock file is
    /// created (empty) unless `with_lock` is false.
    fn new(with_lock: bool) -> Pair {
        let root = tempfile::Builder::new()
            .prefix("fmq-ha-test-")
            .tempdir()
            .expect("temp dir");
        let mk = |name: &'static str| Node {
            name,
            dir: root.path().join(name),
            port: free_port(),
            admin: free_port(),
            ha: free_port(),
            proc_: None,
            starts: 0,
        };
        let nodes = [mk("HAPrimary"), mk("HASecondary")];
        let pair = Pair {
            gw_port: free_port(),
            gateway: None,
            nodes,
            root,
        };
        std::fs::create_dir_all(pair.root.path().join("run/db")).expect("mkdir db");
        std::fs::create_dir_all(pair.root.path().join("lock")).expect("mkdir lock");
        if with_lock {
            File::create(pair.lock_path()).expect("create lock file");
        }
        for i in [PRIMARY, SECONDARY] {
            std::fs::create_dir_all(&pair.nodes[i].dir).expect("mkdir profile");
            let text = pair.shipped_with_ports(i);
            pair.write_profile(i, &text);
        }
        pair
    }

    fn lock_path(&self) -> PathBuf {
        self.root.path().join("lock/lock.dat")
    }

    /// The shipped profile of node `i` with this pair's ports.
    fn shipped_with_ports(&self, i: usize) -> String {
        let (me, peer) = (&self.nodes[i], &self.nodes[1 - i]);
        let shipped = workspace_root()
            .join("profiles/FerroMQ_HA_shared")
            .join(me.name)
            .join("fmq.toml");
        let mut t = std::fs::read_to_string(&shipped)
            .unwrap_or_else(|e| panic!("read {}: {e}", shipped.display()));
        for (section, key, value) in [
            ("network", "port", me.port),
            ("network", "admin_port", me.admin),
            ("ha", "port", me.ha),
            ("ha", "backup_ha_port", peer.ha),
            ("ha", "backup_server_port", peer.port),
            ("ha", "backup_rmi_server_port", peer.admin),
            ("ha", "gateway_server_port", self.gw_port),
        ] {
            t = set_key(&t, section, key, &value.to_string());
        }
        // Absolute: the shipped relative `../lock/lock.dat` resolves to
        // `<profile>/../lock/lock.dat`, a different text in each profile,
        // and the handshake compares the lock file as text.
        let lock = format!("{:?}", self.lock_path().display().to_string());
        t = set_key(&t, "ha", "lock_file", &lock);
        set_key(&t, "log", "file", "false")
    }

    fn profile_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("fmq.toml")).expect("read profile")
    }

    fn write_profile(&self, i: usize, text: &str) {
        std::fs::write(self.nodes[i].dir.join("fmq.toml"), text).expect("write profile");
    }

    fn start_gateway(&mut self) -> Result<()> {
        let root = self.root.path();
        let listen = format!("127.0.0.1:{}", self.gw_port);
        let gw = Proc::spawn(
            ProcessCommand::new(fmq_bin()).args(["gateway", "--listen", &listen]),
            root.join("gateway.out"),
            root.join("gateway.err"),
        )?;
        self.gateway = Some(gw);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.gw_port));
        while StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "fmq gateway did not listen on {listen}:\n{}",
                    self.gateway
                        .as_ref()
                        .map(|g| g.tail(20))
                        .unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Spawns server `i` without waiting.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let root = self.root.path().to_path_buf();
        let node = &mut self.nodes[i];
        node.starts += 1;
        let tag = format!("{}-{}", node.name, node.starts);
        let p = Proc::spawn(
            ProcessCommand::new(fmq_bin())
                .arg("-profile")
                .arg(&node.dir),
            root.join(format!("{tag}.out")),
            root.join(format!("{tag}.err")),
        )?;
        node.proc_ = Some(p);
        Ok(())
    }

    /// Spawns server `i` and waits until its admin port answers.
    fn start(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.nodes[i].proc_mut().exited() {
                bail!(
                    "{} exited during start-up with {status}:\n{}",
                    self.nodes[i].name,
                    self.logs()
                );
            }
            if quick_status(self.nodes[i].admin, Duration::from_millis(500)).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer on admin port {} within 30 s:\n{}",
                    self.nodes[i].name,
                    self.nodes[i].admin,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_all(&mut self) -> Result<()> {
        self.start_gateway()?;
        self.start(PRIMARY)?;
        self.start(SECONDARY)
    }

    /// SIGKILL server `i` and reap it.
    fn kill9(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc_.take() {
            p.signal(Signal::SIGKILL);
            drop(p);
        }
    }

    fn signal(&self, i: usize, sig: Signal) {
        if let Some(p) = &self.nodes[i].proc_ {
            p.signal(sig);
        }
    }

    /// `ha.state` of server `i`, if it answers within `wait`.
    fn state(&self, i: usize, wait: Duration) -> Option<String> {
        quick_status(self.nodes[i].admin, wait).and_then(|v| ha_state(&v))
    }

    fn states(&self) -> [Option<String>; 2] {
        let w = Duration::from_millis(300);
        [self.state(PRIMARY, w), self.state(SECONDARY, w)]
    }

    /// Waits until exactly one server is ACTIVE and the other PASSIVE;
    /// returns (active, passive).
    fn wait_roles(&self, within: Duration) -> Result<(usize, usize)> {
        let deadline = Instant::now() + within;
        loop {
            let s = self.states();
            match (s[0].as_deref(), s[1].as_deref()) {
                (Some("ACTIVE"), Some("PASSIVE")) => return Ok((PRIMARY, SECONDARY)),
                (Some("PASSIVE"), Some("ACTIVE")) => return Ok((SECONDARY, PRIMARY)),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "no ACTIVE/PASSIVE pair within {within:?} (states: primary {:?}, secondary {:?}):\n{}",
                    s[0],
                    s[1],
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until server `i` reports `state`; returns how long it took.
    fn wait_state(&self, i: usize, state: &str, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.state(i, Duration::from_millis(300)).as_deref() == Some(state) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "{} not {state} within {within:?} (now {:?}):\n{}",
                    self.nodes[i].name,
                    self.state(i, Duration::from_millis(300)),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The end of every process's console output, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            if let Some(p) = &n.proc_ {
                s += &format!("===== {} (run {})\n{}\n", n.name, n.starts, p.tail(30));
            } else {
                let root = self.root.path();
                for k in 1..=n.starts {
                    let tag = format!("{}-{k}", n.name);
                    s += &format!(
                        "===== {tag} (not running)\n{}\n{}\n",
                        tail_file(&root.join(format!("{tag}.out")), 30),
                        tail_file(&root.join(format!("{tag}.err")), 30)
                    );
                }
            }
        }
        if let Some(g) = &self.gateway {
            s += &format!("===== gateway\n{}\n", g.tail(10));
        }
        s
    }
}

/// One admin `status` request with short timeouts (a stopped or dead
/// server must not stall a 50 ms poll); the `data` object, or `None`.
fn quick_status(admin_port: u16, wait: Duration) -> Option<Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], admin_port));
    let mut s = StdTcpStream::connect_timeout(&addr, wait).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.set_write_timeout(Some(wait)).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: Value = serde_json::from_str(&line).ok()?;
    if v["ok"].as_bool() != Some(true) {
        return None;
    }
    Some(v["data"].clone())
}

fn ha_state(status: &Value) -> Option<String> {
    status["ha"]["state"].as_str().map(str::to_owned)
}

/// A 1 KiB body derived from the message id, so corruption shows.
fn body_for(id: &str) -> Vec<u8> {
    let seed = id.as_bytes();
    (0..BODY_LEN)
        .map(|i| seed[i % seed.len()] ^ (i as u8))
        .collect()
}

const LOGIN: [(&str, &str); 2] = [("login", "admin"), ("passcode", "passwd")];

/// CONNECT to a PASSIVE server: expects an ERROR whose `message` names
/// PASSIVE, then the connection closed.
async fn expect_passive_refusal(addr: SocketAddr) -> Result<()> {
    let (mut c, reply) = Stomp::connect_frame(addr, &LOGIN).await?;
    if reply.command != Command::Error {
        bail!("PASSIVE server accepted CONNECT: {}", describe(&reply));
    }
    let msg = reply.get("message").unwrap_or_default();
    if !msg.contains("PASSIVE") {
        bail!("ERROR does not name PASSIVE: {}", describe(&reply));
    }
    // STOMP: the server closes after an ERROR.
    match c.recv_within(Duration::from_secs(5)).await {
        Err(_) => Ok(()),
        Ok(None) => bail!("PASSIVE server kept the connection open after its ERROR"),
        Ok(Some(f)) => bail!("frame after the ERROR: {}", describe(&f)),
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_active_one_passive_and_the_passive_refuses_clients() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    println!(
        "ACTIVE: {}, PASSIVE: {}",
        pair.nodes[active].name, pair.nodes[passive].name
    );

    // `fmq status --json` shows the HA fields, on both servers.
    for (i, want, peer) in [
        (active, "ACTIVE", "PASSIVE"),
        (passive, "PASSIVE", "ACTIVE"),
    ] {
        let port = pair.nodes[i].admin.to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = fmq_tests::run_fmq(&["status", "--admin-port", &port, "--json"]);
            let text = fmq_tests::output_text(&out);
            assert!(out.status.success(), "fmq status --json failed: {text}");
            let v: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("status --json is not JSON: {text}"))?;
            let ha = &v["ha"];
            assert_eq!(ha["state"], want, "{text}");
            let role = if i == PRIMARY { "primary" } else { "secondary" };
            assert_eq!(ha["role"], role, "{text}");
            assert!(ha["epoch"].is_u64(), "ha.epoch missing: {text}");
            assert!(ha["in_state_ms"].is_u64(), "ha.in_state_ms missing: {text}");
            assert_eq!(ha["gateway_reachable"], true, "{text}");
            // The peer's state arrives over the HA link, which may come up a
            // little after the lock decided the roles.
            if ha["peer"] == peer {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: ha.peer is not {peer} within 5 s: {text}",
                    pair.nodes[i].name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The seed's console lines.
    let a_out = pair.nodes[active].proc_mut().output();
    let p_out = pair.nodes[passive].proc_mut().output();
    let a_title = if active == PRIMARY {
        "Primary"
    } else {
        "Secondary"
    };
    let p_title = if passive == PRIMARY {
        "Primary"
    } else {
        "Secondary"
    };
    for needle in [
        format!("{a_title} Server switched to PASSIVE"),
        "Successfully acquired lock on ::".to_owned(),
        format!("{a_title} Server switched to ACTIVATING"),
        format!("{a_title} Server switched to ACTIVE"),
    ] {
        assert!(
            a_out.contains(&needle),
            "ACTIVE's console lacks {needle:?}:\n{a_out}"
        );
    }
    let needle = format!("{p_title} Server switched to PASSIVE");
    assert!(
        p_out.contains(&needle),
        "PASSIVE's console lacks {needle:?}:\n{p_out}"
    );
    assert!(
        !p_out.contains(&format!("{p_title} Server switched to ACTIVE")),
        "PASSIVE's console claims it was ACTIVE:\n{p_out}"
    );

    // The PASSIVE refuses every CONNECT (twice: the port stays usable).
    for _ in 0..2 {
        expect_passive_refusal(pair.nodes[passive].addr()).await?;
    }
    // The ACTIVE serves.
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"hello", &[("persistent", "true")])
        .await?;
    c.disconnect().await?;
    Ok(())
}

/// A receipted SEND: id, which server receipted it, when.
#[derive(Debug, Clone)]
struct Receipted {
    id: String,
    server: usize,
    at: Instant,
}

#[derive(Debug, Default)]
struct ProducerReport {
    receipted: Vec<Receipted>,
    /// SENDs whose receipt never came (the server died): may or may not be
    /// in the queue.
    unreceipted: Vec<String>,
    connect_attempts: u64,
}

/// Sends receipted persistent 1 KiB messages to `first`'s port until
/// `stop`; on any error it switches to the other server's port and retries
/// CONNECT there every 50 ms until it succeeds. An unreceipted SEND is not
/// resent (it may be stored), so every id is sent at most once.
async fn producer(
    n: usize,
    ports: [SocketAddr; 2],
    first: usize,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<Receipted>>>,
) -> ProducerReport {
    let mut report = ProducerReport::default();
    let mut target = first;
    let mut conn: Option<Stomp> = None;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                report.connect_attempts += 1;
                let attempt = tokio::time::timeout(
                    Duration::from_secs(2),
                    Stomp::connect_frame(ports[target], &LOGIN),
                )
                .await;
                match attempt {
                    Ok(Ok((c, reply))) if reply.command == Command::Connected => conn.insert(c),
                    _ => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let id = format!("p{n}-{i}");
        i += 1;
        let frame = Frame::new(Command::Send)
            .header("destination", QUEUE)
            .header("persistent", "true")
            .header("x-id", id.as_str())
            .with_body(body_for(&id));
        let sent = tokio::time::timeout(Duration::from_secs(5), c.request(frame, &id)).await;
        match sent {
            Ok(Ok(())) => {
                let r = Receipted {
                    id,
                    server: target,
                    at: Instant::now(),
                };
                live.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(r.clone());
                report.receipted.push(r);
            }
            _ => {
                report.unreceipted.push(id);
                conn = None;
                target = 1 - target;
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.disconnect().await;
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_the_active_under_load_fails_over_without_loss() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start_all()?;
    let (old, new) = pair.wait_roles(Duration::from_secs(5))?;
    let addrs = [pair.nodes[PRIMARY].addr(), pair.nodes[SECONDARY].addr()];

    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let producers: Vec<_> = (0..2)
        .map(|n| tokio::spawn(producer(n, addrs, old, stop.clone(), live.clone())))
        .collect();

    // Let the load run, then kill the ACTIVE.
    let warm = Instant::now();
    loop {
        let count = live.lock().unwrap_or_else(|e| e.into_inner()).len();
        if count >= 200 && warm.elapsed() > Duration::from_millis(500) {
            break;
        }
        if warm.elapsed() > Duration::from_secs(20) {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "only {count} receipted sends in 20 s before the kill:\n{}",
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = live.lock().unwrap_or_else(|e| e.into_inner()).len();
    let killed_at = Instant::now();
    pair.kill9(old);

    // Watch the PASSIVE become ACTIVE.
    let mut to_active = None;
    let deadline = killed_at + Duration::from_secs(15);
    while Instant::now() < deadline {
        if pair.state(new, Duration::from_millis(300)).as_deref() == Some("ACTIVE") {
            to_active = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then wait for both producers to get receipts from the new ACTIVE and
    // keep the load on a little longer.
    let first_receipt = loop {
        let first = {
            let l = live.lock().unwrap_or_else(|e| e.into_inner());
            let after: Vec<&Receipted> = l
                .iter()
                .filter(|r| r.server == new && r.at > killed_at)
                .collect();
            let both = (0..2).all(|n| after.iter().any(|r| r.id.starts_with(&format!("p{n}-"))));
            both.then(|| after.iter().map(|r| r.at).min()).flatten()
        };
        if let Some(t) = first {
            break t;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "producers got no receipt from the new ACTIVE {} within 15 s of the kill (state reached ACTIVE after {to_active:?}):\n{}",
                pair.nodes[new].name,
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for p in producers {
        reports.push(p.await?);
    }

    let failover = first_receipt.duration_since(killed_at);
    let to_active = to_active.ok_or_else(|| anyhow!("new ACTIVE never reported ACTIVE"))?;
    let receipted: BTreeMap<String, usize> = reports
        .iter()
        .flat_map(|r| r.receipted.iter().map(|x| (x.id.clone(), x.server)))
        .collect();
    let unreceipted: BTreeSet<&String> = reports.iter().flat_map(|r| &r.unreceipted).collect();
    let on_new = receipted.values().filter(|s| **s == new).count();
    println!(
        "FAILOVER ({} killed, {} took over): status ACTIVE after {} ms; first receipted SEND on the new ACTIVE {} ms after kill -9",
        pair.nodes[old].name,
        pair.nodes[new].name,
        to_active.as_millis(),
        failover.as_millis()
    );
    println!(
        "receipted: {} ({} before the kill, {} on the new ACTIVE), unreceipted (in doubt): {}, connect attempts: {:?}",
        receipted.len(),
        before_kill,
        on_new,
        unreceipted.len(),
        reports.iter().map(|r| r.connect_attempts).collect::<Vec<_>>()
    );

    // Drain from the new ACTIVE, acknowledging each message individually.
    let mut c = Stomp::connect_with(pair.nodes[new].addr(), &LOGIN).await?;
    c.subscribe("drain", QUEUE, "client-individual", &[])
        .await?;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut corrupt = Vec::new();
    while let Some(m) = c.message_within(Duration::from_secs(3)).await? {
        let id = m
            .get("x-id")
            .ok_or_else(|| anyhow!("MESSAGE without x-id: {}", describe(&m)))?
            .to_owned();
        if m.body.as_ref() != body_for(&id).as_slice() {
            corrupt.push(id.clone());
        }
        c.ack(&m).await?;
        *seen.entry(id).or_default() += 1;
    }
    c.disconnect().await?;

    let lost: Vec<&String> = receipted
        .keys()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    let dups: Vec<(&String, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let strangers: Vec<&String> = seen
        .keys()
        .filter(|id| !receipted.contains_key(*id) && !unreceipted.contains(id))
        .collect();
    let in_doubt_delivered = seen.keys().filter(|id| unreceipted.contains(id)).count();
    println!(
        "drained {} messages: lost {}, duplicates {}, in-doubt sends delivered {}",
        seen.len(),
        lost.len(),
        dups.len(),
        in_doubt_delivered
    );
    assert!(
        lost.is_empty(),
        "{} receipted messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert!(strangers.is_empty(), "messages never sent: {strangers:?}");
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:?}");
    assert!(on_new > 0, "no sends receipted by the new ACTIVE");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_killed_server_comes_back_passive() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start_all()?;
    let (old, new) = pair.wait_roles(Duration::from_secs(5))?;
    pair.kill9(old);
    let took = pair.wait_state(new, "ACTIVE", Duration::from_secs(10))?;
    println!(
        "{} ACTIVE {} ms after kill -9 of {}",
        pair.nodes[new].name,
        took.as_millis(),
        pair.nodes[old].name
    );

    pair.start(old)?;
    pair.wait_state(old, "PASSIVE", Duration::from_secs(5))?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    assert_eq!(
        (active, passive),
        (new, old),
        "the restarted server took over"
    );
    // Stable, and both agree about each other once the link is up.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = quick_status(pair.nodes[active].admin, Duration::from_secs(1));
        let p = quick_status(pair.nodes[passive].admin, Duration::from_secs(1));
        let (a, p) = (a.unwrap_or_default(), p.unwrap_or_default());
        if a["ha"]["peer"] == "PASSIVE" && p["ha"]["peer"] == "ACTIVE" {
            assert_eq!(a["ha"]["state"], "ACTIVE");
            assert_eq!(p["ha"]["state"], "PASSIVE");
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "peers do not see each other within 5 s: active {} passive {}\n{}",
                a["ha"],
                p["ha"],
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_passive_refusal(pair.nodes[passive].addr()).await?;
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"after restart", &[]).await?;
    c.disconnect().await?;
    Ok(())
}

/// Polls `admin` every 50 ms until `stop`.
fn sampler(admin: u16, t0: Instant, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Sample>> {
    sample_states(
        move || quick_status(admin, Duration::from_millis(150)).and_then(|s| ha_state(&s)),
        t0,
        stop,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_of_the_active_never_gives_two_actives() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    // Let the HA link come up so the PASSIVE knows its peer.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stop_for = Duration::from_secs(3);
    assert!(stop_for > Duration::from_millis(3 * PING_MS + PASSIVE_LOCK_MS));
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sa = sampler(pair.nodes[active].admin, t0, done.clone());
    let sp = sampler(pair.nodes[passive].admin, t0, done.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stopped_at = t0.elapsed();
    pair.signal(active, Signal::SIGSTOP);
    tokio::time::sleep(stop_for).await;
    pair.signal(active, Signal::SIGCONT);
    let continued_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, Ordering::Relaxed);
    let a = sa.join().map_err(|_| anyhow!("sampler panicked"))?;
    let p = sp.join().map_err(|_| anyhow!("sampler panicked"))?;

    let show = |v: &[Sample]| {
        let mut out = String::new();
        let mut last: Option<&Option<String>> = None;
        for (t, s) in v {
            if last != Some(s) {
                out += &format!(" {}ms:{}", t.as_millis(), s.as_deref().unwrap_or("-"));
                last = Some(s);
            }
        }
        out
    };
    println!(
        "stopped {} at {} ms, continued at {} ms\n  {} (stopped):{}\n  {}:{}",
        pair.nodes[active].name,
        stopped_at.as_millis(),
        continued_at.as_millis(),
        pair.nodes[active].name,
        show(&a),
        pair.nodes[passive].name,
        show(&p)
    );

    let double = longest_double_active(&a, &p);
    let bound = Duration::from_millis(ACTIVE_LOCK_MS + 300);
    assert!(
        double <= bound,
        "both ACTIVE for {double:?} (bound {bound:?}):\n{}",
        pair.logs()
    );
    // The lock of a stopped process stays held: the PASSIVE must never have
    // taken over.
    let took_over: Vec<&Sample> = p
        .iter()
        .filter(|(_, s)| matches!(s.as_deref(), Some("ACTIVE") | Some("ACTIVATING")))
        .collect();
    assert!(
        took_over.is_empty(),
        "the PASSIVE became {:?} while the ACTIVE was stopped:\n{}",
        took_over.first(),
        pair.logs()
    );
    assert!(
        p.iter().all(|(_, s)| s.is_some()),
        "the PASSIVE stopped answering status"
    );
    // The stopped server answers again within ~1 s of SIGCONT, as ACTIVE.
    let resumed = a
        .iter()
        .find(|(t, s)| *t > continued_at && s.is_some())
        .ok_or_else(|| anyhow!("the stopped server never answered after SIGCONT"))?;
    assert!(
        resumed.0 - continued_at < Duration::from_millis(1500),
        "answered only {:?} after SIGCONT",
        resumed.0 - continued_at
    );
    let (now_active, now_passive) = pair.wait_roles(Duration::from_secs(2))?;
    assert_eq!(
        (now_active, now_passive),
        (active, passive),
        "roles changed across SIGSTOP/SIGCONT"
    );
    // It still serves.
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"after sigcont", &[]).await?;
    c.disconnect().await?;
    expect_passive_refusal(pair.nodes[passive].addr()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_gateway_nobody_takes_over() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start(PRIMARY)?;
    pair.start(SECONDARY)?;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for i in [PRIMARY, SECONDARY] {
            let v = quick_status(pair.nodes[i].admin, Duration::from_millis(500))
                .ok_or_else(|| anyhow!("{} does not answer status", pair.nodes[i].name))?;
            assert_eq!(
                v["ha"]["state"],
                "PASSIVE",
                "{} is not PASSIVE without a gateway: {}\n{}",
                pair.nodes[i].name,
                v["ha"],
                pair.logs()
            );
            assert_eq!(v["ha"]["gateway_reachable"], false, "{}", v["ha"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_passive_refusal(pair.nodes[PRIMARY].addr()).await?;
    expect_passive_refusal(pair.nodes[SECONDARY].addr()).await?;

    let started = Instant::now();
    pair.start_gateway()?;
    let (active, _) = pair.wait_roles(Duration::from_secs(5))?;
    println!(
        "{} ACTIVE {} ms after the gateway started",
        pair.nodes[active].name,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Runs server `i` expecting it to exit non-zero within 15 s; its output.
fn expect_refused(pair: &mut Pair, i: usize) -> Result<String> {
    pair.spawn(i)?;
    let p = pair.nodes[i].proc_mut();
    let status = p
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow!("server did not exit within 15 s:\n{}", p.tail(30)))?;
    let out = p.output();
    assert!(!status.success(), "exited 0:\n{out}");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_lock_file_is_refused() -> Result<()> {
    let _serial = serial().await;
    // The lock_file key absent: the seed's "Lock file::null".
    let mut pair = Pair::new(true);
    pair.start_gateway()?;
    let text = remove_key(&pair.profile_text(PRIMARY), "ha", "lock_file");
    pair.write_profile(PRIMARY, &text);
    let out = expect_refused(&mut pair, PRIMARY)?;
    assert!(
        out.contains("Lock file::null is not specified properly"),
        "{out}"
    );
    assert!(out.contains("Unable to boot the server"), "{out}");

    // The key set, the file not created by the operator.
    let mut pair = Pair::new(false);
    pair.start_gateway()?;
    let out = expect_refused(&mut pair, SECONDARY)?;
    assert!(out.contains("Lock file::"), "{out}");
    assert!(out.contains("is not specified properly"), "{out}");
    assert!(
        out.contains("lock.dat"),
        "the message should name the file: {out}"
    );
    assert!(
        !Path::new(&pair.lock_path()).exists(),
        "the server created the missing lock file"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mismatched_ping_interval_is_refused() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    pair.start_gateway()?;
    let text = set_key(&pair.profile_text(SECONDARY), "ha", "ping_interval", "150");
    pair.write_profile(SECONDARY, &text);
    pair.spawn(PRIMARY)?;
    pair.spawn(SECONDARY)?;

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut exits: [Option<ExitStatus>; 2] = [None, None];
    while Instant::now() < deadline && exits.iter().any(Option::is_none) {
        for (i, exit) in exits.iter_mut().enumerate() {
            if exit.is_none() {
                *exit = pair.nodes[i].proc_mut().exited();
            }
        }
        // Both should go; give the second a moment after the first.
        if exits.iter().any(Option::is_some) {
            let grace = Instant::now() + Duration::from_secs(3);
            while Instant::now() < grace && exits.iter().any(Option::is_none) {
                for (i, exit) in exits.iter_mut().enumerate() {
                    if exit.is_none() {
                        *exit = pair.nodes[i].proc_mut().exited();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused: Vec<usize> = (0..2).filter(|i| exits[*i].is_some()).collect();
    println!(
        "exited: {:?}",
        refused
            .iter()
            .map(|i| (pair.nodes[*i].name, exits[*i]))
            .collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "neither server exited on mismatched ping_interval:\n{}",
        pair.logs()
    );
    for i in refused {
        let out = pair.nodes[i].proc_mut().output();
        let status = exits[i].expect("exited");
        assert!(!status.success(), "{} exited 0:\n{out}", pair.nodes[i].name);
        assert!(
            out.contains("HA properties are not set properly in the backup server"),
            "{}:\n{out}",
            pair.nodes[i].name
        );
        assert!(
            out.contains("PingInterval"),
            "{}:\n{out}",
            pair.nodes[i].name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_relative_lock_file_path_works() -> Result<()> {
    let _serial = serial().await;
    let mut pair = Pair::new(true);
    for i in [PRIMARY, SECONDARY] {
        let text = set_key(
            &pair.profile_text(i),
            "ha",
            "lock_file",
            "\"../lock/lock.dat\"",
        );
        pair.write_profile(i, &text);
    }
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    // Stable for a second: neither refused the other's settings.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [active, passive] {
        if let Some(status) = pair.nodes[i].proc_mut().exited() {
            bail!(
                "{} exited with {status}:\n{}",
                pair.nodes[i].name,
                pair.logs()
            );
        }
    }
    assert_eq!(pair.wait_roles(Duration::from_secs(2))?, (active, passive));
    Ok(())
}
