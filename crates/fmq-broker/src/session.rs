//! One client connection: the STOMP handshake, frame validation, security
//! checks, transactions, receipts and heart-beats.
//!
//! A session runs three parts: this reader loop, a writer task that owns the
//! socket's write half (and sends heart-beats), and a receipt task that
//! answers RECEIPTs strictly in request order, each only once the engine's
//! store write for it is durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fmq_proto::{
    negotiate_heart_beat, negotiate_version, parse_heart_beat, Command, Frame, Headers, Item,
    StompCodec, Version,
};
use fmq_selector::Selector;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Config;
use crate::dedupe::{self, ProducerSeq, PRODUCER_ID_HEADER, SEQUENCE_HEADER};
use crate::destination::Destination;
use crate::engine::{
    AckMode, AckReq, Cmd, CommitReply, DurableBatches, Outbound, OutboundTx, SessionId,
    SubscribeReq,
};
use crate::message::{now_ms, Message, BROKER_HEADERS, DEFAULT_PRIORITY};
use crate::security::{Permission, Security};

/// What every session shares.
#[derive(Debug)]
pub struct Shared {
    /// The engine's command queue.
    pub engine: mpsc::Sender<Cmd>,
    /// Users and ACLs.
    pub security: Arc<Security>,
    /// Settings.
    pub config: Arc<Config>,
    /// Session id source.
    pub next_session: AtomicU64,
    /// Set to true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Most transactions one connection may have open at once.
const MAX_OPEN_TRANSACTIONS: usize = 1024;

/// Why a session ended with an ERROR: the text for the client.
struct Fatal {
    message: String,
    detail: String,
    receipt: Option<String>,
}

impl Fatal {
    fn new(message: impl Into<String>, frame: &Frame) -> Fatal {
        Fatal {
            message: message.into(),
            detail: format!("offending frame: {}", frame.command.as_str()),
            receipt: frame.get("receipt").map(str::to_owned),
        }
    }
}

fn error_frame(f: &Fatal) -> Frame {
    let mut frame = Frame::error(&f.message, &f.detail);
    if let Some(r) = &f.receipt {
        frame.headers.push("receipt-id", r.clone());
    }
    frame
}

/// What the receipt task waits for before answering.
enum Wait {
    Now,
    Engine(oneshot::Receiver<Result<crate::engine::Done, String>>),
}

struct Pending {
    wait: Wait,
    receipt: Option<String>,
    close_after: bool,
    /// Sent to the engine once the RECEIPT is queued.
    then: Option<Cmd>,
}

#[derive(Default)]
struct Transaction {
    /// Checked for duplicates at COMMIT, not before.
    sends: Vec<(Message, Option<ProducerSeq>)>,
    acks: Vec<AckReq>,
}

/// Serves one connection until it ends.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed) + 1;
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let span = tracing::info_span!("session", id, %peer);
    async move {
        let _ = stream.set_nodelay(true);
        if let Err(e) = run(id, stream, &shared).await {
            tracing::debug!(error = %e, "session ended with an I/O error");
        }
    }
    .instrument(span)
    .await;
}

