//! The durable connection against scripted servers: standby servers are
//! skipped, dropped connections fail over, consumers come back, unreceipted
//! sends are resent with the same producer id and sequence, transactions
//! caught by a failover end with a definite outcome (a COMMIT whose receipt
//! was lost is settled under its key on the next server), and back-off paces
//! the rounds when no server answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::fake::{passive_message, Fake, Faults, Mode};
use fmq_client::durable::{
    Backoff, Connection, ConnectionBuilder, Event, Events, SendOutcome, SessionMode,
};
use fmq_client::Error;
use fmq_proto::{Command, Frame};

const SOON: Duration = Duration::from_secs(10);

fn builder(servers: &[&Fake]) -> ConnectionBuilder {
    Connection::builder(servers.iter().map(|f| f.address()))
        .client_id("app")
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
        .initial_timeout(Duration::from_secs(5))
        .backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            multiplier: 2.0,
            jitter: 0.5,
        })
}

/// Waits for the first event matching `pred`, returning it.
async fn expect(events: &mut Events, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
    let wait = async {
        while let Some(e) = events.next().await {
            if pred(&e) {
                return e;
            }
        }
        panic!("events ended before {what}");
    };
    tokio::time::timeout(SOON, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} event"))
}

fn seq_of(frame: &Frame) -> (String, u64) {
    (
        frame.get("fmq-producer-id").unwrap().to_owned(),
        frame.get("fmq-sequence").unwrap().parse().unwrap(),
    )
}

/// A pair as it starts: the primary serves, the secondary is in standby.
async fn pair() -> (Fake, Fake) {
    (
        Fake::start(Mode::Active).await,
        Fake::start(Mode::Passive).await,
    )
}

/// The primary dies (its connections drop) and the secondary takes over.
fn take_over(primary: &Fake, secondary: &Fake) {
    primary.set_mode(Mode::Down);
    secondary.set_mode(Mode::Active);
    primary.drop_connections();
}

