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
                    "usage: producer [--addr HOST:PORT] [--login USER] [--passcode PASS] \
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
