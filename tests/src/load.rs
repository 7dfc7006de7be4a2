//! Clients for the failover tests: producers that send receipted persistent
//! messages and move to the other server of a pair on any error, a consumer
//! that acknowledges each message with a receipt and reconnects the same
//! way, and drains. Every message carries its id in an `x-id` header and a
//! body derived from it, so a lost, repeated or corrupted message shows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use tokio::task::JoinHandle;

use crate::{describe, Command, Frame, Stomp};

/// The shipped profiles' initial administrator.
pub const LOGIN: [(&str, &str); 2] = [("login", "admin"), ("passcode", "passwd")];

/// A `len`-byte body derived from the message id, so corruption shows.
pub fn body_for(id: &str, len: usize) -> Vec<u8> {
    let seed = id.as_bytes();
    (0..len).map(|i| seed[i % seed.len()] ^ (i as u8)).collect()
}

/// What the producers and the consumer of a test send and how patiently.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// The destination (`/queue/NAME`).
    pub dest: &'static str,
    /// Bytes per message body.
    pub body_len: usize,
    /// How long one CONNECT (the consumer: with its SUBSCRIBE) may take.
    pub connect_timeout: Duration,
    /// How long a producer waits for the RECEIPT of one SEND.
    pub receipt_timeout: Duration,
    /// A producer's pause after each receipted SEND.
    pub send_pause: Duration,
    /// The consumer's pause after each ACK (a slower consumer builds a
    /// backlog).
    pub ack_pause: Duration,
}

impl Workload {
    /// `body_len`-byte messages to `dest`; 2 s to connect, 5 s for a
    /// receipt, no pauses.
    pub const fn new(dest: &'static str, body_len: usize) -> Workload {
        Workload {
            dest,
            body_len,
            connect_timeout: Duration::from_secs(2),
            receipt_timeout: Duration::from_secs(5),
            send_pause: Duration::ZERO,
            ack_pause: Duration::ZERO,
        }
    }

    /// The body of message `id`.
    pub fn body(&self, id: &str) -> Vec<u8> {
        body_for(id, self.body_len)
    }

    /// A persistent SEND of message `id` (without a receipt header).
    pub fn send_frame(&self, id: &str) -> Frame {
        Frame::new(Command::Send)
            .header("destination", self.dest)
            .header("persistent", "true")
            .header("x-id", id)
            .with_body(self.body(id))
    }
}

/// A receipted SEND: id, which server receipted it, when.
#[derive(Debug, Clone)]
pub struct Receipted {
    /// The message id (`p{producer}-{n}`).
    pub id: String,
    /// Index of the server (in the producer's address pair).
    pub server: usize,
    /// When the RECEIPT came.
    pub at: Instant,
}

/// What one producer did.
#[derive(Debug, Default)]
pub struct ProducerReport {
    /// The SENDs whose RECEIPT came.
    pub receipted: Vec<Receipted>,
    /// SENDs whose receipt never came (the server died, stepped down or
    /// was too slow): may or may not be in the queue.
    pub unreceipted: Vec<String>,
    /// CONNECT attempts, the first included.
    pub connect_attempts: u64,
}

