//! Gateway responder, probe and monitor over loopback TCP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fmq_ha::gateway::{self, GatewayMonitor, MonitorConfig};
use fmq_ha::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Responder {
    port: u16,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Responder {
    async fn start_on(port: u16) -> Responder {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway::serve(listener, stopped));
        Responder { port, stop, task }
    }

    async fn start() -> Responder {
        Self::start_on(0).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("serve ends on shutdown")
            .unwrap();
    }
}

async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// A server that answers each connection with `f(line)` and closes.
async fn fake(
    answer: impl Fn(usize, &[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = Arc::new(answer);
    let count = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let answer = answer.clone();
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let mut got = Vec::new();
                while !got.contains(&b'\n') {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                if let Some(reply) = answer(n, &got) {
                    let _ = s.write_all(&reply).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn ping_gets_a_pong() {
    let r = Responder::start().await;
    let rtt = gateway::ping("127.0.0.1", r.port, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    gateway::ping_as(
        "127.0.0.1",
        r.port,
        Duration::from_secs(2),
        "Ferro MQ",
        "primary one",
    )
    .await
    .unwrap();
    r.stop().await;
}

#[tokio::test]
async fn refused_port_fails_fast() {
    let port = free_port().await;
    let started = Instant::now();
    let e = gateway::ping("127.0.0.1", port, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    match e {
        Error::Io(io) => assert_eq!(io.kind(), ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn silent_listener_times_out() {
    // The kernel completes the TCP handshake; nobody ever answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let e = gateway::ping("127.0.0.1", port, Duration::from_millis(200))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(1),
        "{took:?}"
    );
    match e {
        Error::Io(io) => assert_eq!(io.kind(), ErrorKind::TimedOut),
        other => panic!("{other:?}"),
    }
    drop(listener);
}

#[tokio::test]
async fn echo_service_counts_as_reachable_and_other_answers_do_not() {
    let (echo, _t1) = fake(|_, line| Some(line.to_vec())).await;
    gateway::ping("127.0.0.1", echo, Duration::from_secs(2))
        .await
        .unwrap();

    let (http, _t2) = fake(|_, _| Some(b"HTTP/1.0 400 Bad Request\r\n\r\n".to_vec())).await;
    let e = gateway::ping("127.0.0.1", http, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");

    let (mute, _t3) = fake(|_, _| None).await;
    let e = gateway::ping("127.0.0.1", mute, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
}

async fn read_all(mut s: TcpStream) -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .expect("responder closes the connection")?;
    Ok(out)
}

#[tokio::test]
async fn garbage_is_closed_without_an_answer() {
    let r = Responder::start().await;

    let mut s = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    assert_eq!(read_all(s).await.unwrap(), b"");

    // A line longer than the limit: closed (possibly with a reset, as the
    // rest is left unread), never answered.
    let mut s = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    let _ = s.write_all(&vec![b'x'; gateway::MAX_LINE * 4]).await;
    if let Ok(got) = read_all(s).await {
        assert_eq!(got, b"");
    }

    // Binary junk with a newline.
    let mut s = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    s.write_all(&[0xff, 0xfe, 0x00, b'\n']).await.unwrap();
    assert_eq!(read_all(s).await.unwrap(), b"");

    // The real thing still works.
    let mut s = TcpStream::connect(("127.0.0.1", r.port)).await.unwrap();
    s.write_all(b"FMQPING FerroMQ primary\n").await.unwrap();
    assert_eq!(read_all(s).await.unwrap(), b"FMQPONG\n");

    gateway::ping("127.0.0.1", r.port, Duration::from_secs(2))
        .await
        .unwrap();
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_pings() {
    let r = Responder::start().await;
    let port = r.port;
    let mut pings = tokio::task::JoinSet::new();
    for i in 0..200 {
        pings.spawn(async move {
            gateway::ping_as(
                "127.0.0.1",
                port,
                Duration::from_secs(5),
                "FerroMQ",
                &format!("s{i}"),
            )
            .await
        });
    }
    // Idle connections do not block the others.
    let idle: Vec<TcpStream> = futures_idle(port, 20).await;
    let mut ok = 0;
    while let Some(res) = pings.join_next().await {
        res.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, 200);
    drop(idle);
    r.stop().await;
}

async fn futures_idle(port: u16, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    v
}

#[tokio::test]
async fn shutdown_stops_the_responder_and_its_connections() {
    let r = Responder::start().await;
    let port = r.port;
    // A connection in progress is closed by the shutdown.
    let idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.stop().await;
    assert_eq!(read_all(idle).await.unwrap_or_default(), b"");
    assert!(gateway::ping("127.0.0.1", port, Duration::from_secs(1))
        .await
        .is_err());
}

fn monitor_config(port: u16, failures: u32) -> MonitorConfig {
    MonitorConfig {
        host: "127.0.0.1".into(),
        port,
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failures_to_unreachable: failures,
        cluster: "FerroMQ".into(),
        server: "primary".into(),
    }
}

async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<bool>,
    value: bool,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(within, rx.wait_for(|v| *v == value))
        .await
        .unwrap_or_else(|_| panic!("reachable never became {value}"))
        .unwrap();
    started.elapsed()
}

#[tokio::test]
async fn monitor_follows_the_responder() {
    let r = Responder::start().await;
    let port = r.port;
    let monitor = GatewayMonitor::start(monitor_config(port, 2));
    let mut rx = monitor.subscribe();
    assert!(!*rx.borrow(), "not reachable before the first answer");
    wait_for(&mut rx, true, Duration::from_secs(2)).await;
    assert!(monitor.is_reachable());

    r.stop().await;
    let took = wait_for(&mut rx, false, Duration::from_secs(2)).await;
    // Two failed probes, 100 ms apart.
    assert!(took >= Duration::from_millis(90), "{took:?}");

    let r = Responder::start_on(port).await;
    wait_for(&mut rx, true, Duration::from_secs(2)).await;
    monitor.stop().await;
    r.stop().await;
}

#[tokio::test]
async fn one_lost_probe_is_tolerated() {
    // Every other connection is answered.
    let (port, _t) = fake(|n, _| (n % 2 == 0).then(|| b"FMQPONG\n".to_vec())).await;
    let monitor = GatewayMonitor::start(monitor_config(port, 2));
    let mut rx = monitor.subscribe();
    wait_for(&mut rx, true, Duration::from_secs(2)).await;
    let flipped = tokio::time::timeout(Duration::from_millis(800), rx.wait_for(|v| !*v)).await;
    assert!(
        flipped.is_err(),
        "alternate failures must not make the gateway unreachable"
    );

    monitor.stop().await;

    // With a threshold of 1, the first lost probe does.
    let (port, _t) = fake(|n, _| (n % 2 == 0).then(|| b"FMQPONG\n".to_vec())).await;
    let monitor1 = GatewayMonitor::start(monitor_config(port, 1));
    let mut rx1 = monitor1.subscribe();
    wait_for(&mut rx1, true, Duration::from_secs(2)).await;
    wait_for(&mut rx1, false, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn monitor_from_profile_uses_the_gateway_keys() {
    let c: fmq_ha::HaConfig = serde_json::from_value(serde_json::json!({
        "mode": "shared", "role": "primary", "port": 2000, "backup_ha_port": 3000,
        "backup_server_port": 1956, "backup_rmi_server_port": 1859,
        "gateway_server_ip_address": "10.0.0.9", "ping_interval": 500,
        "socket_creation_timeout": 2000
    }))
    .unwrap();
    let m = MonitorConfig::from_ha(&c, "primary");
    assert_eq!((m.host.as_str(), m.port), ("10.0.0.9", 7));
    assert_eq!(m.interval, Duration::from_millis(500));
    assert_eq!(
        m.failures_to_unreachable,
        gateway::DEFAULT_FAILURES_TO_UNREACHABLE
    );
    assert_eq!(m.cluster, "FerroMQ");
}
