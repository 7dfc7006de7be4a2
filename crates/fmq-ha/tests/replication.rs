//! The replication layer over loopback TCP: an active serving its store
//! ([`replication::serve`]) to a passive following it
//! ([`replication::follow`]), both on in-memory stores with a batch log, and
//! a hand-written fake active where `follow` must refuse what a real active
//! never sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fmq_ha::heartbeat;
use fmq_ha::replication::{
    self, Checkpointer, Feed, Frame, Plan, Replica, ReplicatedStore, SinkEvent, Source, SourceEvent,
};
use fmq_store::{epoch, Batch, Cf, EpochStart, MemoryStore, Op, Position, Store};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// Batch log retention of every store here: the whole history, unless a
/// test wants a pruned log.
const LOG: u64 = 100_000;
/// Upper bound of every wait; the tests take milliseconds when they pass.
const WAIT: Duration = Duration::from_secs(10);

/// Both ends of one loopback connection framed as replication connections
/// are: (active's end, passive's end).
async fn wires() -> (Wire, Wire) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (
        Framed::new(accepted.unwrap().0, heartbeat::replication_codec()),
        Framed::new(dialed.unwrap(), heartbeat::replication_codec()),
    )
}

// ---------------------------------------------------------------------
// Stores and batches

/// Batch `n` of a history tagged `tag`: a message, a queue entry, and every
/// seventh batch deletes an earlier message, so histories with different
/// tags differ in content and size.
fn batch(n: u64, tag: &str) -> Batch {
    let mut b = Batch::new();
    b.put(
        Cf::Messages,
        format!("m{n:08}"),
        format!("{tag}:{n}:{}", "x".repeat((n % 13) as usize * 9)),
    );
    b.put(Cf::QueueEntries, format!("q/{n:08}"), n.to_be_bytes());
    if n.is_multiple_of(7) {
        b.delete(Cf::Messages, format!("m{:08}", n / 2));
    }
    b
}

/// Commits batches `from..=to` of history `tag` to `store`; the first one
/// opens `mark = (epoch, owner)` if given.
async fn fill(store: &dyn Store, from: u64, to: u64, tag: &str, mark: Option<(u64, &str)>) {
    for n in from..=to {
        let mut b = batch(n, tag);
        if n == from {
            if let Some((e, owner)) = mark {
                epoch::mark_epoch(&mut b, e, store.last_sequence() + 1, owner);
            }
        }
        assert_eq!(store.commit(b).await.expect("commit"), n);
    }
}

/// Every key of every column family but the batch log.
fn dump(store: &dyn Store) -> BTreeMap<(Cf, Vec<u8>), Vec<u8>> {
    let mut out = BTreeMap::new();
    for cf in Cf::ALL.into_iter().filter(|cf| *cf != Cf::Log) {
        store
            .scan_prefix(cf, b"", &mut |k, v| {
                out.insert((cf, k.to_vec()), v.to_vec());
                Ok(())
            })
            .expect("scan");
    }
    out
}

/// The batch log from `from` as (sequence, ops). The sync flag is left out:
/// a passive stores every replicated batch with it set.
fn log_ops(store: &dyn Store, from: u64) -> Vec<(u64, Vec<Op>)> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let batches = store.read_log(next, 512, usize::MAX).expect("read log");
        let Some(last) = batches.last() else {
            return out;
        };
        next = last.sequence + 1;
        for b in batches {
            let decoded = Batch::decode(&b.bytes).expect("decode logged batch");
            out.push((b.sequence, decoded.ops().to_vec()));
        }
    }
}

/// A checkpoint of a memory store: every key but the batch log, in one file
/// named after its last sequence. [`MemReplica::install`] reads it.
fn checkpointer(store: Arc<MemoryStore>) -> Checkpointer {
    Box::new(move |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let last = store.last_sequence();
        let mut out = Vec::new();
        for ((cf, k), v) in dump(&*store) {
            out.push(cf as u8);
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(&k);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(&v);
        }
        std::fs::write(dir.join(format!("state-{last}")), out).map_err(|e| e.to_string())?;
        Ok(last)
    })
}

/// The stand-in for a storage engine without checkpoints.
fn no_checkpoints() -> Checkpointer {
    Box::new(|_: &Path| Err("no checkpoints".into()))
}

const NO_INSTALL: &str = "this memory replica does not install checkpoints";

