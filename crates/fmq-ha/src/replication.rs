//! Store replication for the replicated HA mode: the active ships every
//! store batch to the passive, which applies it to its own store.
//!
//! # Pieces
//!
//! - [`ReplicatedStore`]: the [`Store`] the active's broker writes to. Each
//!   commit gets its sequence number, is put on the [`Feed`] at once (so it
//!   travels to the passive while the local fsync runs) and is committed
//!   locally. While replication is synchronous and the passive is in sync,
//!   the commit resolves only when the passive has confirmed the batch
//!   durable, so a RECEIPT means "on both disks".
//! - [`serve`]: the active's side of one replication connection: it
//!   decides how to bring the passive up to date (only the missing batches
//!   when its batch log still has them, a full checkpoint otherwise, after
//!   the passive saved its divergent batches aside if the histories
//!   forked), then streams live batches and reads the passive's acks.
//! - [`follow`]: the passive's side: it states its position and epoch
//!   history, refuses an older epoch, installs a checkpoint when sent one,
//!   applies batches in sequence order and reports when it has caught up.
//!   It writes in groups, on its own thread: every batch already received
//!   goes into one store write and fsync ([`Store::commit_group_now`]),
//!   then one ack confirms them all, and what arrives meanwhile forms the
//!   next group. No hand-off to the store's writer thread and back on the
//!   way from the socket to the ack.
//!
//! Both sides store a batch under the number the active gave it
//! ([`Store::commit_as`], [`Store::commit_group_now`]): a store that would
//! number it otherwise (because something wrote to it around the stream)
//! refuses it before writing, so a batch is never stored under another
//! number on one server than on the other.
//!
//! # Wire
//!
//! Frames on a [`ReplicationStream`](crate::heartbeat::ReplicationStream)
//! (u32 length prefix), each a tag byte and big-endian fields; see
//! [`Frame`].

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fmq_store::epoch::{self, EpochStart, Position};
use fmq_store::{Batch, Cf, Commit, LoggedBatch, Store};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, error, info, warn};

use crate::lock::now_ms;

/// Bytes of recent batches the feed keeps in memory for the live stream.
const RING_BYTES: usize = 32 * 1024 * 1024;
/// Size of the checkpoint file chunks sent to a passive.
const CHUNK: usize = 1024 * 1024;
/// Most bytes of batches a passive writes as one group.
const MAX_GROUP_BYTES: usize = 4 * 1024 * 1024;
/// Most batches read from the store log at once.
const LOG_READ_BATCHES: usize = 512;
/// Most bytes read from the store log at once.
const LOG_READ_BYTES: usize = 4 * 1024 * 1024;

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

// ---------------------------------------------------------------------
// Wire frames

/// How the active brings a passive up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Only the batches after the passive's last sequence follow.
    Incremental,
    /// A full checkpoint follows (the active's log no longer has what the
    /// passive lacks).
    Snapshot,
    /// The histories forked after `common`: the passive must save its
    /// batches after it aside; a full checkpoint follows.
    Diverged {
        /// Last sequence both histories share.
        common: u64,
    },
}

/// One message of a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Passive -> active, first: where the passive's history ends.
    Subscribe {
        /// The passive's (epoch, sequence).
        position: Position,
        /// The passive's epoch history.
        history: Vec<EpochStart>,
    },
    /// Passive -> active: everything up to `sequence` is durable here.
    Ack {
        /// Highest durable sequence.
        sequence: u64,
    },
    /// Active -> passive, first: the active's epoch and the plan.
    Start {
        /// The active's epoch.
        epoch: u64,
        /// See [`Plan`].
        plan: Plan,
    },
    /// Active -> passive: one store batch.
    Batch {
        /// Epoch of the active that shipped it.
        epoch: u64,
        /// Its sequence number; batches arrive in order without gaps.
        sequence: u64,
        /// [`Batch::encode`] bytes.
        bytes: Bytes,
    },
    /// Active -> passive: a checkpoint holding sequences 1..=`sequence`.
    SnapshotBegin {
        /// Last sequence in the checkpoint.
        sequence: u64,
    },
    /// Active -> passive: the next bytes of one checkpoint file.
    SnapshotChunk {
        /// File name inside the checkpoint directory.
        file: String,
        /// Bytes to append.
        data: Bytes,
    },
    /// Active -> passive: the checkpoint is complete.
    SnapshotEnd {
        /// Last sequence in the checkpoint.
        sequence: u64,
    },
    /// Active -> passive: everything committed up to `sequence` has been
    /// sent; what follows is the live stream.
    InSync {
        /// Last sequence of the catch-up.
        sequence: u64,
    },
    /// Either side: the connection is refused, with the reason.
    Refuse {
        /// Why.
        reason: String,
    },
}

