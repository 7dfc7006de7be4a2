//! The local send buffer: persistent sends that no server has receipted
//! yet, kept on disk until one does.
//!
//! # What goes in
//!
//! A persistent send made while no server is reachable, or whose RECEIPT
//! did not come back before the connection dropped, is appended here and
//! the send returns [`SendOutcome::Buffered`](super::SendOutcome). When a
//! server accepts the connection, the buffered sends are replayed in the
//! order they were appended, each with the producer id and sequence number
//! it was given at first (so a broker that already stored it drops the copy),
//! and each is removed once its RECEIPT arrives. While anything is buffered,
//! later persistent sends join the end of the buffer instead of overtaking
//! it. The buffer also keeps, per producer, its producer id and how far its
//! sequence numbers may have been used, so a restarted client continues them.
//!
//! # File format
//!
//! The directory holds `outbox.log` and a `lock` file; `lock` is locked
//! (`File::try_lock`) by the connection that has the directory open, so a
//! second connection (or process) on the same directory is refused.
//!
//! `outbox.log` is an append-only log: the 12-byte header `FMQSENDB` +
//! version (u32 LE, 1), then records, each
//!
//! ```text
//! u32 LE  length of the payload
//! u32 LE  CRC-32 (IEEE) of the payload
//! payload: u8 kind, then the kind's fields
//!   1 SEND      u64 local id, str producer id, u64 sequence,
//!               str destination, u32 n + n × (str name, str value), bytes body
//!   2 DONE      u64 local id                (that SEND was receipted)
//!   3 PRODUCER  str key, str producer id, u64 reserved
//!               (sequences up to `reserved` may have been used)
//! str / bytes = u32 LE length + the bytes (str is UTF-8)
//! ```
//!
//! Opening reads the log from the start. A record that is cut short, longer
//! than the limit, fails its CRC or does not decode ends the log: it and
//! everything after it are dropped with a warning (a crash in the middle of
//! an append leaves exactly such a torn tail; that send had not been
//! reported as buffered). The log is then *compacted*: written afresh to
//! `outbox.log.tmp` with one PRODUCER record per producer and the pending
//! SENDs, synced, renamed over `outbox.log`, and the directory synced. The
//! same compaction runs while connected once receipted records take more
//! than [`COMPACT_MIN_DEAD`] bytes and outweigh the pending ones.
//!
//! # When it syncs
//!
//! * SEND: the record is written and `fdatasync`ed before the send returns
//!   `Buffered`; a buffered send survives a crash of the client process and
//!   of the machine.
//! * PRODUCER: written and synced before the sequence numbers it reserves
//!   are used. Sequences are reserved [`SEQUENCE_BLOCK`] at a time, so a
//!   producer that sends straight to the broker syncs once per block.
//! * DONE: written without a sync. Losing DONE records in a crash only
//!   means those sends are replayed once more, which the broker's once-only
//!   check (same producer id and sequence) turns into no-ops. They are synced
//!   by compaction and when the connection closes.
//! * Compaction: the new file and the directory are synced around the
//!   rename, so either the old or the new log is found after a crash.
//!
//! Without a directory the buffer lives in memory: the same limits and
//! order, but nothing survives the process, and producer ids get a random
//! part so that a restarted process is never taken for a duplicate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::error::{Error, Result};

/// File header: magic and format version.
const MAGIC: &[u8; 8] = b"FMQSENDB";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
/// Record header: length and CRC.
const RECORD_HEADER: u64 = 8;
/// Largest payload accepted when reading; anything longer is corruption.
pub(crate) const MAX_RECORD: usize = 64 << 20;
/// Sequence numbers reserved per PRODUCER record.
pub(crate) const SEQUENCE_BLOCK: u64 = 1000;
/// Receipted bytes the log may carry before it is compacted.
pub(crate) const COMPACT_MIN_DEAD: u64 = 1 << 20;
/// Longest producer id the broker accepts.
const MAX_PRODUCER_ID: usize = 128;

const KIND_SEND: u8 = 1;
const KIND_DONE: u8 = 2;
const KIND_PRODUCER: u8 = 3;

const LOG_FILE: &str = "outbox.log";
const TMP_FILE: &str = "outbox.log.tmp";
const LOCK_FILE: &str = "lock";

