//! The batch log of `RocksStore`: retention and pruning, bounded reads,
//! reopening, and checkpoints that report their exact sequence.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fmq_store::{decode_sequence, Batch, Cf, Error, LoggedBatch, MemoryStore, Store};
use fmq_store_rocks::{RocksOptions, RocksStore};

type Contents = BTreeMap<Cf, Vec<(Vec<u8>, Vec<u8>)>>;

fn open(dir: &Path, log_retention: u64) -> RocksStore {
    RocksStore::open(
        dir,
        RocksOptions {
            log_retention,
            ..RocksOptions::default()
        },
    )
    .expect("open store")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

/// Batch `n`: a message with a size that varies with `n`, and every third
/// batch deletes the message of three batches before.
fn numbered(n: u64) -> Batch {
    let mut batch = Batch::new();
    batch.put(
        Cf::Messages,
        format!("m{n:06}"),
        vec![b'x'; (n % 7) as usize * 10],
    );
    if n.is_multiple_of(3) && n > 3 {
        batch.delete(Cf::Messages, format!("m{:06}", n - 3));
    }
    batch.set_sync(n.is_multiple_of(5));
    batch
}

/// Commits batches `range` one at a time, each awaited, so every group
/// holds one batch.
fn commit_one_by_one(store: &dyn Store, range: std::ops::RangeInclusive<u64>) {
    let runtime = runtime();
    for n in range {
        assert_eq!(
            runtime.block_on(store.commit(numbered(n))).expect("commit"),
            n
        );
    }
}

/// Commits batches `range` all queued at once, so they form large groups.
fn commit_queued(store: &dyn Store, range: std::ops::RangeInclusive<u64>) {
    let commits: Vec<_> = range.clone().map(|n| store.commit(numbered(n))).collect();
    let runtime = runtime();
    for (n, commit) in range.zip(commits) {
        assert_eq!(runtime.block_on(commit).expect("commit"), n);
    }
}

fn sequences(batches: &[LoggedBatch]) -> Vec<u64> {
    batches.iter().map(|b| b.sequence).collect()
}

/// Every key of `Cf::Log`, decoded.
fn log_keys(store: &dyn Store) -> Vec<u64> {
    let mut keys = Vec::new();
    store
        .scan_prefix(Cf::Log, b"", &mut |k, _| {
            keys.push(decode_sequence(k)?);
            Ok(())
        })
        .expect("scan log");
    keys
}

/// The log holds exactly `first_logged()..=last_sequence()`.
fn assert_log_invariant(store: &dyn Store) {
    let expected: Vec<u64> = (store.first_logged()..=store.last_sequence()).collect();
    assert_eq!(log_keys(store), expected);
}

/// Every row of every column family except the log.
fn data(store: &dyn Store) -> Contents {
    Cf::ALL
        .iter()
        .filter(|&&cf| cf != Cf::Log)
        .map(|&cf| {
            let mut rows = Vec::new();
            store
                .scan_prefix(cf, b"", &mut |k, v| {
                    rows.push((k.to_vec(), v.to_vec()));
                    Ok(())
                })
                .expect("scan");
            (cf, rows)
        })
        .collect()
}

/// A memory store with the logged batches applied in order: what the data
/// of a store whose log starts at 1 must be.
fn replay(batches: &[LoggedBatch]) -> MemoryStore {
    let memory = MemoryStore::new();
    let runtime = runtime();
    for (expected, logged) in (1..).zip(batches) {
        assert_eq!(logged.sequence, expected);
        let batch = Batch::decode(&logged.bytes).expect("decode logged batch");
        assert_eq!(
            runtime.block_on(memory.commit(batch)).expect("replay"),
            expected
        );
    }
    memory
}

#[test]
fn no_log_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 0);
    assert_eq!(store.first_logged(), 1);
    assert_eq!(store.read_log(1, 10, usize::MAX).expect("read"), []);
    commit_queued(&store, 1..=10);
    assert_eq!(store.first_logged(), 11);
    assert!(log_keys(&store).is_empty());
    assert_eq!(store.read_log(11, 10, usize::MAX).expect("read"), []);
    let err = store.read_log(1, 10, usize::MAX).expect_err("no log");
    assert!(
        matches!(err, Error::Truncated { from: 1, first: 11 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "batch log truncated: batch 1 requested, but the log starts at batch 11"
    );
}

#[test]
fn retention_prunes_in_steps_and_reads_respect_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 10);
    // Retention 10 lets the log grow to 10 + 64 batches before pruning.
    commit_one_by_one(&store, 1..=74);
    assert_eq!(store.first_logged(), 1);
    assert_log_invariant(&store);
    commit_one_by_one(&store, 75..=75);
    assert_eq!(store.first_logged(), 66);
    assert_log_invariant(&store);

    let err = store.read_log(65, 100, usize::MAX).expect_err("pruned");
    assert!(
        matches!(
            err,
            Error::Truncated {
                from: 65,
                first: 66
            }
        ),
        "{err:?}"
    );
    let read = store.read_log(66, 100, usize::MAX).expect("read");
    assert_eq!(sequences(&read), (66..=75).collect::<Vec<_>>());
    for logged in &read {
        assert_eq!(
            Batch::decode(&logged.bytes).expect("decode"),
            numbered(logged.sequence)
        );
    }
    assert_eq!(store.read_log(76, 100, usize::MAX).expect("read"), []);
    assert_eq!(store.read_log(1_000, 100, usize::MAX).expect("read"), []);

    // Large groups prune too, and never below the retention.
    commit_queued(&store, 76..=1_000);
    assert_eq!(store.last_sequence(), 1_000);
    let kept = store.last_sequence() - store.first_logged() + 1;
    assert!((10..=74).contains(&kept), "{kept} batches logged");
    assert_log_invariant(&store);
    let all = store
        .read_log(store.first_logged(), usize::MAX, usize::MAX)
        .expect("read");
    assert_eq!(
        sequences(&all),
        (store.first_logged()..=1_000).collect::<Vec<_>>()
    );
    let stats = store.stats();
    assert_eq!(stats.batches_committed, 1_000);
}

