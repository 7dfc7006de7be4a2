//! Replicated HA under network faults: the gateway, the primary and the
//! secondary each run in a network namespace of their own, created by the
//! test, each server on its OWN store; the faults are links set down with
//! `ip link`, as in `t11_shared_ha_netns`.
//!
//! Topology (the namespaces' part is t11's; the client links are new):
//!
//! ```text
//!   A (primary)  ab 10.251.3.1/30 ---- 10.251.3.2/30 ba  B (secondary)
//!   lo 10.251.10.1/32                                    lo 10.251.10.2/32
//!   cl 10.254.1.1/30  ag 10.251.1.1/30    bg 10.251.2.1/30  cl 10.254.2.1/30
//!    |                     |                 |                      |
//!    |                ga 10.251.1.2/30   gb 10.251.2.2/30           |
//!    |                      G (gateway) lo 10.251.10.3/32           |
//!   test host 10.254.1.2/30                        test host 10.254.2.2/30
//! ```
//!
//! The HA port and the gateway are on the namespaces' service addresses
//! (`lo`), reached over the direct links only. The STOMP and admin ports
//! listen on every address, so the test (the clients) reaches each server
//! over its client link, which no fault touches: a server cut from its peer
//! and the gateway still answers `status` and still talks to clients. A
//! namespace has routes only to its direct links' far ends (no default
//! route), so the client links are no path between the servers, whether or
//! not the test host forwards. The lock file is a local file both
//! processes open: a partition never hides it, and it is released only when
//! its holder steps down.
//!
//! - the HA link alone is cut: the ACTIVE goes STANDALONE (it keeps the
//!   lock), the PASSIVE goes WAITING and stays there, refusing clients,
//!   however long the partition lasts; healed, it goes PASSIVE_SYNC then
//!   PASSIVE and catches up what was sent meanwhile;
//! - the ACTIVE is cut from its peer and the gateway under receipted load:
//!   it steps down to WAITING (releasing the lock), the PASSIVE goes
//!   STANDALONE, the producers fail over, and every receipted message is on
//!   the new server exactly once; healed, the old ACTIVE rejoins as PASSIVE
//!   at the same position.
//!
//! The tests need root and `ip netns`; without them they are skipped (with a
//! message). They run one at a time, across test processes too (a `flock`
//! on this source file), since the client links put addresses on the test
//! host.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as ProcessCommand, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fmq_tests::{
    describe, fmq_bin, longest_double_active, sample_states, tail_file, workspace_root, Command,
    Frame, Sample, Stomp,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const PRIMARY: usize = 0;
const SECONDARY: usize = 1;
const GATEWAY_PORT: u16 = 7007;
const GATEWAY_IP: &str = "10.251.10.3";
const LOGIN: [(&str, &str); 2] = [("login", "admin"), ("passcode", "passwd")];
const QUEUE: &str = "/queue/t13.rpl";
const BODY_LEN: usize = 256;

// ---------------------------------------------------------------------------
// Prerequisites and serialisation