/// A persistent send, as buffered and replayed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SendRecord {
    /// `fmq-producer-id`.
    pub producer_id: String,
    /// `fmq-sequence`.
    pub sequence: u64,
    /// SEND `destination`.
    pub destination: String,
    /// Every other SEND header, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// How much the buffer may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most pending sends.
    pub max_records: usize,
    /// Most bytes of pending sends (encoded size).
    pub max_bytes: u64,
}

/// What opening found.
#[derive(Debug, Default, Clone)]
pub(crate) struct Recovery {
    /// Pending sends found.
    pub pending: usize,
    /// Bytes dropped from a torn or corrupt tail.
    pub dropped_bytes: u64,
    /// Why the tail was dropped, if it was.
    pub warning: Option<String>,
}

#[derive(Debug)]
struct Pending {
    local: u64,
    record: Arc<SendRecord>,
    size: u64,
}

#[derive(Debug, Clone)]
struct ProducerState {
    id: String,
    /// The next sequence to hand out.
    next: u64,
    /// Every sequence up to this one may have been used (persisted).
    reserved: u64,
}

#[derive(Debug)]
struct State {
    pending: VecDeque<Pending>,
    pending_bytes: u64,
    next_local: u64,
    /// Whether sends may go straight to the broker (a server is connected
    /// and the buffer has been drained on it).
    live: bool,
    producers: HashMap<String, ProducerState>,
    /// Set after a write failed: the buffer no longer takes sends.
    broken: Option<String>,
}

/// The on-disk half: the open log.
#[derive(Debug)]
struct Log {
    dir: PathBuf,
    file: File,
    /// Bytes of records that no longer matter (receipted SENDs, their DONE
    /// records, superseded PRODUCER records).
    dead: u64,
    /// Held locked while the directory is in use.
    _lock: File,
}

/// The send buffer. Blocking calls (`append`, `reserve`, `complete`, ...)
/// do file I/O and belong on a blocking thread.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Lock order: `log` before `state`.
    log: Mutex<Option<Log>>,
    state: Mutex<State>,
    limits: Limits,
    /// Woken when a send is appended, so the connection drains it.
    pub(crate) appended: Notify,
    /// The number of pending sends.
    count: watch::Sender<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Buffer(format!("{what} {}: {e}", path.display()))
}

impl Outbox {
    /// Opens (or creates) the buffer in `dir`, or an in-memory buffer
    /// without one, and recovers what it holds.
    pub(crate) fn open(dir: Option<&Path>, limits: Limits) -> Result<(Outbox, Recovery)> {
        let mut state = State {
            pending: VecDeque::new(),
            pending_bytes: 0,
            next_local: 1,
            live: false,
            producers: HashMap::new(),
            broken: None,
        };
        let (log, recovery) = match dir {
            None => (None, Recovery::default()),
            Some(dir) => {
                let (log, recovery) = open_log(dir, &mut state)?;
                (Some(log), recovery)
            }
        };
        let count = state.pending.len();
        Ok((
            Outbox {
                log: Mutex::new(log),
                state: Mutex::new(state),
                limits,
                appended: Notify::new(),
                count: watch::channel(count).0,
            },
            recovery,
        ))
    }

    /// Whether the buffer is kept on disk.
    #[cfg(test)]
    pub(crate) fn is_durable(&self) -> bool {
        lock(&self.log).is_some()
    }

    /// Whether a persistent send may go straight to the broker: a server is
    /// connected and nothing is waiting in the buffer.
    pub(crate) fn is_direct(&self) -> bool {
        let state = lock(&self.state);
        state.live && state.pending.is_empty()
    }

    /// Marks the buffer drained on a connected server, if it is still
    /// empty: sends go straight to the broker again. Returns whether it did.
    pub(crate) fn go_live(&self) -> bool {
        let mut state = lock(&self.state);
        state.live = state.pending.is_empty();
        state.live
    }

    /// Sends go to the buffer from now on (the connection is gone).
    pub(crate) fn go_offline(&self) {
        lock(&self.state).live = false;
    }

