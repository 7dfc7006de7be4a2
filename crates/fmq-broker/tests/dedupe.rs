//! Once-only sends over real TCP: SENDs carrying `fmq-producer-id` and
//! `fmq-sequence` are dropped when their sequence is not above the producer's
//! mark, and still receipted with `fmq-duplicate:true`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{body, open_config, Conn, TestBroker};
use fmq_broker::Config;
use fmq_proto::{Command, Frame};
use fmq_store::{Cf, MemoryStore, Store};

const PERSISTENT: &[(&str, &str)] = &[("persistent", "true")];

/// A SEND from `producer` numbered `seq`, body `producer-seq`.
fn numbered(dest: &str, producer: &str, seq: u64, extra: &[(&str, &str)]) -> Frame {
    let mut f = Frame::new(Command::Send)
        .header("destination", dest)
        .header("fmq-producer-id", producer)
        .header("fmq-sequence", seq.to_string());
    for (k, v) in extra {
        f = f.header(*k, *v);
    }
    f.with_body(format!("{producer}-{seq}").into_bytes())
}

/// Sends a numbered SEND with a receipt and returns the RECEIPT.
async fn send_seq(
    c: &mut Conn,
    dest: &str,
    producer: &str,
    seq: u64,
    extra: &[(&str, &str)],
) -> Frame {
    let receipt = format!("r-{producer}-{seq}");
    c.send(numbered(dest, producer, seq, extra).header("receipt", receipt.as_str()))
        .await;
    receipt_for(c, &receipt).await
}

async fn receipt_for(c: &mut Conn, receipt: &str) -> Frame {
    let r = c.recv().await;
    assert_eq!(r.command, Command::Receipt, "expected RECEIPT, got {r:?}");
    assert_eq!(r.get("receipt-id"), Some(receipt));
    r
}

fn duplicate(receipt: &Frame) -> bool {
    match receipt.get("fmq-duplicate") {
        None => false,
        Some("true") => true,
        Some(other) => panic!("fmq-duplicate:{other}"),
    }
}

/// Consumes `/queue/NAME` and returns every body that arrives until it has
/// been quiet for 300 ms.
async fn drain(b: &TestBroker, dest: &str) -> Vec<String> {
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("drain", dest, "auto", &[]).await;
    let mut got = Vec::new();
    while let Some(f) = c.try_recv(Duration::from_millis(300)).await {
        assert_eq!(f.command, Command::Message, "{f:?}");
        got.push(body(&f));
    }
    got
}

#[tokio::test]
async fn a_resent_message_is_receipted_as_a_duplicate_and_not_delivered() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    let r = send_seq(&mut p, "/queue/d", "p", 1, PERSISTENT).await;
    assert!(!duplicate(&r), "first send is fresh: {r:?}");
    let r = send_seq(&mut p, "/queue/d", "p", 1, PERSISTENT).await;
    assert!(duplicate(&r), "resend is a duplicate: {r:?}");
    // A producer that reconnects (as after a failover) keeps its mark, and a
    // duplicate without a receipt is dropped silently.
    drop(p);
    let mut p = Conn::connect(b.addr, &[]).await;
    p.send(numbered("/queue/d", "p", 1, PERSISTENT)).await;
    let r = send_seq(&mut p, "/queue/d", "p", 2, PERSISTENT).await;
    assert!(!duplicate(&r));
    assert_eq!(drain(&b, "/queue/d").await, ["p-1", "p-2"]);
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!(stats.duplicates, 2);
    assert_eq!(stats.producers, 1);
    b.stop().await;
}

#[tokio::test]
async fn consumers_see_the_producer_headers() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/h", "auto", &[]).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    send_seq(&mut p, "/queue/h", "orders:eu", 7, &[]).await;
    let m = c.message().await;
    assert_eq!(m.get("fmq-producer-id"), Some("orders:eu"));
    assert_eq!(m.get("fmq-sequence"), Some("7"));
    b.stop().await;
}

