//! FerroMQ's storage abstraction.
//!
//! The broker keeps every durable object (messages, queue entries, durable
//! subscriptions, principals, ACLs, destinations, metadata) in a [`Store`].
//! All changes go through [`Store::commit`] as one atomic [`Batch`], which gets
//! the next sequence number: that ordered stream of batches is also what
//! replication ships to a passive server.
//!
//! For replication a store can also keep the most recent batches in a batch
//! log ([`Cf::Log`], read with [`Store::read_log`]), so a passive server that
//! fell behind or diverged catches up without a full copy, and the epoch
//! history kept by [`epoch`] tells two servers where their histories fork.
//!
//! This crate has no storage-engine dependency. `fmq-store-rocks` implements
//! the trait on RocksDB; [`memory::MemoryStore`] implements it in memory so
//! broker and HA tests run in milliseconds.

#![warn(missing_docs)]

pub mod batch;
pub mod dedupe;
pub mod durable;
pub mod epoch;
pub mod error;
pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub use batch::{Batch, Cf, Op};
pub use epoch::{
    common_prefix, history, mark_epoch, position, EpochStart, Position, META_EPOCH,
    META_EPOCHS_PREFIX,
};
pub use error::{Error, Result};
pub use memory::MemoryStore;

/// Key in [`Cf::Meta`] under which every store keeps the sequence number of
/// the last applied batch (8 bytes, big-endian).
pub const META_SEQUENCE: &[u8] = b"sequence";

/// A key-value store with atomic, ordered, group-committed batches.
///
/// Implementations must:
/// - apply batches in the order `commit` (or `commit_as`) was called, each
///   atomically;
/// - check a `commit_as` batch's sequence where sequences are handed out,
///   before anything of it is written;
/// - give each applied batch the next sequence number and persist it in
///   [`Cf::Meta`] under [`META_SEQUENCE`] within the same atomic write;
/// - resolve the returned [`Commit`] only after the batch (and everything
///   before it) is durable when [`Batch::sync`] is set;
/// - share one sync among batches that arrive while a sync is in progress
///   (group commit), so throughput is not bounded by one fsync per batch;
/// - when they keep a batch log, write each batch's [`Batch::encode`] bytes
///   to [`Cf::Log`] under its sequence number in the same atomic write, so
///   the log always holds exactly the batches
///   `first_logged()..=last_sequence()`, with no gap.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Queues `batch` for atomic application. The returned future resolves to
    /// the batch's sequence number once it is applied (and synced if asked).
    fn commit(&self, batch: Batch) -> Commit;

    /// Like [`commit`](Store::commit), for a batch that already has its
    /// number: one replicated from another store, or numbered by a wrapper.
    /// The batch is applied only if it gets exactly `sequence`; otherwise
    /// the commit fails with [`Error::OutOfOrder`] and nothing of it is
    /// written, so a second writer racing the first cannot make the store
    /// hold a batch under another number than its source gave it.
    fn commit_as(&self, batch: Batch, sequence: u64) -> Commit;

    /// Writes `batches`, each under the sequence it comes with, as one
    /// atomic group on the calling thread, and returns the last sequence
    /// once the group is applied (and synced, if any batch asks). The
    /// sequences must run on from [`last_sequence`](Store::last_sequence)
    /// without a gap; otherwise it fails with [`Error::OutOfOrder`] and
    /// writes nothing. `batches` must not be empty.
    ///
    /// It blocks for the whole write, fsync included: it is for a caller
    /// with a thread of its own that writes in bulk (a passive server
    /// applying replicated batches), which so skips the hand-off to the
    /// store's writer and back. Commits queued before the call may be
    /// written before or after the group, never inside it.
    ///
    /// The default refuses: a store that wraps another, and must see every
    /// batch go through its own numbering, cannot write around it.
    fn commit_group_now(&self, batches: &[(u64, Batch)]) -> Result<u64> {
        let _ = batches;
        Err(Error::Io(format!(
            "{self:?} cannot write a group on the calling thread"
        )))
    }

    /// Reads one key.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Calls `f` for every key of `cf` that starts with `prefix`, in key
    /// order. Used for recovery and admin listings, not on hot paths.
    #[allow(clippy::type_complexity)] // a visitor; an alias would change its object lifetime
    fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()>;

    /// Sequence number of the last applied batch (0 for an empty store).
    fn last_sequence(&self) -> u64;

    /// Makes everything applied so far durable.
    fn sync(&self) -> Result<()>;

    /// Resolves, with the last sequence then, once every commit made before
    /// this call has been applied (or has failed). Writes nothing. A store
    /// that applies commits before `commit` returns is always settled.
    fn settled(&self) -> Commit {
        Commit::ready(Ok(self.last_sequence()))
    }

    /// Smallest sequence still in the batch log; `last_sequence() + 1` when
    /// the log is empty or the store keeps none.
    fn first_logged(&self) -> u64;

    /// Batches from the batch log with sequence `>= from`, in order: at most
    /// `max_batches` of them, and no more than `max_bytes` of encoded bytes in
    /// total, except that the first batch is returned even if it alone is
    /// larger (so a reader always makes progress). Never returns batches past
    /// the `last_sequence()` seen when called.
    ///
    /// # Errors
    ///
    /// Returns `Ok` with no batches if `from > last_sequence()`, and
    /// [`Error::Truncated`] if `from < first_logged()`: the batches asked for
    /// are gone (or were never logged) and the reader needs a full copy.
    fn read_log(&self, from: u64, max_batches: usize, max_bytes: usize)
        -> Result<Vec<LoggedBatch>>;
}

