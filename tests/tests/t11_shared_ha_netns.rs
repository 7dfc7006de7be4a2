//! Shared-storage HA under network faults: the gateway, the primary and the
//! secondary each run in a network namespace of their own, created by the
//! test, and the faults are links set down with `ip link`.
//!
//! Topology ([`fmq_tests::netns`] without its client links; all addresses
//! exist only inside these namespaces):
//!
//! ```text
//!   A (primary)  ab 10.251.3.1/30 ---- 10.251.3.2/30 ba  B (secondary)
//!   lo 10.251.10.1/32                                    lo 10.251.10.2/32
//!      ag 10.251.1.1/30                        bg 10.251.2.1/30
//!           |                                       |
//!      ga 10.251.1.2/30     G (gateway)     gb 10.251.2.2/30
//!                        lo 10.251.10.3/32
//! ```
//!
//! Each process binds its service address (on its namespace's `lo`, so the
//! admin port still answers `ip netns exec NS fmq status` when every link of
//! the namespace is down); host routes send each service address over the
//! direct link, so a link set down makes the other side unreachable at once.
//! The store directory and the lock file are on the host filesystem, shared
//! by both servers as in `profiles/FerroMQ_HA_shared`.
//!
//! - an ACTIVE cut off from everything steps down and the other takes over;
//! - a heartbeat partition alone (both reach the gateway) changes nothing;
//! - a PASSIVE that cannot reach the gateway never takes over, even with the
//!   lock free, and does once the gateway is back.
//!
//! The tests need root (network namespaces); without it they FAIL. They run
//! one at a time (a file-wide mutex).

