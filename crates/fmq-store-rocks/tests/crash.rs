//! Crash recovery: a child process commits synced batches and reports each
//! sequence only after its commit resolved; it is killed with SIGKILL
//! mid-stream. Every reported batch must be there after reopening.
//!
//! A SIGKILL leaves the page cache, so unsynced writes survive it. The
//! power-cut tests run the child's store on an `fmq-powerloss` FUSE mount
//! and cut its power mid-stream instead: what reopens is only what the
//! store synced (or, for a torn cut, that plus a random part of the rest).
//! They need `/dev/fuse` and root, as CI has. Each run prints its
//! `FMQ_POWERLOSS_SEED`, which replays a torn cut's page choices (the
//! moment of the cut depends on timing).
//!
//! The child is this test binary itself, re-executed with a filter that runs
//! only [`crash_child`] and environment variables that tell it where the
//! store is and how to open it. Without them `crash_child` does nothing.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmq_powerloss::{seed, Loss, Mount, SEED_VAR};
use fmq_store::{Batch, Cf, Op, Store};
use fmq_store_rocks::{RocksOptions, RocksStore};

const DIR_VAR: &str = "FMQ_CRASH_CHILD_DIR";
const SMALL_MEMTABLES_VAR: &str = "FMQ_CRASH_CHILD_SMALL_MEMTABLES";
const KILL_AFTER: usize = 300;
const WRITERS: u64 = 4;
const LOG_RETENTION: u64 = 100;

/// The child keeps a batch log, so the crash also tests that the log and
/// the data recover together. With `small_memtables` the memtables flush
/// every few dozen batches, so write-ahead-log files are spent and reused
/// (`recycle_wal_files`) long before the kill: the file being written when
/// the child dies still holds records of its previous use past the new ones.
fn options(small_memtables: bool) -> RocksOptions {
    let defaults = RocksOptions::default();
    assert!(defaults.recycle_wal_files > 0, "the test expects reuse on");
    let (write_buffer_bytes, total_write_buffer_bytes) = if small_memtables {
        (64 * 1024, 256 * 1024)
    } else {
        (
            defaults.write_buffer_bytes,
            defaults.total_write_buffer_bytes,
        )
    };
    RocksOptions {
        log_retention: LOG_RETENTION,
        write_buffer_bytes,
        total_write_buffer_bytes,
        ..defaults
    }
}

fn key(writer: u64, n: u64) -> String {
    format!("w{writer}/{n:08}")
}

