//! The client against an in-process broker.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{options, TestBroker, QUIET, SOON};
use fmq_client::{AckMode, ConnectOptions, Error, SubscribeOptions};

#[tokio::test]
async fn queue_send_and_receive_with_receipts() {
    let broker = TestBroker::start().await;
    let producer = broker.client().await;
    let consumer = broker.client().await;
    assert!(producer.is_connected());
    assert!(producer.server().unwrap_or("").starts_with("FerroMQ"));

    for i in 0..3 {
        producer
            .send_with_receipt(
                "/queue/orders",
                format!("order {i}"),
                &[("persistent", "true"), ("region", "eu")],
            )
            .await
            .unwrap();
    }
    // Fire-and-forget sends are ordered after the receipted ones.
    producer
        .send("/queue/orders", "order 3", &[])
        .await
        .unwrap();

    let mut sub = consumer
        .subscribe("/queue/orders", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 0..4 {
        let m = sub.next_timeout(SOON).await.unwrap().expect("a message");
        assert_eq!(m.body_str(), Some(format!("order {i}").as_str()));
        assert_eq!(m.destination, "/queue/orders");
        assert_eq!(m.subscription, sub.id);
        assert!(!m.message_id.is_empty());
        assert!(!m.redelivered);
        if i < 3 {
            assert_eq!(m.header("region"), Some("eu"));
            assert_eq!(m.header("persistent"), Some("true"));
        }
        // ack is a no-op in auto mode.
        m.ack().await.unwrap();
    }
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());

    // Binary bodies with NULs survive (the codec adds content-length).
    producer
        .send_with_receipt("/queue/orders", &b"a\0b"[..], &[])
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(&m.body[..], b"a\0b");

    sub.unsubscribe().await.unwrap();
    producer.disconnect().await.unwrap();
    assert!(consumer.is_connected());
    consumer.disconnect().await.unwrap();
}

