//! Replicated HA under a random schedule of faults (a "nemesis", as in
//! Jepsen): the replicated pair and its gateway run while producers send
//! receipted persistent messages and a consumer acknowledges what it gets,
//! and a seeded random schedule kills, stops and partitions the servers.
//!
//! Faults, one at a time, each undone before the next:
//!
//! - `kill -9` of the serving server, restarted after 0.2–2 s;
//! - `kill -9` of the other server, restarted after 0.2–2 s;
//! - SIGSTOP of either for 0.2–3 s, then SIGCONT;
//! - in network namespaces only (the second test, as root): the HA link
//!   cut for 0.5–4 s, and the serving server cut from its peer and the
//!   gateway for 1–4 s (the client links stay up, as in
//!   `t13_replicated_ha_netns`);
//! - on power-loss disks only (the third test, as root: `/dev/fuse`): a
//!   power cut of either server's disk (a torn cut of an `fmq-powerloss`
//!   mount, then `kill -9`), the disk back after 0.2–2 s holding only what
//!   the server had synced (and a random part of the rest), and the server
//!   restarted on it. This test keeps a 300-batch log, so a server back
//!   from a cut or a kill often gets a checkpoint, and power cuts meet
//!   checkpoint installs too (the test prints how many were installed).
//!
//! Each fault waits until the pair can take it within the guarantees of
//! `docs/ha-replicated.md`: a fault that ends the serving server's service
//! (kill, isolation) waits for ACTIVE/PASSIVE, that is an in-sync passive
//! (a second failure before the passive has caught up is a documented
//! limit, not a bug); the others wait until one server serves. A pair that
//! does not get there within 40 s fails the test.
//!
//! The workload: three producers, each sending one receipted persistent
//! message at a time to the serving server and moving to the other on any
//! error, and one consumer with client-individual ACKs, each with a
//! receipt, reconnecting the same way. At the end the pair must be
//! ACTIVE/PASSIVE; the queue is drained from the ACTIVE; then the ACTIVE is
//! killed and the PASSIVE, now serving alone, must hold nothing more. The
//! test fails on:
//!
//! - a lost message: receipted, and never delivered;
//! - a duplicate: delivered again after the RECEIPT of its ACK came (by
//!   the consumer, the drain, or the other server's store);
//! - split brain: a status sample of each server, taken every ~50 ms,
//!   both in a serving state (ACTIVE, ACTIVE_SYNC, STANDALONE) with
//!   overlapping request times;
//! - a pair that does not recover, including one left with a server in
//!   ACTIVE_SYNC while the other says PASSIVE for more than 5 s (the
//!   active no longer waits for a passive that would take over as if in
//!   sync);
//! - a message never sent, or a corrupt body.
//!
//! The seed is printed; `FMQ_NEMESIS_SEED=N` replays a schedule and
//! `FMQ_NEMESIS_FAULTS=N` sets its length (default 8). A failure prints the
//! seed, the schedule and what each fault met; with
//! `FMQ_NEMESIS_KEEP_LOGS=DIR` it also copies every process's whole console
//! output to `DIR` (nothing is kept otherwise). The three tests run one at
//! a time, and the namespace one also one at a time with
//! `t13_replicated_ha_netns` across processes (see
//! [`fmq_tests::netns::host_lock`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use fmq_tests::load::{
    drain_pipelined, duplicates, first_receipt_from, receipts_by_producer, sample, Consumer,
    ConsumerLog, Producers, Sent, Workload,
};
use fmq_tests::netns::{prerequisites, NsPair, LINKS, LINK_AB};
use fmq_tests::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use fmq_tests::power::PoweredPair;
use fmq_tests::replicated_profile;
use fmq_tests::samples::{
    as_serving, longest_double_active, overlapping_serving, points, serving, show, spans, Samplers,
    TimedSample,
};
use nix::sys::signal::Signal;

const QUEUE: &str = "/queue/t14.nemesis";
const PRODUCERS: usize = 3;
const DEFAULT_FAULTS: usize = 8;
/// `replication_log_batches` of the power-cut test.
const POWER_LOG_BATCHES: u64 = 300;
/// How long the pair has to get where the next fault may strike.
const SETTLE: Duration = Duration::from_secs(40);
/// Longest an ACTIVE_SYNC server may be sampled next to a PASSIVE peer
/// (the two states change together once the passive has caught up).
const STUCK: Duration = Duration::from_secs(5);