/// The child's work: a few tasks commit synced batches concurrently (so
/// groups form and the crash can land in the middle of one), printing
/// `committed SEQ KEY` once each commit has resolved.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let small_memtables = std::env::var_os(SMALL_MEMTABLES_VAR).is_some();
    let store =
        Arc::new(RocksStore::open(Path::new(&dir), options(small_memtables)).expect("child open"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    // A deadline, in case the parent died without killing us.
    let deadline = Instant::now() + Duration::from_secs(60);
    runtime.block_on(async {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for n in 0.. {
                        if Instant::now() > deadline {
                            return;
                        }
                        let key = key(writer, n);
                        let mut batch = Batch::new();
                        batch.put(Cf::Messages, key.as_bytes(), vec![b'x'; 512]);
                        batch.put(Cf::QueueEntries, format!("q/{key}"), key.as_bytes());
                        batch.set_sync(true);
                        let sequence = match store.commit(batch).await {
                            Ok(sequence) => sequence,
                            // After a power cut every write fails: stop
                            // (without a panic's noise); the parent sees
                            // the reports end either way.
                            Err(e) => {
                                println!("commit failed: {e}");
                                std::process::exit(3);
                            }
                        };
                        println!("committed {sequence} {key}");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
}

#[test]
fn committed_batches_survive_sigkill() {
    crash_and_check(false, None);
}

/// The same crash while the store writes a reused write-ahead-log file:
/// recovery must stop where the new records end, and neither lose a
/// reported batch nor replay one from the file's previous use.
#[test]
fn committed_batches_survive_sigkill_in_a_reused_wal_file() {
    crash_and_check(true, None);
}

/// A power cut: everything not synced is gone, the directory entries of
/// files created since their directory's last sync included.
#[test]
fn committed_batches_survive_a_power_cut() {
    crash_and_check(false, Some(Loss::Unsynced));
}

/// A power cut while reused write-ahead-log files are written, with each
/// unsynced page written back or not at random: the reused file can hold
/// new records, then old ones from its previous use, then new ones again.
/// Recovery must stop at the first record that is not the new file's.
#[test]
fn committed_batches_survive_a_torn_power_cut_in_a_reused_wal_file() {
    crash_and_check(true, Some(Loss::Torn));
}

/// Whether RocksDB's info log says a spent write-ahead-log file was taken
/// up again (it is flushed every few seconds, so this lags a little).
fn reused_a_wal_file(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("LOG")).is_ok_and(|log| log.contains("reusing log"))
}

/// Runs the child until it reported enough commits, then kills it
/// (`cut: None`) or cuts the power under it, and checks what reopens.
fn crash_and_check(small_memtables: bool, cut: Option<Loss>) {
    let dir = tempfile::tempdir().expect("tempdir");
    // With a power cut `dir` is the mount point, and the store reopens from
    // the image of the disk written into `image`.
    let image = tempfile::tempdir().expect("tempdir");
    let mount = cut.map(|_| Mount::new(dir.path()).expect("power-loss mount"));
    let store_dir = match &mount {
        Some(m) => m.path().join("store"),
        None => dir.path().to_owned(),
    };
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(DIR_VAR, &store_dir);
    if small_memtables {
        command.env(SMALL_MEMTABLES_VAR, "1");
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");

    // Read on a thread so a silent child cannot hang the test.
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print "test crash_child ... " on the same line
            // as the child's first report.
            if let Some(rest) = line.find("committed ").map(|at| &line[at + 10..]) {
                let mut parts = rest.split(' ');
                let sequence: u64 = parts.next().and_then(|s| s.parse().ok()).expect("seq");
                let key = parts.next().expect("key").to_owned();
                if tx.send((sequence, key)).is_err() {
                    break;
                }
            }
        }
    });

    let mut reported = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    // With small memtables, also until RocksDB has reused a write-ahead-log
    // file, so the kill lands while reused files are written (the child
    // keeps filling and reusing them).
    let mut reused = !small_memtables;
    let mut looked = Instant::now();
    while reported.len() < KILL_AFTER || !reused {
        if !reused && looked.elapsed() >= Duration::from_millis(100) {
            looked = Instant::now();
            reused = reused_a_wal_file(&store_dir);
        }
        let left = give_up.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(entry) => reported.push(entry),
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "child stopped reporting after {} commits ({err}); RocksDB had {}reused a write-ahead-log file",
                    reported.len(),
                    if reused { "" } else { "not " }
                );
            }
        }
    }
    let reopen_dir = match (&mount, cut) {
        (Some(mount), Some(loss)) => {
            // From here every file operation of the child fails, so it can
            // report nothing more that the disk does not hold.
            let seed = seed();
            let cut = mount
                .power_off(loss, seed, image.path())
                .expect("power off");
            println!("power cut ({loss:?}, {SEED_VAR}={seed}): {cut:?}");
            image.path().join("store")
        }
        _ => dir.path().to_owned(),
    };
    // A child whose commit failed at the power cut may have exited already.
    let _ = child.kill();
    let status = child.wait().expect("wait child");
    assert!(!status.success(), "child must die: {status}");
    // Commits the child printed between our last read and the kill (or the
    // cut) count too: they were reported as resolved.
    reader.join().expect("reader thread");
    reported.extend(rx.try_iter());
    drop(mount);

    let store = RocksStore::open(&reopen_dir, options(small_memtables)).expect("reopen");
    let last_reported = reported.iter().map(|(s, _)| *s).max().expect("reports");
    println!(
        "child killed after {} reported commits (last sequence {last_reported}); \
         recovered sequence {}",
        reported.len(),
        store.last_sequence()
    );
    assert!(
        store.last_sequence() >= last_reported,
        "recovered sequence {} is short of the last reported {last_reported}",
        store.last_sequence()
    );
    for (sequence, key) in &reported {
        assert!(
            store
                .get(Cf::Messages, key.as_bytes())
                .expect("get")
                .is_some(),
            "batch {sequence} ({key}) was reported committed but is lost"
        );
        assert_eq!(
            store
                .get(Cf::QueueEntries, format!("q/{key}").as_bytes())
                .expect("get")
                .as_deref(),
            Some(key.as_bytes()),
            "batch {sequence} was torn"
        );
    }
    // Recovered batches are whole: every queue entry has its message.
    let mut entries = 0;
    store
        .scan_prefix(Cf::QueueEntries, b"q/", &mut |k, v| {
            entries += 1;
            assert_eq!(&k[2..], v);
            assert!(store.get(Cf::Messages, v)?.is_some(), "torn batch");
            Ok(())
        })
        .expect("scan");
    assert_eq!(entries, store.last_sequence());
    // The batch log ends at the recovered sequence, keeps the retention, and
    // each logged batch is the one whose data is stored.
    let first = store.first_logged();
    assert!(store.last_sequence() - first + 1 >= LOG_RETENTION.min(store.last_sequence()));
    let logged = store
        .read_log(first, usize::MAX, usize::MAX)
        .expect("read log");
    assert_eq!(
        logged.last().map(|b| b.sequence),
        Some(store.last_sequence())
    );
    for (expected, entry) in (first..).zip(&logged) {
        assert_eq!(entry.sequence, expected);
        let batch = Batch::decode(&entry.bytes).expect("decode logged batch");
        for op in batch.ops() {
            if let Op::Put { cf, key, value } = op {
                assert_eq!(
                    store.get(*cf, key).expect("get").as_deref(),
                    Some(value.as_slice()),
                    "logged batch {expected} is not in the data"
                );
            }
        }
    }
    // And the store accepts writes after recovery, with the next numbers.
    let mut batch = Batch::new();
    batch.put(Cf::Meta, b"after-crash".to_vec(), Vec::new());
    batch.set_sync(true);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let sequence = runtime.block_on(store.commit(batch)).expect("commit");
    assert_eq!(sequence, store.last_sequence());
    assert!(sequence > last_reported);
}
