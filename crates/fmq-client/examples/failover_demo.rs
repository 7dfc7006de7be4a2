//! Sends `--count` numbered persistent messages through an HA pair while a
//! consumer on the same durable connection receives them, printing every
//! connection event. Kill the active server (or stop it with
//! `fmq shutdown`) while it runs: the connection fails over to the other
//! server, sends made meanwhile wait in the local buffer and are replayed
//! with their original producer id and sequence, and the consumer is
//! subscribed again. At the end it reports what was received: every
//! message, in order per producer, each once.
//!
//! ```text
//! cargo run --release -p fmq-client --example failover_demo -- \
//!     --addr 127.0.0.1:1856,127.0.0.1:1956 --login admin --passcode passwd \
//!     --count 2000 --interval-ms 5 --buffer-dir /tmp/fmq-demo-buffer
//! ```

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fmq_client::durable::{SendOutcome, SessionMode};

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut defaults = common::Args::defaults();
    defaults.destination = "/queue/failover-demo".into();
    defaults.client_id = Some("failover-demo".into());
    defaults.count = 1000;
    let args = common::parse_args(
        "failover_demo",
        "Sends numbered messages through an HA pair and prints failover events.",
        defaults,
    );
    let builder = args.builder().receive_timeout(Duration::from_secs(60));
    // Subscribed before connecting, so skipped and failing servers show too.
    let mut events = builder.events();
    let printer = tokio::spawn(async move {
        let started = Instant::now();
        while let Some(event) = events.next().await {
            println!("[{:>8.3} s] {event}", started.elapsed().as_secs_f64());
        }
    });
    let connection = builder.connect().await?;
    println!(
        "connected to {}",
        connection
            .server()
            .unwrap_or_else(|| "(nothing yet)".into())
    );

    // The consumer: its own session on the same connection.
    let receiving = connection.session(SessionMode::ClientIndividual);
    let mut consumer = receiving.consumer(&args.destination).await?;
    let count = args.count;
    let receiver = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut duplicates = 0usize;
        let mut out_of_order = 0usize;
        let mut last = None;
        while seen.len() < count {
            match consumer.receive().await {
                Ok(Some(m)) => {
                    let n: usize = m
                        .body_str()
                        .and_then(|b| b.strip_prefix("message "))
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(usize::MAX);
                    if !seen.insert(n) {
                        duplicates += 1;
                    } else if last.is_some_and(|l| n < l) {
                        out_of_order += 1;
                    }
                    last = Some(n);
                    let _ = m.ack().await;
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("consumer stopped: {e}");
                    break;
                }
            }
        }
        let _ = consumer.close().await;
        (seen, duplicates, out_of_order)
    });

    let sending = connection.session(SessionMode::Auto);
    let producer = sending.producer("failover-demo", &args.destination).await?;
    println!("producer id {}", producer.id());
    let started = Instant::now();
    let (mut receipted, mut buffered, mut duplicate) = (0, 0, 0);
    for i in 0..args.count {
        match producer.send(format!("message {i}")).await? {
            SendOutcome::Buffered => buffered += 1,
            SendOutcome::Duplicate => duplicate += 1,
            _ => receipted += 1,
        }
        if !args.interval.is_zero() {
            tokio::time::sleep(args.interval).await;
        }
    }
    connection.flush(Duration::from_secs(120)).await?;
    println!(
        "sent {} messages in {:?}: {receipted} receipted at once, {buffered} through the \
         local buffer, {duplicate} answered as duplicates",
        args.count,
        started.elapsed()
    );
    let (seen, duplicates, out_of_order) = receiver.await?;
    let missing = (0..args.count).filter(|n| !seen.contains(n)).count();
    println!(
        "received {} distinct messages: {missing} missing, {duplicates} duplicates dropped by \
         the application, {out_of_order} out of order",
        seen.len()
    );
    connection.close().await?;
    let _ = printer.await;
    if missing > 0 {
        return Err(format!("{missing} messages missing").into());
    }
    Ok(())
}