#[tokio::test]
async fn passive_server_is_skipped_at_once() {
    let primary = Fake::start(Mode::Passive).await;
    let secondary = Fake::start(Mode::Active).await;
    let started = Instant::now();
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    // No back-off: the refusal moves on to the next server straight away.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(conn.server(), Some(secondary.address()));
    assert_eq!(primary.connects(), 0);
    assert_eq!(secondary.connects(), 1);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn skipped_and_connected_events_are_reported() {
    let primary = Fake::start(Mode::Passive).await;
    let secondary = Fake::start(Mode::Passive).await;
    let conn = builder(&[&primary, &secondary])
        .offline_start(true)
        .initial_timeout(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let mut events = conn.events();
    let e = expect(&mut events, "Skipped", |e| {
        matches!(e, Event::Skipped { .. })
    })
    .await;
    let Event::Skipped { reason, .. } = &e else {
        unreachable!()
    };
    assert_eq!(reason, &passive_message("PASSIVE"));
    assert!(e.to_string().contains("not the active server"), "{e}");
    // The secondary takes over: the connection finds it on a later round.
    secondary.set_mode(Mode::Active);
    let e = expect(&mut events, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    assert_eq!(
        e.to_string(),
        format!("connected to {}", secondary.address())
    );
    assert!(conn.is_connected());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn initial_connect_fails_when_no_server_is_available() {
    let a = Fake::start(Mode::Down).await;
    let b = Fake::start(Mode::Passive).await;
    let started = Instant::now();
    let err = builder(&[&a, &b])
        .initial_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let Error::Unavailable(text) = &err else {
        panic!("{err:?}")
    };
    assert!(text.contains(&a.address()), "{text}");
    assert!(
        text.contains(&b.address()) && text.contains("PASSIVE"),
        "{text}"
    );
}

/// A connection to `servers` allowed to start with none reachable, with an
/// unjittered back-off doubling from `initial_ms` up to `max_ms`.
async fn offline(servers: &[&Fake], initial_ms: u64, max_ms: u64) -> Connection {
    builder(servers)
        .backoff(Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            multiplier: 2.0,
            jitter: 0.0,
        })
        .offline_start(true)
        .initial_timeout(Duration::ZERO)
        .connect()
        .await
        .unwrap()
}

/// The next `n` back-off rounds announced, as (attempt, delay).
async fn waiting_rounds(events: &mut Events, n: usize) -> Vec<(u32, Duration)> {
    let mut rounds = Vec::new();
    while rounds.len() < n {
        if let Event::Waiting { attempt, delay } =
            expect(events, "Waiting", |e| matches!(e, Event::Waiting { .. })).await
        {
            rounds.push((attempt, delay));
        }
    }
    rounds
}

#[tokio::test]
async fn back_off_paces_the_rounds_up_to_its_cap() {
    let a = Fake::start(Mode::Down).await;
    let b = Fake::start(Mode::Down).await;
    let conn = offline(&[&a, &b], 10, 40).await;
    let mut events = conn.events();
    let delays = waiting_rounds(&mut events, 5).await;
    // Without jitter the delay is exactly 10 ms × 2^attempt, capped at 40.
    for (attempt, delay) in &delays {
        let expected = Duration::from_millis((10u64 << (*attempt).min(10)).min(40));
        assert_eq!(*delay, expected, "attempt {attempt}: {delays:?}");
    }
    assert!(
        delays.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "{delays:?}"
    );
    assert!(
        delays.iter().any(|(_, d)| *d == Duration::from_millis(40)),
        "{delays:?}"
    );
    assert!(!conn.is_connected());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn dropped_connection_fails_over_and_resubscribes() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer("/queue/work").await.unwrap();
    let subscribe = primary.wait_for(Command::Subscribe, 1).await;
    assert_eq!(subscribe[0].get("ack"), Some("client-individual"));
    primary.deliver("/queue/work", "m1", "one", &[]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("one"));
    m.ack().await.unwrap();
    primary.wait_for(Command::Ack, 1).await;

    // The primary dies; the secondary becomes active.
    take_over(&primary, &secondary);
    expect(&mut events, "Disconnected", |e| {
        matches!(e, Event::Disconnected { .. })
    })
    .await;
    let e = expect(&mut events, "FailedOver", |e| {
        matches!(e, Event::FailedOver { .. })
    })
    .await;
    let Event::FailedOver { from, to, after } = &e else {
        unreachable!()
    };
    assert_eq!(from, &primary.address());
    assert_eq!(to, &secondary.address());
    assert!(*after < Duration::from_secs(5), "{after:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("failed over from {from} to {to} in ")),
        "{e}"
    );
    let e = expect(&mut events, "Resubscribed", |e| {
        matches!(e, Event::Resubscribed { .. })
    })
    .await;
    assert!(matches!(e, Event::Resubscribed { count: 1, .. }), "{e:?}");

    // The consumer is subscribed on the secondary, same destination and mode.
    let subscribe = secondary.wait_for(Command::Subscribe, 1).await;
    assert_eq!(subscribe[0].get("destination"), Some("/queue/work"));
    assert_eq!(subscribe[0].get("ack"), Some("client-individual"));
    secondary.deliver("/queue/work", "m2", "two", &[]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("two"));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn durable_subscriptions_are_made_again_by_name() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let session = conn.session(SessionMode::Auto);
    let _sub = session
        .durable_subscriber("/topic/prices", "daily")
        .await
        .unwrap();
    let first = primary.wait_for(Command::Subscribe, 1).await;
    assert_eq!(first[0].get("activemq.subscriptionName"), Some("daily"));

    secondary.set_mode(Mode::Active);
    primary.set_mode(Mode::Down);
    primary.drop_connections();
    let again = secondary.wait_for(Command::Subscribe, 1).await;
    assert_eq!(again[0].get("activemq.subscriptionName"), Some("daily"));
    assert_eq!(again[0].get("destination"), Some("/topic/prices"));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn unreceipted_send_is_resent_with_the_same_producer_id_and_sequence() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::Auto);
    let producer = session.producer("orders", "/queue/orders").await.unwrap();

    assert_eq!(
        producer.send("first").await.unwrap(),
        SendOutcome::Receipted
    );
    // The primary takes the next SEND and dies before its RECEIPT.
    primary.set_faults(Faults {
        drop_on_send: true,
        ..Default::default()
    });
    primary.set_mode(Mode::Down);
    secondary.set_mode(Mode::Active);
    assert_eq!(
        producer.send("second").await.unwrap(),
        SendOutcome::Buffered
    );

    let sent = primary.wait_for(Command::Send, 2).await;
    let resent = secondary.wait_for(Command::Send, 1).await;
    assert_eq!(seq_of(&sent[0]), (producer.id().to_owned(), 1));
    assert_eq!(seq_of(&sent[1]), (producer.id().to_owned(), 2));
    assert_eq!(seq_of(&resent[0]), seq_of(&sent[1]));
    assert_eq!(&resent[0].body[..], b"second");
    assert_eq!(resent[0].get("persistent"), Some("true"));
    let e = expect(&mut events, "Replayed", |e| {
        matches!(e, Event::Replayed { .. })
    })
    .await;
    assert!(matches!(e, Event::Replayed { count: 1, .. }), "{e:?}");
    conn.flush(SOON).await.unwrap();
    assert_eq!(conn.buffered(), 0);

    // Later sends go straight to the secondary and continue the sequence.
    assert_eq!(
        producer.send("third").await.unwrap(),
        SendOutcome::Receipted
    );
    let all = secondary.wait_for(Command::Send, 2).await;
    assert_eq!(seq_of(&all[1]), (producer.id().to_owned(), 3));
    assert!(
        producer.id().starts_with("app:orders:"),
        "{}",
        producer.id()
    );
    conn.close().await.unwrap();
}

#[tokio::test]
async fn sends_wait_in_the_buffer_while_no_server_is_reachable() {
    let primary = Fake::start(Mode::Down).await;
    let secondary = Fake::start(Mode::Down).await;
    let dir = tempfile::tempdir().unwrap();
    let conn = builder(&[&primary, &secondary])
        .buffer_dir(dir.path())
        .offline_start(true)
        .initial_timeout(Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::Auto);
    let producer = session.producer("audit", "/queue/audit").await.unwrap();
    for i in 0..5 {
        let outcome = producer.send(format!("entry {i}")).await.unwrap();
        assert_eq!(outcome, SendOutcome::Buffered);
    }
    assert_eq!(conn.buffered(), 5);
    assert!(conn.flush(Duration::from_millis(100)).await.is_err());

    secondary.set_mode(Mode::Active);
    let e = expect(&mut events, "Replayed", |e| {
        matches!(e, Event::Replayed { .. })
    })
    .await;
    assert!(matches!(e, Event::Replayed { count: 5, .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("5 buffered sends replayed to {}", secondary.address())
    );
    let sends = secondary.wait_for(Command::Send, 5).await;
    for (i, s) in sends.iter().enumerate() {
        assert_eq!(&s.body[..], format!("entry {i}").as_bytes());
        assert_eq!(seq_of(s), (producer.id().to_owned(), i as u64 + 1));
    }
    conn.flush(SOON).await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn buffer_full_is_a_clear_error() {
    let a = Fake::start(Mode::Down).await;
    let conn = builder(&[&a])
        .buffer_limits(2, 1 << 20)
        .offline_start(true)
        .initial_timeout(Duration::ZERO)
        .connect()
        .await
        .unwrap();
    let session = conn.session(SessionMode::Auto);
    let producer = session.producer("p", "/queue/q").await.unwrap();
    producer.send("1").await.unwrap();
    producer.send("2").await.unwrap();
    let err = producer.send("3").await.unwrap_err();
    assert!(
        matches!(err, Error::BufferFull { records: 2, .. }),
        "{err:?}"
    );
    // Non-persistent sends are not buffered: they need a server.
    let err = producer
        .send_with("volatile", fmq_client::SendOptions::new().persistent(false))
        .await;
    assert!(err.is_err());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn transaction_open_at_failover_is_rolled_back() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::Transacted);
    let producer = session.producer("tx", "/queue/tx").await.unwrap();
    assert_eq!(
        producer.send("a").await.unwrap(),
        SendOutcome::InTransaction
    );
    primary.wait_for(Command::Send, 1).await;

    take_over(&primary, &secondary);
    expect(&mut events, "FailedOver", |e| {
        matches!(e, Event::FailedOver { .. })
    })
    .await;

    // Further work in the broken transaction is refused, and commit says
    // nothing was committed, at once.
    let err = producer.send("b").await.unwrap_err();
    assert!(matches!(err, Error::TransactionRolledBack(_)), "{err:?}");
    let started = Instant::now();
    let err = session.commit().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let Error::TransactionRolledBack(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(reason.contains(&primary.address()), "{reason}");
    assert!(secondary.frames_of(Command::Commit).is_empty());

    // The next transaction runs on the secondary.
    producer.send("c").await.unwrap();
    session.commit().await.unwrap();
    let frames = secondary.wait_for(Command::Commit, 1).await;
    assert_eq!(frames.len(), 1);
    let sends = secondary.frames_of(Command::Send);
    assert_eq!(sends.len(), 1);
    assert_eq!(&sends[0].body[..], b"c");
    assert_eq!(sends[0].get("transaction"), frames[0].get("transaction"));
    assert_eq!(secondary.frames_of(Command::Begin).len(), 1);
    conn.close().await.unwrap();
}

/// A replicated pair as it starts: COMMIT keys the primary applied are
/// known to the secondary.
async fn replicated_pair() -> (Fake, Fake) {
    let primary = Fake::start(Mode::Active).await;
    let secondary = Fake::start_replica(Mode::Passive, &primary).await;
    (primary, secondary)
}

/// The primary dies on the next COMMIT, after applying it (`applied`) or
/// before, and the secondary is the active server from then on.
fn die_on_commit(primary: &Fake, secondary: &Fake, applied: bool) {
    primary.set_faults(Faults {
        drop_on_commit: !applied,
        lose_commit_receipt: applied,
        ..Default::default()
    });
    primary.set_mode(Mode::Down);
    secondary.set_mode(Mode::Active);
}

/// The transaction key a COMMIT carries.
fn key_of(commit: &Frame) -> (String, u64) {
    seq_of(commit)
}

#[tokio::test]
async fn send_only_transaction_whose_commit_receipt_was_lost_is_re_run() {
    for applied in [false, true] {
        let (primary, secondary) = replicated_pair().await;
        let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
        let session = conn.session(SessionMode::Transacted);
        let producer = session.producer("batch", "/queue/batch").await.unwrap();
        producer.send("x").await.unwrap();
        producer.send("y").await.unwrap();
        // A send without a producer id and sequence is re-run as safely:
        // the COMMIT's key covers the whole transaction.
        producer
            .send_with("z", fmq_client::SendOptions::new().persistent(false))
            .await
            .unwrap();
        die_on_commit(&primary, &secondary, applied);
        session.commit().await.unwrap();

        let first = primary.frames_of(Command::Send);
        let again = secondary.wait_for(Command::Send, 3).await;
        assert_eq!(first.len(), 3);
        for (a, b) in first.iter().zip(&again).take(2) {
            assert_eq!(seq_of(a), seq_of(b));
        }
        for (a, b) in first.iter().zip(&again) {
            assert_eq!(a.body, b.body);
        }
        // The re-run COMMIT carries the key of the first: the broker
        // applies it only if the first was not.
        let commit = primary.frames_of(Command::Commit);
        let rerun = secondary.frames_of(Command::Commit);
        assert_eq!((commit.len(), rerun.len()), (1, 1), "applied: {applied}");
        let key = key_of(&commit[0]);
        assert!(key.0.starts_with("app:tx-"), "{key:?}");
        assert_ne!(key.0, producer.id());
        assert_eq!(key.1, 1);
        assert_eq!(key_of(&rerun[0]), key);
        assert_eq!(rerun[0].get("transaction"), again[0].get("transaction"));

        // The next commit takes the next sequence of the same key.
        producer.send("next").await.unwrap();
        session.commit().await.unwrap();
        let commits = secondary.wait_for(Command::Commit, 2).await;
        assert_eq!(key_of(&commits[1]), (key.0.clone(), 2));
        conn.close().await.unwrap();
    }
}

/// A transacted session holding `m1`, received from the primary.
async fn received_in_transaction(
    primary: &Fake,
    secondary: &Fake,
) -> (
    Connection,
    fmq_client::durable::Session,
    fmq_client::durable::Consumer,
) {
    let conn = builder(&[primary, secondary]).connect().await.unwrap();
    let session = conn.session(SessionMode::Transacted);
    let mut consumer = session.consumer("/queue/in").await.unwrap();
    primary.wait_for(Command::Subscribe, 1).await;
    primary.deliver("/queue/in", "m1", "work", &[]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert!(matches!(m.ack().await, Err(Error::Usage(_))));
    (conn, session, consumer)
}

/// Checks the transaction's frames: on the primary its ACK and COMMIT; on
/// the secondary an empty transaction committed under the same key.
/// Returns the key.
async fn settled_with_an_empty_commit(primary: &Fake, secondary: &Fake) -> (String, u64) {
    let acks = primary.frames_of(Command::Ack);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].get("id"), Some("ack-m1"));
    let commit = primary.frames_of(Command::Commit);
    assert_eq!(commit.len(), 1);
    assert_eq!(acks[0].get("transaction"), commit[0].get("transaction"));
    let key = key_of(&commit[0]);
    assert!(key.0.starts_with("app:tx-"), "{key:?}");
    assert_eq!(key.1, 1);

    let settle = secondary.wait_for(Command::Commit, 1).await;
    assert_eq!(key_of(&settle[0]), key);
    assert!(settle[0].get("receipt").is_some());
    let begin = secondary.frames_of(Command::Begin);
    assert_eq!(begin.len(), 1);
    assert_eq!(begin[0].get("transaction"), settle[0].get("transaction"));
    assert!(secondary.frames_of(Command::Ack).is_empty());
    assert!(secondary.frames_of(Command::Send).is_empty());
    key
}

#[tokio::test]
async fn transaction_with_acks_whose_commit_was_applied_before_the_receipt_was_lost_commits() {
    let (primary, secondary) = replicated_pair().await;
    let (conn, session, mut consumer) = received_in_transaction(&primary, &secondary).await;
    die_on_commit(&primary, &secondary, true);
    session.commit().await.unwrap();
    let key = settled_with_an_empty_commit(&primary, &secondary).await;

    // m1 counts as acknowledged: a copy of it is dropped (and acknowledged
    // again), not handed to the application.
    secondary.wait_for(Command::Subscribe, 1).await;
    secondary.deliver("/queue/in", "m1", "work", &[("redelivered", "true")]);
    secondary.deliver("/queue/in", "m2", "more", &[]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.message_id(), "m2");
    let acks = secondary.wait_for(Command::Ack, 1).await;
    assert_eq!(acks[0].get("id"), Some("ack-m1"));
    assert_eq!(acks[0].get("transaction"), None);
    session.commit().await.unwrap();
    let commits = secondary.wait_for(Command::Commit, 2).await;
    assert_eq!(key_of(&commits[1]), (key.0, 2));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn transaction_with_acks_whose_commit_was_not_applied_is_rolled_back() {
    let (primary, secondary) = replicated_pair().await;
    let (conn, session, mut consumer) = received_in_transaction(&primary, &secondary).await;
    die_on_commit(&primary, &secondary, false);
    let err = session.commit().await.unwrap_err();
    let Error::TransactionRolledBack(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(
        reason.contains("was not applied") && reason.contains("redelivered"),
        "{reason}"
    );
    assert!(reason.contains(&secondary.address()), "{reason}");
    let key = settled_with_an_empty_commit(&primary, &secondary).await;

    // The broker redelivers m1; it was not acknowledged, so the consumer
    // hands it over again, and it commits in the next transaction.
    secondary.wait_for(Command::Subscribe, 1).await;
    secondary.deliver("/queue/in", "m1", "work", &[("redelivered", "true")]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.message_id(), "m1");
    assert!(m.redelivered());
    session.commit().await.unwrap();
    let acks = secondary.wait_for(Command::Ack, 1).await;
    assert_eq!(acks[0].get("id"), Some("ack-m1"));
    let commits = secondary.wait_for(Command::Commit, 2).await;
    assert_eq!(acks[0].get("transaction"), commits[1].get("transaction"));
    assert_eq!(key_of(&commits[1]), (key.0, 2));
    conn.close().await.unwrap();
}

/// Sends and commits one message in `session`; returns the key of that
/// COMMIT, the `n`th `server` got.
async fn commit_one(
    server: &Fake,
    session: &fmq_client::durable::Session,
    n: usize,
) -> (String, u64) {
    let producer = session.producer("k", "/queue/k").await.unwrap();
    producer.send("x").await.unwrap();
    session.commit().await.unwrap();
    let commits = server.wait_for(Command::Commit, n).await;
    key_of(&commits[n - 1])
}

#[tokio::test]
async fn transacted_sessions_have_their_own_keys_and_reuse_those_of_dropped_ones() {
    let server = Fake::start(Mode::Active).await;
    let conn = builder(&[&server]).connect().await.unwrap();
    let a = conn.session(SessionMode::Transacted);
    let b = conn.session(SessionMode::Transacted);
    let a1 = commit_one(&server, &a, 1).await;
    let b1 = commit_one(&server, &b, 2).await;
    let a2 = commit_one(&server, &a, 3).await;
    assert_ne!(a1.0, b1.0, "sessions open at once have their own keys");
    assert_eq!((a1.1, b1.1), (1, 1));
    assert_eq!(a2, (a1.0.clone(), 2));
    // A session made after one was dropped takes its key, counter going on.
    drop(a);
    let c = conn.session(SessionMode::Transacted);
    assert_eq!(commit_one(&server, &c, 4).await, (a1.0, 3));
    // A session that never committed hands its key on unused.
    drop(b);
    let idle = conn.session(SessionMode::Transacted);
    drop(idle);
    let d = conn.session(SessionMode::Transacted);
    assert_eq!(commit_one(&server, &d, 5).await, (b1.0, 2));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn commit_is_in_doubt_only_when_no_server_settles_it_in_time() {
    let (primary, secondary) = replicated_pair().await;
    let conn = builder(&[&primary, &secondary])
        .request_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let session = conn.session(SessionMode::Transacted);
    let producer = session.producer("lost", "/queue/lost").await.unwrap();
    producer.send("x").await.unwrap();
    // Both servers are gone once the COMMIT left.
    die_on_commit(&primary, &secondary, true);
    secondary.set_mode(Mode::Down);
    let started = Instant::now();
    let err = session.commit().await.unwrap_err();
    let Error::TransactionInDoubt(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(reason.contains("no server answered"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(primary.frames_of(Command::Commit).len(), 1);
    assert!(secondary.frames_of(Command::Commit).is_empty());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn consumer_drops_redeliveries_of_what_it_acknowledged() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer("/queue/jobs").await.unwrap();
    primary.wait_for(Command::Subscribe, 1).await;
    let tagged = [("fmq-producer-id", "other:p:1"), ("fmq-sequence", "7")];
    primary.deliver("/queue/jobs", "m1", "one", &[]);
    primary.deliver("/queue/jobs", "m2", "two", &tagged);
    let one = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    let two = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(two.producer_id(), Some("other:p:1"));
    assert_eq!(two.sequence(), Some(7));
    one.ack().await.unwrap();
    two.ack().await.unwrap();
    primary.wait_for(Command::Ack, 2).await;

    // Failover; the new server redelivers both (the ACKs were "lost"), m2
    // stored twice under another message-id, then something new.
    take_over(&primary, &secondary);
    secondary.wait_for(Command::Subscribe, 1).await;
    secondary.deliver("/queue/jobs", "m1", "one", &[("redelivered", "true")]);
    secondary.deliver("/queue/jobs", "m2-copy", "two", &tagged);
    secondary.deliver("/queue/jobs", "m3", "three", &[]);
    let three = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(three.body_str(), Some("three"));
    assert!(consumer
        .receive_timeout(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    // The duplicates were acknowledged again, so the broker forgets them.
    let acks = secondary.wait_for(Command::Ack, 2).await;
    let ids: Vec<_> = acks
        .iter()
        .map(|a| a.get("id").unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["ack-m1", "ack-m2-copy"]);
    let e = expect(&mut events, "DuplicateDropped", |e| {
        matches!(e, Event::DuplicateDropped { .. })
    })
    .await;
    assert!(e.to_string().contains("m1"), "{e}");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn client_mode_duplicates_do_not_acknowledge_unprocessed_messages() {
    let server = Fake::start(Mode::Active).await;
    let conn = builder(&[&server]).connect().await.unwrap();
    let session = conn.session(SessionMode::Client);
    let mut consumer = session.consumer("/queue/c").await.unwrap();
    server.wait_for(Command::Subscribe, 1).await;
    server.deliver("/queue/c", "m1", "one", &[]);
    let one = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    one.ack().await.unwrap();
    server.wait_for(Command::Ack, 1).await;
    // m2 is delivered and not yet acknowledged when a copy of m1 comes
    // back: acknowledging the copy cumulatively would cover m2 as well.
    server.deliver("/queue/c", "m2", "two", &[]);
    let two = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    server.deliver("/queue/c", "m1", "one", &[("redelivered", "true")]);
    assert!(consumer
        .receive_timeout(Duration::from_millis(200))
        .await
        .unwrap()
        .is_none());
    assert_eq!(server.frames_of(Command::Ack).len(), 1);
    // Once the application acknowledged m2, nothing unprocessed is left
    // before the duplicate, which is acknowledged then.
    two.ack().await.unwrap();
    let acks = server.wait_for(Command::Ack, 3).await;
    let ids: Vec<_> = acks.iter().map(|a| a.get("id").unwrap()).collect();
    assert_eq!(ids, ["ack-m1", "ack-m2", "ack-m1"]);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn ack_after_failover_is_applied_to_the_redelivery() {
    let (primary, secondary) = pair().await;
    let conn = builder(&[&primary, &secondary]).connect().await.unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer("/queue/late").await.unwrap();
    primary.wait_for(Command::Subscribe, 1).await;
    primary.deliver("/queue/late", "m1", "slow work", &[]);
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    // The connection is lost while the application works on m1.
    take_over(&primary, &secondary);
    expect(&mut events, "FailedOver", |e| {
        matches!(e, Event::FailedOver { .. })
    })
    .await;
    m.ack().await.unwrap(); // nowhere to send it: remembered
    secondary.wait_for(Command::Subscribe, 1).await;
    secondary.deliver("/queue/late", "m1", "slow work", &[("redelivered", "true")]);
    assert!(consumer
        .receive_timeout(Duration::from_millis(300))
        .await
        .unwrap()
        .is_none());
    let acks = secondary.wait_for(Command::Ack, 1).await;
    assert_eq!(acks[0].get("id"), Some("ack-m1"));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn every_blocking_call_is_bounded() {
    let a = Fake::start(Mode::Down).await;
    let conn = builder(&[&a])
        .request_timeout(Duration::from_millis(200))
        .receive_timeout(Duration::from_millis(100))
        .offline_start(true)
        .initial_timeout(Duration::ZERO)
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    let tx = conn.session(SessionMode::Transacted);
    let producer = tx.producer("p", "/queue/q").await.unwrap();
    assert!(matches!(
        producer.send("x").await,
        Err(Error::Unavailable(_))
    ));
    let session = conn.session(SessionMode::Auto);
    // Consumers made while disconnected subscribe later; receive times out.
    let mut consumer = session.consumer("/queue/q").await.unwrap();
    assert!(consumer.receive().await.unwrap().is_none());
    assert!(session.unsubscribe("nothing").await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    conn.close().await.unwrap();
}

#[tokio::test]
async fn while_a_server_is_in_standby_rounds_are_retried_quickly() {
    // A takeover under way: one server says PASSIVE, the other is down. The
    // rounds keep a short, fixed pace instead of a growing back-off, so the
    // new active is found as soon as it accepts clients.
    let a = Fake::start(Mode::Down).await;
    let b = Fake::start(Mode::Passive).await;
    let conn = offline(&[&a, &b], 400, 5000).await;
    let mut events = conn.events();
    let delays = waiting_rounds(&mut events, 4).await;
    assert!(
        delays.iter().all(|(_, d)| *d == Duration::from_millis(50)),
        "{delays:?}"
    );
    let asked = Instant::now();
    b.set_mode(Mode::Active);
    expect(&mut events, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await;
    assert!(
        asked.elapsed() < Duration::from_millis(400),
        "found the new active after {:?}",
        asked.elapsed()
    );
    conn.close().await.unwrap();
}