use std::fs::File;
use std::io::Read;
use std::process::{Command as ProcessCommand, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use fmq_tests::netns::{Net, LINKS, LINK_AB, LINK_AG, LINK_BG, NS_A, NS_B, SERVICE};
use fmq_tests::netns::{GATEWAY_IP, GATEWAY_PORT};
use fmq_tests::pair::{HaPair, PRIMARY, SECONDARY};
use fmq_tests::samples::{first_at, show, Samplers};
use fmq_tests::{fmq_bin, ha_state, longest_double_active, tail_file, Proc, Sample};
use serde_json::Value;

const PING_MS: u64 = 100;
const ACTIVE_LOCK_MS: u64 = 200;
const PASSIVE_LOCK_MS: u64 = 500;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time in this file.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One server of the pair.
#[derive(Debug)]
struct Node {
    name: &'static str,
    ns: String,
    ip: &'static str,
    admin: u16,
    proc_: Option<Proc>,
}

/// `fmq status --json` of a server, run inside its namespace, with a
/// deadline; the parsed output or `None`.
fn ns_status(ns: &str, ip: &str, admin: u16, wait: Duration) -> Option<Value> {
    let port = admin.to_string();
    let mut child = ProcessCommand::new("ip")
        .args(["netns", "exec", ns])
        .arg(fmq_bin())
        .args([
            "status",
            "--admin-host",
            ip,
            "--admin-port",
            &port,
            "--json",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + wait;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut text = String::new();
    child.stdout.take()?.read_to_string(&mut text).ok()?;
    if !status.success() {
        return None;
    }
    serde_json::from_str(&text).ok()
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
        let net = Net::new("t11", false).unwrap_or_else(|e| {
            panic!(
                "cannot set up the network namespaces: these tests need root \
                 (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the `ip` tool: {e:#}"
            )
        });
        let root = tempfile::Builder::new()
            .prefix("fmq-ha-netns-")
            .tempdir()
            .expect("temp dir");
        let mk = |name, ns: usize, admin| Node {
            name,
            ns: net.ns(ns).to_owned(),
            ip: SERVICE[ns],
            admin,
            proc_: None,
        };
        let nodes = [mk("HAPrimary", NS_A, 1858), mk("HASecondary", NS_B, 1859)];
        let pair = Pair {
            nodes,
            gateway: None,
            root,
            net,
        };
        std::fs::create_dir_all(pair.root.path().join("run/db")).expect("mkdir db");
        std::fs::create_dir_all(pair.root.path().join("lock")).expect("mkdir lock");
        File::create(pair.root.path().join("lock/lock.dat")).expect("create lock file");
        for i in [PRIMARY, SECONDARY] {
            let dir = pair.root.path().join(pair.nodes[i].name);
            std::fs::create_dir_all(&dir).expect("mkdir profile");
            std::fs::write(dir.join("fmq.toml"), pair.profile(i)).expect("write profile");
        }
        pair
    }

    /// The profile of server `i`: the shipped keys, bound to its namespace.
    fn profile(&self, i: usize) -> String {
        let (me, peer) = (&self.nodes[i], &self.nodes[1 - i]);
        let (port, ha, role) = if i == PRIMARY {
            (1856, 2000, "primary")
        } else {
            (1956, 3000, "secondary")
        };
        let (peer_port, peer_ha) = if i == PRIMARY {
            (1956, 3000)
        } else {
            (1856, 2000)
        };
        let db = self.root.path().join("run/db");
        let lock = self.root.path().join("lock/lock.dat");
        format!(
            r#"[server]
name = "FerroMQ"

[network]
bind_address = "{ip}"
port = {port}
admin_bind_address = "{ip}"
admin_port = {admin}
max_connections = 10000
connect_timeout_ms = 10000
heart_beat_ms = [10000, 10000]

[store]
db_path = {db:?}
sync = true

[security]
authentication = true
initial_admin_user = "admin"
initial_admin_password = "passwd"

[broker]
default_prefetch = 100
max_redeliveries = 6
dead_letter_queue = "DLQ"
expiry_sweep_ms = 5000
max_frame_size = 16777216
max_headers = 1000
max_header_length = 10240
max_transaction_frames = 100000

[log]
dir = "run/logs"
file = false
level = "info"

[ha]
mode = "shared"
role = "{role}"
cluster_name = "FerroMQ"
bind_address = "{ip}"
port = {ha}
backup_ha_ip_address = "{peer_ip}"
backup_ha_port = {peer_ha}
backup_server_ip = "{peer_ip}"
backup_server_port = {peer_port}
backup_rmi_server_port = {peer_admin}
ping_interval = {PING_MS}
lock_file = {lock:?}
gateway_server_ip_address = "{GATEWAY_IP}"
gateway_server_port = {GATEWAY_PORT}
active_lock_reacquisition_interval = {ACTIVE_LOCK_MS}
passive_lock_reacquisition_interval = {PASSIVE_LOCK_MS}
socket_creation_timeout = 1000
socket_initialization_timeout = 2000
nagle_algo = false
max_wait_timeout = 10000
"#,
            ip = me.ip,
            admin = me.admin,
            db = db.display().to_string(),
            lock = lock.display().to_string(),
            peer_ip = peer.ip,
            peer_admin = peer.admin,
        )
    }

    fn start_gateway(&mut self) -> Result<()> {
        self.gateway = Some(self.net.spawn_gateway(self.root.path())?);
        Ok(())
    }

    /// Spawns server `i` and waits until its admin port answers.
    fn start(&mut self, i: usize) -> Result<()> {
        let root = self.root.path().to_path_buf();
        let ns = if i == PRIMARY { NS_A } else { NS_B };
        let node = &mut self.nodes[i];
        let dir = root.join(node.name).display().to_string();
        node.proc_ = Some(self.net.spawn_fmq(
            ns,
            &["-profile", &dir],
            root.join(format!("{}.out", node.name)),
            root.join(format!("{}.err", node.name)),
        )?);
        self.wait_answering(i)
    }

    fn start_all(&mut self) -> Result<()> {
        self.start_gateway()?;
        self.start(PRIMARY)?;
        self.start(SECONDARY)
    }

    fn kill9(&mut self, i: usize) {
        drop(self.nodes[i].proc_.take());
    }

    /// A poll of server `i`'s `ha.state` for [`Samplers`].
    fn poll(&self, i: usize) -> impl Fn() -> Option<String> + Send + 'static {
        let n = &self.nodes[i];
        let (ns, ip, admin) = (n.ns.clone(), n.ip, n.admin);
        move || ns_status(&ns, ip, admin, Duration::from_millis(300)).and_then(|s| ha_state(&s))
    }
}

impl HaPair for Pair {
    fn status(&self, i: usize) -> Option<Value> {
        let n = &self.nodes[i];
        ns_status(&n.ns, n.ip, n.admin, Duration::from_millis(1000))
    }

    fn name(&self, i: usize) -> &str {
        self.nodes[i].name
    }

    fn process(&self, i: usize) -> Option<&Proc> {
        self.nodes[i].proc_.as_ref()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let root = self.root.path();
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
        if let Some(g) = &self.gateway {
            s += &format!("===== gateway\n{}\n", g.tail(10));
        }
        s
    }
}

// ---------------------------------------------------------------------------

#[test]
fn active_isolated_from_everything_steps_down_and_the_other_takes_over() -> Result<()> {
    let _serial = serial();
    let mut pair = Pair::new();
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(10))?;
    pair.wait_link_up(Duration::from_secs(5))?;

    let t0 = Instant::now();
    let samplers = Samplers::start([pair.poll(active), pair.poll(passive)], t0);
    std::thread::sleep(Duration::from_millis(300));

    let cut_at = t0.elapsed();
    let ns = if active == PRIMARY { NS_A } else { NS_B };
    pair.net.isolate(ns)?;
    let stepped = pair.wait_state(active, "PASSIVE", Duration::from_secs(5));
    let took = pair.wait_state(passive, "ACTIVE", Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(1));
    let [a, p]: [Vec<Sample>; 2] = samplers
        .finish()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    println!(
        "isolated {} at {} ms\n  {} (isolated):{}\n  {}:{}",
        pair.nodes[active].name,
        cut_at.as_millis(),
        pair.nodes[active].name,
        show(&a),
        pair.nodes[passive].name,
        show(&p)
    );
    stepped?;
    took?;

    let down = first_at(&a, cut_at, "PASSIVE")
        .ok_or_else(|| anyhow!("the sampler never saw the isolated server PASSIVE"))?
        - cut_at;
    let up = first_at(&p, cut_at, "ACTIVE")
        .ok_or_else(|| anyhow!("the sampler never saw the other server ACTIVE"))?
        - cut_at;
    println!(
        "stepped down after {} ms, other ACTIVE after {} ms",
        down.as_millis(),
        up.as_millis()
    );
    assert!(
        down <= Duration::from_millis(2500),
        "the isolated ACTIVE stepped down only after {down:?}:\n{}",
        pair.logs()
    );
    assert!(
        up <= Duration::from_millis(3500),
        "the other server became ACTIVE only after {up:?}:\n{}",
        pair.logs()
    );
    assert!(
        a.iter()
            .filter(|(t, _)| *t >= cut_at)
            .all(|(_, s)| s.is_some()),
        "the isolated server stopped answering status locally:{}",
        show(&a)
    );
    let double = longest_double_active(&a, &p);
    assert!(
        double <= Duration::from_secs(1),
        "both ACTIVE for {double:?}:\n{}",
        pair.logs()
    );
    // The isolated server knows why, and stays PASSIVE.
    let ha = pair.ha(active)?;
    assert_eq!(ha["state"], "PASSIVE", "{ha}");
    assert_eq!(ha["gateway_reachable"], false, "{ha}");
    assert_eq!(ha["link_up"], false, "{ha}");
    let ha = pair.ha(passive)?;
    assert_eq!(ha["state"], "ACTIVE", "{ha}");
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    Ok(())
}

