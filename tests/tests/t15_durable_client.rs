//! The durable client (`fmq_client::durable`) against a real HA pair, in
//! both modes: the shared-store pair (`profiles/FerroMQ_HA_shared`) and the
//! replicated pair (`profiles/FerroMQ_HA_rpl`), real `fmq` processes and a
//! gateway on loopback with free ports, servers killed with SIGKILL.
//!
//! - kill -9 of the ACTIVE under load, three times (the killed server is
//!   restarted and the pair is ACTIVE/PASSIVE again before the next kill):
//!   a durable producer sending persistent messages, a transacted relay
//!   (receive, send a copy to a second queue, commit) and a durable
//!   consumer of the second queue with client-individual acknowledgements
//!   run through it all without handling an error (the relay only takes a
//!   rolled-back transaction as "redo it", as in JMS); every message sent
//!   is delivered to the consumer exactly once;
//! - both servers down for a while: the producer's sends return `Buffered`
//!   and wait in its buffer; once the servers are back the consumer gets
//!   exactly those messages, in order, once;
//! - the `producer` example killed (SIGKILL) with sends in its buffer
//!   directory while both servers are down: once they are up, a second run
//!   with the same buffer directory and client-id delivers them, before its
//!   own sends, each once and in order.
//!
//! The tests of this file run one at a time (a file-wide mutex): each runs
//! a pair with 100-200 ms heartbeats, and running them side by side on a small
//! machine would measure CPU contention rather than failover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use fmq_client::durable::{
    Backoff, Connection, ConnectionBuilder, Event, Events, SendOptions, SendOutcome, SessionMode,
};
use fmq_tests::load::body_for;
use fmq_tests::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use fmq_tests::{fmq_bin, replicated_profile, set_toml_key, shipped_profile, Proc};
use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const LOGIN: &str = "admin";
const PASSCODE: &str = "passwd";
const BODY_LEN: usize = 256;
/// How many times the ACTIVE is killed under load.
const KILLS: usize = 3;
/// How long a waiting replicated server waits for its peer (shipped).
const MAX_WAIT_MS: u64 = 3000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test at a time in this file (see the module comment).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// The two HA modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Replicated,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Replicated => "replicated",
        }
    }
}

/// Runs blocking fixture code (the pair's waits poll with sleeps) without
/// stalling the runtime's other tasks.
fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A gateway, two servers and a lock file in a temporary directory laid out
/// like the shipped profiles of `mode`, with free ports and an absolute
/// lock file. Nothing runs yet.
fn new_pair(mode: Mode) -> LocalPair {
    let mut pair = LocalPair::new(&format!("fmq-t15-{}-", mode.name()));
    pair.status_wait = Duration::from_millis(300);
    pair.create_lock_file();
    match mode {
        Mode::Shared => {
            std::fs::create_dir_all(pair.root.path().join("run/db")).expect("mkdir db");
            for i in [PRIMARY, SECONDARY] {
                let mut t = shipped_profile(&format!("FerroMQ_HA_shared/{}", pair.nodes[i].name));
                for (section, key, value) in pair.local_changes(i) {
                    t = set_toml_key(&t, section, key, &value);
                }
                pair.write_profile(i, &t);
            }
        }
        Mode::Replicated => {
            for i in [PRIMARY, SECONDARY] {
                let mut changes = pair.local_changes(i);
                changes.push(("ha", "max_wait_timeout", MAX_WAIT_MS.to_string()));
                pair.write_profile(i, &replicated_profile(pair.nodes[i].name, &changes));
            }
        }
    }
    pair
}

/// Starts both servers (the gateway runs already): the shared primary
/// first, so it takes the lock; the replicated pair together, so they meet
/// within `max_wait_timeout`.
fn start_servers(pair: &mut LocalPair, mode: Mode) -> Result<()> {
    match mode {
        Mode::Shared => {
            pair.start(PRIMARY)?;
            pair.start(SECONDARY)
        }
        Mode::Replicated => pair.start_both(),
    }
}

/// Starts the gateway and both servers and waits for ACTIVE/PASSIVE;
/// returns the ACTIVE.
fn start_pair(pair: &mut LocalPair, mode: Mode) -> Result<usize> {
    pair.start_gateway(Duration::from_secs(10))?;
    start_servers(pair, mode)?;
    Ok(pair.wait_roles(Duration::from_secs(30))?.0)
}

/// The states in which a server takes clients.
fn serving(state: &serde_json::Value) -> bool {
    state == "ACTIVE" || state == "STANDALONE"
}

