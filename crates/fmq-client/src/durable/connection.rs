//! [`Connection`], its [`ConnectionBuilder`], and the task that keeps it
//! connected.
//!
//! One task per connection (the *manager*) owns the server list. It
//! connects (walking the list, skipping standby servers, backing off
//! between rounds), subscribes the registered consumers again, publishes the
//! new [`Link`] for sessions to use, drains the send buffer, and then waits
//! for the connection to end or for a send to be buffered. Sessions,
//! producers and consumers never reconnect themselves: they read the current
//! link, and a link carries a *generation*, so anything begun on an earlier
//! one (a transaction, an unacknowledged delivery) is known to be gone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fmq_proto::{Command, Frame};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::backoff::Backoff;
use super::consumer::ConsumerShared;
use super::event::{Event, Events};
use super::outbox::{Limits, Outbox, SendRecord};
use super::session::{CommitKey, Session, SessionMode};
use super::{PRODUCER_ID_HEADER, SEQUENCE_HEADER};
use crate::client::{Client, ConnectOptions};
use crate::error::{Error, Result};

/// Events kept for slow readers.
const EVENT_CAPACITY: usize = 1024;

/// Settings of a [`Connection`], fixed when it is built.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub servers: Vec<String>,
    pub login: Option<String>,
    pub passcode: Option<String>,
    pub client_id: Option<String>,
    pub host: Option<String>,
    pub buffer_dir: Option<PathBuf>,
    pub limits: Limits,
    pub backoff: Backoff,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub receive_timeout: Duration,
    pub initial_timeout: Duration,
    pub offline_start: bool,
    pub heart_beat: (u32, u32),
    pub dedupe_window: usize,
    pub replay_window: usize,
}

/// Builds a [`Connection`]; made by [`Connection::builder`].
///
/// Every setting has a default; only the server list is required.
#[derive(Debug, Clone)]
pub struct ConnectionBuilder {
    config: Config,
    events: broadcast::Sender<Event>,
}

impl ConnectionBuilder {
    /// The events of the connection this builder makes, from now on: unlike
    /// [`Connection::events`], this also sees what happens during
    /// [`connect`](Self::connect) (servers skipped or failing before the
    /// first connection). Clones of a builder share this stream.
    pub fn events(&self) -> Events {
        Events::new(self.events.subscribe(), false)
    }

    /// Login and passcode sent on every CONNECT.
    pub fn credentials(mut self, login: impl Into<String>, passcode: impl Into<String>) -> Self {
        self.config.login = Some(login.into());
        self.config.passcode = Some(passcode.into());
        self
    }

