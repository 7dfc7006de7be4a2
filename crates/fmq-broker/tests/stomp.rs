//! The broker's STOMP behaviour over real TCP, one behaviour per test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{body, open_config, Conn, TestBroker};
use fmq_broker::Config;
use fmq_proto::{Command, Frame};
use fmq_store::{MemoryStore, Store};

#[tokio::test]
async fn queue_send_receive_with_receipts_and_headers() {
    let b = TestBroker::start(open_config()).await;
    let mut consumer = Conn::connect(b.addr, &[]).await;
    consumer
        .subscribe("s1", "/queue/a", "client-individual", &[])
        .await;
    let mut producer = Conn::connect(b.addr, &[]).await;
    producer
        .publish(
            "/queue/a",
            "hello",
            &[
                ("persistent", "true"),
                ("reply-to", "/queue/r"),
                ("correlation-id", "c-1"),
                ("color", "red"),
                ("priority", "7"),
            ],
        )
        .await;
    let m = consumer.message().await;
    assert_eq!(body(&m), "hello");
    assert_eq!(m.get("destination"), Some("/queue/a"));
    assert_eq!(m.get("subscription"), Some("s1"));
    assert_eq!(m.get("reply-to"), Some("/queue/r"));
    assert_eq!(m.get("correlation-id"), Some("c-1"));
    assert_eq!(m.get("color"), Some("red"));
    assert_eq!(m.get("priority"), Some("7"));
    assert_eq!(m.get("persistent"), Some("true"));
    assert!(m.get("message-id").is_some_and(|id| id.starts_with("ID:")));
    assert!(m.get("redelivered").is_none());
    consumer.ack(&m).await;
    b.stop().await;
}

#[tokio::test]
async fn competing_consumers_share_a_queue_fifo_per_producer() {
    let b = TestBroker::start(open_config()).await;
    let mut c1 = Conn::connect(b.addr, &[]).await;
    let mut c2 = Conn::connect(b.addr, &[]).await;
    c1.subscribe("s", "/queue/work", "auto", &[]).await;
    c2.subscribe("s", "/queue/work", "auto", &[]).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    for i in 0..20 {
        p.publish("/queue/work", &i.to_string(), &[]).await;
    }
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    while got1.len() + got2.len() < 20 {
        tokio::select! {
            Some(f) = c1.try_recv(Duration::from_secs(5)) => got1.push(body(&f).parse::<u32>().expect("n")),
            Some(f) = c2.try_recv(Duration::from_secs(5)) => got2.push(body(&f).parse::<u32>().expect("n")),
        }
    }
    assert!(
        !got1.is_empty() && !got2.is_empty(),
        "both consumers get work: {got1:?} {got2:?}"
    );
    assert!(
        got1.windows(2).all(|w| w[0] < w[1]),
        "FIFO per consumer: {got1:?}"
    );
    assert!(
        got2.windows(2).all(|w| w[0] < w[1]),
        "FIFO per consumer: {got2:?}"
    );
    let mut all: Vec<u32> = got1.into_iter().chain(got2).collect();
    all.sort_unstable();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
    b.stop().await;
}

#[tokio::test]
async fn topic_fans_out_and_selectors_filter() {
    let b = TestBroker::start(open_config()).await;
    let mut all = Conn::connect(b.addr, &[]).await;
    let mut red = Conn::connect(b.addr, &[]).await;
    all.subscribe("t", "/topic/news", "auto", &[]).await;
    red.subscribe(
        "t",
        "/topic/news",
        "auto",
        &[("selector", "color = 'red' AND weight > 5")],
    )
    .await;
    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish("/topic/news", "blue", &[("color", "blue"), ("weight", "9")])
        .await;
    p.publish(
        "/topic/news",
        "light-red",
        &[("color", "red"), ("weight", "2")],
    )
    .await;
    p.publish(
        "/topic/news",
        "heavy-red",
        &[("color", "red"), ("weight", "9")],
    )
    .await;
    for expected in ["blue", "light-red", "heavy-red"] {
        assert_eq!(body(&all.message().await), expected);
    }
    assert_eq!(body(&red.message().await), "heavy-red");
    assert!(red.try_recv(Duration::from_millis(300)).await.is_none());
    b.stop().await;
}

