//! The HA channel between two servers over loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fmq_ha::heartbeat::{self, Channel, ChannelHandle, Greeting, LinkEvent, Message};
use fmq_ha::{Error, HaConfig, Mode, Role, State};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

const PING: u64 = 100;

fn config(role: Role, port: u16, peer_port: u16) -> HaConfig {
    HaConfig {
        mode: Mode::Shared,
        role,
        cluster_name: "FerroMQ".into(),
        bind_address: "127.0.0.1".into(),
        port,
        backup_ha_ip_address: "127.0.0.1".into(),
        backup_ha_port: peer_port,
        backup_server_ip: "127.0.0.1".into(),
        backup_server_port: 1956,
        backup_rmi_server_port: 1859,
        ping_interval: PING,
        lock_file: Some("/tmp/fmq-ha-test.lock".into()),
        gateway_server_ip_address: "127.0.0.1".into(),
        gateway_server_port: 7,
        active_lock_reacquisition_interval: 1000,
        passive_lock_reacquisition_interval: 2001,
        socket_creation_timeout: 1000,
        socket_initialization_timeout: 1000,
        nagle_algo: false,
        max_wait_timeout: 5000,
    }
}

async fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

type Events = mpsc::Receiver<LinkEvent>;

/// Waits for the first event matching `pred`, skipping others.
async fn expect(
    rx: &mut Events,
    within: Duration,
    what: &str,
    pred: impl Fn(&LinkEvent) -> bool,
) -> LinkEvent {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("channel stopped while waiting for {what}"),
            Err(_) => panic!("no {what} within {within:?}"),
        }
    }
}

fn is_up(e: &LinkEvent) -> bool {
    matches!(e, LinkEvent::Up { .. })
}
fn is_down(e: &LinkEvent) -> bool {
    matches!(e, LinkEvent::Down { .. })
}

/// Asserts nothing but PeerState/Data arrives for `d`.
async fn quiet(rx: &mut Events, d: Duration, who: &str) {
    let deadline = Instant::now() + d;
    while let Ok(Some(ev)) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        rx.recv(),
    )
    .await
    {
        assert!(
            matches!(ev, LinkEvent::PeerState { .. } | LinkEvent::Data { .. }),
            "{who}: unexpected {ev:?}"
        );
    }
}

const SOON: Duration = Duration::from_secs(3);

struct Pair {
    p: ChannelHandle,
    pe: Events,
    s: ChannelHandle,
    se: Events,
    p_port: u16,
    s_port: u16,
}

