//! The durable, JMS-like API against in-process brokers on the memory
//! store: ack modes, transactions (and settling one whose COMMIT receipt
//! was lost), durable subscribers, delivery options, the send buffer across
//! a client restart, and failover between two brokers.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{reserve_port, TestBroker, QUIET, SOON};
use fmq_client::durable::{
    Connection, ConnectionBuilder, ConsumerOptions, Event, SendOptions, SendOutcome, SessionMode,
};
use fmq_client::Error;
use fmq_proto::{Command, Item, StompCodec};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

fn builder(servers: &[String]) -> ConnectionBuilder {
    Connection::builder(servers.iter().cloned())
        .client_id("durable-test")
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
        .initial_timeout(Duration::from_secs(5))
}

async fn connect(broker: &TestBroker) -> Connection {
    builder(&[broker.addr.to_string()]).connect().await.unwrap()
}

#[tokio::test]
async fn persistent_sends_carry_producer_id_and_sequence() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::ClientIndividual);
    let producer = session.producer("orders", "/queue/orders").await.unwrap();
    for i in 0..3 {
        let outcome = producer.send(format!("order {i}")).await.unwrap();
        assert_eq!(outcome, SendOutcome::Receipted);
    }
    let mut consumer = session.consumer("/queue/orders").await.unwrap();
    for i in 0..3 {
        let m = consumer
            .receive_timeout(SOON)
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(m.body_str(), Some(format!("order {i}").as_str()));
        assert_eq!(m.producer_id(), Some(producer.id()));
        assert_eq!(m.sequence(), Some(i + 1));
        assert_eq!(m.header("persistent"), Some("true"));
        m.ack().await.unwrap();
    }
    assert!(consumer.receive_timeout(QUIET).await.unwrap().is_none());
    consumer.close().await.unwrap();
    conn.close().await.unwrap();
}

#[tokio::test]
async fn delivery_options_and_defaults() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::Auto);
    let mut producer = session.producer("prio", "/queue/prio").await.unwrap();
    producer.set_defaults(SendOptions::new().header("region", "eu").priority(1));
    producer.send("low").await.unwrap();
    producer
        .send_with(
            "high",
            SendOptions::new().priority(9).header("region", "us"),
        )
        .await
        .unwrap();
    producer
        .send_with(
            "gone",
            SendOptions::new().time_to_live(Duration::from_millis(1)),
        )
        .await
        .unwrap();
    producer
        .send_with("elsewhere", SendOptions::new().header("region", "asia"))
        .await
        .unwrap();
    let outcome = producer
        .send_with("volatile", SendOptions::new().persistent(false))
        .await
        .unwrap();
    assert_eq!(outcome, SendOutcome::Written);
    // A marker sent with a receipt, so everything before is in the queue.
    producer.send("marker").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let mut consumer = session
        .consumer_with(
            "/queue/prio",
            ConsumerOptions::default().selector("region IN ('us', 'eu')"),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(m) = consumer.receive_timeout(QUIET).await.unwrap() {
        got.push((
            m.body_str().unwrap().to_owned(),
            m.header("priority").unwrap().to_owned(),
            m.header("region").unwrap().to_owned(),
            m.producer_id().is_some(),
        ));
    }
    // Highest priority first; the expired one and the one the selector
    // rejects never arrive; the non-persistent one has no producer id.
    assert_eq!(got[0], ("high".into(), "9".into(), "us".into(), true));
    assert!(
        got.contains(&("low".into(), "1".into(), "eu".into(), true)),
        "{got:?}"
    );
    assert!(
        got.contains(&("volatile".into(), "1".into(), "eu".into(), false)),
        "{got:?}"
    );
    assert!(
        got.contains(&("marker".into(), "1".into(), "eu".into(), true)),
        "{got:?}"
    );
    assert_eq!(got.len(), 4, "{got:?}");

    assert!(matches!(
        producer
            .send_with("x", SendOptions::new().priority(10))
            .await,
        Err(Error::Usage(_))
    ));
    assert!(matches!(
        producer
            .send_with("x", SendOptions::new().header("fmq-sequence", "1"))
            .await,
        Err(Error::Usage(_))
    ));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn client_ack_mode_acknowledges_cumulatively() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::Client);
    let producer = session.producer("p", "/queue/cum").await.unwrap();
    for i in 0..3 {
        producer.send(format!("m{i}")).await.unwrap();
    }
    let mut consumer = session.consumer("/queue/cum").await.unwrap();
    let mut last = None;
    for _ in 0..3 {
        last = consumer.receive_timeout(SOON).await.unwrap();
    }
    last.unwrap().ack().await.unwrap();
    consumer.close().await.unwrap();
    let mut again = session.consumer("/queue/cum").await.unwrap();
    assert!(again.receive_timeout(QUIET).await.unwrap().is_none());
    conn.close().await.unwrap();
}

