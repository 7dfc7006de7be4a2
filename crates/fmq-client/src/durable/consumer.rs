//! [`Consumer`], its [`ConsumerOptions`], and the [`Message`]s it yields.
//!
//! A consumer outlives connections: each connection gets its own STOMP
//! subscription, served by a small task that forwards its messages, tagged
//! with the connection's generation, into the consumer's channel. The
//! consumer drops messages it acknowledged before (the [dedupe
//! window](super::dedupe)) and, in the acknowledging modes, messages whose
//! connection is gone (the broker redelivers those).
//!
//! Besides [`Consumer::receive`], a consumer can be read as a [`Stream`]
//! ([`Consumer::into_stream`], yielding [`Messages`]) or hand every message
//! to a handler on a task of its own ([`Consumer::listen`], giving a
//! [`Listener`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use fmq_proto::Headers;
use futures::future::BoxFuture;
use futures::stream::{FusedStream, Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

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

/// A delivery of a `client` or `client-individual` consumer not yet
/// acknowledged (nor rejected), in delivery order.
#[derive(Debug)]
struct Outstanding {
    generation: u64,
    identity: String,
    key: Option<ProducerKey>,
    /// The delivery, to NACK it on [`Session::recover`](super::Session::recover).
    message: RawMessage,
    /// A dropped duplicate (`client` mode) waiting for a cumulative ACK
    /// that covers it, rather than a message the application has.
    hidden: bool,
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
                forget_older(&mut o, generation);
                if o.iter().any(|e| !e.hidden) {
                    o.push_back(Outstanding {
                        generation,
                        identity: identity(message),
                        key: None,
                        message: message.clone(),
                        hidden: true,
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

    /// Whether the consumer was closed or lost.
    pub fn is_closed(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Forgets the deliveries the application has not acknowledged, for
    /// [`Session::recover`](super::Session::recover), and returns those to
    /// NACK so the broker delivers them again: in `client` mode the last
    /// one (a NACK there covers every earlier delivery of the
    /// subscription, as an ACK does), in `client-individual` mode each.
    /// Deliveries of a connection that is gone are left out: the broker
    /// redelivers them anyway.
    pub fn take_unacknowledged(&self) -> Vec<RawMessage> {
        let taken = std::mem::take(&mut *lock(&self.outstanding));
        let live = taken
            .into_iter()
            .filter(|e| e.message.client().is_connected());
        match self.mode {
            SessionMode::Client => live.last().map(|e| e.message).into_iter().collect(),
            SessionMode::ClientIndividual => {
                live.filter(|e| !e.hidden).map(|e| e.message).collect()
            }
            SessionMode::Auto | SessionMode::Transacted => Vec::new(),
        }
    }

    /// Forgets a delivery the application acknowledged (`client-individual`)
    /// or rejected (both modes; in `client` mode with every earlier one,
    /// the broker's NACK being cumulative there).
    fn settled(&self, generation: u64, identity: &str) {
        let mut o = lock(&self.outstanding);
        let at = o
            .iter()
            .position(|e| e.generation == generation && e.identity == identity);
        match (at, self.mode) {
            (Some(at), SessionMode::Client) => {
                o.drain(..=at);
            }
            (Some(at), _) => {
                o.remove(at);
            }
            (None, _) => {}
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

/// Drops the deliveries of connections older than `generation`: they can
/// no longer be acknowledged. Generations only grow and entries are pushed
/// in order, so the old ones are at the front and a delivery on the same
/// connection (every one but the first after a failover) costs one look.
fn forget_older(outstanding: &mut VecDeque<Outstanding>, generation: u64) {
    while outstanding
        .front()
        .is_some_and(|e| e.generation < generation)
    {
        outstanding.pop_front();
    }
}

/// Turns a delivery into a message for the application, or drops it: a
/// delivery of a lost connection (acknowledging modes) or one already
/// acknowledged. Records what the message's acknowledgement needs.
async fn accept(
    session: &SessionShared,
    shared: &Arc<ConsumerShared>,
    incoming: Incoming,
) -> Option<Message> {
    let Incoming {
        generation,
        message,
    } = incoming;
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
        SessionMode::Client | SessionMode::ClientIndividual => {
            let mut o = lock(&shared.outstanding);
            forget_older(&mut o, generation);
            o.push_back(Outstanding {
                generation,
                identity: id.clone(),
                key: key.clone(),
                message: message.clone(),
                hidden: false,
            });
        }
        SessionMode::Transacted => {
            if let Some(tx) = &session.tx {
                let received = Received {
                    message: message.clone(),
                    identity: id.clone(),
                    consumer: shared.clone(),
                    key: key.clone(),
                };
                if let Err(e) = tx
                    .lock()
                    .await
                    .receive(session.inner(), generation, received)
                {
                    tracing::debug!(error = %e, "message received in a transaction that can no longer commit");
                }
            }
        }
    }
    Some(Message {
        inner: message,
        generation,
        identity: id,
        key,
        mode,
        consumer: shared.clone(),
    })
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
        session.track(&shared);
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
            if let Some(m) = accept(&self.session, &self.shared, incoming).await {
                return Ok(Some(m));
            }
        }
    }

    /// The consumer as a [`Stream`] of its messages, which waits as long
    /// as it takes for the next one (no receive timeout).
    ///
    /// It is the same consumer read another way: it stays subscribed
    /// across failovers, drops redeliveries of what it acknowledged, and
    /// leaves acknowledging to the session's mode, exactly as
    /// [`receive`](Self::receive). The stream ends (`None`) once the
    /// connection is closed and the messages already received are read. It
    /// yields one error and then ends if the consumer is lost (a server
    /// refused to subscribe it again after a failover): the error
    /// [`receive`](Self::receive) returns then.
    ///
    /// Dropping the stream drops the consumer; [`Messages::close`] closes
    /// it waiting for the broker, as [`close`](Self::close) does.
    ///
    /// ```no_run
    /// # async fn demo(consumer: fmq_client::durable::Consumer) -> fmq_client::Result<()> {
    /// use futures::StreamExt;
    ///
    /// let mut messages = consumer.into_stream();
    /// while let Some(message) = messages.next().await {
    ///     let message = message?;
    ///     println!("{:?}", message.body_str());
    ///     message.ack().await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_stream(self) -> Messages {
        let shutdown = self.session.inner().shutdown.clone().cancelled_owned();
        Messages {
            consumer: self,
            accepting: None,
            shutdown: Box::pin(shutdown),
            done: false,
        }
    }

    /// Hands every message, in order, to `handler` on a task of its own
    /// (the JMS `MessageListener`), one at a time: the next message is
    /// handed over once the handler's future for the previous one is done.
    /// Must be called within a Tokio runtime.
    ///
    /// The consumer keeps working across failovers as with
    /// [`receive`](Self::receive). Acknowledgement follows the session's
    /// mode: in [`SessionMode::Auto`] a message is acknowledged as it is
    /// delivered; in the client modes the handler calls
    /// [`Message::ack`] (or [`Message::nack`]); in a transacted session it
    /// commits (the session can be shared with the handler in an `Arc`).
    ///
    /// The listener runs until [`Listener::stop`] is called or the
    /// [`Listener`] is dropped (it stops once the handler call under way
    /// returns, and closes the consumer), or until the consumer ends:
    ///
    /// * the connection was closed: the listener ends, and
    ///   [`Listener::stop`] returns `Ok(())`;
    /// * the consumer was lost (a server refused to subscribe it again
    ///   after a failover): the listener ends, and [`Listener::stop`]
    ///   returns that error.
    ///
    /// Nothing else ends it: failovers and times without messages are
    /// waited out. The errors [`receive`](Self::receive) returns are all of
    /// those two kinds, so none is retried. A handler that panics ends the
    /// listener too, and [`Listener::stop`] resumes the panic.
    ///
    /// Messages the broker sent ahead that the handler did not get before
    /// the listener stopped are redelivered to the next consumer in the
    /// client modes and in a transacted session (as after
    /// [`close`](Self::close)); in [`SessionMode::Auto`] the broker took
    /// them for acknowledged when it sent them, so they are lost. Use a
    /// client mode where that matters.
    ///
    /// ```no_run
    /// # async fn demo(connection: fmq_client::durable::Connection) -> fmq_client::Result<()> {
    /// use fmq_client::durable::SessionMode;
    ///
    /// let session = connection.session(SessionMode::ClientIndividual);
    /// let consumer = session.consumer("/queue/invoices").await?;
    /// let listener = consumer.listen(|message| async move {
    ///     println!("{:?}", message.body_str());
    ///     if let Err(e) = message.ack().await {
    ///         eprintln!("ACK failed: {e}");
    ///     }
    /// });
    /// // ... later:
    /// listener.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn listen<F, Fut>(self, mut handler: F) -> Listener
    where
        F: FnMut(Message) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let mut messages = self.into_stream();
        let task = tokio::spawn(async move {
            let ended = loop {
                // Stopping interrupts the wait for a message (the stream
                // keeps a delivery it is accepting), never the handler.
                let next = tokio::select! {
                    biased;
                    _ = stopping.cancelled() => break Ok(()),
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => handler(message).await,
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                }
            };
            let closed = messages.close().await;
            ended.and(closed)
        });
        Listener {
            stop,
            task: Some(task),
        }
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

/// The messages of a [`Consumer`], as a [`Stream`]: see
/// [`Consumer::into_stream`].
///
/// Dropping the future of [`StreamExt::next`] before it is ready (e.g. in
/// `tokio::select!`) loses no message.
pub struct Messages {
    consumer: Consumer,
    /// A delivery taken from the channel and being turned into a message.
    accepting: Option<BoxFuture<'static, Option<Message>>>,
    /// Ready once the connection is closed.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl Messages {
    /// The destination consumed.
    pub fn destination(&self) -> &str {
        self.consumer.destination()
    }

    /// Closes the consumer as [`Consumer::close`] does. A delivery the
    /// stream was still accepting is left unacknowledged (in the
    /// acknowledging modes the broker delivers it again).
    pub async fn close(self) -> Result<()> {
        let Messages {
            consumer,
            accepting,
            ..
        } = self;
        drop(accepting);
        consumer.close().await
    }
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages")
            .field("consumer", &self.consumer)
            .field("accepting", &self.accepting.is_some())
            .field("done", &self.done)
            .finish()
    }
}

impl Stream for Messages {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(accepting) = &mut this.accepting {
                let accepted = std::task::ready!(accepting.as_mut().poll(cx));
                this.accepting = None;
                match accepted {
                    Some(message) => return Poll::Ready(Some(Ok(message))),
                    None => continue,
                }
            }
            match this.consumer.rx.poll_recv(cx) {
                Poll::Ready(Some(incoming)) => {
                    let session = this.consumer.session.clone();
                    let shared = this.consumer.shared.clone();
                    this.accepting = Some(Box::pin(async move {
                        accept(&session, &shared, incoming).await
                    }));
                }
                Poll::Ready(None) => {
                    // The consumer was lost: the error `receive` returns.
                    this.done = true;
                    return Poll::Ready(match lock(&this.consumer.shared.lost).clone() {
                        None | Some(Error::Closed) => None,
                        Some(e) => Some(Err(e)),
                    });
                }
                Poll::Pending => {
                    if this.shutdown.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl FusedStream for Messages {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

/// A [`Consumer`] handing its messages to a handler on a task of its own:
/// see [`Consumer::listen`]. Dropping it stops it, as
/// [`stop`](Self::stop) does without waiting.
#[derive(Debug)]
pub struct Listener {
    stop: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Listener {
    /// Stops the listener once the handler call under way (if any)
    /// returns, closes the consumer (waiting for the broker, as
    /// [`Consumer::close`]), and returns why the listener ended: `Ok(())`
    /// when it was stopped or the connection was closed, the error that
    /// ended it otherwise (the consumer was lost, or closing it failed).
    /// Resumes the panic of a handler that panicked.
    pub async fn stop(mut self) -> Result<()> {
        self.stop.cancel();
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        match task.await {
            Ok(ended) => ended,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(Error::Closed),
        }
    }

    /// Whether the listener still runs: it was not stopped, and the
    /// consumer has not ended (see [`Consumer::listen`]).
    pub fn is_running(&self) -> bool {
        !self.stop.is_cancelled() && self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A message received by a [`Consumer`].
#[derive(Debug, Clone)]
pub struct Message {
    inner: RawMessage,
    generation: u64,
    /// Its identity in the consumer's dedupe window, as [`identity`] made
    /// it on delivery.
    identity: String,
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
            SessionMode::ClientIndividual => {
                self.consumer.settled(self.generation, &self.identity);
                self.consumer.acknowledged(&self.identity, self.key.clone());
            }
            SessionMode::Client => {
                let (covered, duplicate) = {
                    let mut o = lock(&self.consumer.outstanding);
                    let covered: Vec<_> = match o.iter().position(|e| {
                        e.generation == self.generation && e.identity == self.identity
                    }) {
                        Some(at) => o.drain(..=at).map(|e| (e.identity, e.key)).collect(),
                        None => vec![(self.identity.clone(), self.key.clone())],
                    };
                    // Only dropped duplicates left after it: one ACK of the
                    // last covers them all.
                    let duplicate = if o.iter().all(|e| e.hidden) {
                        o.drain(..).last().map(|e| e.message)
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
    /// many attempts, moves it to the dead-letter queue). In
    /// [`SessionMode::Client`] the broker takes it for a rejection of every
    /// earlier unacknowledged message of its consumer too, as with
    /// [`ack`](Self::ack). Not possible in [`SessionMode::Auto`] or a
    /// transacted session (roll back instead).
    pub async fn nack(&self) -> Result<()> {
        match self.mode {
            SessionMode::Auto | SessionMode::Transacted => Err(Error::Usage(format!(
                "cannot NACK a message of a {:?} session",
                self.mode
            ))),
            _ => {
                self.consumer.settled(self.generation, &self.identity);
                match self.inner.nack().await {
                    Err(e) if e.is_connection_loss() || matches!(e, Error::Server { .. }) => Ok(()),
                    other => other,
                }
            }
        }
    }
}
