//! A message delivered to an `ack:auto` subscription is acknowledged once
//! written: after the client got it and DISCONNECTed, the next subscriber
//! must not receive it again (found with stomp.py in t04, where it showed as
//! a `redelivered:true` copy). Several clients at once make the race between
//! the session's "written" report and its close likely.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fmq_tests::{describe, Server, Stomp, TempProfile};

const CLIENTS: usize = 4;
const ROUNDS: usize = 40;

async fn rounds(addr: SocketAddr, client: usize) -> Result<usize> {
    let mut bad = 0;
    for round in 0..ROUNDS {
        let q = format!("/queue/t05.{client}.{round}");
        let mut c = Stomp::connect(addr, "admin", "passwd").await?;
        c.publish(&q, b"once", &[]).await?;
        c.subscribe("s", &q, "auto", &[]).await?;
        c.message_within(Duration::from_secs(5))
            .await?
            .context("first delivery")?;
        c.disconnect().await?;

        let mut c = Stomp::connect(addr, "admin", "passwd").await?;
        c.subscribe("s", &q, "auto", &[]).await?;
        if let Some(m) = c.message_within(Duration::from_millis(100)).await? {
            eprintln!(
                "{q}: auto-acknowledged message delivered again: {}",
                describe(&m)
            );
            bad += 1;
        }
        c.disconnect().await?;
    }
    Ok(bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_ack_message_is_not_redelivered_after_disconnect() -> Result<()> {
    let mut server = Server::start(TempProfile::new())?;
    let addr = server.addr();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(rounds(addr, c)))
        .collect();
    let mut bad = 0;
    for t in tasks {
        bad += t.await??;
    }
    server.stop()?;
    ensure!(
        bad == 0,
        "{bad} of {} auto-acknowledged messages were redelivered (redelivered:true) after a graceful DISCONNECT",
        CLIENTS * ROUNDS
    );
    Ok(())
}
