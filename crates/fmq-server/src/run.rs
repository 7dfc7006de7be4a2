//! Running a server on a profile.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use fmq_broker::Broker;
use fmq_store::Store;
use fmq_store_rocks::{RocksOptions, RocksStore};
use tokio::net::TcpListener;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::admin::{self, ServerInfo};
use crate::profile::Profile;

fn init_logging(profile: &Profile) -> Result<Option<tracing_appender::non_blocking::WorkerGuard>> {
    let level = profile.file.log.level.clone();
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&level));
    let console = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_filter(filter());
    if !profile.file.log.file {
        tracing_subscriber::registry().with(console).try_init().ok();
        return Ok(None);
    }
    let dir = profile.resolve(&profile.file.log.dir);
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create log directory {} (key log.dir)",
            dir.display()
        )
    })?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("fmq")
        .filename_suffix("log")
        .max_log_files(14)
        .build(&dir)
        .with_context(|| format!("cannot open log files in {}", dir.display()))?;
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer)
        .with_filter(filter());
    tracing_subscriber::registry()
        .with(console)
        .with(file)
        .try_init()
        .ok();
    Ok(Some(guard))
}

async fn bind(addr: SocketAddr, what: &str, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("{what} {addr} is already in use (another server running? change {key} in the profile)")
        } else {
            anyhow!("cannot listen on {what} {addr}: {e} (key {key})")
        }
    })
}

/// A future that resolves, naming the signal, on the first SIGTERM or
/// SIGINT. The handlers are installed before this returns, so a signal sent
/// once the process says it is up stops it cleanly rather than killing it.
pub fn termination() -> Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| anyhow!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| anyhow!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// Sets `shutdown` on SIGTERM or SIGINT (see [`termination`]).
pub fn stop_on_signals(shutdown: tokio::sync::watch::Sender<bool>) -> Result<()> {
    let signalled = termination()?;
    tokio::spawn(async move {
        let signal = signalled.await;
        tracing::info!("{signal} received; shutting down");
        let _ = shutdown.send(true);
    });
    Ok(())
}

/// Opens the RocksDB store of a profile; `log_retention` batches are kept
/// in its batch log (0 for none; replicated HA keeps one).
pub fn open_store(
    profile: &Profile,
    db_path: &std::path::Path,
    log_retention: u64,
) -> Result<Arc<RocksStore>> {
    let options = RocksOptions {
        sync: profile.file.store.sync,
        log_retention,
        ..RocksOptions::default()
    };
    Ok(Arc::new(RocksStore::open(db_path, options).map_err(
        |e| anyhow!("cannot open store {}: {e}", db_path.display()),
    )?))
}

/// Starts a broker on `store` and creates the profile's initial admin
/// user if the store has no principal yet.
pub async fn start_broker_on(profile: &Profile, store: Arc<dyn Store>) -> Result<Arc<Broker>> {
    let broker = Arc::new(Broker::start(store, profile.broker_config())?);
    let sec = &profile.file.security;
    if sec.authentication
        && broker
            .security()
            .bootstrap(&sec.initial_admin_user, &sec.initial_admin_password)
            .await?
    {
        tracing::warn!(
            user = %sec.initial_admin_user,
            "created the initial admin user from the profile; change its password with `fmq user passwd {}`",
            sec.initial_admin_user
        );
    }
    Ok(broker)
}

pub async fn start_broker(
    profile: &Profile,
    db_path: &std::path::Path,
) -> Result<(Arc<Broker>, Arc<dyn Store>)> {
    let store: Arc<dyn Store> = open_store(profile, db_path, 0)?;
    let broker = start_broker_on(profile, store.clone()).await?;
    Ok((broker, store))
}

/// Runs the server of a loaded profile until it is told to stop.
pub async fn run(profile: Profile, db_override: Option<PathBuf>) -> Result<()> {
    let _guard = init_logging(&profile)?;
    tracing::info!(
        "worker threads: {} (server.worker_threads = {}; 0 is one per core)",
        tokio::runtime::Handle::current().metrics().num_workers(),
        profile.file.server.worker_threads
    );
    let net = &profile.file.network;
    let client_addr: SocketAddr = format!("{}:{}", net.bind_address, net.port)
        .parse()
        .map_err(|e| anyhow!("network.bind_address: {e}"))?;
    let admin_addr: SocketAddr = format!("{}:{}", net.admin_bind_address, net.admin_port)
        .parse()
        .map_err(|e| anyhow!("network.admin_bind_address: {e}"))?;
    // Bind first: a port in use should fail fast, before the store opens.
    let client = bind(client_addr, "client port", "network.port").await?;
    let admin_listener = bind(admin_addr, "admin port", "network.admin_port").await?;

    let db_path = db_override.unwrap_or_else(|| profile.resolve(&profile.file.store.db_path));
    // Synced into its parent, so a power cut soon after the first start
    // cannot lose the new store directory with everything in it.
    fmq_store::durable::create_dir_all(&db_path)
        .with_context(|| format!("cannot create store directory {}", db_path.display()))?;
    let db_path = db_path.canonicalize().unwrap_or(db_path);
    let info = ServerInfo {
        name: profile.file.server.name.clone(),
        client_addr: client_addr.to_string(),
        db_path: db_path.display().to_string(),
        started: Instant::now(),
    };
    if let Some(ha) = profile.ha() {
        return crate::ha::run(&profile, ha, client, admin_listener, db_path, info).await;
    }
    let (broker, store) = start_broker(&profile, &db_path).await?;
    let shutdown = broker.shutdown_handle();
    let (_broker_tx, broker_rx) = tokio::sync::watch::channel(Some(broker.clone()));
    let ctx = admin::AdminCtx {
        broker: broker_rx,
        ha: None,
        info,
        shutdown: shutdown.clone(),
    };
    tokio::spawn(admin::serve(admin_listener, Arc::new(ctx)));
    stop_on_signals(shutdown)?;
    tracing::info!(
        "FerroMQ server '{}' started on profile {}: STOMP on {client_addr}, admin on {admin_addr}, store {} (sequence {})",
        profile.file.server.name,
        profile.dir.display(),
        db_path.display(),
        store.last_sequence()
    );
    broker.serve(client).await?;
    broker.shutdown().await?;
    tracing::info!("FerroMQ server stopped");
    Ok(())
}