/// Sends receipted persistent messages `p{n}-{k}`, one at a time, to
/// `addrs[first]` until `stop`. A SEND that fails or gets no receipt moves
/// it to the other address. A CONNECT that is answered and refused (the
/// server is PASSIVE or WAITING) or fails at once (nothing listens) moves it
/// on as well, since that server is not the one serving; each address is
/// tried about every 50 ms. A CONNECT that times out is retried on the same
/// address (a server cut off by a partition cannot be told from a slow one).
/// An unreceipted SEND is not resent (it may be stored), so every id is
/// sent at most once. Each receipt is also pushed to `live`.
pub async fn producer(
    n: usize,
    load: Workload,
    addrs: [SocketAddr; 2],
    first: usize,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<Receipted>>>,
) -> ProducerReport {
    let mut report = ProducerReport::default();
    let mut target = first;
    let mut conn: Option<Stomp> = None;
    let mut i = 0u64;
    // CONNECTs refused in a row: after each pair (both addresses tried),
    // a pause.
    let mut refused = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                report.connect_attempts += 1;
                let attempt = tokio::time::timeout(
                    load.connect_timeout,
                    Stomp::connect_frame(addrs[target], &LOGIN),
                )
                .await;
                match attempt {
                    Ok(Ok((c, reply))) if reply.command == Command::Connected => {
                        refused = 0;
                        conn.insert(c)
                    }
                    Ok(_) => {
                        target = 1 - target;
                        refused += 1;
                        if refused.is_multiple_of(2) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
        };
        let id = format!("p{n}-{i}");
        i += 1;
        let sent =
            tokio::time::timeout(load.receipt_timeout, c.request(load.send_frame(&id), &id)).await;
        match sent {
            Ok(Ok(())) => {
                let r = Receipted {
                    id,
                    server: target,
                    at: Instant::now(),
                };
                lock(&live).push(r.clone());
                report.receipted.push(r);
                if !load.send_pause.is_zero() {
                    tokio::time::sleep(load.send_pause).await;
                }
            }
            _ => {
                report.unreceipted.push(id);
                conn = None;
                target = 1 - target;
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.disconnect().await;
    }
    report
}

/// When the first receipt from `server` after `since` came, once each of
/// the first `producers` producers has had one from it (`None` before).
pub fn first_receipt_from(
    live: &Mutex<Vec<Receipted>>,
    producers: usize,
    server: usize,
    since: Instant,
) -> Option<Instant> {
    let l = lock(live);
    let after: Vec<&Receipted> = l
        .iter()
        .filter(|r| r.server == server && r.at > since)
        .collect();
    let all = (0..producers).all(|n| after.iter().any(|r| r.id.starts_with(&format!("p{n}-"))));
    all.then(|| after.iter().map(|r| r.at).min()).flatten()
}

/// One line per producer: its receipts from each server, and where and
/// when (ms after `t0`) the last one came; for a test that finds the load
/// stuck.
pub fn receipts_by_producer(
    live: &Mutex<Vec<Receipted>>,
    producers: usize,
    names: [&str; 2],
    t0: Instant,
) -> String {
    let l = lock(live);
    (0..producers)
        .map(|n| {
            let prefix = format!("p{n}-");
            let mine: Vec<&Receipted> = l.iter().filter(|r| r.id.starts_with(&prefix)).collect();
            let count = |s: usize| mine.iter().filter(|r| r.server == s).count();
            let last = mine.last().map_or("none".to_owned(), |r| {
                format!(
                    "{} from {} at {} ms",
                    r.id,
                    names[r.server],
                    r.at.saturating_duration_since(t0).as_millis()
                )
            });
            format!(
                "producer {n}: {} receipts from {}, {} from {}; last {last}\n",
                count(0),
                names[0],
                count(1),
                names[1]
            )
        })
        .collect()
}

/// What the producers sent, by outcome.
#[derive(Debug, Default)]
pub struct Sent {
    /// Each receipted id, with the index of the server that receipted it.
    pub receipted: BTreeMap<String, usize>,
    /// The ids whose receipt never came (in doubt).
    pub unreceipted: BTreeSet<String>,
}

impl Sent {
    /// The producers' reports together.
    pub fn from_reports(reports: &[ProducerReport]) -> Sent {
        Sent {
            receipted: reports
                .iter()
                .flat_map(|r| r.receipted.iter().map(|x| (x.id.clone(), x.server)))
                .collect(),
            unreceipted: reports
                .iter()
                .flat_map(|r| r.unreceipted.iter().cloned())
                .collect(),
        }
    }

    /// How many server `i` receipted.
    pub fn receipted_by(&self, i: usize) -> usize {
        self.receipted.values().filter(|s| **s == i).count()
    }

    /// Compares with a drain (how many times each id came).
    pub fn check(&self, seen: &BTreeMap<String, u32>) -> Check {
        Check {
            lost: self
                .receipted
                .keys()
                .filter(|id| !seen.contains_key(*id))
                .cloned()
                .collect(),
            dups: seen
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(id, n)| (id.clone(), *n))
                .collect(),
            strangers: seen
                .keys()
                .filter(|id| !self.receipted.contains_key(*id) && !self.unreceipted.contains(*id))
                .cloned()
                .collect(),
            in_doubt_delivered: seen
                .keys()
                .filter(|id| self.unreceipted.contains(*id))
                .count(),
        }
    }
}

/// [`Sent`] against one drain.
#[derive(Debug, Default)]
pub struct Check {
    /// Receipted ids not drained.
    pub lost: Vec<String>,
    /// Ids drained more than once, with the count.
    pub dups: Vec<(String, u32)>,
    /// Ids drained that were never sent.
    pub strangers: Vec<String>,
    /// How many in-doubt sends were drained (either way is fine).
    pub in_doubt_delivered: usize,
}

impl Check {
    /// Fails on a lost, repeated or unknown message.
    pub fn assert_clean(&self) {
        assert!(
            self.lost.is_empty(),
            "{} receipted messages lost, e.g. {:?}",
            self.lost.len(),
            sample(&self.lost)
        );
        assert!(self.dups.is_empty(), "duplicates: {:?}", self.dups);
        assert!(
            self.strangers.is_empty(),
            "messages never sent: {:?}",
            self.strangers
        );
    }
}

/// A mutex's contents, even after a panic while it was held.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Aborts tasks on drop and waits (a little) until they are gone, so
/// clients declared after the servers and networks they dial never outlive
/// them.
#[derive(Debug)]
struct TaskGuard<T> {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<T>>,
}

impl<T> TaskGuard<T> {
    /// Sets `stop` and collects each task's result (60 s at most each).
    async fn finish(&mut self, what: &str) -> Result<Vec<T>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for h in std::mem::take(&mut self.handles) {
            out.push(
                tokio::time::timeout(Duration::from_secs(60), h)
                    .await
                    .map_err(|_| anyhow!("{what} did not stop within 60 s"))??,
            );
        }
        Ok(out)
    }
}

