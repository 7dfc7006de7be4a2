//! Running one half of an HA pair: the runtime around `fmq_ha::machine`.
//!
//! One task owns the state machine and carries out its actions against the
//! lock file, the gateway monitor, the heartbeat channel and the store. The
//! client port stays bound the whole time: while this server is not active
//! every connection gets a STOMP ERROR naming the state, so a client moves
//! on to the other server at once instead of timing out.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use fmq_broker::Broker;
use fmq_ha::gateway::{GatewayMonitor, MonitorConfig};
use fmq_ha::heartbeat::{Channel, LinkEvent};
use fmq_ha::lock::LockFile;
use fmq_ha::machine::{Action, Event, Machine, Timer, Timings};
use fmq_ha::{HaConfig, Mode, State};
use fmq_store::Store;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin::{self, AdminCtx, ServerInfo};
use crate::profile::Profile;
use crate::run::{start_broker, stop_on_signals};

/// The broker while this server is active.
struct Active {
    broker: Arc<Broker>,
    store: Arc<dyn Store>,
}

/// Runs an HA server until SIGTERM, SIGINT, an admin shutdown, or a fatal
/// HA error (a refused handshake: mismatched settings).
pub async fn run(
    profile: &Profile,
    ha: HaConfig,
    client: TcpListener,
    admin_listener: TcpListener,
    db_path: PathBuf,
    info: ServerInfo,
) -> Result<()> {
    if ha.mode == Mode::Replicated {
        return crate::ha_rpl::run(profile, ha, client, admin_listener, db_path, info).await;
    }
    ha.validate()?;
    let lock_path = ha.lock_file.clone().unwrap_or_default();
    let mut lock = LockFile::open(&lock_path)?;
    let server_name = server_name(&ha);
    let Front {
        broker: broker_tx,
        status: status_tx,
        shutdown: mut shutdown_rx,
        state: state_tx,
        acceptor,
    } = Front::open(client, admin_listener, &info, State::Passive);

    tracing::info!(
        "FerroMQ HA server '{}' ({} of cluster '{}', shared mode): STOMP on {}, HA port {}:{}, lock file {}, gateway {}:{}",
        info.name,
        ha.role,
        ha.cluster_name,
        info.client_addr,
        ha.bind_address,
        ha.port,
        lock_path.display(),
        ha.gateway_server_ip_address,
        ha.gateway_server_port
    );

    let (channel, mut links) = Channel::start(&ha, server_name.clone());
    let gateway = GatewayMonitor::start(MonitorConfig::from_ha(&ha, &server_name));
    let mut gateway_rx = gateway.subscribe();
    let mut machine = Machine::new(
        ha.role,
        Timings {
            active_lock_ms: ha.active_lock_reacquisition_interval,
            passive_lock_ms: ha.passive_lock_reacquisition_interval,
            max_wait_ms: ha.max_wait_timeout,
        },
    );
    let mut timers: HashMap<Timer, tokio::time::Instant> = HashMap::new();
    let mut events: VecDeque<Event> = VecDeque::from([Event::Start]);
    let mut active: Option<Active> = None;
    let mut since = Instant::now();
    let mut fatal: Option<anyhow::Error> = None;

    'run: loop {
        while let Some(event) = events.pop_front() {
            let before = machine.state();
            for action in machine.handle(event) {
                match action {
                    Action::TryLock => {
                        events.push_back(match try_lock(&mut lock, &server_name, 0) {
                            LockOutcome::Acquired(epoch) => Event::LockAcquired { epoch },
                            LockOutcome::Busy => Event::LockBusy,
                            LockOutcome::Lost(reason) => Event::LockLost { reason },
                            LockOutcome::Verified => Event::LockVerified,
                        })
                    }
                    Action::VerifyLock => events.push_back(
                        match verify_lock(&mut lock, &server_name, machine.epoch()) {
                            LockOutcome::Lost(reason) => Event::LockLost { reason },
                            _ => Event::LockVerified,
                        },
                    ),
                    Action::ReleaseLock => release_lock(&mut lock),
                    Action::OpenStore => {
                        events.push_back(match start_broker(profile, &db_path).await {
                            Ok((broker, store)) => {
                                tracing::info!(
                                    sequence = store.last_sequence(),
                                    "shared store opened"
                                );
                                let _ = broker_tx.send(Some(broker.clone()));
                                active = Some(Active { broker, store });
                                Event::ServicesActivated
                            }
                            Err(e) => Event::ServicesFailed {
                                reason: format!("{e:#}"),
                            },
                        })
                    }
                    Action::CloseStore => {
                        let _ = broker_tx.send(None);
                        if let Some(a) = active.take() {
                            close(a).await;
                        }
                    }
                    Action::AcceptClients | Action::RefuseClients => {}
                    Action::Broadcast { current, previous } => {
                        channel.broadcast_state(current, previous)
                    }
                    Action::Schedule { timer, after_ms } => {
                        timers.insert(
                            timer,
                            tokio::time::Instant::now() + Duration::from_millis(after_ms),
                        );
                    }
                    Action::Log(line) => tracing::info!("{line}"),
                }
            }
            if machine.state() != before {
                since = Instant::now();
            }
            let _ = state_tx.send(machine.state());
            publish(&status_tx, &machine, &lock, &ha, since);
        }
        let next = timers
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(t, at)| (*t, *at));
        tokio::select! {
            link = links.recv() => match link {
                Some(LinkEvent::Up { peer }) => {
                    tracing::info!(%peer, "HA link to the backup server is up");
                    events.push_back(Event::LinkUp);
                }
                Some(LinkEvent::Down { reason }) => {
                    tracing::info!(%reason, "HA link to the backup server is down");
                    events.push_back(Event::LinkDown);
                }
                Some(LinkEvent::PeerState { current, previous, .. }) => events.push_back(Event::PeerState { current, previous }),
                Some(LinkEvent::Refused(e)) => {
                    tracing::error!("{e}");
                    fatal = Some(anyhow!("{e}"));
                    break 'run;
                }
                Some(_) => {}
                None => {
                    fatal = Some(anyhow!("the HA channel stopped"));
                    break 'run;
                }
            },
            changed = gateway_rx.changed() => {
                if changed.is_ok() {
                    events.push_back(if *gateway_rx.borrow_and_update() { Event::GatewayReachable } else { Event::GatewayUnreachable });
                }
            }
            _ = sleep_until(next.map(|(_, at)| at)) => {
                if let Some((timer, _)) = next {
                    timers.remove(&timer);
                    events.push_back(Event::Timer(timer));
                }
            }
            _ = shutdown_rx.wait_for(|s| *s) => break 'run,
        }
    }

    // Stop serving, close the store, give up the lock, tell the peer.
    let _ = broker_tx.send(None);
    acceptor.abort();
    if let Some(a) = active.take() {
        close(a).await;
    }
    let _ = lock.release();
    channel.broadcast_state(State::Dead, machine.state());
    tokio::time::sleep(Duration::from_millis(50)).await;
    channel.shutdown().await;
    gateway.stop().await;
    match fatal {
        Some(e) => Err(e),
        None => {
            tracing::info!("FerroMQ server stopped");
            Ok(())
        }
    }
}