    /// The client-id sent on CONNECT. Durable subscriptions are kept by
    /// client-id and name, and producer ids are derived from it.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.config.client_id = Some(id.into());
        self
    }

    /// The CONNECT `host` header (virtual host); default `localhost`.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = Some(host.into());
        self
    }

    /// Keeps the send buffer and the producers' ids and sequence numbers in
    /// this directory (created if missing), so they survive a restart of
    /// the client: the next connection with the same directory replays what
    /// was left. One connection at a time may use a directory. Without it,
    /// the buffer is in memory only.
    pub fn buffer_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.buffer_dir = Some(dir.into());
        self
    }

    /// Bounds of the send buffer: at most `records` sends and `bytes`
    /// bytes. A persistent send that does not fit fails with
    /// [`Error::BufferFull`]. Default 100 000 sends, 256 MiB.
    pub fn buffer_limits(mut self, records: usize, bytes: u64) -> Self {
        self.config.limits = Limits {
            max_records: records,
            max_bytes: bytes,
        };
        self
    }

    /// The back-off between rounds of reconnect attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// Limit for one connection attempt to one server (TCP connect and the
    /// CONNECT/CONNECTED handshake). Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Limit for every call that waits on the server: RECEIPTs of sends,
    /// subscriptions and commits, and waiting for a connection where one
    /// is needed. A server that does not receipt a send in time is taken
    /// for failed and the connection moves on. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How long [`Consumer::receive`](super::Consumer::receive) waits for a
    /// message. Default 30 s.
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.config.receive_timeout = timeout;
        self
    }

    /// How long [`connect`](Self::connect) waits for the first connection.
    /// Default 10 s.
    pub fn initial_timeout(mut self, timeout: Duration) -> Self {
        self.config.initial_timeout = timeout;
        self
    }

    /// When `true`, [`connect`](Self::connect) returns the connection even
    /// if no server accepted it within the initial timeout: it keeps trying
    /// in the background, persistent sends go to the buffer meanwhile, and
    /// consumers subscribe once a server is reached. Default `false`.
    pub fn offline_start(mut self, allowed: bool) -> Self {
        self.config.offline_start = allowed;
        self
    }

    /// Heart-beats offered on CONNECT, in ms (can send every, want to
    /// receive every; 0 disables). A server silent for twice the agreed
    /// interval is taken for dead. Default (2000, 2000).
    pub fn heart_beat(mut self, send_ms: u32, receive_ms: u32) -> Self {
        self.config.heart_beat = (send_ms, receive_ms);
        self
    }

    /// How many acknowledged messages each consumer remembers to drop
    /// their redeliveries. Default 10 000; 0 turns the check off.
    pub fn dedupe_window(mut self, messages: usize) -> Self {
        self.config.dedupe_window = messages;
        self
    }

    /// Most buffered sends replayed before their RECEIPTs are awaited.
    /// Default 64.
    pub fn replay_window(mut self, sends: usize) -> Self {
        self.config.replay_window = sends.max(1);
        self
    }

    /// Opens the send buffer and connects to the first server that accepts.
    ///
    /// Waits up to the initial timeout for a connection. If none came, it
    /// fails with [`Error::Unavailable`] (listing each server's answer),
    /// unless [`offline_start`](Self::offline_start) allows returning a
    /// connection that keeps trying. A server that refuses the credentials
    /// fails the call at once. A buffer directory in use by another
    /// connection, or one that cannot be read, is [`Error::Buffer`].
    pub async fn connect(self) -> Result<Connection> {
        let config = self.config;
        let events = self.events;
        if config.servers.is_empty() {
            return Err(Error::Usage("the server list is empty".into()));
        }
        let dir = config.buffer_dir.clone();
        let limits = config.limits;
        let (outbox, recovery) =
            tokio::task::spawn_blocking(move || Outbox::open(dir.as_deref(), limits))
                .await
                .map_err(|e| Error::Buffer(format!("opening the buffer: {e}")))??;
        if let Some(w) = &recovery.warning {
            tracing::warn!("send buffer: {w}");
        }
        let shutdown = CancellationToken::new();
        let inner = Arc::new(Inner {
            config,
            outbox: Arc::new(outbox),
            link: watch::channel(None).0,
            events,
            consumers: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            shutdown: shutdown.clone(),
            first_failure: watch::channel(None).0,
            last_round: Mutex::new(Vec::new()),
            manager: Mutex::new(None),
            commit_keys: Mutex::new(Vec::new()),
        });
        let mut link = inner.link.subscribe();
        let mut failure = inner.first_failure.subscribe();
        let task = tokio::spawn(run(inner.clone()));
        *lock(&inner.manager) = Some(task);
        let connection = Connection {
            inner: inner.clone(),
            _guard: Arc::new(shutdown.clone().drop_guard()),
        };
        let waited = tokio::time::timeout(inner.config.initial_timeout, async {
            tokio::select! {
                r = link.wait_for(Option::is_some) => r.map(|_| None).unwrap_or(Some(Error::Closed)),
                r = failure.wait_for(Option::is_some) => r.map(|e| e.clone()).unwrap_or(Some(Error::Closed)),
            }
        })
        .await;
        let error = match waited {
            Ok(None) => return Ok(connection),
            Ok(Some(e)) => e,
            Err(_) if inner.config.offline_start => return Ok(connection),
            Err(_) => Error::Unavailable(lock(&inner.last_round).join("; ")),
        };
        connection.shut_down().await;
        Err(error)
    }
}

/// A connection to a FerroMQ server of a list (typically the two servers
/// of an HA pair) that reconnects and fails over by itself.
///
/// `Connection` is a cheap, cloneable handle. The connection stays open
/// while any handle, [`Session`], producer or consumer exists, or until
/// [`close`](Self::close). See the [module documentation](super) for what
/// happens on failover.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("servers", &self.inner.config.servers)
            .field("client_id", &self.inner.config.client_id)
            .field("server", &self.server())
            .field("buffered", &self.buffered())
            .finish()
    }
}