#[tokio::test]
async fn transacted_session_commits_and_rolls_back() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let tx = conn.session(SessionMode::Transacted);
    let plain = conn.session(SessionMode::Auto);
    let producer = tx.producer("tx", "/queue/tx-in").await.unwrap();
    let mut watch = plain.consumer("/queue/tx-in").await.unwrap();

    assert_eq!(
        producer.send("one").await.unwrap(),
        SendOutcome::InTransaction
    );
    producer.send("two").await.unwrap();
    assert!(
        watch.receive_timeout(QUIET).await.unwrap().is_none(),
        "visible before commit"
    );
    tx.commit().await.unwrap();
    for body in ["one", "two"] {
        let m = watch.receive_timeout(SOON).await.unwrap().unwrap();
        assert_eq!(m.body_str(), Some(body));
    }
    producer.send("dropped").await.unwrap();
    tx.rollback().await.unwrap();
    assert!(watch.receive_timeout(QUIET).await.unwrap().is_none());
    watch.close().await.unwrap();

    // Receiving in a transaction: rollback gives the message back,
    // commit consumes it.
    let feeder = plain.producer("feed", "/queue/tx-work").await.unwrap();
    feeder.send("job").await.unwrap();
    let mut worker = tx.consumer("/queue/tx-work").await.unwrap();
    let m = worker.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("job"));
    tx.rollback().await.unwrap();
    let m = worker
        .receive_timeout(SOON)
        .await
        .unwrap()
        .expect("redelivered after rollback");
    assert!(m.redelivered());
    producer
        .send_to("/queue/tx-out", "result", &SendOptions::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    worker.close().await.unwrap();
    let mut check = plain.consumer("/queue/tx-work").await.unwrap();
    assert!(check.receive_timeout(QUIET).await.unwrap().is_none());
    let mut out = plain.consumer("/queue/tx-out").await.unwrap();
    assert_eq!(
        out.receive_timeout(SOON).await.unwrap().unwrap().body_str(),
        Some("result")
    );

    let plain_commit = plain.commit().await.unwrap_err();
    assert!(matches!(plain_commit, Error::Usage(_)));
    conn.close().await.unwrap();
}

#[tokio::test]
async fn durable_subscriber_gets_what_was_published_while_away() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let session = conn.session(SessionMode::ClientIndividual);
    let sub = session
        .durable_subscriber("/topic/news", "reader")
        .await
        .unwrap();
    sub.close().await.unwrap();

    let publisher = session.producer("pub", "/topic/news").await.unwrap();
    for i in 0..3 {
        publisher.send(format!("n{i}")).await.unwrap();
    }
    let mut sub = session
        .durable_subscriber("/topic/news", "reader")
        .await
        .unwrap();
    for i in 0..3 {
        let m = sub
            .receive_timeout(SOON)
            .await
            .unwrap()
            .expect("kept while away");
        assert_eq!(m.body_str(), Some(format!("n{i}").as_str()));
        m.ack().await.unwrap();
    }
    sub.unsubscribe_durable().await.unwrap();
    conn.close().await.unwrap();

    // No client-id, no durable subscription.
    let anonymous = Connection::builder([broker.addr.to_string()])
        .connect()
        .await
        .unwrap();
    let err = anonymous
        .session(SessionMode::Auto)
        .durable_subscriber("/topic/news", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    anonymous.close().await.unwrap();
}

#[tokio::test]
async fn refused_consumer_is_reported_to_the_caller() {
    let broker = TestBroker::start().await;
    let conn = connect(&broker).await;
    let err = conn
        .session(SessionMode::Auto)
        .consumer("/nowhere/x")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Server { .. }), "{err:?}");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn wrong_credentials_fail_connect_at_once() {
    let broker = TestBroker::with_auth().await;
    let started = std::time::Instant::now();
    let err = builder(&[broker.addr.to_string()])
        .credentials("admin", "wrong")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("authentication")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let ok = builder(&[broker.addr.to_string()])
        .credentials("admin", "passwd")
        .connect()
        .await
        .unwrap();
    ok.close().await.unwrap();
}