#[tokio::test]
async fn a_gap_is_accepted_and_moves_the_mark() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    let mut verdicts = Vec::new();
    for seq in [1, 5, 3, 5, 6] {
        let r = send_seq(&mut p, "/queue/g", "p", seq, PERSISTENT).await;
        verdicts.push((seq, duplicate(&r)));
    }
    assert_eq!(
        verdicts,
        [(1, false), (5, false), (3, true), (5, true), (6, false)]
    );
    assert_eq!(drain(&b, "/queue/g").await, ["p-1", "p-5", "p-6"]);
    b.stop().await;
}

#[tokio::test]
async fn producers_have_independent_marks() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    assert!(!duplicate(&send_seq(&mut p, "/queue/i", "a", 3, &[]).await));
    assert!(!duplicate(&send_seq(&mut p, "/queue/i", "b", 1, &[]).await));
    assert!(!duplicate(&send_seq(&mut p, "/queue/i", "b", 2, &[]).await));
    assert!(duplicate(&send_seq(&mut p, "/queue/i", "a", 2, &[]).await));
    // The mark is per producer, not per destination.
    assert!(duplicate(
        &send_seq(&mut p, "/queue/other", "b", 2, &[]).await
    ));
    assert_eq!(drain(&b, "/queue/i").await, ["a-3", "b-1", "b-2"]);
    assert_eq!(drain(&b, "/queue/other").await, Vec::<String>::new());
    b.stop().await;
}

#[tokio::test]
async fn the_mark_of_persistent_sends_survives_a_restart_on_the_same_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let b = TestBroker::start_on(store.clone(), open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    for seq in 1..=3 {
        send_seq(&mut p, "/queue/r", "durable", seq, PERSISTENT).await;
    }
    // Non-persistent sends move the mark in memory only.
    send_seq(&mut p, "/queue/r", "volatile", 1, &[]).await;
    assert!(duplicate(
        &send_seq(&mut p, "/queue/r", "volatile", 1, &[]).await
    ));
    drop(p);
    b.stop().await;
    assert!(store.get(Cf::Dedupe, b"durable").expect("get").is_some());
    assert!(store.get(Cf::Dedupe, b"volatile").expect("get").is_none());

    let b = TestBroker::start_on(store.clone(), open_config()).await;
    assert_eq!(b.broker.stats().await.expect("stats").producers, 1);
    let mut p = Conn::connect(b.addr, &[]).await;
    for seq in 2..=3 {
        assert!(duplicate(
            &send_seq(&mut p, "/queue/r", "durable", seq, PERSISTENT).await
        ));
    }
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/r", "durable", 4, PERSISTENT).await
    ));
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/r", "volatile", 1, &[]).await
    ));
    assert_eq!(
        drain(&b, "/queue/r").await,
        [
            "durable-1",
            "durable-2",
            "durable-3",
            "durable-4",
            "volatile-1"
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn a_persistent_send_with_no_stored_copy_still_stores_its_mark() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let b = TestBroker::start_on(store.clone(), open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    // A topic without durable subscribers keeps no copy of the message.
    send_seq(&mut p, "/topic/nobody", "t", 1, PERSISTENT).await;
    drop(p);
    b.stop().await;
    let b = TestBroker::start_on(store, open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    assert!(duplicate(
        &send_seq(&mut p, "/topic/nobody", "t", 1, PERSISTENT).await
    ));
    b.stop().await;
}

async fn begin(p: &mut Conn, tx: &str) {
    p.send_receipted(
        Frame::new(Command::Begin).header("transaction", tx),
        "begin",
    )
    .await;
}

/// COMMITs `tx` and returns its RECEIPT.
async fn commit(p: &mut Conn, tx: &str) -> Frame {
    p.send(
        Frame::new(Command::Commit)
            .header("transaction", tx)
            .header("receipt", "commit"),
    )
    .await;
    receipt_for(p, "commit").await
}

#[tokio::test]
async fn duplicates_within_a_transaction_are_dropped_at_commit() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    begin(&mut p, "t1").await;
    for seq in [1, 2, 2, 1, 3] {
        // Each SEND's own RECEIPT comes at once, before any check.
        let r = send_seq(
            &mut p,
            "/queue/t",
            "tx",
            seq,
            &[("transaction", "t1"), ("persistent", "true")],
        )
        .await;
        assert!(!duplicate(&r));
    }
    assert_eq!(drain(&b, "/queue/t").await, Vec::<String>::new());
    let r = commit(&mut p, "t1").await;
    assert_eq!(r.get("fmq-duplicates"), Some("2"), "{r:?}");
    assert_eq!(drain(&b, "/queue/t").await, ["tx-1", "tx-2", "tx-3"]);

    // A transaction without duplicates has no count on its RECEIPT.
    begin(&mut p, "t2").await;
    p.send(numbered("/queue/t", "tx", 4, PERSISTENT).header("transaction", "t2"))
        .await;
    let r = commit(&mut p, "t2").await;
    assert_eq!(r.get("fmq-duplicates"), None, "{r:?}");
    assert_eq!(drain(&b, "/queue/t").await, ["tx-4"]);
    assert_eq!(b.broker.stats().await.expect("stats").duplicates, 2);
    b.stop().await;
}

#[tokio::test]
async fn a_transaction_is_checked_against_the_mark_at_commit_not_at_send() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    begin(&mut p, "t").await;
    for seq in [1, 2] {
        p.send(numbered("/queue/c", "tx", seq, PERSISTENT).header("transaction", "t"))
            .await;
    }
    // Sent outside the transaction before its COMMIT: the transaction's
    // copies, at or below the new mark, are the duplicates.
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/c", "tx", 2, PERSISTENT).await
    ));
    let r = commit(&mut p, "t").await;
    assert_eq!(r.get("fmq-duplicates"), Some("2"), "{r:?}");
    assert_eq!(drain(&b, "/queue/c").await, ["tx-2"]);
    b.stop().await;
}