    /// Pending sends.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).pending.len()
    }

    /// Watches the number of pending sends.
    pub(crate) fn watch_len(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    /// The producer id for `key` (client-id and producer name), created and
    /// persisted on first use. Blocking.
    pub(crate) fn producer_id(
        &self,
        key: &str,
        client_id: Option<&str>,
        name: &str,
    ) -> Result<String> {
        let mut log = lock(&self.log);
        let mut state = lock(&self.state);
        if let Some(p) = state.producers.get(key) {
            return Ok(p.id.clone());
        }
        let id = make_producer_id(client_id, name);
        let producer = ProducerState {
            id: id.clone(),
            next: 1,
            reserved: 0,
        };
        if let Some(log) = log.as_mut() {
            log.append(&encode_producer(key, &producer.id, 0), true)?;
        }
        state.producers.insert(key.to_owned(), producer);
        Ok(id)
    }

    /// The next sequence number of producer `key` if one is reserved
    /// already (no I/O); `None` when [`reserve`](Self::reserve) must run
    /// first.
    pub(crate) fn try_next_sequence(&self, key: &str) -> Option<u64> {
        let mut state = lock(&self.state);
        let p = state.producers.get_mut(key)?;
        if p.next <= p.reserved {
            p.next += 1;
            Some(p.next - 1)
        } else {
            None
        }
    }

    /// The next sequence number of producer `key`, reserving (and
    /// persisting) a new block when needed. Blocking.
    pub(crate) fn next_sequence(&self, key: &str) -> Result<u64> {
        if let Some(n) = self.try_next_sequence(key) {
            return Ok(n);
        }
        let mut log = lock(&self.log);
        let mut state = lock(&self.state);
        let Some(p) = state.producers.get_mut(key) else {
            return Err(Error::Usage(format!("unknown producer {key}")));
        };
        if p.next > p.reserved {
            let reserved = p.next - 1 + SEQUENCE_BLOCK;
            if let Some(log) = log.as_mut() {
                let payload = encode_producer(key, &p.id, reserved);
                log.append(&payload, true)?;
                // The producer's previous record is superseded (same size).
                log.dead += payload.len() as u64 + RECORD_HEADER;
            }
            p.reserved = reserved;
        }
        p.next += 1;
        Ok(p.next - 1)
    }

    /// Appends a send (synced to disk when the buffer has a directory). On
    /// success the send is pending and will be replayed in order. Blocking.
    pub(crate) fn append(&self, record: SendRecord) -> Result<()> {
        let mut log = lock(&self.log);
        let local = lock(&self.state).next_local;
        let payload = encode_send(local, &record);
        if payload.len() > MAX_RECORD {
            return Err(Error::Usage(format!(
                "a message of {} bytes is too large for the send buffer (limit {MAX_RECORD})",
                payload.len()
            )));
        }
        let size = payload.len() as u64 + RECORD_HEADER;
        {
            let state = lock(&self.state);
            if let Some(reason) = &state.broken {
                return Err(Error::Buffer(reason.clone()));
            }
            if state.pending.len() >= self.limits.max_records
                || state.pending_bytes + size > self.limits.max_bytes
            {
                return Err(Error::BufferFull {
                    records: state.pending.len(),
                    bytes: state.pending_bytes,
                });
            }
        }
        if let Some(log) = log.as_mut() {
            if let Err(e) = log.append(&payload, true) {
                lock(&self.state).broken = Some(e.to_string());
                return Err(e);
            }
        }
        let mut state = lock(&self.state);
        state.next_local = local + 1;
        state.pending.push_back(Pending {
            local,
            record: Arc::new(record),
            size,
        });
        state.pending_bytes += size;
        state.live = false;
        let n = state.pending.len();
        drop(state);
        drop(log);
        self.count.send_replace(n);
        self.appended.notify_one();
        Ok(())
    }

    /// Up to `max` pending sends from the front, oldest first.
    pub(crate) fn peek(&self, max: usize) -> Vec<(u64, Arc<SendRecord>)> {
        lock(&self.state)
            .pending
            .iter()
            .take(max)
            .map(|p| (p.local, p.record.clone()))
            .collect()
    }

    /// Removes sends that were receipted (or refused for good), recording
    /// that in the log without a sync, and compacts the log when it is
    /// mostly dead. Blocking.
    pub(crate) fn complete(&self, locals: &[u64]) -> Result<()> {
        if locals.is_empty() {
            return Ok(());
        }
        let done: HashSet<u64> = locals.iter().copied().collect();
        let mut log = lock(&self.log);
        let mut state = lock(&self.state);
        let mut freed = 0;
        state.pending.retain(|p| {
            let gone = done.contains(&p.local);
            if gone {
                freed += p.size;
            }
            !gone
        });
        state.pending_bytes -= freed;
        let n = state.pending.len();
        let mut result = Ok(());
        if let Some(l) = log.as_mut() {
            for local in locals {
                let payload = encode_done(*local);
                if let Err(e) = l.append(&payload, false) {
                    result = Err(e);
                    break;
                }
                l.dead += payload.len() as u64 + RECORD_HEADER;
            }
            l.dead += freed;
            if result.is_ok() && l.dead >= COMPACT_MIN_DEAD && l.dead > state.pending_bytes {
                result = l.compact(&state);
            }
        }
        drop(state);
        drop(log);
        self.count.send_replace(n);
        result
    }

    /// Syncs the log (DONE records included). Blocking.
    pub(crate) fn sync(&self) -> Result<()> {
        match lock(&self.log).as_mut() {
            Some(l) => l
                .file
                .sync_data()
                .map_err(|e| io_error("syncing", &l.dir.join(LOG_FILE), e)),
            None => Ok(()),
        }
    }
}