#[tokio::test]
async fn buffered_sends_survive_a_client_restart_and_arrive_in_order() {
    let addr = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let offline = || {
        builder(&[addr.to_string()])
            .buffer_dir(dir.path())
            .offline_start(true)
            .initial_timeout(Duration::from_millis(100))
    };
    // First run: no server; everything goes to the buffer.
    let first_id = {
        let conn = offline().connect().await.unwrap();
        assert!(!conn.is_connected());
        let session = conn.session(SessionMode::Auto);
        let producer = session.producer("journal", "/queue/journal").await.unwrap();
        for i in 0..10 {
            assert_eq!(
                producer.send(format!("entry {i}")).await.unwrap(),
                SendOutcome::Buffered
            );
        }
        assert_eq!(conn.buffered(), 10);
        // A second connection may not share the directory.
        let err = offline().connect().await.unwrap_err();
        assert!(matches!(err, Error::Buffer(_)), "{err:?}");
        let id = producer.id().to_owned();
        conn.close().await.unwrap();
        id
    };
    // Second run, same directory: the buffer is there, and is replayed as
    // soon as the server comes up.
    let conn = offline().connect().await.unwrap();
    assert_eq!(conn.buffered(), 10);
    let mut events = conn.events();
    let broker = TestBroker::start_on(addr).await;
    let replayed = tokio::time::timeout(SOON, async {
        loop {
            if let Some(Event::Replayed { count, .. }) = events.next().await {
                return count;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(replayed, 10);
    conn.flush(SOON).await.unwrap();

    let session = conn.session(SessionMode::ClientIndividual);
    let producer = session.producer("journal", "/queue/journal").await.unwrap();
    assert_eq!(
        producer.id(),
        first_id,
        "the producer id survives the restart"
    );
    producer.send("entry 10").await.unwrap();
    let mut consumer = session.consumer("/queue/journal").await.unwrap();
    for i in 0..=10u64 {
        let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
        assert_eq!(m.body_str(), Some(format!("entry {i}").as_str()));
        assert_eq!(m.producer_id(), Some(first_id.as_str()));
        if i < 10 {
            assert_eq!(m.sequence(), Some(i + 1));
        } else {
            assert!(
                m.sequence().unwrap() > 10,
                "sequence continues after a restart"
            );
        }
        m.ack().await.unwrap();
    }
    conn.close().await.unwrap();
    drop(broker);
}

#[tokio::test]
async fn fails_over_between_two_brokers_and_keeps_consuming() {
    let first = TestBroker::start().await;
    let second = TestBroker::start().await;
    let conn = builder(&[first.addr.to_string(), second.addr.to_string()])
        .connect()
        .await
        .unwrap();
    let mut events = conn.events();
    let session = conn.session(SessionMode::ClientIndividual);
    let producer = session.producer("fo", "/queue/fo").await.unwrap();
    let mut consumer = session.consumer("/queue/fo").await.unwrap();
    producer.send("before").await.unwrap();
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("before"));
    m.ack().await.unwrap();

    drop(first); // shuts the first broker down, closing its connections
    let failed_over = tokio::time::timeout(SOON, async {
        loop {
            if let Some(e @ Event::FailedOver { .. }) = events.next().await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        failed_over.to_string().contains(&second.addr.to_string()),
        "{failed_over}"
    );
    assert_eq!(conn.server(), Some(second.addr.to_string()));
    // Same message-id and timestamp as "before" (both brokers start their
    // ids alike, and the failover takes less than a millisecond), yet not
    // taken for a redelivery of it.
    assert_eq!(
        producer.send("after").await.unwrap(),
        SendOutcome::Receipted
    );
    let m = consumer.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("after"));
    m.ack().await.unwrap();
    conn.close().await.unwrap();
}

/// Where [`CommitCutter`] cuts the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// When the client's COMMIT arrives, before passing it on: the broker
    /// never sees it.
    BeforeCommit,
    /// When the broker's RECEIPT for the COMMIT arrives, instead of passing
    /// it on: the transaction is applied, its receipt lost.
    AfterCommit,
}

/// A STOMP proxy in front of a broker that cuts the connection carrying
/// the next COMMIT, once, at the chosen point; later connections pass.
struct CommitCutter {
    addr: SocketAddr,
    cut: Arc<Mutex<Option<Cut>>>,
}

impl CommitCutter {
    async fn start(upstream: SocketAddr) -> CommitCutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(None));
        let armed = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pipe(client, upstream, armed.clone()));
            }
        });
        CommitCutter { addr, cut }
    }

    fn arm(&self, cut: Cut) {
        *self.cut.lock().unwrap() = Some(cut);
    }
}