impl Frame {
    /// The frame as bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        match self {
            Frame::Subscribe { position, history } => {
                out.put_u8(1);
                out.put_u64(position.epoch);
                out.put_u64(position.sequence);
                out.put_u32(history.len() as u32);
                for e in history {
                    out.put_u64(e.epoch);
                    out.put_u64(e.start);
                    put_str(&mut out, &e.owner);
                }
            }
            Frame::Ack { sequence } => {
                out.put_u8(2);
                out.put_u64(*sequence);
            }
            Frame::Start { epoch, plan } => {
                out.put_u8(3);
                out.put_u64(*epoch);
                match plan {
                    Plan::Incremental => out.put_u8(0),
                    Plan::Snapshot => out.put_u8(1),
                    Plan::Diverged { common } => {
                        out.put_u8(2);
                        out.put_u64(*common);
                    }
                }
            }
            Frame::Batch {
                epoch,
                sequence,
                bytes,
            } => {
                out.reserve(17 + bytes.len());
                out.put_u8(4);
                out.put_u64(*epoch);
                out.put_u64(*sequence);
                out.put_slice(bytes);
            }
            Frame::SnapshotBegin { sequence } => {
                out.put_u8(5);
                out.put_u64(*sequence);
            }
            Frame::SnapshotChunk { file, data } => {
                out.put_u8(6);
                put_str(&mut out, file);
                out.put_slice(data);
            }
            Frame::SnapshotEnd { sequence } => {
                out.put_u8(7);
                out.put_u64(*sequence);
            }
            Frame::InSync { sequence } => {
                out.put_u8(8);
                out.put_u64(*sequence);
            }
            Frame::Refuse { reason } => {
                out.put_u8(9);
                put_str(&mut out, reason);
            }
        }
        out.freeze()
    }

    /// Bytes made by [`Frame::encode`] as a frame.
    pub fn decode(mut b: Bytes) -> Result<Frame, String> {
        let tag = get_u8(&mut b)?;
        let frame = match tag {
            1 => {
                let position = Position {
                    epoch: get_u64(&mut b)?,
                    sequence: get_u64(&mut b)?,
                };
                let n = get_u32(&mut b)? as usize;
                // Each entry takes at least 20 bytes: bound the allocation.
                if n > b.remaining() / 20 {
                    return Err(format!("epoch history of {n} entries in a short frame"));
                }
                let mut history = Vec::with_capacity(n);
                for _ in 0..n {
                    history.push(EpochStart {
                        epoch: get_u64(&mut b)?,
                        start: get_u64(&mut b)?,
                        owner: get_str(&mut b)?,
                    });
                }
                Frame::Subscribe { position, history }
            }
            2 => Frame::Ack {
                sequence: get_u64(&mut b)?,
            },
            3 => {
                let epoch = get_u64(&mut b)?;
                let plan = match get_u8(&mut b)? {
                    0 => Plan::Incremental,
                    1 => Plan::Snapshot,
                    2 => Plan::Diverged {
                        common: get_u64(&mut b)?,
                    },
                    other => return Err(format!("unknown plan {other}")),
                };
                Frame::Start { epoch, plan }
            }
            4 => Frame::Batch {
                epoch: get_u64(&mut b)?,
                sequence: get_u64(&mut b)?,
                bytes: b.split_to(b.remaining()),
            },
            5 => Frame::SnapshotBegin {
                sequence: get_u64(&mut b)?,
            },
            6 => Frame::SnapshotChunk {
                file: get_str(&mut b)?,
                data: b.split_to(b.remaining()),
            },
            7 => Frame::SnapshotEnd {
                sequence: get_u64(&mut b)?,
            },
            8 => Frame::InSync {
                sequence: get_u64(&mut b)?,
            },
            9 => Frame::Refuse {
                reason: get_str(&mut b)?,
            },
            other => return Err(format!("unknown replication frame tag {other}")),
        };
        if b.has_remaining() && !matches!(tag, 4 | 6) {
            return Err(format!(
                "{} trailing bytes after frame {tag}",
                b.remaining()
            ));
        }
        Ok(frame)
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn need(b: &Bytes, n: usize) -> Result<(), String> {
    if b.remaining() < n {
        Err("truncated replication frame".into())
    } else {
        Ok(())
    }
}

fn get_u8(b: &mut Bytes) -> Result<u8, String> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn get_u32(b: &mut Bytes) -> Result<u32, String> {
    need(b, 4)?;
    Ok(b.get_u32())
}

fn get_u64(b: &mut Bytes) -> Result<u64, String> {
    need(b, 8)?;
    Ok(b.get_u64())
}

fn get_str(b: &mut Bytes) -> Result<String, String> {
    let n = get_u32(b)? as usize;
    need(b, n)?;
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| "string is not UTF-8".to_string())
}

async fn send(
    wire: &mut (impl SinkExt<Bytes, Error = std::io::Error> + Unpin),
    f: &Frame,
) -> Result<(), String> {
    wire.send(f.encode())
        .await
        .map_err(|e| format!("replication connection: write failed: {e}"))
}

/// Tells the peer why this side ends the stream (as far as the connection
/// still takes it), and ends it with that reason.
async fn refuse<T>(
    wire: &mut (impl SinkExt<Bytes, Error = std::io::Error> + Unpin),
    reason: String,
) -> Result<T, String> {
    let _ = send(
        wire,
        &Frame::Refuse {
            reason: reason.clone(),
        },
    )
    .await;
    Err(reason)
}

async fn receive(
    wire: &mut (impl StreamExt<Item = std::io::Result<BytesMut>> + Unpin),
) -> Result<Frame, String> {
    match wire.next().await {
        None => Err("replication connection closed by the peer".into()),
        Some(Err(e)) => Err(format!("replication connection: read failed: {e}")),
        Some(Ok(b)) => Frame::decode(b.freeze()),
    }
}

// ---------------------------------------------------------------------
// The feed and the replicated store

/// What the passive has confirmed and whether commits wait for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acks {
    /// Highest sequence the passive has made durable.
    pub acked: u64,
    /// Commits wait for `acked` (synchronous replication, passive in sync).
    pub required: bool,
    /// Commits not yet confirmed fail (the server stepped down).
    pub fenced: bool,
}

/// Replication lag as `fmq status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lag {
    /// Committed batches the passive has not confirmed.
    pub batches: u64,
    /// Their encoded size (of those still in memory).
    pub bytes: u64,
    /// Age of the oldest of them.
    pub seconds: f64,
}

#[derive(Debug, Default)]
struct Ring {
    next: u64,
    entries: VecDeque<(u64, Bytes, Instant)>,
    bytes: usize,
}

/// Batches on their way to the passive: the commit order, a bounded
/// in-memory window of recent batches, and the passive's acks.
#[derive(Debug)]
pub struct Feed {
    ring: Mutex<Ring>,
    notify: Notify,
    /// The passive's acks and the commits waiting for them, under one lock
    /// so a commit either sees an ack or is released by it.
    confirm: Mutex<Confirm>,
    epoch: u64,
    /// Set when a batch could not be stored under the number the feed gave
    /// it: the local store and the feed no longer agree, so every later
    /// commit fails with this reason.
    broken: std::sync::OnceLock<String>,
}

#[derive(Debug, Default)]
struct Confirm {
    acks: Acks,
    /// Commits waiting for the passive, in sequence order. Released from
    /// the front as acks arrive, so an ack wakes only the commits it
    /// confirms.
    waiters: VecDeque<(u64, oneshot::Sender<bool>)>,
}

impl Confirm {
    /// Changes the acks and resolves the waiting commits whose fate they
    /// now settle.
    fn update(&mut self, change: impl FnOnce(&mut Acks)) {
        change(&mut self.acks);
        while let Some(&(sequence, _)) = self.waiters.front() {
            let Some(confirmed) = settled(&self.acks, sequence) else {
                break;
            };
            if let Some((_, tx)) = self.waiters.pop_front() {
                let _ = tx.send(confirmed);
            }
        }
    }
}

