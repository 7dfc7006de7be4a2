//! Receives `--count` messages from a destination, acknowledging each one.
//!
//! ```text
//! cargo run --release -p fmq-client --example consumer -- \
//!     --addr 127.0.0.1:1856 --login admin --passcode passwd \
//!     --destination /queue/demo --count 100
//! ```

use std::time::{Duration, Instant};

use fmq_client::{AckMode, Client, ConnectOptions, SubscribeOptions};

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::parse_args("consumer")?;
    let client = Client::connect(
        args.addr.as_str(),
        ConnectOptions {
            login: args.login,
            passcode: args.passcode,
            ..Default::default()
        },
    )
    .await?;
    let mut sub = client
        .subscribe(
            &args.destination,
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await?;
    let started = Instant::now();
    let mut received = 0;
    while received < args.count {
        match sub.next_timeout(Duration::from_secs(30)).await? {
            Some(message) => {
                message.ack().await?;
                received += 1;
                if received <= 5 || received == args.count {
                    println!(
                        "{} {}: {}",
                        message.message_id,
                        if message.redelivered {
                            "(redelivered)"
                        } else {
                            ""
                        },
                        String::from_utf8_lossy(&message.body)
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
    sub.unsubscribe().await?;
    client.disconnect().await?;
    Ok(())
}