async fn run(id: SessionId, stream: TcpStream, shared: &Arc<Shared>) -> std::io::Result<()> {
    let config = shared.config.clone();
    let (rd, wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, StompCodec::new(config.limits));
    let mut writer = FramedWrite::new(wr, StompCodec::new(config.limits));

    // Handshake.
    let first = match tokio::time::timeout(config.connect_timeout, next_frame(&mut reader)).await {
        Err(_) => {
            let f = Frame::error(
                "no CONNECT frame received in time",
                &format!(
                    "connect timeout is {} ms",
                    config.connect_timeout.as_millis()
                ),
            );
            let _ = writer.send(f).await;
            return Ok(());
        }
        Ok(None) => return Ok(()),
        Ok(Some(Err(frame))) => {
            let _ = writer.send(frame).await;
            return Ok(());
        }
        Ok(Some(Ok(frame))) => frame,
    };
    let connected = match connect(id, &first, shared).await {
        Ok(c) => c,
        Err(frame) => {
            tracing::info!(
                reason = frame.get("message").unwrap_or(""),
                "connection refused"
            );
            let _ = writer.send(frame).await;
            return Ok(());
        }
    };
    reader.decoder_mut().set_version(connected.version);
    writer.encoder_mut().set_version(connected.version);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    if shared
        .engine
        .send(Cmd::Open {
            session: id,
            out: out_tx.clone(),
            client_id: connected.client_id.clone(),
            reply: reply_tx,
        })
        .await
        .is_err()
    {
        return Ok(());
    }
    let durable = match reply_rx.await {
        Ok(Ok(durable)) => durable,
        Ok(Err(msg)) => {
            let _ = writer
                .send(Frame::error(&msg, "the connection is closed"))
                .await;
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    if writer.send(connected.frame).await.is_err() {
        let _ = shared
            .engine
            .send(Cmd::Close {
                session: id,
                reply: None,
            })
            .await;
        return Ok(());
    }
    tracing::debug!(user = %connected.principal, version = connected.version.as_str(), "connected");

    let closed = CancellationToken::new();
    let writer_task = tokio::spawn(write_loop(
        writer,
        out_rx,
        Held {
            durable,
            shutdown: shared.shutdown.clone(),
        },
        shared.engine.clone(),
        id,
        Duration::from_millis(u64::from(connected.send_heart_beat)),
        closed.clone(),
    ));
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let receipt_task = tokio::spawn(receipt_loop(
        pending_rx,
        out_tx.clone(),
        shared.engine.clone(),
    ));

    let mut state = State {
        id,
        shared: shared.clone(),
        version: connected.version,
        principal: connected.principal,
        transactions: HashMap::new(),
        pending: pending_tx,
        out: out_tx,
    };
    let recv_limit = match connected.recv_heart_beat {
        0 => None,
        ms => Some(Duration::from_millis(u64::from(ms) * 2 + 500)),
    };
    let mut shutdown = shared.shutdown.clone();
    let mut last_seen = Instant::now();
    loop {
        let deadline = recv_limit.map(|d| last_seen + d);
        let next = tokio::select! {
            item = reader.next() => item,
            _ = closed.cancelled() => break,
            _ = sleep_until(deadline) => {
                tracing::info!("client sent nothing within the negotiated heart-beat; dropping it");
                let _ = state.out.send(Outbound::Frame(Frame::error(
                    "heart-beat timeout",
                    "no frame or heart-beat received within twice the negotiated interval",
                )));
                let _ = state.out.send(Outbound::Close);
                break;
            }
            _ = shutdown.wait_for(|s| *s) => {
                let _ = state.out.send(Outbound::Frame(Frame::error("server is shutting down", "reconnect later or to the other server")));
                let _ = state.out.send(Outbound::Close);
                break;
            }
        };
        last_seen = Instant::now();
        let frame = match next {
            None => break,
            Some(Ok(Item::HeartBeat)) => continue,
            Some(Ok(Item::Frame(frame))) => frame,
            Some(Err(e)) => {
                if let fmq_proto::Error::Io(_) = e {
                    break;
                }
                tracing::info!(error = %e, "malformed frame");
                let _ = state.out.send(Outbound::Frame(e.to_frame()));
                let _ = state.out.send(Outbound::Close);
                break;
            }
        };
        match state.handle(frame).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Disconnect) => break,
            Err(fatal) => {
                tracing::info!(error = %fatal.message, "closing session after ERROR");
                let _ = state.out.send(Outbound::Frame(error_frame(&fatal)));
                let _ = state.out.send(Outbound::Close);
                break;
            }
        }
    }
    // Whatever the client did not commit is rolled back; unacknowledged
    // deliveries are requeued by the engine.
    let _ = shared
        .engine
        .send(Cmd::Close {
            session: id,
            reply: None,
        })
        .await;
    drop(state);
    let _ = receipt_task.await;
    let _ = writer_task.await;
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The next frame, skipping heart-beats; `Err` carries the ERROR to send.
async fn next_frame(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, StompCodec>,
) -> Option<Result<Frame, Frame>> {
    loop {
        match reader.next().await? {
            Ok(Item::HeartBeat) => continue,
            Ok(Item::Frame(f)) => return Some(Ok(f)),
            Err(e) => return Some(Err(e.to_frame())),
        }
    }
}

struct Connected {
    version: Version,
    principal: String,
    client_id: Option<String>,
    frame: Frame,
    send_heart_beat: u32,
    recv_heart_beat: u32,
}

async fn connect(id: SessionId, frame: &Frame, shared: &Arc<Shared>) -> Result<Connected, Frame> {
    let refuse = |msg: String| Frame::error(&msg, "the connection is closed");
    if !matches!(frame.command, Command::Connect | Command::Stomp) {
        return Err(refuse(format!(
            "expected CONNECT or STOMP as the first frame, got {}",
            frame.command.as_str()
        )));
    }
    let version = negotiate_version(frame.get("accept-version")).map_err(|e| e.to_frame())?;
    let theirs = match frame.get("heart-beat") {
        Some(v) => parse_heart_beat(v).map_err(|e| e.to_frame())?,
        None => (0, 0),
    };
    let (send_hb, recv_hb) = negotiate_heart_beat(shared.config.heart_beat, theirs);
    let login = frame.get("login").map(str::to_owned);
    let passcode = frame.get("passcode").map(str::to_owned);
    let principal = shared
        .security
        .login(login, passcode)
        .await
        .map_err(refuse)?;
    let client_id = frame
        .get("client-id")
        .filter(|c| !c.is_empty())
        .map(str::to_owned);
    let mut reply = Frame::new(Command::Connected)
        .header("version", version.as_str())
        .header(
            "server",
            format!("{}/{}", shared.config.name, env!("CARGO_PKG_VERSION")),
        )
        .header("session", format!("fmq-session-{id}"))
        .header(
            "heart-beat",
            format!(
                "{},{}",
                shared.config.heart_beat.0, shared.config.heart_beat.1
            ),
        );
    if version == Version::V1_0 {
        reply.headers.remove("version");
    }
    Ok(Connected {
        version,
        principal,
        client_id,
        frame: reply,
        send_heart_beat: send_hb,
        recv_heart_beat: recv_hb,
    })
}

enum Flow {
    Continue,
    Disconnect,
}

struct State {
    id: SessionId,
    shared: Arc<Shared>,
    version: Version,
    principal: String,
    transactions: HashMap<String, Transaction>,
    pending: mpsc::UnboundedSender<Pending>,
    out: OutboundTx,
}

impl State {
    async fn handle(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        if !frame.body.is_empty() && !frame.command.allows_body() {
            return Err(Fatal::new(
                format!("{} frames must not have a body", frame.command.as_str()),
                &frame,
            ));
        }
        match frame.command {
            Command::Send => self.send(frame).await,
            Command::Subscribe => self.subscribe(frame).await,
            Command::Unsubscribe => self.unsubscribe(frame).await,
            Command::Ack | Command::Nack => self.ack(frame).await,
            Command::Begin => self.begin(&frame),
            Command::Commit => self.commit(frame).await,
            Command::Abort => self.abort(&frame),
            Command::Disconnect => {
                // Close in the engine first, so that once the client has the
                // RECEIPT its client-id is free and its state is durable.
                let (tx, rx) = oneshot::channel();
                self.engine(
                    Cmd::Close {
                        session: self.id,
                        reply: Some(tx),
                    },
                    &frame,
                )
                .await?;
                self.push(
                    Wait::Engine(rx),
                    frame.get("receipt").map(str::to_owned),
                    true,
                );
                Ok(Flow::Disconnect)
            }
            other => Err(Fatal::new(
                format!("unexpected {} frame from a client", other.as_str()),
                &frame,
            )),
        }
    }

    fn push(&self, wait: Wait, receipt: Option<String>, close_after: bool) {
        let _ = self.pending.send(Pending {
            wait,
            receipt,
            close_after,
            then: None,
        });
    }

    /// Sends a command whose outcome decides the RECEIPT (or ERROR) that
    /// answers `frame`, in order with the session's other receipts.
    async fn request(
        &self,
        frame: &Frame,
        make: impl FnOnce(CommitReply) -> Cmd,
    ) -> Result<Flow, Fatal> {
        let (tx, rx) = oneshot::channel();
        self.engine(make(tx), frame).await?;
        self.push(
            Wait::Engine(rx),
            frame.get("receipt").map(str::to_owned),
            false,
        );
        Ok(Flow::Continue)
    }

    async fn engine(&self, cmd: Cmd, frame: &Frame) -> Result<(), Fatal> {
        self.shared
            .engine
            .send(cmd)
            .await
            .map_err(|_| Fatal::new("server is shutting down", frame))
    }

    fn destination(&self, frame: &Frame, perm: Permission) -> Result<Destination, Fatal> {
        let text = frame.get("destination").ok_or_else(|| {
            Fatal::new(
                format!("{} frame has no destination header", frame.command.as_str()),
                frame,
            )
        })?;
        let dest = Destination::parse(text).map_err(|e| Fatal::new(e, frame))?;
        if !self.shared.security.authorize(&self.principal, &dest, perm) {
            return Err(Fatal::new(
                format!(
                    "user '{}' is not authorized to {} {dest}",
                    self.principal,
                    perm.verb()
                ),
                frame,
            ));
        }
        Ok(dest)
    }

    async fn send(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        let destination = self.destination(&frame, Permission::Write)?;
        let message = build_message(destination, &frame)?;
        let producer = dedupe::parse(frame.get(PRODUCER_ID_HEADER), frame.get(SEQUENCE_HEADER))
            .map_err(|e| Fatal::new(e, &frame))?;
        let receipt = frame.get("receipt").map(str::to_owned);
        if let Some(tx) = frame.get("transaction") {
            let limit = self.shared.config.max_transaction_frames;
            let t = self
                .transactions
                .get_mut(tx)
                .ok_or_else(|| Fatal::new(format!("transaction '{tx}' was not begun"), &frame))?;
            if t.sends.len() + t.acks.len() >= limit {
                return Err(Fatal::new(
                    format!("transaction '{tx}' exceeds {limit} frames"),
                    &frame,
                ));
            }
            t.sends.push((message, producer));
            self.push(Wait::Now, receipt, false);
            return Ok(Flow::Continue);
        }
        let (reply, wait) = match &receipt {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Wait::Engine(rx))
            }
            None => (None, Wait::Now),
        };
        let sync = message.persistent && receipt.is_some();
        self.engine(
            Cmd::Send {
                session: self.id,
                message,
                producer,
                reply,
                sync,
            },
            &frame,
        )
        .await?;
        if receipt.is_some() {
            self.push(wait, receipt, false);
        }
        Ok(Flow::Continue)
    }

    async fn subscribe(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        let destination = self.destination(&frame, Permission::Read)?;
        let id: Arc<str> = match frame.get("id") {
            Some(id) => id.into(),
            None if self.version == Version::V1_0 => destination.to_string().into(),
            None => return Err(Fatal::new("SUBSCRIBE frame has no id header", &frame)),
        };
        let ack = match frame.get("ack").unwrap_or("auto") {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => {
                return Err(Fatal::new(
                    format!("ack mode '{other}' is not one of auto, client, client-individual"),
                    &frame,
                ))
            }
        };
        let selector = match frame.get("selector").filter(|s| !s.trim().is_empty()) {
            Some(text) => Some(
                Selector::parse(text)
                    .map_err(|e| Fatal::new(format!("invalid selector: {e}"), &frame))?,
            ),
            None => None,
        };
        let prefetch = match frame
            .get("activemq.prefetchSize")
            .or_else(|| frame.get("prefetch-count"))
        {
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Fatal::new(
                    format!("prefetch '{v}' is not a positive whole number"),
                    &frame,
                )
            })?,
            None => self.shared.config.default_prefetch,
        };
        let durable: Option<Arc<str>> = frame
            .get("activemq.subscriptionName")
            .or_else(|| frame.get("durable-subscription-name"))
            .filter(|n| !n.is_empty())
            .map(Into::into);
        if durable.is_some() && destination.is_queue() {
            return Err(Fatal::new(
                "durable subscriptions are for topics, not queues",
                &frame,
            ));
        }
        let receipt = frame.get("receipt").map(str::to_owned);
        let (tx, rx) = oneshot::channel();
        let resume = receipt.is_some().then(|| Cmd::Resume {
            session: self.id,
            id: id.clone(),
        });
        let req = SubscribeReq {
            paused: resume.is_some(),
            id,
            destination,
            ack,
            prefetch,
            selector,
            durable,
            sync: receipt.is_some(),
        };
        self.engine(
            Cmd::Subscribe {
                session: self.id,
                req,
                reply: tx,
            },
            &frame,
        )
        .await?;
        let _ = self.pending.send(Pending {
            wait: Wait::Engine(rx),
            receipt,
            close_after: false,
            then: resume,
        });
        Ok(Flow::Continue)
    }

    async fn unsubscribe(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        let id: Option<Arc<str>> = frame.get("id").map(Into::into).or_else(|| {
            (self.version == Version::V1_0)
                .then(|| frame.get("destination").map(Into::into))
                .flatten()
        });
        let durable: Option<Arc<str>> = frame
            .get("activemq.subscriptionName")
            .or_else(|| frame.get("durable-subscription-name"))
            .map(Into::into);
        if id.is_none() && durable.is_none() {
            return Err(Fatal::new("UNSUBSCRIBE frame has no id header", &frame));
        }
        let session = self.id;
        self.request(&frame, |reply| Cmd::Unsubscribe {
            session,
            id,
            durable,
            reply,
        })
        .await
    }

    async fn ack(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        let nack = frame.command == Command::Nack;
        let header = if self.version == Version::V1_2 {
            "id"
        } else {
            "message-id"
        };
        let raw = frame
            .get(header)
            .or_else(|| frame.get("message-id"))
            .or_else(|| frame.get("id"))
            .ok_or_else(|| {
                Fatal::new(
                    format!("{} frame has no {header} header", frame.command.as_str()),
                    &frame,
                )
            })?;
        let message_id = raw
            .strip_prefix("ID:fmq-")
            .unwrap_or(raw)
            .parse::<u64>()
            .map_err(|_| {
                Fatal::new(
                    format!("'{raw}' is not a message this server delivered"),
                    &frame,
                )
            })?;
        let ack = AckReq { message_id, nack };
        let receipt = frame.get("receipt").map(str::to_owned);
        if let Some(tx) = frame.get("transaction") {
            let t = self
                .transactions
                .get_mut(tx)
                .ok_or_else(|| Fatal::new(format!("transaction '{tx}' was not begun"), &frame))?;
            t.acks.push(ack);
            self.push(Wait::Now, receipt, false);
            return Ok(Flow::Continue);
        }
        let session = self.id;
        let sync = receipt.is_some();
        self.request(&frame, |reply| Cmd::Ack {
            session,
            ack,
            sync,
            reply,
        })
        .await
    }

    fn begin(&mut self, frame: &Frame) -> Result<Flow, Fatal> {
        let tx = tx_name(frame)?;
        if self.transactions.contains_key(tx) {
            return Err(Fatal::new(
                format!("transaction '{tx}' is already begun"),
                frame,
            ));
        }
        if self.transactions.len() >= MAX_OPEN_TRANSACTIONS {
            return Err(Fatal::new(
                format!("more than {MAX_OPEN_TRANSACTIONS} transactions open on one connection"),
                frame,
            ));
        }
        self.transactions
            .insert(tx.to_owned(), Transaction::default());
        self.push(Wait::Now, frame.get("receipt").map(str::to_owned), false);
        Ok(Flow::Continue)
    }

    async fn commit(&mut self, frame: Frame) -> Result<Flow, Fatal> {
        let name = tx_name(&frame)?.to_owned();
        // The transaction's key, checked like a SEND's: a COMMIT whose key
        // the broker has seen already applies nothing.
        let key = dedupe::parse(frame.get(PRODUCER_ID_HEADER), frame.get(SEQUENCE_HEADER))
            .map_err(|e| Fatal::new(e, &frame))?;
        let t = self
            .transactions
            .remove(&name)
            .ok_or_else(|| Fatal::new(format!("transaction '{name}' was not begun"), &frame))?;
        let session = self.id;
        self.request(&frame, |reply| Cmd::Commit {
            session,
            key,
            sends: t.sends,
            acks: t.acks,
            reply,
        })
        .await
    }

    fn abort(&mut self, frame: &Frame) -> Result<Flow, Fatal> {
        let name = tx_name(frame)?;
        if self.transactions.remove(name).is_none() {
            return Err(Fatal::new(
                format!("transaction '{name}' was not begun"),
                frame,
            ));
        }
        self.push(Wait::Now, frame.get("receipt").map(str::to_owned), false);
        Ok(Flow::Continue)
    }
}

