//! FerroMQ's persistent store on RocksDB.
//!
//! [`RocksStore`] implements [`fmq_store::Store`]:
//!
//! - one RocksDB column family per [`Cf`], lz4-compressed;
//! - every batch applied atomically together with its sequence number
//!   (kept in [`Cf::Meta`] under [`META_SEQUENCE`]), so after a crash the
//!   stored sequence always names the last batch on disk;
//! - group commit: a single writer thread merges all batches queued while
//!   the previous write was in progress into one `WriteBatch` and one fsync
//!   (see the `writer` module); a caller with a thread of its own may write
//!   a group itself, in turn with that thread
//!   ([`Store::commit_group_now`](fmq_store::Store::commit_group_now));
//! - optionally a batch log ([`Cf::Log`], see
//!   [`RocksOptions::log_retention`]) written in the same `WriteBatch` as the
//!   group, for a passive server's catch-up;
//! - a lock file that keeps a second server off the same directory;
//! - [`RocksStore::checkpoint`], a consistent copy for a passive server's
//!   full resync, which reports the exact sequence it holds.
//!
//! Errors are reported as [`fmq_store::Error`]. A failed synced write poisons
//! the store: every later commit fails with [`Error::Poisoned`], because after
//! a failed fsync nobody can say what reached the disk.

#![forbid(unsafe_code)]
#![deny(clippy::all, missing_docs)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::todo,
    clippy::unimplemented
)]
#![warn(clippy::pedantic, missing_debug_implementations, rust_2018_idioms)]
#![allow(clippy::module_name_repetitions)]

mod error;
mod options;
mod writer;

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;

use fmq_store::{
    decode_sequence, encode_sequence, Batch, Cf, Commit, Error, LoggedBatch, Result, Store,
    META_SEQUENCE,
};
use rocksdb::{Cache, ColumnFamily, ReadOptions, WriteBatch, DB};
use tracing::{debug, error, info, warn};

pub use options::RocksOptions;

use writer::{CheckpointRequest, CommitRequest, Core, Position, Request, Writer};

/// Name of the lock file inside the store directory. RocksDB has its own
/// `LOCK` file, but it is taken only once the database opens; ours is taken
/// first, so a second server fails fast with [`Error::Locked`] and a message
/// an operator understands, before RocksDB touches anything.
const LOCK_FILE: &str = "fmq.lock";

/// Counters of a [`RocksStore`] since it was opened.
///
/// `batches_committed / group_writes` is the mean group size;
/// `synced_writes` against `batches_committed` shows how many fsyncs group
/// commit saved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches applied (each got a sequence number).
    pub batches_committed: u64,
    /// RocksDB writes, one per group.
    pub group_writes: u64,
    /// Group writes that fsynced the write-ahead log.
    pub synced_writes: u64,
    /// Bytes of the `WriteBatch`es written, RocksDB's own encoding.
    pub bytes_written: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches_committed: AtomicU64,
    group_writes: AtomicU64,
    synced_writes: AtomicU64,
    bytes_written: AtomicU64,
}

/// State shared by the store handle and its writer thread.
///
/// Field order matters: fields drop in declaration order, so the database is
/// closed before the lock file is released and no other process can open
/// the directory while RocksDB still writes to it.
struct Shared {
    db: DB,
    path: PathBuf,
    last_sequence: AtomicU64,
    /// Smallest sequence in [`Cf::Log`]; `last_sequence + 1` when it is
    /// empty. Published by the writer after the write that prunes the log,
    /// so it may briefly lag behind the log's real start: readers must
    /// check what they find.
    first_logged: AtomicU64,
    /// [`RocksStore::pause_log`].
    log_paused: AtomicBool,
    /// Set once, by the first failed synced write or WAL sync.
    poisoned: OnceLock<String>,
    stats: Counters,
    _lock: File,
}

impl Shared {
    /// Reads where the batch log starts at open and returns it. A log that
    /// does not end at `sequence` (damaged, or left by a foreign tool) is
    /// discarded: it could not be trusted to match the data, and the writer
    /// extends the log from `sequence + 1` on.
    fn open_log(&self, sequence: u64) -> Result<u64> {
        let log = self.handle(Cf::Log)?;
        let mut iter = self.db.raw_iterator_cf(log);
        iter.seek_to_first();
        let first = iter.key().map(decode_sequence);
        iter.seek_to_last();
        let last = iter.key().map(decode_sequence);
        iter.status()
            .map_err(|e| error::engine("reading the batch log bounds", &e))?;
        drop(iter);
        match (first, last) {
            (None, None) => Ok(sequence + 1),
            (Some(Ok(first)), Some(Ok(last))) if last == sequence && first <= last => Ok(first),
            (first, last) => {
                warn!(
                    path = %self.path.display(),
                    sequence,
                    ?first,
                    ?last,
                    "batch log does not end at the store's sequence; discarding it"
                );
                // Keys are 8 bytes: nine 0xFF bytes sort after all of them.
                let mut batch = WriteBatch::default();
                batch.delete_range_cf(log, [0u8; 8].as_slice(), [0xFF_u8; 9].as_slice());
                self.db
                    .write(batch)
                    .map_err(|e| error::engine("discarding the batch log", &e))?;
                Ok(sequence + 1)
            }
        }
    }