/// Whether the passive confirmed a batch, as [`Feed::confirmation`] gives it.
enum Confirmation {
    Now(bool),
    Later(oneshot::Receiver<bool>),
}

impl Confirmation {
    async fn wait(self) -> bool {
        match self {
            Confirmation::Now(confirmed) => confirmed,
            // A dropped sender means the feed is gone: not confirmed.
            Confirmation::Later(rx) => rx.await.unwrap_or(false),
        }
    }
}

/// `Some(confirmed)` once the fate of batch `sequence` is known under `a`.
fn settled(a: &Acks, sequence: u64) -> Option<bool> {
    if a.acked >= sequence {
        Some(true)
    } else if a.fenced {
        Some(false)
    } else if !a.required {
        Some(true)
    } else {
        None
    }
}

impl Feed {
    /// A feed whose next batch gets `last_sequence + 1`, in `epoch`.
    pub fn new(last_sequence: u64, epoch: u64) -> Arc<Feed> {
        Arc::new(Feed {
            ring: Mutex::new(Ring {
                next: last_sequence + 1,
                ..Ring::default()
            }),
            notify: Notify::new(),
            confirm: Mutex::new(Confirm {
                acks: Acks {
                    acked: last_sequence,
                    ..Acks::default()
                },
                waiters: VecDeque::new(),
            }),
            epoch,
            broken: std::sync::OnceLock::new(),
        })
    }

    /// The epoch batches are shipped in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Current acks.
    pub fn acks(&self) -> Acks {
        lock(&self.confirm).acks
    }

    /// Makes commits wait for the passive (or stop waiting).
    pub fn set_required(&self, required: bool) {
        lock(&self.confirm).update(|a| a.required = required);
    }

    /// Fails every commit the passive has not confirmed, now and later.
    pub fn fence(&self) {
        lock(&self.confirm).update(|a| a.fenced = true);
        self.notify.notify_waiters();
    }

    /// Fences the feed for good: batch numbering between it and the local
    /// store broke, so nothing more may be committed through it.
    fn break_numbering(&self, reason: String) {
        if self.broken.set(reason.clone()).is_ok() {
            error!("{reason}; this server refuses every further write until it restarts");
        }
        self.fence();
    }

    fn ack(&self, sequence: u64) {
        let mut confirm = lock(&self.confirm);
        if sequence > confirm.acks.acked {
            confirm.update(|a| a.acked = sequence);
        }
    }

    /// How batch `sequence` learns that the passive confirmed it. Called in
    /// commit order (under the ring lock), so the waiters stay sorted.
    fn confirmation(&self, sequence: u64) -> Confirmation {
        let mut confirm = lock(&self.confirm);
        if let Some(confirmed) = settled(&confirm.acks, sequence) {
            return Confirmation::Now(confirmed);
        }
        let (tx, rx) = oneshot::channel();
        confirm.waiters.push_back((sequence, tx));
        Confirmation::Later(rx)
    }

    /// Sequence of the last batch committed.
    pub fn last_sequence(&self) -> u64 {
        lock(&self.ring).next - 1
    }

    /// Lag of the passive behind the last commit.
    pub fn lag(&self) -> Lag {
        let acked = self.acks().acked;
        let ring = lock(&self.ring);
        let last = ring.next - 1;
        // Entries are in sequence order: only the unconfirmed tail is
        // walked, which is short while the passive keeps up (this runs
        // under the lock every commit takes).
        let tail = ring.entries.partition_point(|(seq, _, _)| *seq <= acked);
        let unconfirmed = ring.entries.range(tail..);
        let bytes = unconfirmed.clone().map(|(_, b, _)| b.len() as u64).sum();
        let oldest = unconfirmed.map(|(_, _, at)| *at).next();
        Lag {
            batches: last.saturating_sub(acked),
            bytes,
            seconds: oldest.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        }
    }

    fn push(&self, sequence: u64, bytes: Bytes, ring: &mut Ring) {
        ring.bytes += bytes.len();
        ring.entries.push_back((sequence, bytes, Instant::now()));
        while ring.bytes > RING_BYTES && ring.entries.len() > 1 {
            if let Some((_, b, _)) = ring.entries.pop_front() {
                ring.bytes -= b.len();
            }
        }
    }