fn tx_name(frame: &Frame) -> Result<&str, Fatal> {
    frame
        .get("transaction")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Fatal::new(
                format!("{} frame has no transaction header", frame.command.as_str()),
                frame,
            )
        })
}

/// Turns a SEND into a message: broker-owned headers are dropped, the
/// delivery headers parsed, the rest passed through.
fn build_message(destination: Destination, frame: &Frame) -> Result<Message, Fatal> {
    let persistent = match frame.get("persistent") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(Fatal::new(
                format!("persistent header '{v}' is not true or false"),
                frame,
            ))
        }
    };
    let priority = match frame.get("priority") {
        None => DEFAULT_PRIORITY,
        Some(v) => v.parse::<u8>().ok().filter(|p| *p <= 9).ok_or_else(|| {
            Fatal::new(
                format!("priority '{v}' is not a whole number from 0 to 9"),
                frame,
            )
        })?,
    };
    let expires = match frame.get("expires") {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| {
            Fatal::new(
                format!("expires '{v}' is not milliseconds since the epoch"),
                frame,
            )
        })?,
    };
    let mut headers = Headers::new();
    for (k, v) in frame.headers.iter() {
        if BROKER_HEADERS.contains(&k)
            || matches!(k, "persistent" | "priority" | "expires")
            || headers.contains(k)
        {
            continue;
        }
        headers.push(k, v);
    }
    Ok(Message {
        id: 0,
        destination,
        headers,
        body: frame.body.clone(),
        persistent,
        priority,
        expires,
        timestamp: now_ms(),
    })
}

