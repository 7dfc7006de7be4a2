//! What the HA tests ask of a pair of servers, whatever runs it (loopback
//! ports or network namespaces, shared or replicated storage): a fixture
//! says how to read a server's status ([`HaPair`]), and gets the waits for
//! states and roles on top. [`LocalPair`] is the loopback fixture.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{free_port, ha_state, quick_status, spawn_fmq, start_gateway, tail_file, Proc};

/// Index of the primary server in a pair.
pub const PRIMARY: usize = 0;
/// Index of the secondary server in a pair.
pub const SECONDARY: usize = 1;

/// `ha.position` of a status object as (epoch, sequence).
pub fn position(status: &Value) -> Option<(u64, u64)> {
    let p = &status["ha"]["position"];
    Some((p["epoch"].as_u64()?, p["sequence"].as_u64()?))
}

/// A primary and a secondary server under test.
pub trait HaPair {
    /// The status `data` of server `i`, if it answers (within a short
    /// timeout: a stopped or unreachable server must not stall a poll).
    fn status(&self, i: usize) -> Option<Value>;

    /// The name of server `i`, for messages.
    fn name(&self, i: usize) -> &str;

    /// The end of every process's console output, for failure messages.
    fn logs(&self) -> String;

    /// The process of server `i`, while the test runs it.
    fn process(&self, i: usize) -> Option<&Proc>;

    /// Fails, with the logs, if server `i` was started and has exited by
    /// itself (the waits below stop at once then). By default nothing is
    /// checked.
    fn alive(&self, _i: usize) -> Result<()> {
        Ok(())
    }

