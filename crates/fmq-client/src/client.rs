//! [`Client`], the connection handle, and [`ConnectOptions`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fmq_proto::{negotiate_heart_beat, parse_heart_beat, Command, Frame, Item, StompCodec};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::connection::{self, Shared};
use crate::error::{Error, Result};
use crate::subscription::{AckMode, SubscribeOptions, Subscription};
use crate::transaction::Transaction;

/// Frames the handles may queue for the writer before `send` waits.
const CHANNEL_CAPACITY: usize = 1024;

/// How to open a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `login` header of CONNECT.
    pub login: Option<String>,
    /// `passcode` header of CONNECT.
    pub passcode: Option<String>,
    /// `client-id` header of CONNECT; needed for durable subscriptions,
    /// which the broker keys by client-id and subscription name.
    pub client_id: Option<String>,
    /// `host` header of CONNECT (the virtual host); `None` sends `localhost`.
    pub host: Option<String>,
    /// Heart-beats offered as (can send every ms, want to receive every
    /// ms); `0` disables a direction. Default `(10000, 10000)`.
    pub heart_beat: (u32, u32),
    /// Limit for every call that waits on the server: connecting, RECEIPTs,
    /// and queueing a frame when the socket is backed up. Default 30 s.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            login: None,
            passcode: None,
            client_id: None,
            host: None,
            heart_beat: (10_000, 10_000),
            timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectOptions {
    /// Default options with `login` and `passcode` set.
    pub fn with_credentials(login: impl Into<String>, passcode: impl Into<String>) -> Self {
        ConnectOptions {
            login: Some(login.into()),
            passcode: Some(passcode.into()),
            ..Default::default()
        }
    }
}

