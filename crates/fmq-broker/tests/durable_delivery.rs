//! A stored message reaches consumers only once the store write that holds
//! it is durable: a consumer must never see a message that a crash can
//! still take back (the sender then resends it, or a transaction is
//! reported rolled back and redone), since it could not tell the second
//! copy from a new message.
//!
//! The store here applies every batch at once but reports it durable only
//! when the test opens its gate, as a store waiting on an fsync (or on the
//! passive server in replicated mode) would.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{body, open_config, Conn, TestBroker};
use fmq_proto::{Command, Frame};
use fmq_store::{Batch, Cf, Commit, LoggedBatch, MemoryStore, Store};
use tokio::sync::watch;

/// A [`MemoryStore`] whose commits resolve only while the gate is open.
#[derive(Debug)]
struct GatedStore {
    inner: MemoryStore,
    gate: watch::Receiver<bool>,
}

impl Store for GatedStore {
    fn commit(&self, batch: Batch) -> Commit {
        let applied = self.inner.commit(batch);
        let mut gate = self.gate.clone();
        Commit::from_future(async move {
            let sequence = applied.await?;
            let _ = gate.wait_for(|open| *open).await;
            Ok(sequence)
        })
    }

    fn get(&self, cf: Cf, key: &[u8]) -> fmq_store::Result<Option<Vec<u8>>> {
        self.inner.get(cf, key)
    }

    fn scan_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> fmq_store::Result<()>,
    ) -> fmq_store::Result<()> {
        self.inner.scan_prefix(cf, prefix, f)
    }

    fn last_sequence(&self) -> u64 {
        self.inner.last_sequence()
    }

    fn sync(&self) -> fmq_store::Result<()> {
        self.inner.sync()
    }

    fn first_logged(&self) -> u64 {
        self.inner.first_logged()
    }

    fn read_log(
        &self,
        from: u64,
        max_batches: usize,
        max_bytes: usize,
    ) -> fmq_store::Result<Vec<LoggedBatch>> {
        self.inner.read_log(from, max_batches, max_bytes)
    }
}

/// A broker on a gated store (gate open), and the gate.
async fn gated_broker() -> (TestBroker, watch::Sender<bool>) {
    let (gate, rx) = watch::channel(true);
    let store = Arc::new(GatedStore {
        inner: MemoryStore::new(),
        gate: rx,
    });
    (TestBroker::start_on(store, open_config()).await, gate)
}

const QUIET: Duration = Duration::from_millis(300);

fn persistent_send(dest: &str, text: &str) -> Frame {
    Frame::new(Command::Send)
        .header("destination", dest)
        .header("persistent", "true")
        .with_body(text.as_bytes().to_vec())
}

fn subscribe(dest: &str) -> Frame {
    Frame::new(Command::Subscribe)
        .header("id", "s")
        .header("destination", dest)
        .header("ack", "auto")
}

#[tokio::test]
async fn a_persistent_message_is_delivered_only_once_its_write_is_durable() {
    let (b, gate) = gated_broker().await;
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer
        .subscribe("s", "/queue/held", "client-individual", &[])
        .await;
    let mut producer = Conn::connect(b.addr, &[]).await;

    gate.send_replace(false);
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

    gate.send_replace(true);
    let m = consumer.message().await;
    assert_eq!(body(&m), "m1");
    let r = producer.recv().await;
    assert_eq!(r.command, Command::Receipt, "{r:?}");
    consumer.ack(&m).await;
    b.stop().await;
}

#[tokio::test]
async fn a_committed_transaction_is_delivered_only_once_its_write_is_durable() {
    let (b, gate) = gated_broker().await;
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer.subscribe("s", "/queue/tx", "auto", &[]).await;
    let mut producer = Conn::connect(b.addr, &[]).await;

    gate.send_replace(false);
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

    gate.send_replace(true);
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
    let (b, gate) = gated_broker().await;
    let mut producer = Conn::connect(b.addr, &[]).await;
    producer
        .send_receipted(persistent_send("/queue/early", "stored"), "r0")
        .await;

    // The store is slow now; what was durable before goes out at once, and
    // so does a message that is never stored.
    gate.send_replace(false);
    // (No RECEIPTs: they would wait for the store.)
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
    gate.send_replace(true);
    b.stop().await;
}

#[tokio::test]
async fn a_held_delivery_does_not_keep_a_stopping_broker_open() {
    // A batch that never becomes durable (a replicated active that stopped
    // serving fails its unconfirmed batches) must not keep the session,
    // and with it the engine and the store, alive once the broker stops.
    let (b, gate) = gated_broker().await;
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer
        .subscribe("s", "/queue/never", "client-individual", &[])
        .await;
    let mut producer = Conn::connect(b.addr, &[]).await;
    gate.send_replace(false);
    producer.send(persistent_send("/queue/never", "held")).await;
    assert!(consumer.try_recv(QUIET).await.is_none());

    let _ = b.broker.shutdown_handle().send(true);
    assert!(
        consumer.closed().await,
        "the consumer's connection stayed open after the broker stopped"
    );
    gate.send_replace(true);
    b.stop().await;
}