#[tokio::test]
async fn invalid_selector_is_an_error_naming_it() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.send(
        Frame::new(Command::Subscribe)
            .header("id", "1")
            .header("destination", "/queue/q")
            .header("selector", "color = "),
    )
    .await;
    let e = c.error().await;
    assert!(
        e.get("message")
            .is_some_and(|m| m.contains("invalid selector")),
        "{e:?}"
    );
    assert!(c.closed().await);
    b.stop().await;
}

#[tokio::test]
async fn durable_subscription_keeps_messages_while_offline_and_unsubscribe_removes_it() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::connect(b.addr, &[("client-id", "app-1")]).await;
    c.subscribe(
        "d",
        "/topic/prices",
        "client-individual",
        &[("activemq.subscriptionName", "prices-sub")],
    )
    .await;
    c.send_receipted(Frame::new(Command::Disconnect), "bye")
        .await;

    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish("/topic/prices", "p1", &[("persistent", "true")])
        .await;
    p.publish("/topic/prices", "p2", &[("persistent", "true")])
        .await;

    let mut c = Conn::connect(b.addr, &[("client-id", "app-1")]).await;
    c.subscribe(
        "d",
        "/topic/prices",
        "client-individual",
        &[("durable-subscription-name", "prices-sub")],
    )
    .await;
    let m1 = c.message().await;
    let m2 = c.message().await;
    assert_eq!((body(&m1), body(&m2)), ("p1".into(), "p2".into()));
    c.ack(&m1).await;
    c.ack(&m2).await;
    // A second connection with the same client-id is refused.
    let mut dup = Conn::raw(b.addr).await;
    dup.send(
        Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("client-id", "app-1"),
    )
    .await;
    let e = dup.error().await;
    assert!(
        e.get("message")
            .is_some_and(|m| m.contains("already connected")),
        "{e:?}"
    );

    c.send_receipted(Frame::new(Command::Unsubscribe).header("id", "d"), "u1")
        .await;
    c.send_receipted(
        Frame::new(Command::Unsubscribe).header("activemq.subscriptionName", "prices-sub"),
        "u2",
    )
    .await;
    p.publish("/topic/prices", "p3", &[("persistent", "true")])
        .await;
    let stats = b.broker.stats().await.expect("stats");
    assert!(
        stats.queues.iter().all(|q| !q.name.contains("prices-sub")),
        "{:?}",
        stats.queues
    );
    b.stop().await;
}

#[tokio::test]
async fn durable_subscription_needs_client_id() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.send(
        Frame::new(Command::Subscribe)
            .header("id", "1")
            .header("destination", "/topic/t")
            .header("activemq.subscriptionName", "s")
            .header("receipt", "r"),
    )
    .await;
    let e = c.error().await;
    assert!(
        e.get("message").is_some_and(|m| m.contains("client-id")),
        "{e:?}"
    );
    assert_eq!(e.get("receipt-id"), Some("r"));
    b.stop().await;
}

#[tokio::test]
async fn client_ack_is_cumulative_and_unacked_messages_are_redelivered() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    for i in 1..=3 {
        p.publish("/queue/c", &format!("m{i}"), &[("persistent", "true")])
            .await;
    }
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/c", "client", &[]).await;
    let _m1 = c.message().await;
    let m2 = c.message().await;
    let _m3 = c.message().await;
    c.ack(&m2).await; // acknowledges m1 and m2
    c.send_receipted(Frame::new(Command::Disconnect), "bye")
        .await;

    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/c", "client-individual", &[]).await;
    let again = c.message().await;
    assert_eq!(body(&again), "m3");
    assert_eq!(again.get("redelivered"), Some("true"));
    c.ack(&again).await;
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
    b.stop().await;
}