impl Connection {
    /// A builder for a connection to `servers` (`HOST:PORT`), tried in this
    /// order: typically the primary, then the secondary.
    pub fn builder<I, S>(servers: I) -> ConnectionBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ConnectionBuilder {
            events: broadcast::channel(EVENT_CAPACITY).0,
            config: Config {
                servers: servers.into_iter().map(Into::into).collect(),
                login: None,
                passcode: None,
                client_id: None,
                host: None,
                buffer_dir: None,
                limits: Limits {
                    max_records: 100_000,
                    max_bytes: 256 << 20,
                },
                backoff: Backoff::default(),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(30),
                receive_timeout: Duration::from_secs(30),
                initial_timeout: Duration::from_secs(10),
                offline_start: false,
                heart_beat: (2000, 2000),
                dedupe_window: 10_000,
                replay_window: 64,
            },
        }
    }

    /// A new session. Sessions need no round trip to the server.
    pub fn session(&self, mode: SessionMode) -> Session {
        Session::new(self.clone(), mode)
    }

    /// The connection's events from now on: connections, failovers,
    /// skipped servers, replayed sends, ... The stream ends after
    /// [`Event::Closed`]; on a closed connection it is empty.
    pub fn events(&self) -> Events {
        Events::new(
            self.inner.events.subscribe(),
            self.inner.shutdown.is_cancelled(),
        )
    }

    /// Whether a server is connected right now.
    pub fn is_connected(&self) -> bool {
        self.inner.link.borrow().is_some()
    }

    /// The address of the server connected right now.
    pub fn server(&self) -> Option<String> {
        self.inner.link.borrow().as_ref().map(|l| l.server.clone())
    }

    /// The client-id given to the builder.
    pub fn client_id(&self) -> Option<&str> {
        self.inner.config.client_id.as_deref()
    }

    /// Persistent sends waiting in the local buffer.
    pub fn buffered(&self) -> usize {
        self.inner.outbox.len()
    }

    /// Waits until the local buffer is empty (every buffered send was
    /// receipted by a server), for at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let mut count = self.inner.outbox.watch_len();
        let drained = tokio::time::timeout(timeout, count.wait_for(|n| *n == 0))
            .await
            .map(|r| r.is_ok());
        match drained {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout("the send buffer to drain")),
        }
    }

    /// Closes the connection: stops reconnecting, disconnects from the
    /// server (waiting for what was sent to be processed), and syncs the
    /// send buffer. Sends still buffered stay in the buffer directory for
    /// the next connection. Other handles fail with [`Error::Closed`]
    /// afterwards.
    pub async fn close(self) -> Result<()> {
        self.shut_down().await;
        Ok(())
    }

    async fn shut_down(&self) {
        self.inner.shutdown.cancel();
        let task = lock(&self.inner.manager).take();
        if let Some(task) = task {
            let limit = self.inner.config.request_timeout + Duration::from_secs(1);
            if tokio::time::timeout(limit, task).await.is_err() {
                tracing::warn!("the connection did not stop in time");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connection to one server, as handed to sessions.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub client: Client,
    /// Counts connections made; a new one has a higher number.
    pub generation: u64,
    /// The server's address, as given in the list.
    pub server: String,
}

/// What the handles and the manager share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub config: Config,
    pub outbox: Arc<Outbox>,
    /// The current connection, if any.
    link: watch::Sender<Option<Link>>,
    events: broadcast::Sender<Event>,
    /// Registered consumers, by key.
    consumers: Mutex<HashMap<u64, Arc<ConsumerShared>>>,
    next_key: AtomicU64,
    generation: AtomicU64,
    /// Cancelled by `close` or when the last handle is dropped.
    pub shutdown: CancellationToken,
    /// A refusal that should fail the initial `connect` at once.
    first_failure: watch::Sender<Option<Error>>,
    /// What each server answered in the last failed round.
    last_round: Mutex<Vec<String>>,
    manager: Mutex<Option<JoinHandle<()>>>,
    /// Transaction keys of dropped transacted sessions, for new ones: the
    /// broker then tracks as many keys as sessions were open at once, not
    /// one per session ever made.
    commit_keys: Mutex<Vec<CommitKey>>,
}

impl Inner {
    /// Reports an event to the readers and the log.
    pub fn emit(&self, event: Event) {
        emit(&self.events, event);
    }

    /// A sender of events, for consumers.
    pub fn events(&self) -> broadcast::Sender<Event> {
        self.events.clone()
    }

    /// The current connection, if any.
    pub fn link(&self) -> Option<Link> {
        self.link.borrow().clone()
    }

    /// The current connection, waiting for one for at most `timeout`.
    pub async fn wait_link(&self, timeout: Duration) -> Result<Link> {
        self.wait_link_after(0, timeout).await
    }

    /// A connection newer than generation `after`, waiting for one for at
    /// most `timeout`.
    pub async fn wait_link_after(&self, after: u64, timeout: Duration) -> Result<Link> {
        if self.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        let mut rx = self.link.subscribe();
        let wait = rx.wait_for(|l| l.as_ref().is_some_and(|l| l.generation > after));
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(Error::Closed),
            r = tokio::time::timeout(timeout, wait) => match r {
                Ok(Ok(link)) => link.clone().ok_or(Error::Closed),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Unavailable(format!(
                    "no connection to a server within {} ms",
                    timeout.as_millis()
                ))),
            },
        }
    }

    /// Registers a consumer for (re)subscription; returns its key.
    pub fn register(&self, consumer: Arc<ConsumerShared>) {
        lock(&self.consumers).insert(consumer.key, consumer);
    }

    /// A fresh consumer key.
    pub fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Forgets a consumer.
    pub fn unregister(&self, key: u64) {
        lock(&self.consumers).remove(&key);
    }

    /// A transaction key for a new transacted session: one a dropped
    /// session left (its counter goes on), else a new one.
    pub fn commit_key(&self) -> CommitKey {
        lock(&self.commit_keys)
            .pop()
            .unwrap_or_else(|| CommitKey::new(self.config.client_id.as_deref()))
    }

    /// Takes back the transaction key of a dropped session.
    pub fn recycle_commit_key(&self, key: CommitKey) {
        lock(&self.commit_keys).push(key);
    }
}

