//! Receives `--count` messages from a destination, acknowledging each one.
//!
//! ```text
//! cargo run --release -p fmq-client --example consumer -- \
//!     --addr 127.0.0.1:1856 --login admin --passcode passwd \
//!     --destination /queue/demo --count 100
//! ```

use std::time::{Duration, Instant};

use fmq_client::{AckMode, Client, ConnectOptions, SubscribeOptions};

/// Command-line arguments shared by the producer and consumer examples.
#[derive(Debug)]
struct Args {
    addr: String,
    login: Option<String>,
    passcode: Option<String>,
    destination: String,
    count: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: "127.0.0.1:1856".into(),
        login: None,
        passcode: None,
        destination: "/queue/demo".into(),
        count: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--login" => args.login = Some(value()?),
            "--passcode" => args.passcode = Some(value()?),
            "--destination" => args.destination = value()?,
            "--count" => {
                let v = value()?;
                args.count = v
                    .parse()
                    .map_err(|_| format!("--count {v}: not a number"))?;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: consumer [--addr HOST:PORT] [--login USER] [--passcode PASS] \
                     [--destination /queue/NAME] [--count N]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
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