impl Log {
    /// Appends one record, syncing it when `sync`.
    fn append(&mut self, payload: &[u8], sync: bool) -> Result<()> {
        let mut buf = Vec::with_capacity(payload.len() + RECORD_HEADER as usize);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        let path = self.dir.join(LOG_FILE);
        self.file
            .write_all(&buf)
            .map_err(|e| io_error("writing", &path, e))?;
        if sync {
            self.file
                .sync_data()
                .map_err(|e| io_error("syncing", &path, e))?;
        }
        Ok(())
    }

    /// Rewrites the log with only what still matters.
    fn compact(&mut self, state: &State) -> Result<()> {
        let (file, len) = write_compacted(&self.dir, state)?;
        self.file = file;
        self.dead = 0;
        tracing::debug!(dir = %self.dir.display(), bytes = len, "send buffer compacted");
        Ok(())
    }
}

/// Writes `outbox.log.tmp` with the producers and pending sends of
/// `state`, syncs it, renames it over `outbox.log` and syncs the
/// directory. Returns the new log, open for appending, and its length.
fn write_compacted(dir: &Path, state: &State) -> Result<(File, u64)> {
    let tmp = dir.join(TMP_FILE);
    let path = dir.join(LOG_FILE);
    let file = File::create(&tmp).map_err(|e| io_error("creating", &tmp, e))?;
    let mut w = BufWriter::new(file);
    let mut len = HEADER_LEN;
    let mut put = |w: &mut BufWriter<File>, payload: &[u8]| -> std::io::Result<()> {
        w.write_all(&(payload.len() as u32).to_le_bytes())?;
        w.write_all(&crc32fast::hash(payload).to_le_bytes())?;
        w.write_all(payload)?;
        len += payload.len() as u64 + RECORD_HEADER;
        Ok(())
    };
    let written = (|| -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        let mut keys: Vec<_> = state.producers.keys().collect();
        keys.sort();
        for key in keys {
            let p = &state.producers[key];
            put(&mut w, &encode_producer(key, &p.id, p.reserved))?;
        }
        for p in &state.pending {
            put(&mut w, &encode_send(p.local, &p.record))?;
        }
        w.flush()?;
        w.get_ref().sync_all()
    })();
    written.map_err(|e| io_error("writing", &tmp, e))?;
    drop(w);
    std::fs::rename(&tmp, &path).map_err(|e| io_error("renaming", &tmp, e))?;
    sync_dir(dir)?;
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| io_error("opening", &path, e))?;
    Ok((file, len))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing directory", dir, e))
}