/// Patient receipts: a SIGSTOPped server holds them for up to 3 s, and an
/// ACTIVE whose passive is stopped holds them until it goes STANDALONE.
const LOAD: Workload = Workload {
    receipt_timeout: Duration::from_secs(10),
    send_pause: Duration::from_millis(10),
    ..Workload::new(QUEUE, 256)
};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The schedule

/// SplitMix64: a small seeded generator whose sequence never changes, so a
/// seed replays the same schedule on any build.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration from `lo_ms` to `hi_ms`.
    fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.next() % (hi_ms - lo_ms + 1))
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `kill -9` the serving server; start it again after `hold`.
    KillActive,
    /// `kill -9` the other server; start it again after `hold`.
    KillPassive,
    /// SIGSTOP the serving server; SIGCONT after `hold`.
    StopActive,
    /// SIGSTOP the other server; SIGCONT after `hold`.
    StopPassive,
    /// Cut the HA link; heal it after `hold`.
    CutHaLink,
    /// Cut the serving server from its peer and the gateway; heal after
    /// `hold`.
    IsolateActive,
    /// Cut the power of the serving server's disk and kill it; bring the
    /// disk back and restart it after `hold`.
    PowerCutActive,
    /// The same, to the other server.
    PowerCutPassive,
}

/// The kinds of the loopback test.
const LOOPBACK: &[Kind] = &[
    Kind::KillActive,
    Kind::KillPassive,
    Kind::StopActive,
    Kind::StopPassive,
];
/// The kinds of the test in network namespaces.
const NAMESPACES: &[Kind] = &[
    Kind::KillActive,
    Kind::KillPassive,
    Kind::StopActive,
    Kind::StopPassive,
    Kind::CutHaLink,
    Kind::IsolateActive,
];
/// The kinds of the test on power-loss disks.
const POWER: &[Kind] = &[
    Kind::KillActive,
    Kind::KillPassive,
    Kind::StopActive,
    Kind::StopPassive,
    Kind::PowerCutActive,
    Kind::PowerCutPassive,
];

impl Kind {
    /// Whether the fault ends the serving server's service, so it may only
    /// strike while the other one is an in-sync PASSIVE.
    fn needs_in_sync_passive(self) -> bool {
        matches!(
            self,
            Kind::KillActive | Kind::IsolateActive | Kind::PowerCutActive
        )
    }

    /// Whether it targets the serving server (else the other one, or the
    /// link between them).
    fn on_active(self) -> bool {
        matches!(
            self,
            Kind::KillActive | Kind::StopActive | Kind::IsolateActive | Kind::PowerCutActive
        )
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: Kind,
    /// How long it lasts.
    hold: Duration,
    /// The pause after it is undone.
    pause: Duration,
    /// The torn-page choices of a power cut (0 for other kinds).
    torn_seed: u64,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hold = self.hold.as_millis();
        match self.kind {
            Kind::KillActive => write!(f, "kill -9 the serving server, restart after {hold} ms"),
            Kind::KillPassive => write!(f, "kill -9 the other server, restart after {hold} ms"),
            Kind::StopActive => write!(f, "SIGSTOP the serving server for {hold} ms"),
            Kind::StopPassive => write!(f, "SIGSTOP the other server for {hold} ms"),
            Kind::CutHaLink => write!(f, "cut the HA link for {hold} ms"),
            Kind::IsolateActive => {
                write!(
                    f,
                    "cut the serving server from peer and gateway for {hold} ms"
                )
            }
            Kind::PowerCutActive => write!(
                f,
                "power cut of the serving server's disk (torn, seed {}), back after {hold} ms",
                self.torn_seed
            ),
            Kind::PowerCutPassive => write!(
                f,
                "power cut of the other server's disk (torn, seed {}), back after {hold} ms",
                self.torn_seed
            ),
        }?;
        write!(f, "; then {} ms pause", self.pause.as_millis())
    }
}

/// `faults` faults of `kinds` from `seed`.
fn schedule(seed: u64, faults: usize, kinds: &[Kind]) -> Vec<Fault> {
    let mut rng = Rng(seed);
    (0..faults)
        .map(|_| {
            let kind = kinds[(rng.next() % kinds.len() as u64) as usize];
            let hold = match kind {
                Kind::KillActive | Kind::KillPassive => rng.millis(200, 2000),
                Kind::StopActive | Kind::StopPassive => rng.millis(200, 3000),
                Kind::CutHaLink => rng.millis(500, 4000),
                Kind::IsolateActive => rng.millis(1000, 4000),
                Kind::PowerCutActive | Kind::PowerCutPassive => rng.millis(200, 2000),
            };
            let pause = rng.millis(200, 1500);
            // Drawn only for power cuts, so the other tests' seeds keep
            // their schedules.
            let torn_seed = match kind {
                Kind::PowerCutActive | Kind::PowerCutPassive => rng.next(),
                _ => 0,
            };
            Fault {
                kind,
                hold,
                pause,
                torn_seed,
            }
        })
        .collect()
}