#[tokio::test]
async fn an_aborted_transaction_leaves_the_mark_alone() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    begin(&mut p, "t").await;
    p.send(numbered("/queue/a", "tx", 1, PERSISTENT).header("transaction", "t"))
        .await;
    p.send_receipted(
        Frame::new(Command::Abort).header("transaction", "t"),
        "abort",
    )
    .await;
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/a", "tx", 1, PERSISTENT).await
    ));
    assert_eq!(drain(&b, "/queue/a").await, ["tx-1"]);
    b.stop().await;
}

#[tokio::test]
async fn bad_dedupe_headers_get_an_error_naming_header_and_value() {
    let b = TestBroker::start(open_config()).await;
    let long = "x".repeat(129);
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("fmq-producer-id", "p")],
            "fmq-producer-id header 'p' needs an fmq-sequence header".into(),
        ),
        (
            vec![("fmq-sequence", "4")],
            "fmq-sequence header '4' needs an fmq-producer-id header".into(),
        ),
        (
            vec![("fmq-producer-id", "p"), ("fmq-sequence", "0")],
            "fmq-sequence header '0'".into(),
        ),
        (
            vec![("fmq-producer-id", "p"), ("fmq-sequence", "seven")],
            "fmq-sequence header 'seven'".into(),
        ),
        (
            vec![("fmq-producer-id", ""), ("fmq-sequence", "1")],
            "fmq-producer-id header ''".into(),
        ),
        (
            vec![("fmq-producer-id", long.as_str()), ("fmq-sequence", "1")],
            format!("fmq-producer-id header '{long}'"),
        ),
        // Checked when sent in a transaction too, not only at COMMIT.
        (
            vec![
                ("transaction", "t"),
                ("fmq-producer-id", "p"),
                ("fmq-sequence", "-1"),
            ],
            "fmq-sequence header '-1'".into(),
        ),
    ];
    for (headers, needle) in cases {
        let mut c = Conn::connect(b.addr, &[]).await;
        if headers.iter().any(|(k, _)| *k == "transaction") {
            c.send_receipted(Frame::new(Command::Begin).header("transaction", "t"), "b")
                .await;
        }
        let mut f = Frame::new(Command::Send)
            .header("destination", "/queue/bad")
            .header("persistent", "true")
            .header("receipt", "r");
        for (k, v) in &headers {
            f = f.header(*k, *v);
        }
        c.refused(
            f.with_body(b"never".to_vec()),
            &needle,
            &format!("{headers:?}"),
        )
        .await;
    }
    assert_eq!(drain(&b, "/queue/bad").await, Vec::<String>::new());
    assert_eq!(b.broker.stats().await.expect("stats").producers, 0);
    b.stop().await;
}