/// Opens the log in `dir`, filling `state` from it.
fn open_log(dir: &Path, state: &mut State) -> Result<(Log, Recovery)> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io_error("opening", &lock_path, e))?;
    match lock_file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::Buffer(format!(
                "{} is in use by another connection",
                dir.display()
            )))
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking", &lock_path, e)),
    }
    let path = dir.join(LOG_FILE);
    let mut recovery = Recovery::default();
    let mut needs_compaction = true;
    match File::open(&path) {
        Ok(file) => {
            let found = read_log(file, &path)?;
            let mut sends: Vec<(u64, SendRecord, u64)> = Vec::new();
            let mut done = HashSet::new();
            let mut last_producer_seq: HashMap<String, u64> = HashMap::new();
            let mut records = 0u64;
            for (payload_len, record) in found.records {
                records += 1;
                match record {
                    Record::Send(local, r) => {
                        let seq = last_producer_seq.entry(r.producer_id.clone()).or_default();
                        *seq = (*seq).max(r.sequence);
                        sends.push((local, r, payload_len + RECORD_HEADER));
                    }
                    Record::Done(local) => {
                        done.insert(local);
                    }
                    Record::Producer { key, id, reserved } => {
                        let p = state.producers.entry(key).or_insert(ProducerState {
                            id: id.clone(),
                            next: 1,
                            reserved: 0,
                        });
                        p.id = id;
                        p.reserved = p.reserved.max(reserved);
                    }
                }
            }
            for (local, record, size) in sends {
                state.next_local = state.next_local.max(local + 1);
                if done.contains(&local) {
                    continue;
                }
                state.pending_bytes += size;
                state.pending.push_back(Pending {
                    local,
                    record: Arc::new(record),
                    size,
                });
            }
            for p in state.producers.values_mut() {
                // Never reuse a sequence: continue after the reservation and
                // after any buffered send of the producer.
                let used = last_producer_seq.get(&p.id).copied().unwrap_or(0);
                p.reserved = p.reserved.max(used);
                p.next = p.reserved + 1;
            }
            recovery.pending = state.pending.len();
            recovery.dropped_bytes = found.dropped;
            recovery.warning = found.warning;
            let live_records = state.producers.len() + state.pending.len();
            needs_compaction =
                !found.header || found.dropped > 0 || records as usize > live_records;
            if let Some(w) = &recovery.warning {
                tracing::warn!(path = %path.display(), "send buffer: {w}");
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("opening", &path, e)),
    }
    let file = if needs_compaction {
        write_compacted(dir, state)?.0
    } else {
        OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_error("opening", &path, e))?
    };
    if recovery.pending > 0 {
        tracing::info!(
            path = %path.display(),
            pending = recovery.pending,
            "send buffer holds sends from an earlier run; they are replayed on connect"
        );
    }
    Ok((
        Log {
            dir: dir.to_owned(),
            file,
            dead: 0,
            _lock: lock_file,
        },
        recovery,
    ))
}

/// A decoded record.
#[derive(Debug)]
enum Record {
    Send(u64, SendRecord),
    Done(u64),
    Producer {
        key: String,
        id: String,
        reserved: u64,
    },
}

struct Found {
    /// Whether the file had a complete header.
    header: bool,
    /// Records with their payload length.
    records: Vec<(u64, Record)>,
    dropped: u64,
    warning: Option<String>,
}

/// Reads every intact record; stops at the first torn or corrupt one.
fn read_log(file: File, path: &Path) -> Result<Found> {
    let total = file
        .metadata()
        .map_err(|e| io_error("reading", path, e))?
        .len();
    let mut r = BufReader::new(file);
    let mut header = [0u8; HEADER_LEN as usize];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        // Created but never written: a crash before the header was synced.
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            return Ok(Found {
                header: false,
                records: Vec::new(),
                dropped: total,
                warning: (total > 0)
                    .then(|| format!("{total} bytes without a complete header dropped")),
            })
        }
        Err(e) => return Err(io_error("reading", path, e)),
    }
    if &header[..8] != MAGIC {
        return Err(Error::Buffer(format!(
            "{} is not a FerroMQ send buffer",
            path.display()
        )));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(Error::Buffer(format!(
            "{} has format version {version}; this client reads version {VERSION}",
            path.display()
        )));
    }
    let mut offset = HEADER_LEN;
    let mut records = Vec::new();
    let warning = loop {
        let mut head = [0u8; RECORD_HEADER as usize];
        match read_full(&mut r, &mut head) {
            Ok(0) => break None,
            Ok(n) if n < head.len() => {
                break Some(format!("record at offset {offset} is cut short"))
            }
            Ok(_) => {}
            Err(e) => return Err(io_error("reading", path, e)),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_RECORD || offset + RECORD_HEADER + len as u64 > total {
            break Some(format!(
                "record at offset {offset} claims {len} bytes, more than the file holds"
            ));
        }
        let mut payload = vec![0u8; len];
        match read_full(&mut r, &mut payload) {
            Ok(n) if n == len => {}
            Ok(_) => break Some(format!("record at offset {offset} is cut short")),
            Err(e) => return Err(io_error("reading", path, e)),
        }
        if crc32fast::hash(&payload) != crc {
            break Some(format!("record at offset {offset} fails its CRC check"));
        }
        match decode(&payload) {
            Some(record) => records.push((len as u64, record)),
            None => break Some(format!("record at offset {offset} does not decode")),
        }
        offset += RECORD_HEADER + len as u64;
    };
    let dropped = total - offset;
    let warning = warning.map(|w| format!("{w}; dropped it and the {dropped} bytes from there on"));
    Ok(Found {
        header: true,
        records,
        dropped,
        warning,
    })
}

