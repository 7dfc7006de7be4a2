//! Sends `--count` persistent messages to a destination through a durable
//! connection, each one receipted by the broker (or buffered while no
//! server is reachable, and delivered later).
//!
//! ```text
//! cargo run --release -p fmq-client --example producer -- \
//!     --addr 127.0.0.1:1856,127.0.0.1:1956 --login admin --passcode passwd \
//!     --destination /queue/demo --count 100
//! ```
//!
//! With `--buffer-dir DIR --client-id ID --offline-start` it also starts
//! while no server is reachable: the sends wait in `DIR`, and a later run
//! with the same directory and client-id delivers what an earlier run left
//! there (before its own sends, with the same producer id and sequences).

use std::time::{Duration, Instant};

use fmq_client::durable::{SendOptions, SendOutcome, SessionMode};

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::parse_args(
        "producer",
        "Sends persistent messages through a durable connection.",
        common::Args::defaults(),
    );
    let connection = args.builder().connect().await?;
    let session = connection.session(SessionMode::Auto);
    let producer = session.producer(&args.name, &args.destination).await?;
    let started = Instant::now();
    let mut buffered = 0;
    for i in 0..args.count {
        let options = SendOptions::new().header("seq", i.to_string());
        if producer.send_with(format!("message {i}"), options).await? == SendOutcome::Buffered {
            buffered += 1;
        }
        if !args.interval.is_zero() {
            tokio::time::sleep(args.interval).await;
        }
    }
    println!(
        "{} sends made, {} waiting in the local buffer",
        args.count,
        connection.buffered()
    );
    // Whatever went to the local buffer is delivered before we leave.
    connection.flush(Duration::from_secs(60)).await?;
    println!(
        "sent {} messages to {} in {:?} ({buffered} went through the local buffer)",
        args.count,
        args.destination,
        started.elapsed()
    );
    connection.close().await?;
    Ok(())
}
