//! SIGKILL a server while producers send receipted persistent messages and a
//! consumer acknowledges with receipts; after a restart on the same store no
//! receipted message is lost and no message whose ACK was receipted comes
//! back. A second test does the same for an offline durable topic
//! subscription.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use fmq_proto::Item;
use fmq_tests::load::duplicates;
use fmq_tests::{describe, Command, Frame, Server, Stomp, TempProfile};
use futures::{SinkExt, StreamExt};
use tokio::sync::Semaphore;

const PRODUCERS: usize = 4;
/// Unreceipted SENDs a producer keeps in flight.
const WINDOW: usize = 32;
/// Upper bound per producer, so the loop is bounded whatever the speed.
const MAX_PER_PRODUCER: u64 = 50_000;
const BODY_LEN: usize = 1024;

/// A 1 KiB body derived from the message id, so corruption shows.
fn body_for(id: &str) -> Vec<u8> {
    let seed = id.as_bytes();
    (0..BODY_LEN)
        .map(|i| seed[i % seed.len()] ^ (i as u8))
        .collect()
}

#[derive(Debug, Default)]
struct ProducerTally {
    sent: BTreeSet<String>,
    receipted: BTreeSet<String>,
    errors: Vec<String>,
}

/// Sends persistent messages to `dest` with a receipt each until `stop` or
/// the connection dies.
async fn produce(
    addr: SocketAddr,
    dest: &'static str,
    p: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<ProducerTally>>,
) -> Result<()> {
    let conn = Stomp::connect(addr, "admin", "passwd").await?;
    let (mut sink, mut stream) = StreamExt::split::<Frame>(conn.io);
    let window = Arc::new(Semaphore::new(WINDOW));
    let reader = {
        let window = window.clone();
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(Item::Frame(f)) if f.command == Command::Receipt => {
                        let id = f.get("receipt-id").unwrap_or_default().to_owned();
                        tally.lock().expect("tally").receipted.insert(id);
                        window.add_permits(1);
                    }
                    Ok(Item::Frame(f)) => {
                        tally.lock().expect("tally").errors.push(describe(&f));
                        break;
                    }
                    Ok(Item::HeartBeat) => {}
                    Err(_) => break,
                }
            }
            window.close();
        })
    };
    for n in 0..MAX_PER_PRODUCER {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        let id = format!("{p}:{n}");
        let frame = Frame::new(Command::Send)
            .header("destination", dest)
            .header("persistent", "true")
            .header("x-seq", id.clone())
            .header("receipt", id.clone())
            .with_body(body_for(&id));
        // Counted as sent before the write: a write that fails half-way may
        // still have reached the server.
        tally.lock().expect("tally").sent.insert(id);
        if sink.send(frame).await.is_err() {
            break;
        }
    }
    if stop.load(Ordering::Relaxed) {
        // Graceful end (not killed): wait for the outstanding receipts.
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while window.available_permits() < WINDOW && !window.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    Ok(())
}

#[derive(Debug, Default)]
struct ConsumerTally {
    /// Every delivery, in order (repeats kept).
    delivered: Vec<String>,
    ack_sent: BTreeSet<String>,
    ack_receipted: BTreeSet<String>,
    errors: Vec<String>,
}

/// Consumes `dest` with client-individual acks, each ACK with a receipt,
/// until the connection dies or `stop`.
async fn consume_during_load(
    addr: SocketAddr,
    dest: &'static str,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<ConsumerTally>>,
) -> Result<()> {
    let mut conn = Stomp::connect(addr, "admin", "passwd").await?;
    conn.subscribe(
        "live",
        dest,
        "client-individual",
        &[("activemq.prefetchSize", "50")],
    )
    .await?;
    // seq of each outstanding ACK receipt
    let mut pending: HashMap<String, String> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let f = match conn.recv_within(Duration::from_millis(200)).await {
            Err(_) => break, // the server is gone
            Ok(None) => continue,
            Ok(Some(f)) => f,
        };
        match f.command {
            Command::Message => {
                let seq = f.get("x-seq").unwrap_or("?").to_owned();
                let ack = f.get("ack").unwrap_or_default().to_owned();
                let receipt = format!("a-{ack}");
                {
                    let mut t = tally.lock().expect("tally");
                    t.delivered.push(seq.clone());
                    t.ack_sent.insert(seq.clone());
                }
                pending.insert(receipt.clone(), seq);
                let ackf = Frame::new(Command::Ack)
                    .header("id", ack)
                    .header("receipt", receipt);
                if conn.send(ackf).await.is_err() {
                    break;
                }
                // Slower than the producers, so a backlog builds up.
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            Command::Receipt => {
                let id = f.get("receipt-id").unwrap_or_default();
                if let Some(seq) = pending.remove(id) {
                    tally.lock().expect("tally").ack_receipted.insert(seq);
                }
            }
            _ => {
                tally.lock().expect("tally").errors.push(describe(&f));
                break;
            }
        }
    }
    Ok(())
}