/// The seed and schedule length of this run, from the environment or
/// fresh.
#[derive(Debug, Clone, Copy)]
struct Plan {
    seed: u64,
    faults: usize,
}

impl Plan {
    fn from_env() -> Result<Plan> {
        let seed = match std::env::var("FMQ_NEMESIS_SEED") {
            Ok(s) => {
                let s = s.trim();
                match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse(),
                }
                .map_err(|e| anyhow!("FMQ_NEMESIS_SEED={s:?}: {e}"))?
            }
            Err(_) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Rng(now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32).next()
            }
        };
        let faults = match std::env::var("FMQ_NEMESIS_FAULTS") {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|e| anyhow!("FMQ_NEMESIS_FAULTS={s:?}: {e}"))?,
            Err(_) => DEFAULT_FAULTS,
        };
        Ok(Plan { seed, faults })
    }

    /// The command that runs `test` again with this schedule.
    fn replay(&self, test: &str) -> String {
        format!(
            "FMQ_NEMESIS_SEED={} FMQ_NEMESIS_FAULTS={} cargo test --release -p fmq-tests --test t14_replicated_nemesis -- --exact {test} --nocapture",
            self.seed, self.faults
        )
    }
}

/// A fault as it happened.
#[derive(Debug)]
struct Applied {
    fault: Fault,
    /// The server it struck (the HA link: both).
    target: String,
    /// The states when it struck.
    before: States,
    /// When it struck and when it was undone, since the start of the load.
    at: Duration,
    undone: Duration,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}..{} ms: {} [{}; states before: primary {}, secondary {}]",
            self.at.as_millis(),
            self.undone.as_millis(),
            self.fault,
            self.target,
            self.before[PRIMARY].as_deref().unwrap_or("-"),
            self.before[SECONDARY].as_deref().unwrap_or("-")
        )
    }
}

// ---------------------------------------------------------------------------
// The two set-ups

/// What the nemesis does to a pair, on loopback or in namespaces.
trait Rig: HaPair {
    /// The STOMP address of server `i`.
    fn addr(&self, i: usize) -> SocketAddr;
    /// A poll of server `i`'s `ha.state` for the samplers.
    fn poll(&self, i: usize) -> Box<dyn Fn() -> Option<String> + Send>;
    /// Starts server `i` and waits until it answers.
    fn start(&mut self, i: usize) -> Result<()>;
    /// SIGKILL server `i` and reap it.
    fn kill9(&mut self, i: usize);
    /// Sends `sig` to server `i`.
    fn signal(&self, i: usize, sig: Signal);
    /// Cuts (or heals) the HA link.
    fn cut_ha_link(&self, cut: bool) -> Result<()>;
    /// Cuts (or heals) server `i` from its peer and the gateway.
    fn isolate(&self, i: usize, cut: bool) -> Result<()>;
    /// Cuts the power of server `i`'s disk (a torn cut from `seed`) and
    /// kills it; returns what its disk held.
    fn cut_power(&mut self, _i: usize, _seed: u64) -> Result<PathBuf> {
        bail!("this set-up has no power-loss disks")
    }
    /// Brings server `i`'s disk back holding `image`, and starts it.
    fn restore_power(&mut self, _i: usize, _image: &Path) -> Result<()> {
        bail!("this set-up has no power-loss disks")
    }
    /// The temporary directory with every process's console output.
    fn dir(&self) -> &Path;
}