/// A STOMP 1.2 connection to a FerroMQ broker.
///
/// `Client` is a cheap, cloneable handle; the socket belongs to a driver
/// task. The connection stays open while any handle (client, subscription,
/// transaction or message) exists, and is closed with a DISCONNECT when
/// the last one is dropped, or explicitly with [`Client::disconnect`].
///
/// Once the connection fails (an ERROR frame, a socket error, a missed
/// heart-beat), every pending and later call returns that same error and
/// subscriptions end.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) shared: Arc<Shared>,
    tx: mpsc::Sender<Frame>,
    timeout: Duration,
    server: Option<String>,
    session: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.server)
            .field("session", &self.inner.session)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Client {
    /// Connects to `addr`, sends CONNECT (STOMP 1.2) and waits for CONNECTED.
    ///
    /// A refusal (bad credentials, a client-id in use, …) is
    /// [`Error::Server`] carrying the server's message. The whole handshake
    /// is bounded by [`ConnectOptions::timeout`].
    pub async fn connect(addr: impl ToSocketAddrs, options: ConnectOptions) -> Result<Client> {
        let timeout = options.timeout;
        tokio::time::timeout(timeout, Self::handshake(addr, options))
            .await
            .map_err(|_| Error::Timeout("CONNECTED"))?
    }

    async fn handshake(addr: impl ToSocketAddrs, options: ConnectOptions) -> Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut reader = FramedRead::new(rd, StompCodec::default());
        let mut writer = FramedWrite::new(wr, StompCodec::default());

        let mut connect = Frame::new(Command::Connect)
            .header("accept-version", "1.2")
            .header("host", options.host.as_deref().unwrap_or("localhost"))
            .header(
                "heart-beat",
                format!("{},{}", options.heart_beat.0, options.heart_beat.1),
            );
        for (name, value) in [
            ("login", &options.login),
            ("passcode", &options.passcode),
            ("client-id", &options.client_id),
        ] {
            if let Some(v) = value {
                connect.headers.push(name, v.clone());
            }
        }
        writer.send(Item::Frame(connect)).await?;

        let reply = loop {
            match reader.next().await {
                None => return Err(Error::Closed),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Item::HeartBeat)) => continue,
                Some(Ok(Item::Frame(f))) => break f,
            }
        };
        match reply.command {
            Command::Connected => {}
            Command::Error => return Err(Error::from_error_frame(&reply)),
            other => return Err(Error::Protocol(format!("expected CONNECTED, got {other}"))),
        }
        match reply.get("version") {
            Some("1.2") => {}
            other => {
                return Err(Error::Protocol(format!(
                    "server answered with STOMP version {}, this client needs 1.2",
                    other.unwrap_or("1.0")
                )))
            }
        }
        let theirs = match reply.get("heart-beat") {
            Some(v) => parse_heart_beat(v)?,
            None => (0, 0),
        };
        let (send_every, recv_every) = negotiate_heart_beat(options.heart_beat, theirs);
        let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));

        let shared = Arc::new(Shared::new());
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(connection::write_loop(
            writer,
            rx,
            shared.clone(),
            ms(send_every),
        ));
        tokio::spawn(connection::read_loop(
            reader,
            shared.clone(),
            tx.downgrade(),
            ms(recv_every),
        ));
        tracing::debug!(
            server = reply.get("server").unwrap_or(""),
            send_every,
            recv_every,
            "connected"
        );
        Ok(Client {
            inner: Arc::new(Inner {
                shared,
                tx,
                timeout: options.timeout,
                server: reply.get("server").map(str::to_owned),
                session: reply.get("session").map(str::to_owned),
            }),
        })
    }

    /// Sends a message without waiting for the broker: the call returns
    /// once the frame is queued for the socket. Use
    /// [`send_with_receipt`](Self::send_with_receipt) to know it arrived.
    ///
    /// `headers` are added to the SEND frame, e.g. `("persistent", "true")`,
    /// `("priority", "7")` or application properties for selectors.
    pub async fn send(
        &self,
        destination: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<()> {
        self.write(send_frame(destination, body.into(), headers))
            .await
    }

    /// Sends a message and waits for the broker's RECEIPT; for a
    /// `persistent:true` message that means it is stored durably.
    pub async fn send_with_receipt(
        &self,
        destination: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<()> {
        self.request(send_frame(destination, body.into(), headers))
            .await
    }

    /// Subscribes to `destination` (`/queue/NAME` or `/topic/NAME`) and
    /// waits for the RECEIPT, so the subscription is active when this
    /// returns.
    pub async fn subscribe(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.subscribe_checked(destination, options)
            .await
            .map_err(|(e, _)| e)
    }

    /// [`subscribe`](Self::subscribe), also telling on failure whether the
    /// server refused this very SUBSCRIBE (its ERROR named our receipt).
    pub(crate) async fn subscribe_checked(
        &self,
        destination: &str,
        options: SubscribeOptions,
    ) -> std::result::Result<Subscription, (Error, bool)> {
        let id = self.inner.shared.next_id("sub");
        let mut frame = Frame::new(Command::Subscribe)
            .header("id", id.clone())
            .header("destination", destination)
            .header("ack", options.ack.as_str());
        if let Some(s) = &options.selector {
            frame.headers.push("selector", s.clone());
        }
        if let Some(p) = options.prefetch {
            frame.headers.push("activemq.prefetchSize", p.to_string());
        }
        if let Some(name) = &options.durable_name {
            frame
                .headers
                .push("activemq.subscriptionName", name.clone());
        }
        for (k, v) in &options.headers {
            frame.headers.push(k.clone(), v.clone());
        }
        let rx = self
            .inner
            .shared
            .add_subscription(id.clone())
            .map_err(|e| (e, false))?;
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let result = match self.start_request_until(frame, deadline).await {
            Ok(pending) => {
                let receipt = pending.receipt().to_owned();
                pending
                    .wait_until(deadline)
                    .await
                    .map_err(|e| (e, self.refused(&receipt)))
            }
            Err(e) => Err((e, false)),
        };
        if let Err(e) = result {
            self.inner.shared.remove_subscription(&id);
            return Err(e);
        }
        Ok(Subscription::new(
            self.clone(),
            id,
            destination.to_owned(),
            options.ack,
            options.durable_name,
            rx,
        ))
    }

    /// Starts a transaction. Its frames take effect at
    /// [`Transaction::commit`]; dropping it uncommitted aborts it.
    pub async fn begin(&self) -> Result<Transaction> {
        let id = self.inner.shared.next_id("tx");
        self.write(Frame::new(Command::Begin).header("transaction", id.clone()))
            .await?;
        Ok(Transaction::new(self.clone(), id))
    }

    /// Sends DISCONNECT and waits for its RECEIPT, so everything sent
    /// before has been processed by the broker. Other handles of this
    /// connection fail with [`Error::Closed`] afterwards.
    pub async fn disconnect(self) -> Result<()> {
        let result = self.request(Frame::new(Command::Disconnect)).await;
        self.inner.shared.fail(Error::Closed);
        match result {
            Err(Error::Closed) => Ok(()),
            other => other,
        }
    }

    /// Whether the connection is still up (no ERROR, socket error, missed
    /// heart-beat or disconnect so far).
    pub fn is_connected(&self) -> bool {
        self.inner.shared.is_connected()
    }

    /// The CONNECTED frame's `server` header.
    pub fn server(&self) -> Option<&str> {
        self.inner.server.as_deref()
    }

    /// The CONNECTED frame's `session` header.
    pub fn session(&self) -> Option<&str> {
        self.inner.session.as_deref()
    }

    /// Queues a frame for the writer.
    pub(crate) async fn write(&self, frame: Frame) -> Result<()> {
        self.inner.shared.check()?;
        match tokio::time::timeout(self.inner.timeout, self.inner.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(self.inner.shared.terminal()),
            Err(_) => Err(Error::Timeout("room in the connection's send queue")),
        }
    }

    /// Queues a frame without waiting; for `Drop` implementations.
    pub(crate) fn try_write(&self, frame: Frame) {
        if self.is_connected() {
            let _ = self.inner.tx.try_send(frame);
        }
    }

    /// Sends `frame` with a `receipt` header and waits for the RECEIPT.
    pub(crate) async fn request(&self, frame: Frame) -> Result<()> {
        self.request_within(frame, self.inner.timeout)
            .await
            .map(|_| ())
    }

    /// Sends `frame` with a `receipt` header and waits up to `timeout` for
    /// the RECEIPT, which is returned.
    pub(crate) async fn request_within(&self, frame: Frame, timeout: Duration) -> Result<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.start_request_until(frame, deadline)
            .await?
            .wait_until(deadline)
            .await
    }

    /// Queues `frame` with a fresh `receipt` header and returns the waiter
    /// for its RECEIPT, without waiting for it. Frames queued one after the
    /// other leave in that order, so a caller can pipeline requests and
    /// wait for their receipts afterwards.
    pub(crate) async fn start_request(&self, frame: Frame) -> Result<PendingReceipt> {
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        self.start_request_until(frame, deadline).await
    }

    /// [`start_request`](Self::start_request), waiting for room in the send
    /// queue until `deadline` at most.
    async fn start_request_until(
        &self,
        mut frame: Frame,
        deadline: tokio::time::Instant,
    ) -> Result<PendingReceipt> {
        let shared = &self.inner.shared;
        let receipt = shared.next_id("rcpt");
        let rx = shared.expect_receipt(receipt.clone())?;
        frame.headers.push("receipt", receipt.clone());
        let queued = match tokio::time::timeout_at(deadline, self.inner.tx.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(shared.terminal()),
            Err(_) => Err(Error::Timeout("room in the connection's send queue")),
        };
        if let Err(e) = queued {
            shared.forget_receipt(&receipt);
            return Err(e);
        }
        Ok(PendingReceipt {
            client: self.clone(),
            receipt,
            rx,
        })
    }

    /// A connection-unique id with the given prefix.
    pub(crate) fn next_id(&self, prefix: &str) -> String {
        self.inner.shared.next_id(prefix)
    }

    /// Resolves when the connection has ended, whatever ended it.
    pub(crate) async fn closed(&self) {
        self.inner.shared.closed.cancelled().await
    }

    /// Why the connection ended ([`Error::Closed`] if it is still up).
    pub(crate) fn terminal_error(&self) -> Error {
        self.inner.shared.terminal()
    }

    /// Ends the connection at once with `error`, without a DISCONNECT.
    pub(crate) fn abort(&self, error: Error) {
        self.inner.shared.fail(error);
    }

    /// Whether the ERROR frame that ended the connection named `receipt`,
    /// i.e. the server refused the frame sent with that receipt.
    pub(crate) fn refused(&self, receipt: &str) -> bool {
        self.inner.shared.error_receipt().as_deref() == Some(receipt)
    }

    /// ACK or NACK frame for a delivery, optionally in a transaction.
    pub(crate) fn ack_frame(command: Command, ack_id: &str, transaction: Option<&str>) -> Frame {
        let mut frame = Frame::new(command).header("id", ack_id);
        if let Some(tx) = transaction {
            frame.headers.push("transaction", tx);
        }
        frame
    }
}