#[tokio::test]
async fn nack_redelivers_then_dead_letters_past_the_limit() {
    let config = Config {
        max_redeliveries: 2,
        ..open_config()
    };
    let b = TestBroker::start(config).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish("/queue/poison", "bad", &[("persistent", "true")])
        .await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/poison", "client-individual", &[])
        .await;
    for attempt in 0..3 {
        let m = c.message().await;
        assert_eq!(
            m.get("redelivered").is_some(),
            attempt > 0,
            "attempt {attempt}"
        );
        c.nack(&m).await;
    }
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
    let mut dlq = Conn::connect(b.addr, &[]).await;
    dlq.subscribe("d", "/queue/DLQ", "auto", &[]).await;
    let dead = dlq.message().await;
    assert_eq!(body(&dead), "bad");
    assert_eq!(dead.get("original-destination"), Some("/queue/poison"));
    assert!(
        dead.get("dlq-reason")
            .is_some_and(|r| r.contains("3 times")),
        "{dead:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn transactions_commit_and_abort_sends_and_acks() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/tx", "client-individual", &[])
        .await;

    p.send_receipted(Frame::new(Command::Begin).header("transaction", "t1"), "b")
        .await;
    p.send(
        Frame::new(Command::Send)
            .header("destination", "/queue/tx")
            .header("transaction", "t1")
            .with_body(&b"aborted"[..]),
    )
    .await;
    p.send_receipted(Frame::new(Command::Abort).header("transaction", "t1"), "a")
        .await;
    p.send_receipted(Frame::new(Command::Begin).header("transaction", "t2"), "b2")
        .await;
    p.send(
        Frame::new(Command::Send)
            .header("destination", "/queue/tx")
            .header("transaction", "t2")
            .with_body(&b"one"[..]),
    )
    .await;
    p.send(
        Frame::new(Command::Send)
            .header("destination", "/queue/tx")
            .header("transaction", "t2")
            .with_body(&b"two"[..]),
    )
    .await;
    assert!(
        c.try_recv(Duration::from_millis(200)).await.is_none(),
        "nothing before COMMIT"
    );
    p.send_receipted(Frame::new(Command::Commit).header("transaction", "t2"), "c")
        .await;
    let m1 = c.message().await;
    let m2 = c.message().await;
    assert_eq!((body(&m1), body(&m2)), ("one".into(), "two".into()));

    // ACK inside an aborted transaction leaves the message unacknowledged.
    c.send_receipted(Frame::new(Command::Begin).header("transaction", "ct"), "cb")
        .await;
    c.send(
        Frame::new(Command::Ack)
            .header("id", m1.get("ack").expect("ack"))
            .header("transaction", "ct"),
    )
    .await;
    c.send_receipted(Frame::new(Command::Abort).header("transaction", "ct"), "ca")
        .await;
    c.send_receipted(
        Frame::new(Command::Begin).header("transaction", "ct2"),
        "cb2",
    )
    .await;
    c.send(
        Frame::new(Command::Ack)
            .header("id", m2.get("ack").expect("ack"))
            .header("transaction", "ct2"),
    )
    .await;
    c.send_receipted(
        Frame::new(Command::Commit).header("transaction", "ct2"),
        "cc",
    )
    .await;
    let stats = b.broker.stats().await.expect("stats");
    let q = stats
        .queues
        .iter()
        .find(|q| q.name == "/queue/tx")
        .expect("queue");
    assert_eq!((q.inflight, q.dequeued), (1, 1), "{q:?}");

    c.send(Frame::new(Command::Commit).header("transaction", "nope"))
        .await;
    let e = c.error().await;
    assert!(
        e.get("message")
            .is_some_and(|m| m.contains("'nope' was not begun")),
        "{e:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn prefetch_limits_unacknowledged_deliveries() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    for i in 0..5 {
        p.publish("/queue/pf", &i.to_string(), &[]).await;
    }
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe(
        "s",
        "/queue/pf",
        "client-individual",
        &[("activemq.prefetchSize", "2")],
    )
    .await;
    let m0 = c.message().await;
    let _m1 = c.message().await;
    assert!(
        c.try_recv(Duration::from_millis(300)).await.is_none(),
        "prefetch of 2 holds the third"
    );
    c.ack(&m0).await;
    assert_eq!(body(&c.message().await), "2");
    b.stop().await;
}

#[tokio::test]
async fn priority_orders_waiting_messages_and_expired_ones_are_dropped() {
    let b = TestBroker::start(open_config()).await;
    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish("/queue/pr", "low", &[("priority", "1")]).await;
    p.publish("/queue/pr", "high", &[("priority", "9")]).await;
    p.publish(
        "/queue/pr",
        "gone",
        &[("priority", "9"), ("expires", "1000")],
    )
    .await;
    p.publish("/queue/pr", "normal", &[]).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/pr", "auto", &[]).await;
    let order: Vec<String> = vec![
        body(&c.message().await),
        body(&c.message().await),
        body(&c.message().await),
    ];
    assert_eq!(order, ["high", "normal", "low"]);
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());
    let stats = b.broker.stats().await.expect("stats");
    assert_eq!(stats.expired, 1);
    b.stop().await;
}

