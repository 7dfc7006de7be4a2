//! Running one half of a replicated HA pair: the runtime around
//! `fmq_ha::replicated` and `fmq_ha::replication`.
//!
//! Each server opens its own store at start and keeps it open. One task
//! owns the state machine and carries out its actions: the lock file, the
//! gateway probe, the HA channel, the broker (started on a
//! [`ReplicatedStore`] when this server serves) and the replication tasks
//! (serving a passive that dials us, or following the active).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use fmq_broker::Broker;
use fmq_ha::config::Replication;
use fmq_ha::gateway::{self, GatewayMonitor, MonitorConfig};
use fmq_ha::heartbeat::{self, Channel, LinkEvent};
use fmq_ha::lock::LockFile;
use fmq_ha::replicated::{Action, Event, Machine, Timer, Timings};
use fmq_ha::replication::{self, Feed, Replica, ReplicatedStore, SinkEvent, Source, SourceEvent};
use fmq_ha::{HaConfig, State};
use fmq_store::{epoch, Batch, Store};
use fmq_store_rocks::RocksStore;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::ServerInfo;
use crate::ha::{
    blocking_io, release_lock, server_name, sleep_until, try_lock, verify_lock, Front, LockOutcome,
};
use crate::profile::Profile;
use crate::run::{open_store, start_broker_on};

/// Replication streams ending in a row before the passive caught up, from
/// which each end is a warning rather than news: one or two are a passive
/// that restarted or a link that blinked, more is a cause that repeats.
const FAILED_CATCH_UPS_WARN: u32 = 3;

/// This server's own store, which a checkpoint from the active may replace.
#[derive(Debug)]
struct LocalReplica {
    slot: Mutex<Option<Arc<RocksStore>>>,
    db_path: PathBuf,
    retention: u64,
    profile: Profile,
    /// Whether the batch log is paused (see [`LocalReplica::pause_log`]).
    log_paused: AtomicBool,
}

impl LocalReplica {
    /// Pauses the store's batch log while this server is a passive, and
    /// resumes it before it serves: a passive's batches are the active's,
    /// which logs them itself, so logging them again only doubles what the
    /// passive writes per batch. Kept across a checkpoint install.
    fn pause_log(&self, paused: bool) {
        self.log_paused.store(paused, Ordering::Release);
        if let Some(store) = self.current() {
            store.pause_log(paused);
        }
    }

    /// The slot, poisoned or not (it holds no invariant a panic can break).
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<RocksStore>>> {
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store, or `None` while a checkpoint is being installed.
    fn current(&self) -> Option<Arc<RocksStore>> {
        self.slot().clone()
    }

    /// The store, waiting (up to `within`) for a checkpoint install that a
    /// stopped catch-up left running on a blocking thread to finish.
    async fn rocks_when_open(&self, within: Duration) -> Result<Arc<RocksStore>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(store) = self.current() {
                return Ok(store);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "the store is still being replaced by a checkpoint after {} s",
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn rocks(&self) -> Arc<RocksStore> {
        self.current()
            .expect("the store is open except inside install()")
    }

    /// The store, or `None` while a checkpoint is being installed (the main
    /// loop must not wait for, nor hold up, the install).
    fn try_store(&self) -> Option<Arc<dyn Store>> {
        self.current().map(|s| s as Arc<dyn Store>)
    }

    /// Where this server's history stands (read off the async workers, see
    /// [`blocking_io`]), or `None` while a checkpoint is being installed.
    fn position(&self) -> Option<fmq_store::Result<epoch::Position>> {
        self.try_store()
            .map(|s| blocking_io(|| epoch::position(&*s)))
    }

    fn parent(&self) -> PathBuf {
        self.db_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }

    fn name(&self) -> String {
        self.db_path
            .file_name()
            .map_or_else(|| "db".into(), |n| n.to_string_lossy().into_owned())
    }
}

impl Replica for LocalReplica {
    fn store(&self) -> Arc<dyn Store> {
        self.rocks()
    }

    fn install(&self, dir: &Path, keep_old: bool) -> Result<(), String> {
        let old = self.slot().take();
        if let Some(old) = old {
            // Wait for the last users (a status read) to let go, so the
            // directory lock is released when it drops.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(store) => {
                        drop(store);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still) => {
                        *self.slot() = Some(still);
                        return Err(
                            "the store is still in use; cannot install the checkpoint".into()
                        );
                    }
                }
            }
        }
        let aside = self.parent().join(format!(
            "{}.{}-{}",
            self.name(),
            if keep_old { "diverged" } else { "replaced" },
            fmq_broker::message::now_ms()
        ));
        let result = (|| {
            std::fs::rename(&self.db_path, &aside).map_err(|e| {
                format!(
                    "moving {} aside to {}: {e}",
                    self.db_path.display(),
                    aside.display()
                )
            })?;
            std::fs::rename(dir, &self.db_path).map_err(|e| {
                format!(
                    "moving the checkpoint {} to {}: {e}",
                    dir.display(),
                    self.db_path.display()
                )
            })?;
            // The renames are durable only once their directory is synced;
            // a failed sync fails the install (the stream ends and the next
            // one starts from what the store then holds).
            fmq_store::durable::sync_dir(&self.parent()).map_err(|e| {
                format!(
                    "syncing {} after installing the checkpoint: {e}",
                    self.parent().display()
                )
            })?;
            Ok::<(), String>(())
        })();
        let reopened =
            open_store(&self.profile, &self.db_path, self.retention).map_err(|e| format!("{e:#}"));
        match reopened {
            Ok(store) => {
                store.pause_log(self.log_paused.load(Ordering::Acquire));
                *self.slot() = Some(store);
            }
            Err(e) => return Err(format!("reopening the store after the checkpoint: {e}")),
        }
        result?;
        if keep_old {
            tracing::warn!(
                "the store directory of the divergent history was kept as {}",
                aside.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&aside) {
            tracing::warn!(dir = %aside.display(), error = %e, "could not remove the replaced store");
        }
        Ok(())
    }

