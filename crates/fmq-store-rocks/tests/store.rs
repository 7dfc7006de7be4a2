//! Behaviour of `RocksStore` on real directories: write, close (or crash),
//! reopen, check.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use fmq_store::{decode_sequence, Batch, Cf, Error, MemoryStore, Op, Store, META_SEQUENCE};
use fmq_store_rocks::{RocksOptions, RocksStore};
use proptest::prelude::*;

type Contents = BTreeMap<Cf, Vec<(Vec<u8>, Vec<u8>)>>;

fn open(dir: &Path) -> RocksStore {
    RocksStore::open(dir, RocksOptions::default()).expect("open store")
}

/// Every row of every column family, through the public scan.
fn contents(store: &dyn Store) -> Contents {
    Cf::ALL
        .iter()
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

fn put(cf: Cf, key: &str, value: &str, sync: bool) -> Batch {
    let mut batch = Batch::new();
    batch.put(cf, key.as_bytes(), value.as_bytes());
    batch.set_sync(sync);
    batch
}

#[tokio::test]
async fn round_trip_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        assert_eq!(store.last_sequence(), 0);
        assert_eq!(store.path(), dir.path());
        let mut first = put(Cf::Messages, "m1", "hello", true);
        first.put(Cf::QueueEntries, b"q1/1".to_vec(), b"m1".to_vec());
        assert_eq!(store.commit(first).await.expect("commit"), 1);
        let mut second = put(Cf::Principals, "alice", "hash", false);
        second.delete(Cf::QueueEntries, b"q1/1".to_vec());
        assert_eq!(store.commit(second).await.expect("commit"), 2);
        assert_eq!(
            store.get(Cf::Messages, b"m1").expect("get"),
            Some(b"hello".to_vec())
        );
        assert_eq!(store.last_sequence(), 2);
        let stats = store.stats();
        assert_eq!(stats.batches_committed, 2);
        assert!(stats.bytes_written > 0);
    }
    let store = open(dir.path());
    assert_eq!(store.last_sequence(), 2);
    assert_eq!(
        store.get(Cf::Messages, b"m1").expect("get"),
        Some(b"hello".to_vec())
    );
    assert_eq!(
        store.get(Cf::Principals, b"alice").expect("get"),
        Some(b"hash".to_vec())
    );
    assert_eq!(store.get(Cf::QueueEntries, b"q1/1").expect("get"), None);
    let stored = store
        .get(Cf::Meta, META_SEQUENCE)
        .expect("get")
        .expect("sequence stored");
    assert_eq!(decode_sequence(&stored).expect("decode"), 2);
    // Numbering continues where it stopped.
    assert_eq!(
        store
            .commit(put(Cf::Messages, "m2", "x", true))
            .await
            .expect("commit"),
        3
    );
}

#[tokio::test]
async fn scan_prefix_stays_inside_the_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let mut batch = Batch::new();
    for key in ["q1/1", "q1/2", "q1\u{7f}", "q10", "q2/1", "q"] {
        batch.put(Cf::QueueEntries, key.as_bytes().to_vec(), Vec::new());
    }
    batch.put(Cf::QueueEntries, b"\xff\xff/a".to_vec(), b"edge".to_vec());
    store.commit(batch).await.expect("commit");
    let scan = |prefix: &[u8]| {
        let mut seen = Vec::new();
        store
            .scan_prefix(Cf::QueueEntries, prefix, &mut |k, _| {
                seen.push(k.to_vec());
                Ok(())
            })
            .expect("scan");
        seen
    };
    assert_eq!(scan(b"q1/"), [b"q1/1".to_vec(), b"q1/2".to_vec()]);
    assert_eq!(scan(b"\xff\xff"), [b"\xff\xff/a".to_vec()]);
    assert_eq!(scan(b"").len(), 7);
    assert!(scan(b"z").is_empty());

    // An error from the callback stops the scan and is returned as is.
    let mut calls = 0;
    let err = store
        .scan_prefix(Cf::QueueEntries, b"q", &mut |_, _| {
            calls += 1;
            Err(Error::Corrupt("stop".into()))
        })
        .expect_err("callback error");
    assert!(matches!(err, Error::Corrupt(_)), "{err}");
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn put_then_delete_in_separate_commits_leaves_key_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        for round in 0..50 {
            let key = format!("m{round}");
            // Both commits are queued before either is awaited, so they are
            // likely to land in one group: order inside a group matters.
            let put = store.commit(put(Cf::Messages, &key, "body", round % 2 == 0));
            let mut delete = Batch::new();
            delete.delete(Cf::Messages, key.as_bytes().to_vec());
            let delete = store.commit(delete);
            let (p, d) = (put.await.expect("put"), delete.await.expect("delete"));
            assert_eq!(d, p + 1);
            assert_eq!(store.get(Cf::Messages, key.as_bytes()).expect("get"), None);
        }
    }
    let store = open(dir.path());
    assert!(contents(&store)[&Cf::Messages].is_empty());
    assert_eq!(store.last_sequence(), 100);
}

