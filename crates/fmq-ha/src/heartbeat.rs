//! The HA channel: one TCP connection between the two servers of a pair,
//! carrying the handshake, state broadcasts, heartbeats and (for the
//! replicated mode) opaque data.
//!
//! # Framing
//!
//! Each message is a big-endian `u32` length followed by that many bytes of
//! JSON ([`Message`]); a message may not exceed [`MAX_MESSAGE`] bytes.
//!
//! # Which connection is the link
//!
//! Both servers listen on their HA port (`bind_address:port`), but only the
//! **primary dials** the secondary (`backup_ha_ip_address:backup_ha_port`);
//! the **secondary only accepts**. So there is never more than one link
//! and no tie to break. The primary's listener exists to catch a
//! misconfigured pair: a second primary dialing it is refused (fatally, on
//! both sides). A newer accepted link replaces an older one on the
//! secondary (the primary only redials once its previous link is gone, so
//! a newer link means the old one is half-open).
//!
//! # Handshake
//!
//! Both sides send [`Message::Hello`] at once and check the peer's: the
//! protocol version, the cluster name, the roles (one primary, one
//! secondary) and the settings both must share
//! ([`HaConfig::must_match`]). A side that finds a difference sends
//! [`Message::Refuse`] and closes; otherwise it sends [`Message::Welcome`]
//! and the link is up once the peer's `Welcome` arrives. The whole
//! exchange must finish within `socket_initialization_timeout`, or the
//! socket is dropped (and, for the primary, redialed). A refused handshake
//! is fatal: [`LinkEvent::Refused`] is reported once and the channel stops;
//! the runtime is expected to stop the server, as a pair whose settings
//! differ cannot work. Garbage, undecodable frames or a peer that closes
//! early are not refusals: the socket is dropped and nothing else changes.
//!
//! # Liveness
//!
//! Each side sends [`Message::Ping`] every `ping_interval` (answered with
//! [`Message::Pong`]). The link is down when the socket fails or closes,
//! or when nothing at all arrives for [`MISSED_PINGS`] x `ping_interval`.
//! Three intervals tolerate two late or lost heartbeats (a scheduling
//! stall, a TCP retransmission, a slow disk sync on the peer) without
//! declaring a live peer dead, while still bounding detection of a silent
//! peer to a few intervals; a closed socket is reported at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant, MissedTickBehavior};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, error, info, warn};

use crate::config::{self, HaConfig};
use crate::error::{Error, Result};
use crate::state::{Role, State};

/// Version of the HA channel protocol; both servers must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message, in bytes of JSON.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// The link is down after this many ping intervals without any message.
pub const MISSED_PINGS: u32 = 3;
/// Shortest redial delay of the primary.
pub const MIN_RETRY: Duration = Duration::from_millis(100);
/// Most inbound connections in handshake at once; more are closed at once.
const MAX_HANDSHAKES: usize = 16;
/// How long a refusing side waits for the peer to read its `Refuse`.
const LINGER: Duration = Duration::from_millis(500);
/// Capacity of the event queue.
const EVENT_QUEUE: usize = 256;
/// Capacity of the outbound data queue of a link.
const DATA_QUEUE: usize = 1024;

/// What each server says about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// The pair's name; both must use the same.
    pub cluster_name: String,
    /// The sender's role.
    pub role: Role,
    /// The sender's server name (for logs).
    pub server: String,
    /// The sender's [`HaConfig::must_match`] settings.
    pub settings: Vec<(String, String)>,
}