/// Sends an event and logs it.
pub(crate) fn emit(events: &broadcast::Sender<Event>, event: Event) {
    match &event {
        Event::ConnectFailed { .. }
        | Event::Disconnected { .. }
        | Event::SendRejected { .. }
        | Event::ConsumerLost { .. } => tracing::warn!("{event}"),
        Event::Waiting { .. } | Event::DuplicateDropped { .. } => tracing::debug!("{event}"),
        _ => tracing::info!("{event}"),
    }
    let _ = events.send(event);
}

/// Whether an ERROR message on CONNECT says the server is the standby of
/// an HA pair (PASSIVE, WAITING, ...) rather than refusing us.
pub(crate) fn is_standby_refusal(message: &str) -> bool {
    const STATES: [&str; 5] = ["PASSIVE", "PASSIVE_SYNC", "WAITING", "ACTIVATING", "DEAD"];
    message.contains("does not accept clients")
        || message
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|word| STATES.contains(&word))
}

/// Whether a server ERROR is about the server's condition rather than the
/// frame it answers (so resending the frame elsewhere may succeed).
pub(crate) fn is_transient(error: &Error) -> bool {
    match error {
        Error::Server { message, .. } => {
            is_standby_refusal(message)
                || message.contains("shutting down")
                || message.contains("could not store")
        }
        other => other.is_connection_loss(),
    }
}

/// Whether a refusal of CONNECT will not go away by retrying.
fn is_fatal_refusal(error: &Error) -> bool {
    matches!(error, Error::Server { message, .. } if message.to_ascii_lowercase().contains("authentication"))
}

/// The SEND frame of a buffered (or about to be sent) persistent send.
pub(crate) fn send_frame(record: &SendRecord) -> Frame {
    let mut frame = Frame::new(Command::Send).header("destination", record.destination.as_str());
    for (k, v) in &record.headers {
        frame.headers.push(k.as_str(), v.as_str());
    }
    frame
        .headers
        .push(PRODUCER_ID_HEADER, record.producer_id.as_str());
    frame
        .headers
        .push(SEQUENCE_HEADER, record.sequence.to_string());
    frame.with_body(record.body.clone())
}

/// How often a round is retried while a server of the list says it is not
/// the active one (a takeover is under way: its peer died, or it is about to
/// take over), so the new active is found within this of accepting clients
/// instead of after a back-off that has grown meanwhile.
const TAKEOVER_POLL: Duration = Duration::from_millis(50);
/// For how long after the first such round [`TAKEOVER_POLL`] applies; the
/// capped back-off takes over after it (a pair whose other server stays
/// down is not polled for ever).
const TAKEOVER_WINDOW: Duration = Duration::from_secs(10);

