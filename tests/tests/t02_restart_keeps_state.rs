//! Users and ACLs added with `fmq user add` / `fmq acl grant`, a durable
//! subscription and persistent queue messages survive a SIGTERM restart and
//! a kill -9 restart; the added user is authenticated and confined to its
//! ACL after each.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use fmq_tests::{describe, output_text, Command, Frame, Server, Stomp, TempProfile};

const BOB_CLIENT: &str = "bob-app";
const NEWS: &str = "/topic/bob.news";
const INBOX: &str = "/queue/bob.inbox";

/// What every phase checks for `user` (whose ACL is `rw` on `bob.>`).
async fn check_user(addr: SocketAddr, user: &str, password: &str) -> Result<()> {
    // Right password: CONNECTED, and a SEND inside the ACL is receipted.
    let mut c = Stomp::connect(addr, user, password)
        .await
        .with_context(|| format!("{user} cannot connect"))?;
    c.publish("/queue/bob.scratch", b"hello", &[])
        .await
        .with_context(|| format!("{user} cannot send inside its ACL"))?;
    c.disconnect().await?;

    // Wrong password: an ERROR naming authentication.
    let (_c, reply) =
        Stomp::connect_frame(addr, &[("login", user), ("passcode", "definitely-wrong")]).await?;
    ensure!(
        reply.command == Command::Error,
        "wrong password for {user} was accepted: {}",
        describe(&reply)
    );
    let msg = reply.get("message").unwrap_or_default().to_lowercase();
    ensure!(
        msg.contains("authentication"),
        "ERROR for a wrong password does not name authentication: {}",
        describe(&reply)
    );

    // A SEND outside the ACL: an ERROR naming the destination.
    let mut c = Stomp::connect(addr, user, password).await?;
    let err = c
        .expect_error(
            Frame::new(Command::Send)
                .header("destination", "/queue/secret.stuff")
                .header("receipt", "forbidden")
                .with_body(&b"x"[..]),
        )
        .await?;
    let text = format!(
        "{} {}",
        err.get("message").unwrap_or_default(),
        String::from_utf8_lossy(&err.body)
    );
    ensure!(
        text.contains("/queue/secret.stuff"),
        "ERROR for a forbidden SEND does not name the destination: {}",
        describe(&err)
    );
    Ok(())
}

/// Bob's durable subscription gets `expected` (published while offline),
/// and his inbox holds `inbox` (sent before the restart).
async fn check_bob_state(addr: SocketAddr, expected: &str, inbox: &str) -> Result<()> {
    let mut c = Stomp::connect_with(
        addr,
        &[
            ("login", "bob"),
            ("passcode", "s3cret"),
            ("client-id", BOB_CLIENT),
        ],
    )
    .await?;
    c.subscribe(
        "news",
        NEWS,
        "client-individual",
        &[("activemq.subscriptionName", "news")],
    )
    .await?;
    let m = c
        .message_within(Duration::from_secs(5))
        .await?
        .with_context(|| format!("durable subscription lost its message {expected:?}"))?;
    ensure!(
        m.body[..] == *expected.as_bytes(),
        "durable subscription delivered {} instead of {expected:?}",
        describe(&m)
    );
    c.ack(&m).await?;
    ensure!(
        c.message_within(Duration::from_millis(300))
            .await?
            .is_none(),
        "durable subscription delivered more than the one message"
    );
    c.subscribe("inbox", INBOX, "client-individual", &[])
        .await?;
    let m = c
        .message_within(Duration::from_secs(5))
        .await?
        .with_context(|| format!("persistent queue message {inbox:?} lost"))?;
    ensure!(
        m.body[..] == *inbox.as_bytes(),
        "inbox delivered {} instead of {inbox:?}",
        describe(&m)
    );
    c.ack(&m).await?;
    c.disconnect().await
}