/// A request whose RECEIPT has not arrived yet (see
/// [`Client::start_request`]).
#[derive(Debug)]
pub(crate) struct PendingReceipt {
    client: Client,
    receipt: String,
    rx: tokio::sync::oneshot::Receiver<Result<Frame>>,
}

impl PendingReceipt {
    /// The receipt id the frame was sent with.
    pub(crate) fn receipt(&self) -> &str {
        &self.receipt
    }

    /// Waits for the RECEIPT until `deadline`.
    pub(crate) async fn wait_until(self, deadline: tokio::time::Instant) -> Result<Frame> {
        let shared = &self.client.inner.shared;
        match tokio::time::timeout_at(deadline, self.rx).await {
            Ok(Ok(Ok(frame))) => Ok(frame),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(shared.terminal()),
            Err(_) => {
                shared.forget_receipt(&self.receipt);
                Err(Error::Timeout("RECEIPT"))
            }
        }
    }
}

/// Builds a SEND frame.
pub(crate) fn send_frame(destination: &str, body: Bytes, headers: &[(&str, &str)]) -> Frame {
    let mut frame = Frame::new(Command::Send).header("destination", destination);
    for (k, v) in headers {
        frame.headers.push(*k, *v);
    }
    frame.with_body(body)
}

impl AckMode {
    /// The SUBSCRIBE `ack` header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}
