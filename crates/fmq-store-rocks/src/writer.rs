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
//! sequence numbers are handed out by the only code that writes.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use fmq_store::{encode_sequence, Batch, Cf, CommitSender, Error, Op, META_SEQUENCE};
use rocksdb::{WriteBatch, WriteOptions};
use tracing::{error, trace, warn};

use crate::Shared;

/// A batch waiting for the writer, with the sender that resolves its commit.
pub(crate) struct Request {
    pub(crate) batch: Batch,
    pub(crate) done: CommitSender,
}

/// What the writer thread needs besides the shared state.
pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) requests: Receiver<Request>,
    /// Sequence of the last batch written; the next batch gets one more.
    pub(crate) last_sequence: u64,
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
    pub(crate) fn run(mut self) {
        // A request that would have pushed the previous group over the cap:
        // it opens the next group, ahead of anything still in the channel.
        let mut carried: Option<Request> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match self.requests.recv() {
                    Ok(request) => request,
                    Err(_) => break,
                },
            };
            let mut bytes = estimated_bytes(&first.batch);
            let mut group = vec![first];
            while bytes < self.max_group_bytes {
                match self.requests.try_recv() {
                    Ok(request) => {
                        let size = estimated_bytes(&request.batch);
                        if bytes + size > self.max_group_bytes {
                            carried = Some(request);
                            break;
                        }
                        bytes += size;
                        group.push(request);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.write_group(group);
        }
        trace!("store writer stopped");
    }

    /// Writes one group atomically and resolves its commits.
    fn write_group(&mut self, group: Vec<Request>) {
        if let Some(reason) = self.shared.poisoned.get() {
            fail_all(group, &Error::Poisoned(reason.clone()));
            return;
        }

        let first_sequence = self.last_sequence + 1;
        let last_sequence = self.last_sequence + group.len() as u64;
        let want_sync = group.iter().any(|r| r.batch.sync());
        let sync = want_sync && self.sync_enabled;

        let batch = match self.build(&group, last_sequence) {
            Ok(batch) => batch,
            Err(err) => {
                fail_all(group, &err);
                return;
            }
        };
        let size = batch.size_in_bytes();

        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        match self.shared.db.write_opt(batch, &write_options) {
            Ok(()) => {
                self.last_sequence = last_sequence;
                // Publish before resolving: whoever learns sequence N from
                // a commit must see last_sequence() >= N.
                self.shared
                    .last_sequence
                    .store(last_sequence, Ordering::Release);
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
                for (sequence, request) in (first_sequence..).zip(group) {
                    request.done.send(Ok(sequence));
                }
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
                fail_all(group, &Error::Poisoned(reason));
            }
            Err(err) => {
                // An unsynced write failed as a whole: nothing of it was
                // applied, the sequences stay free for the next group.
                warn!(
                    path = %self.shared.path.display(),
                    batches = group.len(),
                    "store write failed: {err}"
                );
                fail_all(group, &crate::error::engine("writing batch", &err));
            }
        }
    }

    /// Builds the single `WriteBatch` of a group: every batch's operations
    /// in commit order, then the sequence of the group's last batch. Every
    /// batch gets its own sequence number; only the last needs storing,
    /// since the group is applied (or lost) as a whole.
    fn build(&self, group: &[Request], last_sequence: u64) -> Result<WriteBatch, Error> {
        let mut batch = WriteBatch::default();
        for request in group {
            for op in request.batch.ops() {
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
        batch.put_cf(
            self.shared.handle(Cf::Meta)?,
            META_SEQUENCE,
            encode_sequence(last_sequence),
        );
        Ok(batch)
    }
}

fn fail_all(group: Vec<Request>, err: &Error) {
    for request in group {
        request.done.send(Err(err.clone()));
    }
}