/// Reads until `buf` is full or the end of the file; returns the count.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A producer id the broker accepts (1 to 128 printable bytes), readable:
/// `CLIENT-ID:NAME:RANDOM`, the client part shortened when too long.
pub(crate) fn make_producer_id(client_id: Option<&str>, name: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '_' } else { c })
            .collect()
    };
    let suffix = format!(":{:08x}", rand::random::<u32>());
    let mut head = format!(
        "{}:{}",
        clean(client_id.unwrap_or("anonymous")),
        clean(name)
    );
    while head.len() + suffix.len() > MAX_PRODUCER_ID {
        head.pop();
    }
    head + &suffix
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    put_u32(b, v.len() as u32);
    b.extend_from_slice(v);
}

fn encode_send(local: u64, r: &SendRecord) -> Vec<u8> {
    let mut b = Vec::with_capacity(64 + r.body.len());
    b.push(KIND_SEND);
    put_u64(&mut b, local);
    put_bytes(&mut b, r.producer_id.as_bytes());
    put_u64(&mut b, r.sequence);
    put_bytes(&mut b, r.destination.as_bytes());
    put_u32(&mut b, r.headers.len() as u32);
    for (k, v) in &r.headers {
        put_bytes(&mut b, k.as_bytes());
        put_bytes(&mut b, v.as_bytes());
    }
    put_bytes(&mut b, &r.body);
    b
}

fn encode_done(local: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(9);
    b.push(KIND_DONE);
    put_u64(&mut b, local);
    b
}

fn encode_producer(key: &str, id: &str, reserved: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + key.len() + id.len());
    b.push(KIND_PRODUCER);
    put_bytes(&mut b, key.as_bytes());
    put_bytes(&mut b, id.as_bytes());
    put_u64(&mut b, reserved);
    b
}

/// A cursor over a payload; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }
}