impl Greeting {
    /// The greeting of a server with `config` named `server`.
    pub fn new(config: &HaConfig, server: String) -> Self {
        Greeting {
            protocol_version: PROTOCOL_VERSION,
            cluster_name: config.cluster_name.clone(),
            role: config.role,
            server,
            settings: config
                .must_match()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// A message on the HA channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Message {
    /// First message of each side.
    Hello(Greeting),
    /// The sender accepts the peer's `Hello`.
    Welcome(Greeting),
    /// The sender refuses the peer's `Hello` and closes.
    Refuse {
        /// Why, for the log.
        reason: String,
        /// The [`HaConfig::must_match`] keys whose values differ.
        mismatched: Vec<String>,
    },
    /// The sender's present and previous state.
    State {
        /// Present state.
        current: State,
        /// State before it.
        previous: State,
    },
    /// Heartbeat.
    Ping {
        /// Sequence number, echoed in the `Pong`.
        seq: u64,
    },
    /// Heartbeat answer.
    Pong {
        /// The `Ping`'s sequence number.
        seq: u64,
    },
    /// Opaque traffic for a higher layer (replication).
    Data {
        /// What the payload is, for the receiver's dispatch.
        kind: String,
        /// The payload.
        payload: Vec<u8>,
    },
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refuse { .. } => "Refuse",
            Message::State { .. } => "State",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Data { .. } => "Data",
        }
    }
}

/// The frame codec of the channel: `u32` big-endian length, at most
/// [`MAX_MESSAGE`] bytes.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_MESSAGE)
        .new_codec()
}

/// A message as a frame body.
pub fn encode(message: &Message) -> Result<Bytes> {
    let body = serde_json::to_vec(message)
        .map_err(|e| Error::Protocol(format!("cannot encode {}: {e}", message.name())))?;
    if body.len() > MAX_MESSAGE {
        return Err(Error::Protocol(format!(
            "{} message of {} bytes exceeds the {MAX_MESSAGE}-byte limit",
            message.name(),
            body.len()
        )));
    }
    Ok(Bytes::from(body))
}

/// A frame body as a message.
pub fn decode(frame: &[u8]) -> Result<Message> {
    serde_json::from_slice(frame).map_err(|e| Error::Protocol(format!("undecodable message: {e}")))
}

/// What the channel reports to the HA manager.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A link to the peer completed its handshake.
    Up {
        /// The peer's server name.
        peer: String,
    },
    /// The link is gone (closed, failed, silent or replaced).
    Down {
        /// Why, for the log.
        reason: String,
    },
    /// The peer's state, sent after each handshake and on each change.
    PeerState {
        /// The peer's present state.
        current: State,
        /// The peer's state before it.
        previous: State,
    },
    /// The handshake was refused by either side: fatal, the channel has
    /// stopped and the server must stop. [`Error::Mismatch`] lists the
    /// differing settings; a role, cluster or version conflict is
    /// [`Error::Config`] or [`Error::Protocol`].
    Refused(Error),
    /// Opaque traffic from the peer.
    Data {
        /// See [`Message::Data`].
        kind: String,
        /// See [`Message::Data`].
        payload: Vec<u8>,
    },
}

/// The HA channel; see the [module documentation](self).
#[derive(Debug)]
pub struct Channel;