    /// Batches from `from` still in memory, up to `max_bytes`.
    fn take(&self, from: u64, max_bytes: usize) -> Vec<(u64, Bytes)> {
        let ring = lock(&self.ring);
        let Some(&(first, _, _)) = ring.entries.front() else {
            return Vec::new();
        };
        if from < first {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut size = 0;
        // `range`, not `iter().skip()`: the ring holds up to 32 MB of
        // batches (tens of thousands of small ones), and the live stream
        // only ever wants its tail.
        let start = usize::try_from(from - first).unwrap_or(usize::MAX);
        if start >= ring.entries.len() {
            return Vec::new();
        }
        for (seq, b, _) in ring.entries.range(start..) {
            out.push((*seq, b.clone()));
            size += b.len();
            if size >= max_bytes {
                break;
            }
        }
        out
    }

    fn first_in_memory(&self) -> Option<u64> {
        lock(&self.ring).entries.front().map(|e| e.0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The active's store: the local store plus the feed to the passive. See
/// the [module documentation](self).
#[derive(Debug)]
pub struct ReplicatedStore {
    inner: Arc<dyn Store>,
    feed: Arc<Feed>,
}

impl ReplicatedStore {
    /// Wraps `inner`; `feed` must start at `inner.last_sequence()`.
    pub fn new(inner: Arc<dyn Store>, feed: Arc<Feed>) -> ReplicatedStore {
        ReplicatedStore { inner, feed }
    }

    /// The feed.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }
}

impl ReplicatedStore {
    /// Numbers `batch`, hands it to the feed and the local store, and joins
    /// the two outcomes; `wanted` is [`Store::commit_as`]'s sequence.
    fn submit(&self, batch: Batch, wanted: Option<u64>) -> Commit {
        if let Some(reason) = self.feed.broken.get() {
            return Commit::ready(Err(fmq_store::Error::Poisoned(reason.clone())));
        }
        let bytes = Bytes::from(batch.encode());
        let (sequence, local, confirmation) = {
            let mut ring = lock(&self.feed.ring);
            let sequence = ring.next;
            if let Some(wanted) = wanted.filter(|w| *w != sequence) {
                return Commit::ready(Err(fmq_store::Error::OutOfOrder {
                    wanted,
                    next: sequence,
                }));
            }
            // Under the lock: the inner store numbers batches in call
            // order, so it gives this one `sequence` too (or refuses it
            // unwritten if a write around this store took that number),
            // and the waiters queue stays in sequence order.
            let local = self.inner.commit_as(batch, sequence);
            ring.next += 1;
            self.feed.push(sequence, bytes, &mut ring);
            (sequence, local, self.feed.confirmation(sequence))
        };
        self.feed.notify.notify_waiters();
        // No task per commit: the batch is already on its way to the local
        // store and the passive; this only joins the two outcomes.
        let feed = self.feed.clone();
        Commit::from_future(async move {
            // Something wrote to the local store around this one: the feed
            // has shipped a batch the store does not hold under its number.
            let mismatch = match local.await {
                Ok(stored) if stored == sequence => None,
                Ok(stored) => Some(format!("the local store numbered it {stored}")),
                Err(fmq_store::Error::OutOfOrder { next, .. }) => Some(format!(
                    "the local store refused it, its next sequence being {next}"
                )),
                Err(e) => return Err(e),
            };
            if let Some(what) = mismatch {
                let reason = format!(
                    "replicated store: batch {sequence} was shipped to the passive server, but {what}"
                );
                feed.break_numbering(reason.clone());
                return Err(fmq_store::Error::Poisoned(reason));
            }
            if confirmation.wait().await {
                Ok(sequence)
            } else {
                Err(fmq_store::Error::Io(format!(
                    "batch {sequence} was not confirmed by the passive server before this server stopped serving"
                )))
            }
        })
    }
}

impl Store for ReplicatedStore {
    fn commit(&self, batch: Batch) -> Commit {
        self.submit(batch, None)
    }

    fn commit_as(&self, batch: Batch, sequence: u64) -> Commit {
        self.submit(batch, Some(sequence))
    }

    fn get(&self, cf: Cf, key: &[u8]) -> fmq_store::Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }

    fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> fmq_store::Result<()>,
    ) -> fmq_store::Result<()> {
        self.inner.scan_prefix(cf, prefix, f)
    }

    fn last_sequence(&self) -> u64 {
        self.inner.last_sequence()
    }

    fn sync(&self) -> fmq_store::Result<()> {
        self.inner.sync()
    }

    fn settled(&self) -> Commit {
        self.inner.settled()
    }

    fn first_logged(&self) -> u64 {
        self.inner.first_logged()
    }

    fn read_log(
        &self,
        from: u64,
        max_batches: usize,
        max_bytes: usize,
    ) -> fmq_store::Result<Vec<LoggedBatch>> {
        self.inner.read_log(from, max_batches, max_bytes)
    }
}

// ---------------------------------------------------------------------
// Active side

/// What the active's side reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The passive has confirmed everything up to the end of its catch-up.
    InSync,
}

/// Writes a checkpoint of a store into the given (new) directory and
/// returns its last sequence.
pub type Checkpointer = Box<dyn Fn(&Path) -> Result<u64, String> + Send + Sync>;

/// What the active needs to serve a passive.
pub struct Source {
    /// The local store (not the [`ReplicatedStore`] around it).
    pub store: Arc<dyn Store>,
    /// The feed of the running broker.
    pub feed: Arc<Feed>,
    /// Writes a checkpoint of the local store into the given (new)
    /// directory and returns its last sequence.
    pub checkpoint: Checkpointer,
    /// Where checkpoints are written before being sent (removed after).
    pub scratch: PathBuf,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("store", &self.store)
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

/// How the active brings a passive at `theirs` up to date.
pub fn plan(
    ours: &[EpochStart],
    our_last: u64,
    first_logged: u64,
    their_history: &[EpochStart],
    theirs: Position,
) -> Plan {
    let common = epoch::common_prefix(ours, our_last, their_history, theirs.sequence);
    if theirs.sequence > common {
        Plan::Diverged { common }
    } else if theirs.sequence + 1 >= first_logged {
        Plan::Incremental
    } else {
        Plan::Snapshot
    }
}

/// Serves one passive on `wire` until the connection fails or the task is
/// dropped. Returns why it ended.
pub async fn serve(wire: Wire, source: Arc<Source>, events: mpsc::Sender<SourceEvent>) -> String {
    match serve_inner(wire, source, events).await {
        Ok(()) => "replication connection closed".into(),
        Err(e) => e,
    }
}

async fn serve_inner(
    wire: Wire,
    source: Arc<Source>,
    events: mpsc::Sender<SourceEvent>,
) -> Result<(), String> {
    let (mut tx, mut rx) = wire.split();
    let (position, history) = match receive(&mut rx).await? {
        Frame::Subscribe { position, history } => (position, history),
        other => return Err(format!("expected Subscribe, got {other:?}")),
    };
    let epoch = source.feed.epoch();
    if position.epoch > epoch {
        let reason = format!(
            "the passive has seen epoch {} and this server serves epoch {epoch}: this server's epoch is stale",
            position.epoch
        );
        return refuse(&mut tx, reason).await;
    }
    let ours =
        epoch::history(&*source.store).map_err(|e| format!("reading the epoch history: {e}"))?;
    let our_last = source.store.last_sequence();
    let plan = plan(
        &ours,
        our_last,
        source.store.first_logged(),
        &history,
        position,
    );
    info!(
        passive_epoch = position.epoch,
        passive_sequence = position.sequence,
        our_sequence = our_last,
        ?plan,
        "replicating to the passive server"
    );
    send(&mut tx, &Frame::Start { epoch, plan }).await?;

    // The passive's acks, read while we send.
    let feed = source.feed.clone();
    let insync_at = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let reader = {
        let insync_at = insync_at.clone();
        let feed = feed.clone();
        tokio::spawn(async move {
            let mut told = false;
            loop {
                match receive(&mut rx).await {
                    Ok(Frame::Ack { sequence }) => {
                        feed.ack(sequence);
                        if !told && sequence >= insync_at.load(std::sync::atomic::Ordering::Acquire)
                        {
                            told = true;
                            let _ = events.send(SourceEvent::InSync).await;
                        }
                    }
                    Ok(Frame::Refuse { reason }) => {
                        return format!("the passive refused replication: {reason}")
                    }
                    Ok(other) => return format!("unexpected frame from the passive: {other:?}"),
                    Err(e) => return e,
                }
            }
        })
    };
    let result = stream(
        &mut tx,
        &source,
        plan,
        position.sequence,
        &insync_at,
        &reader,
    )
    .await;
    reader.abort();
    match reader.await {
        Ok(reason) => Err(reason),
        Err(_) => result,
    }
}

async fn stream(
    tx: &mut (impl SinkExt<Bytes, Error = std::io::Error> + Unpin),
    source: &Source,
    plan: Plan,
    their_last: u64,
    insync_at: &std::sync::atomic::AtomicU64,
    reader: &tokio::task::JoinHandle<String>,
) -> Result<(), String> {
    let feed = &source.feed;
    let epoch = feed.epoch();
    let mut next = match plan {
        Plan::Incremental => their_last + 1,
        Plan::Snapshot | Plan::Diverged { .. } => send_snapshot(tx, source).await? + 1,
    };
    let mut insync_sent = false;
    loop {
        if reader.is_finished() {
            return Ok(());
        }
        let notified = feed.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Recent batches come from memory, older ones from the store's log.
        let mut pending = feed.take(next, LOG_READ_BYTES);
        if pending.is_empty() && next <= source.store.last_sequence() {
            pending = source
                .store
                .read_log(next, LOG_READ_BATCHES, LOG_READ_BYTES)
                .map_err(|e| {
                    format!(
                        "batch {next} is no longer in the batch log ({e}); the passive must resync"
                    )
                })?
                .into_iter()
                .map(|b| (b.sequence, Bytes::from(b.bytes)))
                .collect();
        }
        let sent = pending.len();
        for (sequence, bytes) in pending {
            if sequence != next {
                return Err(format!("batch gap: expected {next}, read {sequence}"));
            }
            tx.feed(
                Frame::Batch {
                    epoch,
                    sequence,
                    bytes,
                }
                .encode(),
            )
            .await
            .map_err(|e| format!("replication connection: write failed: {e}"))?;
            next = sequence + 1;
        }
        if sent > 0 {
            tx.flush()
                .await
                .map_err(|e| format!("replication connection: write failed: {e}"))?;
            continue;
        }
        // Nothing to send: the passive has everything committed so far.
        if !insync_sent && feed.first_in_memory().is_none_or(|f| f <= next) {
            insync_sent = true;
            insync_at.store(next - 1, std::sync::atomic::Ordering::Release);
            send(tx, &Frame::InSync { sequence: next - 1 }).await?;
        }
        // A batch whose ring entry was trimmed before its local write
        // finished shows up in the log shortly; poll for that rare case.
        let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
    }
}

async fn send_snapshot(
    tx: &mut (impl SinkExt<Bytes, Error = std::io::Error> + Unpin),
    source: &Source,
) -> Result<u64, String> {
    let dir = source
        .scratch
        .join(format!("checkpoint-{}-{}", std::process::id(), now_ms()));
    let started = Instant::now();
    let make = {
        let dir = dir.clone();
        let checkpoint = &source.checkpoint;
        move || checkpoint(&dir)
    };
    let sequence = make()?;
    let result = async {
        send(tx, &Frame::SnapshotBegin { sequence }).await?;
        let mut total = 0u64;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| format!("listing checkpoint {}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for path in files {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("checkpoint file {} has no UTF-8 name", path.display()))?
                .to_owned();
            let data =
                std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            total += data.len() as u64;
            let data = Bytes::from(data);
            if data.is_empty() {
                send(
                    tx,
                    &Frame::SnapshotChunk {
                        file: name.clone(),
                        data,
                    },
                )
                .await?;
                continue;
            }
            let mut off = 0;
            while off < data.len() {
                let end = (off + CHUNK).min(data.len());
                tx.feed(
                    Frame::SnapshotChunk {
                        file: name.clone(),
                        data: data.slice(off..end),
                    }
                    .encode(),
                )
                .await
                .map_err(|e| format!("replication connection: write failed: {e}"))?;
                off = end;
            }
        }
        send(tx, &Frame::SnapshotEnd { sequence }).await?;
        let secs = started.elapsed().as_secs_f64();
        info!(
            sequence,
            bytes = total,
            seconds = secs,
            mib_per_s = total as f64 / 1048576.0 / secs.max(1e-6),
            "checkpoint sent to the passive server"
        );
        Ok(sequence)
    }
    .await;
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        warn!(dir = %dir.display(), error = %e, "could not remove a sent checkpoint");
    }
    result
}

// ---------------------------------------------------------------------
// Passive side

/// What the passive's side reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkEvent {
    /// Caught up with the active's live stream.
    InSync,
    /// A checkpoint was installed.
    SnapshotInstalled {
        /// Its last sequence.
        sequence: u64,
    },
    /// Divergent batches were saved aside.
    Diverged {
        /// The file they are in.
        file: PathBuf,
        /// How many.
        batches: u64,
        /// The range.
        from: u64,
        /// The range.
        to: u64,
    },
    /// Progress of the catch-up (every second while behind).
    Progress {
        /// Last sequence applied.
        applied: u64,
        /// Batches per second since the last report.
        rate: f64,
    },
}