/// The shipped replicated profiles on loopback with free ports and `ha`
/// keys changed, not started.
fn profiled_pair(ha: &[(&'static str, &str)]) -> LocalPair {
    let pair = LocalPair::new("fmq-nemesis-");
    pair.create_lock_file();
    for i in [PRIMARY, SECONDARY] {
        let mut changes = pair.local_changes(i);
        changes.extend(ha.iter().map(|(k, v)| ("ha", *k, v.to_string())));
        let text = replicated_profile(pair.nodes[i].name, &changes);
        pair.write_profile(i, &text);
    }
    pair
}

/// [`profiled_pair`] as shipped, started.
fn local_pair() -> Result<LocalPair> {
    let mut pair = profiled_pair(&[]);
    pair.start_all()?;
    Ok(pair)
}

impl Rig for LocalPair {
    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr()
    }

    fn poll(&self, i: usize) -> Box<dyn Fn() -> Option<String> + Send> {
        Box::new(LocalPair::poll(self, i))
    }

    fn start(&mut self, i: usize) -> Result<()> {
        LocalPair::start(self, i)
    }

    fn kill9(&mut self, i: usize) {
        LocalPair::kill9(self, i)
    }

    fn signal(&self, i: usize, sig: Signal) {
        LocalPair::signal(self, i, sig)
    }

    fn cut_ha_link(&self, _cut: bool) -> Result<()> {
        bail!("no network to partition on loopback")
    }

    fn isolate(&self, _i: usize, _cut: bool) -> Result<()> {
        bail!("no network to partition on loopback")
    }

    fn dir(&self) -> &Path {
        self.root.path()
    }
}

impl Rig for NsPair {
    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr()
    }

    fn poll(&self, i: usize) -> Box<dyn Fn() -> Option<String> + Send> {
        Box::new(NsPair::poll(self, i))
    }

    fn start(&mut self, i: usize) -> Result<()> {
        NsPair::start(self, i)
    }

    fn kill9(&mut self, i: usize) {
        NsPair::kill9(self, i)
    }

    fn signal(&self, i: usize, sig: Signal) {
        NsPair::signal(self, i, sig)
    }

    fn cut_ha_link(&self, cut: bool) -> Result<()> {
        if cut {
            self.net.link_down(LINK_AB)
        } else {
            self.net.link_up(LINK_AB)
        }
    }

    fn isolate(&self, i: usize, cut: bool) -> Result<()> {
        let ns = self.nodes[i].ns;
        if cut {
            self.net.isolate(ns).map(drop)
        } else {
            for e in LINKS.iter().flatten().filter(|e| e.ns == ns) {
                self.net.end_up(*e)?;
            }
            Ok(())
        }
    }

    fn dir(&self) -> &Path {
        self.root.path()
    }
}

impl Rig for PoweredPair {
    fn addr(&self, i: usize) -> SocketAddr {
        self.pair.nodes[i].addr()
    }

    fn poll(&self, i: usize) -> Box<dyn Fn() -> Option<String> + Send> {
        Box::new(self.pair.poll(i))
    }

    fn start(&mut self, i: usize) -> Result<()> {
        self.pair.start(i)
    }

    fn kill9(&mut self, i: usize) {
        self.pair.kill9(i)
    }

    fn signal(&self, i: usize, sig: Signal) {
        self.pair.signal(i, sig)
    }

    fn cut_ha_link(&self, _cut: bool) -> Result<()> {
        bail!("no network to partition on loopback")
    }

    fn isolate(&self, _i: usize, _cut: bool) -> Result<()> {
        bail!("no network to partition on loopback")
    }

    fn cut_power(&mut self, i: usize, seed: u64) -> Result<PathBuf> {
        let image = PoweredPair::cut_power(self, i, seed)?;
        self.pair.kill9(i);
        Ok(image)
    }

    fn restore_power(&mut self, i: usize, image: &Path) -> Result<()> {
        self.restore(i, image)?;
        self.pair.start(i)
    }

    fn dir(&self) -> &Path {
        self.pair.root.path()
    }
}

// ---------------------------------------------------------------------------
// Running a schedule

/// The serving server and the other one, when exactly one serves and the
/// other answers without serving.
fn one_serving(s: &States) -> Option<(usize, usize)> {
    match (s[0].as_deref(), s[1].as_deref()) {
        (Some(a), Some(b)) if serving(a) && !serving(b) => Some((PRIMARY, SECONDARY)),
        (Some(a), Some(b)) if serving(b) && !serving(a) => Some((SECONDARY, PRIMARY)),
        _ => None,
    }
}

/// Both servers' `ha.state` (`None`: no answer).
type States = [Option<String>; 2];

