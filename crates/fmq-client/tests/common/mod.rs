//! An in-process broker on an ephemeral port, for the client tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fmq_broker::{Broker, Config};
use fmq_client::{Client, ConnectOptions};
use fmq_store::MemoryStore;
use tokio::net::TcpListener;

pub mod fake;

/// A running broker; shut down when dropped.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
}

impl TestBroker {
    /// A broker without authentication.
    pub async fn start() -> TestBroker {
        Self::with_config(Config {
            authentication: false,
            ..Default::default()
        })
        .await
    }

    /// A broker with authentication on and user `admin`/`passwd`.
    pub async fn with_auth() -> TestBroker {
        Self::with_config(Config::default()).await
    }

    pub async fn with_config(config: Config) -> TestBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on_listener(listener, config).await
    }

    /// A broker without authentication on `addr` (a port reserved earlier
    /// with [`reserve_port`]).
    pub async fn start_on(addr: SocketAddr) -> TestBroker {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::on_listener(
            listener,
            Config {
                authentication: false,
                ..Default::default()
            },
        )
        .await
    }

    async fn on_listener(listener: TcpListener, config: Config) -> TestBroker {
        let auth = config.authentication;
        let broker = Broker::start(Arc::new(MemoryStore::new()), config).unwrap();
        if auth {
            broker
                .security()
                .bootstrap("admin", "passwd")
                .await
                .unwrap();
        }
        let addr = listener.local_addr().unwrap();
        let broker = Arc::new(broker);
        let serving = broker.clone();
        tokio::spawn(async move { serving.serve(listener).await });
        TestBroker { addr, broker }
    }

    /// Connects with default options (and the test credentials).
    pub async fn client(&self) -> Client {
        self.connect(options()).await
    }

    pub async fn connect(&self, options: ConnectOptions) -> Client {
        Client::connect(self.addr, options).await.unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let _ = self.broker.shutdown_handle().send(true);
    }
}

/// A loopback address nobody listens on (yet): connecting is refused until
/// a server is started on it.
pub fn reserve_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Default options with the test credentials and a short timeout.
pub fn options() -> ConnectOptions {
    ConnectOptions {
        timeout: Duration::from_secs(5),
        ..ConnectOptions::with_credentials("admin", "passwd")
    }
}

/// How long tests wait for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long tests wait for something that should happen.
pub const SOON: Duration = Duration::from_secs(5);