/// While bob is offline: a persistent publish to his durable subscription
/// and a persistent message in his inbox.
async fn leave_bob_mail(addr: SocketAddr, news: &str, inbox: &str) -> Result<()> {
    let mut admin = Stomp::connect(addr, "admin", "passwd").await?;
    admin
        .publish(NEWS, news.as_bytes(), &[("persistent", "true")])
        .await?;
    admin.disconnect().await?;
    let mut bob = Stomp::connect(addr, "bob", "s3cret").await?;
    bob.publish(INBOX, inbox.as_bytes(), &[("persistent", "true")])
        .await?;
    bob.disconnect().await
}

fn assert_listed(server: &Server, users: &[&str]) {
    let list = server.admin_ok(&["user", "list"]);
    for u in users {
        assert!(
            list.lines().any(|l| l.trim() == *u),
            "fmq user list lacks {u}: {list:?}"
        );
    }
    let acls = server.admin_ok(&["acl", "list"]);
    for u in users.iter().filter(|u| **u != "admin") {
        assert!(
            acls.lines()
                .any(|l| l.starts_with(u) && l.contains("bob.>") && l.contains("rw")),
            "fmq acl list lacks {u} rw on bob.>: {acls:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_acls_and_durables_survive_sigterm_and_kill9() -> Result<()> {
    let mut server = Server::start(TempProfile::new())?;
    let addr = server.addr();

    let out = server.admin_ok(&["user", "add", "bob", "--password", "s3cret"]);
    assert!(out.contains("bob"), "user add said {out:?}");
    let out = server.admin_ok(&["acl", "grant", "bob", "bob.>", "rw"]);
    assert!(out.contains("bob.>"), "acl grant said {out:?}");
    // Adding the same user twice is refused with a clear message.
    let dup = server.admin(&["user", "add", "bob", "--password", "x"]);
    assert!(
        !dup.status.success() && output_text(&dup).contains("already exists"),
        "second user add of bob: {}",
        output_text(&dup)
    );
    assert_listed(&server, &["admin", "bob"]);
    check_user(addr, "bob", "s3cret").await?;

    // Register the durable subscription, go offline, leave mail.
    let mut c = Stomp::connect_with(
        addr,
        &[
            ("login", "bob"),
            ("passcode", "s3cret"),
            ("client-id", BOB_CLIENT),
        ],
    )
    .await?;
    c.subscribe(
        "news",
        NEWS,
        "client-individual",
        &[("activemq.subscriptionName", "news")],
    )
    .await?;
    c.disconnect().await?;
    leave_bob_mail(addr, "news-1", "inbox-1").await?;

    // 1. Graceful restart.
    let status = server.stop()?;
    assert!(
        status.success(),
        "SIGTERM exit: {status}\n{}",
        server.log_tail(30)
    );
    server.restart()?;
    assert_listed(&server, &["admin", "bob"]);
    check_user(addr, "bob", "s3cret").await?;
    check_bob_state(addr, "news-1", "inbox-1").await?;

    // A user added just before the crash must survive it too.
    server.admin_ok(&["user", "add", "carol", "--password", "c4rol"]);
    server.admin_ok(&["acl", "grant", "carol", "bob.>", "rw"]);
    leave_bob_mail(addr, "news-2", "inbox-2").await?;

    // 2. kill -9 restart.
    server.kill9();
    server.restart()?;
    assert_listed(&server, &["admin", "bob", "carol"]);
    check_user(addr, "bob", "s3cret").await?;
    check_user(addr, "carol", "c4rol").await?;
    check_bob_state(addr, "news-2", "inbox-2").await?;

    // Removing a user is effective and survives a restart too.
    server.admin_ok(&["user", "remove", "carol"]);
    server.kill9();
    server.restart()?;
    let (_c, reply) =
        Stomp::connect_frame(addr, &[("login", "carol"), ("passcode", "c4rol")]).await?;
    assert_eq!(
        reply.command,
        Command::Error,
        "removed user carol can still connect: {}",
        describe(&reply)
    );
    server.stop()?;
    Ok(())
}
