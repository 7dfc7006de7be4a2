//! [`Consumer`], its [`ConsumerOptions`], and the [`Message`]s it yields.
//!
//! A consumer outlives connections: each connection gets its own STOMP
//! subscription, served by a small task that forwards its messages, tagged
//! with the connection's generation, into the consumer's channel. The
//! consumer drops messages it acknowledged before (the [dedupe
//! window](super::dedupe)) and, in the acknowledging modes, messages whose
//! connection is gone (the broker redelivers those).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use fmq_proto::Headers;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connection::{emit, is_transient, Link};
use super::dedupe::{ProducerKey, Window};
use super::event::Event;
use super::session::{Received, SessionMode, SessionShared};
use super::{PRODUCER_ID_HEADER, SEQUENCE_HEADER};
use crate::error::{Error, Result};
use crate::subscription::{Message as RawMessage, SubscribeOptions, Subscription};

/// Options of a [`Consumer`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerOptions {
    /// A JMS message selector (SQL-92 subset over headers).
    pub selector: Option<String>,
    /// Most unacknowledged messages the broker sends ahead; unset is the
    /// broker's default.
    pub prefetch: Option<usize>,
    /// Makes a topic subscription durable under this name (needs a
    /// client-id on the connection).
    pub durable_name: Option<String>,
}

impl ConsumerOptions {
    /// Options of a durable subscription named `name`.
    pub fn durable(name: impl Into<String>) -> Self {
        ConsumerOptions {
            durable_name: Some(name.into()),
            ..Default::default()
        }
    }

