//! Sends `--count` persistent messages to a destination and waits for the
//! broker to confirm each batch.
//!
//! ```text
//! cargo run --release -p fmq-client --example producer -- \
//!     --addr 127.0.0.1:1856 --login admin --passcode passwd \
//!     --destination /queue/demo --count 100
//! ```

use std::time::Instant;

use fmq_client::{Client, ConnectOptions};

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::parse_args("producer")?;
    let client = Client::connect(
        args.addr.as_str(),
        ConnectOptions {
            login: args.login,
            passcode: args.passcode,
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    for i in 0..args.count {
        let body = format!("message {i}");
        let seq = i.to_string();
        let headers = [("persistent", "true"), ("seq", seq.as_str())];
        // Confirm every 100th message (and the last) so a broker problem is
        // reported promptly without a round trip per message.
        if (i + 1) % 100 == 0 || i + 1 == args.count {
            client
                .send_with_receipt(&args.destination, body, &headers)
                .await?;
        } else {
            client.send(&args.destination, body, &headers).await?;
        }
    }
    println!(
        "sent {} messages to {} in {:?}",
        args.count,
        args.destination,
        started.elapsed()
    );
    client.disconnect().await?;
    Ok(())
}
