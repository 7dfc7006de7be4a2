//! The HA channel: one TCP connection between the two servers of a pair,
//! carrying the handshake, state broadcasts, heartbeats and (for the
//! replicated mode) opaque data; plus, on the same HA port, the bulk
//! replication connections of the replicated mode.
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
//! a newer link means the old one is half-open). These rules are about the
//! heartbeat link only; replication connections (below) are accepted by
//! both roles and never are, replace or disturb the link.
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
//! # State broadcasts
//!
//! [`Message::State`] carries the sender's present and previous state and,
//! in the replicated mode, its repository position (epoch, sequence) at the
//! time of the broadcast, so the peer can tell which side holds the newer
//! data. The last broadcast is remembered and sent again, position
//! included, first thing on every new link.
//!
//! # Replication connections
//!
//! The replicated mode moves the store over a second, bulk connection per
//! pair, dialed with [`dial_replication`] to the peer's HA port, so that
//! operators keep a single HA port per server. Its dialer's first message
//! is [`Message::Replicate`] instead of `Hello`; the acceptor, which sent
//! its `Hello` as for any connection, applies the same checks as for a link
//! and answers `Welcome` or `Refuse`, while the dialer checks the
//! acceptor's `Hello` the same way. A refused replication connection is
//! only closed and logged: it is not fatal, since the link's own handshake
//! stops a pair whose settings differ. Both sides then switch to
//! [`replication_codec`] (keeping any bytes already buffered) and exchange
//! raw binary frames whose content the replication layer defines; this
//! module never looks at them. The acceptor reports the connection as
//! [`LinkEvent::Replication`], the dialer gets it from [`dial_replication`],
//! both as a [`ReplicationStream`]. Replication connections are accepted by
//! either role, do not count as the link, and do not change its state.
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
//! Replication connections have no heartbeat of their own here: the
//! replication layer watches them, and the link's liveness decides the HA
//! state.

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
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec};
use tracing::{debug, error, info, warn};

use crate::config::{self, HaConfig};
use crate::error::{Error, Result};
use crate::state::{Role, State};

/// Version of the HA channel protocol; both servers must speak the same.
///
/// 2: [`Message::Replicate`] and the position in [`Message::State`].
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest message, in bytes of JSON.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Largest frame on a replication connection, in bytes.
pub const MAX_REPLICATION_FRAME: usize = 64 * 1024 * 1024;
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
        /// The sender's repository (epoch, sequence) at the time of the
        /// broadcast, if it has one to tell (replicated mode).
        #[serde(default)]
        position: Option<(u64, u64)>,
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
    /// First message of the dialer of a replication connection, instead of
    /// `Hello`; see the [module documentation](self).
    Replicate(Greeting),
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
            Message::Replicate(_) => "Replicate",
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

/// The frame codec of replication connections after their handshake:
/// `u32` big-endian length, at most [`MAX_REPLICATION_FRAME`] bytes.
pub fn replication_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_REPLICATION_FRAME)
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
#[allow(
    clippy::large_enum_variant,
    reason = "events are few and queued by value; a Box would only move the stream's cost to the allocator and the receiver's patterns"
)]
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
        /// The peer's repository (epoch, sequence) when it sent this, if
        /// it told one.
        position: Option<(u64, u64)>,
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
    /// The peer dialed a replication connection to us and its handshake
    /// succeeded; the stream is the receiver's to use. The link is not
    /// affected.
    Replication(ReplicationStream),
}

/// A replication connection after its handshake, on either side: raw
/// binary frames in [`replication_codec`] both ways.
#[derive(Debug)]
pub struct ReplicationStream {
    /// The connection, framed with [`replication_codec`].
    pub framed: Framed<TcpStream, LengthDelimitedCodec>,
    /// The peer's greeting.
    pub peer: Greeting,
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
    /// knows our present and previous state. Tells no repository position;
    /// see [`broadcast_state_at`](Self::broadcast_state_at).
    pub fn broadcast_state(&self, current: State, previous: State) {
        self.broadcast_state_at(current, previous, None);
    }