    /// The handle of a FerroMQ column family. All of them are created at
    /// open, so a missing one means a damaged or foreign database.
    fn handle(&self, cf: Cf) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| Error::Corrupt(format!("column family {} is missing", cf.name())))
    }

    fn poison(&self, reason: String) {
        // Only the first reason is kept: later failures are consequences.
        let _ = self.poisoned.set(reason);
    }

    fn check_poisoned(&self) -> Result<()> {
        match self.poisoned.get() {
            Some(reason) => Err(Error::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }
}

/// A [`Store`] on RocksDB with group commit. See the crate documentation.
///
/// Dropping the store stops its writer thread: commits already made still
/// complete (or fail), none is left hanging, then the WAL is synced and the
/// directory unlocked.
pub struct RocksStore {
    shared: Arc<Shared>,
    core: Arc<Core>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.shared.path)
            .field("last_sequence", &self.last_sequence())
            .field("poisoned", &self.shared.poisoned.get())
            .finish_non_exhaustive()
    }
}

impl RocksStore {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] if another store, in this process or another, has
    /// the directory open; [`Error::Io`] or [`Error::Corrupt`] if the
    /// directory or the database cannot be opened.
    pub fn open(dir: &Path, options: RocksOptions) -> Result<RocksStore> {
        // RocksDB syncs the store directory after creating its files, but
        // not the directory's own entry in its parent: without this a power
        // cut soon after the first start could lose the whole store.
        fmq_store::durable::create_dir_all(dir)
            .map_err(|e| error::io(&format!("creating {}", dir.display()), &e))?;
        let lock = lock_dir(dir)?;

        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let db =
            DB::open_cf_descriptors(&options.db_options(), dir, options.column_families(&cache))
                .map_err(|e| error::engine(&format!("opening {}", dir.display()), &e))?;

        let shared = Shared {
            db,
            path: dir.to_path_buf(),
            last_sequence: AtomicU64::new(0),
            first_logged: AtomicU64::new(1),
            log_paused: AtomicBool::new(false),
            poisoned: OnceLock::new(),
            stats: Counters::default(),
            _lock: lock,
        };
        let sequence = match shared
            .db
            .get_cf(shared.handle(Cf::Meta)?, META_SEQUENCE)
            .map_err(|e| error::engine("reading the stored sequence", &e))?
        {
            Some(bytes) => decode_sequence(&bytes)?,
            None => 0,
        };
        shared.last_sequence.store(sequence, Ordering::Release);
        let first_logged = shared.open_log(sequence)?;
        shared.first_logged.store(first_logged, Ordering::Release);
        let shared = Arc::new(shared);

        let (tx, rx) = mpsc::channel();
        let core = Arc::new(Core {
            shared: Arc::clone(&shared),
            position: parking_lot::Mutex::new(Position {
                last_sequence: sequence,
                first_logged,
            }),
            log_retention: options.log_retention,
            sync_enabled: options.sync,
            max_group_bytes: options.max_group_bytes,
        });
        let writer = Writer {
            core: Arc::clone(&core),
            requests: rx,
        };
        let handle = std::thread::Builder::new()
            .name("fmq-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| error::io("starting the store writer thread", &e))?;

        info!(
            path = %dir.display(),
            sequence,
            first_logged,
            log_retention = options.log_retention,
            sync = options.sync,
            recycle_wal_files = options.recycle_wal_files,
            "store opened"
        );
        Ok(RocksStore {
            shared,
            requests: Some(tx),
            writer: Some(handle),
            core,
        })
    }

    /// Writes a consistent copy of the store to `target`, which must not
    /// exist yet, and returns the sequence it holds: every batch up to and
    /// including it, none after, with the batch log as it was then. SST
    /// files are hard-linked when `target` is on the same file system, so
    /// this is cheap even for a large store. Used to seed a passive server:
    /// ship the copy, then replicate the batches after the sequence.
    ///
    /// The writer thread takes the checkpoint between two groups, so this
    /// blocks until the commits queued before it are written, and commits
    /// made meanwhile wait for the checkpoint (which flushes the memtables).
    /// Call it from a blocking context, not from an async task.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if `target` exists or the copy cannot be written,
    /// [`Error::Poisoned`] if the store is, [`Error::Closed`] if its writer
    /// thread is gone.
    pub fn checkpoint(&self, target: &Path) -> Result<u64> {
        self.shared.check_poisoned()?;
        let requests = self.requests.as_ref().ok_or(Error::Closed)?;
        let (done, result) = mpsc::channel();
        let request = Request::Checkpoint(CheckpointRequest {
            target: target.to_path_buf(),
            done,
        });
        requests.send(request).map_err(|_| Error::Closed)?;
        // A dropped sender means the writer thread died before answering.
        result.recv().unwrap_or(Err(Error::Closed))
    }

    /// Stops (or resumes) keeping the batch log. While paused, batches are
    /// not logged and the next write empties the log; after resuming, the
    /// log starts afresh at the next batch. A replicated-HA passive pauses
    /// it: its batches are the active's, which keeps them itself, and not
    /// logging them halves what the passive writes per batch. A paused log
    /// only costs a later peer a checkpoint instead of an incremental
    /// catch-up for batches from before this server became active.
    pub fn pause_log(&self, paused: bool) {
        self.shared.log_paused.store(paused, Ordering::Release);
    }

    /// Counters since open.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.stats;
        StoreStats {
            batches_committed: c.batches_committed.load(Ordering::Relaxed),
            group_writes: c.group_writes.load(Ordering::Relaxed),
            synced_writes: c.synced_writes.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// The store directory, as given to [`RocksStore::open`].
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues `batch` for the writer thread, which checks `wanted` (see
    /// [`Store::commit_as`]).
    fn submit(&self, batch: Batch, wanted: Option<u64>) -> Commit {
        if let Err(err) = self.shared.check_poisoned() {
            return Commit::ready(Err(err));
        }
        let Some(requests) = &self.requests else {
            return Commit::ready(Err(Error::Closed));
        };
        let (done, commit) = Commit::pending();
        let request = Request::Commit(CommitRequest {
            batch,
            wanted,
            done,
        });
        if let Err(mpsc::SendError(Request::Commit(request))) = requests.send(request) {
            // The writer thread is gone (it can only have panicked).
            request.done.send(Err(Error::Closed));
        }
        commit
    }
}

/// Creates or opens `DIR/fmq.lock` and takes an exclusive lock on it. The
/// lock belongs to the open file, so it lasts as long as the returned `File`
/// and the kernel drops it when the process dies, even by SIGKILL: a crashed
/// server never leaves a stale lock behind.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| error::io(&format!("opening {}", path.display()), &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(Error::Locked {
                path: dir.display().to_string(),
            })
        }
        Err(TryLockError::Error(e)) => {
            return Err(error::io(&format!("locking {}", path.display()), &e))
        }
    }
    // The pid is for the operator who finds the directory locked; nothing
    // reads it, so failing to write it is not worth refusing to start.
    if let Err(e) = file
        .set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
    {
        warn!(path = %path.display(), "could not record pid in lock file: {e}");
    }
    Ok(file)
}