#[tokio::test]
async fn producers_idle_past_the_retention_are_forgotten() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = Config {
        dedupe_retention: Duration::from_millis(500),
        expiry_sweep: Duration::from_millis(50),
        ..open_config()
    };
    let b = TestBroker::start_on(store.clone(), config.clone()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    send_seq(&mut p, "/queue/old", "idle", 1, PERSISTENT).await;
    assert!(store.get(Cf::Dedupe, b"idle").expect("get").is_some());
    let mut forgotten = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = b.broker.stats().await.expect("stats");
        if stats.producers == 0 {
            assert_eq!(stats.producers_pruned, 1);
            forgotten = true;
            break;
        }
    }
    assert!(forgotten, "the idle producer is pruned");
    // Its stored record goes too (the sweep's batch precedes this RECEIPT).
    p.send_receipted(
        Frame::new(Command::Send).header("destination", "/queue/x"),
        "sync",
    )
    .await;
    assert!(store.get(Cf::Dedupe, b"idle").expect("get").is_none());
    // A resend after the retention is accepted again: the documented caveat.
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/old", "idle", 1, PERSISTENT).await
    ));
    drop(p);
    b.stop().await;

    // Marks that are already too old when the broker starts are dropped at
    // recovery.
    assert!(store.get(Cf::Dedupe, b"idle").expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = TestBroker::start_on(
        store.clone(),
        Config {
            expiry_sweep: Duration::from_secs(3600),
            ..config
        },
    )
    .await;
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!(
        (stats.producers, stats.producers_pruned),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(drain(&b, "/queue/old").await, ["idle-1", "idle-1"]);
    b.stop().await;
    assert!(store.get(Cf::Dedupe, b"idle").expect("get").is_none());
}

#[tokio::test]
async fn a_full_table_forgets_the_producer_idle_longest() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = Config {
        dedupe_max_producers: 2,
        ..open_config()
    };
    let b = TestBroker::start_on(store.clone(), config.clone()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    let pause = || tokio::time::sleep(Duration::from_millis(20));
    send_seq(&mut p, "/queue/e", "a", 1, PERSISTENT).await;
    pause().await;
    send_seq(&mut p, "/queue/e", "b", 1, PERSISTENT).await;
    pause().await;
    // A duplicate counts as use: "b" is now the one idle longest.
    assert!(duplicate(
        &send_seq(&mut p, "/queue/e", "a", 1, PERSISTENT).await
    ));
    pause().await;
    send_seq(&mut p, "/queue/e", "c", 1, PERSISTENT).await;
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!((stats.producers, stats.producers_evicted), (2, 1));
    assert!(store.get(Cf::Dedupe, b"b").expect("get").is_none());
    assert!(duplicate(
        &send_seq(&mut p, "/queue/e", "c", 1, PERSISTENT).await
    ));
    pause().await;
    assert!(duplicate(
        &send_seq(&mut p, "/queue/e", "a", 1, PERSISTENT).await
    ));
    pause().await;
    // "b" was forgotten: its resend is accepted, and "c" makes room.
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/e", "b", 1, PERSISTENT).await
    ));
    assert!(duplicate(
        &send_seq(&mut p, "/queue/e", "a", 1, PERSISTENT).await
    ));
    assert!(!duplicate(
        &send_seq(&mut p, "/queue/e", "c", 1, PERSISTENT).await
    ));
    drop(p);
    b.stop().await;

    // A smaller bound at start keeps the most recently used producers.
    let b = TestBroker::start_on(
        store.clone(),
        Config {
            dedupe_max_producers: 1,
            ..config
        },
    )
    .await;
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!((stats.producers, stats.producers_evicted), (1, 1));
    let mut p = Conn::connect(b.addr, &[]).await;
    assert!(duplicate(
        &send_seq(&mut p, "/queue/e", "c", 1, PERSISTENT).await
    ));
    b.stop().await;
}