/// The servers of the pair, primary first, as the client lists them.
fn servers(pair: &LocalPair) -> Vec<String> {
    pair.nodes.iter().map(|n| n.addr().to_string()).collect()
}

/// A durable connection builder for the pair, with a buffer directory and
/// a quick back-off (a failover on loopback takes about a second).
fn client(pair: &LocalPair, client_id: &str, buffer_dir: &Path) -> ConnectionBuilder {
    Connection::builder(servers(pair))
        .credentials(LOGIN, PASSCODE)
        .client_id(client_id)
        .buffer_dir(buffer_dir)
        .backoff(Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            ..Backoff::default()
        })
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(15))
        .initial_timeout(Duration::from_secs(15))
}

/// The body of the message with application id `id`.
fn body(id: &str) -> Vec<u8> {
    body_for(id, BODY_LEN)
}

/// Polls `done` every 20 ms until it holds; fails after `within` with
/// `what` and the output of `context`.
async fn wait_until(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) -> Result<Duration> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// Records a connection's events, with the time since the test started.
struct Recorder {
    name: &'static str,
    log: Arc<Mutex<Vec<(Duration, Event)>>>,
    task: JoinHandle<()>,
}

impl Recorder {
    fn start(name: &'static str, mut events: Events, t0: Instant) -> Recorder {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let task = tokio::spawn(async move {
            while let Some(e) = events.next().await {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((t0.elapsed(), e));
            }
        });
        Recorder { name, log, task }
    }

    fn events(&self) -> Vec<(Duration, Event)> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `after` of every [`Event::FailedOver`].
    fn failovers(&self) -> Vec<Duration> {
        self.events()
            .into_iter()
            .filter_map(|(_, e)| match e {
                Event::FailedOver { after, .. } => Some(after),
                _ => None,
            })
            .collect()
    }

    /// Sends replayed from the buffer, over every [`Event::Replayed`].
    fn replayed(&self) -> usize {
        self.events()
            .into_iter()
            .map(|(_, e)| match e {
                Event::Replayed { count, .. } => count,
                _ => 0,
            })
            .sum()
    }

    /// How many events `pred` accepts.
    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events().iter().filter(|(_, e)| pred(e)).count()
    }

    /// The events, one a line; the frequent ones of a failover (servers
    /// skipped or failing, back-off rounds, dropped duplicates) counted
    /// rather than listed.
    fn show(&self) -> String {
        let mut out = format!("--- events of the {} connection\n", self.name);
        let (mut skipped, mut failed, mut waiting, mut dups) = (0, 0, 0, 0);
        for (at, e) in self.events() {
            match e {
                Event::Skipped { .. } => skipped += 1,
                Event::ConnectFailed { .. } => failed += 1,
                Event::Waiting { .. } => waiting += 1,
                Event::DuplicateDropped { .. } => dups += 1,
                e => out += &format!("[{:>7.3} s] {e}\n", at.as_secs_f64()),
            }
        }
        out += &format!(
            "({skipped} standby servers skipped, {failed} connection attempts failed, \
             {waiting} back-off rounds, {dups} redelivered duplicates dropped)\n"
        );
        out
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Milliseconds of each duration, for printing.
fn millis(d: &[Duration]) -> Vec<u128> {
    d.iter().map(Duration::as_millis).collect()
}

/// `(pending, inflight)` of `/queue/NAME` on server `i`, if it answers and
/// has the queue.
fn queue_depth(pair: &LocalPair, i: usize, queue: &str) -> Option<(u64, u64)> {
    let v = pair.status(i)?;
    v["queues"]
        .as_array()?
        .iter()
        .find(|q| q["name"].as_str() == Some(queue))
        .map(|q| {
            (
                q["pending"].as_u64().unwrap_or(0),
                q["inflight"].as_u64().unwrap_or(0),
            )
        })
}

// ---------------------------------------------------------------------------
// 1. kill -9 of the ACTIVE under load, repeated

/// What the producer's sends returned.
#[derive(Debug, Default)]
struct Outcomes {
    receipted: usize,
    duplicate: usize,
    buffered: usize,
}

/// What the load's producer and consumer share with the test.
#[derive(Default)]
struct Progress {
    /// Sends made (each returned `Ok`).
    sent: AtomicUsize,
    /// Sends receipted by a server straight away.
    receipted: AtomicUsize,
    /// Each delivery to the application, in order: its `x-id`, then what
    /// tells copies apart (broker message id, relay sequence, redelivered
    /// flag, when), shown for the duplicates when there are some.
    received: Mutex<Vec<(String, String)>>,
    /// Each relay transaction reported rolled back: its `x-id`, when, why.
    rollbacks: Mutex<Vec<String>>,
    /// Messages whose body does not match their `x-id`.
    corrupt: Mutex<Vec<String>>,
    /// Transactions of the relay that committed.
    relayed: AtomicUsize,
    /// Transactions of the relay reported rolled back (then redone).
    rolled_back: AtomicUsize,
}

impl Progress {
    fn received(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Fails with what became of the application's `name` task if it ended
/// before the test stopped it (an error from the client, or a panic).
async fn ensure_running<T: std::fmt::Debug>(
    name: &str,
    task: &mut JoinHandle<fmq_client::Result<T>>,
) -> Result<()> {
    if task.is_finished() {
        match task.await {
            Ok(Ok(v)) => bail!("the {name} stopped by itself: {v:?}"),
            Ok(Err(e)) => bail!("the {name} got an error from the client: {e}"),
            Err(e) => bail!("the {name} panicked: {e}"),
        }
    }
    Ok(())
}

async fn kill_active_repeatedly_under_load(mode: Mode) -> Result<()> {
    let _serial = serial().await;
    let t0 = Instant::now();
    let queue = "/queue/t15.load";
    let relayed = "/queue/t15.relayed";
    let mut pair = new_pair(mode);
    let mut active = block(|| start_pair(&mut pair, mode))?;
    println!(
        "[{mode:?}] pair up in {:?}: ACTIVE {}",
        t0.elapsed(),
        pair.nodes[active].name
    );
    let buffers = tempfile::Builder::new().prefix("fmq-t15-buf-").tempdir()?;

    let pb = client(&pair, "t15-load-producer", &buffers.path().join("producer"));
    let producer_events = Recorder::start("producer", pb.events(), t0);
    let producer_conn = pb.connect().await.context("producer connection")?;
    let cb = client(&pair, "t15-load-consumer", &buffers.path().join("consumer"))
        .receive_timeout(Duration::from_secs(1));
    let consumer_events = Recorder::start("consumer", cb.events(), t0);
    let consumer_conn = cb.connect().await.context("consumer connection")?;
    let rb = client(&pair, "t15-load-relay", &buffers.path().join("relay"))
        .receive_timeout(Duration::from_secs(1));
    let relay_events = Recorder::start("relay", rb.events(), t0);
    let relay_conn = rb.connect().await.context("relay connection")?;

    let progress = Arc::new(Progress::default());
    let stop_producer = CancellationToken::new();
    let stop_consumer = CancellationToken::new();
    let stop_relay = CancellationToken::new();

    // The application: sends and receives, and handles no error at all.
    let mut producer_task: JoinHandle<fmq_client::Result<Outcomes>> = {
        let (conn, progress, stop) = (
            producer_conn.clone(),
            progress.clone(),
            stop_producer.clone(),
        );
        tokio::spawn(async move {
            let session = conn.session(SessionMode::Auto);
            let producer = session.producer("load", queue).await?;
            let mut outcomes = Outcomes::default();
            let mut i = 0usize;
            while !stop.is_cancelled() {
                let id = format!("m-{i}");
                let options = SendOptions::new().header("x-id", id.as_str());
                match producer.send_with(body(&id), options).await? {
                    SendOutcome::Receipted => {
                        outcomes.receipted += 1;
                        progress.receipted.fetch_add(1, Ordering::Relaxed);
                    }
                    SendOutcome::Duplicate => outcomes.duplicate += 1,
                    SendOutcome::Buffered => outcomes.buffered += 1,
                    other => panic!("a persistent send returned {other:?}"),
                }
                i += 1;
                progress.sent.store(i, Ordering::Relaxed);
                // A steady load: sends buffered while no server is
                // connected would otherwise outrun the replay.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(outcomes)
        })
    };
    // The classic transacted step between them: receive from the load
    // queue, send a copy on, commit both at once. A transaction caught by
    // a failover ends committed or rolled back, never in doubt; rolled
    // back, its message comes again and is relayed then.
    let mut relay_task: JoinHandle<fmq_client::Result<()>> = {
        let (conn, progress, stop) = (relay_conn.clone(), progress.clone(), stop_relay.clone());
        tokio::spawn(async move {
            let session = conn.session(SessionMode::Transacted);
            let mut consumer = session.consumer(queue).await?;
            let producer = session.producer("relay", relayed).await?;
            while !stop.is_cancelled() {
                let mut in_step = String::new();
                let step = async {
                    let Some(m) = consumer.receive().await? else {
                        return Ok(false);
                    };
                    let id = m.header("x-id").unwrap_or("(no x-id)").to_owned();
                    in_step.clone_from(&id);
                    let options = SendOptions::new().header("x-id", id.as_str());
                    producer.send_with(m.body().to_vec(), options).await?;
                    session.commit().await.map(|()| true)
                };
                match step.await {
                    Ok(true) => {
                        progress.relayed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    // Caught by a failover (at receive, send or commit):
                    // nothing of it was applied; start the next one.
                    Err(fmq_client::Error::TransactionRolledBack(why)) => {
                        progress.rolled_back.fetch_add(1, Ordering::Relaxed);
                        progress
                            .rollbacks
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!(
                                "{in_step} at {:.3} s: {why}",
                                t0.elapsed().as_secs_f64()
                            ));
                        session.rollback().await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            consumer.close().await
        })
    };
    let mut consumer_task: JoinHandle<fmq_client::Result<()>> = {
        let (conn, progress, stop) = (
            consumer_conn.clone(),
            progress.clone(),
            stop_consumer.clone(),
        );
        tokio::spawn(async move {
            let session = conn.session(SessionMode::ClientIndividual);
            let mut consumer = session.consumer(relayed).await?;
            while !stop.is_cancelled() {
                let Some(m) = consumer.receive().await? else {
                    continue;
                };
                let id = m.header("x-id").unwrap_or("(no x-id)").to_owned();
                if m.body()[..] != body(&id)[..] {
                    progress
                        .corrupt
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(id.clone());
                }
                progress
                    .received
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((
                        id,
                        format!(
                            "{} relay-sequence {:?} redelivered {} at {:.3} s",
                            m.message_id(),
                            m.sequence(),
                            m.redelivered(),
                            t0.elapsed().as_secs_f64()
                        ),
                    ));
                m.ack().await?;
            }
            consumer.close().await
        })
    };

    let context = |pair: &LocalPair| {
        format!(
            "{}{}{}{}",
            producer_events.show(),
            relay_events.show(),
            consumer_events.show(),
            pair.logs()
        )
    };
    let p = progress.clone();
    wait_until(
        "load flowing (200 messages receipted and received)",
        Duration::from_secs(20),
        || {
            p.receipted.load(Ordering::Relaxed) >= 200 && p.received() >= 200
                || producer_task.is_finished()
                || relay_task.is_finished()
                || consumer_task.is_finished()
        },
        || context(&pair),
    )
    .await?;
    ensure_running("producer", &mut producer_task).await?;
    ensure_running("relay", &mut relay_task).await?;
    ensure_running("consumer", &mut consumer_task).await?;

    for round in 1..=KILLS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (receipted0, received0) = (
            progress.receipted.load(Ordering::Relaxed),
            progress.received(),
        );
        let killed = active;
        let other = 1 - killed;
        pair.kill9(killed);
        let took_over = block(|| {
            pair.wait_ha(other, "serving", Duration::from_secs(30), |ha| {
                serving(&ha["state"])
            })
        })?;
        let p = progress.clone();
        let moved_on = wait_until(
            &format!(
                "kill {round}: the clients working on {}",
                pair.nodes[other].name
            ),
            Duration::from_secs(30),
            || {
                p.receipted.load(Ordering::Relaxed) >= receipted0 + 50
                    && p.received() >= received0 + 50
                    || producer_task.is_finished()
                    || relay_task.is_finished()
                    || consumer_task.is_finished()
            },
            || context(&pair),
        )
        .await?;
        ensure_running("producer", &mut producer_task).await?;
        ensure_running("relay", &mut relay_task).await?;
        ensure_running("consumer", &mut consumer_task).await?;
        println!(
            "[{mode:?}] kill {round}: {} killed; {} serving after {took_over:?}; clients \
             receipted and received 50 more messages {moved_on:?} after that",
            pair.nodes[killed].name, pair.nodes[other].name
        );
        block(|| pair.start(killed))?;
        let (now_active, _) = block(|| pair.wait_roles(Duration::from_secs(30)))?;
        active = now_active;
        println!(
            "[{mode:?}] kill {round}: {} restarted; ACTIVE {}, PASSIVE {}",
            pair.nodes[killed].name,
            pair.nodes[active].name,
            pair.nodes[1 - active].name
        );
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_producer.cancel();
    let outcomes = tokio::time::timeout(Duration::from_secs(30), producer_task)
        .await
        .map_err(|_| anyhow!("the producer did not stop within 30 s"))???;
    let sent = progress.sent.load(Ordering::Relaxed);
    producer_conn
        .flush(Duration::from_secs(30))
        .await
        .with_context(|| format!("flushing the producer's buffer\n{}", context(&pair)))?;
    let p = progress.clone();
    wait_until(
        &format!("the consumer receiving all {sent} messages"),
        Duration::from_secs(30),
        || p.received() >= sent || relay_task.is_finished() || consumer_task.is_finished(),
        || {
            format!(
                "received {} of {sent}\n{}",
                progress.received(),
                context(&pair)
            )
        },
    )
    .await?;
    ensure_running("relay", &mut relay_task).await?;
    ensure_running("consumer", &mut consumer_task).await?;
    // Late redeliveries would show now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_relay.cancel();
    tokio::time::timeout(Duration::from_secs(30), relay_task)
        .await
        .map_err(|_| anyhow!("the relay did not stop within 30 s"))???;
    stop_consumer.cancel();
    tokio::time::timeout(Duration::from_secs(30), consumer_task)
        .await
        .map_err(|_| anyhow!("the consumer did not stop within 30 s"))???;

    let deliveries = progress
        .received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let received: Vec<&String> = deliveries.iter().map(|(id, _)| id).collect();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &received {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let expected: Vec<String> = (0..sent).map(|i| format!("m-{i}")).collect();
    let lost: Vec<&String> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    let dups: Vec<(&str, usize)> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    let strangers: Vec<&str> = seen
        .keys()
        .filter(|id| {
            id.strip_prefix("m-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_none_or(|n| n >= sent)
        })
        .copied()
        .collect();
    let corrupt = progress
        .corrupt
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let out_of_order = received
        .windows(2)
        .filter(|w| {
            let n = |s: &str| s.strip_prefix("m-").and_then(|n| n.parse::<usize>().ok());
            n(w[1]) < n(w[0])
        })
        .count();

    print!(
        "{}{}{}",
        producer_events.show(),
        relay_events.show(),
        consumer_events.show()
    );
    println!(
        "[{mode:?}] failover times: producer {:?} ms, relay {:?} ms, consumer {:?} ms",
        millis(&producer_events.failovers()),
        millis(&relay_events.failovers()),
        millis(&consumer_events.failovers())
    );
    let (commits, rollbacks) = (
        progress.relayed.load(Ordering::Relaxed),
        progress.rolled_back.load(Ordering::Relaxed),
    );
    println!(
        "[{mode:?}] relay: {commits} transactions committed, {rollbacks} rolled back by a failover and redone"
    );
    for r in progress
        .rollbacks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        println!("[{mode:?}]   rolled back: {r}");
    }
    for (id, copy) in deliveries
        .iter()
        .filter(|(id, _)| seen.get(id.as_str()).is_some_and(|n| *n > 1))
    {
        println!("[{mode:?}]   duplicate {id}: {copy}");
    }
    println!(
        "[{mode:?}] {sent} sent ({} receipted, {} duplicate, {} buffered and replayed: {}), \
         {} delivered to the application: {} lost, {} duplicates, {} strangers, {} corrupt, \
         {out_of_order} out of order (redeliveries after a failover); in {:?}",
        outcomes.receipted,
        outcomes.duplicate,
        outcomes.buffered,
        producer_events.replayed(),
        received.len(),
        lost.len(),
        dups.len(),
        strangers.len(),
        corrupt.len(),
        t0.elapsed()
    );
    ensure!(
        lost.is_empty() && dups.is_empty() && strangers.is_empty() && corrupt.is_empty(),
        "[{mode:?}] lost {:?}, duplicates {:?}, strangers {:?}, corrupt {:?} (first 20 of each)\n{}",
        &lost[..lost.len().min(20)],
        &dups[..dups.len().min(20)],
        &strangers[..strangers.len().min(20)],
        &corrupt[..corrupt.len().min(20)],
        context(&pair)
    );
    ensure!(
        outcomes.receipted + outcomes.duplicate + outcomes.buffered == sent,
        "[{mode:?}] outcomes {outcomes:?} do not add up to {sent} sends"
    );
    for (name, r) in [
        ("producer", &producer_events),
        ("relay", &relay_events),
        ("consumer", &consumer_events),
    ] {
        let n = r.failovers().len();
        ensure!(
            n >= KILLS,
            "[{mode:?}] the {name} connection failed over {n} times for {KILLS} kills\n{}",
            r.show()
        );
    }
    // Every message was acknowledged on the server too, on both queues.
    for queue_name in [queue, relayed] {
        wait_until(
            &format!("{queue_name} empty on the ACTIVE (nothing pending or unacknowledged)"),
            Duration::from_secs(10),
            || queue_depth(&pair, active, queue_name) == Some((0, 0)),
            || {
                format!(
                    "depth {:?}\n{}",
                    queue_depth(&pair, active, queue_name),
                    pair.logs()
                )
            },
        )
        .await?;
    }
    println!(
        "[{mode:?}] resent SENDs the ACTIVE dropped as duplicates since it started: {}",
        pair.status(active)
            .map(|v| v["duplicates"].to_string())
            .unwrap_or_else(|| "-".into())
    );
    producer_conn.close().await?;
    relay_conn.close().await?;
    consumer_conn.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_kill9_active_repeatedly_under_load_delivers_each_message_once() -> Result<()> {
    kill_active_repeatedly_under_load(Mode::Shared).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_kill9_active_repeatedly_under_load_delivers_each_message_once() -> Result<()> {
    kill_active_repeatedly_under_load(Mode::Replicated).await
}

// ---------------------------------------------------------------------------
// 2. both servers down for a while, then back

async fn both_servers_down_then_back(mode: Mode) -> Result<()> {
    const N: usize = 50;
    let _serial = serial().await;
    let t0 = Instant::now();
    let queue = "/queue/t15.outage";
    let mut pair = new_pair(mode);
    block(|| start_pair(&mut pair, mode))?;
    let buffers = tempfile::Builder::new().prefix("fmq-t15-buf-").tempdir()?;

    let pb = client(
        &pair,
        "t15-outage-producer",
        &buffers.path().join("producer"),
    );
    let producer_events = Recorder::start("producer", pb.events(), t0);
    let producer_conn = pb.connect().await.context("producer connection")?;
    let cb = client(
        &pair,
        "t15-outage-consumer",
        &buffers.path().join("consumer"),
    );
    let consumer_events = Recorder::start("consumer", cb.events(), t0);
    let consumer_conn = cb.connect().await.context("consumer connection")?;
    let producer = producer_conn
        .session(SessionMode::Auto)
        .producer("outage", queue)
        .await?;
    let consumer_session = consumer_conn.session(SessionMode::ClientIndividual);
    let mut consumer = consumer_session.consumer(queue).await?;
    let context = |pair: &LocalPair| {
        format!(
            "{}{}{}",
            producer_events.show(),
            consumer_events.show(),
            pair.logs()
        )
    };

    // The path works before the outage.
    for i in 0..3 {
        let id = format!("warm-{i}");
        let outcome = producer
            .send_with(body(&id), SendOptions::new().header("x-id", id.as_str()))
            .await?;
        ensure!(
            outcome == SendOutcome::Receipted,
            "warm-up send {i}: {outcome:?}"
        );
        let m = consumer
            .receive_timeout(Duration::from_secs(10))
            .await?
            .ok_or_else(|| anyhow!("warm-up message {id} not received\n{}", context(&pair)))?;
        ensure!(
            m.header("x-id") == Some(id.as_str()),
            "got {:?}",
            m.header("x-id")
        );
        m.ack().await?;
    }

    pair.kill9(PRIMARY);
    pair.kill9(SECONDARY);
    let down_at = Instant::now();
    wait_until(
        "both connections noticing the servers are gone",
        Duration::from_secs(10),
        || !producer_conn.is_connected() && !consumer_conn.is_connected(),
        || context(&pair),
    )
    .await?;

    for i in 0..N {
        let id = format!("o-{i}");
        let outcome = producer
            .send_with(body(&id), SendOptions::new().header("x-id", id.as_str()))
            .await?;
        ensure!(
            outcome == SendOutcome::Buffered,
            "[{mode:?}] send {i} with both servers down returned {outcome:?}"
        );
    }
    ensure!(
        producer_conn.buffered() == N,
        "[{mode:?}] {} sends buffered, not {N}",
        producer_conn.buffered()
    );
    // A while with both servers down: nothing arrives, nothing leaves.
    let early = consumer
        .receive_timeout(Duration::from_millis(1500))
        .await?;
    ensure!(
        early.is_none(),
        "[{mode:?}] a message arrived with both servers down: {:?}",
        early.map(|m| m.header("x-id").map(str::to_owned))
    );
    ensure!(
        producer_conn.buffered() == N,
        "[{mode:?}] the buffer holds {} sends while both servers are down, not {N}",
        producer_conn.buffered()
    );

    block(|| start_servers(&mut pair, mode))?;
    let (active, _) = block(|| pair.wait_roles(Duration::from_secs(30)))?;
    println!(
        "[{mode:?}] both servers down for {:?}; ACTIVE now {}",
        down_at.elapsed(),
        pair.nodes[active].name
    );

    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        let m = consumer
            .receive_timeout(Duration::from_secs(20))
            .await?
            .ok_or_else(|| {
                anyhow!(
                    "[{mode:?}] received {} of the {N} buffered messages ({got:?}), then nothing for 20 s\n{}",
                    got.len(),
                    context(&pair)
                )
            })?;
        let id = m.header("x-id").unwrap_or("(no x-id)").to_owned();
        ensure!(
            m.body()[..] == body(&id)[..],
            "[{mode:?}] message {id}: corrupt body"
        );
        got.push(id);
        m.ack().await?;
    }
    let more = consumer.receive_timeout(Duration::from_secs(1)).await?;
    ensure!(
        more.is_none(),
        "[{mode:?}] a message beyond the {N} buffered ones: {:?}",
        more.map(|m| m.header("x-id").map(str::to_owned))
    );
    let expected: Vec<String> = (0..N).map(|i| format!("o-{i}")).collect();
    ensure!(
        got == expected,
        "[{mode:?}] received {got:?}, expected o-0..o-{} in order",
        N - 1
    );
    producer_conn.flush(Duration::from_secs(10)).await?;
    ensure!(producer_conn.buffered() == 0, "the buffer is not empty");
    wait_until(
        "the producer reporting every buffered send replayed",
        Duration::from_secs(5),
        || producer_events.replayed() == N,
        || producer_events.show(),
    )
    .await?;
    let waits = producer_events.count(|e| matches!(e, Event::Waiting { .. }));
    ensure!(
        waits > 0,
        "no back-off rounds while both servers were down?\n{}",
        producer_events.show()
    );
    print!("{}{}", producer_events.show(), consumer_events.show());
    println!(
        "[{mode:?}] {N} sends buffered with both servers down, {} replayed, {} received in \
         order once; in {:?}",
        producer_events.replayed(),
        got.len(),
        t0.elapsed()
    );
    consumer.close().await?;
    producer_conn.close().await?;
    consumer_conn.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_both_servers_down_sends_wait_in_the_buffer() -> Result<()> {
    both_servers_down_then_back(Mode::Shared).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_both_servers_down_sends_wait_in_the_buffer() -> Result<()> {
    both_servers_down_then_back(Mode::Replicated).await
}

// ---------------------------------------------------------------------------
// 3. a client process killed with sends in its buffer directory

/// An example binary of fmq-client, built beside `fmq`
/// (`target/release/examples/NAME`).
fn example_bin(name: &str) -> PathBuf {
    let fmq = fmq_bin();
    let path = fmq
        .parent()
        .expect("fmq has a directory")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "example {name} not built at {}: run cargo build --release -p fmq-client --examples \
         (into the target directory of the fmq binary)",
        path.display()
    );
    path
}

async fn client_process_killed_with_buffered_sends(mode: Mode) -> Result<()> {
    /// Sends of the first run, left in the buffer.
    const N: usize = 40;
    /// Sends of the second run.
    const M: usize = 5;
    let _serial = serial().await;
    let t0 = Instant::now();
    let queue = "/queue/t15.restart";
    let mut pair = new_pair(mode);
    // The gateway only: both servers are down.
    block(|| pair.start_gateway(Duration::from_secs(10)))?;
    let work = tempfile::Builder::new()
        .prefix("fmq-t15-client-")
        .tempdir()?;
    let buffer = work.path().join("buffer");
    let buffer_arg = buffer.display().to_string();
    let addr = servers(&pair).join(",");
    let producer = example_bin("producer");
    let run = |tag: &str, count: usize, offline: bool| -> Result<Proc> {
        let mut cmd = std::process::Command::new(&producer);
        cmd.args(["--addr", &addr, "--login", LOGIN, "--passcode", PASSCODE])
            .args(["--client-id", "t15-restart", "--buffer-dir", &buffer_arg])
            .args(["--destination", queue, "--name", "restart"])
            .args(["--count", &count.to_string()]);
        if offline {
            cmd.args(["--offline-start", "--initial-timeout-ms", "300"]);
        }
        Proc::spawn(
            &mut cmd,
            work.path().join(format!("{tag}.out")),
            work.path().join(format!("{tag}.err")),
        )
    };

    let first = run("producer-1", N, true)?;
    let line = format!("{N} sends made, {N} waiting in the local buffer");
    wait_until(
        &format!("[{mode:?}] the first producer run buffering its {N} sends"),
        Duration::from_secs(30),
        || first.output().contains(&line) || first.exited().is_some(),
        || first.tail(20),
    )
    .await?;
    ensure!(
        first.exited().is_none(),
        "[{mode:?}] the first producer run exited: {:?}\n{}",
        first.exited(),
        first.tail(20)
    );
    first.signal(Signal::SIGKILL);
    let status = first
        .wait_exit(Duration::from_secs(10))
        .ok_or_else(|| anyhow!("the first producer run survived SIGKILL"))?;
    println!(
        "[{mode:?}] first producer run killed ({status}) with {N} sends buffered in {}",
        buffer.display()
    );
    drop(first);

    block(|| start_servers(&mut pair, mode))?;
    let (active, _) = block(|| pair.wait_roles(Duration::from_secs(30)))?;
    println!(
        "[{mode:?}] servers up after {:?}: ACTIVE {}",
        t0.elapsed(),
        pair.nodes[active].name
    );

    let second = run("producer-2", M, false)?;
    let status = block(|| second.wait_exit(Duration::from_secs(60)));
    let out = second.output();
    ensure!(
        status.is_some_and(|s| s.success()),
        "[{mode:?}] the second producer run: {status:?}\n{}\n{}",
        second.tail(30),
        pair.logs()
    );
    ensure!(
        out.contains(&format!("sent {M} messages to {queue}")),
        "[{mode:?}] second producer run:\n{out}"
    );
    print!("--- second producer run\n{out}");

    let buffers = tempfile::Builder::new().prefix("fmq-t15-buf-").tempdir()?;
    let cb = client(&pair, "t15-restart-consumer", buffers.path());
    let consumer_events = Recorder::start("consumer", cb.events(), t0);
    let consumer_conn = cb.connect().await.context("consumer connection")?;
    let session = consumer_conn.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer(queue).await?;
    let mut got: Vec<(String, Option<String>, Option<u64>)> = Vec::new();
    while got.len() < N + M {
        let m = consumer
            .receive_timeout(Duration::from_secs(20))
            .await?
            .ok_or_else(|| {
                anyhow!(
                    "[{mode:?}] received {} of {} messages ({got:?}), then nothing for 20 s\n{}{}",
                    got.len(),
                    N + M,
                    consumer_events.show(),
                    pair.logs()
                )
            })?;
        got.push((
            m.body_str().unwrap_or("(not text)").to_owned(),
            m.producer_id().map(str::to_owned),
            m.sequence(),
        ));
        m.ack().await?;
    }
    let more = consumer.receive_timeout(Duration::from_secs(1)).await?;
    ensure!(
        more.is_none(),
        "[{mode:?}] a message beyond the {} expected: {:?}",
        N + M,
        more.map(|m| m.body_str().map(str::to_owned))
    );
    let bodies: Vec<&str> = got.iter().map(|(b, _, _)| b.as_str()).collect();
    let expected: Vec<String> = (0..N).chain(0..M).map(|i| format!("message {i}")).collect();
    ensure!(
        bodies == expected,
        "[{mode:?}] received {bodies:?}, expected the first run's {N} messages then the \
         second run's {M}, in order"
    );
    let producer_id = got[0].1.clone();
    ensure!(
        producer_id.is_some() && got.iter().all(|(_, p, _)| *p == producer_id),
        "[{mode:?}] not one producer id across the two runs: {got:?}"
    );
    let sequences: Vec<u64> = got.iter().filter_map(|(_, _, s)| *s).collect();
    ensure!(
        sequences.len() == N + M && sequences.windows(2).all(|w| w[0] < w[1]),
        "[{mode:?}] sequences not increasing: {sequences:?}"
    );
    print!("{}", consumer_events.show());
    println!(
        "[{mode:?}] {N} sends buffered by a killed producer process and {M} of its next run \
         received once, in order (producer id {}, sequences {}..={}); in {:?}",
        producer_id.unwrap_or_default(),
        sequences[0],
        sequences[N + M - 1],
        t0.elapsed()
    );
    consumer.close().await?;
    consumer_conn.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_client_killed_with_buffered_sends_delivers_them_after_restart() -> Result<()> {
    client_process_killed_with_buffered_sends(Mode::Shared).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_client_killed_with_buffered_sends_delivers_them_after_restart() -> Result<()> {
    client_process_killed_with_buffered_sends(Mode::Replicated).await
}