    /// [`broadcast_state`](Self::broadcast_state) with our repository
    /// (epoch, sequence) at this moment; the position is remembered and
    /// re-sent with the state.
    pub fn broadcast_state_at(
        &self,
        current: State,
        previous: State,
        position: Option<(u64, u64)>,
    ) {
        let _ = self.commands.send(Command::State(Broadcast {
            current,
            previous,
            position,
        }));
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
    State(Broadcast),
    Shutdown,
}

/// A state broadcast, as remembered for the next link.
#[derive(Debug, Clone, Copy)]
struct Broadcast {
    current: State,
    previous: State,
    position: Option<(u64, u64)>,
}

impl Broadcast {
    fn message(self) -> Message {
        Message::State {
            current: self.current,
            previous: self.previous,
            position: self.position,
        }
    }
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
    Replication(Box<ReplicationStream>),
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
    let mut remembered: Option<Broadcast> = None;
    let mut link: Option<Live> = None;
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::State(broadcast)) => {
                    remembered = Some(broadcast);
                    if let Some(live) = &link {
                        let _ = live.control.send(broadcast.message());
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
                    if let Some(broadcast) = remembered {
                        let _ = control.send(broadcast.message());
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
                Internal::Replication(stream) => {
                    if events.send(LinkEvent::Replication(*stream)).await.is_err() {
                        break;
                    }
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

/// Runs the handshake of an accepted connection: a link or a replication
/// connection, as the peer's first message says.
async fn inbound(
    local: Arc<Local>,
    stream: TcpStream,
    addr: SocketAddr,
    int_tx: mpsc::Sender<Internal>,
) {
    let _ = stream.set_nodelay(local.nodelay);
    let mut wire = Framed::new(stream, codec());
    match timeout(local.init, accept(&mut wire, &local)).await {
        Ok(Ok(Opened::Replication(peer))) => {
            // Either role accepts these; they are not the link.
            info!(%addr, peer = %peer.server, role = %peer.role, "HA replication connection accepted");
            let stream = ReplicationStream {
                framed: into_replication(wire),
                peer,
            };
            let _ = int_tx.send(Internal::Replication(Box::new(stream))).await;
        }
        Ok(Err(Handshake::Declined { peer, reason })) => {
            error!(%addr, %peer, %reason, "refusing a replication connection from the HA peer");
            linger(&mut wire).await;
        }
        Ok(Ok(Opened::Link(peer))) => {
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
            Ok(Err(Handshake::Drop(reason) | Handshake::Declined { reason, .. })) => {
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
    /// A replication connection we refused (and told so): drop the
    /// socket, nothing else.
    Declined {
        /// The dialer's server name.
        peer: String,
        /// Why.
        reason: String,
    },
}

/// What an accepted connection turned out to be.
enum Opened {
    /// The heartbeat link, with the peer's greeting.
    Link(Greeting),
    /// A replication connection, with the dialer's greeting.
    Replication(Greeting),
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

/// The dialer's side of the link handshake.
async fn handshake(wire: &mut Wire, local: &Local) -> Result<Greeting, Handshake> {
    match hello(wire, local).await? {
        Message::Hello(theirs) => link_handshake(wire, local, theirs).await,
        other => Err(Handshake::Drop(format!(
            "expected Hello, got {}",
            other.name()
        ))),
    }
}

/// The acceptor's side: a link handshake, or a replication one if the
/// peer opens with `Replicate`.
async fn accept(wire: &mut Wire, local: &Local) -> Result<Opened, Handshake> {
    match hello(wire, local).await? {
        Message::Hello(theirs) => link_handshake(wire, local, theirs).await.map(Opened::Link),
        Message::Replicate(theirs) => {
            if let Some(refusal) = verdict(local, &theirs) {
                let refuse = Message::Refuse {
                    reason: refusal.reason.clone(),
                    mismatched: refusal.mismatched,
                };
                let _ = send(wire, &refuse).await;
                return Err(Handshake::Declined {
                    peer: theirs.server,
                    reason: refusal.reason,
                });
            }
            send(wire, &Message::Welcome(local.greeting.clone()))
                .await
                .map_err(|e| Handshake::Drop(e.to_string()))?;
            Ok(Opened::Replication(theirs))
        }
        other => Err(Handshake::Drop(format!(
            "expected Hello or Replicate, got {}",
            other.name()
        ))),
    }
}

/// Sends our `Hello` and returns the peer's first message.
async fn hello(wire: &mut Wire, local: &Local) -> Result<Message, Handshake> {
    send(wire, &Message::Hello(local.greeting.clone()))
        .await
        .map_err(|e| Handshake::Drop(e.to_string()))?;
    receive(wire).await.map_err(Handshake::Drop)
}

/// The rest of a link handshake once the peer's `Hello` is in.
async fn link_handshake(
    wire: &mut Wire,
    local: &Local,
    theirs: Greeting,
) -> Result<Greeting, Handshake> {
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
    judge(&local.greeting, &local.must_match, theirs)
}

/// Why a server greeting with `ours` and sharing `must_match` refuses
/// `theirs`, if it does.
fn judge(
    ours: &Greeting,
    must_match: &[(&'static str, String)],
    theirs: &Greeting,
) -> Option<Refusal> {
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
    let keys = config::mismatched(must_match, &theirs.settings);
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

/// Dials a replication connection to the peer's HA port
/// (`backup_ha_ip_address:backup_ha_port`) and runs its handshake (see the
/// [module documentation](self)): connecting must succeed within
/// `socket_creation_timeout`, the handshake within
/// `socket_initialization_timeout`. A refusal by the peer is
/// [`Error::Mismatch`] (differing settings) or [`Error::Config`]; a peer
/// `Hello` this server cannot accept gives the error the link's handshake
/// would. Every error but [`Error::Mismatch`], whose text is the seed's,
/// names the target address.
pub async fn dial_replication(config: &HaConfig, server_name: &str) -> Result<ReplicationStream> {
    let host = config.backup_ha_ip_address.as_str();
    let port = config.backup_ha_port;
    let target = format!("{host}:{port}");
    let creation = Duration::from_millis(config.socket_creation_timeout.max(1));
    let init = Duration::from_millis(config.socket_initialization_timeout.max(1));
    let stream = match timeout(creation, TcpStream::connect((host, port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(naming(&target, Error::Io(e))),
        Err(_) => {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("not connected within {} ms", creation.as_millis()),
            );
            return Err(naming(&target, Error::Io(e)));
        }
    };
    let _ = stream.set_nodelay(!config.nagle_algo);
    let ours = Greeting::new(config, server_name.to_owned());
    let mut wire = Framed::new(stream, codec());
    let peer = match timeout(init, replicate(&mut wire, &ours, &config.must_match())).await {
        Ok(Ok(peer)) => peer,
        Ok(Err(e)) => return Err(naming(&target, e)),
        Err(_) => {
            let e = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the replication handshake did not complete within {} ms",
                    init.as_millis()
                ),
            );
            return Err(naming(&target, Error::Io(e)));
        }
    };
    info!(%target, peer = %peer.server, role = %peer.role, "HA replication connection established");
    Ok(ReplicationStream {
        framed: into_replication(wire),
        peer,
    })
}

/// The dialer's side of a replication handshake.
async fn replicate(
    wire: &mut Wire,
    ours: &Greeting,
    must_match: &[(&'static str, String)],
) -> Result<Greeting> {
    send(wire, &Message::Replicate(ours.clone())).await?;
    let theirs = match receive_message(wire).await? {
        Message::Hello(g) => g,
        other => {
            return Err(Error::Protocol(format!(
                "expected Hello, got {}",
                other.name()
            )))
        }
    };
    if let Some(refusal) = judge(ours, must_match, &theirs) {
        error!(peer = %theirs.server, reason = %refusal.reason, "refusing the HA peer's replication connection");
        return Err(refusal.error);
    }
    match receive_message(wire).await? {
        Message::Welcome(_) => Ok(theirs),
        Message::Refuse { reason, mismatched } => {
            error!(peer = %theirs.server, %reason, "the HA peer refused the replication connection");
            Err(if mismatched.is_empty() {
                Error::Config(format!(
                    "the HA peer {} refused the replication connection: {reason}",
                    theirs.server
                ))
            } else {
                Error::Mismatch(mismatched)
            })
        }
        other => Err(Error::Protocol(format!(
            "expected Welcome, got {}",
            other.name()
        ))),
    }
}

async fn receive_message(wire: &mut Wire) -> Result<Message> {
    match wire.next().await {
        None => Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by the peer",
        ))),
        Some(Err(e)) => Err(Error::Io(e)),
        Some(Ok(frame)) => decode(&frame),
    }
}

/// `e` with the replication target in its text; [`Error::Mismatch`] keeps
/// the seed's wording.
fn naming(target: &str, e: Error) -> Error {
    let at = format!("replication connection to the HA peer at {target}");
    match e {
        Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), format!("{at}: {e}"))),
        Error::Protocol(m) => Error::Protocol(format!("{at}: {m}")),
        Error::Config(m) => Error::Config(format!("{at}: {m}")),
        other => other,
    }
}

/// Re-frames a connection after its handshake with [`replication_codec`].
/// The bytes already read (the peer may send its first frames right behind
/// its last handshake message) and not yet written are kept; the old codec
/// is between frames, as the handshake only stops after a whole message.
fn into_replication(wire: Wire) -> Framed<TcpStream, LengthDelimitedCodec> {
    let old = wire.into_parts();
    let mut parts = FramedParts::new::<Bytes>(old.io, replication_codec());
    parts.read_buf = old.read_buf;
    parts.write_buf = old.write_buf;
    Framed::from_parts(parts)
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
            // Biased, reads first: after this process was descheduled for a
            // while, the peer's pings may be waiting in the socket while the
            // deadline has passed too. They must count; an unbiased select
            // would pick the deadline half the time and call a live peer
            // dead.
            biased;
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
                    Ok(Message::State { current, previous, position }) => {
                        if events.send(LinkEvent::PeerState { current, previous, position }).await.is_err() {
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
            replication: Default::default(),
            replication_log_batches: 1000,
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
                position: None,
            },
            Message::State {
                current: State::Passive,
                previous: State::Dead,
                position: Some((3, u64::MAX)),
            },
            Message::Replicate(Greeting::new(&config(Role::Secondary), "s".into())),
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
    fn a_state_without_position_still_decodes() {
        let m = decode(br#"{"type":"State","current":"ACTIVE","previous":"ACTIVATING"}"#)
            .expect("decode");
        assert_eq!(
            m,
            Message::State {
                current: State::Active,
                previous: State::Activating,
                position: None,
            }
        );
        let json = encode(&Message::State {
            current: State::Active,
            previous: State::Passive,
            position: Some((2, 17)),
        })
        .expect("encode");
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["position"], serde_json::json!([2, 17]));
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
