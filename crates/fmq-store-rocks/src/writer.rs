//! The group-commit writer thread.
//!
//! Every commit goes through one thread. It blocks for the first queued
//! request, then takes everything else already waiting (up to
//! [`RocksOptions::max_group_bytes`](crate::RocksOptions::max_group_bytes))
//! and writes the whole group as one RocksDB `WriteBatch`, with one fsync if
//! any batch in it asked for a sync. While that fsync is in the kernel new
//! commits pile up in the channel and share the next one, so under load the
//! number of fsyncs grows with the number of groups, not of messages.
//!
//! A single thread also gives the ordering guarantee for free: requests are
//! applied in channel order, which is the order of the `commit` calls, and
//! sequence numbers are handed out by the only code that writes. That is
//! also where a batch committed with `commit_as` is checked against the
//! number it must get, before it joins a group.
//!
//! The same thread keeps the batch log ([`Cf::Log`]): each batch's encoded
//! bytes go into the group's `WriteBatch` under its sequence, and pruning
//! rides along as a range delete, so the log and the data never disagree.
//! It also takes checkpoints between two groups, which is what makes the
//! sequence a checkpoint reports exact.
//!
//! A caller with a thread of its own may also write a group itself
//! ([`RocksStore::commit_group_now`](crate::RocksStore::commit_group_now)),
//! skipping the hand-off to this thread and back. The numbering state
//! ([`Position`]) is behind a mutex that the writer thread holds from
//! taking a group's first request until the group is written, and such a
//! caller for its whole group, so the two never interleave.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use parking_lot::Mutex;

use fmq_store::{encode_sequence, Batch, Cf, CommitSender, Error, Op, META_SEQUENCE};
use rocksdb::{checkpoint::Checkpoint, WriteBatch, WriteOptions};
use tracing::{debug, error, trace, warn};

use crate::Shared;

/// Work for the writer thread, in the order it must be done.
pub(crate) enum Request {
    /// A batch to apply.
    Commit(CommitRequest),
    /// A checkpoint to take once everything queued before it is written.
    Checkpoint(CheckpointRequest),
    /// Answered with the last sequence once everything queued before it is
    /// written.
    Settled(CommitSender),
}

/// A batch waiting for the writer, with the sender that resolves its commit.
pub(crate) struct CommitRequest {
    pub(crate) batch: Batch,
    /// The sequence the batch must get ([`Store::commit_as`]), if any.
    ///
    /// [`Store::commit_as`]: fmq_store::Store::commit_as
    pub(crate) wanted: Option<u64>,
    pub(crate) done: CommitSender,
}

impl CommitRequest {
    /// The request, if it may be written as sequence `next`. One that must
    /// have another sequence is failed here, before anything of it is
    /// written: the writer is the only place that knows which number a
    /// batch gets.
    fn admit(self, next: u64) -> Option<CommitRequest> {
        match self.wanted {
            Some(wanted) if wanted != next => {
                self.done.send(Err(Error::OutOfOrder { wanted, next }));
                None
            }
            _ => Some(self),
        }
    }
}

/// Where to write a checkpoint, and where to send its sequence.
pub(crate) struct CheckpointRequest {
    pub(crate) target: PathBuf,
    pub(crate) done: Sender<Result<u64, Error>>,
}

/// The writer thread: its queue, and what every group writer shares.
pub(crate) struct Writer {
    pub(crate) core: Arc<Core>,
    pub(crate) requests: Receiver<Request>,
}

/// Where the store's numbering stands. Whoever writes a group holds it
/// locked from admitting the group's first batch until the group is
/// written.
pub(crate) struct Position {
    /// Sequence of the last batch written; the next batch gets one more.
    pub(crate) last_sequence: u64,
    /// Smallest sequence in the batch log, `last_sequence + 1` when empty.
    pub(crate) first_logged: u64,
}

/// What writing a group needs: the shared state, the write settings and
/// the numbering.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) position: Mutex<Position>,
    /// [`RocksOptions::log_retention`](crate::RocksOptions::log_retention).
    pub(crate) log_retention: u64,
    /// [`RocksOptions::sync`](crate::RocksOptions::sync).
    pub(crate) sync_enabled: bool,
    /// [`RocksOptions::max_group_bytes`](crate::RocksOptions::max_group_bytes).
    pub(crate) max_group_bytes: usize,
}