/// Drains `dest` (client-individual, ACKs pipelined) until idle for 3 s;
/// returns each delivery's seq in order, and checks bodies.
async fn drain(
    addr: SocketAddr,
    dest: &str,
    sub_extra: &[(&str, &str)],
    client_id: Option<&str>,
) -> Result<Vec<String>> {
    let mut headers = vec![("login", "admin"), ("passcode", "passwd")];
    if let Some(c) = client_id {
        headers.push(("client-id", c));
    }
    let mut conn = Stomp::connect_with(addr, &headers).await?;
    let mut extra = vec![("activemq.prefetchSize", "500")];
    extra.extend_from_slice(sub_extra);
    conn.subscribe("drain", dest, "client-individual", &extra)
        .await?;
    let mut got = Vec::new();
    while let Some(f) = conn.message_within(Duration::from_secs(3)).await? {
        let seq = f.get("x-seq").unwrap_or("?").to_owned();
        assert_eq!(
            &f.body[..],
            &body_for(&seq)[..],
            "body of message {seq} changed across the restart"
        );
        conn.send(Frame::new(Command::Ack).header("id", f.get("ack").unwrap_or_default()))
            .await?;
        got.push(seq);
    }
    conn.request(
        Frame::new(Command::Unsubscribe).header("id", "drain"),
        "unsub",
    )
    .await?;
    conn.disconnect().await?;
    Ok(got)
}