/// The manager: connects, serves, and reconnects until shut down.
async fn run(inner: Arc<Inner>) {
    let n = inner.config.servers.len();
    let mut start = 0;
    let mut attempt = 0u32;
    let mut lost: Option<(String, Instant)> = None;
    let mut ever_connected = false;
    // When a failed round first met a server in standby.
    let mut standby_since: Option<Instant> = None;
    while !inner.shutdown.is_cancelled() {
        let connected = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            c = connect_round(&inner, start, ever_connected) => c,
        };
        let (index, client) = match connected {
            Ok(found) => found,
            Err(standby) => {
                let since = standby.then(|| *standby_since.get_or_insert_with(Instant::now));
                let takeover = since.is_some_and(|t| t.elapsed() < TAKEOVER_WINDOW);
                let delay = if takeover {
                    TAKEOVER_POLL
                } else {
                    inner.config.backoff.delay(attempt)
                };
                inner.emit(Event::Waiting { attempt, delay });
                if !takeover {
                    attempt = attempt.saturating_add(1);
                }
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        attempt = 0;
        standby_since = None;
        let server = inner.config.servers[index].clone();
        let link = Link {
            client,
            generation: inner.generation.fetch_add(1, Ordering::Relaxed) + 1,
            server: server.clone(),
        };
        let error = match resubscribe(&inner, &link).await {
            Err(e) => e,
            Ok(count) => {
                inner.link.send_replace(Some(link.clone()));
                match lost.take() {
                    None => inner.emit(Event::Connected {
                        server: server.clone(),
                    }),
                    Some((from, at)) if from == server => inner.emit(Event::Reconnected {
                        server: server.clone(),
                        after: at.elapsed(),
                    }),
                    Some((from, at)) => inner.emit(Event::FailedOver {
                        from,
                        to: server.clone(),
                        after: at.elapsed(),
                    }),
                }
                if count > 0 && ever_connected {
                    inner.emit(Event::Resubscribed {
                        server: server.clone(),
                        count,
                    });
                }
                ever_connected = true;
                serve(&inner, &link).await
            }
        };
        inner.outbox.go_offline();
        inner.link.send_replace(None);
        if inner.shutdown.is_cancelled() {
            if link.client.is_connected() {
                let _ = link.client.clone().disconnect().await;
            }
            break;
        }
        link.client.abort(error.clone());
        inner.emit(Event::Disconnected {
            server: server.clone(),
            error,
        });
        lost = Some((server, Instant::now()));
        start = (index + 1) % n;
    }
    inner.outbox.go_offline();
    inner.link.send_replace(None);
    let outbox = inner.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.sync()).await {
        Ok(Err(e)) => tracing::warn!(error = %e, "syncing the send buffer on close failed"),
        Err(e) => tracing::warn!(error = %e, "syncing the send buffer on close failed"),
        Ok(Ok(())) => {}
    }
    inner.emit(Event::Closed);
}

/// One round over the server list, from `start`: the first server that
/// accepts, or whether one of them answered that it is in standby.
async fn connect_round(
    inner: &Inner,
    start: usize,
    ever_connected: bool,
) -> std::result::Result<(usize, Client), bool> {
    let config = &inner.config;
    let n = config.servers.len();
    let options = ConnectOptions {
        login: config.login.clone(),
        passcode: config.passcode.clone(),
        client_id: config.client_id.clone(),
        host: config.host.clone(),
        heart_beat: config.heart_beat,
        timeout: config.request_timeout,
    };
    let mut answers = Vec::with_capacity(n);
    let mut standby = false;
    for k in 0..n {
        let index = (start + k) % n;
        let server = &config.servers[index];
        let attempt = Client::connect(server.as_str(), options.clone());
        let result = match tokio::time::timeout(config.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout("CONNECTED")),
        };
        match result {
            Ok(client) => return Ok((index, client)),
            Err(Error::Server { message, .. }) if is_standby_refusal(&message) => {
                standby = true;
                answers.push(format!("{server}: {message}"));
                inner.emit(Event::Skipped {
                    server: server.clone(),
                    reason: message,
                });
            }
            Err(error) => {
                answers.push(format!("{server}: {error}"));
                if !ever_connected && is_fatal_refusal(&error) {
                    inner.first_failure.send_replace(Some(error.clone()));
                }
                inner.emit(Event::ConnectFailed {
                    server: server.clone(),
                    error,
                });
            }
        }
    }
    *lock(&inner.last_round) = answers;
    Err(standby)
}

