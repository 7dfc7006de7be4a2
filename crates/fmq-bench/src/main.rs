//! `fmq-bench`: a STOMP 1.2 load generator that measures end-to-end
//! throughput and latency and counts lost and duplicate messages.
//!
//! One consumer connection subscribes (and waits for the SUBSCRIBE receipt)
//! before `--producers` producer connections start sending. Every body
//! carries producer id, sequence and send time, so the consumer can compute
//! latency and detect gaps and duplicates.

mod payload;
mod stomp;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{oneshot, Barrier};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use payload::{BodyTemplate, Stamp, PREFIX_LEN};
use stomp::{error_text, Command, ConnectOptions, Connection, Frame};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum AckMode {
    ClientIndividual,
    Client,
    Auto,
}

impl AckMode {
    fn header(self) -> &'static str {
        match self {
            AckMode::ClientIndividual => "client-individual",
            AckMode::Client => "client",
            AckMode::Auto => "auto",
        }
    }
}

/// STOMP 1.2 load generator (end-to-end throughput, latency, loss, duplicates).
#[derive(Debug, Clone, Parser)]
#[command(name = "fmq-bench", version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 61613)]
    port: u16,
    #[arg(long)]
    login: Option<String>,
    #[arg(long)]
    passcode: Option<String>,
    /// Value of the CONNECT `host` header (RabbitMQ wants `/`); default: --host.
    #[arg(long)]
    vhost: Option<String>,
    /// Destination; default a unique `/queue/fmq-bench.<pid>.<time>`.
    #[arg(long)]
    destination: Option<String>,
    /// Messages per producer.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Body size in bytes (at least the 48-byte stamp).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Request a receipt on every K-th SEND (and the last) and wait for it; 0 = never.
    #[arg(long, default_value_t = 1)]
    receipt_every: u64,
    /// Send `persistent:true`.
    #[arg(long)]
    persistent: bool,
    /// Consumer acknowledgement mode.
    #[arg(long, value_enum, default_value_t = AckMode::ClientIndividual)]
    ack: AckMode,
    /// Consumer prefetch: sends `activemq.prefetchSize` and `prefetch-count`.
    #[arg(long)]
    prefetch: Option<u32>,
    /// After the last expected message, keep reading this long to catch duplicates.
    #[arg(long, default_value_t = 200)]
    linger_ms: u64,
    /// Whole-run timeout in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct ProducerStats {
    first_send_ns: Option<u64>,
    sent: u64,
    receipts: u64,
}

/// What the consumer saw.
#[derive(Debug)]
struct ConsumerState {
    seen: Vec<Vec<u64>>,
    messages: u64,
    unique: u64,
    duplicates: u64,
    unexpected: u64,
    hist: Histogram<u64>,
    last_new_ns: Option<u64>,
    server: Option<String>,
}

impl ConsumerState {
    fn new(producers: u32, messages: u64) -> Result<Self> {
        let words = usize::try_from(messages.div_ceil(64))?;
        Ok(ConsumerState {
            seen: (0..producers).map(|_| vec![0u64; words]).collect(),
            messages,
            unique: 0,
            duplicates: 0,
            unexpected: 0,
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            last_new_ns: None,
            server: None,
        })
    }

    /// Record one received body at `now_ns`.
    fn record(&mut self, stamp: Option<Stamp>, now_ns: u64) {
        let Some(s) = stamp.filter(|s| s.seq < self.messages) else {
            self.unexpected += 1;
            return;
        };
        let Some(bits) = self.seen.get_mut(s.producer as usize) else {
            self.unexpected += 1;
            return;
        };
        let Some(word) = usize::try_from(s.seq / 64)
            .ok()
            .and_then(|w| bits.get_mut(w))
        else {
            self.unexpected += 1;
            return;
        };
        let mask = 1u64 << (s.seq % 64);
        if *word & mask != 0 {
            self.duplicates += 1;
            return;
        }
        *word |= mask;
        self.unique += 1;
        self.last_new_ns = Some(now_ns);
        let us = now_ns.saturating_sub(s.sent_ns) / 1000;
        self.hist.saturating_record(us.max(1));
    }
}