fn decode(payload: &[u8]) -> Option<Record> {
    let mut c = Cursor(payload);
    let record = match c.u8()? {
        KIND_SEND => {
            let local = c.u64()?;
            let producer_id = c.string()?;
            let sequence = c.u64()?;
            let destination = c.string()?;
            let n = c.u32()? as usize;
            let mut headers = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                headers.push((c.string()?, c.string()?));
            }
            let body = Bytes::copy_from_slice(c.bytes()?);
            Record::Send(
                local,
                SendRecord {
                    producer_id,
                    sequence,
                    destination,
                    headers,
                    body,
                },
            )
        }
        KIND_DONE => Record::Done(c.u64()?),
        KIND_PRODUCER => Record::Producer {
            key: c.string()?,
            id: c.string()?,
            reserved: c.u64()?,
        },
        _ => return None,
    };
    c.0.is_empty().then_some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Limits = Limits {
        max_records: 1000,
        max_bytes: 1 << 30,
    };

    fn record(producer: &str, seq: u64, body: &str) -> SendRecord {
        SendRecord {
            producer_id: producer.to_owned(),
            sequence: seq,
            destination: "/queue/q".to_owned(),
            headers: vec![
                ("persistent".to_owned(), "true".to_owned()),
                ("colour".to_owned(), "blue: yes\nno".to_owned()),
            ],
            body: Bytes::from(body.to_owned()),
        }
    }

    fn bodies(o: &Outbox) -> Vec<String> {
        o.peek(usize::MAX)
            .into_iter()
            .map(|(_, r)| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join(LOG_FILE)
    }

    #[test]
    fn keeps_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            assert_eq!(rec.pending, 0);
            assert!(o.is_durable());
            for i in 0..5 {
                o.append(record("p", i + 1, &format!("m{i}"))).unwrap();
            }
            assert_eq!(o.len(), 5);
            assert_eq!(bodies(&o), ["m0", "m1", "m2", "m3", "m4"]);
            // The first two were receipted.
            let front: Vec<u64> = o.peek(2).into_iter().map(|(l, _)| l).collect();
            o.complete(&front).unwrap();
            assert_eq!(bodies(&o), ["m2", "m3", "m4"]);
        }
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert_eq!(rec.pending, 3);
        assert!(rec.warning.is_none());
        assert_eq!(bodies(&o), ["m2", "m3", "m4"]);
        let all = o.peek(10);
        assert_eq!(*all[0].1, record("p", 3, "m2"));
        // New appends go after the recovered ones, with fresh local ids.
        o.append(record("p", 6, "m5")).unwrap();
        let locals: Vec<u64> = o.peek(10).into_iter().map(|(l, _)| l).collect();
        assert!(locals.windows(2).all(|w| w[0] < w[1]), "{locals:?}");
        assert_eq!(bodies(&o), ["m2", "m3", "m4", "m5"]);
    }

    #[test]
    fn refuses_sends_past_its_limits() {
        let (o, _) = Outbox::open(
            None,
            Limits {
                max_records: 3,
                max_bytes: 1 << 20,
            },
        )
        .unwrap();
        for i in 0..3 {
            o.append(record("p", i + 1, "x")).unwrap();
        }
        match o.append(record("p", 4, "x")) {
            Err(Error::BufferFull { records: 3, bytes }) => assert!(bytes > 0),
            other => panic!("{other:?}"),
        }
        // Room again once some are receipted.
        let front: Vec<u64> = o.peek(1).into_iter().map(|(l, _)| l).collect();
        o.complete(&front).unwrap();
        o.append(record("p", 4, "x")).unwrap();

        let (o, _) = Outbox::open(
            None,
            Limits {
                max_records: 100,
                max_bytes: 300,
            },
        )
        .unwrap();
        o.append(record("p", 1, &"a".repeat(100))).unwrap();
        let err = o.append(record("p", 2, &"a".repeat(200))).unwrap_err();
        assert!(
            matches!(err, Error::BufferFull { records: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("full"), "{err}");
    }

    #[test]
    fn torn_tail_is_dropped_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            for i in 0..3 {
                o.append(record("p", i + 1, &format!("m{i}"))).unwrap();
            }
        }
        // A crash in the middle of the fourth append: half a record.
        let full = std::fs::read(log_path(dir.path())).unwrap();
        let mut torn = full.clone();
        let extra = encode_send(99, &record("p", 4, "m3"));
        torn.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        torn.extend_from_slice(&crc32fast::hash(&extra).to_le_bytes());
        torn.extend_from_slice(&extra[..extra.len() / 2]);
        std::fs::write(log_path(dir.path()), &torn).unwrap();

        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert_eq!(rec.pending, 3);
        assert!(rec.dropped_bytes > 0);
        let w = rec.warning.unwrap();
        assert!(
            w.contains("cut short") || w.contains("more than the file"),
            "{w}"
        );
        assert_eq!(bodies(&o), ["m0", "m1", "m2"]);
        // The torn bytes are gone from the file (compacted), so appends
        // after it are readable on the next open.
        o.append(record("p", 5, "m4")).unwrap();
        drop(o);
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert!(rec.warning.is_none(), "{:?}", rec.warning);
        assert_eq!(bodies(&o), ["m0", "m1", "m2", "m4"]);
    }

    #[test]
    fn corrupt_record_is_detected_by_its_crc() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            for i in 0..3 {
                o.append(record("p", i + 1, &format!("body-{i}"))).unwrap();
            }
        }
        // Flip a byte in the last record's body.
        let mut bytes = std::fs::read(log_path(dir.path())).unwrap();
        let at = bytes.len() - 2;
        bytes[at] ^= 0x55;
        std::fs::write(log_path(dir.path()), &bytes).unwrap();
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert!(
            rec.warning.as_deref().unwrap_or("").contains("CRC"),
            "{rec:?}"
        );
        assert_eq!(bodies(&o), ["body-0", "body-1"]);

        // A length field gone wild is caught before allocating.
        drop(o);
        let mut bytes = std::fs::read(log_path(dir.path())).unwrap();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&[0; 12]);
        std::fs::write(log_path(dir.path()), &bytes).unwrap();
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert!(rec.warning.is_some());
        assert_eq!(rec.dropped_bytes, 16);
        assert_eq!(bodies(&o), ["body-0", "body-1"]);
    }

    #[test]
    fn foreign_files_are_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(log_path(dir.path()), b"hello, this is not a buffer").unwrap();
        let err = Outbox::open(Some(dir.path()), ROOMY).unwrap_err();
        assert!(
            err.to_string().contains("not a FerroMQ send buffer"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(log_path(dir.path())).unwrap(),
            b"hello, this is not a buffer"
        );
    }

    #[test]
    fn one_connection_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        let err = Outbox::open(Some(dir.path()), ROOMY).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        Outbox::open(Some(dir.path()), ROOMY).unwrap();
    }

    #[test]
    fn producer_ids_and_sequences_survive_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (id, last) = {
            let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            let id = o.producer_id("app/orders", Some("app"), "orders").unwrap();
            assert!(id.starts_with("app:orders:"), "{id}");
            assert_eq!(
                o.producer_id("app/orders", Some("app"), "orders").unwrap(),
                id
            );
            let seqs: Vec<u64> = (0..5)
                .map(|_| o.next_sequence("app/orders").unwrap())
                .collect();
            assert_eq!(seqs, [1, 2, 3, 4, 5]);
            (id, 5)
        };
        let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert_eq!(
            o.producer_id("app/orders", Some("app"), "orders").unwrap(),
            id
        );
        let next = o.next_sequence("app/orders").unwrap();
        assert!(next > last, "{next} after {last}");
        let after = o.next_sequence("app/orders").unwrap();
        assert_eq!(after, next + 1);
        // Another name, another id.
        let other = o.producer_id("app/audit", Some("app"), "audit").unwrap();
        assert_ne!(other, id);
    }

    #[test]
    fn sequences_continue_past_buffered_sends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            let id = o.producer_id("k", None, "p").unwrap();
            // A buffered send numbered beyond the last reservation (as if
            // the reservation record had been lost).
            o.append(record(&id, 5000, "late")).unwrap();
        }
        let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert!(o.next_sequence("k").unwrap() > 5000);
    }

    #[test]
    fn long_and_odd_names_make_valid_producer_ids() {
        let id = make_producer_id(Some(&"c".repeat(300)), "n\u{7}ame");
        assert!(id.len() <= MAX_PRODUCER_ID, "{}", id.len());
        assert!(!id.chars().any(char::is_control));
        let id = make_producer_id(None, "p");
        assert!(id.starts_with("anonymous:p:"), "{id}");
    }

    #[test]
    fn compaction_keeps_pending_and_producers() {
        let dir = tempfile::tempdir().unwrap();
        let body = "z".repeat(64 * 1024);
        let id;
        {
            let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
            id = o.producer_id("k", Some("c"), "p").unwrap();
            // Enough receipted traffic to pass the compaction threshold.
            for round in 0..20u64 {
                o.append(record(&id, round * 2 + 1, &body)).unwrap();
                o.append(record(&id, round * 2 + 2, &body)).unwrap();
                let front: Vec<u64> = o.peek(2).into_iter().map(|(l, _)| l).collect();
                o.complete(&front).unwrap();
            }
            o.append(record(&id, 100, "kept")).unwrap();
            let size = std::fs::metadata(log_path(dir.path())).unwrap().len();
            assert!(
                size < COMPACT_MIN_DEAD + 300 * 1024,
                "log not compacted: {size}"
            );
        }
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert!(rec.warning.is_none());
        assert_eq!(bodies(&o), ["kept"]);
        assert_eq!(o.producer_id("k", Some("c"), "p").unwrap(), id);
        assert!(!dir.path().join(TMP_FILE).exists());
    }

    #[test]
    fn header_only_and_empty_files_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(log_path(dir.path()), b"").unwrap();
        let (o, rec) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert_eq!(rec.pending, 0);
        o.append(record("p", 1, "a")).unwrap();
        drop(o);
        let (o, _) = Outbox::open(Some(dir.path()), ROOMY).unwrap();
        assert_eq!(bodies(&o), ["a"]);
    }

    #[test]
    fn live_only_when_drained() {
        let (o, _) = Outbox::open(None, ROOMY).unwrap();
        assert!(!o.is_direct());
        assert!(o.go_live());
        assert!(o.is_direct());
        o.append(record("p", 1, "a")).unwrap();
        assert!(!o.is_direct(), "an append stops direct sends");
        assert!(!o.go_live(), "not while something is pending");
        let front: Vec<u64> = o.peek(1).into_iter().map(|(l, _)| l).collect();
        o.complete(&front).unwrap();
        assert!(o.go_live());
        o.go_offline();
        assert!(!o.is_direct());
    }
}