    fn staging(&self) -> PathBuf {
        self.parent().join(format!("{}.incoming", self.name()))
    }

    fn diverged_dir(&self) -> PathBuf {
        self.parent().join("diverged")
    }
}

/// The broker while this server serves.
struct Serving {
    broker: Arc<Broker>,
    feed: Arc<Feed>,
    source: Arc<Source>,
}

/// Messages from the helper tasks to the main loop.
enum Note {
    Source { generation: u64, event: SourceEvent },
    SourceEnded { generation: u64, reason: String },
    Sink { generation: u64, event: SinkEvent },
    SinkEnded { generation: u64, reason: String },
    Probe(bool),
}

/// Runs a replicated HA server until SIGTERM, SIGINT, an admin shutdown,
/// or a fatal HA error.
pub async fn run(
    profile: &Profile,
    ha: HaConfig,
    client: TcpListener,
    admin_listener: TcpListener,
    db_path: PathBuf,
    info: ServerInfo,
) -> Result<()> {
    ha.validate()?;
    let lock_path = ha.lock_file.clone().unwrap_or_default();
    let mut lock = LockFile::open(&lock_path)?;
    let server_name = server_name(&ha);
    let sync_mode = ha.replication == Replication::Sync;

    let retention = ha.replication_log_batches.max(1);
    let replica = Arc::new(LocalReplica {
        slot: Mutex::new(Some(open_store(profile, &db_path, retention)?)),
        db_path: db_path.clone(),
        retention,
        profile: profile.clone(),
        log_paused: AtomicBool::new(false),
    });
    clean_staging(&replica);

    let Front {
        broker: broker_tx,
        status: status_tx,
        shutdown: mut shutdown_rx,
        state: state_tx,
        acceptor,
    } = Front::open(client, admin_listener, &info, State::Waiting);

    let position = epoch::position(&*replica.store())?;
    tracing::info!(
        "FerroMQ HA server '{}' ({} of cluster '{}', replicated mode, {} replication): STOMP on {}, HA port {}:{}, lock file {}, gateway {}:{}, store {} at epoch {} sequence {}",
        info.name,
        ha.role,
        ha.cluster_name,
        if sync_mode { "synchronous" } else { "asynchronous" },
        info.client_addr,
        ha.bind_address,
        ha.port,
        lock_path.display(),
        ha.gateway_server_ip_address,
        ha.gateway_server_port,
        db_path.display(),
        position.epoch,
        position.sequence
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
            sink_retry_ms: ha.ping_interval.max(200),
        },
    );
    let (note_tx, mut notes) = mpsc::channel::<Note>(1024);
    let mut timers: HashMap<Timer, tokio::time::Instant> = HashMap::new();
    let mut events: VecDeque<Event> = VecDeque::from([Event::Start]);
    let mut serving: Option<Serving> = None;
    let mut source_task: Option<JoinHandle<()>> = None;
    let mut sink_task: Option<Follower> = None;
    let mut generation: u64 = 0;
    // Replication streams to the passive that ended before it caught up,
    // in a row.
    let mut failed_catch_ups: u32 = 0;
    let mut since = Instant::now();
    let mut fatal: Option<anyhow::Error> = None;
    let mut diverged: Vec<serde_json::Value> = Vec::new();
    let mut catch_up: Option<(u64, f64)> = None;
    let owner = format!("{}#{:016x}", ha.role.title(), rand_id());

    'run: loop {
        while let Some(event) = events.pop_front() {
            // Read once per event: the machine compares it, broadcasts carry it.
            let here = replica
                .position()
                .and_then(Result::ok)
                .map(|p| (p.epoch, p.sequence));
            if let Some(p) = here {
                machine.set_position(p);
            }
            let before = machine.state();
            for action in machine.handle(event) {
                match action {
                    Action::TryLock => {
                        // The lock's new epoch must exceed our own history's.
                        events.push_back(match replica.position() {
                            Some(Ok(ours)) => match try_lock(&mut lock, &server_name, ours.epoch) {
                                LockOutcome::Acquired(epoch) => Event::LockAcquired { epoch },
                                LockOutcome::Busy => Event::LockBusy,
                                LockOutcome::Lost(reason) => Event::LockLost { reason },
                                LockOutcome::Verified => Event::LockVerified,
                            },
                            // A checkpoint is being installed: try later.
                            None => Event::LockBusy,
                            Some(Err(e)) => Event::LockLost {
                                reason: format!("cannot read this server's epoch: {e}"),
                            },
                        })
                    }
                    Action::VerifyLock => events.push_back(
                        match verify_lock(&mut lock, &server_name, machine.epoch()) {
                            LockOutcome::Lost(reason) => Event::LockLost { reason },
                            _ => Event::LockVerified,
                        },
                    ),
                    Action::ReleaseLock => release_lock(&mut lock),
                    Action::ProbeGateway => {
                        let tx = note_tx.clone();
                        let (host, port) =
                            (ha.gateway_server_ip_address.clone(), ha.gateway_server_port);
                        // The fresh ping that decides whether a serving
                        // server that lost its peer is isolated: a false
                        // "unreachable" costs a needless failover, so it
                        // gets 5 intervals (at least 500 ms), not one; a
                        // machine stalled by its disk can miss one.
                        let timeout = Duration::from_millis(
                            ha.ping_interval.saturating_mul(5).clamp(500, 5000),
                        );
                        tokio::spawn(async move {
                            let ok = gateway::ping(&host, port, timeout).await.is_ok();
                            let _ = tx.send(Note::Probe(ok)).await;
                        });
                    }
                    Action::StartBroker => {
                        if let Some(t) = sink_task.take() {
                            stop_sink(t).await;
                        }
                        events.push_back(
                            match start_serving(profile, &replica, machine.epoch(), &owner).await {
                                Ok(s) => {
                                    let _ = broker_tx.send(Some(s.broker.clone()));
                                    serving = Some(s);
                                    Event::ServicesActivated
                                }
                                Err(e) => Event::ServicesFailed {
                                    reason: format!("{e:#}"),
                                },
                            },
                        );
                    }
                    Action::StopBroker => {
                        let _ = broker_tx.send(None);
                        if let Some(t) = source_task.take() {
                            t.abort();
                        }
                        if let Some(s) = serving.take() {
                            stop_serving(s).await;
                        }
                    }
                    Action::StartSink => {
                        generation += 1;
                        if let Some(t) = sink_task.take() {
                            stop_sink(t).await;
                        }
                        catch_up = None;
                        replica.pause_log(true);
                        sink_task = Some(spawn_sink(
                            ha.clone(),
                            server_name.clone(),
                            replica.clone(),
                            note_tx.clone(),
                            generation,
                        ));
                    }
                    Action::StopSink => {
                        if let Some(t) = sink_task.take() {
                            stop_sink(t).await;
                        }
                    }
                    Action::RequireSync(on) => {
                        if let Some(s) = &serving {
                            s.feed.set_required(on && sync_mode);
                        }
                    }
                    Action::Broadcast { current, previous } => {
                        channel.broadcast_state_at(current, previous, here);
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
        }
        publish(
            &status_tx,
            &machine,
            &lock,
            &ha,
            since,
            &replica,
            serving.as_ref(),
            sync_mode,
            &diverged,
            catch_up,
        );
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
                Some(LinkEvent::PeerState { current, previous, position }) => {
                    events.push_back(Event::PeerState { current, previous, position });
                }
                Some(LinkEvent::Replication(stream)) => {
                    match &serving {
                        Some(s) => {
                            generation += 1;
                            if let Some(t) = source_task.take() {
                                t.abort();
                                // The stream it fed is gone, whatever the
                                // new one brings.
                                events.push_back(Event::ReplicationFailed {
                                    reason: "replaced by a new replication connection".into(),
                                });
                            }
                            source_task = Some(spawn_source(stream, s.source.clone(), note_tx.clone(), generation));
                        }
                        None => tracing::warn!(peer = %stream.peer.server, state = %machine.state(), "replication connection refused: this server does not serve"),
                    }
                }
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
            Some(note) = notes.recv() => match note {
                Note::Probe(ok) => events.push_back(Event::GatewayProbe { ok }),
                Note::Source { generation: g, event: SourceEvent::InSync } if g == generation => {
                    tracing::info!("the passive server has caught up");
                    failed_catch_ups = 0;
                    events.push_back(Event::SyncComplete);
                }
                Note::SourceEnded { generation: g, reason } if g == generation => {
                    // Receipts keep waiting: the machine releases them when
                    // the peer also reports WAITING (it resyncs) or, once
                    // the link is down, after it has confirmed the lock and
                    // gateway.
                    failed_catch_ups += 1;
                    if failed_catch_ups >= FAILED_CATCH_UPS_WARN {
                        // The same cause, retried every few hundred ms (a
                        // checkpoint the store cannot make, say): the pair
                        // is not redundant until someone acts on it.
                        tracing::warn!(%reason, attempts = failed_catch_ups, "replication to the passive server keeps failing before it catches up");
                    } else {
                        tracing::info!(%reason, "replication to the passive server ended");
                    }
                    source_task = None;
                    events.push_back(Event::ReplicationFailed { reason });
                }
                Note::Sink { generation: g, event } if g == generation => match event {
                    SinkEvent::InSync => {
                        catch_up = None;
                        events.push_back(Event::SyncComplete);
                    }
                    SinkEvent::Progress { applied, rate } => {
                        tracing::info!(applied, rate = format!("{rate:.0} batches/s"), "catching up with the active server");
                        catch_up = Some((applied, rate));
                    }
                    SinkEvent::SnapshotInstalled { sequence } => {
                        tracing::info!(sequence, "checkpoint from the active server installed");
                    }
                    SinkEvent::Diverged { file, batches, from, to } => {
                        diverged.push(json!({"file": file.display().to_string(), "batches": batches, "from": from, "to": to}));
                    }
                },
                Note::SinkEnded { generation: g, reason } if g == generation => {
                    sink_task = None;
                    events.push_back(Event::ReplicationFailed { reason });
                }
                _ => {}
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
            // Status refresh for the lag figures.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown_rx.wait_for(|s| *s) => break 'run,
        }
    }

    let _ = broker_tx.send(None);
    acceptor.abort();
    if let Some(t) = sink_task.take() {
        stop_sink(t).await;
    }
    if let Some(s) = serving.take() {
        // Let the passive take the last batches before we stop.
        let deadline = Instant::now() + Duration::from_millis(500);
        while s.feed.lag().batches > 0 && Instant::now() < deadline && source_task.is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(t) = source_task.take() {
            t.abort();
        }
        stop_serving(s).await;
    }
    let _ = lock.release();
    channel.broadcast_state(State::Dead, machine.state());
    tokio::time::sleep(Duration::from_millis(50)).await;
    channel.shutdown().await;
    gateway.stop().await;
    drop(replica);
    match fatal {
        Some(e) => Err(e),
        None => {
            tracing::info!("FerroMQ server stopped");
            Ok(())
        }
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(fmq_broker::message::now_ms());
    h.write_u32(std::process::id());
    h.finish()
}

/// Opens a new epoch in our store and starts the broker on it.
async fn start_serving(
    profile: &Profile,
    replica: &Arc<LocalReplica>,
    epoch_no: u64,
    owner: &str,
) -> Result<Serving> {
    let rocks = replica.rocks_when_open(Duration::from_secs(60)).await?;
    replica.pause_log(false);
    let inner: Arc<dyn Store> = rocks.clone();
    // After whatever a stopped catch-up handed the store: the epoch opens
    // on top of it, and the broker recovers from it.
    let start = inner.settled().await? + 1;
    let mut mark = Batch::new();
    epoch::mark_epoch(&mut mark, epoch_no, start, owner);
    mark.set_sync(true);
    inner.commit_as(mark, start).await?;
    tracing::info!(epoch = epoch_no, sequence = start, "new epoch opened");
    let feed = Feed::new(start, epoch_no);
    let store: Arc<dyn Store> = Arc::new(ReplicatedStore::new(inner.clone(), feed.clone()));
    let broker = start_broker_on(profile, store).await?;
    let scratch = replica.parent();
    let source = Arc::new(Source {
        store: inner,
        feed: feed.clone(),
        checkpoint: Box::new(move |dir: &Path| {
            let rocks = rocks.clone();
            tokio::task::block_in_place(|| rocks.checkpoint(dir)).map_err(|e| e.to_string())
        }),
        scratch,
    });
    Ok(Serving {
        broker,
        feed,
        source,
    })
}

async fn stop_serving(s: Serving) {
    let Serving {
        broker,
        feed,
        source,
    } = s;
    feed.fence();
    let _ = broker.shutdown_handle().send(true);
    if let Err(e) = broker.shutdown().await {
        tracing::warn!(error = %e, "stopping the broker reported an error");
    }
    drop(broker);
    drop(source);
    tracing::info!("broker stopped; the store stays open for replication");
}

/// A channel for a replication task's events and the task that forwards
/// them to the HA loop as `note(event)`; it ends once the sender is dropped.
fn forward_events<E: Send + 'static>(
    notes: &mpsc::Sender<Note>,
    note: impl Fn(E) -> Note + Send + 'static,
) -> (mpsc::Sender<E>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(8);
    let notes = notes.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let _ = notes.send(note(event)).await;
        }
    });
    (tx, task)
}

