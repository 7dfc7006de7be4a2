//! Receives `--count` messages from a destination through a durable
//! connection, acknowledging each one.
//!
//! ```text
//! cargo run --release -p fmq-client --example consumer -- \
//!     --addr 127.0.0.1:1856,127.0.0.1:1956 --login admin --passcode passwd \
//!     --destination /queue/demo --count 100
//! ```

use std::time::{Duration, Instant};

use fmq_client::durable::SessionMode;

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::parse_args(
        "consumer",
        "Receives and acknowledges messages through a durable connection.",
        common::Args::defaults(),
    );
    let connection = args
        .builder()
        .receive_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let session = connection.session(SessionMode::ClientIndividual);
    let mut consumer = session.consumer(&args.destination).await?;
    let started = Instant::now();
    let mut received = 0;
    while received < args.count {
        match consumer.receive().await? {
            Some(message) => {
                message.ack().await?;
                received += 1;
                if received <= 5 || received == args.count {
                    println!(
                        "{} {}: {}",
                        message.message_id(),
                        if message.redelivered() {
                            "(redelivered)"
                        } else {
                            ""
                        },
                        String::from_utf8_lossy(message.body())
                    );
                }
            }
            None => {
                eprintln!("no message for 30 s; giving up after {received}");
                break;
            }
        }
    }
    println!(
        "received {received} messages from {} in {:?}",
        args.destination,
        started.elapsed()
    );
    consumer.close().await?;
    connection.close().await?;
    Ok(())
}
