//! Network namespaces for the fault-injection tests: the gateway, the
//! primary and the secondary each in a namespace of its own, joined by
//! point-to-point veth links that a test sets down with `ip link`.
//!
//! Topology (all addresses exist only inside these namespaces, except the
//! test host's ends of the optional client links):
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
//! Each process binds its service address on its namespace's `lo`; host
//! routes send each service address over the direct link, so a link set
//! down makes the other side unreachable at once. A namespace has routes
//! only to its direct links' far ends (no default route), so the client
//! links are no path between the servers. Creating namespaces needs root
//! (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the `ip` tool.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as ProcessCommand, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::pair::{running_or_stopped_by_test, runs_tail, HaPair, PRIMARY, SECONDARY};
use crate::{fmq_bin, ha_state, status_at, tail_file, Proc};

/// Runs `ip ARGS`; an error with its output if it fails.
pub fn ip(args: &[&str]) -> Result<()> {
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
pub struct End {
    /// The namespace ([`NS_A`], [`NS_B`] or [`NS_G`]).
    pub ns: usize,
    /// The veth device in it.
    pub dev: &'static str,
    /// Its address, with the prefix length.
    pub addr: &'static str,
    /// The far side's service address, routed over this link.
    pub route_to: &'static str,
    /// The far end's address.
    pub via: &'static str,
}

/// The primary's namespace.
pub const NS_A: usize = 0;
/// The secondary's namespace.
pub const NS_B: usize = 1;
/// The gateway's namespace.
pub const NS_G: usize = 2;

/// The gateway's service address.
pub const GATEWAY_IP: &str = "10.251.10.3";
/// The gateway's port (the shipped one).
pub const GATEWAY_PORT: u16 = 7007;

/// Service addresses (on `lo`) of A, B and G.
pub const SERVICE: [&str; 3] = ["10.251.10.1", "10.251.10.2", GATEWAY_IP];

/// The three links between the namespaces, each as its two ends.
pub const LINKS: [[End; 2]; 3] = [
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
/// The primary's link to the gateway.
pub const LINK_AG: usize = 0;
/// The secondary's link to the gateway.
pub const LINK_BG: usize = 1;
/// The HA link between the servers.
pub const LINK_AB: usize = 2;

/// The client link of server namespace `i` (A, B): the device inside, its
/// address, and the test host's address on the other end.
pub const CLIENT: [(&str, &str, &str); 2] = [
    ("cl", "10.254.1.1", "10.254.1.2"),
    ("cl", "10.254.2.1", "10.254.2.2"),
];

/// `port` of server namespace `ns` (A, B) as the test host reaches it, over
/// its client link.
pub fn client_addr(ns: usize, port: u16) -> SocketAddr {
    let ip = CLIENT[ns].1.parse().expect("a client link address");
    SocketAddr::new(ip, port)
}

/// The servers of a replicated pair in namespaces A and B: profile
/// (`profiles/FerroMQ_HA_rpl/NAME`), STOMP port, admin port and HA port,
/// as shipped.
pub const SERVERS: [(&str, u16, u16, u16); 2] = [
    ("HAPrimary", 1856, 1858, 2000),
    ("HASecondary", 1956, 1859, 3000),
];

/// The shipped replicated profile of the server in namespace `i` (A, B),
/// bound to it: HA port on its service address, STOMP and admin on every
/// address (for the client link), its own store `db`, the common lock file
/// `lock`, synchronous replication.
pub fn replicated_profile_in(i: usize, db: &Path, lock: &Path) -> String {
    let (name, port, admin, ha) = SERVERS[i];
    let (_, peer_port, peer_admin, peer_ha) = SERVERS[1 - i];
    let q = |s: &str| format!("{s:?}");
    crate::replicated_profile(
        name,
        &[
            ("network", "bind_address", q("0.0.0.0")),
            ("network", "port", port.to_string()),
            ("network", "admin_bind_address", q("0.0.0.0")),
            ("network", "admin_port", admin.to_string()),
            ("store", "db_path", q(&db.display().to_string())),
            ("log", "file", "false".into()),
            ("ha", "bind_address", q(SERVICE[i])),
            ("ha", "port", ha.to_string()),
            ("ha", "backup_ha_ip_address", q(SERVICE[1 - i])),
            ("ha", "backup_ha_port", peer_ha.to_string()),
            ("ha", "backup_server_ip", q(CLIENT[1 - i].1)),
            ("ha", "backup_server_port", peer_port.to_string()),
            ("ha", "backup_rmi_server_port", peer_admin.to_string()),
            ("ha", "lock_file", q(&lock.display().to_string())),
            ("ha", "gateway_server_ip_address", q(GATEWAY_IP)),
            ("ha", "gateway_server_port", GATEWAY_PORT.to_string()),
            ("ha", "replication", q("sync")),
        ],
    )
}

static NET_SEQ: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one test, and the test host's ends of the client
/// links if it has them; deleted on drop.
#[derive(Debug)]
pub struct Net {
    names: Vec<String>,
    host_devs: Vec<String>,
}

impl Net {
    /// The three namespaces and their links, named after `tag` (for
    /// example `t11`), with client links to the test host if
    /// `client_links` (then only one such test may run on the host at a
    /// time: see [`host_lock`]).
    pub fn new(tag: &str, client_links: bool) -> Result<Net> {
        let n = NET_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut net = Net {
            names: Vec::new(),
            host_devs: Vec::new(),
        };
        for letter in ["A", "B", "G"] {
            let name = format!("fmq{letter}-{tag}-{pid}-{n}");
            ip(&["netns", "add", &name])
                .with_context(|| format!("create network namespace {name}"))?;
            net.names.push(name);
        }
        if client_links {
            // At most 15 characters: "fmq" + 7 digits + "a".
            let short = (u64::from(pid) % 1_000_000) * 10 + u64::from(n % 10);
            net.host_devs = ["a", "b"]
                .iter()
                .map(|s| format!("fmq{short}{s}"))
                .collect();
        }
        net.build().context("set up the namespaces' links")?;
        Ok(net)
    }

    /// The name of namespace `i`.
    pub fn ns(&self, i: usize) -> &str {
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
        for (i, hdev) in self.host_devs.iter().enumerate() {
            let (dev, addr, host) = CLIENT[i];
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
    pub fn end_down(&self, e: End) -> Result<()> {
        ip(&["-n", self.ns(e.ns), "link", "set", e.dev, "down"])
    }

    /// Sets one end up and (re)installs its host route.
    pub fn end_up(&self, e: End) -> Result<()> {
        let ns = self.ns(e.ns);
        ip(&["-n", ns, "link", "set", e.dev, "up"])?;
        ip(&[
            "-n", ns, "route", "replace", e.route_to, "via", e.via, "dev", e.dev,
        ])
    }

    /// Sets both ends of link `l` down.
    pub fn link_down(&self, l: usize) -> Result<()> {
        self.end_down(LINKS[l][0])?;
        self.end_down(LINKS[l][1])
    }

    /// Sets both ends of link `l` up, with their routes.
    pub fn link_up(&self, l: usize) -> Result<()> {
        self.end_up(LINKS[l][0])?;
        self.end_up(LINKS[l][1])
    }

    /// Every link of namespace `ns` to the other namespaces down, at its
    /// own end (a client link stays up). Returns the ends set down.
    pub fn isolate(&self, ns: usize) -> Result<Vec<End>> {
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

    /// Spawns `fmq ARGS` in namespace `i` (`ip netns exec` execs it, so
    /// the pid is the server's own), its stdout to `out` and stderr to
    /// `err`.
    pub fn spawn_fmq(&self, i: usize, args: &[&str], out: PathBuf, err: PathBuf) -> Result<Proc> {
        Proc::spawn(
            ProcessCommand::new("ip")
                .args(["netns", "exec", self.ns(i)])
                .arg(fmq_bin())
                .args(args),
            out,
            err,
        )
    }

    /// Starts `fmq gateway` in G on the gateway address, its console
    /// output to `gateway.out` and `gateway.err` in `dir`.
    pub fn spawn_gateway(&self, dir: &Path) -> Result<Proc> {
        let listen = format!("{GATEWAY_IP}:{GATEWAY_PORT}");
        self.spawn_fmq(
            NS_G,
            &["gateway", "--listen", &listen],
            dir.join("gateway.out"),
            dir.join("gateway.err"),
        )
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

/// Why namespaces cannot be used here, if they cannot: not root, or `ip
/// netns add` fails.
pub fn unavailable() -> Option<String> {
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
    let probe = format!("fmqprobe-{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &probe]) {
        return Some(format!("`ip netns` is not usable: {e:#}"));
    }
    let _ = ip(&["netns", "del", &probe]);
    None
}

/// Blocks until no other test on this host holds the client-link
/// addresses (an exclusive `flock` on this source file, released when the
/// returned file is closed).
pub fn host_lock() -> Result<File> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/netns.rs");
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    file.lock().context("flock the client links' lock file")?;
    Ok(file)
}

/// Held for the whole of a test with client links: one such test at a
/// time in this process and across processes.
#[derive(Debug)]
pub struct Exclusive {
    _file: File,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

/// `Some` when the namespaces can be used (then holding `serial` and the
/// [`host_lock`]), `None` (with a message) when `test` must be skipped.
pub async fn prerequisites(
    serial: &'static tokio::sync::Mutex<()>,
    test: &str,
) -> Result<Option<Exclusive>> {
    let guard = serial.lock().await;
    if let Some(why) = unavailable() {
        eprintln!("SKIPPED {test}: needs root and `ip netns`: {why}");
        return Ok(None);
    }
    let file = tokio::task::block_in_place(host_lock)?;
    Ok(Some(Exclusive {
        _file: file,
        _guard: guard,
    }))
}

/// One server of an [`NsPair`].
#[derive(Debug)]
pub struct NsNode {
    /// `HAPrimary` or `HASecondary`, as the shipped profiles.
    pub name: &'static str,
    /// Its namespace ([`NS_A`] or [`NS_B`]).
    pub ns: usize,
    /// STOMP port.
    pub port: u16,
    /// Admin port.
    pub admin: u16,
    /// The process, while the test runs it.
    pub proc_: Option<Proc>,
    /// How many times it was started (run `k` logs to `NAME-k.out`).
    pub starts: u32,
}

impl NsNode {
    /// The STOMP address, over the client link.
    pub fn addr(&self) -> SocketAddr {
        client_addr(self.ns, self.port)
    }

    /// The admin address, over the client link.
    pub fn admin_addr(&self) -> SocketAddr {
        client_addr(self.ns, self.admin)
    }
}

/// A replicated pair in namespaces with client links: the gateway in G, the
/// primary in A and the secondary in B, each server on its own store, the
/// lock file a local file both open (a partition never hides it). The
/// processes (fields `nodes` and `gateway`) are dropped before the
/// namespaces (`net`, the last field).
#[derive(Debug)]
pub struct NsPair {
    /// The primary and the secondary.
    pub nodes: [NsNode; 2],
    /// The gateway, while running.
    pub gateway: Option<Proc>,
    /// The temporary directory: profiles, stores, lock file, console output.
    pub root: tempfile::TempDir,
    /// The namespaces.
    pub net: Net,
}

impl NsPair {
    /// Namespaces named after `tag`, and the profiles (see
    /// [`replicated_profile_in`]); nothing started. Needs the
    /// [`host_lock`].
    pub fn new(tag: &str) -> Result<NsPair> {
        let net = Net::new(tag, true)?;
        let root = tempfile::Builder::new()
            .prefix("fmq-rpl-netns-")
            .tempdir()
            .context("temp dir")?;
        let mk = |ns: usize| {
            let (name, port, admin, _) = SERVERS[ns];
            NsNode {
                name,
                ns,
                port,
                admin,
                proc_: None,
                starts: 0,
            }
        };
        let pair = NsPair {
            nodes: [mk(NS_A), mk(NS_B)],
            gateway: None,
            root,
            net,
        };
        let lock = pair.root.path().join("lock/lock.dat");
        std::fs::create_dir_all(pair.root.path().join("lock"))?;
        File::create(&lock)?;
        for n in &pair.nodes {
            let dir = pair.root.path().join(n.name);
            std::fs::create_dir_all(dir.join("run"))?;
            let text = replicated_profile_in(n.ns, &dir.join("run/db"), &lock);
            std::fs::write(dir.join("fmq.toml"), text)?;
        }
        Ok(pair)
    }

    /// The stdout of server `i`'s current (or last) run.
    pub fn out_path(&self, i: usize) -> PathBuf {
        let n = &self.nodes[i];
        self.root
            .path()
            .join(format!("{}-{}.out", n.name, n.starts))
    }

    /// Starts the gateway in G.
    pub fn start_gateway(&mut self) -> Result<()> {
        self.gateway = Some(self.net.spawn_gateway(self.root.path())?);
        Ok(())
    }

    /// Spawns server `i` without waiting.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let root = self.root.path().to_path_buf();
        let node = &mut self.nodes[i];
        node.starts += 1;
        let tag = format!("{}-{}", node.name, node.starts);
        let dir = root.join(node.name).display().to_string();
        node.proc_ = Some(self.net.spawn_fmq(
            node.ns,
            &["-profile", &dir],
            root.join(format!("{tag}.out")),
            root.join(format!("{tag}.err")),
        )?);
        Ok(())
    }

    /// Spawns server `i` and waits until it answers status.
    pub fn start(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_answering(i)
    }

    /// The gateway, then both servers at once (so they meet well within
    /// `max_wait_timeout`).
    pub fn start_all(&mut self) -> Result<()> {
        self.start_gateway()?;
        self.spawn(PRIMARY)?;
        self.spawn(SECONDARY)?;
        self.wait_answering(PRIMARY)?;
        self.wait_answering(SECONDARY)
    }

    /// SIGKILL server `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        drop(self.nodes[i].proc_.take());
    }

    /// Sends `sig` to server `i`, if running.
    pub fn signal(&self, i: usize, sig: Signal) {
        if let Some(p) = &self.nodes[i].proc_ {
            p.signal(sig);
        }
    }

    /// A poll of server `i`'s `ha.state` (over its client link) for
    /// [`Samplers`](crate::samples::Samplers).
    pub fn poll(&self, i: usize) -> impl Fn() -> Option<String> + Send + 'static {
        let addr = self.nodes[i].admin_addr();
        move || status_at(addr, Duration::from_millis(300)).and_then(|s| ha_state(&s))
    }

    /// `ha.position` of server `i` as (epoch, sequence).
    pub fn position(&self, i: usize) -> Result<(u64, u64)> {
        let ha = self.ha(i)?;
        let p = &ha["position"];
        match (p["epoch"].as_u64(), p["sequence"].as_u64()) {
            (Some(e), Some(s)) => Ok((e, s)),
            _ => bail!("{}: no position in {ha}", self.nodes[i].name),
        }
    }

    /// The states server `i` announced on its console in its current run
    /// ("... Server switched to STATE"), in order.
    pub fn switches(&self, i: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.out_path(i)).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once("Server switched to ").map(|(_, s)| s))
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    }
}

impl HaPair for NsPair {
    fn status(&self, i: usize) -> Option<Value> {
        status_at(self.nodes[i].admin_addr(), Duration::from_millis(1000))
    }

    fn name(&self, i: usize) -> &str {
        self.nodes[i].name
    }

    fn process(&self, i: usize) -> Option<&Proc> {
        self.nodes[i].proc_.as_ref()
    }

    fn alive(&self, i: usize) -> Result<()> {
        running_or_stopped_by_test(self, i)
    }

    fn logs(&self) -> String {
        let root = self.root.path();
        let mut s: String = self
            .nodes
            .iter()
            .map(|n| runs_tail(root, n.name, n.starts, n.proc_.as_ref()))
            .collect();
        s += &format!(
            "===== gateway\n{}\n{}\n",
            tail_file(&root.join("gateway.out"), 10),
            tail_file(&root.join("gateway.err"), 10)
        );
        s
    }
}