fn spawn_source(
    stream: heartbeat::ReplicationStream,
    source: Arc<Source>,
    notes: mpsc::Sender<Note>,
    generation: u64,
) -> JoinHandle<()> {
    tracing::info!(peer = %stream.peer.server, "the passive server connected for replication");
    tokio::spawn(async move {
        let (tx, forward) = forward_events(&notes, move |event| Note::Source { generation, event });
        let reason = replication::serve(stream.framed, source, tx).await;
        let _ = forward.await;
        let _ = notes.send(Note::SourceEnded { generation, reason }).await;
    })
}

/// The passive's side of replication, on a thread of its own: it writes
/// each group of batches right where it reads them, blocking while the
/// write and its fsync run (see [`replication::follow`]), so it has its
/// own runtime, on which nothing else waits.
struct Follower {
    /// Dropped or sent: stop.
    stop: tokio::sync::oneshot::Sender<()>,
    /// Ends (with an error) when the thread does.
    gone: tokio::sync::oneshot::Receiver<()>,
}

/// Stops a catch-up thread and waits until it is gone. It stops between
/// two groups of batches, never inside one, so once it is gone nothing of
/// its stream is still being written, and a new subscription reads the
/// store's position with every batch it handed over already in.
async fn stop_sink(follower: Follower) {
    let Follower { stop, gone } = follower;
    drop(stop);
    let _ = gone.await;
}