/// Waits until `kind` may strike; returns (serving, other) and the states.
fn wait_for_turn(rig: &impl Rig, kind: Kind) -> Result<((usize, usize), States)> {
    let deadline = Instant::now() + SETTLE;
    loop {
        rig.all_alive()?;
        let s = [rig.state(PRIMARY), rig.state(SECONDARY)];
        let roles = if kind.needs_in_sync_passive() {
            match (s[0].as_deref(), s[1].as_deref()) {
                (Some("ACTIVE"), Some("PASSIVE")) => Some((PRIMARY, SECONDARY)),
                (Some("PASSIVE"), Some("ACTIVE")) => Some((SECONDARY, PRIMARY)),
                _ => None,
            }
        } else {
            one_serving(&s)
        };
        if let Some(r) = roles {
            return Ok((r, s));
        }
        if Instant::now() > deadline {
            let ha = |i| {
                rig.ha(i)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|e| e.to_string())
            };
            bail!(
                "the pair did not get ready for \"{kind:?}\" within {SETTLE:?} (primary {:?}, secondary {:?})\nprimary ha: {}\nsecondary ha: {}\n{}",
                s[0],
                s[1],
                ha(PRIMARY),
                ha(SECONDARY),
                rig.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Applies one fault and undoes it.
async fn strike(rig: &mut impl Rig, fault: Fault, t0: Instant) -> Result<Applied> {
    let ((active, passive), before) =
        tokio::task::block_in_place(|| wait_for_turn(rig, fault.kind))?;
    let i = if fault.kind.on_active() {
        active
    } else {
        passive
    };
    let target = match fault.kind {
        Kind::CutHaLink => "HA link".to_owned(),
        _ => rig.name(i).to_owned(),
    };
    let at = t0.elapsed();
    match fault.kind {
        Kind::KillActive | Kind::KillPassive => {
            rig.kill9(i);
            tokio::time::sleep(fault.hold).await;
            tokio::task::block_in_place(|| rig.start(i))?;
        }
        Kind::StopActive | Kind::StopPassive => {
            rig.signal(i, Signal::SIGSTOP);
            tokio::time::sleep(fault.hold).await;
            rig.signal(i, Signal::SIGCONT);
        }
        Kind::CutHaLink => {
            rig.cut_ha_link(true)?;
            tokio::time::sleep(fault.hold).await;
            rig.cut_ha_link(false)?;
        }
        Kind::IsolateActive => {
            rig.isolate(i, true)?;
            tokio::time::sleep(fault.hold).await;
            rig.isolate(i, false)?;
        }
        Kind::PowerCutActive | Kind::PowerCutPassive => {
            let image = rig.cut_power(i, fault.torn_seed)?;
            tokio::time::sleep(fault.hold).await;
            tokio::task::block_in_place(|| rig.restore_power(i, &image))?;
        }
    }
    let undone = t0.elapsed();
    tokio::time::sleep(fault.pause).await;
    Ok(Applied {
        fault,
        target,
        before,
        at,
        undone,
    })
}

/// What a run found.
#[derive(Debug, Default)]
struct Outcome {
    receipted: usize,
    in_doubt: usize,
    deliveries: usize,
    acked: usize,
    redelivered: usize,
    drained: usize,
    connects: u64,
    consumer_errors: Vec<String>,
    /// Receipted, never delivered.
    lost: Vec<String>,
    /// Delivered after the RECEIPT of their ACK: id and where.
    duplicates: Vec<String>,
    /// Pairs of overlapping serving samples.
    split_brain: Vec<(TimedSample, TimedSample)>,
    /// Spans (start, length) longer than [`STUCK`] with one server
    /// ACTIVE_SYNC and the other PASSIVE.
    stuck_sync: Vec<(Duration, Duration)>,
    /// Delivered, never sent.
    strangers: Vec<String>,
    corrupt: Vec<String>,
    /// Left on the other server's store after the drain.
    replica_left: Vec<String>,
    longest_double_serving: Duration,
    samples: [Vec<TimedSample>; 2],
}

impl Outcome {
    fn violations(&self) -> usize {
        self.lost.len()
            + self.duplicates.len()
            + self.split_brain.len()
            + self.stuck_sync.len()
            + self.strangers.len()
            + self.corrupt.len()
            + self.replica_left.len()
    }

    fn summary(&self, faults: usize, took: Duration) -> String {
        format!(
            "{faults} faults in {} s; receipted {} (+{} in doubt), {} deliveries ({} acked, {} redelivered before their ACK's receipt), drained {}, consumer connects {} (errors {}); LOST {}, DUPLICATES {}, SPLIT-BRAIN {} (longest double-serving by latest samples {} ms), stuck in ACTIVE_SYNC next to a PASSIVE {}, strangers {}, corrupt {}, left on the other store {}",
            took.as_secs(),
            self.receipted,
            self.in_doubt,
            self.deliveries,
            self.acked,
            self.redelivered,
            self.drained,
            self.connects,
            self.consumer_errors.len(),
            self.lost.len(),
            self.duplicates.len(),
            self.split_brain.len(),
            self.longest_double_serving.as_millis(),
            self.stuck_sync.len(),
            self.strangers.len(),
            self.corrupt.len(),
            self.replica_left.len()
        )
    }
}

/// Runs the schedule against a started pair; fills `applied` as it goes.
async fn run(rig: &mut impl Rig, faults: &[Fault], applied: &mut Vec<Applied>) -> Result<Outcome> {
    let (first, _) = tokio::task::block_in_place(|| rig.wait_roles(SETTLE))?;
    let addrs = [rig.addr(PRIMARY), rig.addr(SECONDARY)];
    let t0 = Instant::now();
    let samplers = Samplers::start([rig.poll(PRIMARY), rig.poll(SECONDARY)], t0);
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let producers = Producers::start(PRODUCERS, LOAD, addrs, first, &stop, &live);
    let consumer = Consumer::start(LOAD, addrs, first, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;

    for (n, fault) in faults.iter().enumerate() {
        let a = strike(rig, *fault, t0).await?;
        println!("fault {}/{}: {a}", n + 1, faults.len());
        applied.push(a);
    }

    // Everything is healed: the pair must settle, and serve again.
    let settled = t0.elapsed();
    let (active, passive) = tokio::task::block_in_place(|| rig.wait_roles(SETTLE))?;
    let since = Instant::now();
    let deadline = since + SETTLE;
    while first_receipt_from(&live, PRODUCERS, active, since).is_none() {
        if Instant::now() > deadline {
            bail!(
                "the producers got no receipts from {} within {SETTLE:?} after the faults (at {} ms):\n{}{}",
                rig.name(active),
                settled.as_millis(),
                receipts_by_producer(
                    &live,
                    PRODUCERS,
                    [rig.name(PRIMARY), rig.name(SECONDARY)],
                    t0
                ),
                rig.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "healed at {} ms: {} ACTIVE, {} PASSIVE and serving every producer after {} ms",
        settled.as_millis(),
        rig.name(active),
        rig.name(passive),
        (t0.elapsed() - settled).as_millis()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reports = producers.finish().await?;
    let log = consumer.finish().await?;
    let [a, b]: [Vec<TimedSample>; 2] = samplers
        .finish_timed()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    let sent = Sent::from_reports(&reports);

    // Drain from the ACTIVE; then the PASSIVE, serving alone, must agree.
    let seq = rig.store_sequence(active)?;
    tokio::task::block_in_place(|| rig.wait_same_position(seq, SETTLE))?;
    let drained = drain_pipelined(rig.addr(active), QUEUE, LOAD.body_len).await?;
    let seq = rig.store_sequence(active)?;
    tokio::task::block_in_place(|| rig.wait_same_position(seq, SETTLE))?;
    rig.kill9(active);
    tokio::task::block_in_place(|| rig.wait_state(passive, "STANDALONE", Duration::from_secs(20)))?;
    let replica_left = drain_pipelined(rig.addr(passive), QUEUE, LOAD.body_len).await?;

    Ok(judge(&sent, &log, &drained, replica_left, [a, b], t0))
}

/// Compares what was sent, delivered and acknowledged.
fn judge(
    sent: &Sent,
    log: &ConsumerLog,
    drained: &[String],
    replica_left: Vec<String>,
    samples: [Vec<TimedSample>; 2],
    t0: Instant,
) -> Outcome {
    let delivered: BTreeSet<&String> = log
        .deliveries
        .iter()
        .map(|d| &d.0)
        .chain(drained)
        .chain(&replica_left)
        .collect();
    let lost = sent
        .receipted
        .keys()
        .filter(|id| !delivered.contains(id))
        .cloned()
        .collect();
    let at = |t: Instant| t.saturating_duration_since(t0).as_millis();
    let mut deliveries: BTreeMap<&String, Vec<(Instant, usize)>> = BTreeMap::new();
    for (id, when, server) in &log.deliveries {
        deliveries.entry(id).or_default().push((*when, *server));
    }
    let drained_set: BTreeSet<&String> = drained.iter().collect();
    let mut dups = Vec::new();
    for (id, acked) in &log.ack_receipted {
        for (when, server) in deliveries.get(id).into_iter().flatten() {
            if when > acked {
                dups.push(format!(
                    "{id} (ACK receipted at {} ms, delivered again at {} ms by server {server})",
                    at(*acked),
                    at(*when)
                ));
            }
        }
        if drained_set.contains(id) {
            dups.push(format!(
                "{id} (ACK receipted at {} ms, in the final drain)",
                at(*acked)
            ));
        }
    }
    dups.extend(
        duplicates(drained)
            .into_iter()
            .map(|d| format!("{d} in the final drain")),
    );
    let strangers = delivered
        .iter()
        .filter(|id| !sent.receipted.contains_key(**id) && !sent.unreceipted.contains(**id))
        .map(|id| (*id).clone())
        .collect();
    let all: Vec<String> = log.deliveries.iter().map(|d| d.0.clone()).collect();
    let [a, b] = samples;
    let (pa, pb) = (points(&a), points(&b));
    let stuck = |x: Option<&str>, y: Option<&str>| x == Some("ACTIVE_SYNC") && y == Some("PASSIVE");
    let stuck_sync = spans(&pa, &pb, |x, y| stuck(x, y) || stuck(y, x))
        .into_iter()
        .filter(|(_, length)| *length > STUCK)
        .collect();
    Outcome {
        receipted: sent.receipted.len(),
        in_doubt: sent.unreceipted.len(),
        deliveries: log.deliveries.len(),
        acked: log.ack_receipted.len(),
        redelivered: duplicates(&all).len(),
        drained: drained.len(),
        connects: log.connects,
        consumer_errors: log.errors.clone(),
        lost,
        duplicates: dups,
        split_brain: overlapping_serving(&a, &b),
        stuck_sync,
        strangers,
        corrupt: log.corrupt.clone(),
        replica_left,
        longest_double_serving: longest_double_active(&as_serving(&pa), &as_serving(&pb)),
        samples: [a, b],
    }
}

/// Runs the whole test against `rig`; prints the summary; fails, with the
/// seed and the schedule, on any violation.
async fn nemesis(rig: &mut impl Rig, plan: Plan, test: &str, kinds: &[Kind]) -> Result<()> {
    let faults = schedule(plan.seed, plan.faults, kinds);
    println!(
        "nemesis seed {} with {} faults (replay: {})",
        plan.seed,
        plan.faults,
        plan.replay(test)
    );
    for (n, f) in faults.iter().enumerate() {
        println!("  {}. {f}", n + 1);
    }
    let started = Instant::now();
    let mut applied = Vec::new();
    let schedule_text = |applied: &[Applied]| {
        let mut s = format!("seed {} ({})\nschedule:\n", plan.seed, plan.replay(test));
        for (n, f) in faults.iter().enumerate() {
            s += &format!("  {}. {f}\n", n + 1);
        }
        s += "as applied (times since the load started):\n";
        for a in applied {
            s += &format!("  {a}\n");
        }
        s
    };
    let outcome = match run(rig, &faults, &mut applied).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("NEMESIS FAILED: {}", schedule_text(&applied));
            keep_logs(rig.dir(), test, plan.seed);
            return Err(e.context(format!("nemesis seed {}", plan.seed)));
        }
    };
    let took = started.elapsed();
    println!("NEMESIS {test}: {}", outcome.summary(applied.len(), took));
    for e in outcome.consumer_errors.iter().take(5) {
        println!("  the consumer got (and reconnected): {e}");
    }
    if outcome.violations() > 0 {
        keep_logs(rig.dir(), test, plan.seed);
        let [a, b] = &outcome.samples;
        let pairs: Vec<String> = outcome
            .split_brain
            .iter()
            .take(10)
            .map(|(x, y)| {
                format!(
                    "primary {:?} during {}..{} ms and secondary {:?} during {}..{} ms",
                    x.state,
                    x.from.as_millis(),
                    x.to.as_millis(),
                    y.state,
                    y.from.as_millis(),
                    y.to.as_millis()
                )
            })
            .collect();
        panic!(
            "NEMESIS VIOLATIONS ({})\n{}\nlost (e.g.): {:?}\nduplicates (e.g.): {:?}\nsplit brain (e.g.): {pairs:#?}\nstuck ACTIVE_SYNC next to a PASSIVE (start, length): {:?}\nnever sent: {:?}\ncorrupt: {:?}\nleft on the other store: {:?}\nstates: primary{}\n        secondary{}\n{}",
            outcome.summary(applied.len(), took),
            schedule_text(&applied),
            sample(&outcome.lost),
            sample(&outcome.duplicates),
            outcome.stuck_sync,
            sample(&outcome.strangers),
            sample(&outcome.corrupt),
            sample(&outcome.replica_left),
            show(&points(a)),
            show(&points(b)),
            rig.logs()
        );
    }
    Ok(())
}

/// With `FMQ_NEMESIS_KEEP_LOGS=DIR`: copies the console output files of
/// `from` to `DIR/TEST-SEED/`.
fn keep_logs(from: &Path, test: &str, seed: u64) {
    let Some(dir) = std::env::var_os("FMQ_NEMESIS_KEEP_LOGS") else {
        return;
    };
    let to = Path::new(&dir).join(format!("{test}-{seed}"));
    let copied = std::fs::create_dir_all(&to).and_then(|()| {
        for e in std::fs::read_dir(from)?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "out" || x == "err") {
                std::fs::copy(&p, to.join(e.file_name()))?;
            }
        }
        Ok(())
    });
    match copied {
        Ok(()) => eprintln!("console output kept in {}", to.display()),
        Err(e) => eprintln!("could not keep the console output in {}: {e}", to.display()),
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_kills_and_stops_on_loopback() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let plan = Plan::from_env()?;
    println!(
        "partition faults are not part of this test (loopback has no links to cut): \
         random_faults_with_partitions_in_namespaces runs them, as root"
    );
    let mut pair = tokio::task::block_in_place(local_pair)?;
    nemesis(
        &mut pair,
        plan,
        "random_kills_and_stops_on_loopback",
        LOOPBACK,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_faults_with_partitions_in_namespaces() -> Result<()> {
    const TEST: &str = "random_faults_with_partitions_in_namespaces";
    let Some(_exclusive) = prerequisites(&SERIAL, TEST).await? else {
        println!("partition faults skipped: {TEST} needs root and `ip netns`");
        return Ok(());
    };
    let plan = Plan::from_env()?;
    let mut pair = NsPair::new("t14")?;
    tokio::task::block_in_place(|| pair.start_all())?;
    nemesis(&mut pair, plan, TEST, NAMESPACES).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_kills_stops_and_power_cuts_on_loopback() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let plan = Plan::from_env()?;
    // A short batch log: a server back from a cut or a kill is often
    // further behind than it reaches, so it gets a checkpoint, and the
    // checkpoint install meets power cuts too.
    let log = POWER_LOG_BATCHES.to_string();
    let mut pair = tokio::task::block_in_place(|| -> Result<PoweredPair> {
        let ha = [("replication_log_batches", log.as_str())];
        let mut powered = PoweredPair::new(profiled_pair(&ha))?;
        powered.pair.start_all()?;
        Ok(powered)
    })?;
    nemesis(
        &mut pair,
        plan,
        "random_kills_stops_and_power_cuts_on_loopback",
        POWER,
    )
    .await?;
    let installed: usize = [PRIMARY, SECONDARY]
        .iter()
        .flat_map(|&i| (1..=pair.pair.nodes[i].starts).map(move |k| (i, k)))
        .map(|(i, k)| {
            pair.pair
                .output_of_run(i, k)
                .matches("checkpoint from the active server installed")
                .count()
        })
        .sum();
    println!("checkpoints installed during the run: {installed}");
    Ok(())
}

/// The kinds of `schedule(7, 6, LOOPBACK)`, as this test's generator has
/// always drawn them.
const KINDS_OF_SEED_7: [Kind; 6] = [
    Kind::StopPassive,
    Kind::StopPassive,
    Kind::StopActive,
    Kind::KillPassive,
    Kind::StopActive,
    Kind::KillActive,
];

#[test]
fn a_seed_always_gives_the_same_schedule() {
    let a = schedule(42, 20, NAMESPACES);
    let b = schedule(42, 20, NAMESPACES);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert!(schedule(42, 20, LOOPBACK)
        .iter()
        .all(|f| LOOPBACK.contains(&f.kind) && f.torn_seed == 0));
    assert_ne!(
        format!("{a:?}"),
        format!("{:?}", schedule(43, 20, NAMESPACES))
    );
    let power = schedule(42, 40, POWER);
    assert!(power.iter().any(
        |f| matches!(f.kind, Kind::PowerCutActive | Kind::PowerCutPassive) && f.torn_seed != 0
    ));
    // The loopback schedule of a seed is the one it was before power cuts
    // existed (they draw their own numbers only when they occur).
    let kinds: Vec<Kind> = schedule(7, 6, LOOPBACK).iter().map(|f| f.kind).collect();
    assert_eq!(kinds, KINDS_OF_SEED_7);
}