#[test]
fn second_open_of_a_locked_directory_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let err = RocksStore::open(dir.path(), RocksOptions::default()).expect_err("must be locked");
    assert!(matches!(err, Error::Locked { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("locked by another process"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    // Closing releases the directory.
    drop(store);
    drop(open(dir.path()));
}

#[test]
fn synced_commits_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let mut sequences = runtime.block_on(async {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let commit = store.commit(put(Cf::Messages, &format!("m{i:03}"), "x", true));
                    commit.await.expect("commit")
                })
            })
            .collect();
        let mut sequences = Vec::new();
        for task in tasks {
            sequences.push(task.await.expect("task"));
        }
        sequences
    });
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=200).collect::<Vec<u64>>());
    let stats = store.stats();
    println!(
        "200 synced commits: {} group writes, {} synced writes, {} bytes",
        stats.group_writes, stats.synced_writes, stats.bytes_written
    );
    assert_eq!(stats.batches_committed, 200);
    assert!(
        stats.synced_writes < 200,
        "no group commit: {} fsyncs",
        stats.synced_writes
    );
    assert_eq!(store.last_sequence(), 200);
    assert_eq!(contents(&*store)[&Cf::Messages].len(), 200);
}

/// Closed loop: each producer waits for its commit before making the next,
/// as a broker connection does with receipts. Commits can only share an
/// fsync because they arrive while another one is in progress.
#[test]
fn producers_waiting_on_each_commit_share_fsyncs() {
    const PRODUCERS: u64 = 16;
    const EACH: u64 = 25;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut last = 0;
                    for n in 0..EACH {
                        let batch = put(Cf::Messages, &format!("p{p}/{n:03}"), "x", true);
                        let sequence = store.commit(batch).await.expect("commit");
                        assert!(sequence > last, "a producer's commits apply in order");
                        last = sequence;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
    let elapsed = started.elapsed();
    let stats = store.stats();
    let total = PRODUCERS * EACH;
    println!(
        "{total} synced commits from {PRODUCERS} closed-loop producers in {elapsed:?}: \
         {} synced writes, {:.1} batches per fsync",
        stats.synced_writes,
        total as f64 / stats.synced_writes as f64
    );
    assert_eq!(stats.batches_committed, total);
    assert_eq!(store.last_sequence(), total);
    assert!(
        stats.synced_writes < total / 2,
        "group commit should at least halve the fsyncs: {stats:?}"
    );
}

#[test]
fn unsynced_commits_do_not_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let commits: Vec<_> = (0..20)
        .map(|i| store.commit(put(Cf::Dedupe, &format!("p{i}"), "1", false)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (expected, commit) in (1..).zip(commits) {
        assert_eq!(runtime.block_on(commit).expect("commit"), expected);
    }
    assert_eq!(store.stats().synced_writes, 0);
    store.sync().expect("sync");
    drop(store);
    // With sync off altogether, even synced batches skip the fsync.
    let store = RocksStore::open(
        dir.path(),
        RocksOptions {
            sync: false,
            ..RocksOptions::default()
        },
    )
    .expect("open");
    assert_eq!(store.last_sequence(), 20);
    runtime
        .block_on(store.commit(put(Cf::Dedupe, "p", "1", true)))
        .expect("commit");
    assert_eq!(store.stats().synced_writes, 0);
}

#[test]
fn small_group_cap_still_applies_everything_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RocksStore::open(
        dir.path(),
        RocksOptions {
            max_group_bytes: 256,
            ..RocksOptions::default()
        },
    )
    .expect("open");
    let value = "v".repeat(100);
    // Each batch is about half the cap, one is bigger than the cap.
    let mut commits: Vec<_> = (0..40)
        .map(|i| store.commit(put(Cf::Messages, "k", &format!("{i}{value}"), false)))
        .collect();
    commits.push(store.commit(put(Cf::Messages, "k", &"w".repeat(1000), true)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (expected, commit) in (1..).zip(commits) {
        assert_eq!(runtime.block_on(commit).expect("commit"), expected);
    }
    assert_eq!(
        store.get(Cf::Messages, b"k").expect("get"),
        Some("w".repeat(1000).into_bytes())
    );
    let stats = store.stats();
    println!("group cap 256 B: {stats:?}");
    assert!(
        stats.group_writes >= 20,
        "groups must respect the cap: {stats:?}"
    );
}

#[test]
fn drop_completes_queued_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let commits: Vec<_> = (0..500)
        .map(|i| store.commit(put(Cf::Messages, &format!("m{i:03}"), "x", i % 50 == 0)))
        .collect();
    drop(store);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (expected, commit) in (1..).zip(commits) {
        assert_eq!(runtime.block_on(commit).expect("commit"), expected);
    }
    let store = open(dir.path());
    assert_eq!(store.last_sequence(), 500);
    assert_eq!(contents(&store)[&Cf::Messages].len(), 500);
}

#[tokio::test]
async fn checkpoint_opens_as_an_identical_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target_parent = tempfile::tempdir().expect("tempdir");
    let target = target_parent.path().join("checkpoint");
    let store = open(dir.path());
    for i in 0..100 {
        let mut batch = put(Cf::Messages, &format!("m{i:03}"), "body", i % 10 == 0);
        batch.put(
            Cf::QueueEntries,
            format!("q/{i:03}").into_bytes(),
            b"m".to_vec(),
        );
        if i % 3 == 0 {
            batch.delete(Cf::QueueEntries, format!("q/{i:03}").into_bytes());
        }
        store.commit(batch).await.expect("commit");
    }
    assert_eq!(store.checkpoint(&target).expect("checkpoint"), 100);
    // Writes after the checkpoint do not reach it.
    let before = contents(&store);
    store
        .commit(put(Cf::Messages, "later", "x", true))
        .await
        .expect("commit");

    let copy = open(&target);
    assert_eq!(copy.last_sequence(), 100);
    assert_eq!(contents(&copy), before);
    assert_eq!(copy.get(Cf::Messages, b"later").expect("get"), None);
    // Checkpointing onto an existing directory is refused.
    assert!(store.checkpoint(&target).is_err());
}

// ---- model test ------------------------------------------------------------

fn arb_cf() -> impl Strategy<Value = Cf> {
    // Every family but the log, which only the store writes.
    (0u8..8).prop_map(|tag| Cf::from_tag(tag).expect("tag in range"))
}

fn arb_op() -> impl Strategy<Value = Op> {
    // A small key space, so puts overwrite and deletes hit.
    let key = proptest::collection::vec(0u8..4, 0..3);
    let value = proptest::collection::vec(any::<u8>(), 0..32);
    prop_oneof![
        3 => (arb_cf(), key.clone(), value).prop_map(|(cf, key, value)| Op::Put { cf, key, value }),
        1 => (arb_cf(), key).prop_map(|(cf, key)| Op::Delete { cf, key }),
    ]
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    (proptest::collection::vec(arb_op(), 0..6), any::<bool>()).prop_map(|(ops, sync)| {
        let mut batch = Batch::new();
        for op in ops {
            match op {
                Op::Put { cf, key, value } => batch.put(cf, key, value),
                Op::Delete { cf, key } => batch.delete(cf, key),
            }
        }
        batch.set_sync(sync);
        batch
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rocks_store_matches_memory_store(
        rounds in proptest::collection::vec(proptest::collection::vec(arb_batch(), 1..8), 1..6)
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let memory = MemoryStore::new();
        {
            let rocks = open(dir.path());
            for round in &rounds {
                // Queue a whole round before awaiting it, so groups form.
                let pending: Vec<_> = round.iter().map(|b| rocks.commit(b.clone())).collect();
                for (batch, commit) in round.iter().zip(pending) {
                    let expected = runtime.block_on(memory.commit(batch.clone())).expect("memory");
                    prop_assert_eq!(runtime.block_on(commit).expect("rocks"), expected);
                }
                prop_assert_eq!(rocks.last_sequence(), memory.last_sequence());
                prop_assert_eq!(contents(&rocks), contents(&memory));
            }
        }
        let reopened = open(dir.path());
        prop_assert_eq!(reopened.last_sequence(), memory.last_sequence());
        prop_assert_eq!(contents(&reopened), contents(&memory));
    }
}

/// `n` batches numbered from `first`, one key each, synced where `synced`.
fn numbered(first: u64, n: u64, synced: impl Fn(u64) -> bool) -> Vec<(u64, Batch)> {
    (first..first + n)
        .map(|s| (s, put(Cf::Messages, &format!("g{s:05}"), "x", synced(s))))
        .collect()
}

#[tokio::test]
async fn a_group_written_on_the_calling_thread_is_one_write_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = MemoryStore::new();
    {
        let store = open(dir.path());
        for s in 1..=2 {
            let batch = put(Cf::Principals, &format!("q{s}"), "x", true);
            assert_eq!(memory.commit(batch.clone()).await.expect("memory"), s);
            assert_eq!(store.commit(batch).await.expect("commit"), s);
        }
        let before = store.stats();
        let group = numbered(3, 5, |s| s == 5);
        assert_eq!(memory.commit_group_now(&group).expect("memory"), 7);
        assert_eq!(store.commit_group_now(&group).expect("group"), 7);
        let after = store.stats();
        assert_eq!(after.batches_committed - before.batches_committed, 5);
        assert_eq!(after.group_writes - before.group_writes, 1);
        assert_eq!(after.synced_writes - before.synced_writes, 1);
        assert_eq!(store.last_sequence(), 7);
        // The writer thread numbers on from the group.
        let next = put(Cf::Principals, "q8", "x", true);
        assert_eq!(memory.commit(next.clone()).await.expect("memory"), 8);
        assert_eq!(store.commit(next).await.expect("commit"), 8);
    }
    let store = open(dir.path());
    assert_eq!(store.last_sequence(), 8);
    assert!(
        contents(&store) == contents(&memory),
        "reopened store differs"
    );
}

#[test]
fn a_group_out_of_place_is_refused_unwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks = open(dir.path());
    let memory = MemoryStore::new();
    for store in [&rocks as &dyn Store, &memory] {
        let empty = contents(store);
        // (group, the refused number, the store's next number)
        let cases = [
            (numbered(2, 1, |_| true), 2, 1),
            (numbered(0, 2, |_| true), 0, 1),
            (
                numbered(1, 1, |_| true)
                    .into_iter()
                    .chain(numbered(3, 1, |_| true))
                    .collect(),
                3,
                2,
            ),
        ];
        for (group, wanted, next) in cases {
            match store.commit_group_now(&group) {
                Err(Error::OutOfOrder { wanted: w, next: n }) => {
                    assert_eq!((w, n), (wanted, next), "{store:?}");
                }
                other => panic!("{store:?}: group {wanted} refused as {other:?}"),
            }
            assert_eq!(store.last_sequence(), 0, "{store:?}");
            assert!(contents(store) == empty, "{store:?} wrote a refused group");
        }
        assert!(store.commit_group_now(&[]).is_err(), "{store:?}");
    }
}

/// Groups written on one thread while commits queue for the writer thread
/// from others: every batch gets its own number, none is lost or stored
/// twice, and a group numbered for a place a queued commit took is refused
/// unwritten (the writer of groups then reads where the store is and tries
/// again, as a passive server's next subscription does).
#[test]
fn groups_and_queued_commits_never_share_a_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open(dir.path()));
    let grouper = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let mut written = Vec::new();
            let mut refused = 0;
            while written.len() < 300 {
                let first = store.last_sequence() + 1;
                // Keyed by sequence: a number is written once, so no key twice.
                let group = numbered(first, 3, |_| true);
                match store.commit_group_now(&group) {
                    Ok(last) => {
                        assert_eq!(last, first + 2);
                        written.extend(first..=last);
                    }
                    Err(Error::OutOfOrder { .. }) => refused += 1,
                    Err(e) => panic!("group at {first}: {e}"),
                }
            }
            (written, refused)
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut numbers = runtime.block_on(async {
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut numbers = Vec::new();
                    for i in 0..75 {
                        let batch = put(Cf::Messages, &format!("queued-{t}-{i:02}"), "x", true);
                        numbers.push(store.commit(batch).await.expect("commit"));
                    }
                    numbers
                })
            })
            .collect();
        let mut numbers = Vec::new();
        for task in tasks {
            numbers.extend(task.await.expect("task"));
        }
        numbers
    });
    let (written, refused) = grouper.join().expect("grouper");
    println!("groups refused for a place a queued commit took: {refused}");
    numbers.extend(written);
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=600).collect::<Vec<u64>>());
    assert_eq!(store.last_sequence(), 600);
    assert_eq!(contents(&*store)[&Cf::Messages].len(), 600);
}