/// One batch read back from the batch log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedBatch {
    /// The sequence number the batch got when it was applied.
    pub sequence: u64,
    /// The batch as [`Batch::encode`] made it; [`Batch::decode`] reads it.
    pub bytes: Vec<u8>,
}

/// The pending result of [`Store::commit`].
#[derive(Debug)]
pub struct Commit(CommitInner);

enum CommitInner {
    Ready(Option<Result<u64>>),
    Pending(tokio::sync::oneshot::Receiver<Result<u64>>),
    Future(Pin<Box<dyn Future<Output = Result<u64>> + Send>>),
}

impl std::fmt::Debug for CommitInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitInner::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            CommitInner::Pending(rx) => f.debug_tuple("Pending").field(rx).finish(),
            CommitInner::Future(_) => f.write_str("Future"),
        }
    }
}

impl Commit {
    /// A commit that has already completed.
    pub fn ready(result: Result<u64>) -> Self {
        Commit(CommitInner::Ready(Some(result)))
    }

    /// A commit completed by the sender paired with the returned receiver.
    pub fn pending() -> (CommitSender, Self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (CommitSender(tx), Commit(CommitInner::Pending(rx)))
    }

    /// A commit completed by `future`, which runs only while the commit is
    /// polled: for stores that wrap another store's commit (the batch is
    /// already on its way whether or not anyone waits for the result).
    pub fn from_future(future: impl Future<Output = Result<u64>> + Send + 'static) -> Self {
        Commit(CommitInner::Future(Box::pin(future)))
    }
}

impl Future for Commit {
    type Output = Result<u64>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            CommitInner::Ready(result) => Poll::Ready(result.take().unwrap_or(Err(Error::Closed))),
            CommitInner::Pending(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(Error::Closed))),
            CommitInner::Future(future) => future.as_mut().poll(cx),
        }
    }
}

/// Completes a [`Commit`] made by [`Commit::pending`].
#[derive(Debug)]
pub struct CommitSender(tokio::sync::oneshot::Sender<Result<u64>>);

impl CommitSender {
    /// Resolves the paired commit. A dropped receiver is not an error: the
    /// batch is applied whether or not anyone waits for it.
    pub fn send(self, result: Result<u64>) {
        let _ = self.0.send(result);
    }
}

/// Checks that `batches` run on from `last` without a gap, as
/// [`Store::commit_group_now`] needs, and returns the last of them.
///
/// # Errors
///
/// [`Error::OutOfOrder`] for the first batch numbered otherwise, and for
/// an empty group.
pub fn check_group(last: u64, batches: &[(u64, Batch)]) -> Result<u64> {
    if batches.is_empty() {
        return Err(Error::Io("an empty group of batches to write".into()));
    }
    for (next, (wanted, _)) in (last + 1..).zip(batches) {
        if *wanted != next {
            return Err(Error::OutOfOrder {
                wanted: *wanted,
                next,
            });
        }
    }
    Ok(last + batches.len() as u64)
}

/// Encodes a sequence number the way stores keep it under [`META_SEQUENCE`],
/// and the way [`Cf::Log`] keys are made.
pub fn encode_sequence(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Decodes a value kept under [`META_SEQUENCE`].
pub fn decode_sequence(bytes: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| Error::Corrupt(format!("sequence of {} bytes, expected 8", bytes.len())))?;
    Ok(u64::from_be_bytes(arr))
}