/// Subscribes every registered consumer on a new connection. A consumer the
/// server refuses is closed with that error (and the connection, which the
/// ERROR ended, fails); any other failure fails the connection.
async fn resubscribe(inner: &Inner, link: &Link) -> Result<usize> {
    let consumers: Vec<_> = lock(&inner.consumers).values().cloned().collect();
    let mut count = 0;
    for consumer in consumers {
        match consumer.ensure_subscribed(link).await {
            Ok(true) => count += 1,
            Ok(false) => {}
            Err((error, refused)) => {
                if refused && !is_transient(&error) {
                    inner.unregister(consumer.key);
                    consumer.lose(error.clone());
                    inner.emit(Event::ConsumerLost {
                        destination: consumer.destination().to_owned(),
                        error: error.clone(),
                    });
                }
                return Err(error);
            }
        }
    }
    Ok(count)
}

/// Serves a connection: drains the send buffer whenever something is
/// appended, until the connection ends. Returns why it ended.
async fn serve(inner: &Inner, link: &Link) -> Error {
    loop {
        match drain(inner, link).await {
            Ok(0) => {}
            Ok(count) => inner.emit(Event::Replayed {
                server: link.server.clone(),
                count,
            }),
            Err(e) => return e,
        }
        tokio::select! {
            _ = link.client.closed() => return link.client.terminal_error(),
            _ = inner.outbox.appended.notified() => {}
            _ = inner.shutdown.cancelled() => return Error::Closed,
        }
    }
}

/// Replays the send buffer on `link`, a window of sends at a time, until
/// it is empty; then direct sends resume. Returns how many were delivered.
async fn drain(inner: &Inner, link: &Link) -> Result<usize> {
    let mut delivered = 0;
    loop {
        if inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        let batch = inner.outbox.peek(inner.config.replay_window);
        if batch.is_empty() {
            if inner.outbox.go_live() {
                return Ok(delivered);
            }
            continue;
        }
        let mut failure = None;
        let mut waiting = Vec::with_capacity(batch.len());
        for (local, record) in &batch {
            match link.client.start_request(send_frame(record)).await {
                Ok(pending) => waiting.push((*local, record.clone(), pending)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + inner.config.request_timeout;
        let mut done = Vec::with_capacity(waiting.len());
        for (local, record, pending) in waiting {
            let receipt = pending.receipt().to_owned();
            match pending.wait_until(deadline).await {
                Ok(_) => {
                    done.push(local);
                    delivered += 1;
                }
                Err(error) => {
                    if link.client.refused(&receipt) && !is_transient(&error) {
                        // The server will never take it: drop it rather
                        // than fail over forever.
                        done.push(local);
                        inner.emit(Event::SendRejected {
                            producer_id: record.producer_id.clone(),
                            sequence: record.sequence,
                            error: error.clone(),
                        });
                    }
                    failure = Some(error);
                    break;
                }
            }
        }
        let outbox = inner.outbox.clone();
        let completed = tokio::task::spawn_blocking(move || outbox.complete(&done))
            .await
            .map_err(|e| Error::Buffer(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = completed {
            tracing::error!(error = %e, "recording receipted sends in the buffer failed");
        }
        if let Some(e) = failure {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_refusals_are_recognised() {
        for state in ["PASSIVE", "WAITING", "PASSIVE_SYNC", "ACTIVATING"] {
            let m = format!(
                "server is {state}: it does not accept clients now; connect to the active server"
            );
            assert!(is_standby_refusal(&m), "{m}");
        }
        assert!(is_standby_refusal("server PASSIVE"));
        assert!(!is_standby_refusal("authentication failed: bad password"));
        assert!(!is_standby_refusal("client-id 'x' is already connected"));
        assert!(!is_standby_refusal("NONPASSIVE thing"));
    }

    #[test]
    fn transient_and_fatal_errors() {
        let server = |m: &str| Error::Server {
            message: m.into(),
            detail: String::new(),
        };
        assert!(is_transient(&server("server is shutting down")));
        assert!(is_transient(&server(
            "the server could not store the change: disk"
        )));
        assert!(is_transient(&Error::Closed));
        assert!(!is_transient(&server("no permission to send to /queue/x")));
        assert!(is_fatal_refusal(&server(
            "authentication failed: no such user"
        )));
        assert!(!is_fatal_refusal(&server(
            "client-id 'x' is already connected"
        )));
    }
}