#[tokio::test]
async fn bad_frames_get_an_error_naming_the_problem() {
    let b = TestBroker::start(open_config()).await;
    let cases: Vec<(Frame, &str)> = vec![
        (
            Frame::new(Command::Send).header("destination", "orders"),
            "must start with /queue/ or /topic/",
        ),
        (Frame::new(Command::Send), "no destination header"),
        (
            Frame::new(Command::Send)
                .header("destination", "/queue/x")
                .header("priority", "12"),
            "priority '12'",
        ),
        (
            Frame::new(Command::Send)
                .header("destination", "/queue/x")
                .header("expires", "soon"),
            "expires 'soon'",
        ),
        (
            Frame::new(Command::Subscribe).header("destination", "/queue/x"),
            "no id header",
        ),
        (
            Frame::new(Command::Subscribe)
                .header("id", "1")
                .header("destination", "/queue/x")
                .header("ack", "sometimes"),
            "ack mode 'sometimes'",
        ),
        (
            Frame::new(Command::Ack).header("id", "999999"),
            "not delivered",
        ),
        (Frame::new(Command::Message), "unexpected MESSAGE"),
    ];
    for (frame, needle) in cases {
        let mut c = Conn::connect(b.addr, &[]).await;
        c.send(frame).await;
        let e = c.error().await;
        let text = format!("{:?} {}", e.get("message"), body(&e));
        assert!(text.contains(needle), "want {needle:?} in {text}");
        assert!(c.closed().await, "connection closed after ERROR");
    }
    // Malformed bytes at the codec level.
    let mut c = Conn::connect(b.addr, &[]).await;
    use tokio::io::AsyncWriteExt;
    c.io.get_mut()
        .write_all(b"SEND\ndestination:/queue/x\ncontent-length:zz\n\nabc\0")
        .await
        .expect("write");
    let e = c.error().await;
    assert!(format!("{e:?}").contains("content-length"), "{e:?}");
    b.stop().await;
}

#[tokio::test]
async fn first_frame_must_be_connect_and_versions_are_negotiated() {
    let b = TestBroker::start(open_config()).await;
    let mut c = Conn::raw(b.addr).await;
    c.send(Frame::new(Command::Send).header("destination", "/queue/x"))
        .await;
    let e = c.error().await;
    assert!(
        e.get("message")
            .is_some_and(|m| m.contains("expected CONNECT")),
        "{e:?}"
    );

    let mut c = Conn::raw(b.addr).await;
    c.send(Frame::new(Command::Connect).header("accept-version", "2.0"))
        .await;
    let e = c.error().await;
    assert!(format!("{e:?}").contains("1.2"), "{e:?}");

    let mut c = Conn::raw(b.addr).await;
    c.send(Frame::new(Command::Stomp).header("accept-version", "1.0,1.1"))
        .await;
    let ok = c.recv().await;
    assert_eq!(ok.command, Command::Connected);
    assert_eq!(ok.get("version"), Some("1.1"));
    b.stop().await;
}

#[tokio::test]
async fn silent_client_is_dropped_after_missing_heart_beats() {
    let config = Config {
        heart_beat: (200, 200),
        ..open_config()
    };
    let b = TestBroker::start(config).await;
    let mut c = Conn::raw(b.addr).await;
    c.send(
        Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("heart-beat", "200,200"),
    )
    .await;
    let ok = c.recv().await;
    assert_eq!(ok.get("heart-beat"), Some("200,200"));
    // Say nothing: the server drops us after about twice the interval.
    let start = std::time::Instant::now();
    let e = c.error().await;
    assert!(
        e.get("message").is_some_and(|m| m.contains("heart-beat")),
        "{e:?}"
    );
    assert!(c.closed().await);
    assert!(start.elapsed() < Duration::from_secs(4));
    b.stop().await;
}

#[tokio::test]
async fn server_sends_heart_beats_when_idle() {
    let config = Config {
        heart_beat: (100, 0),
        ..open_config()
    };
    let b = TestBroker::start(config).await;
    let mut c = Conn::raw(b.addr).await;
    c.send(
        Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("heart-beat", "0,100"),
    )
    .await;
    assert_eq!(c.recv().await.command, Command::Connected);
    use futures::StreamExt;
    let beat = tokio::time::timeout(Duration::from_secs(2), c.io.next())
        .await
        .expect("something arrives");
    assert!(
        matches!(beat, Some(Ok(fmq_proto::Item::HeartBeat))),
        "{beat:?}"
    );
    b.stop().await;
}