impl Channel {
    /// Starts the channel on the current Tokio runtime: the listener on
    /// `bind_address:port` and, on the primary, the dialer. Events arrive
    /// on the receiver, which must be drained (a full queue stalls the
    /// link); dropping it stops the channel.
    pub fn start(
        config: &HaConfig,
        server_name: String,
    ) -> (ChannelHandle, mpsc::Receiver<LinkEvent>) {
        let ping = config.ping().max(Duration::from_millis(1));
        let local = Arc::new(Local {
            greeting: Greeting::new(config, server_name),
            must_match: config.must_match(),
            role: config.role,
            bind: format!("{}:{}", config.bind_address, config.port),
            peer_host: config.backup_ha_ip_address.clone(),
            peer_port: config.backup_ha_port,
            creation: Duration::from_millis(config.socket_creation_timeout.max(1)),
            init: Duration::from_millis(config.socket_initialization_timeout.max(1)),
            ping,
            dead_after: ping * MISSED_PINGS,
            retry: (ping / 2).max(MIN_RETRY),
            nodelay: !config.nagle_algo,
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
        let (data_tx, data_rx) = watch::channel(None);
        let task = tokio::spawn(actor(local, cmd_rx, event_tx, data_tx));
        (
            ChannelHandle {
                commands: cmd_tx,
                data: data_rx,
                task,
            },
            event_rx,
        )
    }
}

/// Control of a running [`Channel`]. Dropping it stops the channel.
#[derive(Debug)]
pub struct ChannelHandle {
    commands: mpsc::UnboundedSender<Command>,
    data: watch::Receiver<Option<mpsc::Sender<Bytes>>>,
    task: JoinHandle<()>,
}

impl ChannelHandle {
    /// Sends our state on the live link, if any, and remembers it: it is
    /// sent again first thing after every new handshake, so the peer always
    /// knows our present and previous state.
    pub fn broadcast_state(&self, current: State, previous: State) {
        let _ = self.commands.send(Command::State { current, previous });
    }

    /// Queues opaque data on the live link. Fails when no link is up or
    /// the message is too large; waits while the link's queue is full.
    /// Data and state broadcasts travel on separate queues: their relative
    /// order is not kept.
    pub async fn send_data(&self, kind: impl Into<String>, payload: Vec<u8>) -> Result<()> {
        let frame = encode(&Message::Data {
            kind: kind.into(),
            payload,
        })?;
        let link = self.data.borrow().clone();
        match link {
            Some(tx) => tx.send(frame).await.map_err(|_| not_connected()),
            None => Err(not_connected()),
        }
    }

    /// Whether a link is up now.
    pub fn is_up(&self) -> bool {
        self.data.borrow().is_some()
    }

    /// Closes the link and the listener and waits for the channel to stop.
    pub async fn shutdown(mut self) {
        let _ = self.commands.send(Command::Shutdown);
        let _ = (&mut self.task).await;
    }
}

impl Drop for ChannelHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn not_connected() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the HA link to the peer is down",
    ))
}

#[derive(Debug)]
enum Command {
    State { current: State, previous: State },
    Shutdown,
}

type Wire = Framed<TcpStream, LengthDelimitedCodec>;

/// What the channel tasks share.
#[derive(Debug)]
struct Local {
    greeting: Greeting,
    must_match: Vec<(&'static str, String)>,
    role: Role,
    bind: String,
    peer_host: String,
    peer_port: u16,
    creation: Duration,
    init: Duration,
    ping: Duration,
    dead_after: Duration,
    retry: Duration,
    nodelay: bool,
}

/// A connection that completed its handshake.
#[derive(Debug)]
struct Established {
    wire: Wire,
    peer: Greeting,
    addr: Option<SocketAddr>,
    /// Dropped when the link ends: wakes the dialer.
    done: Option<oneshot::Sender<()>>,
}

#[derive(Debug)]
enum Internal {
    Link(Box<Established>),
    Fatal(Error),
    Down { id: u64, reason: String },
}

struct Live {
    id: u64,
    control: mpsc::UnboundedSender<Message>,
    abort: AbortHandle,
}

async fn actor(
    local: Arc<Local>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<LinkEvent>,
    data_slot: watch::Sender<Option<mpsc::Sender<Bytes>>>,
) {
    let (int_tx, mut int_rx) = mpsc::channel::<Internal>(16);
    let mut children: JoinSet<()> = JoinSet::new();
    children.spawn(listen(local.clone(), int_tx.clone()));
    if local.role == Role::Primary {
        children.spawn(dial(local.clone(), int_tx.clone()));
    }
    let mut remembered: Option<(State, State)> = None;
    let mut link: Option<Live> = None;
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::State { current, previous }) => {
                    remembered = Some((current, previous));
                    if let Some(live) = &link {
                        let _ = live.control.send(Message::State { current, previous });
                    }
                }
            },
            Some(internal) = int_rx.recv() => match internal {
                Internal::Link(established) => {
                    let established = *established;
                    if let Some(old) = link.take() {
                        old.abort.abort();
                        data_slot.send_replace(None);
                        let reason = "replaced by a newer connection from the peer".to_owned();
                        warn!(%reason, "HA link down");
                        if events.send(LinkEvent::Down { reason }).await.is_err() {
                            break;
                        }
                    }
                    let peer = established.peer.server.clone();
                    info!(
                        peer = %peer,
                        role = %established.peer.role,
                        addr = ?established.addr,
                        "HA link up"
                    );
                    if events.send(LinkEvent::Up { peer }).await.is_err() {
                        break;
                    }
                    let (control, control_rx) = mpsc::unbounded_channel();
                    if let Some((current, previous)) = remembered {
                        let _ = control.send(Message::State { current, previous });
                    }
                    let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
                    next_id += 1;
                    let abort = children.spawn(run_link(
                        next_id,
                        local.clone(),
                        established,
                        control_rx,
                        data_rx,
                        events.clone(),
                        int_tx.clone(),
                    ));
                    data_slot.send_replace(Some(data_tx));
                    link = Some(Live { id: next_id, control, abort });
                }
                Internal::Down { id, reason } => {
                    if link.as_ref().is_some_and(|l| l.id == id) {
                        link = None;
                        data_slot.send_replace(None);
                        warn!(%reason, "HA link down");
                        if events.send(LinkEvent::Down { reason }).await.is_err() {
                            break;
                        }
                    }
                }
                Internal::Fatal(e) => {
                    error!(error = %e, "HA handshake refused; the HA channel stops");
                    if let Some(old) = link.take() {
                        old.abort.abort();
                        data_slot.send_replace(None);
                    }
                    let _ = events.send(LinkEvent::Refused(e)).await;
                    break;
                }
            },
            Some(joined) = children.join_next(), if !children.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        error!(error = %e, "HA channel task panicked");
                    }
                }
            }
        }
    }
    data_slot.send_replace(None);
    children.shutdown().await;
    debug!("HA channel stopped");
}

