//! The HA channel between two servers over loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use fmq_ha::heartbeat::{
    self, Channel, ChannelHandle, Greeting, LinkEvent, Message, ReplicationStream,
};
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
        replication: Default::default(),
        replication_log_batches: 1000,
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
        LinkEvent::PeerState {
            current, previous, ..
        } => Some((*current, *previous)),
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

fn peer_position(e: &LinkEvent) -> Option<Option<(u64, u64)>> {
    match e {
        LinkEvent::PeerState { position, .. } => Some(*position),
        _ => None,
    }
}

#[tokio::test]
async fn the_position_in_state_reaches_the_peer_and_is_resent_after_a_reconnect() {
    let Pair {
        p,
        mut pe,
        s,
        mut se,
        p_port,
        s_port,
    } = pair().await;
    p.broadcast_state_at(State::Active, State::Activating, Some((3, 42)));
    let got = expect(&mut se, SOON, "state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));
    assert_eq!(peer_position(&got), Some(Some((3, 42))));

    // Without a position, none arrives.
    s.broadcast_state(State::Passive, State::Dead);
    let got = expect(&mut pe, SOON, "state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_position(&got), Some(None));

    // A new secondary gets the remembered state with its position.
    s.shutdown().await;
    expect(&mut pe, SOON, "primary Down", is_down).await;
    let (s2, mut se2) = Channel::start(
        &config(Role::Secondary, s_port, p_port),
        "secondary-2".into(),
    );
    expect(&mut se2, SOON, "secondary-2 Up", is_up).await;
    let got = expect(&mut se2, SOON, "re-sent state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));
    assert_eq!(peer_position(&got), Some(Some((3, 42))));
    p.shutdown().await;
    s2.shutdown().await;
}

/// Waits for a replication connection, failing on any link change before.
async fn expect_replication(rx: &mut Events, who: &str) -> ReplicationStream {
    let deadline = Instant::now() + SOON;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(LinkEvent::Replication(stream))) => return stream,
            Ok(Some(LinkEvent::PeerState { .. } | LinkEvent::Data { .. })) => {}
            Ok(Some(ev)) => panic!("{who}: unexpected {ev:?}"),
            Ok(None) => panic!("{who}: channel stopped"),
            Err(_) => panic!("{who}: no replication connection within {SOON:?}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends a small, a 5 MiB and an empty frame from `from` to `to`.
async fn one_way(from: &mut ReplicationStream, to: &mut ReplicationStream, seed: u8) {
    let sent = vec![
        pattern(1, seed),
        pattern(5 * 1024 * 1024, seed),
        Bytes::new(),
    ];
    let writer = async {
        for f in sent.clone() {
            from.framed.send(f).await.unwrap();
        }
    };
    let reader = async {
        let mut got = Vec::new();
        for _ in 0..sent.len() {
            got.push(to.framed.next().await.unwrap().unwrap().freeze());
        }
        got
    };
    let ((), got) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("frames flow");
    assert!(got == sent, "seed {seed}: frames differ");
}

/// Frames each way, then 5 MiB both ways at once.
async fn exchange(a: &mut ReplicationStream, b: &mut ReplicationStream) {
    one_way(a, b, 1).await;
    one_way(b, a, 2).await;
    // Both directions at the same time.
    let big = pattern(5 * 1024 * 1024, 9);
    let (ra, rb) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(
            async {
                a.framed.send(big.clone()).await.unwrap();
                a.framed.next().await.unwrap().unwrap()
            },
            async {
                b.framed.send(big.clone()).await.unwrap();
                b.framed.next().await.unwrap().unwrap()
            }
        )
    })
    .await
    .expect("frames flow both ways");
    assert!(ra == big && rb == big);
}

#[tokio::test]
async fn replication_connections_are_accepted_by_both_roles_and_leave_the_link_alone() {
    let Pair {
        p,
        mut pe,
        s,
        mut se,
        p_port,
        s_port,
    } = pair().await;

    // The secondary dials the primary, then the primary the secondary.
    let cases = [
        (
            config(Role::Secondary, s_port, p_port),
            "secondary",
            &mut pe,
            Role::Primary,
        ),
        (
            config(Role::Primary, p_port, s_port),
            "primary",
            &mut se,
            Role::Secondary,
        ),
    ];
    for (cfg, name, acceptor_events, acceptor_role) in cases {
        let mut dialed = heartbeat::dial_replication(&cfg, name).await.unwrap();
        assert_eq!(dialed.peer.role, acceptor_role);
        let mut accepted = expect_replication(acceptor_events, name).await;
        assert_eq!(accepted.peer.server, name);
        assert_eq!(accepted.peer.role, cfg.role);
        exchange(&mut dialed, &mut accepted).await;
    }

    // The link did not notice: no Down, no Up, still carrying states.
    quiet(&mut pe, Duration::from_millis(4 * PING), "primary").await;
    quiet(&mut se, Duration::from_millis(100), "secondary").await;
    assert!(p.is_up() && s.is_up());
    p.broadcast_state(State::Active, State::Activating);
    let got = expect(&mut se, SOON, "state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Active, State::Activating)));
    p.shutdown().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_replication_dial_with_other_settings_is_refused_and_the_channel_runs_on() {
    let Pair {
        p,
        mut pe,
        s,
        mut se,
        p_port,
        s_port,
    } = pair().await;
    let slow = HaConfig {
        ping_interval: 200,
        ..config(Role::Secondary, s_port, p_port)
    };
    match heartbeat::dial_replication(&slow, "secondary").await {
        Err(Error::Mismatch(keys)) => assert_eq!(keys, ["PingInterval"]),
        other => panic!("{other:?}"),
    }
    quiet(&mut pe, Duration::from_millis(4 * PING), "primary").await;
    quiet(&mut se, Duration::from_millis(100), "secondary").await;
    assert!(p.is_up() && s.is_up());
    s.broadcast_state(State::Passive, State::Dead);
    let got = expect(&mut pe, SOON, "state", |e| peer_state(e).is_some()).await;
    assert_eq!(peer_state(&got), Some((State::Passive, State::Dead)));
    // A good replication connection still works.
    let good = config(Role::Secondary, s_port, p_port);
    heartbeat::dial_replication(&good, "secondary")
        .await
        .unwrap();
    expect_replication(&mut pe, "primary").await;
    p.shutdown().await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_replication_dial_to_a_closed_port_names_the_address() {
    let (port, other) = free_ports().await;
    let err = heartbeat::dial_replication(&config(Role::Primary, other, port), "primary")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// A hand-made acceptor on a free port that answers a replication dial
/// with `replies` (after its `Hello`), written in one go behind it.
async fn fake_acceptor(replies: Vec<Bytes>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut wire = Framed::new(stream, heartbeat::codec());
        let first = heartbeat::decode(&wire.next().await.unwrap().unwrap()).unwrap();
        assert!(matches!(first, Message::Replicate(_)), "{first:?}");
        let mut raw = Vec::new();
        let hello = Greeting::new(&config(Role::Secondary, port, 1), "fake".into());
        for body in
            std::iter::once(heartbeat::encode(&Message::Hello(hello)).unwrap()).chain(replies)
        {
            raw.extend_from_slice(&(body.len() as u32).to_be_bytes());
            raw.extend_from_slice(&body);
        }
        let mut stream = wire.into_inner();
        stream.write_all(&raw).await.unwrap();
        // Keep the socket open until the dialer is done.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    });
    (port, task)
}

#[tokio::test]
async fn frames_right_behind_the_handshake_are_not_lost() {
    // Dialer side: the acceptor's first frame arrives with its Welcome.
    let welcome = Greeting::new(&config(Role::Secondary, 1, 1), "fake".into());
    let (port, task) = fake_acceptor(vec![
        heartbeat::encode(&Message::Welcome(welcome)).unwrap(),
        Bytes::from_static(b"first"),
        pattern(2 * 1024 * 1024, 5),
    ])
    .await;
    let mut dialed = heartbeat::dial_replication(&config(Role::Primary, 1, port), "primary")
        .await
        .unwrap();
    assert_eq!(dialed.framed.next().await.unwrap().unwrap(), &b"first"[..]);
    assert!(dialed.framed.next().await.unwrap().unwrap() == pattern(2 * 1024 * 1024, 5));
    drop(dialed);
    task.await.unwrap();

    // Acceptor side: the dialer's first frame arrives with its Replicate.
    let (p_port, s_port) = free_ports().await;
    let (s, mut se) = Channel::start(&config(Role::Secondary, s_port, p_port), "secondary".into());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let g = Greeting::new(&config(Role::Primary, p_port, s_port), "fake".into());
    let mut raw = Vec::new();
    for body in [
        heartbeat::encode(&Message::Replicate(g)).unwrap(),
        Bytes::from_static(b"early"),
    ] {
        raw.extend_from_slice(&(body.len() as u32).to_be_bytes());
        raw.extend_from_slice(&body);
    }
    let mut dialer = TcpStream::connect(("127.0.0.1", s_port)).await.unwrap();
    dialer.write_all(&raw).await.unwrap();
    let mut accepted = expect_replication(&mut se, "secondary").await;
    assert_eq!(
        accepted.framed.next().await.unwrap().unwrap(),
        &b"early"[..]
    );
    let mut wire = Framed::new(dialer, heartbeat::codec());
    for expected in ["Hello", "Welcome"] {
        let m = heartbeat::decode(&wire.next().await.unwrap().unwrap()).unwrap();
        assert!(format!("{m:?}").starts_with(expected), "{m:?}");
    }
    assert!(!s.is_up(), "a replication connection is not the link");
    s.shutdown().await;
}

#[tokio::test]
async fn a_refusal_by_the_acceptor_is_reported_to_the_dialer() {
    let refuse = |mismatched: Vec<String>| {
        heartbeat::encode(&Message::Refuse {
            reason: "no".into(),
            mismatched,
        })
        .unwrap()
    };
    let (port, task) = fake_acceptor(vec![refuse(vec!["LockFile".into()])]).await;
    match heartbeat::dial_replication(&config(Role::Primary, 1, port), "primary").await {
        Err(Error::Mismatch(keys)) => assert_eq!(keys, ["LockFile"]),
        other => panic!("{other:?}"),
    }
    task.await.unwrap();

    let (port, task) = fake_acceptor(vec![refuse(vec![])]).await;
    match heartbeat::dial_replication(&config(Role::Primary, 1, port), "primary").await {
        Err(Error::Config(reason)) => {
            assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
            assert!(reason.contains("no"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    task.await.unwrap();

    // An acceptor that says Hello and then nothing: the dial times out.
    let (port, task) = fake_acceptor(vec![]).await;
    let cfg = HaConfig {
        socket_initialization_timeout: 300,
        ..config(Role::Primary, 1, port)
    };
    let started = Instant::now();
    let err = heartbeat::dial_replication(&cfg, "primary")
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("300 ms"),
        "{text}"
    );
    task.await.unwrap();
}