/// The passive's local store, which a checkpoint may replace.
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// The store now.
    fn store(&self) -> Arc<dyn Store>;
    /// Replaces the store with the checkpoint in `dir` (which is moved),
    /// keeping the old store directory aside if `keep_old`.
    fn install(&self, dir: &Path, keep_old: bool) -> Result<(), String>;
    /// An empty directory to receive a checkpoint into.
    fn staging(&self) -> PathBuf;
    /// Where divergent batches are saved.
    fn diverged_dir(&self) -> PathBuf;
}

/// Follows the active on `wire` until the connection fails or the task is
/// dropped. Returns why it ended.
///
/// It blocks its thread while it writes a group of batches (the write and
/// its fsync): run it on a runtime of its own, on a thread that does
/// nothing else. Dropped, it stops between two groups, never inside one.
pub async fn follow(
    wire: Wire,
    replica: Arc<dyn Replica>,
    events: mpsc::Sender<SinkEvent>,
) -> String {
    match follow_inner(wire, replica, events).await {
        Ok(()) => "replication connection closed".into(),
        Err(e) => e,
    }
}

async fn follow_inner(
    mut wire: Wire,
    replica: Arc<dyn Replica>,
    events: mpsc::Sender<SinkEvent>,
) -> Result<(), String> {
    let mut store = replica.store();
    // Commits queued in the store before this stream must land first, or
    // the position sent below would be short of what the store will hold
    // and the active would send those batches again.
    store
        .settled()
        .await
        .map_err(|e| format!("waiting for the store to settle: {e}"))?;
    let position = epoch::position(&*store).map_err(|e| format!("reading our position: {e}"))?;
    let history = epoch::history(&*store).map_err(|e| format!("reading our epoch history: {e}"))?;
    send(
        &mut wire,
        &Frame::Subscribe {
            position,
            history: history.clone(),
        },
    )
    .await?;
    let (epoch, plan) = match receive(&mut wire).await? {
        Frame::Start { epoch, plan } => (epoch, plan),
        Frame::Refuse { reason } => {
            return Err(format!("the active refused replication: {reason}"))
        }
        other => return Err(format!("expected Start, got {other:?}")),
    };
    if epoch < position.epoch {
        let reason = format!(
            "replication from epoch {epoch} rejected: this server's history is at epoch {}, which is newer",
            position.epoch
        );
        return refuse(&mut wire, reason).await;
    }
    info!(
        epoch,
        ?plan,
        sequence = position.sequence,
        "replicating from the active server"
    );
    let mut keep_old = false;
    if let Plan::Diverged { common } = plan {
        keep_old = true;
        let (file, batches) =
            save_divergent(&*store, common, position, &history, &replica.diverged_dir())?;
        warn!(
            "This server's history diverged from the active's after sequence {common}: its {batches} batches {}..={} were saved to {} (inspect with `fmq diverged show FILE`, re-send with `fmq diverged replay FILE`); the old store directory is kept beside the new one",
            common + 1,
            position.sequence,
            file.display()
        );
        let _ = events
            .send(SinkEvent::Diverged {
                file,
                batches,
                from: common + 1,
                to: position.sequence,
            })
            .await;
    }
    let (mut tx, mut rx) = wire.split();
    // The active sends what follows the position it was told. A store
    // written by someone else since then refuses the first group
    // (`commit_group_now`), and the next subscription starts from what it
    // holds.
    let mut expected = position.sequence + 1;
    let mut max_epoch = position.epoch.max(epoch);
    let mut insync_target: Option<u64> = None;
    let mut told_insync = false;
    let mut snapshot: Option<(PathBuf, u64)> = None;
    let mut applied = expected - 1;
    let mut last_report = (Instant::now(), applied);
    // A frame read while gathering a group of batches that is not a batch.
    let mut held: Option<Frame> = None;
    loop {
        let frame = match held.take() {
            Some(frame) => frame,
            None => receive(&mut rx).await?,
        };
        match frame {
            received @ Frame::Batch { .. } => {
                // The group: this batch and every whole frame already
                // here, read without waiting. What arrives while it is
                // written forms the next one, so under load each write
                // and fsync covers many batches.
                let mut group = Vec::new();
                let mut group_bytes = 0;
                // Why the stream ends after the group, and whether to tell
                // the active with a Refuse: the batches before a bad frame
                // are still written and acked.
                let mut failed: Option<(String, bool)> = None;
                let mut next = Some(received);
                while let Some(frame) = next.take() {
                    let Frame::Batch {
                        epoch: e,
                        sequence,
                        bytes,
                    } = frame
                    else {
                        held = Some(frame);
                        break;
                    };
                    if e < max_epoch {
                        failed = Some((format!("batch {sequence} of epoch {e} rejected: this server has seen epoch {max_epoch}"), true));
                        break;
                    }
                    if sequence != expected {
                        failed = Some((
                            format!("replication gap: expected batch {expected}, got {sequence}"),
                            false,
                        ));
                        break;
                    }
                    // The batch keeps the active's sync flag: what the
                    // active made durable (a receipted SEND, a COMMIT) is
                    // fsynced here before the ack, and a batch it only
                    // wrote (an unreceipted ACK) is only written here, and
                    // made durable by the next synced one, as there.
                    match Batch::decode(&bytes) {
                        Ok(batch) => group.push((sequence, batch)),
                        Err(e) => {
                            failed = Some((format!("batch {sequence}: {e}"), false));
                            break;
                        }
                    }
                    max_epoch = e;
                    expected += 1;
                    group_bytes += bytes.len();
                    if group_bytes >= MAX_GROUP_BYTES {
                        break;
                    }
                    next = match futures::FutureExt::now_or_never(receive(&mut rx)) {
                        None => None,
                        Some(Ok(frame)) => Some(frame),
                        Some(Err(e)) => {
                            failed = Some((e, false));
                            break;
                        }
                    };
                }
                if let (Some(&(first, _)), Some(&(last, _))) = (group.first(), group.last()) {
                    // Written here, on the follower's own thread (see
                    // `follow`), under the numbers the active gave: a store
                    // written by someone else since this stream began
                    // refuses the group unwritten, rather than store it one
                    // further on.
                    applied = store.commit_group_now(&group).map_err(|e| {
                        if first == last {
                            format!("applying replicated batch {first}: {e}")
                        } else {
                            format!("applying replicated batches {first}..={last}: {e}")
                        }
                    })?;
                    send(&mut tx, &Frame::Ack { sequence: applied }).await?;
                    if !told_insync && insync_target.is_some_and(|t| applied >= t) {
                        told_insync = true;
                        let _ = events.send(SinkEvent::InSync).await;
                    }
                    if !told_insync && last_report.0.elapsed() >= Duration::from_secs(1) {
                        let rate = (applied - last_report.1) as f64
                            / last_report.0.elapsed().as_secs_f64();
                        last_report = (Instant::now(), applied);
                        let _ = events.send(SinkEvent::Progress { applied, rate }).await;
                    }
                }
                match failed {
                    Some((reason, true)) => return refuse(&mut tx, reason).await,
                    Some((reason, false)) => return Err(reason),
                    None => {}
                }
            }
            Frame::InSync { sequence } => {
                insync_target = Some(sequence);
                if !told_insync && applied >= sequence {
                    told_insync = true;
                    send(&mut tx, &Frame::Ack { sequence: applied }).await?;
                    let _ = events.send(SinkEvent::InSync).await;
                }
            }
            Frame::SnapshotBegin { sequence } => {
                let dir = replica.staging();
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("clearing {}: {e}", dir.display()))?;
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                info!(sequence, "receiving a checkpoint from the active server");
                snapshot = Some((dir, sequence));
            }
            Frame::SnapshotChunk { file, data } => {
                let Some((dir, _)) = &snapshot else {
                    return Err("checkpoint data outside a checkpoint".into());
                };
                if file.contains('/') || file.starts_with('.') {
                    return Err(format!("checkpoint file name {file:?} refused"));
                }
                let path = dir.join(&file);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                f.write_all(&data)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            Frame::SnapshotEnd { sequence } => {
                let Some((dir, begun)) = snapshot.take() else {
                    return Err("checkpoint end without a beginning".into());
                };
                if begun != sequence {
                    return Err(format!("checkpoint {begun} ended as {sequence}"));
                }
                sync_dir_files(&dir)?;
                drop(store);
                // Renames, fsyncs and a RocksDB open: off the
                // runtime, so heartbeats keep flowing meanwhile.
                let installer = replica.clone();
                tokio::task::spawn_blocking(move || installer.install(&dir, keep_old))
                    .await
                    .map_err(|e| format!("installing the checkpoint: {e}"))??;
                store = replica.store();
                if store.last_sequence() != sequence {
                    return Err(format!(
                        "installed checkpoint holds sequence {}, expected {sequence}",
                        store.last_sequence()
                    ));
                }
                expected = sequence + 1;
                applied = sequence;
                max_epoch =
                    max_epoch.max(epoch::position(&*store).map_err(|e| e.to_string())?.epoch);
                send(&mut tx, &Frame::Ack { sequence }).await?;
                let _ = events.send(SinkEvent::SnapshotInstalled { sequence }).await;
            }
            Frame::Refuse { reason } => {
                return Err(format!("the active refused replication: {reason}"))
            }
            other => return Err(format!("unexpected frame from the active: {other:?}")),
        }
        debug!(applied, "replication progress");
    }
}

