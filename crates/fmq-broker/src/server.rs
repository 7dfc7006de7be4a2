//! The broker as a whole: recovery, the engine task, the accept loop and
//! graceful shutdown. `fmq-server` and the tests share this entry point.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use fmq_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::engine::{Cmd, Engine, Stats};
use crate::error::{Error, Result};
use crate::security::Security;
use crate::session::{self, Shared};

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
    _engine: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Broker {
    /// Recovers state from `store` and starts the engine. Must be called
    /// inside a tokio runtime.
    pub fn start(store: Arc<dyn Store>, config: Config) -> Result<Broker> {
        let config = Arc::new(config);
        let engine = Engine::recover(store.clone(), config.clone())?;
        let security = Arc::new(Security::load(store.clone(), config.authentication)?);
        let (tx, rx) = mpsc::channel(4096);
        let engine = tokio::spawn(engine.run(rx));
        let ticker = {
            let tx = tx.clone();
            let period = config.expiry_sweep;
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    if tx.send(Cmd::Tick).await.is_err() {
                        break;
                    }
                }
            })
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        Ok(Broker {
            shared: Arc::new(Shared {
                engine: tx,
                security,
                config,
                next_session: AtomicU64::new(0),
                shutdown: shutdown_rx,
            }),
            store,
            shutdown,
            _engine: engine,
            ticker,
        })
    }

    /// Users and ACLs.
    pub fn security(&self) -> &Arc<Security> {
        &self.shared.security
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Current figures.
    pub async fn stats(&self) -> Result<Stats> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .engine
            .send(Cmd::Stats { reply: tx })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Serves one accepted connection (used by an HA server, which owns its
    /// accept loop so that it can refuse clients while not active).
    pub fn spawn_session(&self, stream: tokio::net::TcpStream) -> tokio::task::JoinHandle<()> {
        tokio::spawn(session::serve(stream, self.shared.clone()))
    }

    /// A handle that makes [`Broker::serve`] return and sessions close.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Accepts STOMP connections on `listener` until shutdown is signalled,
    /// then waits (up to 5 s) for sessions to close.
    pub async fn serve(&self, listener: TcpListener) -> Result<()> {
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let mut sessions = JoinSet::new();
        let mut stop = self.shutdown.subscribe();
        let mut backoff = Duration::from_millis(5);
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.map_err(|_| Error::Stopped)?,
                _ = stop.wait_for(|s| *s) => break,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    let shared = self.shared.clone();
                    sessions.spawn(async move {
                        session::serve(stream, shared).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
            while sessions.try_join_next().is_some() {}
        }
        let drain = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .is_err()
        {
            tracing::warn!("sessions still open after 5 s; closing them");
            sessions.abort_all();
        }
        Ok(())
    }

    /// Stops the broker: sessions close, the engine commits what it has, and
    /// the store is synced. Call after [`Broker::serve`] has returned.
    pub async fn shutdown(&self) -> Result<()> {
        let _ = self.shutdown.send(true);
        self.ticker.abort();
        let (tx, rx) = oneshot::channel();
        if self
            .shared
            .engine
            .send(Cmd::Flush { reply: tx })
            .await
            .is_ok()
        {
            if let Ok(Ok(done)) = rx.await {
                done.durable.await?;
            }
        }
        self.store.sync()?;
        Ok(())
    }
}