/// COMMITs `tx` under the key (`producer`, `seq`) and returns its RECEIPT.
async fn commit_keyed(p: &mut Conn, tx: &str, producer: &str, seq: u64) -> Frame {
    p.send(
        Frame::new(Command::Commit)
            .header("transaction", tx)
            .header("fmq-producer-id", producer)
            .header("fmq-sequence", seq.to_string())
            .header("receipt", "commit"),
    )
    .await;
    receipt_for(p, "commit").await
}

/// A persistent SEND of `body` to `dest` in transaction `tx`.
fn in_tx(dest: &str, tx: &str, body: &str) -> Frame {
    Frame::new(Command::Send)
        .header("destination", dest)
        .header("persistent", "true")
        .header("transaction", tx)
        .with_body(body.as_bytes().to_vec())
}

fn ack_in_tx(msg: &Frame, tx: &str) -> Frame {
    Frame::new(Command::Ack)
        .header("id", msg.get("ack").expect("ack header"))
        .header("transaction", tx)
}

/// Publishes `body` to `dest` and returns a client-individual consumer
/// holding its delivery, unacknowledged.
async fn delivered(b: &TestBroker, dest: &str, body: &str) -> (Conn, Frame) {
    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish(dest, body, PERSISTENT).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", dest, "client-individual", &[]).await;
    let m = c.message().await;
    assert_eq!(common::body(&m), body, "{m:?}");
    (c, m)
}

#[tokio::test]
async fn a_keyed_commit_applies_once_and_its_duplicate_applies_nothing() {
    let b = TestBroker::start(open_config()).await;
    let (mut c, m) = delivered(&b, "/queue/kw", "work").await;
    begin(&mut c, "t1").await;
    c.send(in_tx("/queue/kout", "t1", "first")).await;
    let r = commit_keyed(&mut c, "t1", "session:tx", 1).await;
    assert!(!duplicate(&r), "a fresh key commits: {r:?}");
    assert_eq!(drain(&b, "/queue/kout").await, ["first"]);

    // Same key again, in a transaction with a send and an ACK: a no-op.
    begin(&mut c, "t2").await;
    c.send(in_tx("/queue/kout", "t2", "second")).await;
    c.send(ack_in_tx(&m, "t2")).await;
    let r = commit_keyed(&mut c, "t2", "session:tx", 1).await;
    assert!(duplicate(&r), "the key was taken: {r:?}");
    assert_eq!(r.get("fmq-duplicates"), None, "{r:?}");
    assert_eq!(drain(&b, "/queue/kout").await, Vec::<String>::new());
    // The ACK was not applied: the message is still delivered and
    // unacknowledged on this connection, and comes back when it closes.
    drop(c);
    assert_eq!(drain(&b, "/queue/kw").await, ["work"]);
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!((stats.duplicates, stats.producers), (1, 1), "{stats:?}");
    b.stop().await;
}

#[tokio::test]
async fn a_duplicate_commit_does_not_validate_its_acks() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    begin(&mut c, "t1").await;
    assert!(!duplicate(&commit_keyed(&mut c, "t1", "k", 3).await));
    // An ACK of a message this connection never received fails a fresh
    // COMMIT, but a duplicate one is answered as a no-op all the same.
    begin(&mut c, "t2").await;
    c.send(
        Frame::new(Command::Ack)
            .header("id", "987654321")
            .header("transaction", "t2"),
    )
    .await;
    assert!(duplicate(&commit_keyed(&mut c, "t2", "k", 2).await));
    begin(&mut c, "t3").await;
    c.send(
        Frame::new(Command::Ack)
            .header("id", "987654321")
            .header("transaction", "t3"),
    )
    .await;
    c.send(
        Frame::new(Command::Commit)
            .header("transaction", "t3")
            .header("fmq-producer-id", "k")
            .header("fmq-sequence", "4")
            .header("receipt", "commit"),
    )
    .await;
    let e = c.error().await;
    assert!(
        e.get("message")
            .unwrap_or_default()
            .contains("ACK of message 987654321"),
        "{e:?}"
    );
    // The refused COMMIT did not take its key.
    let mut c = Conn::connect(b.addr, &[]).await;
    begin(&mut c, "t4").await;
    c.send(in_tx("/queue/k4", "t4", "four")).await;
    assert!(!duplicate(&commit_keyed(&mut c, "t4", "k", 4).await));
    assert_eq!(drain(&b, "/queue/k4").await, ["four"]);
    b.stop().await;
}

