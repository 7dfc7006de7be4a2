//! The client against scripted servers, for failure paths a real broker
//! does not produce on demand.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fmq_client::{Client, ConnectOptions, Error, SubscribeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts one connection, reads the CONNECT frame and answers `reply`.
async fn scripted(
    reply: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        while !buf.contains(&0) {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let connect = String::from_utf8_lossy(&buf).into_owned();
        assert!(connect.starts_with("CONNECT\n"), "{connect}");
        assert!(connect.contains("accept-version:1.2\n"), "{connect}");
        assert!(connect.contains("host:localhost\n"), "{connect}");
        s.write_all(reply.as_bytes()).await.unwrap();
        s
    });
    (addr, task)
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

#[tokio::test]
async fn silent_server_is_declared_dead_and_pending_calls_fail() {
    let (addr, server) = scripted("CONNECTED\nversion:1.2\nheart-beat:100,100\n\n\0").await;
    let options = ConnectOptions {
        heart_beat: (100, 100),
        ..opts()
    };
    let c = Client::connect(addr, options).await.unwrap();
    let _socket = server.await.unwrap(); // kept open, never written to
    let started = Instant::now();
    let err = c.send_with_receipt("/queue/a", "x", &[]).await.unwrap_err();
    assert!(
        matches!(err, Error::Timeout(what) if what.contains("heart-beat")),
        "{err:?}"
    );
    // 2 × 100 ms, not the 5 s call timeout.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!c.is_connected());
}

#[tokio::test]
async fn socket_close_fails_pending_calls_and_ends_subscriptions() {
    let (addr, server) = scripted("CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0").await;
    let c = Client::connect(addr, opts()).await.unwrap();
    let mut socket = server.await.unwrap();
    let c2 = c.clone();
    let sub =
        tokio::spawn(async move { c2.subscribe("/queue/a", SubscribeOptions::default()).await });
    // Read the SUBSCRIBE, then acknowledge it and hang up.
    let mut buf = Vec::new();
    while !buf.contains(&0) {
        let mut chunk = [0u8; 1024];
        let n = socket.read(&mut chunk).await.unwrap();
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let receipt = text
        .lines()
        .find_map(|l| l.strip_prefix("receipt:"))
        .unwrap()
        .to_owned();
    socket
        .write_all(format!("RECEIPT\nreceipt-id:{receipt}\n\n\0").as_bytes())
        .await
        .unwrap();
    let mut sub = sub.await.unwrap().unwrap();
    socket
        .write_all(
            b"MESSAGE\nsubscription:sub-1\nmessage-id:m1\nack:1\ndestination:/queue/a\n\nhello\0",
        )
        .await
        .unwrap();
    let m = sub
        .next_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body_str(), Some("hello"));
    drop(socket);
    assert!(tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .is_none());
    let err = c.send_with_receipt("/queue/a", "x", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
}

#[tokio::test]
async fn refused_connect_carries_the_error_text() {
    let (addr, _server) =
        scripted("ERROR\nmessage:client-id 'x' is already connected\n\nbye\0").await;
    let err = Client::connect(addr, opts()).await.unwrap_err();
    match err {
        Error::Server { message, detail } => {
            assert_eq!(message, "client-id 'x' is already connected");
            assert_eq!(detail, "bye");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connect_times_out_when_the_server_never_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(s);
    });
    let err = Client::connect(
        addr,
        ConnectOptions {
            timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Timeout("CONNECTED")), "{err:?}");
}

#[tokio::test]
async fn dropping_every_handle_disconnects() {
    let (addr, server) = scripted("CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0").await;
    let c = Client::connect(addr, opts()).await.unwrap();
    let mut socket = server.await.unwrap();
    drop(c);
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = socket.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&buf), "DISCONNECT\n\n\0");
}