async fn pipe(client: TcpStream, upstream: SocketAddr, cut: Arc<Mutex<Option<Cut>>>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut client = Framed::new(client, StompCodec::default());
    let mut server = Framed::new(server, StompCodec::default());
    let mut lose_receipt: Option<String> = None;
    loop {
        tokio::select! {
            item = client.next() => {
                let Some(Ok(item)) = item else { return };
                if let Item::Frame(f) = &item {
                    if f.command == Command::Commit {
                        match cut.lock().unwrap().take() {
                            Some(Cut::BeforeCommit) => return,
                            Some(Cut::AfterCommit) => {
                                lose_receipt = f.get("receipt").map(str::to_owned);
                            }
                            None => {}
                        }
                    }
                }
                if server.send(item).await.is_err() {
                    return;
                }
            }
            item = server.next() => {
                let Some(Ok(item)) = item else { return };
                if let Item::Frame(f) = &item {
                    if f.command == Command::Receipt
                        && lose_receipt.is_some()
                        && f.get("receipt-id") == lose_receipt.as_deref()
                    {
                        return;
                    }
                }
                if client.send(item).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Consume-transform-produce in a transaction whose connection is cut at
/// `cut`: takes "job" from /queue/cut-in, sends "result" to
/// /queue/cut-out, commits. Returns the commit's outcome, and the
/// connection, the transacted session and its consumer for the checks.
async fn commit_cut_at(
    broker: &TestBroker,
    cut: Cut,
) -> (
    Result<(), Error>,
    Connection,
    fmq_client::durable::Session,
    fmq_client::durable::Consumer,
) {
    let proxy = CommitCutter::start(broker.addr).await;
    let conn = builder(&[proxy.addr.to_string()]).connect().await.unwrap();
    let plain = conn.session(SessionMode::Auto);
    plain
        .producer("feed", "/queue/cut-in")
        .await
        .unwrap()
        .send("job")
        .await
        .unwrap();
    let tx = conn.session(SessionMode::Transacted);
    let mut worker = tx.consumer("/queue/cut-in").await.unwrap();
    let job = worker.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(job.body_str(), Some("job"));
    tx.producer("worker", "/queue/cut-out")
        .await
        .unwrap()
        .send("result")
        .await
        .unwrap();
    proxy.arm(cut);
    let outcome = tx.commit().await;
    (outcome, conn, tx, worker)
}

/// Receives every message of `queue` until it has been quiet for a while.
async fn drain(conn: &Connection, queue: &str) -> Vec<String> {
    let session = conn.session(SessionMode::Auto);
    let mut consumer = session.consumer(queue).await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = consumer.receive_timeout(QUIET).await.unwrap() {
        got.push(m.body_str().unwrap().to_owned());
    }
    consumer.close().await.unwrap();
    got
}

#[tokio::test]
async fn a_commit_applied_before_its_receipt_was_lost_is_reported_committed() {
    let broker = TestBroker::start().await;
    let (outcome, conn, _tx, mut worker) = commit_cut_at(&broker, Cut::AfterCommit).await;
    outcome.unwrap();
    // Applied once: the job is gone (not redelivered), the result is there
    // once.
    assert!(worker.receive_timeout(QUIET).await.unwrap().is_none());
    worker.close().await.unwrap();
    assert_eq!(drain(&conn, "/queue/cut-in").await, Vec::<String>::new());
    assert_eq!(drain(&conn, "/queue/cut-out").await, ["result"]);
    let stats = broker.broker.stats().await.unwrap();
    assert_eq!(stats.duplicates, 1, "the settling COMMIT was a duplicate");
    conn.close().await.unwrap();
}

#[tokio::test]
async fn a_commit_lost_before_the_broker_got_it_is_reported_rolled_back() {
    let broker = TestBroker::start().await;
    let (outcome, conn, tx, mut worker) = commit_cut_at(&broker, Cut::BeforeCommit).await;
    let err = outcome.unwrap_err();
    let Error::TransactionRolledBack(reason) = &err else {
        panic!("{err:?}")
    };
    assert!(reason.contains("not applied"), "{reason}");
    // Nothing of it was applied: the job comes back to the same consumer
    // (not taken for an acknowledged one), the result was never sent.
    let job = worker.receive_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(job.body_str(), Some("job"));
    assert!(job.redelivered());
    assert_eq!(drain(&conn, "/queue/cut-out").await, Vec::<String>::new());
    // Done again, it commits.
    tx.commit().await.unwrap();
    worker.close().await.unwrap();
    assert_eq!(drain(&conn, "/queue/cut-in").await, Vec::<String>::new());
    let stats = broker.broker.stats().await.unwrap();
    assert_eq!(stats.duplicates, 0, "the settling COMMIT took the key");
    conn.close().await.unwrap();
}