/// Why these tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some(format!(
            "not root (effective uid {})",
            euid.unwrap_or("unknown")
        ));
    }
    let probe = format!("fmq13probe-{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        return Some(format!("`ip netns` is not usable: {e:#}"));
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

/// Held for the whole test: one test at a time in this process and across
/// processes.
struct Exclusive {
    _file: File,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `Some` when the test can run (then holding the exclusive right to),
/// `None` (with a message) when it must be skipped.
async fn prerequisites(test: &str) -> Result<Option<Exclusive>> {
    let guard = SERIAL.lock().await;
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED {test}: needs root and `ip netns`: {why}");
        return Ok(None);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/t13_replicated_ha_netns.rs");
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    tokio::task::block_in_place(|| file.lock()).context("flock this test's source file")?;
    Ok(Some(Exclusive {
        _file: file,
        _guard: guard,
    }))
}

// ---------------------------------------------------------------------------
// Namespaces and links

/// Runs `ip ARGS`; an error with its output if it fails.
fn ip(args: &[&str]) -> Result<()> {
    let out = ProcessCommand::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One end of a point-to-point link: namespace index, device, its /30
/// address, and the host route (service address of the far side, via the
/// far end's address) that uses it.
#[derive(Debug, Clone, Copy)]
struct End {
    ns: usize,
    dev: &'static str,
    addr: &'static str,
    route_to: &'static str,
    via: &'static str,
}

const NS_A: usize = 0;
const NS_B: usize = 1;
const NS_G: usize = 2;

/// Service addresses (on `lo`) of A, B and G.
const SERVICE: [&str; 3] = ["10.251.10.1", "10.251.10.2", GATEWAY_IP];

/// The three links between the namespaces, each as its two ends.
const LINKS: [[End; 2]; 3] = [
    [
        End {
            ns: NS_A,
            dev: "ag",
            addr: "10.251.1.1/30",
            route_to: GATEWAY_IP,
            via: "10.251.1.2",
        },
        End {
            ns: NS_G,
            dev: "ga",
            addr: "10.251.1.2/30",
            route_to: "10.251.10.1",
            via: "10.251.1.1",
        },
    ],
    [
        End {
            ns: NS_B,
            dev: "bg",
            addr: "10.251.2.1/30",
            route_to: GATEWAY_IP,
            via: "10.251.2.2",
        },
        End {
            ns: NS_G,
            dev: "gb",
            addr: "10.251.2.2/30",
            route_to: "10.251.10.2",
            via: "10.251.2.1",
        },
    ],
    [
        End {
            ns: NS_A,
            dev: "ab",
            addr: "10.251.3.1/30",
            route_to: "10.251.10.2",
            via: "10.251.3.2",
        },
        End {
            ns: NS_B,
            dev: "ba",
            addr: "10.251.3.2/30",
            route_to: "10.251.10.1",
            via: "10.251.3.1",
        },
    ],
];
const LINK_AB: usize = 2;

/// The client link of server namespace `i` (A, B): the device inside, its
/// address, and the test host's address on the other end.
const CLIENT: [(&str, &str, &str); 2] = [
    ("cl", "10.254.1.1", "10.254.1.2"),
    ("cl", "10.254.2.1", "10.254.2.2"),
];

static NET_SEQ: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one test and the test host's ends of the client links;
/// deleted on drop.
#[derive(Debug)]
struct Net {
    names: Vec<String>,
    host_devs: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let n = NET_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("t13-{pid}-{n}");
        let mut net = Net {
            names: Vec::new(),
            host_devs: Vec::new(),
        };
        for letter in ["A", "B", "G"] {
            let name = format!("fmq{letter}-{tag}");
            if let Err(e) = ip(&["netns", "add", &name]) {
                panic!("cannot create network namespace {name}: {e:#}");
            }
            net.names.push(name);
        }
        // At most 15 characters: "f13" + 7 digits + "a".
        let short = (u64::from(pid) % 1_000_000) * 10 + u64::from(n % 10);
        net.host_devs = ["a", "b"]
            .iter()
            .map(|s| format!("f13{short}{s}"))
            .collect();
        net.build().expect("set up the namespaces' links");
        net
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    fn build(&self) -> Result<()> {
        for (i, addr) in SERVICE.iter().enumerate() {
            let ns = self.ns(i);
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        for [x, y] in LINKS {
            ip(&[
                "-n",
                self.ns(x.ns),
                "link",
                "add",
                x.dev,
                "type",
                "veth",
                "peer",
                "name",
                y.dev,
                "netns",
                self.ns(y.ns),
            ])?;
            for e in [x, y] {
                ip(&["-n", self.ns(e.ns), "addr", "add", e.addr, "dev", e.dev])?;
            }
        }
        for l in 0..LINKS.len() {
            self.link_up(l)?;
        }
        for (i, (dev, addr, host)) in CLIENT.iter().enumerate() {
            let hdev = &self.host_devs[i];
            ip(&[
                "link",
                "add",
                hdev,
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                self.ns(i),
            ])?;
            ip(&["addr", "add", &format!("{host}/30"), "dev", hdev])?;
            ip(&["link", "set", hdev, "up"])?;
            let ns = self.ns(i);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Sets one end down (its routes go with it).
    fn end_down(&self, e: End) -> Result<()> {
        ip(&["-n", self.ns(e.ns), "link", "set", e.dev, "down"])
    }

    /// Sets one end up and (re)installs its host route.
    fn end_up(&self, e: End) -> Result<()> {
        let ns = self.ns(e.ns);
        ip(&["-n", ns, "link", "set", e.dev, "up"])?;
        ip(&[
            "-n", ns, "route", "replace", e.route_to, "via", e.via, "dev", e.dev,
        ])
    }

    fn link_down(&self, l: usize) -> Result<()> {
        self.end_down(LINKS[l][0])?;
        self.end_down(LINKS[l][1])
    }

    fn link_up(&self, l: usize) -> Result<()> {
        self.end_up(LINKS[l][0])?;
        self.end_up(LINKS[l][1])
    }

    /// Every link of namespace `ns` to the other namespaces down, at its
    /// own end (the client link stays up). Returns the ends set down.
    fn isolate(&self, ns: usize) -> Result<Vec<End>> {
        let mut ends = Vec::new();
        for link in LINKS {
            for e in link {
                if e.ns == ns {
                    self.end_down(e)?;
                    ends.push(e);
                }
            }
        }
        Ok(ends)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            if let Err(e) = ip(&["netns", "del", n]) {
                eprintln!("cleanup: {e:#}");
            }
        }
        // Deleting a namespace deletes its veths and their peers here; this
        // only matters if a namespace was not deleted.
        for d in &self.host_devs {
            let _ = ProcessCommand::new("ip")
                .args(["link", "del", d])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

/// A process in a namespace (`ip netns exec` execs it, so the pid is the
/// process itself), SIGKILLed and reaped on drop.
#[derive(Debug)]
struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(ns: &str, args: &[&str], out: PathBuf, err: PathBuf) -> Result<Proc> {
        let child = ProcessCommand::new("ip")
            .args(["netns", "exec", ns])
            .arg(fmq_bin())
            .args(args)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .spawn()
            .context("spawn ip netns exec fmq")?;
        Ok(Proc { child })
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server of the pair.
#[derive(Debug)]
struct Node {
    name: &'static str,
    ns: usize,
    port: u16,
    admin: u16,
    ha: u16,
    proc_: Option<Proc>,
}

impl Node {
    /// The STOMP address, over the client link.
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(ip_of(CLIENT[self.ns].1), self.port)
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(ip_of(CLIENT[self.ns].1), self.admin)
    }
}

fn ip_of(s: &str) -> std::net::IpAddr {
    s.parse().expect("an IP address")
}

/// One admin `status` request with short timeouts: the `data` object, or
/// `None`.
fn status_at(addr: SocketAddr, wait: Duration) -> Option<Value> {
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

/// Sets `key = value` (TOML text) in `[section]` of a profile text.
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

/// The whole set-up of one test. Drop order: the processes (fields of
/// `nodes` and `gateway`) before the namespaces (`net`, last field).
#[derive(Debug)]
struct Pair {
    nodes: [Node; 2],
    gateway: Option<Proc>,
    root: tempfile::TempDir,
    net: Net,
}

impl Pair {
    fn new() -> Pair {
        let net = Net::new();
        let root = tempfile::Builder::new()
            .prefix("fmq-rpl-netns-")
            .tempdir()
            .expect("temp dir");
        let mk = |name, ns, port, admin, ha| Node {
            name,
            ns,
            port,
            admin,
            ha,
            proc_: None,
        };
        let pair = Pair {
            nodes: [
                mk("HAPrimary", NS_A, 1856, 1858, 2000),
                mk("HASecondary", NS_B, 1956, 1859, 3000),
            ],
            gateway: None,
            root,
            net,
        };
        std::fs::create_dir_all(pair.root.path().join("lock")).expect("mkdir lock");
        File::create(pair.root.path().join("lock/lock.dat")).expect("create lock file");
        for i in [PRIMARY, SECONDARY] {
            let dir = pair.root.path().join(pair.nodes[i].name);
            std::fs::create_dir_all(dir.join("run")).expect("mkdir profile");
            std::fs::write(dir.join("fmq.toml"), pair.profile(i)).expect("write profile");
        }
        pair
    }

    /// The shipped replicated profile of server `i`, bound to its
    /// namespace: HA port on its service address, STOMP and admin on every
    /// address (for the client link), its own store, the common lock file.
    fn profile(&self, i: usize) -> String {
        let (me, peer) = (&self.nodes[i], &self.nodes[1 - i]);
        let shipped = workspace_root()
            .join("profiles/FerroMQ_HA_rpl")
            .join(me.name)
            .join("fmq.toml");
        let mut t = std::fs::read_to_string(&shipped)
            .unwrap_or_else(|e| panic!("read {}: {e}", shipped.display()));
        assert!(
            t.contains("mode = \"replicated\""),
            "{} is not a replicated profile",
            shipped.display()
        );
        let q = |s: &str| format!("{s:?}");
        let dir = self.root.path().join(me.name);
        let db = dir.join("run/db").display().to_string();
        let lock = self.root.path().join("lock/lock.dat").display().to_string();
        for (section, key, value) in [
            ("network", "bind_address", q("0.0.0.0")),
            ("network", "port", me.port.to_string()),
            ("network", "admin_bind_address", q("0.0.0.0")),
            ("network", "admin_port", me.admin.to_string()),
            ("store", "db_path", q(&db)),
            ("log", "file", "false".into()),
            ("ha", "bind_address", q(SERVICE[me.ns])),
            ("ha", "port", me.ha.to_string()),
            ("ha", "backup_ha_ip_address", q(SERVICE[peer.ns])),
            ("ha", "backup_ha_port", peer.ha.to_string()),
            ("ha", "backup_server_ip", q(CLIENT[peer.ns].1)),
            ("ha", "backup_server_port", peer.port.to_string()),
            ("ha", "backup_rmi_server_port", peer.admin.to_string()),
            ("ha", "lock_file", q(&lock)),
            ("ha", "gateway_server_ip_address", q(GATEWAY_IP)),
            ("ha", "gateway_server_port", GATEWAY_PORT.to_string()),
            ("ha", "replication", q("sync")),
        ] {
            t = set_key(&t, section, key, &value);
        }
        t
    }

    fn out_path(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("{}.out", self.nodes[i].name))
    }

    fn start_gateway(&mut self) -> Result<()> {
        let root = self.root.path();
        let listen = format!("{GATEWAY_IP}:{GATEWAY_PORT}");
        let gw = Proc::spawn(
            self.net.ns(NS_G),
            &["gateway", "--listen", &listen],
            root.join("gateway.out"),
            root.join("gateway.err"),
        )?;
        self.gateway = Some(gw);
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let root = self.root.path().to_path_buf();
        let ns = self.net.ns(self.nodes[i].ns).to_owned();
        let node = &mut self.nodes[i];
        let dir = root.join(node.name).display().to_string();
        node.proc_ = Some(Proc::spawn(
            &ns,
            &["-profile", &dir],
            root.join(format!("{}.out", node.name)),
            root.join(format!("{}.err", node.name)),
        )?);
        Ok(())
    }

    /// Waits until server `i` answers `status`.
    fn wait_admin(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.nodes[i].proc_.as_mut().is_some_and(Proc::exited) {
                bail!(
                    "{} exited during start-up:\n{}",
                    self.nodes[i].name,
                    self.logs()
                );
            }
            if self.status(i).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer status within 30 s:\n{}",
                    self.nodes[i].name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gateway, then both servers at once (so they meet well within
    /// `max_wait_timeout`).
    fn start_all(&mut self) -> Result<()> {
        self.start_gateway()?;
        self.spawn(PRIMARY)?;
        self.spawn(SECONDARY)?;
        self.wait_admin(PRIMARY)?;
        self.wait_admin(SECONDARY)
    }

    fn status(&self, i: usize) -> Option<Value> {
        status_at(self.nodes[i].admin_addr(), Duration::from_millis(1000))
    }

    /// `ha` object of server `i`; an error if it does not answer.
    fn ha(&self, i: usize) -> Result<Value> {
        self.status(i)
            .map(|v| v["ha"].clone())
            .ok_or_else(|| anyhow!("{} does not answer status", self.nodes[i].name))
    }

    fn state(&self, i: usize) -> Option<String> {
        self.status(i)
            .and_then(|v| v["ha"]["state"].as_str().map(str::to_owned))
    }

    /// `ha.position` of server `i` as (epoch, sequence).
    fn position(&self, i: usize) -> Result<(u64, u64)> {
        let ha = self.ha(i)?;
        let p = &ha["position"];
        match (p["epoch"].as_u64(), p["sequence"].as_u64()) {
            (Some(e), Some(s)) => Ok((e, s)),
            _ => bail!("{}: no position in {ha}", self.nodes[i].name),
        }
    }

    /// Waits until exactly one server is ACTIVE and the other PASSIVE;
    /// returns (active, passive).
    fn wait_roles(&self, within: Duration) -> Result<(usize, usize)> {
        let deadline = Instant::now() + within;
        loop {
            let s = [self.state(PRIMARY), self.state(SECONDARY)];
            match (s[0].as_deref(), s[1].as_deref()) {
                (Some("ACTIVE"), Some("PASSIVE")) => return Ok((PRIMARY, SECONDARY)),
                (Some("PASSIVE"), Some("ACTIVE")) => return Ok((SECONDARY, PRIMARY)),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!(
                    "no ACTIVE/PASSIVE pair within {within:?} (primary {:?}, secondary {:?}):\n{}",
                    s[0],
                    s[1],
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `pred` holds for the `ha` object of server `i`; returns
    /// how long it took.
    fn wait_ha(
        &self,
        i: usize,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last = Value::Null;
        loop {
            if let Some(v) = self.status(i) {
                if pred(&v["ha"]) {
                    return Ok(start.elapsed());
                }
                last = v["ha"].clone();
            }
            if start.elapsed() > within {
                bail!(
                    "{}: not {what} within {within:?} (last ha: {last}):\n{}",
                    self.nodes[i].name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn wait_state(&self, i: usize, state: &str, within: Duration) -> Result<Duration> {
        self.wait_ha(i, state, within, |ha| ha["state"] == state)
    }

    /// Both servers see the HA link up.
    fn wait_link_up(&self, within: Duration) -> Result<()> {
        for i in [PRIMARY, SECONDARY] {
            self.wait_ha(i, "link_up", within, |ha| ha["link_up"] == true)?;
        }
        Ok(())
    }

    /// Waits until both servers are at the same (epoch, sequence); returns
    /// it.
    fn wait_same_position(&self, within: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + within;
        loop {
            let (a, b) = (self.position(PRIMARY)?, self.position(SECONDARY)?);
            if a == b {
                return Ok(a);
            }
            if Instant::now() > deadline {
                bail!(
                    "positions differ after {within:?}: primary {a:?}, secondary {b:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The states server `i` announced on its console ("... Server switched
    /// to STATE"), in order.
    fn switches(&self, i: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.out_path(i)).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once("Server switched to ").map(|(_, s)| s))
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        let root = self.root.path();
        for n in &self.nodes {
            s += &format!(
                "===== {}{}\n{}\n{}\n",
                n.name,
                if n.proc_.is_some() {
                    ""
                } else {
                    " (not running)"
                },
                tail_file(&root.join(format!("{}.out", n.name)), 40),
                tail_file(&root.join(format!("{}.err", n.name)), 40)
            );
        }
        s += &format!(
            "===== gateway\n{}\n{}\n",
            tail_file(&root.join("gateway.out"), 10),
            tail_file(&root.join("gateway.err"), 10)
        );
        s
    }
}

// ---------------------------------------------------------------------------
// State samples

/// State samplers of some servers (every 50 ms, over the client links).
/// Dropping them stops and joins them, so declared after the [`Pair`] they
/// never poll an address whose link is gone (it would leave by the default
/// route).
struct Samplers {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Samplers {
    fn start(pair: &Pair, servers: [usize; 2], t0: Instant) -> Samplers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = servers
            .iter()
            .map(|&i| {
                let addr = pair.nodes[i].admin_addr();
                sample_states(
                    move || {
                        status_at(addr, Duration::from_millis(300))
                            .and_then(|s| s["ha"]["state"].as_str().map(str::to_owned))
                    },
                    t0,
                    stop.clone(),
                )
            })
            .collect();
        Samplers { stop, handles }
    }

    /// Stops them; the samples of each server, in the order given.
    fn finish(mut self) -> Result<Vec<Vec<Sample>>> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.handles)
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("sampler panicked")))
            .collect()
    }
}

impl Drop for Samplers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// States in which a server serves clients.
fn serving(s: &str) -> bool {
    matches!(s, "ACTIVE" | "ACTIVE_SYNC" | "STANDALONE")
}

/// The samples with every serving state as "ACTIVE", for
/// [`longest_double_active`].
fn as_serving(v: &[Sample]) -> Vec<Sample> {
    v.iter()
        .map(|(t, s)| {
            let s = s
                .as_deref()
                .map(|s| if serving(s) { "ACTIVE" } else { s }.to_owned());
            (*t, s)
        })
        .collect()
}

/// The samples from `from` to `to`.
fn window(v: &[Sample], from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
    v.iter().filter(move |(t, _)| *t >= from && *t <= to)
}

/// The state changes of a sample series, for messages.
fn show(v: &[Sample]) -> String {
    let mut out = String::new();
    let mut last: Option<&Option<String>> = None;
    for (t, s) in v {
        if last != Some(s) {
            out += &format!(" {}ms:{}", t.as_millis(), s.as_deref().unwrap_or("-"));
            last = Some(s);
        }
    }
    out
}

/// The first sample at or after `from` with state `state`.
fn first_at(v: &[Sample], from: Duration, state: &str) -> Option<Duration> {
    v.iter()
        .find(|(t, s)| *t >= from && s.as_deref() == Some(state))
        .map(|(t, _)| *t)
}

// ---------------------------------------------------------------------------
// Clients

/// A body derived from the message id, so corruption shows.
fn body_for(id: &str) -> Vec<u8> {
    let seed = id.as_bytes();
    (0..BODY_LEN)
        .map(|i| seed[i % seed.len()] ^ (i as u8))
        .collect()
}

fn send_frame(id: &str) -> Frame {
    Frame::new(Command::Send)
        .header("destination", QUEUE)
        .header("persistent", "true")
        .header("x-id", id)
        .with_body(body_for(id))
}

/// Sends `n` receipted persistent messages `{tag}-{k}` on one connection.
async fn send_batch(addr: SocketAddr, tag: &str, n: usize) -> Result<Vec<String>> {
    let mut c = Stomp::connect_with(addr, &LOGIN).await?;
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        let id = format!("{tag}-{k}");
        c.request(send_frame(&id), &id)
            .await
            .with_context(|| format!("send {id} to {addr}"))?;
        ids.push(id);
    }
    c.disconnect().await?;
    Ok(ids)
}

/// CONNECT to a server that must not serve: an ERROR naming `state`.
async fn expect_refusal(addr: SocketAddr, state: &str) -> Result<()> {
    let (_c, reply) = Stomp::connect_frame(addr, &LOGIN).await?;
    if reply.command != Command::Error {
        bail!("a {state} server accepted CONNECT: {}", describe(&reply));
    }
    let msg = reply.get("message").unwrap_or_default();
    if !msg.contains(state) {
        bail!("ERROR does not name {state}: {}", describe(&reply));
    }
    Ok(())
}

/// Drains the queue from `addr`, acknowledging each message: how many
/// times each id came, and the ids whose body was wrong.
async fn drain(addr: SocketAddr) -> Result<(BTreeMap<String, u32>, Vec<String>)> {
    let mut c = Stomp::connect_with(addr, &LOGIN).await?;
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
    Ok((seen, corrupt))
}

#[derive(Debug, Clone)]
struct Receipted {
    id: String,
    server: usize,
    at: Instant,
}

#[derive(Debug, Default)]
struct ProducerReport {
    receipted: Vec<Receipted>,
    unreceipted: Vec<String>,
    connect_attempts: u64,
}

/// Sends receipted persistent messages to `addrs[first]` until `stop`; on
/// any error it switches to the other address and retries CONNECT there
/// every 50 ms until it succeeds. An unreceipted SEND is not resent (it
/// may be stored), so every id is sent at most once.
async fn producer(
    n: usize,
    addrs: [SocketAddr; 2],
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
                    Stomp::connect_frame(addrs[target], &LOGIN),
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
        let sent =
            tokio::time::timeout(Duration::from_secs(5), c.request(send_frame(&id), &id)).await;
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

/// Producer tasks. Dropping them aborts them and waits (a little) until
/// they are gone, so declared after the [`Pair`] they never dial an address
/// whose link is gone.
struct Producers {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<ProducerReport>>,
}

impl Producers {
    /// `n` producers starting on `addrs[first]`, each receipt also recorded
    /// in `live`.
    fn start(
        n: usize,
        addrs: [SocketAddr; 2],
        first: usize,
        live: &Arc<Mutex<Vec<Receipted>>>,
    ) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..n)
            .map(|k| tokio::spawn(producer(k, addrs, first, stop.clone(), live.clone())))
            .collect();
        Producers { stop, handles }
    }

    /// Stops them; their reports.
    async fn finish(mut self) -> Result<Vec<ProducerReport>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut reports = Vec::new();
        for h in std::mem::take(&mut self.handles) {
            reports.push(h.await?);
        }
        Ok(reports)
    }
}

impl Drop for Producers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in &self.handles {
            h.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_of_ha_link_only() -> Result<()> {
    let Some(_exclusive) = prerequisites("partition_of_ha_link_only").await? else {
        return Ok(());
    };
    let mut pair = Pair::new();
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(20))?;
    pair.wait_link_up(Duration::from_secs(5))?;
    let (a_addr, p_addr) = (pair.nodes[active].addr(), pair.nodes[passive].addr());
    let mut receipted = send_batch(a_addr, "before", 100).await?;
    let in_sync = pair.wait_same_position(Duration::from_secs(10))?;
    let switches_before = [pair.switches(PRIMARY).len(), pair.switches(SECONDARY).len()];

    let t0 = Instant::now();
    let samplers = Samplers::start(&pair, [active, passive], t0);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cut_at = t0.elapsed();
    pair.net.link_down(LINK_AB)?;
    let standalone = pair.wait_state(active, "STANDALONE", Duration::from_secs(5))?;
    pair.wait_state(passive, "WAITING", Duration::from_secs(5))?;
    println!(
        "HA link cut: {} STANDALONE after {} ms",
        pair.nodes[active].name,
        standalone.as_millis()
    );

    // Traffic the passive will have to catch up; receipts come from the
    // STANDALONE alone. The passive refuses clients meanwhile.
    receipted.extend(send_batch(a_addr, "during", 300).await?);
    expect_refusal(p_addr, "WAITING").await?;
    // Past max_wait_timeout (3 s) and many passive lock attempts (500 ms).
    let hold_until = t0 + cut_at + Duration::from_secs(5);
    while Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a_ha, p_ha) = (pair.ha(active)?, pair.ha(passive)?);
    let (a_pos, p_pos) = (pair.position(active)?, pair.position(passive)?);
    println!("before healing: active at {a_pos:?}, passive at {p_pos:?}");
    assert_eq!(a_ha["state"], "STANDALONE", "{a_ha}");
    assert_eq!(a_ha["holds_lock"], true, "{a_ha}");
    assert_eq!(a_ha["link_up"], false, "{a_ha}");
    assert_eq!(p_ha["state"], "WAITING", "{p_ha}");
    assert_eq!(p_ha["holds_lock"], false, "{p_ha}");
    assert_eq!(p_ha["gateway_reachable"], true, "{p_ha}");
    assert_eq!(p_ha["link_up"], false, "{p_ha}");
    assert_eq!(a_pos.0, in_sync.0, "the active opened a new epoch");
    assert!(
        a_pos.1 >= p_pos.1 + 300,
        "the passive is not behind: active {a_pos:?}, passive {p_pos:?}"
    );

    let heal_at = t0.elapsed();
    pair.net.link_up(LINK_AB)?;
    let roles = pair.wait_roles(Duration::from_secs(20));
    let same = roles
        .as_ref()
        .ok()
        .map(|_| pair.wait_same_position(Duration::from_secs(10)));
    let healed_in = t0.elapsed() - heal_at;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let [a, p]: [Vec<Sample>; 2] = samplers
        .finish()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    println!(
        "cut at {} ms, healed at {} ms\n  {} (active):{}\n  {} (passive):{}",
        cut_at.as_millis(),
        heal_at.as_millis(),
        pair.nodes[active].name,
        show(&a),
        pair.nodes[passive].name,
        show(&p)
    );
    assert_eq!(roles?, (active, passive), "the roles changed");
    let healed = same.unwrap_or_else(|| Err(anyhow!("no roles")))?;
    println!(
        "ACTIVE/PASSIVE again and both at {healed:?} {} ms after healing",
        healed_in.as_millis()
    );
    assert!(healed.1 >= a_pos.1, "{healed:?} is behind {a_pos:?}");

    // Exactly one served throughout the partition.
    for (t, s) in window(&a, cut_at, heal_at) {
        assert!(
            s.as_deref().is_some_and(serving),
            "the active was {s:?} {} ms into the partition:{}",
            (*t - cut_at).as_millis(),
            show(&a)
        );
    }
    for (t, s) in window(&p, cut_at, heal_at) {
        assert!(
            s.as_deref().is_some_and(|s| !serving(s)),
            "the passive was {s:?} {} ms into the partition:{}",
            (*t - cut_at).as_millis(),
            show(&p)
        );
    }
    let waiting_seen = window(&p, cut_at + Duration::from_secs(1), heal_at)
        .all(|(_, s)| s.as_deref() == Some("WAITING"));
    assert!(
        waiting_seen,
        "the passive left WAITING during the partition:{}",
        show(&p)
    );
    // The console tells the same story: the active went STANDALONE, then
    // ACTIVE_SYNC and ACTIVE; the passive WAITING, then PASSIVE_SYNC and
    // PASSIVE.
    let a_switches = pair.switches(active)[switches_before[active]..].to_vec();
    let p_switches = pair.switches(passive)[switches_before[passive]..].to_vec();
    println!("console: active {a_switches:?}, passive {p_switches:?}");
    assert_eq!(
        a_switches,
        ["STANDALONE", "ACTIVE_SYNC", "ACTIVE"],
        "{}",
        pair.logs()
    );
    assert!(
        p_switches.iter().all(|s| !serving(s)),
        "the passive served: {p_switches:?}"
    );
    assert_eq!(p_switches.first().map(String::as_str), Some("WAITING"));
    assert!(
        p_switches.ends_with(&["PASSIVE_SYNC".to_owned(), "PASSIVE".to_owned()]),
        "{p_switches:?}"
    );
    let p_ha = pair.ha(passive)?;
    assert_eq!(p_ha["diverged"], serde_json::json!([]), "{p_ha}");

    // Everything receipted is on the active.
    let (seen, corrupt) = drain(a_addr).await?;
    let expected: BTreeSet<&String> = receipted.iter().collect();
    let got: BTreeSet<&String> = seen.keys().collect();
    assert_eq!(got, expected);
    assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_isolated_from_everything() -> Result<()> {
    let Some(_exclusive) = prerequisites("active_isolated_from_everything").await? else {
        return Ok(());
    };
    let mut pair = Pair::new();
    pair.start_all()?;
    let (old, new) = pair.wait_roles(Duration::from_secs(20))?;
    pair.wait_link_up(Duration::from_secs(5))?;
    let addrs = [pair.nodes[PRIMARY].addr(), pair.nodes[SECONDARY].addr()];
    let epoch_before = pair.position(old)?.0;

    let live = Arc::new(Mutex::new(Vec::new()));
    let producers = Producers::start(2, addrs, old, &live);
    let warm = Instant::now();
    loop {
        let count = live.lock().unwrap_or_else(|e| e.into_inner()).len();
        if count >= 200 && warm.elapsed() > Duration::from_millis(500) {
            break;
        }
        if warm.elapsed() > Duration::from_secs(20) {
            bail!(
                "only {count} receipted sends in 20 s before the cut:\n{}",
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    let samplers = Samplers::start(&pair, [old, new], t0);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before_cut = live.lock().unwrap_or_else(|e| e.into_inner()).len();
    let cut_at = t0.elapsed();
    let cut = Instant::now();
    let ends = pair.net.isolate(pair.nodes[old].ns)?;
    let stepped = pair.wait_state(old, "WAITING", Duration::from_secs(5));
    let took = pair.wait_state(new, "STANDALONE", Duration::from_secs(8));

    // Both producers get receipts from the new server.
    let deadline = cut + Duration::from_secs(20);
    let first_receipt = loop {
        let first = {
            let l = live.lock().unwrap_or_else(|e| e.into_inner());
            let after: Vec<&Receipted> =
                l.iter().filter(|r| r.server == new && r.at > cut).collect();
            let both = (0..2).all(|n| after.iter().any(|r| r.id.starts_with(&format!("p{n}-"))));
            both.then(|| after.iter().map(|r| r.at).min()).flatten()
        };
        if let Some(t) = first {
            break Some(t);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reports = producers.finish().await?;
    let [o, n]: [Vec<Sample>; 2] = samplers
        .finish()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    println!(
        "isolated {} at {} ms\n  {} (isolated):{}\n  {}:{}",
        pair.nodes[old].name,
        cut_at.as_millis(),
        pair.nodes[old].name,
        show(&o),
        pair.nodes[new].name,
        show(&n)
    );
    stepped?;
    took?;
    let first_receipt = first_receipt.ok_or_else(|| {
        anyhow!(
            "the producers got no receipts from {} within 20 s of the cut:\n{}",
            pair.nodes[new].name,
            pair.logs()
        )
    })?;

    let down = first_at(&o, cut_at, "WAITING")
        .ok_or_else(|| anyhow!("the sampler never saw the isolated server WAITING"))?
        - cut_at;
    let up = first_at(&n, cut_at, "STANDALONE")
        .ok_or_else(|| anyhow!("the sampler never saw the other server STANDALONE"))?
        - cut_at;
    let failover = first_receipt.duration_since(cut);
    println!(
        "isolated server WAITING after {} ms, other STANDALONE after {} ms, first receipt from it after {} ms",
        down.as_millis(),
        up.as_millis(),
        failover.as_millis()
    );
    // The isolated server answered status all along (client link), and
    // never served again once it stepped down.
    assert!(
        o.iter()
            .filter(|(t, _)| *t >= cut_at)
            .all(|(_, s)| s.is_some()),
        "the isolated server stopped answering status:{}",
        show(&o)
    );
    assert!(
        o.iter()
            .filter(|(t, _)| *t >= cut_at + down)
            .all(|(_, s)| s.as_deref().is_some_and(|s| !serving(s))),
        "the isolated server served again:{}",
        show(&o)
    );
    // The lock decides: the other served only after the isolated one
    // stopped (up to the two samplers' skew).
    let double = longest_double_active(&as_serving(&o), &as_serving(&n));
    assert!(
        double <= Duration::from_millis(200),
        "both served for {double:?}:\n{}",
        pair.logs()
    );
    assert!(
        up + Duration::from_millis(100) >= down,
        "the other server served {} ms before the isolated one stepped down",
        (down - up).as_millis()
    );
    let ha = pair.ha(old)?;
    assert_eq!(ha["state"], "WAITING", "{ha}");
    assert_eq!(ha["holds_lock"], false, "{ha}");
    assert_eq!(ha["gateway_reachable"], false, "{ha}");
    assert_eq!(ha["link_up"], false, "{ha}");
    let ha = pair.ha(new)?;
    assert_eq!(ha["state"], "STANDALONE", "{ha}");
    assert_eq!(ha["holds_lock"], true, "{ha}");
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    let new_pos = pair.position(new)?;
    assert!(new_pos.0 > epoch_before, "no new epoch: {new_pos:?}");
    expect_refusal(pair.nodes[old].addr(), "WAITING").await?;

    // Every receipted message is on the new server, once.
    let receipted: BTreeMap<String, usize> = reports
        .iter()
        .flat_map(|r| r.receipted.iter().map(|x| (x.id.clone(), x.server)))
        .collect();
    let unreceipted: BTreeSet<&String> = reports.iter().flat_map(|r| &r.unreceipted).collect();
    let on_new = receipted.values().filter(|s| **s == new).count();
    let (seen, corrupt) = drain(pair.nodes[new].addr()).await?;
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
        "receipted {} ({before_cut} before the cut, {on_new} by the new server), in doubt {}, connect attempts {:?}; drained {}: lost {}, duplicates {}, in-doubt delivered {}",
        receipted.len(),
        unreceipted.len(),
        reports.iter().map(|r| r.connect_attempts).collect::<Vec<_>>(),
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
    assert!(on_new > 0, "no sends receipted by the new server");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // Healed, the old server follows the new one.
    let healed = Instant::now();
    for e in ends {
        pair.net.end_up(e)?;
    }
    pair.wait_roles(Duration::from_secs(30)).and_then(|roles| {
        if roles == (new, old) {
            Ok(())
        } else {
            Err(anyhow!("roles after healing: {roles:?}"))
        }
    })?;
    let at = pair.wait_same_position(Duration::from_secs(10))?;
    let ha = pair.ha(old)?;
    println!(
        "healed: {} PASSIVE at {at:?} after {} ms (diverged: {})",
        pair.nodes[old].name,
        healed.elapsed().as_millis(),
        ha["diverged"]
    );
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    Ok(())
}