    /// Sets the selector.
    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.selector = Some(selector.into());
        self
    }

    /// Sets the prefetch limit.
    pub fn prefetch(mut self, messages: usize) -> Self {
        self.prefetch = Some(messages);
        self
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A message delivered on some connection.
#[derive(Debug)]
pub(crate) struct Incoming {
    generation: u64,
    message: RawMessage,
}

/// A delivery of a `client`-mode consumer not yet covered by an ACK.
#[derive(Debug)]
struct Outstanding {
    generation: u64,
    identity: String,
    key: Option<ProducerKey>,
    /// A dropped duplicate waiting for a cumulative ACK that covers it.
    hidden: Option<RawMessage>,
}

#[derive(Debug, Default)]
struct SubState {
    /// The connection the current subscription is on (0: none yet).
    generation: u64,
    /// The task forwarding its messages; it hands the subscription back
    /// when told to stop.
    task: Option<JoinHandle<Option<Subscription>>>,
}

/// The part of a consumer the connection's manager and its messages share.
#[derive(Debug)]
pub(crate) struct ConsumerShared {
    pub key: u64,
    destination: String,
    options: ConsumerOptions,
    mode: SessionMode,
    tx: Mutex<Option<mpsc::UnboundedSender<Incoming>>>,
    sub: tokio::sync::Mutex<SubState>,
    closing: CancellationToken,
    window: Mutex<Window>,
    outstanding: Mutex<VecDeque<Outstanding>>,
    lost: Mutex<Option<Error>>,
    events: broadcast::Sender<Event>,
}

impl ConsumerShared {
    /// The destination consumed.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// Subscribes on `link` unless already subscribed there. `Ok(true)`
    /// when it subscribed; on failure, the error and whether the server
    /// refused this SUBSCRIBE.
    pub async fn ensure_subscribed(&self, link: &Link) -> std::result::Result<bool, (Error, bool)> {
        let mut sub = self.sub.lock().await;
        if self.closing.is_cancelled() || sub.generation >= link.generation {
            return Ok(false);
        }
        let options = SubscribeOptions {
            ack: self.mode.wire_ack(),
            selector: self.options.selector.clone(),
            prefetch: self.options.prefetch,
            durable_name: self.options.durable_name.clone(),
            headers: Vec::new(),
        };
        let subscription = link
            .client
            .subscribe_checked(&self.destination, options)
            .await?;
        let Some(tx) = lock(&self.tx).clone() else {
            return Ok(false);
        };
        sub.generation = link.generation;
        sub.task = Some(tokio::spawn(forward(
            subscription,
            link.generation,
            tx,
            self.closing.clone(),
        )));
        Ok(true)
    }

    /// Closes the consumer for good with `error`, which `receive` returns
    /// once the messages already delivered are read.
    pub fn lose(&self, error: Error) {
        *lock(&self.lost) = Some(error);
        lock(&self.tx).take();
        self.closing.cancel();
    }

    /// Remembers an acknowledged message.
    pub fn acknowledged(&self, identity: &str, key: Option<ProducerKey>) {
        lock(&self.window).insert(identity, key);
    }

    /// Acknowledges a dropped duplicate again, so the broker forgets it.
    async fn acknowledge_duplicate(&self, message: &RawMessage, generation: u64) {
        let ack_now = match self.mode {
            SessionMode::Auto => false,
            SessionMode::ClientIndividual | SessionMode::Transacted => true,
            SessionMode::Client => {
                // A cumulative ACK would also cover deliveries the
                // application has not acknowledged: only send one when
                // there are none, else let the application's next ACK
                // cover the duplicate.
                let mut o = lock(&self.outstanding);
                o.retain(|e| e.generation == generation);
                if o.iter().any(|e| e.hidden.is_none()) {
                    o.push_back(Outstanding {
                        generation,
                        identity: identity(message),
                        key: None,
                        hidden: Some(message.clone()),
                    });
                    false
                } else {
                    o.clear();
                    true
                }
            }
        };
        if ack_now {
            if let Err(e) = message.ack().await {
                tracing::debug!(error = %e, "ACK of a duplicate failed; it comes back later");
            }
        }
    }
}

/// Forwards a subscription's messages until it ends (the connection is
/// gone: `None`) or the consumer stops (the subscription is handed back).
async fn forward(
    mut sub: Subscription,
    generation: u64,
    tx: mpsc::UnboundedSender<Incoming>,
    closing: CancellationToken,
) -> Option<Subscription> {
    loop {
        tokio::select! {
            biased;
            _ = closing.cancelled() => return Some(sub),
            m = sub.next() => match m {
                None => return None,
                Some(message) => {
                    if tx.send(Incoming { generation, message }).is_err() {
                        return Some(sub);
                    }
                }
            }
        }
    }
}

/// What identifies a delivery across redeliveries: its `message-id`, with
/// the broker's `timestamp` when it sends one and a CRC of destination and
/// body. Message ids are unique per broker history only; the rest keeps a
/// message of another history (a second, unrelated broker, or a server that
/// took over without the last writes of the other) from passing for one
/// already acknowledged.
fn identity(message: &RawMessage) -> String {
    let mut crc = crc32fast::Hasher::new();
    crc.update(message.destination.as_bytes());
    crc.update(&[0]);
    crc.update(&message.body);
    format!(
        "{}@{}#{:08x}",
        message.message_id,
        message.header("timestamp").unwrap_or(""),
        crc.finalize()
    )
}

fn producer_key(message: &RawMessage) -> Option<ProducerKey> {
    let producer = message.header(PRODUCER_ID_HEADER)?;
    let sequence = message.header(SEQUENCE_HEADER)?.parse().ok()?;
    Some((producer.to_owned(), sequence))
}

/// Receives messages from a queue or topic, on behalf of a session.
///
/// The consumer stays subscribed across failovers: after a reconnection it
/// subscribes again (a durable subscription by its name, so the broker
/// hands over what it kept meanwhile). Messages it acknowledged before the
/// failover and that the broker redelivers are dropped (see the
/// [module documentation](super)).
///
/// Dropping a consumer unsubscribes it (best effort); use
/// [`close`](Self::close) to wait for the broker.
#[derive(Debug)]
pub struct Consumer {
    session: Arc<SessionShared>,
    shared: Arc<ConsumerShared>,
    rx: mpsc::UnboundedReceiver<Incoming>,
    closed: bool,
}

impl Consumer {
    pub(crate) async fn new(
        session: Arc<SessionShared>,
        destination: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer> {
        let inner = session.inner();
        if inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        if options.durable_name.is_some() && inner.config.client_id.is_none() {
            return Err(Error::Usage(
                "a durable subscription needs a client-id on the connection".into(),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ConsumerShared {
            key: inner.next_key(),
            destination: destination.to_owned(),
            options,
            mode: session.mode,
            tx: Mutex::new(Some(tx)),
            sub: tokio::sync::Mutex::new(SubState::default()),
            closing: CancellationToken::new(),
            window: Mutex::new(Window::new(inner.config.dedupe_window)),
            outstanding: Mutex::new(VecDeque::new()),
            lost: Mutex::new(None),
            events: inner.events(),
        });
        inner.register(shared.clone());
        if let Some(link) = inner.link() {
            match shared.ensure_subscribed(&link).await {
                Ok(_) => {}
                Err((e, refused)) if refused && !is_transient(&e) => {
                    inner.unregister(shared.key);
                    shared.closing.cancel();
                    return Err(e);
                }
                Err((e, _)) => {
                    tracing::debug!(error = %e, destination, "subscribing failed; retried on the next connection");
                    if !link.client.is_connected() || matches!(e, Error::Timeout(_)) {
                        // A server too slow to answer is taken for failed:
                        // the next connection subscribes afresh.
                        link.client.abort(e);
                    }
                }
            }
        }
        Ok(Consumer {
            session,
            shared,
            rx,
            closed: false,
        })
    }

    /// The destination consumed.
    pub fn destination(&self) -> &str {
        &self.shared.destination
    }

    /// The consumer's options.
    pub fn options(&self) -> &ConsumerOptions {
        &self.shared.options
    }

    /// The next message, waiting at most the connection's receive timeout:
    /// `Ok(None)` when none came. Fails once the consumer is lost (the
    /// server refused to subscribe it again) or the connection is closed.
    pub async fn receive(&mut self) -> Result<Option<Message>> {
        let timeout = self.session.inner().config.receive_timeout;
        self.receive_timeout(timeout).await
    }

    /// The next message if one comes within `timeout`.
    pub async fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let incoming = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => {
                    if self.session.inner().shutdown.is_cancelled() {
                        return Err(Error::Closed);
                    }
                    return Ok(None);
                }
                Ok(None) => return Err(lock(&self.shared.lost).clone().unwrap_or(Error::Closed)),
                Ok(Some(i)) => i,
            };
            if let Some(m) = self.accept(incoming).await {
                return Ok(Some(m));
            }
        }
    }

    /// Turns a delivery into a message for the application, or drops it.
    async fn accept(&mut self, incoming: Incoming) -> Option<Message> {
        let Incoming {
            generation,
            message,
        } = incoming;
        let shared = &self.shared;
        let mode = shared.mode;
        if mode != SessionMode::Auto && !message.client().is_connected() {
            // Its connection is gone, and with it any way to acknowledge it:
            // the broker delivers it again on the next connection.
            tracing::trace!(message_id = %message.message_id, "delivery of a lost connection dropped");
            return None;
        }
        let key = producer_key(&message);
        let id = identity(&message);
        let seen = lock(&shared.window).contains(&id, key.as_ref());
        if seen {
            shared.acknowledge_duplicate(&message, generation).await;
            emit(
                &shared.events,
                Event::DuplicateDropped {
                    destination: shared.destination.clone(),
                    message_id: message.message_id.clone(),
                },
            );
            return None;
        }
        match mode {
            SessionMode::Auto => shared.acknowledged(&id, key.clone()),
            SessionMode::Client => {
                let mut o = lock(&shared.outstanding);
                o.retain(|e| e.generation == generation);
                o.push_back(Outstanding {
                    generation,
                    identity: id,
                    key: key.clone(),
                    hidden: None,
                });
            }
            SessionMode::ClientIndividual => {}
            SessionMode::Transacted => {
                if let Some(tx) = &self.session.tx {
                    let received = Received {
                        message: message.clone(),
                        identity: id.clone(),
                        consumer: shared.clone(),
                        key: key.clone(),
                    };
                    if let Err(e) =
                        tx.lock()
                            .await
                            .receive(self.session.inner(), generation, received)
                    {
                        tracing::debug!(error = %e, "message received in a transaction that can no longer commit");
                    }
                }
            }
        }
        Some(Message {
            inner: message,
            generation,
            key,
            mode,
            consumer: shared.clone(),
        })
    }

    /// Unsubscribes and waits for the broker (within the request timeout).
    /// A durable subscription is only detached: the broker keeps collecting
    /// its messages. Unacknowledged messages are redelivered.
    pub async fn close(mut self) -> Result<()> {
        self.stop().await
    }

    /// Closes the consumer and deletes its durable subscription, with the
    /// messages it kept.
    pub async fn unsubscribe_durable(mut self) -> Result<()> {
        let Some(name) = self.shared.options.durable_name.clone() else {
            return Err(Error::Usage(format!(
                "the consumer of {} is not durable",
                self.shared.destination
            )));
        };
        self.stop().await?;
        let inner = self.session.inner();
        let link = inner.wait_link(inner.config.request_timeout).await?;
        let frame = fmq_proto::Frame::new(fmq_proto::Command::Unsubscribe)
            .header("activemq.subscriptionName", name);
        link.client
            .request_within(frame, inner.config.request_timeout)
            .await
            .map(|_| ())
    }

    async fn stop(&mut self) -> Result<()> {
        self.closed = true;
        let inner = self.session.inner();
        inner.unregister(self.shared.key);
        self.shared.closing.cancel();
        let task = self.shared.sub.lock().await.task.take();
        let Some(task) = task else { return Ok(()) };
        let timeout = inner.config.request_timeout;
        if let Ok(Ok(Some(sub))) = tokio::time::timeout(timeout, task).await {
            match sub.unsubscribe().await {
                Err(e) if !e.is_connection_loss() && !matches!(e, Error::Server { .. }) => {
                    return Err(e)
                }
                // The connection is gone, and the subscription with it.
                _ => {}
            }
        }
        Ok(())
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if !self.closed {
            self.session.inner().unregister(self.shared.key);
            self.shared.closing.cancel();
        }
    }
}

/// A message received by a [`Consumer`].
#[derive(Debug, Clone)]
pub struct Message {
    inner: RawMessage,
    generation: u64,
    key: Option<ProducerKey>,
    mode: SessionMode,
    consumer: Arc<ConsumerShared>,
}

impl Message {
    /// The destination it was sent to.
    pub fn destination(&self) -> &str {
        &self.inner.destination
    }

    /// The broker's `message-id`.
    pub fn message_id(&self) -> &str {
        &self.inner.message_id
    }

    /// Every MESSAGE header, including the application's own.
    pub fn headers(&self) -> &Headers {
        &self.inner.headers
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.header(name)
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.inner.body
    }

    /// The body as UTF-8 text, if it is.
    pub fn body_str(&self) -> Option<&str> {
        self.inner.body_str()
    }

    /// Whether the broker delivered it before (`redelivered:true`), e.g.
    /// to a consumer that failed or on the server that failed over.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The producer id it was sent with (`fmq-producer-id`), if any.
    pub fn producer_id(&self) -> Option<&str> {
        self.key.as_ref().map(|(p, _)| p.as_str())
    }

    /// Its producer's sequence number (`fmq-sequence`), if any.
    pub fn sequence(&self) -> Option<u64> {
        self.key.as_ref().map(|(_, s)| *s)
    }

    /// Acknowledges the message (in [`SessionMode::Client`] also every
    /// earlier one of its consumer). A no-op in [`SessionMode::Auto`]; in
    /// a transacted session, [`Session::commit`](super::Session::commit)
    /// acknowledges instead.
    ///
    /// The consumer remembers the acknowledgement. If the connection the
    /// message came on is gone, the broker delivers it again on the next
    /// connection, and the consumer then drops it and acknowledges it
    /// there: so this returns `Ok` in that case too.
    pub async fn ack(&self) -> Result<()> {
        match self.mode {
            SessionMode::Auto => return Ok(()),
            SessionMode::Transacted => {
                return Err(Error::Usage(
                    "messages of a transacted session are acknowledged by Session::commit".into(),
                ))
            }
            SessionMode::ClientIndividual => self
                .consumer
                .acknowledged(&identity(&self.inner), self.key.clone()),
            SessionMode::Client => {
                let (covered, duplicate) = {
                    let mut o = lock(&self.consumer.outstanding);
                    let own = identity(&self.inner);
                    let covered: Vec<_> = match o
                        .iter()
                        .position(|e| e.generation == self.generation && e.identity == own)
                    {
                        Some(at) => o.drain(..=at).map(|e| (e.identity, e.key)).collect(),
                        None => vec![(own, self.key.clone())],
                    };
                    // Only dropped duplicates left after it: one ACK of the
                    // last covers them all.
                    let duplicate = if o.iter().all(|e| e.hidden.is_some()) {
                        o.drain(..).last().and_then(|e| e.hidden)
                    } else {
                        None
                    };
                    (covered, duplicate)
                };
                for (id, key) in covered {
                    self.consumer.acknowledged(&id, key);
                }
                let sent = self.inner.ack().await;
                if let Some(d) = duplicate {
                    if sent.is_ok() {
                        let _ = d.ack().await;
                    }
                }
                if let Err(e) = sent {
                    tracing::debug!(error = %e, message_id = %self.inner.message_id,
                        "ACK not sent; the redelivery will be acknowledged");
                }
                return Ok(());
            }
        }
        if let Err(e) = self.inner.ack().await {
            tracing::debug!(error = %e, message_id = %self.inner.message_id,
                "ACK not sent; the redelivery will be acknowledged");
        }
        Ok(())
    }

    /// Rejects the message: the broker delivers it again (or, after too
    /// many attempts, moves it to the dead-letter queue). Not possible in
    /// [`SessionMode::Auto`] or a transacted session (roll back instead).
    pub async fn nack(&self) -> Result<()> {
        match self.mode {
            SessionMode::Auto | SessionMode::Transacted => Err(Error::Usage(format!(
                "cannot NACK a message of a {:?} session",
                self.mode
            ))),
            _ => match self.inner.nack().await {
                Err(e) if e.is_connection_loss() || matches!(e, Error::Server { .. }) => Ok(()),
                other => other,
            },
        }
    }
}