/// What one lock attempt or verification found; each runtime maps it to
/// its state machine's event.
pub(crate) enum LockOutcome {
    /// The lock is ours, with this new epoch.
    Acquired(u64),
    /// Someone else holds it.
    Busy,
    /// Verified: still ours, with our epoch.
    Verified,
    /// Lost, or could not be taken: why.
    Lost(String),
}

/// This server's name in the lock file and the HA handshake:
/// `Primary@HOST:PID`.
pub(crate) fn server_name(ha: &HaConfig) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{}@{}:{}", ha.role.title(), host, std::process::id())
}

/// Runs lock-file or store I/O from the HA loop. The loop waits for the
/// answer (its next step depends on it), but a lock file on a stalled NFS
/// server or a store on a stalled disk must not also hold up the tasks that
/// share its worker thread (the peer heartbeats, client sessions): tokio
/// moves them to another thread while this one blocks.
pub(crate) fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Tries the lock once and, if it is ours, writes us as holder with an
/// epoch greater than the file's and than `at_least_after`.
pub(crate) fn try_lock(lock: &mut LockFile, server: &str, at_least_after: u64) -> LockOutcome {
    blocking_io(|| try_lock_now(lock, server, at_least_after))
}

fn try_lock_now(lock: &mut LockFile, server: &str, at_least_after: u64) -> LockOutcome {
    match lock.try_acquire() {
        Ok(true) => match lock.take_over_after(server, at_least_after) {
            Ok(epoch) => {
                tracing::info!("Successfully acquired lock on :: {}", lock.path().display());
                LockOutcome::Acquired(epoch)
            }
            Err(e) => LockOutcome::Lost(e.to_string()),
        },
        Ok(false) => LockOutcome::Busy,
        Err(e) => LockOutcome::Lost(e.to_string()),
    }
}

/// Re-verifies that the lock is still ours with `epoch`.
pub(crate) fn verify_lock(lock: &mut LockFile, server: &str, epoch: u64) -> LockOutcome {
    match blocking_io(|| lock.verify(server, epoch)) {
        Ok(true) => LockOutcome::Verified,
        Ok(false) => {
            LockOutcome::Lost("the lock file no longer names this server and epoch".into())
        }
        Err(e) => LockOutcome::Lost(e.to_string()),
    }
}