fn sync_dir_files(dir: &Path) -> Result<(), String> {
    for entry in std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    fmq_store::durable::sync_dir(dir).map_err(|e| format!("syncing {}: {e}", dir.display()))
}

/// Magic first line of a divergent-batches file.
pub const DIVERGED_MAGIC: &[u8] = b"FMQDIVERGED 1\n";

/// Writes this store's batches after `common` to a new file in `dir`:
/// [`DIVERGED_MAGIC`], one JSON header line, then records of sequence
/// (u64 BE), length (u32 BE) and [`Batch::encode`] bytes. Returns the file
/// and how many batches it holds.
pub fn save_divergent(
    store: &dyn Store,
    common: u64,
    position: Position,
    history: &[EpochStart],
    dir: &Path,
) -> Result<(PathBuf, u64), String> {
    fmq_store::durable::create_dir_all(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(format!(
        "diverged-e{}-{}-{}-{}.fmqlog",
        position.epoch,
        common + 1,
        position.sequence,
        now_ms()
    ));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?,
    );
    let first = store.first_logged().max(common + 1);
    let header = serde_json::json!({
        "from": common + 1,
        "to": position.sequence,
        "first_in_file": first,
        "epoch": position.epoch,
        "history": history.iter().map(|e| serde_json::json!({"epoch": e.epoch, "start": e.start, "owner": e.owner})).collect::<Vec<_>>(),
        "saved_ms": now_ms(),
    });
    let io = |e: std::io::Error| format!("writing {}: {e}", path.display());
    out.write_all(DIVERGED_MAGIC).map_err(io)?;
    out.write_all(header.to_string().as_bytes()).map_err(io)?;
    out.write_all(b"\n").map_err(io)?;
    let mut next = first;
    let mut count = 0u64;
    while next <= position.sequence {
        let batches = store
            .read_log(next, LOG_READ_BATCHES, LOG_READ_BYTES)
            .map_err(|e| format!("reading divergent batch {next}: {e}"))?;
        if batches.is_empty() {
            break;
        }
        for b in batches {
            if b.sequence > position.sequence {
                break;
            }
            out.write_all(&b.sequence.to_be_bytes()).map_err(io)?;
            out.write_all(&(b.bytes.len() as u32).to_be_bytes())
                .map_err(io)?;
            out.write_all(&b.bytes).map_err(io)?;
            next = b.sequence + 1;
            count += 1;
        }
    }
    let file = out
        .into_inner()
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    file.sync_all().map_err(io)?;
    // The file's name too: the store directory is replaced right after.
    fmq_store::durable::sync_dir(dir)
        .map_err(|e| format!("syncing the directory {}: {e}", dir.display()))?;
    if first > common + 1 {
        warn!(
            "batches {}..{} of the divergent history are no longer in the batch log; they remain in the old store directory kept aside",
            common + 1,
            first
        );
    }
    Ok((path, count))
}