fn sample(set: impl IntoIterator<Item = String>) -> Vec<String> {
    set.into_iter().take(20).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_survives_kill9_under_load() -> Result<()> {
    const DEST: &str = "/queue/t01.kill9";
    let mut server = Server::start(TempProfile::new())?;
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let tally = Arc::new(Mutex::new(ProducerTally::default()));
            let task = tokio::spawn(produce(addr, DEST, p, stop.clone(), tally.clone()));
            (task, tally)
        })
        .collect();
    let consumer_tally = Arc::new(Mutex::new(ConsumerTally::default()));
    let consumer = tokio::spawn(consume_during_load(
        addr,
        DEST,
        stop.clone(),
        consumer_tally.clone(),
    ));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = server.status()?;
    server.kill9();
    eprintln!(
        "killed mid-load; status just before: messages_in {} out {}",
        before_kill["messages_in"], before_kill["messages_out"]
    );
    let mut sent = BTreeSet::new();
    let mut receipted = BTreeSet::new();
    for (task, tally) in producers {
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("producer ends after the kill")??;
        let t = tally.lock().expect("tally");
        assert!(t.errors.is_empty(), "producer got {:?}", t.errors);
        sent.extend(t.sent.iter().cloned());
        receipted.extend(t.receipted.iter().cloned());
    }
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(15), consumer)
        .await
        .expect("consumer ends after the kill")??;
    let ct = std::mem::take(&mut *consumer_tally.lock().expect("tally"));
    assert!(ct.errors.is_empty(), "consumer got {:?}", ct.errors);
    let live_dups = duplicates(&ct.delivered);
    assert!(
        live_dups.is_empty(),
        "messages delivered twice to the one live consumer before the kill: {live_dups:?}"
    );
    assert!(
        receipted.len() > 100,
        "the load phase receipted only {} messages:\n{}",
        receipted.len(),
        server.log_tail(30)
    );

    server.restart()?;
    let after = drain(addr, DEST, &[], None).await?;
    let after_set: BTreeSet<String> = after.iter().cloned().collect();

    eprintln!(
        "sent {} receipted {} | live consumer: delivered {} ack-sent {} ack-receipted {} | after restart: delivered {}",
        sent.len(),
        receipted.len(),
        ct.delivered.len(),
        ct.ack_sent.len(),
        ct.ack_receipted.len(),
        after.len()
    );

    let lost: Vec<String> = receipted
        .iter()
        .filter(|s| !after_set.contains(*s) && !ct.ack_sent.contains(*s))
        .cloned()
        .collect();
    assert!(
        lost.is_empty(),
        "{} receipted messages lost across kill -9 (neither acknowledged before nor delivered after), e.g. {:?}\n{}",
        lost.len(),
        sample(lost.clone()),
        server.log_tail(30)
    );
    let resurrected: Vec<String> = ct
        .ack_receipted
        .iter()
        .filter(|s| after_set.contains(*s))
        .cloned()
        .collect();
    assert!(
        resurrected.is_empty(),
        "{} messages whose ACK was receipted before the kill were delivered again after it, e.g. {:?}",
        resurrected.len(),
        sample(resurrected.clone())
    );
    let dups = duplicates(&after);
    assert!(dups.is_empty(), "duplicates after restart: {dups:?}");
    let phantom: Vec<String> = after_set.difference(&sent).cloned().collect();
    assert!(phantom.is_empty(), "messages nobody sent: {phantom:?}");
    let unreceipted_kept = after_set.difference(&receipted).count();
    eprintln!("unreceipted messages that survived (allowed): {unreceipted_kept}");

    // Nothing left behind: the queue is empty once drained.
    let depth = server.queue_depth(DEST)?;
    assert_eq!(depth, Some((0, 0)), "queue not empty after the drain");
    server.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durable_topic_subscription_survives_kill9() -> Result<()> {
    const TOPIC: &str = "/topic/t01.events";
    const CLIENT: &str = "t01-durable";
    const NAME: &str = "t01-sub";
    let mut server = Server::start(TempProfile::new())?;
    let addr = server.addr();

    // Register the durable subscription, then go offline.
    let mut sub = Stomp::connect_with(
        addr,
        &[
            ("login", "admin"),
            ("passcode", "passwd"),
            ("client-id", CLIENT),
        ],
    )
    .await?;
    sub.subscribe(
        "d",
        TOPIC,
        "client-individual",
        &[("activemq.subscriptionName", NAME)],
    )
    .await?;
    sub.disconnect().await?;

    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2)
        .map(|p| {
            let tally = Arc::new(Mutex::new(ProducerTally::default()));
            let task = tokio::spawn(produce(addr, TOPIC, p, stop.clone(), tally.clone()));
            (task, tally)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    server.kill9();
    let mut sent = BTreeSet::new();
    let mut receipted = BTreeSet::new();
    for (task, tally) in producers {
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("producer ends after the kill")??;
        let t = tally.lock().expect("tally");
        assert!(t.errors.is_empty(), "producer got {:?}", t.errors);
        sent.extend(t.sent.iter().cloned());
        receipted.extend(t.receipted.iter().cloned());
    }
    assert!(receipted.len() > 50, "only {} receipted", receipted.len());

    server.restart()?;
    let after = drain(
        addr,
        TOPIC,
        &[("activemq.subscriptionName", NAME)],
        Some(CLIENT),
    )
    .await?;
    let after_set: BTreeSet<String> = after.iter().cloned().collect();
    eprintln!(
        "durable: sent {} receipted {} delivered after restart {}",
        sent.len(),
        receipted.len(),
        after.len()
    );
    let lost: Vec<String> = receipted.difference(&after_set).cloned().collect();
    assert!(
        lost.is_empty(),
        "{} receipted messages for the offline durable subscriber lost across kill -9, e.g. {:?}\n{}",
        lost.len(),
        sample(lost.clone()),
        server.log_tail(30)
    );
    let dups = duplicates(&after);
    assert!(dups.is_empty(), "duplicates after restart: {dups:?}");
    let phantom: Vec<String> = after_set.difference(&sent).cloned().collect();
    assert!(phantom.is_empty(), "messages nobody sent: {phantom:?}");
    let depth = server.queue_depth(&format!("durable {CLIENT}:{NAME}"))?;
    assert_eq!(
        depth,
        Some((0, 0)),
        "durable subscription not empty after the drain"
    );
    server.stop()?;
    Ok(())
}
