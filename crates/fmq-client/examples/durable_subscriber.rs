//! A durable topic subscriber: receives `--count` messages published to a
//! topic under the subscription `--name` of client-id `--client-id`. The
//! broker keeps the topic's messages for the subscription while the
//! subscriber is away (and across a failover: the subscription is
//! replicated), so running it again picks up what was published meanwhile.
//! `--delete` removes the subscription at the end.
//!
//! ```text
//! cargo run --release -p fmq-client --example durable_subscriber -- \
//!     --addr 127.0.0.1:1856,127.0.0.1:1956 --login admin --passcode passwd \
//!     --client-id reporting --name daily --destination /topic/prices --count 10
//! ```

use std::time::Duration;

use fmq_client::durable::SessionMode;

mod common;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut defaults = common::Args::defaults();
    defaults.destination = "/topic/demo".into();
    defaults.client_id = Some("durable-demo".into());
    let args = common::parse_args(
        "durable_subscriber",
        "Receives a topic's messages through a named durable subscription.",
        defaults,
    );
    let connection = args
        .builder()
        .receive_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    let mut events = connection.events();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            eprintln!("[event] {event}");
        }
    });
    let session = connection.session(SessionMode::ClientIndividual);
    let mut subscriber = session
        .durable_subscriber(&args.destination, &args.name)
        .await?;
    println!(
        "subscribed to {} as {}/{}",
        args.destination,
        args.client_id.as_deref().unwrap_or(""),
        args.name
    );
    let mut received = 0;
    while received < args.count {
        let Some(message) = subscriber.receive().await? else {
            eprintln!("no message for 30 s; stopping after {received}");
            break;
        };
        println!("{}", String::from_utf8_lossy(message.body()));
        message.ack().await?;
        received += 1;
    }
    if args.delete {
        subscriber.unsubscribe_durable().await?;
        println!(
            "received {received} messages; subscription {} deleted",
            args.name
        );
    } else {
        subscriber.close().await?;
        println!(
            "received {received} messages; subscription {} kept for the next run",
            args.name
        );
    }
    connection.close().await?;
    Ok(())
}