/// Reads a file written by [`save_divergent`]: its JSON header and batches.
pub fn read_divergent(path: &Path) -> Result<(serde_json::Value, Vec<(u64, Batch)>), String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let rest = data
        .strip_prefix(DIVERGED_MAGIC)
        .ok_or_else(|| format!("{} is not a FerroMQ divergent-batches file", path.display()))?;
    let nl = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| format!("{}: header line missing", path.display()))?;
    let header: serde_json::Value = serde_json::from_slice(&rest[..nl])
        .map_err(|e| format!("{}: bad header: {e}", path.display()))?;
    let mut b = Bytes::copy_from_slice(&rest[nl + 1..]);
    let mut batches = Vec::new();
    while b.has_remaining() {
        let seq = get_u64(&mut b).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = get_u32(&mut b).map_err(|e| format!("{}: {e}", path.display()))? as usize;
        need(&b, len).map_err(|e| format!("{}: batch {seq}: {e}", path.display()))?;
        let batch = Batch::decode(&b.split_to(len))
            .map_err(|e| format!("{}: batch {seq}: {e}", path.display()))?;
        batches.push((seq, batch));
    }
    Ok((header, batches))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_or_never(c: Confirmation) -> Option<bool> {
        futures::FutureExt::now_or_never(c.wait())
    }

    #[test]
    fn acks_release_waiting_commits_in_order_and_a_fence_fails_the_rest() {
        let feed = Feed::new(0, 1);
        // Not required (async, or no passive): settled at once.
        assert_eq!(now_or_never(feed.confirmation(1)), Some(true));
        feed.set_required(true);
        let waiting: Vec<_> = (2..=5).map(|s| feed.confirmation(s)).collect();
        let mut waiting = waiting.into_iter();
        feed.ack(3);
        assert_eq!(now_or_never(waiting.next().expect("2")), Some(true));
        assert_eq!(now_or_never(waiting.next().expect("3")), Some(true));
        let four = waiting.next().expect("4");
        // An old or repeated ack changes nothing.
        feed.ack(2);
        feed.ack(3);
        let mut four = Box::pin(four.wait());
        assert_eq!(futures::FutureExt::now_or_never(&mut four), None);
        // Already acked when asked: confirmed without waiting.
        assert_eq!(now_or_never(feed.confirmation(3)), Some(true));
        feed.fence();
        assert_eq!(futures::FutureExt::now_or_never(&mut four), Some(false));
        assert_eq!(now_or_never(waiting.next().expect("5")), Some(false));
        assert_eq!(now_or_never(feed.confirmation(6)), Some(false));
        assert!(lock(&feed.confirm).waiters.is_empty());
    }

    #[test]
    fn dropping_the_requirement_confirms_the_waiting_commits() {
        let feed = Feed::new(10, 1);
        feed.set_required(true);
        let c = feed.confirmation(11);
        feed.set_required(false);
        assert_eq!(now_or_never(c), Some(true));
    }

    fn put(key: &str) -> Batch {
        let mut b = Batch::new();
        b.put(Cf::Messages, key, "v");
        b
    }

    #[tokio::test]
    async fn a_write_around_the_replicated_store_stops_every_later_commit() {
        let inner = Arc::new(fmq_store::MemoryStore::with_log(100));
        let feed = Feed::new(0, 1);
        let store = ReplicatedStore::new(inner.clone(), feed.clone());
        assert_eq!(store.commit(put("a")).await.expect("commit a"), 1);
        // The number the feed holds is checked before the local store's.
        assert!(matches!(
            store.commit_as(put("x"), 5).await,
            Err(fmq_store::Error::OutOfOrder { wanted: 5, next: 2 })
        ));
        assert_eq!(store.commit_as(put("b"), 2).await.expect("commit b"), 2);
        // A write straight to the local store takes batch 3's place.
        assert_eq!(inner.commit(put("around")).await.expect("around"), 3);
        let Err(fmq_store::Error::Poisoned(reason)) = store.commit(put("c")).await else {
            panic!("batch 3 was not refused");
        };
        assert!(
            reason.contains("batch 3 was shipped")
                && reason.contains("refused it, its next sequence being 4"),
            "{reason}"
        );
        assert_eq!(inner.get(Cf::Messages, b"c").expect("get"), None);
        assert!(feed.acks().fenced);
        // Nothing more goes through, though the numbers line up again.
        assert!(matches!(
            store.commit(put("d")).await,
            Err(fmq_store::Error::Poisoned(r)) if r == reason
        ));
        assert_eq!(inner.last_sequence(), 3);
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Subscribe {
                position: Position {
                    epoch: 3,
                    sequence: 99,
                },
                history: vec![EpochStart {
                    epoch: 3,
                    start: 50,
                    owner: "Primary#ab".into(),
                }],
            },
            Frame::Ack { sequence: 7 },
            Frame::Start {
                epoch: 4,
                plan: Plan::Incremental,
            },
            Frame::Start {
                epoch: 4,
                plan: Plan::Snapshot,
            },
            Frame::Start {
                epoch: 4,
                plan: Plan::Diverged { common: 12 },
            },
            Frame::Batch {
                epoch: 4,
                sequence: 100,
                bytes: Bytes::from_static(b"\x01\x00abc"),
            },
            Frame::SnapshotBegin { sequence: 5 },
            Frame::SnapshotChunk {
                file: "000009.sst".into(),
                data: Bytes::from(vec![0u8; 3000]),
            },
            Frame::SnapshotEnd { sequence: 5 },
            Frame::InSync { sequence: 5 },
            Frame::Refuse {
                reason: "no".into(),
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(f.encode()).expect("decode"), f);
        }
        assert!(Frame::decode(Bytes::from_static(b"\x63")).is_err());
        assert!(Frame::decode(Bytes::from_static(b"\x02\x00")).is_err());
        assert!(Frame::decode(Bytes::from_static(
            b"\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xff\xff\xff\xff"
        ))
        .is_err());
    }

    fn start(epoch: u64, start: u64, owner: &str) -> EpochStart {
        EpochStart {
            epoch,
            start,
            owner: owner.into(),
        }
    }

    #[test]
    fn plans() {
        let ours = vec![start(1, 1, "P"), start(2, 40, "S")];
        // Passive behind in a shared history, log has it: incremental.
        let p = plan(
            &ours,
            100,
            1,
            &ours[..1],
            Position {
                epoch: 1,
                sequence: 30,
            },
        );
        assert_eq!(p, Plan::Incremental);
        // Log truncated past what it needs: snapshot.
        let p = plan(
            &ours,
            100,
            60,
            &ours[..1],
            Position {
                epoch: 1,
                sequence: 30,
            },
        );
        assert_eq!(p, Plan::Snapshot);
        // It went on in epoch 1 after we moved to epoch 2: diverged at 39.
        let p = plan(
            &ours,
            100,
            1,
            &ours[..1],
            Position {
                epoch: 1,
                sequence: 45,
            },
        );
        assert_eq!(p, Plan::Diverged { common: 39 });
        // Its own epoch 2 (different owner) from 40: diverged at 39.
        let theirs = vec![start(1, 1, "P"), start(2, 40, "P")];
        let p = plan(
            &ours,
            100,
            1,
            &theirs,
            Position {
                epoch: 2,
                sequence: 41,
            },
        );
        assert_eq!(p, Plan::Diverged { common: 39 });
        // Up to date.
        let p = plan(
            &ours,
            100,
            90,
            &ours,
            Position {
                epoch: 2,
                sequence: 100,
            },
        );
        assert_eq!(p, Plan::Incremental);
    }
}