#[test]
fn heartbeat_partition_only_keeps_exactly_one_serving() -> Result<()> {
    let _serial = serial();
    let mut pair = Pair::new();
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(10))?;
    pair.wait_link_up(Duration::from_secs(5))?;

    let cut = Instant::now();
    pair.net.link_down(LINK_AB)?;
    let mut seen_down = [false, false];
    while cut.elapsed() < Duration::from_secs(3) {
        for (i, want) in [(active, "ACTIVE"), (passive, "PASSIVE")] {
            let ha = pair.ha(i)?;
            assert_eq!(
                ha["state"],
                want,
                "{} changed state during the heartbeat partition ({} ms in): {ha}\n{}",
                pair.nodes[i].name,
                cut.elapsed().as_millis(),
                pair.logs()
            );
            assert_eq!(ha["gateway_reachable"], true, "{ha}");
            if ha["link_up"] == false {
                seen_down[i] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        seen_down,
        [true, true],
        "link_up never went false on both sides during the partition:\n{}",
        pair.logs()
    );

    let healed = Instant::now();
    pair.net.link_up(LINK_AB)?;
    pair.wait_link_up(Duration::from_secs(10))?;
    println!(
        "link_up again {} ms after healing",
        healed.elapsed().as_millis()
    );
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_eq!(pair.wait_roles(Duration::ZERO)?, (active, passive));
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, peer) in [(active, "PASSIVE"), (passive, "ACTIVE")] {
        pair.wait_ha(i, &format!("peer {peer}"), Duration::from_secs(3), |ha| {
            ha["peer"] == peer
        })?;
    }
    Ok(())
}

#[test]
fn gateway_unreachable_from_the_passive_means_no_takeover() -> Result<()> {
    let _serial = serial();
    let mut pair = Pair::new();
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(10))?;
    pair.wait_link_up(Duration::from_secs(5))?;

    // Only the PASSIVE's own end of its gateway link.
    let link = if passive == PRIMARY { LINK_AG } else { LINK_BG };
    let end = LINKS[link][0];
    pair.net.end_down(end)?;
    pair.wait_ha(
        passive,
        "gateway unreachable",
        Duration::from_secs(3),
        |ha| ha["gateway_reachable"] == false,
    )?;
    assert_eq!(pair.ha(active)?["state"], "ACTIVE");

    pair.kill9(active);
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(3) {
        let ha = pair.ha(passive)?;
        assert_eq!(
            ha["state"],
            "PASSIVE",
            "the PASSIVE left PASSIVE without a gateway ({} ms after the kill): {ha}\n{}",
            killed.elapsed().as_millis(),
            pair.logs()
        );
        assert_eq!(ha["gateway_reachable"], false, "{ha}");
        std::thread::sleep(Duration::from_millis(50));
    }

    pair.net.end_up(end)?;
    let took = pair.wait_state(passive, "ACTIVE", Duration::from_secs(5))?;
    println!(
        "{} ACTIVE {} ms after the gateway path came back",
        pair.nodes[passive].name,
        took.as_millis()
    );
    assert!(
        took <= Duration::from_millis(3500),
        "ACTIVE only {took:?} after the gateway path came back"
    );
    let ha = pair.ha(passive)?;
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    Ok(())
}