async fn pair() -> Pair {
    let (p_port, s_port) = free_ports().await;
    let (p, mut pe) = Channel::start(&config(Role::Primary, p_port, s_port), "primary".into());
    let (s, mut se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    match expect(&mut pe, SOON, "primary Up", is_up).await {
        LinkEvent::Up { peer } => assert_eq!(peer, "secondary"),
        _ => unreachable!(),
    }
    match expect(&mut se, SOON, "secondary Up", is_up).await {
        LinkEvent::Up { peer } => assert_eq!(peer, "primary"),
        _ => unreachable!(),
    }
    Pair {
        p,
        pe,
        s,
        se,
        p_port,
        s_port,
    }
}

fn peer_state(e: &LinkEvent) -> Option<(State, State)> {
    match e {
        LinkEvent::PeerState { current, previous } => Some((*current, *previous)),
        _ => None,
    }
}

#[tokio::test]
async fn link_comes_up_carries_states_and_resends_them_after_a_reconnect() {
    let (p_port, s_port) = free_ports().await;
    let (p, mut pe) = Channel::start(&config(Role::Primary, p_port, s_port), "primary".into());
    // Broadcast before any link: remembered and sent after the handshake.
    p.broadcast_state(State::Activating, State::Passive);
    p.broadcast_state(State::Active, State::Activating);
    assert!(p.send_data("x", vec![1]).await.is_err(), "no link yet");

    // The secondary starts late: the primary keeps redialing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, mut se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    expect(&mut pe, SOON, "primary Up", is_up).await;
    expect(&mut se, SOON, "secondary Up", is_up).await;
    let got = expect(&mut se, SOON, "primary's state", |e| {
        peer_state(e).is_some()
    })
    .await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));

    s.broadcast_state(State::Passive, State::Dead);
    let got = expect(&mut pe, SOON, "secondary's state", |e| {
        peer_state(e).is_some()
    })
    .await;
    assert_eq!(peer_state(&got), Some((State::Passive, State::Dead)));

    // Heartbeats keep an idle link up well past 3 x ping_interval.
    quiet(&mut pe, Duration::from_millis(8 * PING), "primary").await;
    quiet(&mut se, Duration::from_millis(8 * PING), "secondary").await;
    assert!(p.is_up() && s.is_up());

    // Opaque data both ways.
    p.send_data("batch", vec![0, 1, 255]).await.unwrap();
    match expect(&mut se, SOON, "data", |e| {
        matches!(e, LinkEvent::Data { .. })
    })
    .await
    {
        LinkEvent::Data { kind, payload } => {
            assert_eq!((kind.as_str(), payload), ("batch", vec![0, 1, 255]))
        }
        _ => unreachable!(),
    }
    s.send_data("ack", vec![]).await.unwrap();
    expect(
        &mut pe,
        SOON,
        "data",
        |e| matches!(e, LinkEvent::Data { kind, .. } if kind == "ack"),
    )
    .await;

    // The secondary restarts: the primary sees Down at once, then Up, and
    // the new secondary learns the primary's state without asking.
    let started = Instant::now();
    s.shutdown().await;
    expect(&mut pe, SOON, "primary Down", is_down).await;
    assert!(
        started.elapsed() < Duration::from_millis(3 * PING),
        "{:?}",
        started.elapsed()
    );
    assert!(!p.is_up());

    let (s2, mut se2) = Channel::start(
        &config(Role::Secondary, s_port, p_port),
        "secondary-2".into(),
    );
    match expect(&mut pe, SOON, "primary Up again", is_up).await {
        LinkEvent::Up { peer } => assert_eq!(peer, "secondary-2"),
        _ => unreachable!(),
    }
    expect(&mut se2, SOON, "secondary-2 Up", is_up).await;
    let got = expect(&mut se2, SOON, "re-sent state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));

    // A later change reaches it too.
    p.broadcast_state(State::Active, State::Active);
    let got = expect(&mut se2, SOON, "new state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Active)));

    p.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test]
async fn killing_the_primary_is_seen_and_its_restart_reconnects() {
    let Pair {
        p,
        pe: _pe,
        s,
        mut se,
        p_port,
        s_port,
    } = pair().await;
    let started = Instant::now();
    p.shutdown().await;
    expect(&mut se, SOON, "secondary Down", is_down).await;
    assert!(
        started.elapsed() < Duration::from_millis(3 * PING + 200),
        "{:?}",
        started.elapsed()
    );

    let (p2, mut pe2) = Channel::start(&config(Role::Primary, p_port, s_port), "primary".into());
    expect(&mut pe2, SOON, "primary Up", is_up).await;
    expect(&mut se, SOON, "secondary Up again", is_up).await;
    p2.shutdown().await;
    s.shutdown().await;
}

/// Dials `port` as a primary, completes the handshake by hand and returns
/// the open connection (which then stays silent).
async fn fake_primary(
    port: u16,
    cfg: &HaConfig,
) -> Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut wire = Framed::new(stream, heartbeat::codec());
    let g = Greeting::new(cfg, "fake".into());
    wire.send(heartbeat::encode(&Message::Hello(g.clone())).unwrap())
        .await
        .unwrap();
    let hello = heartbeat::decode(&wire.next().await.unwrap().unwrap()).unwrap();
    assert!(
        matches!(
            hello,
            Message::Hello(Greeting {
                role: Role::Secondary,
                ..
            })
        ),
        "{hello:?}"
    );
    wire.send(heartbeat::encode(&Message::Welcome(g)).unwrap())
        .await
        .unwrap();
    let welcome = heartbeat::decode(&wire.next().await.unwrap().unwrap()).unwrap();
    assert!(matches!(welcome, Message::Welcome(_)), "{welcome:?}");
    wire
}