/// Accepts inbound connections and hands them to [`inbound`].
async fn listen(local: Arc<Local>, int_tx: mpsc::Sender<Internal>) {
    let listener = loop {
        match TcpListener::bind(&local.bind).await {
            Ok(l) => break l,
            Err(e) => {
                error!(addr = %local.bind, error = %e, "cannot listen on the HA port; retrying");
                sleep(local.retry.max(Duration::from_secs(1))).await;
            }
        }
    };
    info!(addr = %local.bind, role = %local.role, "HA channel listening");
    let mut handshakes: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    if handshakes.len() >= MAX_HANDSHAKES {
                        warn!(%addr, "too many HA connections in handshake; closing this one");
                        continue;
                    }
                    handshakes.spawn(inbound(local.clone(), stream, addr, int_tx.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "HA port: accept failed");
                    sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Runs the handshake of an accepted connection.
async fn inbound(
    local: Arc<Local>,
    stream: TcpStream,
    addr: SocketAddr,
    int_tx: mpsc::Sender<Internal>,
) {
    let _ = stream.set_nodelay(local.nodelay);
    let mut wire = Framed::new(stream, codec());
    match timeout(local.init, handshake(&mut wire, &local)).await {
        Ok(Ok(peer)) => {
            if local.role == Role::Primary {
                // Only the primary's own connection is a link (module docs).
                warn!(%addr, peer = %peer.server, "ignoring an HA connection dialed by the secondary");
                return;
            }
            let established = Established {
                wire,
                peer,
                addr: Some(addr),
                done: None,
            };
            let _ = int_tx.send(Internal::Link(Box::new(established))).await;
        }
        Ok(Err(Handshake::Fatal(e))) => {
            linger(&mut wire).await;
            let _ = int_tx.send(Internal::Fatal(e)).await;
        }
        Ok(Err(Handshake::Drop(reason))) => {
            warn!(%addr, %reason, "HA connection dropped during the handshake");
        }
        Err(_) => warn!(
            %addr,
            timeout_ms = local.init.as_millis() as u64,
            "HA connection did not complete the handshake in time; dropped"
        ),
    }
}

/// The primary's dialer: keeps one link to the secondary.
async fn dial(local: Arc<Local>, int_tx: mpsc::Sender<Internal>) {
    let target = format!("{}:{}", local.peer_host, local.peer_port);
    let mut at_once = true;
    loop {
        if !at_once {
            sleep(local.retry).await;
        }
        at_once = false;
        info!("Trying to establish connection with {target} ...");
        let stream = match timeout(
            local.creation,
            TcpStream::connect((local.peer_host.as_str(), local.peer_port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(%target, error = %e, "HA connect failed");
                continue;
            }
            Err(_) => {
                debug!(%target, timeout_ms = local.creation.as_millis() as u64, "HA connect timed out");
                continue;
            }
        };
        let addr = stream.peer_addr().ok();
        let _ = stream.set_nodelay(local.nodelay);
        let mut wire = Framed::new(stream, codec());
        match timeout(local.init, handshake(&mut wire, &local)).await {
            Ok(Ok(peer)) => {
                let (done_tx, done_rx) = oneshot::channel();
                let established = Established {
                    wire,
                    peer,
                    addr,
                    done: Some(done_tx),
                };
                if int_tx
                    .send(Internal::Link(Box::new(established)))
                    .await
                    .is_err()
                {
                    return;
                }
                // Redial only once this link has ended.
                let _ = done_rx.await;
                at_once = true;
            }
            Ok(Err(Handshake::Fatal(e))) => {
                linger(&mut wire).await;
                let _ = int_tx.send(Internal::Fatal(e)).await;
                return;
            }
            Ok(Err(Handshake::Drop(reason))) => {
                warn!(%target, %reason, "HA connection dropped during the handshake");
            }
            Err(_) => warn!(
                %target,
                timeout_ms = local.init.as_millis() as u64,
                "HA peer did not complete the handshake in time; dropped"
            ),
        }
    }
}

enum Handshake {
    /// Refused by either side: the server must stop.
    Fatal(Error),
    /// Not a usable peer (garbage, closed, I/O error): drop the socket.
    Drop(String),
}

async fn send(wire: &mut Wire, message: &Message) -> Result<()> {
    let frame = encode(message)?;
    wire.send(frame).await?;
    Ok(())
}

async fn receive(wire: &mut Wire) -> Result<Message, String> {
    match wire.next().await {
        None => Err("connection closed by the peer".into()),
        Some(Err(e)) => Err(format!("read failed: {e}")),
        Some(Ok(frame)) => decode(&frame).map_err(|e| e.to_string()),
    }
}

async fn handshake(wire: &mut Wire, local: &Local) -> Result<Greeting, Handshake> {
    send(wire, &Message::Hello(local.greeting.clone()))
        .await
        .map_err(|e| Handshake::Drop(e.to_string()))?;
    let theirs = match receive(wire).await.map_err(Handshake::Drop)? {
        Message::Hello(g) => g,
        other => {
            return Err(Handshake::Drop(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    if let Some(refusal) = verdict(local, &theirs) {
        let refuse = Message::Refuse {
            reason: refusal.reason.clone(),
            mismatched: refusal.mismatched.clone(),
        };
        let _ = send(wire, &refuse).await;
        error!(peer = %theirs.server, reason = %refusal.reason, "refusing the HA peer");
        return Err(Handshake::Fatal(refusal.error));
    }
    send(wire, &Message::Welcome(local.greeting.clone()))
        .await
        .map_err(|e| Handshake::Drop(e.to_string()))?;
    match receive(wire).await.map_err(Handshake::Drop)? {
        Message::Welcome(_) => Ok(theirs),
        Message::Refuse { reason, mismatched } => {
            error!(peer = %theirs.server, %reason, "the HA peer refused this server");
            Err(Handshake::Fatal(if mismatched.is_empty() {
                Error::Config(format!(
                    "the HA peer {} refused this server: {reason}",
                    theirs.server
                ))
            } else {
                Error::Mismatch(mismatched)
            }))
        }
        other => Err(Handshake::Drop(format!(
            "expected Welcome, got {}",
            other.name()
        ))),
    }
}

/// Half-closes and reads until the peer closes (bounded by [`LINGER`]), so
/// that a `Refuse` just sent is not lost to a reset.
async fn linger(wire: &mut Wire) {
    let _ = SinkExt::<Bytes>::close(wire).await;
    let _ = timeout(LINGER, async {
        while let Some(Ok(_)) = wire.next().await {}
    })
    .await;
}

#[derive(Debug)]
struct Refusal {
    reason: String,
    mismatched: Vec<String>,
    error: Error,
}

/// Why we refuse `theirs`, if we do.
fn verdict(local: &Local, theirs: &Greeting) -> Option<Refusal> {
    let ours = &local.greeting;
    let plain = |reason: String, error: Error| Refusal {
        reason,
        mismatched: Vec::new(),
        error,
    };
    if theirs.protocol_version != ours.protocol_version {
        let reason = format!(
            "HA protocol version mismatch: this server speaks {}, the peer {}",
            ours.protocol_version, theirs.protocol_version
        );
        return Some(plain(reason.clone(), Error::Protocol(reason)));
    }
    if theirs.cluster_name != ours.cluster_name {
        let reason = format!(
            "cluster name mismatch: this server is in {:?}, the peer in {:?}",
            ours.cluster_name, theirs.cluster_name
        );
        return Some(plain(reason.clone(), Error::Config(reason)));
    }
    if theirs.role == ours.role {
        let reason = format!("both servers are configured as {}", ours.role);
        return Some(plain(reason.clone(), Error::Config(reason)));
    }
    let keys = config::mismatched(&local.must_match, &theirs.settings);
    if !keys.is_empty() {
        let error = Error::Mismatch(keys.clone());
        return Some(Refusal {
            reason: error.to_string(),
            mismatched: keys,
            error,
        });
    }
    None
}

/// Runs an established link until it fails; reports the reason to the
/// actor.
async fn run_link(
    id: u64,
    local: Arc<Local>,
    established: Established,
    mut control: mpsc::UnboundedReceiver<Message>,
    mut data: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<LinkEvent>,
    int_tx: mpsc::Sender<Internal>,
) {
    let Established { mut wire, done, .. } = established;
    let reason = link_loop(&local, &mut wire, &mut control, &mut data, &events).await;
    drop(wire);
    let _ = int_tx.send(Internal::Down { id, reason }).await;
    drop(done);
}

async fn link_loop(
    local: &Local,
    wire: &mut Wire,
    control: &mut mpsc::UnboundedReceiver<Message>,
    data: &mut mpsc::Receiver<Bytes>,
    events: &mpsc::Sender<LinkEvent>,
) -> String {
    let dead_after = local.dead_after;
    let mut ticker = tokio::time::interval_at(Instant::now() + local.ping, local.ping);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut deadline = Instant::now() + dead_after;
    loop {
        let outgoing = tokio::select! {
            frame = wire.next() => {
                let frame = match frame {
                    None => return "connection closed by the peer".into(),
                    Some(Err(e)) => return format!("read failed: {e}"),
                    Some(Ok(frame)) => frame,
                };
                deadline = Instant::now() + dead_after;
                match decode(&frame) {
                    Ok(Message::Ping { seq }) => Some(Message::Pong { seq }),
                    Ok(Message::Pong { .. }) => None,
                    Ok(Message::State { current, previous }) => {
                        if events.send(LinkEvent::PeerState { current, previous }).await.is_err() {
                            return "the HA channel is stopping".into();
                        }
                        None
                    }
                    Ok(Message::Data { kind, payload }) => {
                        if events.send(LinkEvent::Data { kind, payload }).await.is_err() {
                            return "the HA channel is stopping".into();
                        }
                        None
                    }
                    Ok(other) => return format!("protocol error: unexpected {} on an established link", other.name()),
                    Err(e) => return e.to_string(),
                }
            }
            Some(message) = control.recv() => Some(message),
            Some(frame) = data.recv() => {
                if let Err(e) = timeout(dead_after, wire.send(frame)).await.unwrap_or_else(|_| Err(stalled())) {
                    return format!("write failed: {e}");
                }
                None
            }
            _ = ticker.tick() => {
                seq += 1;
                Some(Message::Ping { seq })
            }
            _ = sleep_until(deadline) => {
                return format!("no message from the peer for {} ms", dead_after.as_millis());
            }
        };
        if let Some(message) = outgoing {
            let frame = match encode(&message) {
                Ok(f) => f,
                Err(e) => return e.to_string(),
            };
            if let Err(e) = timeout(dead_after, wire.send(frame))
                .await
                .unwrap_or_else(|_| Err(stalled()))
            {
                return format!("write failed: {e}");
            }
        }
    }
}

fn stalled() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer stopped reading")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn config(role: Role) -> HaConfig {
        HaConfig {
            mode: Mode::Shared,
            role,
            cluster_name: "FerroMQ".into(),
            bind_address: "127.0.0.1".into(),
            port: 2000,
            backup_ha_ip_address: "127.0.0.1".into(),
            backup_ha_port: 3000,
            backup_server_ip: "127.0.0.1".into(),
            backup_server_port: 1956,
            backup_rmi_server_port: 1859,
            ping_interval: 30_000,
            lock_file: Some("/tmp/lock.dat".into()),
            gateway_server_ip_address: "127.0.0.1".into(),
            gateway_server_port: 7,
            active_lock_reacquisition_interval: 30_000,
            passive_lock_reacquisition_interval: 60_001,
            socket_creation_timeout: 10_000,
            socket_initialization_timeout: 60_000,
            nagle_algo: false,
            max_wait_timeout: 30_000,
        }
    }

    fn local(c: &HaConfig) -> Local {
        Local {
            greeting: Greeting::new(c, "me".into()),
            must_match: c.must_match(),
            role: c.role,
            bind: String::new(),
            peer_host: String::new(),
            peer_port: 0,
            creation: Duration::from_secs(1),
            init: Duration::from_secs(1),
            ping: Duration::from_secs(1),
            dead_after: Duration::from_secs(3),
            retry: Duration::from_secs(1),
            nodelay: true,
        }
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let hello = Message::Hello(Greeting::new(&config(Role::Primary), "p".into()));
        for m in [
            hello,
            Message::Refuse {
                reason: "r".into(),
                mismatched: vec!["PingInterval".into()],
            },
            Message::State {
                current: State::Active,
                previous: State::Activating,
            },
            Message::Ping { seq: 7 },
            Message::Data {
                kind: "batch".into(),
                payload: vec![0, 255],
            },
        ] {
            let frame = encode(&m).expect("encode");
            assert_eq!(decode(&frame).expect("decode"), m);
        }
        let json = String::from_utf8(encode(&Message::Pong { seq: 3 }).expect("encode").to_vec())
            .expect("utf8");
        assert_eq!(json, r#"{"type":"Pong","seq":3}"#);
        assert!(decode(b"{\"type\":\"Nope\"}").is_err());
    }

    #[test]
    fn oversized_data_is_refused_before_the_wire() {
        let m = Message::Data {
            kind: "k".into(),
            payload: vec![200; MAX_MESSAGE / 2],
        };
        assert!(encode(&m).is_err());
    }

    #[test]
    fn verdicts() {
        let p = config(Role::Primary);
        let s = config(Role::Secondary);
        let ours = local(&p);
        assert!(verdict(&ours, &Greeting::new(&s, "s".into())).is_none());

        let r = verdict(&ours, &Greeting::new(&p, "p2".into())).expect("refused");
        assert_eq!(r.reason, "both servers are configured as Primary");
        let r = verdict(&local(&s), &Greeting::new(&s, "s2".into())).expect("refused");
        assert_eq!(r.reason, "both servers are configured as Secondary");

        let other = HaConfig {
            cluster_name: "Other".into(),
            ..s.clone()
        };
        let r = verdict(&ours, &Greeting::new(&other, "s".into())).expect("refused");
        assert!(r.reason.contains("cluster name"), "{}", r.reason);

        let mut g = Greeting::new(&s, "s".into());
        g.protocol_version = 99;
        let r = verdict(&ours, &g).expect("refused");
        assert!(matches!(r.error, Error::Protocol(_)));

        let slow = HaConfig {
            ping_interval: 1000,
            gateway_server_port: 9,
            ..s
        };
        let r = verdict(&ours, &Greeting::new(&slow, "s".into())).expect("refused");
        assert_eq!(r.mismatched, ["PingInterval", "GatewayServerPort"]);
        assert!(matches!(r.error, Error::Mismatch(ref k) if k == &r.mismatched));
    }
}
