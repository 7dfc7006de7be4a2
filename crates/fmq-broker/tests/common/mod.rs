//! A raw-frame STOMP test client and an in-process broker on 127.0.0.1:0.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fmq_broker::{Broker, Config};
use fmq_proto::{Command, Frame, Item, StompCodec};
use fmq_store::{MemoryStore, Store};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

#[derive(Debug)]
pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    pub store: Arc<dyn Store>,
    task: tokio::task::JoinHandle<()>,
}

impl TestBroker {
    pub async fn start(config: Config) -> TestBroker {
        Self::start_on(Arc::new(MemoryStore::new()), config).await
    }

    pub async fn start_on(store: Arc<dyn Store>, config: Config) -> TestBroker {
        let auth = config.authentication;
        let broker = Arc::new(Broker::start(store.clone(), config).expect("broker starts"));
        if auth {
            broker
                .security()
                .bootstrap("admin", "passwd")
                .await
                .expect("bootstrap");
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let b = broker.clone();
        let task = tokio::spawn(async move {
            b.serve(listener).await.expect("serve");
        });
        TestBroker {
            addr,
            broker,
            store,
            task,
        }
    }

    pub async fn stop(self) {
        self.stop_reporting().await.expect("shutdown");
    }

    /// Stops the broker and returns what its shutdown reported.
    pub async fn stop_reporting(self) -> fmq_broker::Result<()> {
        let _ = self.broker.shutdown_handle().send(true);
        let _ = self.task.await;
        self.broker.shutdown().await
    }
}

pub fn open_config() -> Config {
    Config {
        authentication: false,
        ..Config::default()
    }
}

#[derive(Debug)]
pub struct Conn {
    pub io: Framed<TcpStream, StompCodec>,
    /// Frames that arrived while waiting for a RECEIPT.
    stash: std::collections::VecDeque<Frame>,
}

impl Conn {
    pub async fn raw(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Conn {
            io: Framed::new(stream, StompCodec::new(Default::default())),
            stash: Default::default(),
        }
    }

    /// Connects with STOMP 1.2, no heart-beats.
    pub async fn connect(addr: SocketAddr, headers: &[(&str, &str)]) -> Conn {
        let mut c = Conn::raw(addr).await;
        let mut f = Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("host", "localhost")
            .header("heart-beat", "0,0");
        for (k, v) in headers {
            f = f.header(*k, *v);
        }
        c.send(f).await;
        let reply = c.recv().await;
        assert_eq!(
            reply.command,
            Command::Connected,
            "CONNECT refused: {reply:?}"
        );
        c
    }

    pub async fn send(&mut self, frame: Frame) {
        self.io.send(frame).await.expect("write");
    }

    /// Next frame within 5 s (heart-beats skipped).
    pub async fn recv(&mut self) -> Frame {
        self.try_recv(Duration::from_secs(5))
            .await
            .expect("a frame within 5 s")
    }

    pub async fn try_recv(&mut self, wait: Duration) -> Option<Frame> {
        if let Some(f) = self.stash.pop_front() {
            return Some(f);
        }
        self.read_wire(wait).await
    }

    async fn read_wire(&mut self, wait: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.io.next()).await {
                Err(_) => return None,
                Ok(None) => return None,
                Ok(Some(Ok(Item::HeartBeat))) => continue,
                Ok(Some(Ok(Item::Frame(f)))) => return Some(f),
                Ok(Some(Err(e))) => panic!("decode error: {e}"),
            }
        }
    }

    /// True when the server closed the connection.
    pub async fn closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.io.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
    }

    pub async fn send_receipted(&mut self, frame: Frame, receipt: &str) {
        self.send(frame.header("receipt", receipt)).await;
        loop {
            let r = self
                .read_wire(Duration::from_secs(5))
                .await
                .expect("RECEIPT within 5 s");
            if r.command == Command::Message {
                self.stash.push_back(r);
                continue;
            }
            assert_eq!(r.command, Command::Receipt, "expected RECEIPT, got {r:?}");
            assert_eq!(r.get("receipt-id"), Some(receipt));
            return;
        }
    }

    pub async fn subscribe(&mut self, id: &str, dest: &str, ack: &str, extra: &[(&str, &str)]) {
        let mut f = Frame::new(Command::Subscribe)
            .header("id", id)
            .header("destination", dest)
            .header("ack", ack);
        for (k, v) in extra {
            f = f.header(*k, *v);
        }
        self.send_receipted(f, &format!("sub-{id}")).await;
    }

    pub async fn publish(&mut self, dest: &str, body: &str, extra: &[(&str, &str)]) {
        let mut f = Frame::new(Command::Send).header("destination", dest);
        for (k, v) in extra {
            f = f.header(*k, *v);
        }
        self.send_receipted(f.with_body(body.as_bytes().to_vec()), "send")
            .await;
    }

    pub async fn message(&mut self) -> Frame {
        let f = self.recv().await;
        assert_eq!(f.command, Command::Message, "expected MESSAGE, got {f:?}");
        f
    }

    pub async fn ack(&mut self, msg: &Frame) {
        let id = msg.get("ack").expect("ack header").to_owned();
        self.send_receipted(Frame::new(Command::Ack).header("id", id), "ack")
            .await;
    }

    pub async fn nack(&mut self, msg: &Frame) {
        let id = msg.get("ack").expect("ack header").to_owned();
        self.send_receipted(Frame::new(Command::Nack).header("id", id), "nack")
            .await;
    }

    pub async fn error(&mut self) -> Frame {
        let f = self.recv().await;
        assert_eq!(f.command, Command::Error, "expected ERROR, got {f:?}");
        f
    }

    /// Sends `frame`, which the broker must refuse with an ERROR whose
    /// message contains `needle` and then close the connection (`case`
    /// names the frame in failures). Returns the ERROR.
    pub async fn refused(&mut self, frame: Frame, needle: &str, case: &str) -> Frame {
        self.send(frame).await;
        let e = self.error().await;
        let message = e.get("message").unwrap_or_default();
        assert!(message.contains(needle), "{case}: {message}");
        assert!(self.closed().await, "{case}: connection stays open");
        e
    }
}

pub fn body(f: &Frame) -> String {
    String::from_utf8_lossy(&f.body).into_owned()
}