/// A passive's store in memory. `install` refuses unless `installs`; when it
/// installs, it reads a [`checkpointer`] file into a new store (padded with
/// empty batches to the checkpoint's sequence, as a memory store cannot
/// start at a given one).
#[derive(Debug)]
struct MemReplica {
    store: Mutex<Arc<MemoryStore>>,
    dir: tempfile::TempDir,
    installs: bool,
    /// `keep_old` of every `install` call.
    install_calls: Mutex<Vec<bool>>,
}

impl MemReplica {
    fn new(store: MemoryStore, installs: bool) -> Arc<MemReplica> {
        Arc::new(MemReplica {
            store: Mutex::new(Arc::new(store)),
            dir: tempfile::tempdir().unwrap(),
            installs,
            install_calls: Mutex::new(Vec::new()),
        })
    }

    fn mem(&self) -> Arc<MemoryStore> {
        self.store.lock().unwrap().clone()
    }

    fn install_calls(&self) -> Vec<bool> {
        self.install_calls.lock().unwrap().clone()
    }
}

impl Replica for MemReplica {
    fn store(&self) -> Arc<dyn Store> {
        self.mem()
    }

    fn install(&self, dir: &Path, keep_old: bool) -> Result<(), String> {
        self.install_calls.lock().unwrap().push(keep_old);
        if !self.installs {
            return Err(NO_INSTALL.into());
        }
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .map(|e| e.unwrap().path())
            .collect();
        let [file] = files.as_slice() else {
            return Err(format!("checkpoint of {} files", files.len()));
        };
        let last: u64 = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("state-"))
            .and_then(|n| n.parse().ok())
            .ok_or("checkpoint file name")?;
        let data = std::fs::read(file).map_err(|e| e.to_string())?;
        let store = MemoryStore::with_log(LOG);
        for _ in 1..last {
            drop(store.commit(Batch::new()));
        }
        let mut state = Batch::new();
        let mut rest = data.as_slice();
        while !rest.is_empty() {
            let (cf, key, value) = record(&mut rest).ok_or("truncated checkpoint")?;
            state.put(cf, key, value);
        }
        drop(store.commit(state));
        if store.last_sequence() != last {
            return Err(format!("installed {} for {last}", store.last_sequence()));
        }
        std::fs::remove_dir_all(dir).map_err(|e| e.to_string())?;
        *self.store.lock().unwrap() = Arc::new(store);
        Ok(())
    }

    fn staging(&self) -> PathBuf {
        self.dir.path().join("incoming")
    }

    fn diverged_dir(&self) -> PathBuf {
        self.dir.path().join("diverged")
    }
}

/// One record of a [`checkpointer`] file: column family tag, then key and
/// value, each with a u32 length.
fn record(rest: &mut &[u8]) -> Option<(Cf, Vec<u8>, Vec<u8>)> {
    fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let head = rest.get(..n)?;
        *rest = &rest[n..];
        Some(head)
    }
    fn field(rest: &mut &[u8]) -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(take(rest, 4)?.try_into().ok()?) as usize;
        take(rest, len).map(<[u8]>::to_vec)
    }
    let cf = Cf::from_tag(take(rest, 1)?[0])?;
    Some((cf, field(rest)?, field(rest)?))
}

/// The active: its own store, the feed, the store its broker writes to,
/// and what `serve` needs.
struct Active {
    inner: Arc<MemoryStore>,
    feed: Arc<Feed>,
    store: ReplicatedStore,
    source: Arc<Source>,
    _scratch: tempfile::TempDir,
}

impl Active {
    /// An active on `inner` (already holding its history) serving `epoch`.
    fn new(inner: MemoryStore, epoch: u64, checkpoints: bool) -> Active {
        let inner = Arc::new(inner);
        let feed = Feed::new(inner.last_sequence(), epoch);
        let store = ReplicatedStore::new(inner.clone(), feed.clone());
        let scratch = tempfile::tempdir().unwrap();
        let source = Arc::new(Source {
            store: inner.clone(),
            feed: feed.clone(),
            checkpoint: if checkpoints {
                checkpointer(inner.clone())
            } else {
                no_checkpoints()
            },
            scratch: scratch.path().to_path_buf(),
        });
        Active {
            inner,
            feed,
            store,
            source,
            _scratch: scratch,
        }
    }
}

/// One replication connection between an active and a passive.
struct Link {
    serve: JoinHandle<String>,
    follow: JoinHandle<String>,
    source_events: mpsc::Receiver<SourceEvent>,
    sink_events: mpsc::Receiver<SinkEvent>,
}

