//! A durable topic subscriber: receives `--count` messages published to a
//! topic under the subscription `--name` of client-id `--client-id`. The
//! broker keeps the topic's messages for the subscription while the
//! subscriber is away (and across a failover: the subscription is
//! replicated), so running it again picks up what was published meanwhile.
//! `--delete` removes the subscription at the end. The messages are taken
//! by a listener (`Consumer::listen`, the JMS MessageListener); the
//! `consumer` example shows the `receive` loop instead.
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
    let connection = args.builder().connect().await?;
    let mut events = connection.events();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            eprintln!("[event] {event}");
        }
    });
    let session = connection.session(SessionMode::ClientIndividual);
    let subscriber = session
        .durable_subscriber(&args.destination, &args.name)
        .await?;
    println!(
        "subscribed to {} as {}/{}",
        args.destination,
        args.client_id.as_deref().unwrap_or(""),
        args.name
    );
    // Asynchronous delivery, as with a JMS MessageListener: the handler gets
    // every message in order on a task of its own, across failovers too.
    let (handled, mut done) = tokio::sync::mpsc::unbounded_channel();
    let listener = subscriber.listen(move |message| {
        let handled = handled.clone();
        async move {
            println!("{}", String::from_utf8_lossy(message.body()));
            match message.ack().await {
                Ok(()) => {
                    let _ = handled.send(());
                }
                // Not acknowledged: the broker delivers it again.
                Err(e) => eprintln!("ACK of {} failed: {e}", message.message_id()),
            }
        }
    });
    let mut received = 0;
    while received < args.count {
        match tokio::time::timeout(Duration::from_secs(30), done.recv()).await {
            Ok(Some(())) => received += 1,
            Ok(None) => break,
            Err(_) => {
                eprintln!("no message for 30 s; stopping after {received}");
                break;
            }
        }
    }
    // Waits for the handler call under way; what was not handled stays
    // with the subscription.
    listener.stop().await?;
    if args.delete {
        session.unsubscribe(&args.name).await?;
        println!(
            "received {received} messages; subscription {} deleted",
            args.name
        );
    } else {
        println!(
            "received {received} messages; subscription {} kept for the next run",
            args.name
        );
    }
    connection.close().await?;
    Ok(())
}