#[tokio::test]
async fn authentication_and_acls_are_enforced() {
    let b = TestBroker::start(Config::default()).await;
    let mut c = Conn::raw(b.addr).await;
    c.send(
        Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("login", "admin")
            .header("passcode", "wrong"),
    )
    .await;
    let e = c.error().await;
    assert!(
        e.get("message")
            .is_some_and(|m| m.contains("authentication failed")),
        "{e:?}"
    );

    let sec = b.broker.security();
    sec.add_user("writer", "w-pass").await.expect("add");
    sec.grant("writer", "/queue/orders.>", "w")
        .await
        .expect("grant");
    let mut w = Conn::connect(b.addr, &[("login", "writer"), ("passcode", "w-pass")]).await;
    w.publish("/queue/orders.eu", "ok", &[]).await;
    w.send(
        Frame::new(Command::Subscribe)
            .header("id", "1")
            .header("destination", "/queue/orders.eu"),
    )
    .await;
    let e = w.error().await;
    assert_eq!(
        e.get("message"),
        Some("user 'writer' is not authorized to read from /queue/orders.eu")
    );
    let mut w = Conn::connect(b.addr, &[("login", "writer"), ("passcode", "w-pass")]).await;
    w.send(Frame::new(Command::Send).header("destination", "/queue/payments"))
        .await;
    let e = w.error().await;
    assert_eq!(
        e.get("message"),
        Some("user 'writer' is not authorized to write to /queue/payments")
    );
    let mut admin = Conn::connect(b.addr, &[("login", "admin"), ("passcode", "passwd")]).await;
    admin.subscribe("1", "/queue/orders.eu", "auto", &[]).await;
    assert_eq!(body(&admin.message().await), "ok");
    b.stop().await;
}

#[tokio::test]
async fn persistent_state_is_recovered_by_a_new_broker_on_the_same_store() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let b = TestBroker::start_on(store.clone(), open_config()).await;
    let mut c = Conn::connect(b.addr, &[("client-id", "keeper")]).await;
    c.subscribe(
        "d",
        "/topic/t",
        "client-individual",
        &[("activemq.subscriptionName", "s")],
    )
    .await;
    c.send_receipted(Frame::new(Command::Disconnect), "bye")
        .await;
    let mut p = Conn::connect(b.addr, &[]).await;
    p.publish("/queue/keep", "kept", &[("persistent", "true")])
        .await;
    p.publish("/queue/keep", "volatile", &[]).await;
    p.publish("/topic/t", "for-durable", &[("persistent", "true")])
        .await;
    drop(p);
    b.stop().await;

    let b = TestBroker::start_on(store, open_config()).await;
    let mut c = Conn::connect(b.addr, &[]).await;
    c.subscribe("s", "/queue/keep", "auto", &[]).await;
    assert_eq!(body(&c.message().await), "kept");
    assert!(
        c.try_recv(Duration::from_millis(300)).await.is_none(),
        "non-persistent message is gone"
    );
    let mut d = Conn::connect(b.addr, &[("client-id", "keeper")]).await;
    d.subscribe(
        "d",
        "/topic/t",
        "client-individual",
        &[("activemq.subscriptionName", "s")],
    )
    .await;
    assert_eq!(body(&d.message().await), "for-durable");
    b.stop().await;
}

#[tokio::test]
async fn auto_ack_delivery_is_not_redelivered_after_disconnect() {
    let b = TestBroker::start(open_config()).await;
    for round in 0..20 {
        let q = format!("/queue/auto.{round}");
        let mut c = Conn::connect(b.addr, &[]).await;
        c.publish(&q, "once", &[("persistent", "true")]).await;
        c.subscribe("s", &q, "auto", &[]).await;
        assert_eq!(body(&c.message().await), "once");
        c.send_receipted(Frame::new(Command::Disconnect), "bye")
            .await;
        let mut c = Conn::connect(b.addr, &[]).await;
        c.subscribe("s", &q, "auto", &[]).await;
        assert!(
            c.try_recv(Duration::from_millis(50)).await.is_none(),
            "round {round}: an auto-acknowledged message came back"
        );
    }
    b.stop().await;
}