async fn connect(active: &Active, replica: &Arc<MemReplica>) -> Link {
    let (a, p) = wires().await;
    let (source_tx, source_events) = mpsc::channel(64);
    let (sink_tx, sink_events) = mpsc::channel(64);
    let replica: Arc<dyn Replica> = replica.clone();
    Link {
        serve: tokio::spawn(replication::serve(a, active.source.clone(), source_tx)),
        follow: tokio::spawn(replication::follow(p, replica, sink_tx)),
        source_events,
        sink_events,
    }
}

/// The first event matching `pred` within [`WAIT`], skipping others.
async fn event<T: std::fmt::Debug>(
    rx: &mut mpsc::Receiver<T>,
    what: &str,
    pred: impl Fn(&T) -> bool,
) -> T {
    let found = tokio::time::timeout(WAIT, async {
        while let Some(e) = rx.recv().await {
            if pred(&e) {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        Ok(None) => panic!("events ended before {what}"),
        Err(_) => panic!("no {what} within {WAIT:?}"),
    }
}

/// Waits up to [`WAIT`] for `cond`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The reason a replication task ended, within [`WAIT`].
async fn ended(task: JoinHandle<String>, what: &str) -> String {
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within {WAIT:?}"))
        .expect("task")
}

fn is_insync(e: &SinkEvent) -> bool {
    matches!(e, SinkEvent::InSync)
}

fn assert_same(active: &dyn Store, passive: &dyn Store) {
    assert_eq!(passive.last_sequence(), active.last_sequence());
    assert_eq!(
        epoch::position(passive).unwrap(),
        epoch::position(active).unwrap()
    );
    assert_eq!(
        epoch::history(passive).unwrap(),
        epoch::history(active).unwrap()
    );
    let (a, p) = (dump(active), dump(passive));
    assert_eq!(a.len(), p.len(), "key counts differ");
    assert!(a == p, "the passive's keys differ from the active's");
}

// ---------------------------------------------------------------------
// 1. Incremental catch-up, then the live stream

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_catch_up_then_live_batches() {
    // From an empty passive, from one that already has a prefix, and from
    // one that is already up to date.
    for prefix in [0u64, 400, 1000] {
        let inner = MemoryStore::with_log(LOG);
        fill(&inner, 1, 1000, "a", Some((1, "Primary#1"))).await;
        let active = Active::new(inner, 1, false);
        let passive = MemoryStore::with_log(LOG);
        if prefix > 0 {
            fill(&passive, 1, prefix, "a", Some((1, "Primary#1"))).await;
        }
        let theirs = epoch::position(&passive).unwrap();
        let their_history = epoch::history(&passive).unwrap();
        assert_eq!(
            replication::plan(
                &epoch::history(&*active.inner).unwrap(),
                1000,
                active.inner.first_logged(),
                &their_history,
                theirs
            ),
            Plan::Incremental
        );
        let replica = MemReplica::new(passive, false);
        let mut link = connect(&active, &replica).await;

        event(&mut link.sink_events, "SinkEvent::InSync", is_insync).await;
        event(&mut link.source_events, "SourceEvent::InSync", |e| {
            *e == SourceEvent::InSync
        })
        .await;
        // Only the missing batches were applied: a store at `prefix` that
        // was sent batch 1 again would have refused it as a gap.
        assert_same(&*active.inner, &*replica.store());
        assert_eq!(
            log_ops(&*replica.store(), 1),
            log_ops(&*active.inner, 1),
            "batch logs differ"
        );
        assert_eq!(active.feed.acks().acked, 1000);
        assert!(replica.install_calls().is_empty());

        // Live batches, many in flight at once, through the broker's store.
        let commits: Vec<_> = (1001..=1300)
            .map(|n| active.store.commit(batch(n, "a")))
            .collect();
        let seqs: Vec<u64> = futures::future::join_all(commits)
            .await
            .into_iter()
            .map(|r| r.expect("commit"))
            .collect();
        assert_eq!(seqs, (1001..=1300).collect::<Vec<_>>());
        eventually("passive at 1300 and acked", || {
            replica.store().last_sequence() == 1300 && active.feed.acks().acked == 1300
        })
        .await;
        assert_same(&*active.inner, &*replica.store());
        assert_eq!(
            log_ops(&*replica.store(), 1001),
            log_ops(&*active.inner, 1001)
        );
        assert_eq!(active.feed.lag().batches, 0);

        // The passive goes away: the active's side ends too.
        link.follow.abort();
        let reason = ended(link.serve, "serve").await;
        assert!(reason.contains("closed"), "{reason}");
    }
}

// ---------------------------------------------------------------------
// 2. Synchronous receipts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commits_wait_for_the_passive_and_fail_once_fenced() {
    let inner = MemoryStore::with_log(LOG);
    fill(&inner, 1, 10, "a", Some((1, "Primary#1"))).await;
    let active = Active::new(inner, 1, false);
    active.feed.set_required(true);
    let replica = MemReplica::new(MemoryStore::with_log(LOG), false);

    // No passive yet: written locally, not confirmed.
    let mut c11 = active.store.commit(batch(11, "a"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut c11)
            .await
            .is_err(),
        "a synchronous commit resolved without a passive"
    );
    assert_eq!(active.inner.last_sequence(), 11);
    assert_eq!(active.feed.lag().batches, 1);

    // The passive catches up: the commit resolves, and only then.
    let mut link = connect(&active, &replica).await;
    let got = tokio::time::timeout(WAIT, &mut c11)
        .await
        .expect("the commit waited past the passive's ack");
    assert_eq!(got.expect("commit"), 11);
    assert!(replica.store().last_sequence() >= 11);
    event(&mut link.sink_events, "SinkEvent::InSync", is_insync).await;
    event(&mut link.source_events, "SourceEvent::InSync", |e| {
        *e == SourceEvent::InSync
    })
    .await;

    // In sync: every commit resolves once the passive holds it.
    let mut pending: FuturesUnordered<_> = (12..=111)
        .map(|n| active.store.commit(batch(n, "a")))
        .collect();
    while let Some(r) = tokio::time::timeout(WAIT, pending.next())
        .await
        .expect("synchronous commits stalled")
    {
        let seq = r.expect("commit");
        let theirs = replica.store().last_sequence();
        assert!(
            theirs >= seq,
            "commit {seq} resolved while the passive is at {theirs}"
        );
    }

    // The passive stops: commits wait again...
    link.follow.abort();
    ended(link.serve, "serve").await;
    let mut c112 = active.store.commit(batch(112, "a"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut c112)
            .await
            .is_err(),
        "a synchronous commit resolved while the passive was gone"
    );
    // ...until it comes back and confirms them.
    let link = connect(&active, &replica).await;
    let got = tokio::time::timeout(WAIT, &mut c112)
        .await
        .expect("the commit did not resolve once the passive was back");
    assert_eq!(got.expect("commit"), 112);
    assert_eq!(replica.store().last_sequence(), 112);

    // Gone again, then the server steps down: what the passive did not
    // confirm fails, now and later.
    link.follow.abort();
    ended(link.serve, "serve").await;
    let mut c113 = active.store.commit(batch(113, "a"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut c113)
            .await
            .is_err(),
        "a synchronous commit resolved while the passive was gone"
    );
    active.feed.fence();
    let err = tokio::time::timeout(WAIT, &mut c113)
        .await
        .expect("a fenced commit kept waiting")
        .expect_err("a commit the passive never confirmed succeeded");
    assert!(
        err.to_string()
            .contains("was not confirmed by the passive server"),
        "{err}"
    );
    let err = tokio::time::timeout(WAIT, active.store.commit(batch(114, "a")))
        .await
        .expect("a commit after the fence kept waiting")
        .expect_err("a commit after the fence succeeded");
    assert!(err.to_string().contains("batch 114"), "{err}");
    assert_eq!(replica.store().last_sequence(), 112);
}

// ---------------------------------------------------------------------
// 3. Epochs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_at_an_older_epoch_is_refused() {
    let passive = MemoryStore::with_log(LOG);
    fill(&passive, 1, 3, "p", Some((5, "Secondary#5"))).await;
    let before = dump(&passive);
    let inner = MemoryStore::with_log(LOG);
    fill(&inner, 1, 10, "a", Some((3, "Primary#3"))).await;
    let active = Active::new(inner, 3, false);
    let replica = MemReplica::new(passive, false);

    let link = connect(&active, &replica).await;
    let serve = ended(link.serve, "serve").await;
    let follow = ended(link.follow, "follow").await;
    assert!(serve.contains("stale"), "serve: {serve}");
    assert!(serve.contains("epoch 5"), "serve: {serve}");
    assert!(
        follow.contains("the active refused replication") && follow.contains("stale"),
        "follow: {follow}"
    );
    assert_eq!(replica.store().last_sequence(), 3);
    assert!(dump(&*replica.store()) == before, "the passive changed");
    assert_eq!(active.feed.acks().acked, 10);
}

/// Runs `follow` for `replica` against a fake active that answers the
/// Subscribe with `frames`. Returns the Subscribe, the reason `follow`
/// ended, and the frames the passive sent after its Subscribe.
async fn against_fake_active(
    replica: &Arc<MemReplica>,
    frames: Vec<Frame>,
) -> (Frame, String, Vec<Frame>) {
    let (mut active, follow, subscribe) = fake_active(replica).await;
    for f in frames {
        if active.send(f.encode()).await.is_err() {
            break;
        }
    }
    let reason = ended(follow, "follow").await;
    let mut replies = Vec::new();
    while let Some(Ok(b)) = tokio::time::timeout(WAIT, active.next())
        .await
        .expect("the passive's end stayed open")
    {
        replies.push(Frame::decode(b.freeze()).expect("decode reply"));
    }
    (subscribe, reason, replies)
}

/// Starts `follow` for `replica` on a connection whose active end the test
/// drives: returns that end, the task, and the Subscribe it sent.
async fn fake_active(replica: &Arc<MemReplica>) -> (Wire, JoinHandle<String>, Frame) {
    let (mut active, passive) = wires().await;
    let (tx, _events) = mpsc::channel(64);
    let r: Arc<dyn Replica> = replica.clone();
    let follow = tokio::spawn(replication::follow(passive, r, tx));
    let first = tokio::time::timeout(WAIT, active.next())
        .await
        .expect("no Subscribe")
        .expect("closed before Subscribe")
        .expect("read");
    let subscribe = Frame::decode(first.freeze()).expect("decode Subscribe");
    (active, follow, subscribe)
}

fn start(epoch: u64) -> Frame {
    Frame::Start {
        epoch,
        plan: Plan::Incremental,
    }
}

fn shipped(epoch: u64, sequence: u64) -> Frame {
    Frame::Batch {
        epoch,
        sequence,
        bytes: Bytes::from(batch(sequence, "fake").encode()),
    }
}

fn refusals(replies: &[Frame]) -> Vec<&str> {
    replies
        .iter()
        .filter_map(|f| match f {
            Frame::Refuse { reason } => Some(reason.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passive_refuses_an_older_epoch_itself() {
    let passive = MemoryStore::with_log(LOG);
    fill(&passive, 1, 3, "p", Some((5, "Secondary#5"))).await;
    let before = dump(&passive);
    let replica = MemReplica::new(passive, false);

    // An active that does not check the epoch starts at 3.
    let (subscribe, reason, replies) =
        against_fake_active(&replica, vec![start(3), shipped(3, 4)]).await;
    assert_eq!(
        subscribe,
        Frame::Subscribe {
            position: Position {
                epoch: 5,
                sequence: 3
            },
            history: vec![EpochStart {
                epoch: 5,
                start: 1,
                owner: "Secondary#5".into()
            }],
        }
    );
    assert!(
        reason.contains("replication from epoch 3 rejected") && reason.contains("at epoch 5"),
        "{reason}"
    );
    assert_eq!(refusals(&replies), [reason.as_str()]);
    assert_eq!(replica.store().last_sequence(), 3);
    assert!(dump(&*replica.store()) == before, "the passive changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_an_older_epoch_than_one_applied_is_refused() {
    // (start epoch, batches as (epoch, sequence), the refused one last)
    let cases: [(u64, Vec<(u64, u64)>); 3] = [
        // Older than the passive's own epoch, right away.
        (2, vec![(1, 4)]),
        // Older than a batch applied on this connection.
        (4, vec![(4, 4), (3, 5)]),
        (4, vec![(4, 4), (4, 5), (2, 6)]),
    ];
    for (start_epoch, batches) in cases {
        let passive = MemoryStore::with_log(LOG);
        fill(&passive, 1, 3, "p", Some((2, "Secondary#2"))).await;
        let replica = MemReplica::new(passive, false);
        let (bad_epoch, bad_seq) = *batches.last().unwrap();
        let seen = batches[..batches.len() - 1]
            .iter()
            .map(|b| b.0)
            .fold(2, u64::max);
        let mut frames = vec![start(start_epoch)];
        frames.extend(batches.iter().map(|&(e, s)| shipped(e, s)));
        let (_, reason, replies) = against_fake_active(&replica, frames).await;
        assert_eq!(
            reason,
            format!(
                "batch {bad_seq} of epoch {bad_epoch} rejected: this server has seen epoch {seen}"
            )
        );
        assert_eq!(refusals(&replies), [reason.as_str()]);
        // Everything before the refused batch was applied, and acked.
        assert_eq!(replica.store().last_sequence(), bad_seq - 1);
        if bad_seq > 4 {
            assert!(
                replies.contains(&Frame::Ack {
                    sequence: bad_seq - 1
                }),
                "{replies:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------
// 4. Divergence

/// Both share epoch 1 to 10; the passive ran its own epoch 2 to 15, the
/// active an epoch 2 of another owner to 20.
async fn diverged_pair(checkpoints: bool, installs: bool) -> (Active, Arc<MemReplica>) {
    let passive = MemoryStore::with_log(LOG);
    fill(&passive, 1, 10, "a", Some((1, "Primary#1"))).await;
    fill(&passive, 11, 15, "p", Some((2, "Secondary#2"))).await;
    let inner = MemoryStore::with_log(LOG);
    fill(&inner, 1, 10, "a", Some((1, "Primary#1"))).await;
    fill(&inner, 11, 20, "a", Some((2, "Primary#2"))).await;
    let active = Active::new(inner, 2, checkpoints);
    (active, MemReplica::new(passive, installs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergent_batches_are_saved_aside() {
    let (active, replica) = diverged_pair(true, false).await;
    let passive = replica.store();
    let p = replication::plan(
        &epoch::history(&*active.inner).unwrap(),
        active.inner.last_sequence(),
        active.inner.first_logged(),
        &epoch::history(&*passive).unwrap(),
        epoch::position(&*passive).unwrap(),
    );
    assert_eq!(p, Plan::Diverged { common: 10 });
    let theirs = passive.read_log(11, 100, usize::MAX).unwrap();
    assert_eq!(theirs.len(), 5);
    let before = dump(&*passive);
    drop(passive);

    let mut link = connect(&active, &replica).await;
    let ev = event(&mut link.sink_events, "SinkEvent::Diverged", |e| {
        matches!(e, SinkEvent::Diverged { .. })
    })
    .await;
    let SinkEvent::Diverged {
        file,
        batches,
        from,
        to,
    } = ev
    else {
        unreachable!()
    };
    assert_eq!((batches, from, to), (5, 11, 15));
    assert_eq!(file.parent(), Some(replica.diverged_dir().as_path()));

    // The memory replica cannot install the checkpoint that follows.
    let reason = ended(link.follow, "follow").await;
    assert_eq!(reason, NO_INSTALL);
    assert_eq!(replica.install_calls(), [true], "keep_old must be set");
    ended(link.serve, "serve").await;

    let (header, saved) = replication::read_divergent(&file).expect("read_divergent");
    assert_eq!(header["from"], 11, "{header}");
    assert_eq!(header["to"], 15, "{header}");
    assert_eq!(header["first_in_file"], 11, "{header}");
    assert_eq!(header["epoch"], 2, "{header}");
    assert_eq!(header["history"][1]["owner"], "Secondary#2", "{header}");
    assert_eq!(
        saved.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );
    for ((seq, b), logged) in saved.iter().zip(&theirs) {
        assert_eq!(*seq, logged.sequence);
        assert_eq!(b.encode(), logged.bytes, "batch {seq} differs");
    }
    // The refused install left the passive's store as it was.
    assert!(dump(&*replica.store()) == before, "the passive changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_passive_installs_the_checkpoint_and_follows() {
    let (active, replica) = diverged_pair(true, true).await;
    let mut link = connect(&active, &replica).await;
    event(&mut link.sink_events, "SinkEvent::Diverged", |e| {
        matches!(e, SinkEvent::Diverged { batches: 5, .. })
    })
    .await;
    event(&mut link.sink_events, "SnapshotInstalled", |e| {
        *e == SinkEvent::SnapshotInstalled { sequence: 20 }
    })
    .await;
    event(&mut link.sink_events, "SinkEvent::InSync", is_insync).await;
    assert_eq!(replica.install_calls(), [true]);
    assert_same(&*active.inner, &*replica.store());
    // The staging directory was moved in; the saved batches stay.
    assert!(!replica.staging().exists());
    assert_eq!(
        std::fs::read_dir(replica.diverged_dir()).unwrap().count(),
        1
    );

    fill(&active.store, 21, 60, "a", None).await;
    eventually("passive at 60", || replica.store().last_sequence() == 60).await;
    assert_same(&*active.inner, &*replica.store());
    link.follow.abort();
    ended(link.serve, "serve").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_behind_a_pruned_log_gets_a_checkpoint() {
    let inner = MemoryStore::with_log(100);
    fill(&inner, 1, 1000, "a", Some((1, "Primary#1"))).await;
    assert!(inner.first_logged() > 11);
    let active = Active::new(inner, 1, true);
    let passive = MemoryStore::with_log(LOG);
    fill(&passive, 1, 10, "a", Some((1, "Primary#1"))).await;
    let replica = MemReplica::new(passive, true);

    let mut link = connect(&active, &replica).await;
    event(&mut link.sink_events, "SnapshotInstalled", |e| {
        *e == SinkEvent::SnapshotInstalled { sequence: 1000 }
    })
    .await;
    event(&mut link.sink_events, "SinkEvent::InSync", is_insync).await;
    assert_eq!(replica.install_calls(), [false], "nothing diverged");
    assert!(!replica.diverged_dir().exists());
    assert_same(&*active.inner, &*replica.store());
    fill(&active.store, 1001, 1100, "a", None).await;
    eventually("passive at 1100", || {
        replica.store().last_sequence() == 1100
    })
    .await;
    assert_same(&*active.inner, &*replica.store());
    link.follow.abort();
    ended(link.serve, "serve").await;
}

// ---------------------------------------------------------------------
// 5. Gaps, reordering and junk from the active

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_and_reordered_batches_end_replication() {
    // (batches the passive already has, sequences shipped, the error)
    let cases: [(u64, Vec<u64>, &str); 5] = [
        (0, vec![2], "replication gap: expected batch 1, got 2"),
        (0, vec![1, 3], "replication gap: expected batch 2, got 3"),
        (0, vec![1, 2, 2], "replication gap: expected batch 3, got 2"),
        (0, vec![1, 3, 2], "replication gap: expected batch 2, got 3"),
        (5, vec![5], "replication gap: expected batch 6, got 5"),
    ];
    for (have, seqs, want) in cases {
        let passive = MemoryStore::with_log(LOG);
        if have > 0 {
            fill(&passive, 1, have, "p", Some((1, "Primary#1"))).await;
        }
        let replica = MemReplica::new(passive, false);
        let mut frames = vec![start(1)];
        frames.extend(seqs.iter().map(|&s| shipped(1, s)));
        let (_, reason, _) = against_fake_active(&replica, frames).await;
        assert_eq!(reason, want, "shipped {seqs:?} to a passive at {have}");
        let applied = seqs
            .iter()
            .zip(have + 1..)
            .take_while(|(s, e)| *s == e)
            .count() as u64;
        assert_eq!(replica.store().last_sequence(), have + applied);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_place_a_stale_stream_took_is_refused_unwritten() {
    // The active's history 1..=1000; the passive has 1..=400 of it.
    let inner = MemoryStore::with_log(LOG);
    fill(&inner, 1, 1000, "a", Some((1, "Primary#1"))).await;
    let active = Active::new(inner, 1, false);
    let passive = MemoryStore::with_log(LOG);
    fill(&passive, 1, 400, "a", Some((1, "Primary#1"))).await;
    let replica = MemReplica::new(passive, false);
    let shipped_as = |sequence: u64| {
        let logged = active.inner.read_log(sequence, 1, usize::MAX).unwrap();
        Frame::Batch {
            epoch: 1,
            sequence,
            bytes: Bytes::from(logged[0].bytes.clone()),
        }
    };

    // A stream subscribes at 400. Once it has started, batch 401 lands in
    // the store from elsewhere, as a stream given up a moment before still
    // handing over what it had read; then this stream's 401 and 402 come.
    let (mut wire, follow, subscribe) = fake_active(&replica).await;
    assert!(matches!(
        subscribe,
        Frame::Subscribe { position, .. } if position.sequence == 400
    ));
    wire.send(start(1).encode()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stale = active.inner.read_log(401, 1, usize::MAX).unwrap();
    let stale = Batch::decode(&stale[0].bytes).unwrap();
    assert_eq!(replica.store().commit(stale).await.unwrap(), 401);
    for s in [401, 402] {
        wire.send(shipped_as(s).encode()).await.unwrap();
    }
    let reason = ended(follow, "follow").await;
    assert!(
        reason.contains("applying replicated batch")
            && reason.contains("must be stored as sequence 401")
            && reason.contains("next sequence is 402"),
        "{reason}"
    );
    drop(wire);
    // Batch 401 is in the store once, at 401: nothing was stored one
    // further on, which would have put every later batch out of place.
    assert_eq!(replica.store().last_sequence(), 401);
    assert_eq!(
        log_ops(&*replica.store(), 1),
        log_ops(&*active.inner, 1)[..401].to_vec()
    );

    // The next subscription starts after it, and ends equal to the active,
    // batch by batch.
    let mut link = connect(&active, &replica).await;
    event(&mut link.sink_events, "SinkEvent::InSync", is_insync).await;
    assert_same(&*active.inner, &*replica.store());
    assert_eq!(log_ops(&*replica.store(), 1), log_ops(&*active.inner, 1));
    link.follow.abort();
    ended(link.serve, "serve").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_from_the_active_ends_replication() {
    let cases: [(Vec<Frame>, &str); 4] = [
        (
            vec![
                start(1),
                Frame::Batch {
                    epoch: 1,
                    sequence: 1,
                    bytes: Bytes::from_static(b"\x01\x00\x00\x00\x00\x05"),
                },
            ],
            "batch 1:",
        ),
        (
            vec![
                Frame::Start {
                    epoch: 1,
                    plan: Plan::Snapshot,
                },
                Frame::SnapshotBegin { sequence: 5 },
                Frame::SnapshotChunk {
                    file: "../escape".into(),
                    data: Bytes::from_static(b"x"),
                },
            ],
            "refused",
        ),
        (
            vec![
                Frame::Start {
                    epoch: 1,
                    plan: Plan::Snapshot,
                },
                Frame::SnapshotBegin { sequence: 5 },
                Frame::SnapshotChunk {
                    file: "sub/file".into(),
                    data: Bytes::from_static(b"x"),
                },
            ],
            "refused",
        ),
        (
            vec![start(1), Frame::Ack { sequence: 1 }],
            "unexpected frame from the active",
        ),
    ];
    for (frames, want) in cases {
        let replica = MemReplica::new(MemoryStore::with_log(LOG), false);
        let (_, reason, _) = against_fake_active(&replica, frames.clone()).await;
        assert!(reason.contains(want), "{frames:?}: {reason}");
        assert_eq!(replica.store().last_sequence(), 0);
        assert!(!replica.dir.path().join("escape").exists());
    }
}

// ---------------------------------------------------------------------
// 6. Frame decoding

fn arb_frame() -> impl Strategy<Value = Frame> {
    let text = "\\PC{0,20}";
    let bytes = proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
    let entry = (any::<u64>(), any::<u64>(), text).prop_map(|(epoch, start, owner)| EpochStart {
        epoch,
        start,
        owner,
    });
    let plan = prop_oneof![
        Just(Plan::Incremental),
        Just(Plan::Snapshot),
        any::<u64>().prop_map(|common| Plan::Diverged { common }),
    ];
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(entry, 0..4)
        )
            .prop_map(|(epoch, sequence, history)| Frame::Subscribe {
                position: Position { epoch, sequence },
                history
            }),
        any::<u64>().prop_map(|sequence| Frame::Ack { sequence }),
        (any::<u64>(), plan).prop_map(|(epoch, plan)| Frame::Start { epoch, plan }),
        (any::<u64>(), any::<u64>(), bytes.clone()).prop_map(|(epoch, sequence, bytes)| {
            Frame::Batch {
                epoch,
                sequence,
                bytes,
            }
        }),
        any::<u64>().prop_map(|sequence| Frame::SnapshotBegin { sequence }),
        (text, bytes).prop_map(|(file, data)| Frame::SnapshotChunk { file, data }),
        any::<u64>().prop_map(|sequence| Frame::SnapshotEnd { sequence }),
        any::<u64>().prop_map(|sequence| Frame::InSync { sequence }),
        text.prop_map(|reason| Frame::Refuse { reason }),
    ]
}

proptest! {
    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Frame::decode(Bytes::from(bytes));
    }

    #[test]
    fn decode_never_panics_after_a_valid_tag(tag in 0u8..11, rest in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = vec![tag];
        bytes.extend(rest);
        let _ = Frame::decode(Bytes::from(bytes));
    }

    #[test]
    fn frames_round_trip_and_their_prefixes_are_refused(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let encoded = frame.encode();
        prop_assert_eq!(Frame::decode(encoded.clone()).expect("decode"), frame.clone());
        // A strict prefix decodes only where the last field runs to the
        // end of the frame (batch bytes, chunk data), and never panics.
        let cut = cut.index(encoded.len());
        let prefix = Frame::decode(encoded.slice(..cut));
        let open_ended = matches!(frame, Frame::Batch { .. } | Frame::SnapshotChunk { .. });
        prop_assert!(prefix.is_err() || open_ended, "{:?} decoded from a prefix of {:?}", prefix, frame);
        // Trailing bytes are refused where the frame has a fixed end.
        let mut longer = encoded.to_vec();
        longer.push(0);
        prop_assert!(Frame::decode(Bytes::from(longer)).is_err() || open_ended);
    }
}