impl<T> Drop for TaskGuard<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in &self.handles {
            h.abort();
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Running [`producer`] tasks; dropping them aborts them.
#[derive(Debug)]
pub struct Producers {
    tasks: TaskGuard<ProducerReport>,
}

impl Producers {
    /// `n` producers starting on `addrs[first]` until `stop`, each receipt
    /// also recorded in `live`.
    pub fn start(
        n: usize,
        load: Workload,
        addrs: [SocketAddr; 2],
        first: usize,
        stop: &Arc<AtomicBool>,
        live: &Arc<Mutex<Vec<Receipted>>>,
    ) -> Producers {
        let handles = (0..n)
            .map(|k| tokio::spawn(producer(k, load, addrs, first, stop.clone(), live.clone())))
            .collect();
        Producers {
            tasks: TaskGuard {
                stop: stop.clone(),
                handles,
            },
        }
    }

    /// Stops them; their reports, in order.
    pub async fn finish(mut self) -> Result<Vec<ProducerReport>> {
        self.tasks.finish("a producer").await
    }
}

/// What the [`consumer`] saw.
#[derive(Debug, Default)]
pub struct ConsumerLog {
    /// Every delivery: id, when, from which server (repeats kept).
    pub deliveries: Vec<(String, Instant, usize)>,
    /// The ids an ACK was sent for.
    pub ack_sent: BTreeSet<String>,
    /// When the first RECEIPT of an ACK of each id came.
    pub ack_receipted: BTreeMap<String, Instant>,
    /// Successful CONNECT + SUBSCRIBEs.
    pub connects: u64,
    /// Ids whose body was not the one sent.
    pub corrupt: Vec<String>,
    /// ERROR (or other unexpected) frames received.
    pub errors: Vec<String>,
}

impl ConsumerLog {
    /// Records the RECEIPT of the ACK of `id` (the first one counts).
    fn acked(&mut self, id: String) {
        self.ack_receipted.entry(id).or_insert_with(Instant::now);
    }
}

/// Consumes the workload's destination with client-individual ACKs, each
/// with a receipt (pipelined), until `stop`. On any failure it reconnects,
/// trying the two servers in turn every 50 ms, and subscribes again.
pub async fn consumer(
    load: Workload,
    addrs: [SocketAddr; 2],
    first: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<ConsumerLog>>,
) {
    let mut target = first;
    let mut receipt_no = 0u64;
    'outer: while !stop.load(Ordering::Relaxed) {
        let attempt = tokio::time::timeout(load.connect_timeout, async {
            let mut c = Stomp::connect_with(addrs[target], &LOGIN).await?;
            c.subscribe(
                "live",
                load.dest,
                "client-individual",
                &[("activemq.prefetchSize", "20")],
            )
            .await?;
            Ok::<Stomp, anyhow::Error>(c)
        })
        .await;
        let mut c = match attempt {
            Ok(Ok(c)) => c,
            _ => {
                target = 1 - target;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = target;
        lock(&log).connects += 1;
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let f = match c.recv_within(Duration::from_millis(200)).await {
                Err(_) => {
                    target = 1 - target;
                    continue 'outer;
                }
                Ok(None) => continue,
                Ok(Some(f)) => f,
            };
            match f.command {
                Command::Message => {
                    let id = f.get("x-id").unwrap_or("?").to_owned();
                    let ack = f.get("ack").unwrap_or_default().to_owned();
                    receipt_no += 1;
                    let receipt = format!("a{receipt_no}");
                    {
                        let mut l = lock(&log);
                        if f.body.as_ref() != load.body(&id).as_slice() {
                            l.corrupt.push(id.clone());
                        }
                        l.deliveries.push((id.clone(), Instant::now(), server));
                        l.ack_sent.insert(id.clone());
                    }
                    pending.insert(receipt.clone(), id);
                    let ackf = Frame::new(Command::Ack)
                        .header("id", ack)
                        .header("receipt", receipt);
                    if c.send(ackf).await.is_err() {
                        target = 1 - target;
                        continue 'outer;
                    }
                    if !load.ack_pause.is_zero() {
                        tokio::time::sleep(load.ack_pause).await;
                    }
                }
                Command::Receipt => {
                    let rid = f.get("receipt-id").unwrap_or_default();
                    if let Some(id) = pending.remove(rid) {
                        lock(&log).acked(id);
                    }
                }
                _ => {
                    lock(&log).errors.push(describe(&f));
                    target = 1 - target;
                    continue 'outer;
                }
            }
        }
        // Stopping: let the last ACK receipts arrive.
        let until = Instant::now() + Duration::from_secs(5);
        while !pending.is_empty() && Instant::now() < until {
            match c.recv_within(Duration::from_millis(200)).await {
                Ok(Some(f)) if f.command == Command::Receipt => {
                    let rid = f.get("receipt-id").unwrap_or_default();
                    if let Some(id) = pending.remove(rid) {
                        lock(&log).acked(id);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = c.disconnect().await;
    }
}

/// A running [`consumer`] task; dropping it aborts it.
#[derive(Debug)]
pub struct Consumer {
    tasks: TaskGuard<()>,
    log: Arc<Mutex<ConsumerLog>>,
}

impl Consumer {
    /// The consumer, starting on `addrs[first]`, until `stop`.
    pub fn start(
        load: Workload,
        addrs: [SocketAddr; 2],
        first: usize,
        stop: &Arc<AtomicBool>,
    ) -> Consumer {
        let log = Arc::new(Mutex::new(ConsumerLog::default()));
        let handle = tokio::spawn(consumer(load, addrs, first, stop.clone(), log.clone()));
        Consumer {
            tasks: TaskGuard {
                stop: stop.clone(),
                handles: vec![handle],
            },
            log,
        }
    }

    /// What it has seen so far.
    pub fn log(&self) -> MutexGuard<'_, ConsumerLog> {
        lock(&self.log)
    }

    /// Stops it; what it saw.
    pub async fn finish(mut self) -> Result<ConsumerLog> {
        self.tasks.finish("the consumer").await?;
        Ok(std::mem::take(&mut *lock(&self.log)))
    }
}

/// Drains `dest` from `addr`, acknowledging each message with a receipt,
/// until idle for 3 s: how many times each id came, and the ids whose body
/// was wrong.
pub async fn drain_acking(
    addr: SocketAddr,
    dest: &str,
    body_len: usize,
) -> Result<(BTreeMap<String, u32>, Vec<String>)> {
    let mut c = Stomp::connect_with(addr, &LOGIN).await?;
    c.subscribe("drain", dest, "client-individual", &[]).await?;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut corrupt = Vec::new();
    while let Some(m) = c.message_within(Duration::from_secs(3)).await? {
        let id = m
            .get("x-id")
            .ok_or_else(|| anyhow!("MESSAGE without x-id: {}", describe(&m)))?
            .to_owned();
        if m.body.as_ref() != body_for(&id, body_len).as_slice() {
            corrupt.push(id.clone());
        }
        c.ack(&m).await?;
        *seen.entry(id).or_default() += 1;
    }
    c.disconnect().await?;
    Ok((seen, corrupt))
}

/// Drains `dest` from `addr` (client-individual, 500 prefetched, ACKs
/// pipelined) until idle for 3 s; each delivery's id in order. A corrupt
/// body fails.
pub async fn drain_pipelined(addr: SocketAddr, dest: &str, body_len: usize) -> Result<Vec<String>> {
    let mut conn = Stomp::connect_with(addr, &LOGIN).await?;
    conn.subscribe(
        "drain",
        dest,
        "client-individual",
        &[("activemq.prefetchSize", "500")],
    )
    .await?;
    let mut got = Vec::new();
    while let Some(f) = conn.message_within(Duration::from_secs(3)).await? {
        let id = f
            .get("x-id")
            .ok_or_else(|| anyhow!("MESSAGE without x-id: {}", describe(&f)))?
            .to_owned();
        if f.body.as_ref() != body_for(&id, body_len).as_slice() {
            bail!("corrupt body of {id}");
        }
        conn.send(Frame::new(Command::Ack).header("id", f.get("ack").unwrap_or_default()))
            .await?;
        got.push(id);
    }
    conn.request(
        Frame::new(Command::Unsubscribe).header("id", "drain"),
        "unsub",
    )
    .await?;
    conn.disconnect().await?;
    Ok(got)
}

/// The ids that occur more than once, as `IDxN`.
pub fn duplicates(ids: &[String]) -> Vec<String> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for s in ids {
        *count.entry(s).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(s, n)| format!("{s}x{n}"))
        .collect()
}

/// The first ten, for messages.
pub fn sample<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<&'a String> {
    v.into_iter().take(10).collect()
}

/// CONNECT to a server that must not serve: expects an ERROR whose
/// `message` names `state`; returns the connection.
pub async fn refusal(addr: SocketAddr, state: &str) -> Result<Stomp> {
    let (c, reply) = Stomp::connect_frame(addr, &LOGIN).await?;
    if reply.command != Command::Error {
        bail!("a {state} server accepted CONNECT: {}", describe(&reply));
    }
    let msg = reply.get("message").unwrap_or_default();
    if !msg.contains(state) {
        bail!("ERROR does not name {state}: {}", describe(&reply));
    }
    Ok(c)
}

/// [`refusal`], and then the server closes the connection (STOMP: it
/// closes after an ERROR).
pub async fn expect_refusal(addr: SocketAddr, state: &str) -> Result<()> {
    let mut c = refusal(addr, state).await?;
    match c.recv_within(Duration::from_secs(5)).await {
        Err(_) => Ok(()),
        Ok(None) => bail!("{state} server kept the connection open after its ERROR"),
        Ok(Some(f)) => bail!("frame after the ERROR: {}", describe(&f)),
    }
}