/// The smallest key greater than every key starting with `prefix`, if any:
/// the prefix with its last non-0xFF byte incremented and the rest dropped.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

impl Store for RocksStore {
    fn commit(&self, batch: Batch) -> Commit {
        self.submit(batch, None)
    }

    fn commit_as(&self, batch: Batch, sequence: u64) -> Commit {
        self.submit(batch, Some(sequence))
    }

    fn commit_group_now(&self, batches: &[(u64, Batch)]) -> Result<u64> {
        self.shared.check_poisoned()?;
        let mut position = self.core.position.lock();
        let last = fmq_store::check_group(position.last_sequence, batches)?;
        let group: Vec<&Batch> = batches.iter().map(|(_, batch)| batch).collect();
        self.core.write_group(&mut position, &group)?;
        Ok(last)
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.shared
            .db
            .get_cf(self.shared.handle(cf)?, key)
            .map_err(|e| error::engine(&format!("reading {}", cf.name()), &e))
    }

    fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut read_options = ReadOptions::default();
        // The bound lets RocksDB stop at the end of the prefix instead of
        // stepping over the tombstones of consumed messages beyond it.
        if let Some(bound) = prefix_upper_bound(prefix) {
            read_options.set_iterate_upper_bound(bound);
        }
        // The iterator reads from an implicit snapshot, so `f` may commit to
        // or read from the store without disturbing the scan.
        let mut iter = self
            .shared
            .db
            .raw_iterator_cf_opt(self.shared.handle(cf)?, read_options);
        iter.seek(prefix);
        while iter.valid() {
            match (iter.key(), iter.value()) {
                (Some(key), Some(value)) if key.starts_with(prefix) => f(key, value)?,
                _ => break,
            }
            iter.next();
        }
        iter.status()
            .map_err(|e| error::engine(&format!("scanning {}", cf.name()), &e))
    }

    fn last_sequence(&self) -> u64 {
        self.shared.last_sequence.load(Ordering::Acquire)
    }

    /// Syncs the write-ahead log, making every batch written so far durable,
    /// synced or not. A failure poisons the store, like a failed synced write.
    fn sync(&self) -> Result<()> {
        self.shared.check_poisoned()?;
        if let Err(err) = self.shared.db.flush_wal(true) {
            let reason = format!("WAL sync failed: {err}");
            error!(path = %self.shared.path.display(), "{reason}; store poisoned");
            self.shared.poison(reason.clone());
            return Err(Error::Poisoned(reason));
        }
        Ok(())
    }

    fn settled(&self) -> Commit {
        let Some(requests) = &self.requests else {
            return Commit::ready(Err(Error::Closed));
        };
        let (done, commit) = Commit::pending();
        if let Err(mpsc::SendError(Request::Settled(done))) = requests.send(Request::Settled(done))
        {
            done.send(Err(Error::Closed));
        }
        commit
    }

    fn first_logged(&self) -> u64 {
        self.shared.first_logged.load(Ordering::Acquire)
    }

    fn read_log(
        &self,
        from: u64,
        max_batches: usize,
        max_bytes: usize,
    ) -> Result<Vec<LoggedBatch>> {
        // The sequence first: the writer publishes it before first_logged,
        // so a first_logged() read afterwards that is above `from` means
        // the log really has moved past it.
        let last = self.last_sequence();
        if from > last {
            return Ok(Vec::new());
        }
        let first = self.first_logged();
        if from < first {
            return Err(Error::Truncated { from, first });
        }
        let mut read_options = ReadOptions::default();
        // Batches written but not yet published stay out of this read.
        read_options.set_iterate_upper_bound(encode_sequence(last + 1));
        // The iterator reads from an implicit snapshot: a concurrent prune
        // either removed the whole range before it or none of it.
        let mut iter = self
            .shared
            .db
            .raw_iterator_cf_opt(self.shared.handle(Cf::Log)?, read_options);
        iter.seek(encode_sequence(from));
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut expected = from;
        while out.len() < max_batches && iter.valid() {
            let (Some(key), Some(value)) = (iter.key(), iter.value()) else {
                break;
            };
            let sequence = decode_sequence(key)?;
            if sequence != expected {
                if out.is_empty() && sequence > from {
                    // Pruned after first_logged was read, and before the
                    // writer published the new start.
                    return Err(Error::Truncated {
                        from,
                        first: sequence,
                    });
                }
                return Err(Error::Corrupt(format!(
                    "batch log has batch {sequence} where {expected} belongs"
                )));
            }
            if !out.is_empty() && bytes.saturating_add(value.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(value.len());
            out.push(LoggedBatch {
                sequence,
                bytes: value.to_vec(),
            });
            expected += 1;
            iter.next();
        }
        iter.status()
            .map_err(|e| error::engine("reading the batch log", &e))?;
        if out.is_empty() && max_batches > 0 {
            // Nothing at all in from..=last: emptied (no retention) after
            // first_logged was read.
            let first = self.first_logged().max(last + 1);
            return Err(Error::Truncated { from, first });
        }
        Ok(out)
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued and stop.
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                // Its queued commits were dropped and resolve as Closed.
                error!(path = %self.shared.path.display(), "store writer thread panicked");
            }
        }
        // Unsynced batches become durable on a clean shutdown too.
        if self.shared.poisoned.get().is_none() {
            if let Err(err) = self.shared.db.flush_wal(true) {
                error!(path = %self.shared.path.display(), "WAL sync at close failed: {err}");
            }
        }
        debug!(path = %self.shared.path.display(), "store closed");
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn upper_bound_of_prefixes() {
        assert_eq!(prefix_upper_bound(b""), None);
        assert_eq!(prefix_upper_bound(b"q1/"), Some(b"q10".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff"), None);
    }
}