#[derive(Debug, Serialize)]
struct LatencyMs {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    server: Option<String>,
    destination: String,
    producers: u32,
    messages_per_producer: u64,
    expected: u64,
    messages: u64,
    size: usize,
    receipt_every: u64,
    persistent: bool,
    ack: AckMode,
    prefetch: Option<u32>,
    sent: u64,
    unsent: u64,
    receipts: u64,
    seconds: f64,
    msg_per_sec: f64,
    latency_ms: LatencyMs,
    lost: u64,
    duplicates: u64,
    unexpected: u64,
    timed_out: bool,
    errors: Vec<String>,
    ok: bool,
}

fn now_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn connect_opts(a: &Args) -> ConnectOptions {
    ConnectOptions {
        host: a.host.clone(),
        port: a.port,
        login: a.login.clone(),
        passcode: a.passcode.clone(),
        vhost: a.vhost.clone().unwrap_or_else(|| a.host.clone()),
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.to_string().contains("timed out")
}

/// Handle one frame on the consumer connection; returns the ACK to send.
fn consume_frame(
    f: Frame,
    st: &mut ConsumerState,
    ack: AckMode,
    start: Instant,
) -> Result<Option<Frame>> {
    match f.command.as_str() {
        "MESSAGE" => {
            let now = now_ns(start);
            st.record(payload::parse(&f.body), now);
            if ack == AckMode::Auto {
                return Ok(None);
            }
            let frame = match f.get("ack") {
                Some(id) => Frame::new(Command::Ack).header("id", id),
                None => {
                    // STOMP 1.1-style servers: ACK by message-id.
                    let Some(mid) = f.get("message-id") else {
                        bail!("MESSAGE without ack or message-id header");
                    };
                    let mut a = Frame::new(Command::Ack).header("message-id", mid);
                    if let Some(sub) = f.get("subscription") {
                        a = a.header("subscription", sub);
                    }
                    a
                }
            };
            Ok(Some(frame))
        }
        "ERROR" => bail!("consumer: {}", error_text(&f)),
        _ => Ok(None),
    }
}

async fn run_consumer(
    args: &Args,
    dest: &str,
    start: Instant,
    deadline: Instant,
    st: &mut ConsumerState,
    ready: oneshot::Sender<()>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut conn = Connection::connect(&connect_opts(args), deadline).await?;
    st.server = conn.server.clone();
    let mut sub = Frame::new(Command::Subscribe)
        .header("id", "0")
        .header("destination", dest)
        .header("ack", args.ack.header())
        .header("receipt", "sub-0");
    if let Some(p) = args.prefetch {
        sub = sub
            .header("activemq.prefetchSize", p.to_string())
            .header("prefetch-count", p.to_string());
    }
    conn.send(&sub).await?;
    let ack = args.ack;
    conn.wait_receipt("sub-0", deadline, |f| {
        // A MESSAGE before the receipt would be a leftover: count it.
        if f.command == Command::Message {
            st.record(payload::parse(&f.body), now_ns(start));
        }
        Ok(())
    })
    .await?;
    let _ = ready.send(());

    let expected = u64::from(args.producers) * args.messages;
    let mut linger_until: Option<Instant> = None;
    loop {
        let mut last_ack = None;
        while let Some(f) = conn.buffered_frame()? {
            if let Some(a) = consume_frame(f, st, ack, start)? {
                if ack == AckMode::Client {
                    last_ack = Some(a); // cumulative: ACK only the newest
                } else {
                    conn.queue(&a)?;
                }
            }
        }
        if let Some(a) = last_ack {
            conn.queue(&a)?;
        }
        conn.flush().await?;
        if st.unique >= expected && linger_until.is_none() {
            linger_until = Some(Instant::now() + Duration::from_millis(args.linger_ms));
        }
        let wait_until = linger_until.map_or(deadline, |l| l.min(deadline));
        tokio::select! {
            r = conn.fill(wait_until) => {
                if let Err(e) = r {
                    if linger_until.is_some() && is_timeout(&e) {
                        break; // linger over
                    }
                    return Err(e);
                }
            }
            _ = cancel.cancelled() => break,
        }
    }
    // Best effort: the measurement is done.
    let _ = conn.disconnect(Duration::from_secs(2)).await;
    Ok(())
}

async fn run_producer(
    args: Arc<Args>,
    dest: Arc<str>,
    id: u32,
    start: Instant,
    deadline: Instant,
    go: Arc<Barrier>,
    stats: &mut ProducerStats,
) -> Result<()> {
    let mut conn = Connection::connect(&connect_opts(&args), deadline).await?;
    let tmpl = BodyTemplate::new(args.size);
    let size = args.size.to_string();
    go.wait().await;
    let k = args.receipt_every;
    for seq in 0..args.messages {
        let sent_ns = now_ns(start);
        let body = tmpl.body(Stamp {
            producer: id,
            seq,
            sent_ns,
        });
        let mut f = Frame::new(Command::Send)
            .header("destination", &*dest)
            .header("content-length", size.clone());
        if args.persistent {
            f = f.header("persistent", "true");
        }
        let want_receipt = k > 0 && ((seq + 1) % k == 0 || seq + 1 == args.messages);
        let receipt_id = format!("r{seq}");
        if want_receipt {
            f = f.header("receipt", receipt_id.clone());
        }
        let f = f.with_body(body);
        conn.send(&f).await?;
        stats.first_send_ns.get_or_insert(sent_ns);
        stats.sent += 1;
        if want_receipt {
            conn.wait_receipt(&receipt_id, deadline, |f| {
                bail!("producer {id}: unexpected {} frame", f.command)
            })
            .await?;
            stats.receipts += 1;
        }
    }
    let _ = conn.disconnect(Duration::from_secs(2)).await;
    Ok(())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

async fn run(args: Args) -> Result<Report> {
    if args.size < PREFIX_LEN {
        bail!("--size must be at least {PREFIX_LEN}");
    }
    if args.producers == 0 || args.messages == 0 {
        bail!("--producers and --messages must be positive");
    }
    let dest: Arc<str> = match &args.destination {
        Some(d) => d.as_str().into(),
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            format!("/queue/fmq-bench.{}.{t}", std::process::id()).into()
        }
    };
    let args = Arc::new(args);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout);
    let expected = u64::from(args.producers) * args.messages;
    let mut errors = Vec::new();

    // Consumer first; producers start only once it is subscribed.
    let cancel = CancellationToken::new();
    let (ready_tx, ready_rx) = oneshot::channel();
    let consumer = {
        let args = args.clone();
        let dest = dest.clone();
        let cancel = cancel.clone();
        let mut st = ConsumerState::new(args.producers, args.messages)?;
        tokio::spawn(async move {
            let r = run_consumer(&args, &dest, start, deadline, &mut st, ready_tx, cancel).await;
            (st, r)
        })
    };
    let subscribed = ready_rx.await.is_ok();

    let mut stats = Vec::new();
    if subscribed {
        let go = Arc::new(Barrier::new(args.producers as usize));
        let mut handles = Vec::new();
        for id in 0..args.producers {
            let (args, dest, go) = (args.clone(), dest.clone(), go.clone());
            handles.push(tokio::spawn(async move {
                let mut s = ProducerStats::default();
                let r = run_producer(args, dest, id, start, deadline, go, &mut s).await;
                (s, r)
            }));
        }
        let mut failed = false;
        for h in handles {
            match h.await {
                Ok((s, r)) => {
                    stats.push(s);
                    if let Err(e) = r {
                        errors.push(format!("producer: {e:#}"));
                        failed = true;
                    }
                }
                Err(e) => {
                    errors.push(format!("producer task: {e}"));
                    failed = true;
                }
            }
        }
        if failed {
            // Give in-flight messages a moment, then stop the consumer.
            let grace = (Instant::now() + Duration::from_secs(2)).min(deadline);
            let c = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(grace).await;
                c.cancel();
            });
        }
    }
    let (st, cr) = consumer.await?;
    if let Err(e) = cr {
        errors.push(format!("consumer: {e:#}"));
    }

    let timed_out = Instant::now() >= deadline || errors.iter().any(|e| e.contains("timed out"));
    let first = stats.iter().filter_map(|s| s.first_send_ns).min();
    let seconds = match (first, st.last_new_ns) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => 0.0,
    };
    let h = &st.hist;
    // Lost: sent (written to the socket) but never received. Messages a
    // failed or timed-out producer never sent are `unsent`, not lost.
    let sent: u64 = stats.iter().map(|s| s.sent).sum();
    let lost = sent.saturating_sub(st.unique);
    let unsent = expected.saturating_sub(sent);
    let ok = lost == 0 && unsent == 0 && st.duplicates == 0 && !timed_out && errors.is_empty();
    Ok(Report {
        server: st.server.clone(),
        destination: dest.to_string(),
        producers: args.producers,
        messages_per_producer: args.messages,
        expected,
        messages: st.unique,
        size: args.size,
        receipt_every: args.receipt_every,
        persistent: args.persistent,
        ack: args.ack,
        prefetch: args.prefetch,
        sent,
        unsent,
        receipts: stats.iter().map(|s| s.receipts).sum(),
        seconds,
        msg_per_sec: if seconds > 0.0 {
            st.unique as f64 / seconds
        } else {
            0.0
        },
        latency_ms: LatencyMs {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        },
        lost,
        duplicates: st.duplicates,
        unexpected: st.unexpected,
        timed_out,
        errors,
        ok,
    })
}

