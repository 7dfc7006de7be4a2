//! Asynchronous delivery and recovery of the durable API against an
//! in-process broker on the memory store: a consumer read as a stream, a
//! listener task handing messages to a handler, and `Session::recover`.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{TestBroker, QUIET, SOON};
use fmq_client::durable::{Connection, Consumer, Event, Events, Message, SessionMode};
use fmq_client::Error;
use futures::stream::FusedStream;
use futures::StreamExt;
use tokio::sync::mpsc;

async fn connect(broker: &TestBroker) -> Connection {
    Connection::builder([broker.addr.to_string()])
        .client_id("listener-test")
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
        .initial_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// Sends `count` persistent messages `PREFIX-0`, `PREFIX-1`, ... to `queue`.
async fn send(conn: &Connection, queue: &str, prefix: &str, count: usize) {
    let session = conn.session(SessionMode::Auto);
    let producer = session.producer("sender", queue).await.unwrap();
    for i in 0..count {
        producer.send(format!("{prefix}-{i}")).await.unwrap();
    }
}

/// A broker and a connection to it, with `count` messages `PREFIX-0`,
/// `PREFIX-1`, ... waiting on `queue`.
async fn loaded(queue: &str, prefix: &str, count: usize) -> (TestBroker, Connection) {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    send(&conn, queue, prefix, count).await;
    (broker, conn)
}

fn bodies(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

/// Fails if the connection dropped since `events` was made (e.g. because
/// the broker refused an ACK or NACK, which ends the connection).
fn assert_stayed_connected(events: &mut Events) {
    while let Some(event) = events.try_next() {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "the connection dropped: {event}"
        );
    }
}

fn body(m: &Message) -> String {
    m.body_str().unwrap().to_owned()
}

/// Receives until nothing comes for [`QUIET`], acknowledging each.
async fn drain(consumer: &mut Consumer) -> Vec<Message> {
    let mut got = Vec::new();
    while let Some(m) = consumer.receive_timeout(QUIET).await.unwrap() {
        m.ack().await.unwrap();
        got.push(m);
    }
    got
}

#[tokio::test]
async fn stream_yields_messages_in_order_and_ends_when_the_connection_closes() {
    let (_broker, conn) = loaded("/queue/stream", "s", 5).await;
    let session = conn.session(SessionMode::ClientIndividual);
    let mut messages = session
        .consumer("/queue/stream")
        .await
        .unwrap()
        .into_stream();
    assert_eq!(messages.destination(), "/queue/stream");
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = tokio::time::timeout(SOON, messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!m.redelivered());
        m.ack().await.unwrap();
        got.push(body(&m));
    }
    assert_eq!(got, bodies("s", 0..5));
    // Nothing more: the stream waits (and a cancelled `next` loses nothing).
    assert!(tokio::time::timeout(QUIET, messages.next()).await.is_err());

    let waiting = tokio::spawn(async move {
        let end = messages.next().await;
        (end.is_none(), messages.is_terminated())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.close().await.unwrap();
    let (ended, terminated) = tokio::time::timeout(SOON, waiting).await.unwrap().unwrap();
    assert!(
        ended,
        "the stream yields nothing after the connection closed"
    );
    assert!(terminated);
}

#[tokio::test]
async fn a_message_arriving_while_the_stream_waits_is_yielded() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::Auto);
    let mut messages = session.consumer("/queue/late").await.unwrap().into_stream();
    let next = tokio::spawn(async move { messages.next().await.map(|m| body(&m.unwrap())) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    send(&conn, "/queue/late", "l", 1).await;
    let got = tokio::time::timeout(SOON, next).await.unwrap().unwrap();
    assert_eq!(got.as_deref(), Some("l-0"));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn listener_handles_messages_in_order_and_stop_loses_none() {
    const N: usize = 30;
    let (_broker, conn) = loaded("/queue/listen", "m", N).await;
    let session = conn.session(SessionMode::ClientIndividual);
    let consumer = session.consumer("/queue/listen").await.unwrap();

    let (tx, mut handled) = mpsc::unbounded_channel();
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s, f) = (started.clone(), finished.clone());
    let listener = consumer.listen(move |message| {
        let tx = tx.clone();
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            message.ack().await.unwrap();
            let _ = tx.send(body(&message));
            f.fetch_add(1, Ordering::SeqCst);
        }
    });
    assert!(listener.is_running());
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(
            tokio::time::timeout(SOON, handled.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    listener.stop().await.unwrap();
    // Stopping waited for the handler call under way.
    assert_eq!(
        started.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst)
    );
    while let Ok(b) = handled.try_recv() {
        got.push(b);
    }
    assert!(got.len() < N, "stopped before the end: {}", got.len());
    assert_eq!(got, bodies("m", 0..got.len()), "handled in order");

    // What the handler did not get (sent ahead to the stopped consumer
    // included) goes to the next consumer, once.
    let mut next = session.consumer("/queue/listen").await.unwrap();
    let rest: Vec<String> = drain(&mut next).await.iter().map(body).collect();
    assert_eq!(rest, bodies("m", got.len()..N));
    next.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn listener_ends_when_the_connection_closes() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::Auto);
    let (tx, mut handled) = mpsc::unbounded_channel();
    let listener = session
        .consumer("/queue/ends")
        .await
        .unwrap()
        .listen(move |message| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body(&message));
            }
        });
    send(&conn, "/queue/ends", "e", 3).await;
    for expected in bodies("e", 0..3) {
        let b = tokio::time::timeout(SOON, handled.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b, expected);
    }
    assert!(listener.is_running());
    conn.close().await.unwrap();
    tokio::time::timeout(SOON, async {
        while listener.is_running() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the listener ends with the connection");
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn recover_redelivers_only_unacknowledged_messages_client_individual() {
    let (_broker, conn) = loaded("/queue/recover", "r", 4).await;
    let mut events = conn.events();
    let session = conn.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer("/queue/recover").await.unwrap();
    for (i, expected) in bodies("r", 0..4).into_iter().enumerate() {
        let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
        assert_eq!(body(&m), expected);
        assert!(!m.redelivered());
        if i % 2 == 0 {
            m.ack().await.unwrap();
        }
    }
    session.recover().await.unwrap();

    let mut again = Vec::new();
    while let Some(m) = consumer.receive_timeout(QUIET).await.unwrap() {
        assert!(m.redelivered(), "{} not flagged redelivered", body(&m));
        m.ack().await.unwrap();
        again.push(body(&m));
    }
    again.sort();
    assert_eq!(again, vec!["r-1".to_owned(), "r-3".to_owned()]);
    // Redelivered on the same connection: recover NACKed only messages
    // still unacknowledged (a NACK of an acknowledged one ends it).
    assert_stayed_connected(&mut events);

    // Nothing is left unacknowledged: recovering again changes nothing.
    session.recover().await.unwrap();
    assert!(consumer.receive_timeout(QUIET).await.unwrap().is_none());
    consumer.close().await.unwrap();
    let mut next = session.consumer("/queue/recover").await.unwrap();
    assert!(next.receive_timeout(QUIET).await.unwrap().is_none());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn recover_in_client_mode_redelivers_what_the_last_ack_did_not_cover() {
    let (_broker, conn) = loaded("/queue/recover-client", "c", 4).await;
    let mut events = conn.events();
    let session = conn.session(SessionMode::Client);
    let mut messages = session
        .consumer("/queue/recover-client")
        .await
        .unwrap()
        .into_stream();
    let mut first = Vec::new();
    for _ in 0..4 {
        first.push(
            tokio::time::timeout(SOON, messages.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    // Covers c-0 and c-1.
    first[1].ack().await.unwrap();
    session.recover().await.unwrap();
    let mut again = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(SOON, messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(m.redelivered());
        again.push(m);
    }
    assert_eq!(
        again.iter().map(body).collect::<Vec<_>>(),
        bodies("c", 2..4),
        "client mode keeps the order"
    );
    again[1].ack().await.unwrap();
    assert!(tokio::time::timeout(QUIET, messages.next()).await.is_err());
    assert_stayed_connected(&mut events);
    messages.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn recover_is_a_no_op_in_auto_mode_and_refused_when_transacted() {
    let (_broker, conn) = loaded("/queue/recover-auto", "a", 2).await;
    let auto = conn.session(SessionMode::Auto);
    let mut consumer = auto.consumer("/queue/recover-auto").await.unwrap();
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(body(&m), "a-0");
    auto.recover().await.unwrap();
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(body(&m), "a-1");
    assert!(consumer.receive_timeout(QUIET).await.unwrap().is_none());

    let transacted = conn.session(SessionMode::Transacted);
    assert!(matches!(transacted.recover().await, Err(Error::Usage(_))));
    conn.close().await.unwrap();
}