#[test]
fn a_group_larger_than_the_log_logs_only_its_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 2);
    commit_one_by_one(&store, 1..=5);
    commit_queued(&store, 6..=300);
    let first = store.first_logged();
    assert!(first > 5 && first <= 299, "first_logged {first}");
    assert_log_invariant(&store);
    let tail = store.read_log(299, 10, usize::MAX).expect("read");
    assert_eq!(sequences(&tail), [299, 300]);
}

#[test]
fn read_log_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 1_000);
    commit_queued(&store, 1..=50);
    let size = |n: u64| numbered(n).encode().len();

    assert_eq!(
        sequences(&store.read_log(10, 3, usize::MAX).expect("read")),
        [10, 11, 12]
    );
    assert_eq!(store.read_log(10, 0, usize::MAX).expect("read"), []);
    // Nothing fits, yet one batch comes back, however large.
    assert_eq!(sequences(&store.read_log(13, 10, 0).expect("read")), [13]);
    let limit = size(20) + size(21) + size(22);
    assert_eq!(
        sequences(&store.read_log(20, 10, limit).expect("read")),
        [20, 21, 22]
    );
    assert_eq!(
        sequences(&store.read_log(20, 10, limit - 1).expect("read")),
        [20, 21]
    );
    // Whichever limit comes first wins.
    assert_eq!(
        sequences(&store.read_log(20, 2, limit).expect("read")),
        [20, 21]
    );
    let read = store.read_log(1, usize::MAX, 300).expect("read");
    let total: usize = read.iter().map(|b| b.bytes.len()).sum();
    assert!(total <= 300, "{total}");
    assert!(total + size(read.len() as u64 + 1) > 300, "stopped early");
    // Reading to the end stops at the last sequence.
    assert_eq!(
        sequences(&store.read_log(48, 10, usize::MAX).expect("read")),
        [48, 49, 50]
    );
}

#[test]
fn the_log_survives_reopen_and_matches_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 10_000);
        commit_queued(&store, 1..=150);
        commit_one_by_one(&store, 151..=200);
    }
    let store = open(dir.path(), 10_000);
    assert_eq!(store.last_sequence(), 200);
    assert_eq!(store.first_logged(), 1);
    assert_log_invariant(&store);
    let all = store.read_log(1, usize::MAX, usize::MAX).expect("read");
    assert_eq!(all.len(), 200);
    // Replaying the log rebuilds exactly the stored data.
    let replayed = replay(&all);
    assert_eq!(data(&store), data(&replayed));
    // And the log continues where it stopped.
    commit_one_by_one(&store, 201..=201);
    assert_eq!(
        sequences(&store.read_log(199, 10, usize::MAX).expect("read")),
        [199, 200, 201]
    );
}

#[test]
fn a_store_opened_without_retention_reads_its_log_until_it_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 100);
        commit_queued(&store, 1..=30);
    }
    {
        let store = open(dir.path(), 0);
        assert_eq!(store.first_logged(), 1);
        assert_eq!(
            sequences(&store.read_log(25, 100, usize::MAX).expect("read")),
            [25, 26, 27, 28, 29, 30]
        );
        // Without retention the next commit drops the log: keeping it would
        // leave a log that no longer reaches the last sequence.
        commit_one_by_one(&store, 31..=31);
        assert_eq!(store.first_logged(), 32);
        assert!(log_keys(&store).is_empty());
        assert!(matches!(
            store.read_log(25, 100, usize::MAX),
            Err(Error::Truncated {
                from: 25,
                first: 32
            })
        ));
    }
    // A log started again begins after the gap.
    let store = open(dir.path(), 100);
    assert_eq!(store.first_logged(), 32);
    commit_one_by_one(&store, 32..=33);
    assert_eq!(store.first_logged(), 32);
    assert_log_invariant(&store);
}