async fn receipt_loop(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    out: OutboundTx,
    engine: mpsc::Sender<Cmd>,
) {
    while let Some(p) = rx.recv().await {
        let result = match p.wait {
            Wait::Now => Ok(Vec::new()),
            Wait::Engine(reply) => match reply.await {
                Ok(Ok(done)) => done
                    .durable
                    .await
                    .map(|_| done.receipt_headers)
                    .map_err(|e| format!("the server could not store the change: {e}")),
                Ok(Err(message)) => Err(message),
                Err(_) => Err("server is shutting down".to_owned()),
            },
        };
        match result {
            Ok(headers) => {
                if let Some(r) = p.receipt {
                    let mut frame = Frame::new(Command::Receipt).header("receipt-id", r);
                    for (k, v) in headers {
                        frame = frame.header(k, v);
                    }
                    let _ = out.send(Outbound::Frame(frame));
                }
                if let Some(cmd) = p.then {
                    let _ = engine.send(cmd).await;
                }
                if p.close_after {
                    let _ = out.send(Outbound::Close);
                    break;
                }
            }
            Err(message) => {
                tracing::info!(error = %message, "closing session after ERROR");
                let mut frame = Frame::error(&message, "the connection is closed");
                if let Some(r) = p.receipt {
                    frame.headers.push("receipt-id", r);
                }
                let _ = out.send(Outbound::Frame(frame));
                let _ = out.send(Outbound::Close);
                break;
            }
        }
    }
}