/// Gives the lock up, logging a failure.
pub(crate) fn release_lock(lock: &mut LockFile) {
    if let Err(e) = blocking_io(|| lock.release()) {
        tracing::warn!(error = %e, "releasing the lock failed");
    }
}

/// The client and admin ports of an HA server, served whatever its state:
/// the admin port answers from the status watch, the client port hands
/// connections to the broker while the state accepts clients and refuses
/// them with an ERROR otherwise.
pub(crate) struct Front {
    /// The broker while this server serves.
    pub broker: watch::Sender<Option<Arc<Broker>>>,
    /// The `ha` object of `fmq status`.
    pub status: watch::Sender<serde_json::Value>,
    /// Set by SIGTERM, SIGINT or `fmq shutdown`.
    pub shutdown: watch::Receiver<bool>,
    /// The state the client port answers with.
    pub state: watch::Sender<State>,
    /// The client port's accept loop.
    pub acceptor: tokio::task::JoinHandle<()>,
}

impl Front {
    pub(crate) fn open(
        client: TcpListener,
        admin_listener: TcpListener,
        info: &ServerInfo,
        initial: State,
    ) -> Front {
        let (broker_tx, broker_rx) = watch::channel::<Option<Arc<Broker>>>(None);
        let (status_tx, status_rx) = watch::channel(json!({}));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let ctx = AdminCtx {
            broker: broker_rx.clone(),
            ha: Some(status_rx),
            info: info.clone(),
            shutdown: shutdown_tx.clone(),
        };
        tokio::spawn(admin::serve(admin_listener, Arc::new(ctx)));
        if let Err(e) = stop_on_signals(shutdown_tx) {
            tracing::error!("{e:#}; stop the server through its admin port");
        }
        let (state_tx, state_rx) = watch::channel(initial);
        let acceptor = tokio::spawn(accept_loop(client, broker_rx, state_rx));
        Front {
            broker: broker_tx,
            status: status_tx,
            shutdown: shutdown_rx,
            state: state_tx,
            acceptor,
        }
    }
}

pub(crate) async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Stops the broker and waits (up to 5 s) until nothing holds the store any
/// more, so the other server can open it.
async fn close(active: Active) {
    let Active { broker, store } = active;
    let _ = broker.shutdown_handle().send(true);
    if let Err(e) = broker.shutdown().await {
        tracing::warn!(error = %e, "closing the store reported an error");
    }
    drop(broker);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&store) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if Arc::strong_count(&store) > 1 {
        tracing::warn!("the store is still in use 5 s after the broker stopped");
    }
    drop(store);
    tracing::info!("shared store closed");
}

fn publish(
    status: &watch::Sender<serde_json::Value>,
    m: &Machine,
    lock: &LockFile,
    ha: &HaConfig,
    since: Instant,
) {
    let holder = blocking_io(|| lock.read_holder().ok().flatten());
    let _ = status.send(json!({
        "role": ha.role.title().to_lowercase(),
        "mode": "shared",
        "state": m.state().as_str(),
        "previous": m.previous().as_str(),
        "peer": m.peer().as_str(),
        "lock_holder": holder.as_ref().map(|h| h.server.clone()),
        "lock_epoch": holder.as_ref().map(|h| h.epoch),
        "epoch": m.epoch(),
        "holds_lock": m.holds_lock(),
        "gateway_reachable": m.gateway_reachable(),
        "link_up": m.link_up(),
        "since_ms": fmq_broker::message::now_ms().saturating_sub(since.elapsed().as_millis() as u64),
    }));
}

/// Owns the client port: connections go to the broker while this server
/// serves, and get a STOMP ERROR naming the state otherwise.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    broker: watch::Receiver<Option<Arc<Broker>>>,
    state: watch::Receiver<State>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let current = *state.borrow();
        let serving = broker
            .borrow()
            .clone()
            .filter(|_| current.accepts_clients());
        match serving {
            Some(b) => {
                b.spawn_session(stream);
            }
            None => {
                tokio::spawn(refuse(stream, current));
            }
        }
    }
}

/// Answers a connection with an ERROR naming our state, after reading its
/// CONNECT (so the client sees the frame rather than a reset).
async fn refuse(mut stream: TcpStream, state: State) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if buf[..n].contains(&0) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let message =
        format!("server is {state}: it does not accept clients now; connect to the active server");
    let frame = fmq_proto::Frame::error(&message, "this server is the standby of an HA pair");
    let mut out = bytes::BytesMut::new();
    let mut codec = fmq_proto::StompCodec::default();
    if tokio_util::codec::Encoder::encode(&mut codec, frame, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
    }
    let _ = stream.shutdown().await;
}