#[tokio::test]
async fn topic_fans_out_to_every_subscriber() {
    let broker = TestBroker::start().await;
    let a = broker.client().await;
    let b = broker.client().await;
    let mut sa = a
        .subscribe("/topic/news", SubscribeOptions::default())
        .await
        .unwrap();
    let mut sb = b
        .subscribe("/topic/news", SubscribeOptions::default())
        .await
        .unwrap();
    // A second subscription on the same connection also gets everything.
    let mut sa2 = a
        .subscribe("/topic/news", SubscribeOptions::default())
        .await
        .unwrap();

    let producer = broker.client().await;
    for i in 0..5 {
        producer
            .send_with_receipt("/topic/news", format!("n{i}"), &[])
            .await
            .unwrap();
    }
    for sub in [&mut sa, &mut sb, &mut sa2] {
        for i in 0..5 {
            let m = sub.next_timeout(SOON).await.unwrap().expect("a message");
            assert_eq!(m.body_str(), Some(format!("n{i}").as_str()));
            assert_eq!(m.subscription, sub.id);
        }
        assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn durable_subscription_keeps_messages_while_away() {
    let broker = TestBroker::start().await;
    let durable_opts = || ConnectOptions {
        client_id: Some("reporting".into()),
        ..options()
    };
    let sub_opts = || SubscribeOptions {
        durable_name: Some("daily".into()),
        ack: AckMode::Client,
        ..Default::default()
    };

    let c = broker.connect(durable_opts()).await;
    let sub = c.subscribe("/topic/prices", sub_opts()).await.unwrap();
    drop(sub);
    c.disconnect().await.unwrap();

    let producer = broker.client().await;
    for i in 0..3 {
        producer
            .send_with_receipt("/topic/prices", format!("p{i}"), &[("persistent", "true")])
            .await
            .unwrap();
    }

    let c = broker.connect(durable_opts()).await;
    let mut sub = c.subscribe("/topic/prices", sub_opts()).await.unwrap();
    let mut last = None;
    for i in 0..3 {
        let m = sub
            .next_timeout(SOON)
            .await
            .unwrap()
            .expect("a kept message");
        assert_eq!(m.body_str(), Some(format!("p{i}").as_str()));
        last = Some(m);
    }
    // Client mode: acking the last acknowledges all three.
    last.unwrap().ack_with_receipt().await.unwrap();
    sub.unsubscribe_durable().await.unwrap();
    c.disconnect().await.unwrap();

    // Deleted: what is published now is not kept for "daily".
    producer
        .send_with_receipt("/topic/prices", "lost", &[("persistent", "true")])
        .await
        .unwrap();
    let c = broker.connect(durable_opts()).await;
    let mut sub = c.subscribe("/topic/prices", sub_opts()).await.unwrap();
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
    sub.unsubscribe_durable().await.unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn durable_subscription_needs_a_client_id() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let err = c
        .subscribe(
            "/topic/prices",
            SubscribeOptions {
                durable_name: Some("daily".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("client-id")),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_individual_nack_redelivers() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe(
            "/queue/work",
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await
        .unwrap();
    c.send_with_receipt("/queue/work", "one", &[])
        .await
        .unwrap();
    c.send_with_receipt("/queue/work", "two", &[])
        .await
        .unwrap();

    let one = sub.next_timeout(SOON).await.unwrap().unwrap();
    let two = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(one.body_str(), Some("one"));
    assert_eq!(two.body_str(), Some("two"));
    assert!(!one.redelivered);

    // Acking "two" individually leaves "one" outstanding; nack it.
    two.ack_with_receipt().await.unwrap();
    one.nack().await.unwrap();

    let again = sub.next_timeout(SOON).await.unwrap().expect("redelivery");
    assert_eq!(again.body_str(), Some("one"));
    assert!(again.redelivered);
    assert_eq!(again.message_id, one.message_id);
    again.ack_with_receipt().await.unwrap();
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());

    // Nothing left for another consumer either.
    drop(sub);
    let other = broker.client().await;
    let mut sub = other
        .subscribe(
            "/queue/work",
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await
        .unwrap();
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
}

#[tokio::test]
async fn unacked_messages_are_redelivered_to_the_next_consumer() {
    let broker = TestBroker::start().await;
    let producer = broker.client().await;
    producer
        .send_with_receipt("/queue/jobs", "job", &[])
        .await
        .unwrap();

    let first = broker.client().await;
    let mut sub = first
        .subscribe("/queue/jobs", SubscribeOptions::ack(AckMode::Client))
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert!(!m.redelivered);
    drop((m, sub));
    first.disconnect().await.unwrap();

    let second = broker.client().await;
    let mut sub = second
        .subscribe("/queue/jobs", SubscribeOptions::ack(AckMode::Client))
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().expect("redelivery");
    assert_eq!(m.body_str(), Some("job"));
    assert!(m.redelivered);
    m.ack_with_receipt().await.unwrap();
}

#[tokio::test]
async fn auto_ack_messages_cannot_be_nacked() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe("/queue/a", SubscribeOptions::default())
        .await
        .unwrap();
    c.send("/queue/a", "x", &[]).await.unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert!(matches!(m.nack().await, Err(Error::Usage(_))));
    // The misuse did not hurt the connection.
    assert!(c.is_connected());
    c.send_with_receipt("/queue/a", "y", &[]).await.unwrap();
}

#[tokio::test]
async fn transaction_commit_delivers_and_abort_does_not() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe("/queue/tx", SubscribeOptions::default())
        .await
        .unwrap();

    let tx = c.begin().await.unwrap();
    tx.send("/queue/tx", "committed 1", &[]).await.unwrap();
    tx.send("/queue/tx", "committed 2", &[("persistent", "true")])
        .await
        .unwrap();
    assert!(
        sub.next_timeout(QUIET).await.unwrap().is_none(),
        "sent before commit"
    );
    tx.commit().await.unwrap();
    for i in 1..=2 {
        let m = sub
            .next_timeout(SOON)
            .await
            .unwrap()
            .expect("committed message");
        assert_eq!(m.body_str(), Some(format!("committed {i}").as_str()));
    }

    let tx = c.begin().await.unwrap();
    tx.send("/queue/tx", "aborted", &[]).await.unwrap();
    tx.abort().await.unwrap();
    // A dropped transaction is aborted too.
    let tx = c.begin().await.unwrap();
    tx.send("/queue/tx", "dropped", &[]).await.unwrap();
    drop(tx);
    c.send_with_receipt("/queue/tx", "marker", &[])
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.body_str(), Some("marker"));
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
    assert!(c.is_connected());
}

#[tokio::test]
async fn transactional_ack_takes_effect_on_commit() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    c.send_with_receipt("/queue/in", "work", &[]).await.unwrap();
    let mut sub = c
        .subscribe(
            "/queue/in",
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();

    // Aborted: the ack is discarded, the message comes back after the
    // consumer goes away.
    let tx = c.begin().await.unwrap();
    tx.ack(&m).await.unwrap();
    tx.send("/queue/out", "result", &[]).await.unwrap();
    tx.abort().await.unwrap();
    sub.unsubscribe().await.unwrap();

    let mut sub = c
        .subscribe(
            "/queue/in",
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await
        .unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().expect("redelivery");
    assert!(m.redelivered);

    let tx = c.begin().await.unwrap();
    tx.ack(&m).await.unwrap();
    tx.send("/queue/out", "result", &[]).await.unwrap();
    tx.commit().await.unwrap();
    sub.unsubscribe().await.unwrap();

    let mut sub = c
        .subscribe(
            "/queue/in",
            SubscribeOptions::ack(AckMode::ClientIndividual),
        )
        .await
        .unwrap();
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
    let mut out = c
        .subscribe("/queue/out", SubscribeOptions::default())
        .await
        .unwrap();
    let r = out.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(r.body_str(), Some("result"));
    assert!(out.next_timeout(QUIET).await.unwrap().is_none());
}

#[tokio::test]
async fn server_error_fails_the_call_and_everything_after() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe("/queue/ok", SubscribeOptions::default())
        .await
        .unwrap();
    let other = c.clone();

    let err = c.send_with_receipt("foo", "x", &[]).await.unwrap_err();
    let Error::Server { message, detail } = &err else {
        panic!("expected a server error, got {err:?}");
    };
    assert!(message.contains("'foo'"), "{message}");
    assert!(message.contains("/queue/"), "{message}");
    assert!(detail.contains("SEND"), "{detail}");
    assert!(err.to_string().contains("foo"));

    assert!(!c.is_connected());
    assert!(!other.is_connected());
    // Later calls fail fast with the same error, on every handle.
    let started = std::time::Instant::now();
    let again = other.send("/queue/ok", "y", &[]).await.unwrap_err();
    assert!(
        matches!(&again, Error::Server { message: m, .. } if m == message),
        "{again:?}"
    );
    assert!(matches!(
        c.subscribe("/queue/ok", SubscribeOptions::default()).await,
        Err(Error::Server { .. })
    ));
    assert!(matches!(c.begin().await, Err(Error::Server { .. })));
    assert!(matches!(
        sub.next_timeout(SOON).await,
        Err(Error::Server { .. })
    ));
    assert!(sub.next().await.is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(c.disconnect().await, Err(Error::Server { .. })));
}

#[tokio::test]
async fn fire_and_forget_error_surfaces_on_the_next_wait() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe("/queue/ok", SubscribeOptions::default())
        .await
        .unwrap();
    c.send("/queue/", "x", &[]).await.unwrap();
    // The ERROR ends the subscription rather than leaving it hanging.
    assert!(tokio::time::timeout(SOON, sub.next())
        .await
        .unwrap()
        .is_none());
    let err = c
        .send_with_receipt("/queue/ok", "y", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("empty queue name")),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_password_is_refused_with_the_servers_reason() {
    let broker = TestBroker::with_auth().await;
    let err = fmq_client::Client::connect(
        broker.addr,
        ConnectOptions {
            timeout: SOON,
            ..ConnectOptions::with_credentials("admin", "wrong")
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("authentication")),
        "{err:?}"
    );
    let err = fmq_client::Client::connect(broker.addr, ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("authentication")),
        "{err:?}"
    );
    // The right password works.
    let c = broker.client().await;
    c.send_with_receipt("/queue/secure", "ok", &[])
        .await
        .unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn heart_beats_keep_an_idle_connection_alive() {
    let broker = TestBroker::with_config(fmq_broker::Config {
        authentication: false,
        heart_beat: (250, 250),
        ..Default::default()
    })
    .await;
    let c = broker
        .connect(ConnectOptions {
            heart_beat: (250, 250),
            ..options()
        })
        .await;
    // Well past the broker's limit (2 × 250 ms + grace) and ours
    // (2 × 250 ms); 250 ms beats leave room for a stalled scheduler on a
    // loaded machine without making the test meaningless.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(c.is_connected());
    c.send_with_receipt("/queue/hb", "still here", &[])
        .await
        .unwrap();
    c.disconnect().await.unwrap();
}

#[tokio::test]
async fn selector_and_prefetch_are_passed_on() {
    let broker = TestBroker::start().await;
    let c = broker.client().await;
    let mut sub = c
        .subscribe(
            "/queue/sel",
            SubscribeOptions {
                selector: Some("region = 'eu'".into()),
                prefetch: Some(1),
                ack: AckMode::ClientIndividual,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for region in ["us", "eu", "eu"] {
        c.send_with_receipt("/queue/sel", region, &[("region", region)])
            .await
            .unwrap();
    }
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.header("region"), Some("eu"));
    // Prefetch 1: the second match waits for the ack.
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
    m.ack().await.unwrap();
    let m = sub.next_timeout(SOON).await.unwrap().unwrap();
    assert_eq!(m.header("region"), Some("eu"));
    m.ack_with_receipt().await.unwrap();
    assert!(sub.next_timeout(QUIET).await.unwrap().is_none());
}