    /// Waits (30 s at most) until server `i` answers status; fails at once
    /// if its process exits.
    fn wait_answering(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process(i).and_then(Proc::exited) {
                bail!(
                    "{} exited during start-up with {status}:\n{}",
                    self.name(i),
                    self.logs()
                );
            }
            if self.status(i).is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer status within 30 s:\n{}",
                    self.name(i),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails, with the logs, if either server exited by itself (a server
    /// the test killed or stopped counts as alive).
    fn all_alive(&self) -> Result<()> {
        self.alive(PRIMARY)?;
        self.alive(SECONDARY)
    }

    /// `store_sequence` of serving server `i` (live, unlike `ha.position`,
    /// which is refreshed every 500 ms).
    fn store_sequence(&self, i: usize) -> Result<u64> {
        self.status(i)
            .and_then(|v| v["store_sequence"].as_u64())
            .ok_or_else(|| anyhow!("{} reports no store_sequence", self.name(i)))
    }

    /// `ha.state` of server `i`, if it answers.
    fn state(&self, i: usize) -> Option<String> {
        self.status(i).and_then(|v| ha_state(&v))
    }

    /// `ha` object of server `i`; an error if it does not answer.
    fn ha(&self, i: usize) -> Result<Value> {
        self.status(i)
            .map(|v| v["ha"].clone())
            .ok_or_else(|| anyhow!("{} does not answer status", self.name(i)))
    }

    /// Waits until exactly one server is ACTIVE and the other PASSIVE;
    /// returns (active, passive).
    fn wait_roles(&self, within: Duration) -> Result<(usize, usize)> {
        let deadline = Instant::now() + within;
        loop {
            self.alive(PRIMARY)?;
            self.alive(SECONDARY)?;
            let s = [self.state(PRIMARY), self.state(SECONDARY)];
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

    /// Waits until server `i`'s status satisfies `pred`; returns it.
    fn wait_status(
        &self,
        i: usize,
        what: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let start = Instant::now();
        loop {
            self.alive(i)?;
            let v = self.status(i);
            if let Some(v) = &v {
                if pred(v) {
                    return Ok(v.clone());
                }
            }
            if start.elapsed() > within {
                bail!(
                    "{}: not {what} within {within:?} (ha now {}):\n{}",
                    self.name(i),
                    v.map(|v| v["ha"].to_string()).unwrap_or_else(|| "-".into()),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
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
        self.wait_status(i, what, within, |v| pred(&v["ha"]))?;
        Ok(start.elapsed())
    }

    /// Waits until server `i` reports `state`; returns how long it took.
    fn wait_state(&self, i: usize, state: &str, within: Duration) -> Result<Duration> {
        self.wait_ha(i, state, within, |ha| ha["state"] == state)
    }

    /// Waits until both servers see the HA link up.
    fn wait_link_up(&self, within: Duration) -> Result<()> {
        for i in [PRIMARY, SECONDARY] {
            self.wait_ha(i, "link_up", within, |ha| ha["link_up"] == true)?;
        }
        Ok(())
    }

    /// Waits until both servers report the same repository position, at
    /// least at `min_sequence`, twice 600 ms apart (`ha.position` is
    /// refreshed every 500 ms); returns it.
    fn wait_same_position(&self, min_sequence: u64, within: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + within;
        let mut candidate: Option<(u64, u64)> = None;
        loop {
            self.alive(PRIMARY)?;
            self.alive(SECONDARY)?;
            let (a, b) = (self.status(PRIMARY), self.status(SECONDARY));
            let pa = a.as_ref().and_then(position);
            let pb = b.as_ref().and_then(position);
            match (pa, pb) {
                (Some(x), Some(y)) if x == y && x.1 >= min_sequence => {
                    if candidate == Some(x) {
                        return Ok(x);
                    }
                    candidate = Some(x);
                    std::thread::sleep(Duration::from_millis(600));
                    continue;
                }
                _ => candidate = None,
            }
            if Instant::now() > deadline {
                bail!(
                    "positions differ (or below sequence {min_sequence}) after {within:?}: primary {pa:?} secondary {pb:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One server of a [`LocalPair`].
#[derive(Debug)]
pub struct LocalNode {
    /// `HAPrimary` or `HASecondary`, as the shipped profiles.
    pub name: &'static str,
    /// `Primary` or `Secondary`, as the console lines say.
    pub title: &'static str,
    /// Its profile directory.
    pub dir: PathBuf,
    /// STOMP port.
    pub port: u16,
    /// Admin port.
    pub admin: u16,
    /// HA port.
    pub ha: u16,
    /// The process, while the test runs it.
    pub proc_: Option<Proc>,
    /// How many times it was started (run `k` logs to `NAME-k.out`).
    pub starts: u32,
}

impl LocalNode {
    /// The STOMP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A gateway and two servers on loopback with free ports, in a temporary
/// directory laid out like `profiles/FerroMQ_HA_*`: `HAPrimary/` and
/// `HASecondary/` (the profile directories) and `lock/`. The test writes
/// the profiles (see [`local_changes`](Self::local_changes)).
#[derive(Debug)]
pub struct LocalPair {
    /// The temporary directory; each run's console output is in it.
    pub root: tempfile::TempDir,
    /// The gateway's port.
    pub gw_port: u16,
    /// The gateway, while running.
    pub gateway: Option<Proc>,
    /// The primary and the secondary.
    pub nodes: [LocalNode; 2],
    /// How long a status request may take.
    pub status_wait: Duration,
}

impl LocalPair {
    /// The directories and ports; no lock file, no profiles yet.
    pub fn new(prefix: &str) -> LocalPair {
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir");
        let mk = |name: &'static str, title: &'static str| LocalNode {
            name,
            title,
            dir: root.path().join(name),
            port: free_port(),
            admin: free_port(),
            ha: free_port(),
            proc_: None,
            starts: 0,
        };
        let pair = LocalPair {
            gw_port: free_port(),
            gateway: None,
            nodes: [mk("HAPrimary", "Primary"), mk("HASecondary", "Secondary")],
            root,
            status_wait: Duration::from_millis(1000),
        };
        std::fs::create_dir_all(pair.root.path().join("lock")).expect("mkdir lock");
        for n in &pair.nodes {
            std::fs::create_dir_all(&n.dir).expect("mkdir profile");
        }
        pair
    }

    /// `lock/lock.dat`.
    pub fn lock_path(&self) -> PathBuf {
        self.root.path().join("lock/lock.dat")
    }

    /// Creates the lock file, empty, as the operator does.
    pub fn create_lock_file(&self) {
        std::fs::File::create(self.lock_path()).expect("create lock file");
    }

    /// The `(section, key, value)` changes that bind server `i`'s shipped
    /// profile to this pair: its ports, its peer's and the gateway's, the
    /// lock file as an absolute path (the shipped relative
    /// `../lock/lock.dat` resolves to a different text in each profile,
    /// and the handshake compares it as text), and no log files.
    pub fn local_changes(&self, i: usize) -> Vec<(&'static str, &'static str, String)> {
        let (me, peer) = (&self.nodes[i], &self.nodes[1 - i]);
        vec![
            ("network", "port", me.port.to_string()),
            ("network", "admin_port", me.admin.to_string()),
            ("ha", "port", me.ha.to_string()),
            ("ha", "backup_ha_port", peer.ha.to_string()),
            ("ha", "backup_server_port", peer.port.to_string()),
            ("ha", "backup_rmi_server_port", peer.admin.to_string()),
            ("ha", "gateway_server_port", self.gw_port.to_string()),
            (
                "ha",
                "lock_file",
                format!("{:?}", self.lock_path().display().to_string()),
            ),
            ("log", "file", "false".into()),
        ]
    }

    /// Server `i`'s fmq.toml.
    pub fn profile_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("fmq.toml")).expect("read profile")
    }

    /// Replaces server `i`'s fmq.toml.
    pub fn write_profile(&self, i: usize, text: &str) {
        std::fs::write(self.nodes[i].dir.join("fmq.toml"), text).expect("write profile");
    }

    /// `<profile>/run`: the parent of a replicated server's store
    /// directory.
    pub fn run_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("run")
    }

    /// A replicated server's store directory (the shipped relative
    /// `run/db`).
    pub fn db(&self, i: usize) -> PathBuf {
        self.run_dir(i).join("db")
    }

    /// Starts the gateway; fails unless it listens within `within`.
    pub fn start_gateway(&mut self, within: Duration) -> Result<()> {
        self.gateway = Some(start_gateway(self.root.path(), self.gw_port, within)?);
        Ok(())
    }

    /// Spawns server `i` without waiting.
    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        node.starts += 1;
        let tag = format!("{}-{}", node.name, node.starts);
        let dir = node.dir.display().to_string();
        node.proc_ = Some(spawn_fmq(&["-profile", &dir], self.root.path(), &tag)?);
        Ok(())
    }

    /// Spawns server `i` and waits until its admin port answers.
    pub fn start(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        self.wait_answering(i)
    }

    /// Spawns both servers at once (so they meet well within a replicated
    /// pair's `max_wait_timeout`), then waits for both admin ports.
    pub fn start_both(&mut self) -> Result<()> {
        self.spawn(PRIMARY)?;
        self.spawn(SECONDARY)?;
        self.wait_answering(PRIMARY)?;
        self.wait_answering(SECONDARY)
    }

    /// The gateway (15 s to listen), then both servers at once.
    pub fn start_all(&mut self) -> Result<()> {
        self.start_gateway(Duration::from_secs(15))?;
        self.start_both()
    }

    /// SIGKILL server `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].proc_.take() {
            p.signal(Signal::SIGKILL);
            drop(p);
        }
    }

    /// Sends `sig` to server `i`, if running.
    pub fn signal(&self, i: usize, sig: Signal) {
        if let Some(p) = &self.nodes[i].proc_ {
            p.signal(sig);
        }
    }

    /// A poll of server `i`'s `ha.state` for
    /// [`Samplers`](crate::samples::Samplers).
    pub fn poll(&self, i: usize) -> impl Fn() -> Option<String> + Send + 'static {
        let admin = self.nodes[i].admin;
        move || quick_status(admin, Duration::from_millis(300)).and_then(|s| ha_state(&s))
    }

    /// Console output of server `i`'s current (or last) run.
    pub fn output(&self, i: usize) -> String {
        self.output_of_run(i, self.nodes[i].starts)
    }

    /// Console output of run `k` (1-based) of server `i`.
    pub fn output_of_run(&self, i: usize, k: u32) -> String {
        let tag = format!("{}-{k}", self.nodes[i].name);
        let root = self.root.path();
        format!(
            "{}{}",
            std::fs::read_to_string(root.join(format!("{tag}.out"))).unwrap_or_default(),
            std::fs::read_to_string(root.join(format!("{tag}.err"))).unwrap_or_default()
        )
    }
}

impl HaPair for LocalPair {
    fn status(&self, i: usize) -> Option<Value> {
        quick_status(self.nodes[i].admin, self.status_wait)
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
        if let Some(g) = &self.gateway {
            s += &format!("===== gateway\n{}\n", g.tail(10));
        }
        s
    }
}

/// The check behind [`HaPair::alive`] for fixtures that keep a server's
/// [`Proc`] while it should run: fails, with the logs, if it has exited by
/// itself (a crash, not a test's kill).
pub fn running_or_stopped_by_test(pair: &impl HaPair, i: usize) -> Result<()> {
    if let Some(status) = pair.process(i).and_then(Proc::exited) {
        bail!(
            "{} exited by itself ({status}):\n{}",
            pair.name(i),
            pair.logs()
        );
    }
    Ok(())
}

/// The end of each run's console output of server `name` (run `k` in
/// `dir/NAME-k.out` and `.err`, `runs` of them; `current` is the last
/// one's process if the test still runs it), for failure messages.
pub fn runs_tail(dir: &Path, name: &str, runs: u32, current: Option<&Proc>) -> String {
    let mut s = String::new();
    for k in 1..=runs {
        let tag = format!("{name}-{k}");
        let now = match (current, k == runs) {
            (Some(p), true) => match p.exited() {
                None => format!(" (running, pid {})", p.pid()),
                Some(status) => format!(" (pid {} EXITED by itself: {status})", p.pid()),
            },
            _ => " (stopped by the test)".to_owned(),
        };
        let out = dir.join(format!("{tag}.out"));
        s += &format!(
            "===== {tag}{now}\n{}--- last lines ---\n{}\n{}\n",
            replication_story(&out, 60),
            tail_file(&out, 40),
            stderr_summary(&dir.join(format!("{tag}.err")))
        );
    }
    s
}

/// What a server's console says of its replication, the last `max` such
/// lines: each catch-up's plan and why it ended, epochs opened, state
/// recovered, warnings and errors. A run's tail often starts after the part
/// that explains a failure.
pub fn replication_story(path: &Path, max: usize) -> String {
    const MARKS: [&str; 9] = [
        "replicating from the active",
        "replicating to the passive",
        "Replication from the backup server failed",
        "replication to the passive server ended",
        "checkpoint",
        "new epoch opened",
        "recovered broker state",
        " WARN ",
        " ERROR ",
    ];
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let story: Vec<&str> = text
        .lines()
        .filter(|l| MARKS.iter().any(|m| l.contains(m)))
        .collect();
    if story.is_empty() {
        return String::new();
    }
    let skipped = story.len().saturating_sub(max);
    let mut s = format!(
        "--- replication, whole run{} ---\n",
        if skipped > 0 {
            format!(" (last {max} of {})", story.len())
        } else {
            String::new()
        }
    );
    for line in &story[skipped..] {
        s += line;
        s.push('\n');
    }
    s
}

/// The end of a server's stderr, with a panic's message first (its
/// backtrace may be long).
pub fn stderr_summary(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let panic: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .take(3)
        .collect();
    if panic.is_empty() {
        tail_file(path, 10)
    } else {
        format!("{}\n[...]\n{}", panic.join("\n"), tail_file(path, 5))
    }
}