async fn write_loop(
    mut sink: FramedWrite<tokio::net::tcp::OwnedWriteHalf, StompCodec>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    mut held: Held,
    engine: mpsc::Sender<Cmd>,
    session: SessionId,
    heart_beat: Duration,
    closed: CancellationToken,
) {
    let mut written = Vec::new();
    let mut batch = Vec::with_capacity(64);
    let beat = if heart_beat.is_zero() {
        None
    } else {
        Some(heart_beat)
    };
    let mut last_write = Instant::now();
    'outer: loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, 64) => n,
            _ = sleep_until(beat.map(|b| last_write + b)) => {
                if sink.send(Item::HeartBeat).await.is_err() {
                    break;
                }
                last_write = Instant::now();
                continue;
            }
        };
        if got == 0 {
            break;
        }
        let mut close = false;
        for item in batch.drain(..) {
            let result = match item {
                Outbound::Frame(frame) => sink.feed(frame).await,
                Outbound::Message {
                    frame,
                    auto_ack,
                    after,
                } => {
                    let reached = *held.durable.borrow();
                    if after > reached && !held.wait(&mut sink, after, beat, &mut last_write).await
                    {
                        break 'outer;
                    }
                    if let Some(a) = auto_ack {
                        written.push(a);
                    }
                    sink.feed(frame).await
                }
                Outbound::Close => {
                    close = true;
                    break;
                }
            };
            if result.is_err() {
                break 'outer;
            }
        }
        if SinkExt::<Frame>::flush(&mut sink).await.is_err() {
            break;
        }
        last_write = Instant::now();
        if !written.is_empty() {
            let items = std::mem::take(&mut written);
            if engine.send(Cmd::Written { session, items }).await.is_err() {
                break;
            }
        }
        if close {
            break;
        }
    }
    let _ = SinkExt::<Frame>::close(&mut sink).await;
    closed.cancel();
}