fn spawn_sink(
    ha: HaConfig,
    server_name: String,
    replica: Arc<LocalReplica>,
    notes: mpsc::Sender<Note>,
    generation: u64,
) -> Follower {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
    let report = notes.clone();
    let started = std::thread::Builder::new()
        .name("fmq-replica".into())
        .spawn(move || {
            let _gone = gone_tx;
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let reason = format!("cannot start the replication runtime: {e}");
                    let _ = notes.blocking_send(Note::SinkEnded { generation, reason });
                    return;
                }
            };
            runtime.block_on(async move {
                let follow = async {
                    // A stopped catch-up may have left a checkpoint install
                    // running on a blocking thread; follow the active only
                    // once the store is back. The handle is dropped at
                    // once: a checkpoint this stream installs must be able
                    // to close the store.
                    let opened = replica
                        .rocks_when_open(Duration::from_secs(60))
                        .await
                        .map(drop);
                    match opened {
                        Err(e) => format!("{e:#}"),
                        Ok(()) => {
                            follow_active(&ha, &server_name, replica, &notes, generation).await
                        }
                    }
                };
                tokio::select! {
                    biased;
                    _ = stopped => {}
                    reason = follow => {
                        let _ = notes.send(Note::SinkEnded { generation, reason }).await;
                    }
                }
            });
            // A checkpoint install still running goes on by itself, as
            // the next stream expects (`rocks_when_open`).
            runtime.shutdown_background();
        });
    if let Err(e) = started {
        let reason = format!("cannot start the replication thread: {e}");
        tokio::spawn(async move {
            let _ = report.send(Note::SinkEnded { generation, reason }).await;
        });
    }
    Follower { stop, gone }
}