#[test]
fn a_log_that_does_not_end_at_the_sequence_is_discarded_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), 0);
        // Callers never write the log; this simulates a damaged one.
        let mut batch = Batch::new();
        batch.put(Cf::Log, 5u64.to_be_bytes(), numbered(5).encode());
        batch.put(Cf::Log, b"odd".to_vec(), Vec::new());
        runtime().block_on(store.commit(batch)).expect("commit");
    }
    let store = open(dir.path(), 100);
    assert_eq!(store.last_sequence(), 1);
    assert_eq!(store.first_logged(), 2);
    assert!(log_keys(&store).is_empty());
    commit_one_by_one(&store, 2..=3);
    assert_log_invariant(&store);
}

#[test]
fn memory_and_rocks_logs_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks = open(dir.path(), 5);
    let memory = MemoryStore::with_log(5);
    commit_one_by_one(&rocks, 1..=150);
    commit_one_by_one(&memory, 1..=150);
    assert_eq!(rocks.first_logged(), memory.first_logged());
    for from in [
        rocks.first_logged() - 1,
        rocks.first_logged(),
        140,
        150,
        151,
    ] {
        let r = rocks.read_log(from, 7, 150);
        let m = memory.read_log(from, 7, 150);
        assert_eq!(format!("{r:?}"), format!("{m:?}"), "from {from}");
    }
    assert_eq!(log_keys(&rocks), log_keys(&memory));
    assert_eq!(data(&rocks), data(&memory));
}

// ---- checkpoints -------------------------------------------------------------

#[tokio::test]
async fn checkpoint_reports_its_sequence_and_carries_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target_parent = tempfile::tempdir().expect("tempdir");
    let target = target_parent.path().join("checkpoint");
    let store = open(dir.path(), 1_000);
    for n in 1..=40 {
        store.commit(numbered(n)).await.expect("commit");
    }
    assert_eq!(store.checkpoint(&target).expect("checkpoint"), 40);
    store.commit(numbered(41)).await.expect("commit");

    let copy = open(&target, 1_000);
    assert_eq!(copy.last_sequence(), 40);
    assert_eq!(copy.first_logged(), 1);
    assert_eq!(
        copy.read_log(1, usize::MAX, usize::MAX).expect("read"),
        store.read_log(1, 40, usize::MAX).expect("read")
    );
    // Checkpointing onto an existing directory is refused, and the store
    // keeps working.
    assert!(matches!(store.checkpoint(&target), Err(Error::Io(_))));
    assert_eq!(store.commit(numbered(42)).await.expect("commit"), 42);
}

#[test]
fn checkpoint_is_exact_under_concurrent_commits() {
    const WRITERS: u64 = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let targets = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path(), 1_000_000));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            runtime.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = Batch::new();
                    batch.put(Cf::Messages, format!("w{w}/{n:08}"), vec![b'x'; 64]);
                    batch.put(Cf::Dedupe, format!("w{w}"), n.to_be_bytes());
                    batch.set_sync(n.is_multiple_of(4));
                    store.commit(batch).await.expect("commit");
                    n += 1;
                    if n.is_multiple_of(16) {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();

    let mut checkpoints = Vec::new();
    for i in 0..4 {
        // Let the writers get going between checkpoints.
        let before = store.last_sequence();
        while store.last_sequence() < before + 200 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let target = targets.path().join(format!("cp{i}"));
        let sequence = store.checkpoint(&target).expect("checkpoint");
        assert!(sequence >= before + 200, "{sequence} < {before} + 200");
        checkpoints.push((target, sequence));
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        runtime.block_on(writer).expect("writer");
    }
    let last = store.last_sequence();
    println!("checkpoints at {checkpoints:?}, store at {last}");
    assert!(checkpoints.iter().all(|(_, s)| *s < last));

    let log = store.read_log(1, usize::MAX, usize::MAX).expect("read");
    assert_eq!(log.len() as u64, last);
    for (target, sequence) in checkpoints {
        let copy = open(&target, 1_000_000);
        assert_eq!(copy.last_sequence(), sequence);
        let count = usize::try_from(sequence).expect("fits");
        // The same log, up to the sequence and not beyond.
        let copy_log = copy.read_log(1, usize::MAX, usize::MAX).expect("read");
        assert_eq!(copy_log.as_slice(), &log[..count]);
        // The data is exactly batches 1..=sequence: nothing torn, nothing
        // from a later batch.
        let replayed = replay(&log[..count]);
        assert_eq!(data(&copy), data(&replayed), "checkpoint at {sequence}");
    }
}