fn print_text(r: &Report) {
    println!(
        "server {} destination {}",
        r.server.as_deref().unwrap_or("?"),
        r.destination
    );
    println!(
        "{} producers x {} msgs, {} B, receipt every {}, persistent {}, ack {}, prefetch {:?}",
        r.producers,
        r.messages_per_producer,
        r.size,
        r.receipt_every,
        r.persistent,
        r.ack.header(),
        r.prefetch
    );
    println!(
        "received {}/{} in {:.3} s: {:.0} msg/s end to end",
        r.messages, r.expected, r.seconds, r.msg_per_sec
    );
    let l = &r.latency_ms;
    println!(
        "latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} mean {:.3}",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean
    );
    println!(
        "lost {} duplicates {} unexpected {} unsent {} timed_out {}",
        r.lost, r.duplicates, r.unexpected, r.unsent, r.timed_out
    );
    for e in &r.errors {
        println!("error: {e}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fmq-bench: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(r) => {
            if json {
                match serde_json::to_string(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("fmq-bench: json: {e}"),
                }
            } else {
                print_text(&r);
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("fmq-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(producer: u32, seq: u64) -> Option<Stamp> {
        Some(Stamp {
            producer,
            seq,
            sent_ns: 1_000,
        })
    }

    #[test]
    fn counts_unique_duplicates_and_unexpected() {
        let mut st = ConsumerState::new(2, 100).expect("state");
        st.record(stamp(0, 0), 2_000_000);
        st.record(stamp(0, 99), 3_000_000);
        st.record(stamp(1, 0), 3_000_000);
        st.record(stamp(0, 0), 4_000_000); // duplicate
        st.record(stamp(2, 0), 4_000_000); // no such producer
        st.record(stamp(0, 100), 4_000_000); // beyond --messages
        st.record(None, 4_000_000); // not our body
        assert_eq!(st.unique, 3);
        assert_eq!(st.duplicates, 1);
        assert_eq!(st.unexpected, 3);
        assert_eq!(st.last_new_ns, Some(3_000_000));
        assert_eq!(st.hist.len(), 3);
    }

    #[test]
    fn ack_frames_follow_the_message() {
        let start = Instant::now();
        let mut st = ConsumerState::new(1, 10).expect("state");
        let msg = Frame::new(Command::Message)
            .header("subscription", "0")
            .header("message-id", "m1")
            .header("ack", "a1");
        let ack = consume_frame(msg, &mut st, AckMode::ClientIndividual, start)
            .expect("ok")
            .expect("ack");
        assert_eq!(ack.command, Command::Ack);
        assert_eq!(ack.get("id"), Some("a1"));
        let old = Frame::new(Command::Message)
            .header("subscription", "0")
            .header("message-id", "m2");
        let ack = consume_frame(old, &mut st, AckMode::Client, start)
            .expect("ok")
            .expect("ack");
        assert_eq!(ack.get("message-id"), Some("m2"));
        assert_eq!(ack.get("subscription"), Some("0"));
        let none =
            consume_frame(Frame::new(Command::Message), &mut st, AckMode::Auto, start).expect("ok");
        assert!(none.is_none());
        assert!(consume_frame(Frame::new(Command::Error), &mut st, AckMode::Auto, start).is_err());
        assert_eq!(st.unexpected, 3);
    }
}