#[tokio::test]
async fn an_empty_commit_that_takes_a_key_fences_a_later_commit_with_it() {
    let b = TestBroker::start(open_config()).await;
    let (mut c, m) = delivered(&b, "/queue/fw", "work").await;
    // The transaction of the first connection is ready to commit...
    begin(&mut c, "orig").await;
    c.send(in_tx("/queue/fout", "orig", "result")).await;
    c.send(ack_in_tx(&m, "orig")).await;
    // ...when another connection settles its key with an empty COMMIT.
    let mut other = Conn::connect(b.addr, &[]).await;
    begin(&mut other, "empty").await;
    let r = commit_keyed(&mut other, "empty", "app:tx-1", 7).await;
    assert!(!duplicate(&r), "the empty commit takes the key: {r:?}");
    // The original COMMIT, arriving late, is dropped whole.
    let r = commit_keyed(&mut c, "orig", "app:tx-1", 7).await;
    assert!(duplicate(&r), "{r:?}");
    assert_eq!(drain(&b, "/queue/fout").await, Vec::<String>::new());
    drop(c);
    assert_eq!(drain(&b, "/queue/fw").await, ["work"]);
    // The key's next sequence commits as usual.
    let (mut c, m) = delivered(&b, "/queue/fw2", "again").await;
    begin(&mut c, "next").await;
    c.send(ack_in_tx(&m, "next")).await;
    assert!(!duplicate(
        &commit_keyed(&mut c, "next", "app:tx-1", 8).await
    ));
    drop(c);
    assert_eq!(drain(&b, "/queue/fw2").await, Vec::<String>::new());
    b.stop().await;
}

#[tokio::test]
async fn bad_key_headers_on_commit_get_an_error_naming_the_header() {
    let b = TestBroker::start(open_config()).await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![("fmq-producer-id", "p")],
            "fmq-producer-id header 'p' needs an fmq-sequence header",
        ),
        (
            vec![("fmq-sequence", "4")],
            "fmq-sequence header '4' needs an fmq-producer-id header",
        ),
        (
            vec![("fmq-producer-id", "p"), ("fmq-sequence", "0")],
            "fmq-sequence header '0' is not a whole number",
        ),
        (
            vec![("fmq-producer-id", ""), ("fmq-sequence", "1")],
            "fmq-producer-id header '' is not 1 to 128 bytes",
        ),
    ];
    for (headers, needle) in cases {
        let mut c = Conn::connect(b.addr, &[]).await;
        begin(&mut c, "t").await;
        c.send(in_tx("/queue/kbad", "t", "never")).await;
        let mut f = Frame::new(Command::Commit)
            .header("transaction", "t")
            .header("receipt", "r");
        for (k, v) in &headers {
            f = f.header(*k, *v);
        }
        let e = c.refused(f, needle, &format!("{headers:?}")).await;
        assert_eq!(e.get("receipt-id"), Some("r"), "{e:?}");
    }
    assert_eq!(drain(&b, "/queue/kbad").await, Vec::<String>::new());
    assert_eq!(b.broker.stats().await.expect("stats").producers, 0);
    b.stop().await;
}

#[tokio::test]
async fn a_commit_key_survives_a_restart_on_the_same_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let b = TestBroker::start_on(store.clone(), open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    // An empty transaction stores its key too.
    begin(&mut c, "t").await;
    assert!(!duplicate(&commit_keyed(&mut c, "t", "kept", 5).await));
    drop(c);
    b.stop().await;
    assert!(store.get(Cf::Dedupe, b"kept").expect("get").is_some());

    let b = TestBroker::start_on(store, open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    begin(&mut c, "t").await;
    c.send(in_tx("/queue/kr", "t", "late")).await;
    assert!(duplicate(&commit_keyed(&mut c, "t", "kept", 5).await));
    begin(&mut c, "t").await;
    c.send(in_tx("/queue/kr", "t", "next")).await;
    assert!(!duplicate(&commit_keyed(&mut c, "t", "kept", 6).await));
    assert_eq!(drain(&b, "/queue/kr").await, ["next"]);
    b.stop().await;
}