#[tokio::test]
async fn a_silent_peer_is_down_after_three_ping_intervals() {
    let (p_port, s_port) = free_ports().await;
    let (s, mut se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _wire = fake_primary(s_port, &config(Role::Primary, p_port, s_port)).await;
    expect(&mut se, SOON, "Up", is_up).await;
    let up = Instant::now();
    let down = expect(&mut se, SOON, "Down", is_down).await;
    let took = up.elapsed();
    assert!(
        took >= Duration::from_millis(3 * PING - 30)
            && took < Duration::from_millis(3 * PING + 300),
        "{took:?}"
    );
    match down {
        LinkEvent::Down { reason } => assert!(reason.contains("no message"), "{reason}"),
        _ => unreachable!(),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn mismatched_ping_interval_is_fatal_on_both_sides() {
    let (p_port, s_port) = free_ports().await;
    let (_p, mut pe) = Channel::start(&config(Role::Primary, p_port, s_port), "primary".into());
    let slow = HaConfig {
        ping_interval: 200,
        ..config(Role::Secondary, s_port, p_port)
    };
    let (_s, mut se) = Channel::start(&slow, "secondary".into());
    for (rx, who) in [(&mut pe, "primary"), (&mut se, "secondary")] {
        let ev = expect(rx, SOON, "Refused", |e| matches!(e, LinkEvent::Refused(_))).await;
        match ev {
            LinkEvent::Refused(Error::Mismatch(keys)) => {
                assert_eq!(keys, ["PingInterval"], "{who}")
            }
            other => panic!("{who}: {other:?}"),
        }
        // The channel stops after a refusal.
        let end = tokio::time::timeout(SOON, async {
            while let Some(ev) = rx.recv().await {
                assert!(!is_up(&ev), "{who}: {ev:?}");
            }
        })
        .await;
        assert!(end.is_ok(), "{who}: the channel did not stop");
    }
}

#[tokio::test]
async fn two_primaries_are_refused() {
    let (a, b) = free_ports().await;
    let (_p1, mut e1) = Channel::start(&config(Role::Primary, a, b), "one".into());
    let (_p2, mut e2) = Channel::start(&config(Role::Primary, b, a), "two".into());
    for rx in [&mut e1, &mut e2] {
        match expect(rx, SOON, "Refused", |e| matches!(e, LinkEvent::Refused(_))).await {
            LinkEvent::Refused(Error::Config(reason)) => {
                assert!(
                    reason.contains("both servers are configured as Primary"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn another_cluster_is_refused() {
    let (p_port, s_port) = free_ports().await;
    let (_p, mut pe) = Channel::start(&config(Role::Primary, p_port, s_port), "primary".into());
    let other = HaConfig {
        cluster_name: "Other".into(),
        ..config(Role::Secondary, s_port, p_port)
    };
    let (_s, mut se) = Channel::start(&other, "secondary".into());
    for rx in [&mut pe, &mut se] {
        match expect(rx, SOON, "Refused", |e| matches!(e, LinkEvent::Refused(_))).await {
            LinkEvent::Refused(Error::Config(reason)) => {
                assert!(reason.contains("cluster name"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}

async fn closed_within(mut s: TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the channel closes the connection");
    started.elapsed()
}

#[tokio::test]
async fn garbage_clients_are_dropped_without_touching_the_link() {
    let Pair {
        p,
        mut pe,
        s,
        mut se,
        p_port,
        s_port,
    } = pair().await;
    for port in [s_port, p_port] {
        // Text: its first four bytes read as a huge length.
        let mut g1 = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        g1.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        closed_within(g1, Duration::from_secs(2)).await;

        // A well-framed message that is not JSON.
        let mut g2 = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        g2.write_all(&5u32.to_be_bytes()).await.unwrap();
        g2.write_all(b"hello").await.unwrap();
        closed_within(g2, Duration::from_secs(2)).await;

        // JSON, but a message out of turn.
        let mut g3 = Framed::new(
            TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
            heartbeat::codec(),
        );
        g3.send(heartbeat::encode(&Message::Ping { seq: 1 }).unwrap())
            .await
            .unwrap();
        closed_within(g3.into_inner(), Duration::from_secs(2)).await;
    }
    // The real link did not notice.
    quiet(&mut pe, Duration::from_millis(4 * PING), "primary").await;
    quiet(&mut se, Duration::from_millis(100), "secondary").await;
    p.broadcast_state(State::Active, State::Activating);
    let got = expect(&mut se, SOON, "state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));
    assert!(p.is_up() && s.is_up());
    p.shutdown().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_dropped_after_the_init_timeout() {
    let (p_port, s_port) = free_ports().await;
    let cfg = HaConfig {
        socket_initialization_timeout: 300,
        ..config(Role::Secondary, s_port, p_port)
    };
    let (s, mut se) = Channel::start(&cfg, "secondary".into());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mute = TcpStream::connect(("127.0.0.1", s_port)).await.unwrap();
    let took = closed_within(mute, Duration::from_secs(3)).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    // Not a link and not a refusal.
    assert!(se.try_recv().is_err());
    assert!(!s.is_up());
    s.shutdown().await;
}

#[tokio::test]
async fn wire_format_is_a_big_endian_length_and_json() {
    let (p_port, s_port) = free_ports().await;
    let (s, _se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut raw = TcpStream::connect(("127.0.0.1", s_port)).await.unwrap();
    let mut len = [0u8; 4];
    raw.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    raw.read_exact(&mut body).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "Hello");
    assert_eq!(v["protocol_version"], heartbeat::PROTOCOL_VERSION);
    assert_eq!(v["role"], "secondary");
    assert_eq!(v["server"], "secondary");
    assert_eq!(v["settings"][2], serde_json::json!(["PingInterval", "100"]));
    s.shutdown().await;
}

#[tokio::test]
async fn a_newer_link_replaces_a_half_open_one() {
    let (p_port, s_port) = free_ports().await;
    let (s, mut se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let primary = config(Role::Primary, p_port, s_port);
    let _old = fake_primary(s_port, &primary).await;
    expect(&mut se, SOON, "Up", is_up).await;
    let _new = fake_primary(s_port, &primary).await;
    match se.recv().await.unwrap() {
        LinkEvent::Down { reason } => assert!(reason.contains("replaced"), "{reason}"),
        other => panic!("{other:?}"),
    }
    expect(&mut se, SOON, "Up", is_up).await;
    s.shutdown().await;
}