/// Dials the active and follows it until the stream ends; returns why.
async fn follow_active(
    ha: &HaConfig,
    server_name: &str,
    replica: Arc<LocalReplica>,
    notes: &mpsc::Sender<Note>,
    generation: u64,
) -> String {
    match heartbeat::dial_replication(ha, server_name).await {
        Ok(stream) => {
            let (tx, forward) =
                forward_events(notes, move |event| Note::Sink { generation, event });
            let reason = replication::follow(stream.framed, replica, tx).await;
            let _ = forward.await;
            reason
        }
        Err(e) => format!("cannot open the replication connection: {e}"),
    }
}

fn clean_staging(replica: &LocalReplica) {
    let staging = replica.staging();
    if staging.exists() {
        if let Err(e) = std::fs::remove_dir_all(&staging) {
            tracing::warn!(dir = %staging.display(), error = %e, "could not remove an unfinished checkpoint");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn publish(
    status: &watch::Sender<serde_json::Value>,
    m: &Machine,
    lock: &LockFile,
    ha: &HaConfig,
    since: Instant,
    replica: &LocalReplica,
    serving: Option<&Serving>,
    sync_mode: bool,
    diverged: &[serde_json::Value],
    catch_up: Option<(u64, f64)>,
) {
    let holder = blocking_io(|| lock.read_holder().ok().flatten());
    let Some(store) = replica.try_store() else {
        // A checkpoint is being installed; the next refresh shows it.
        return;
    };
    let position = blocking_io(|| epoch::position(&*store).ok());
    let replication = serving.map(|s| {
        let lag = s.feed.lag();
        let acks = s.feed.acks();
        json!({
            "acked_sequence": acks.acked,
            "waiting_for_passive": acks.required,
            "lag_batches": lag.batches,
            "lag_bytes": lag.bytes,
            "lag_seconds": lag.seconds,
        })
    });
    let _ = status.send(json!({
        "role": ha.role.title().to_lowercase(),
        "mode": "replicated",
        "replication": if sync_mode { "sync" } else { "async" },
        "state": m.state().as_str(),
        "previous": m.previous().as_str(),
        "peer": m.peer().as_str(),
        "peer_position": m.peer_position().map(|(e, s)| json!({"epoch": e, "sequence": s})),
        "position": position.map(|p| json!({"epoch": p.epoch, "sequence": p.sequence})),
        "first_logged": store.first_logged(),
        "lock_holder": holder.as_ref().map(|h| h.server.clone()),
        "lock_epoch": holder.as_ref().map(|h| h.epoch),
        "epoch": m.epoch(),
        "holds_lock": m.holds_lock(),
        "gateway_reachable": m.gateway_reachable(),
        "link_up": m.link_up(),
        "to_passive": replication,
        "catch_up": catch_up.map(|(applied, rate)| json!({"applied": applied, "batches_per_s": rate})),
        "diverged": diverged,
        "since_ms": fmq_broker::message::now_ms().saturating_sub(since.elapsed().as_millis() as u64),
    }));
}