/// Rough encoded size of a batch, for the group cap. It needs to be neither
/// exact nor cheap to get wrong: it only decides where one group ends.
fn estimated_bytes(batch: &Batch) -> usize {
    batch
        .ops()
        .iter()
        .map(|op| match op {
            Op::Put { key, value, .. } => key.len() + value.len() + 12,
            Op::Delete { key, .. } => key.len() + 8,
        })
        .sum::<usize>()
        + 16
}

impl Writer {
    /// Runs until every [`RocksStore`](crate::RocksStore) handle on the
    /// channel is gone and the queue is drained: commits made before the
    /// store was dropped still complete.
    pub(crate) fn run(self) {
        let core = &*self.core;
        // A request that would have pushed the previous group over the cap:
        // it opens the next group, ahead of anything still in the channel.
        // A checkpoint request also ends a group, so that it sees exactly
        // the commits made before it.
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match self.requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            // Held until this request is done: a group written on another
            // thread ends before it, or starts after it.
            let mut position = core.position.lock();
            let first = match first {
                Request::Commit(request) => match request.admit(position.last_sequence + 1) {
                    Some(request) => request,
                    None => continue,
                },
                Request::Checkpoint(request) => {
                    core.checkpoint(&position, &request);
                    continue;
                }
                Request::Settled(done) => {
                    done.send(Ok(position.last_sequence));
                    continue;
                }
            };
            let mut bytes = estimated_bytes(&first.batch);
            let mut group = vec![first];
            while bytes < core.max_group_bytes {
                match self.requests.try_recv() {
                    Ok(Request::Commit(request)) => {
                        let size = estimated_bytes(&request.batch);
                        if bytes + size > core.max_group_bytes {
                            carried = Some(Request::Commit(request));
                            break;
                        }
                        let next = position.last_sequence + 1 + group.len() as u64;
                        if let Some(request) = request.admit(next) {
                            bytes += size;
                            group.push(request);
                        }
                    }
                    Ok(request @ (Request::Checkpoint(_) | Request::Settled(_))) => {
                        carried = Some(request);
                        break;
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let batches: Vec<&Batch> = group.iter().map(|r| &r.batch).collect();
            match core.write_group(&mut position, &batches) {
                Ok(first_sequence) => {
                    for (sequence, request) in (first_sequence..).zip(group) {
                        request.done.send(Ok(sequence));
                    }
                }
                Err(err) => fail_all(group, &err),
            }
        }
        trace!("store writer stopped");
    }
}

impl Core {
    /// Takes a checkpoint between two groups: everything up to
    /// `last_sequence` is in it and nothing after, because nothing else is
    /// written meanwhile. Commits queue up while it runs.
    fn checkpoint(&self, position: &Position, request: &CheckpointRequest) {
        let target = &request.target;
        let result = self.shared.check_poisoned().and_then(|()| {
            let checkpoint = Checkpoint::new(&self.shared.db)
                .map_err(|e| crate::error::engine("preparing a checkpoint", &e))?;
            checkpoint.create_checkpoint(target).map_err(|e| {
                crate::error::engine(&format!("checkpoint to {}", target.display()), &e)
            })?;
            Ok(position.last_sequence)
        });
        if let Ok(sequence) = &result {
            debug!(target = %target.display(), sequence, "checkpoint written");
        }
        // The caller may have given up waiting; the checkpoint stays.
        let _ = request.done.send(result);
    }

    /// The first sequence the batch log keeps once the batches up to `last`
    /// are written: never fewer than `log_retention` batches, pruned only
    /// once `max(retention / 8, 64)` more have piled up, so the range delete
    /// (and the tombstone compaction must clear) comes once per many groups.
    /// Without retention the log is emptied, so it never holds a stale range
    /// with a gap after it.
    fn first_logged_after(position: &Position, last: u64, retention: u64) -> u64 {
        if retention == 0 {
            return last + 1;
        }
        let logged = last - position.first_logged + 1;
        let slack = (retention / 8).max(64);
        if logged > retention.saturating_add(slack) {
            last - retention + 1
        } else {
            position.first_logged
        }
    }

    /// Writes `group` atomically as the sequences after
    /// `position.last_sequence`, and returns the first of them. It is
    /// written whole or not at all: on an error nothing of it is stored.
    pub(crate) fn write_group(
        &self,
        position: &mut Position,
        group: &[&Batch],
    ) -> Result<u64, Error> {
        if let Some(reason) = self.shared.poisoned.get() {
            return Err(Error::Poisoned(reason.clone()));
        }

        let first_sequence = position.last_sequence + 1;
        let last_sequence = position.last_sequence + group.len() as u64;
        let want_sync = group.iter().any(|b| b.sync());
        let sync = want_sync && self.sync_enabled;

        // A paused log keeps nothing (and empties itself), as with no
        // retention at all.
        let retention = if self.shared.log_paused.load(Ordering::Acquire) {
            0
        } else {
            self.log_retention
        };
        let first_logged = Self::first_logged_after(position, last_sequence, retention);
        let batch = self.build(
            position,
            group,
            first_sequence,
            last_sequence,
            first_logged,
            retention,
        )?;
        let size = batch.size_in_bytes();

        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        match self.shared.db.write_opt(batch, &write_options) {
            Ok(()) => {
                position.last_sequence = last_sequence;
                position.first_logged = first_logged;
                // Publish before resolving: whoever learns sequence N from
                // a commit must see last_sequence() >= N. The sequence goes
                // first, so first_logged() never exceeds last_sequence() + 1.
                self.shared
                    .last_sequence
                    .store(last_sequence, Ordering::Release);
                self.shared
                    .first_logged
                    .store(first_logged, Ordering::Release);
                let stats = &self.shared.stats;
                stats
                    .batches_committed
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                stats.group_writes.fetch_add(1, Ordering::Relaxed);
                if sync {
                    stats.synced_writes.fetch_add(1, Ordering::Relaxed);
                }
                stats
                    .bytes_written
                    .fetch_add(size as u64, Ordering::Relaxed);
                trace!(
                    batches = group.len(),
                    bytes = size,
                    sync,
                    last_sequence,
                    "group written"
                );
                Ok(first_sequence)
            }
            Err(err) if sync => {
                // The fsync (or the write before it) failed. The kernel may
                // have dropped the dirty pages, so a retry could "succeed"
                // without the data ever reaching the disk. Refuse all later
                // writes; the server must restart and recover from disk.
                let reason = format!(
                    "synced write of sequences {first_sequence}..={last_sequence} failed: {err}"
                );
                error!(path = %self.shared.path.display(), "{reason}; store poisoned");
                self.shared.poison(reason.clone());
                Err(Error::Poisoned(reason))
            }
            Err(err) => {
                // An unsynced write failed as a whole: nothing of it was
                // applied, the sequences stay free for the next group.
                warn!(
                    path = %self.shared.path.display(),
                    batches = group.len(),
                    "store write failed: {err}"
                );
                Err(crate::error::engine("writing batch", &err))
            }
        }
    }

    /// Builds the single `WriteBatch` of a group: every batch's operations
    /// in commit order, then the sequence of the group's last batch. Every
    /// batch gets its own sequence number; only the last needs storing,
    /// since the group is applied (or lost) as a whole. With a batch log,
    /// each batch's encoding is put under its sequence (from
    /// `first_sequence` on), and the log entries below `first_logged` are
    /// range-deleted.
    fn build(
        &self,
        position: &Position,
        group: &[&Batch],
        first_sequence: u64,
        last_sequence: u64,
        first_logged: u64,
        retention: u64,
    ) -> Result<WriteBatch, Error> {
        let mut batch = WriteBatch::default();
        for part in group {
            for op in part.ops() {
                match op {
                    Op::Put { cf, key, value } => {
                        batch.put_cf(self.shared.handle(*cf)?, key, value);
                    }
                    Op::Delete { cf, key } => {
                        batch.delete_cf(self.shared.handle(*cf)?, key);
                    }
                }
            }
        }
        // Entries logged by earlier groups that fall out of the log. This
        // group's own batches below `first_logged` are simply not logged.
        let pruned_end = first_logged.min(first_sequence);
        if position.first_logged < pruned_end {
            batch.delete_range_cf(
                self.shared.handle(Cf::Log)?,
                encode_sequence(position.first_logged),
                encode_sequence(pruned_end),
            );
        }
        if retention > 0 {
            let log = self.shared.handle(Cf::Log)?;
            for (sequence, logged) in (first_sequence..).zip(group) {
                if sequence >= first_logged {
                    batch.put_cf(log, encode_sequence(sequence), logged.encode());
                }
            }
        }
        batch.put_cf(
            self.shared.handle(Cf::Meta)?,
            META_SEQUENCE,
            encode_sequence(last_sequence),
        );
        Ok(batch)
    }
}

fn fail_all(group: Vec<CommitRequest>, err: &Error) {
    for request in group {
        request.done.send(Err(err.clone()));
    }
}
