//! A stored message reaches consumers only once the store write that holds
//! it is durable: a consumer must never see a message that a crash can
//! still take back (the sender then resends it, or a transaction is
//! reported rolled back and redone), since it could not tell the second
//! copy from a new message.
//!
//! The broker runs on the replicated active's store ([`ReplicatedStore`])
//! with no passive attached: while the feed requires the passive's
//! confirmation, every batch is applied but none is durable, as on an
//! active waiting for its passive; dropping the requirement confirms them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{body, open_config, Conn, TestBroker};
use fmq_ha::replication::{Feed, ReplicatedStore};
use fmq_proto::{Command, Frame};
use fmq_store::{MemoryStore, Store};

const QUIET: Duration = Duration::from_millis(300);

/// A broker whose writes are durable only while `feed` does not wait for a
/// passive.
async fn broker_with_feed() -> (TestBroker, Arc<Feed>) {
    let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let feed = Feed::new(inner.last_sequence(), 1);
    let store = Arc::new(ReplicatedStore::new(inner, feed.clone()));
    (TestBroker::start_on(store, open_config()).await, feed)
}

/// A broker, a consumer of `dest` with `ack`, and a producer; from now on
/// no write becomes durable until the feed's requirement is dropped.
async fn held(dest: &str, ack: &str) -> (TestBroker, Arc<Feed>, Conn, Conn) {
    let (b, feed) = broker_with_feed().await;
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer.subscribe("s", dest, ack, &[]).await;
    let producer = Conn::connect(b.addr, &[]).await;
    feed.set_required(true);
    (b, feed, consumer, producer)
}

fn persistent_send(dest: &str, text: &str) -> Frame {
    Frame::new(Command::Send)
        .header("destination", dest)
        .header("persistent", "true")
        .with_body(text.as_bytes().to_vec())
}

/// A SUBSCRIBE without a RECEIPT (which would wait for the store).
fn subscribe(dest: &str) -> Frame {
    Frame::new(Command::Subscribe)
        .header("id", "s")
        .header("destination", dest)
        .header("ack", "auto")
}

#[tokio::test]
async fn a_persistent_message_is_delivered_only_once_its_write_is_durable() {
    let (b, feed, mut consumer, mut producer) = held("/queue/held", "client-individual").await;
    producer
        .send(persistent_send("/queue/held", "m1").header("receipt", "r1"))
        .await;
    assert!(
        consumer.try_recv(QUIET).await.is_none(),
        "a message was delivered before its store write was durable"
    );
    assert!(
        producer.try_recv(Duration::from_millis(50)).await.is_none(),
        "the RECEIPT came before the write was durable"
    );

    feed.set_required(false);
    let m = consumer.message().await;
    assert_eq!(body(&m), "m1");
    let r = producer.recv().await;
    assert_eq!(r.command, Command::Receipt, "{r:?}");
    consumer.ack(&m).await;
    b.stop().await;
}

#[tokio::test]
async fn a_committed_transaction_is_delivered_only_once_its_write_is_durable() {
    let (b, feed, mut consumer, mut producer) = held("/queue/tx", "auto").await;
    producer
        .send(Frame::new(Command::Begin).header("transaction", "t1"))
        .await;
    for text in ["a", "b"] {
        producer
            .send(persistent_send("/queue/tx", text).header("transaction", "t1"))
            .await;
    }
    producer
        .send(
            Frame::new(Command::Commit)
                .header("transaction", "t1")
                .header("receipt", "c1"),
        )
        .await;
    assert!(
        consumer.try_recv(QUIET).await.is_none(),
        "a message of a transaction was delivered before its COMMIT was durable"
    );

    feed.set_required(false);
    let got = [
        body(&consumer.message().await),
        body(&consumer.message().await),
    ];
    assert_eq!(got, ["a".to_owned(), "b".to_owned()]);
    let r = producer.recv().await;
    assert_eq!(r.get("receipt-id"), Some("c1"), "{r:?}");
    b.stop().await;
}

#[tokio::test]
async fn messages_stored_earlier_and_non_persistent_ones_are_not_held() {
    let (b, feed) = broker_with_feed().await;
    let mut producer = Conn::connect(b.addr, &[]).await;
    producer
        .send_receipted(persistent_send("/queue/early", "stored"), "r0")
        .await;

    // Writes wait for a passive now; what was durable before goes out at
    // once, and so does a message that is never stored.
    feed.set_required(true);
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer.send(subscribe("/queue/early")).await;
    assert_eq!(body(&consumer.message().await), "stored");
    let mut other = Conn::connect(b.addr, &[]).await;
    other.send(subscribe("/queue/fast")).await;
    producer
        .send(
            Frame::new(Command::Send)
                .header("destination", "/queue/fast")
                .header("persistent", "false")
                .with_body(b"transient".to_vec()),
        )
        .await;
    assert_eq!(body(&other.message().await), "transient");
    feed.set_required(false);
    b.stop().await;
}

#[tokio::test]
async fn a_held_delivery_does_not_keep_a_stopping_broker_open() {
    // An active that stops serving fences its feed: the batches the passive
    // did not confirm fail and never become durable. A delivery waiting for
    // one must not keep the session, and with it the engine and the store,
    // alive once the broker stops.
    let (b, feed, mut consumer, mut producer) = held("/queue/never", "client-individual").await;
    producer.send(persistent_send("/queue/never", "held")).await;
    assert!(consumer.try_recv(QUIET).await.is_none());

    feed.fence();
    let _ = b.broker.shutdown_handle().send(true);
    assert!(
        consumer.closed().await,
        "the consumer's connection stayed open after the broker stopped"
    );
    drop(producer);
    assert!(
        b.stop_reporting().await.is_err(),
        "the shutdown did not report the write that never became durable"
    );
}