#[test]
fn a_paused_log_keeps_nothing_and_restarts_at_the_next_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 100);
    commit_one_by_one(&store, 1..=5);
    assert_eq!(store.first_logged(), 1);

    store.pause_log(true);
    commit_one_by_one(&store, 6..=8);
    // The first paused write empties the log; nothing of 6..=8 is kept.
    assert_eq!(store.first_logged(), 9);
    assert!(log_keys(&store).is_empty(), "{:?}", log_keys(&store));
    assert!(store
        .read_log(6, 10, 1 << 20)
        .unwrap_or_default()
        .is_empty());

    store.pause_log(false);
    commit_queued(&store, 9..=12);
    assert_eq!(store.first_logged(), 9);
    assert_eq!(log_keys(&store), vec![9, 10, 11, 12]);
    let read = store.read_log(9, 10, 1 << 20).expect("read log");
    assert_eq!(sequences(&read), vec![9, 10, 11, 12]);
    assert_eq!(Batch::decode(&read[0].bytes).expect("decode"), numbered(9));

    // Reopened, the log still starts where logging resumed.
    drop(store);
    let store = open(dir.path(), 100);
    assert_eq!(store.first_logged(), 9);
    assert_eq!(store.last_sequence(), 12);
}

#[test]
fn settled_waits_for_every_commit_queued_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), 0);
    // Queued and dropped unawaited, as a stopped replication stream leaves
    // them: they are applied all the same, and settled() comes after them.
    for n in 1..=500 {
        drop(store.commit(numbered(n)));
    }
    let runtime = runtime();
    assert_eq!(runtime.block_on(store.settled()).expect("settled"), 500);
    assert_eq!(store.last_sequence(), 500);
    // Nothing was written by it.
    assert_eq!(runtime.block_on(store.settled()).expect("settled"), 500);
    assert_eq!(
        runtime
            .block_on(store.commit(numbered(501)))
            .expect("commit"),
        501
    );
}

/// A batch that no history here holds: its key must never show up.
fn stray() -> Batch {
    let mut batch = Batch::new();
    batch.put(Cf::Messages, "stray", "written out of place");
    batch.set_sync(true);
    batch
}

#[test]
fn commit_as_refuses_a_batch_out_of_place_before_writing_it() {
    // Each commit awaited alone (a group of one), and all queued at once
    // (the refused batches fall inside groups).
    for queued in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), 100);
        let runtime = runtime();
        let expected: Vec<Result<u64, (u64, u64)>> =
            vec![Ok(1), Ok(2), Err((2, 3)), Ok(3), Err((9, 4)), Ok(4)];
        let make = |i: usize| match i {
            0 => store.commit(numbered(1)),
            1 => store.commit_as(numbered(2), 2),
            // A second writer with the number already taken.
            2 => store.commit_as(stray(), 2),
            3 => store.commit_as(numbered(3), 3),
            // One that would leave a gap.
            4 => store.commit_as(stray(), 9),
            _ => store.commit(numbered(4)),
        };
        let results: Vec<_> = if queued {
            let commits: Vec<_> = (0..expected.len()).map(make).collect();
            commits.into_iter().map(|c| runtime.block_on(c)).collect()
        } else {
            (0..expected.len())
                .map(|i| runtime.block_on(make(i)))
                .collect()
        };
        for (i, (got, want)) in results.iter().zip(&expected).enumerate() {
            match (got, want) {
                (Ok(s), Ok(w)) => assert_eq!(s, w, "commit {i} (queued {queued})"),
                (Err(Error::OutOfOrder { wanted, next }), Err((w, n))) => {
                    assert_eq!((wanted, next), (w, n), "commit {i} (queued {queued})");
                }
                _ => panic!("commit {i} (queued {queued}): got {got:?}, want {want:?}"),
            }
        }
        let check = |store: &RocksStore| {
            assert_eq!(store.last_sequence(), 4);
            assert_eq!(store.get(Cf::Messages, b"stray").expect("get"), None);
            let logged = store.read_log(1, 100, usize::MAX).expect("read log");
            assert_eq!(sequences(&logged), [1, 2, 3, 4]);
            for (n, b) in (1..).zip(&logged) {
                assert_eq!(b.bytes, numbered(n).encode(), "logged batch {n}");
            }
            assert_eq!(data(store), data(&replay(&logged)));
        };
        check(&store);
        drop(store);
        check(&open(dir.path(), 100));
    }
}