/// What a session's writer needs to hold deliveries back until they are
/// durable.
struct Held {
    durable: DurableBatches,
    /// The broker's shutdown: a held delivery is dropped then (the engine
    /// requeues what was not acknowledged), so that a batch that will never
    /// be durable (the server stopped serving) cannot keep the session, and
    /// with it the engine and its store, alive.
    shutdown: watch::Receiver<bool>,
}

impl Held {
    /// Waits until the store batch `after` is durable: flushes what was fed
    /// before, then waits, beating the heart meanwhile. False when the
    /// connection is gone or the broker is stopping.
    async fn wait(
        &mut self,
        sink: &mut FramedWrite<tokio::net::tcp::OwnedWriteHalf, StompCodec>,
        after: u64,
        beat: Option<Duration>,
        last_write: &mut Instant,
    ) -> bool {
        if SinkExt::<Frame>::flush(sink).await.is_err() {
            return false;
        }
        let Held { durable, shutdown } = self;
        loop {
            tokio::select! {
                reached = async { durable.wait_for(|n| *n >= after).await.is_ok() } => return reached,
                () = async { drop(shutdown.wait_for(|s| *s).await) } => return false,
                _ = sleep_until(beat.map(|b| *last_write + b)) => {
                    if sink.send(Item::HeartBeat).await.is_err() {
                        return false;
                    }
                    *last_write = Instant::now();
                }
            }
        }
    }
}
