//! [`Session`]: a JMS-style unit of work, with its acknowledgement mode or
//! its transaction.

use std::sync::{Arc, PoisonError, Weak};

use fmq_proto::{Command, Frame};
use tokio::sync::Mutex;

use super::connection::{is_transient, Connection, Inner, Link};
use super::consumer::{Consumer, ConsumerOptions, ConsumerShared};
use super::dedupe::ProducerKey;
use super::outbox::make_producer_id;
use super::producer::Producer;
use super::{DUPLICATE_HEADER, PRODUCER_ID_HEADER, SEQUENCE_HEADER};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::subscription::{AckMode, Message as RawMessage};

/// How a session's consumers acknowledge messages, or that the session is
/// transacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionMode {
    /// A message is acknowledged as it is delivered (STOMP `ack:auto`).
    #[default]
    Auto,
    /// [`Message::ack`](super::Message::ack) acknowledges the message and
    /// every earlier one of its consumer (`ack:client`).
    Client,
    /// [`Message::ack`](super::Message::ack) acknowledges exactly that
    /// message (`ack:client-individual`).
    ClientIndividual,
    /// Sends and receipts take effect together at [`Session::commit`], or
    /// not at all ([`Session::rollback`]). Persistent sends of a transacted
    /// session are not buffered while disconnected: a transaction lives on
    /// one connection. Each COMMIT carries the session's transaction key
    /// (`fmq-producer-id`/`fmq-sequence`), so its outcome can be learnt
    /// after a lost RECEIPT (see [`Session::commit`]).
    Transacted,
}

impl SessionMode {
    /// The SUBSCRIBE `ack` mode consumers of this session use.
    pub(crate) fn wire_ack(self) -> AckMode {
        match self {
            SessionMode::Auto => AckMode::Auto,
            SessionMode::Client => AckMode::Client,
            SessionMode::ClientIndividual | SessionMode::Transacted => AckMode::ClientIndividual,
        }
    }
}

/// A session: makes producers and consumers and, when transacted, groups
/// their work into transactions.
///
/// Sessions are cheap and need no round trip to make. A transacted session
/// always has a transaction open: it begins with the first send or receive
/// and ends with [`commit`](Self::commit) or [`rollback`](Self::rollback),
/// after which the next one begins.
#[derive(Debug)]
pub struct Session {
    pub(crate) shared: Arc<SessionShared>,
}

/// What a session's producers and consumers share with it.
#[derive(Debug)]
pub(crate) struct SessionShared {
    pub conn: Connection,
    pub mode: SessionMode,
    /// The open transaction of a transacted session.
    pub tx: Option<Mutex<TxState>>,
    /// The transaction key of a transacted session; held for the whole of
    /// a commit, so commits of one session run one at a time, in key order.
    commit_key: Option<Mutex<CommitKey>>,
    /// The session's consumers, for [`Session::recover`].
    consumers: std::sync::Mutex<Vec<Weak<ConsumerShared>>>,
}

impl Drop for SessionShared {
    fn drop(&mut self) {
        if let Some(key) = self.commit_key.take() {
            self.conn.inner.recycle_commit_key(key.into_inner());
        }
    }
}

/// The key every COMMIT of a transacted session carries: the session's own
/// producer id and a commit counter. The broker applies a COMMIT whose
/// sequence is not above the id's mark as a no-op, answered
/// `fmq-duplicate:true`; that is what settles a COMMIT whose RECEIPT was
/// lost.
///
/// One session uses a key at a time; a dropped session's key goes to the
/// next transacted session of the connection, its counter going on.
#[derive(Debug)]
pub(crate) struct CommitKey {
    /// `CLIENT-ID:tx-RANDOM:RANDOM`: made like a producer id, never used by
    /// a producer.
    producer: String,
    /// The sequence of the next COMMIT, from 1; moves once a COMMIT left.
    next: u64,
}

impl CommitKey {
    pub(crate) fn new(client_id: Option<&str>) -> CommitKey {
        let name = format!("tx-{:016x}", rand::random::<u64>());
        CommitKey {
            producer: make_producer_id(client_id, &name),
            next: 1,
        }
    }

    /// A COMMIT frame of transaction `id` under key `sequence`.
    fn frame(&self, id: &str, sequence: u64) -> Frame {
        Frame::new(Command::Commit)
            .header("transaction", id)
            .header(PRODUCER_ID_HEADER, self.producer.as_str())
            .header(SEQUENCE_HEADER, sequence.to_string())
    }
}

impl SessionShared {
    pub fn inner(&self) -> &Inner {
        &self.conn.inner
    }

    /// Records a new consumer of the session.
    pub fn track(&self, consumer: &Arc<ConsumerShared>) {
        self.open_consumers().push(Arc::downgrade(consumer));
    }

    /// The session's consumers that are open.
    fn consumers(&self) -> Vec<Arc<ConsumerShared>> {
        self.open_consumers()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The consumer list, closed consumers forgotten.
    fn open_consumers(&self) -> std::sync::MutexGuard<'_, Vec<Weak<ConsumerShared>>> {
        let mut consumers = self
            .consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        consumers.retain(|c| c.upgrade().is_some_and(|c| !c.is_closed()));
        consumers
    }
}

/// A received message awaiting the commit of its transaction.
#[derive(Debug)]
pub(crate) struct Received {
    pub message: RawMessage,
    /// Its identity in the consumer's dedupe window.
    pub identity: String,
    pub consumer: Arc<ConsumerShared>,
    pub key: Option<ProducerKey>,
}

/// The open transaction of a transacted session.
#[derive(Debug, Default)]
pub(crate) struct TxState {
    /// The connection generation the transaction lives on, set by its
    /// first send or receive.
    generation: Option<u64>,
    /// The server of that connection.
    server: Option<String>,
    /// The STOMP transaction id and its connection, once BEGIN left.
    begun: Option<(String, Client)>,
    /// Its SEND frames, kept to re-run a send-only transaction whose
    /// COMMIT receipt was lost.
    sends: Vec<Frame>,
    /// Messages received in it, acknowledged at commit.
    received: Vec<Received>,
    /// Set when the transaction can no longer commit: why.
    broken: Option<String>,
}

impl TxState {
    /// Records that the transaction can no longer commit.
    fn break_with(&mut self, reason: String) -> Error {
        if self.broken.is_none() {
            self.broken = Some(reason);
        }
        self.rolled_back()
    }

    fn rolled_back(&self) -> Error {
        Error::TransactionRolledBack(
            self.broken
                .clone()
                .unwrap_or_else(|| "the transaction was rolled back".into()),
        )
    }

    /// Checks the transaction is still on `link`'s connection, binding it
    /// to it if it is not bound yet.
    fn bind(&mut self, link: Option<&Link>) -> Result<()> {
        if self.broken.is_some() {
            return Err(self.rolled_back());
        }
        match (self.generation, link) {
            (None, Some(l)) => {
                self.generation = Some(l.generation);
                self.server = Some(l.server.clone());
                Ok(())
            }
            (Some(g), Some(l)) if g == l.generation && l.client.is_connected() => Ok(()),
            (Some(_), _) => {
                let server = self.server.clone().unwrap_or_default();
                let now = link.map(|l| format!("; now connected to {}", l.server));
                Err(self.break_with(format!(
                    "the connection to {server} was lost while the transaction was open{}; \
                     nothing of it was committed",
                    now.unwrap_or_default()
                )))
            }
            (None, None) => Err(Error::Unavailable("no connection to a server".into())),
        }
    }

    /// Binds to the current connection (waiting for one if the transaction
    /// is not bound yet) and sends BEGIN if it has not left yet. Returns
    /// the transaction id and its connection.
    async fn begin(&mut self, inner: &Inner) -> Result<(String, Client)> {
        let link = match self.generation {
            Some(_) => inner.link(),
            None => Some(inner.wait_link(inner.config.request_timeout).await?),
        };
        self.bind(link.as_ref())?;
        if let Some(begun) = &self.begun {
            return Ok(begun.clone());
        }
        let Some(link) = link else {
            return Err(Error::Unavailable("no connection to a server".into()));
        };
        let id = link.client.next_id("tx");
        if let Err(e) = link
            .client
            .write(Frame::new(Command::Begin).header("transaction", id.as_str()))
            .await
        {
            return Err(self.break_with(format!("BEGIN could not be sent: {e}")));
        }
        self.begun = Some((id.clone(), link.client.clone()));
        Ok((id, link.client))
    }

    /// Sends `frame` in the transaction.
    pub(crate) async fn send(&mut self, inner: &Inner, frame: Frame) -> Result<()> {
        let (id, client) = self.begin(inner).await?;
        let mut sent = frame.clone();
        sent.headers.push("transaction", id);
        if let Err(e) = client.write(sent).await {
            return Err(self.break_with(format!("the connection was lost: {e}")));
        }
        self.sends.push(frame);
        Ok(())
    }

    /// Records a message received in the transaction, on connection
    /// `generation`.
    pub(crate) fn receive(
        &mut self,
        inner: &Inner,
        generation: u64,
        received: Received,
    ) -> Result<()> {
        let bound = match inner.link().filter(|l| l.generation == generation) {
            Some(link) => self.bind(Some(&link)),
            None => Err(self.break_with(
                "the connection a message of the transaction arrived on was lost; \
                 nothing of it was committed"
                    .into(),
            )),
        };
        // Kept even when the transaction is broken: rollback and commit
        // account for it.
        self.received.push(received);
        bound
    }
}

impl Session {
    pub(crate) fn new(conn: Connection, mode: SessionMode) -> Session {
        let transacted = mode == SessionMode::Transacted;
        let tx = transacted.then(|| Mutex::new(TxState::default()));
        let commit_key = transacted.then(|| Mutex::new(conn.inner.commit_key()));
        Session {
            shared: Arc::new(SessionShared {
                conn,
                mode,
                tx,
                commit_key,
                consumers: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// The session's mode.
    pub fn mode(&self) -> SessionMode {
        self.shared.mode
    }

    /// A producer named `name` with default destination `destination`
    /// (`/queue/NAME` or `/topic/NAME`).
    ///
    /// The name identifies the producer across restarts: its producer id
    /// (the `fmq-producer-id` of its persistent sends) is derived from the
    /// client-id and the name and kept in the buffer directory, and its
    /// sequence numbers continue where the last run stopped. Producers of
    /// one connection with the same name share id and sequence.
    pub async fn producer(&self, name: &str, destination: &str) -> Result<Producer> {
        Producer::new(self.shared.clone(), name, destination).await
    }

    /// A consumer of a queue or topic, with default options.
    pub async fn consumer(&self, destination: &str) -> Result<Consumer> {
        self.consumer_with(destination, ConsumerOptions::default())
            .await
    }

    /// A consumer of a queue or topic with a selector, a prefetch limit or
    /// a durable subscription name.
    ///
    /// If a server is connected, the subscription is made before this
    /// returns, and a refusal (e.g. a durable subscription without a
    /// client-id) is returned. Otherwise the consumer subscribes as soon as
    /// a server is reached.
    pub async fn consumer_with(
        &self,
        destination: &str,
        options: ConsumerOptions,
    ) -> Result<Consumer> {
        Consumer::new(self.shared.clone(), destination, options).await
    }

    /// A durable subscriber to `topic` named `name`: the broker keeps the
    /// topic's messages for it while it is away (across failovers too, the
    /// subscription being replicated). Needs a client-id.
    pub async fn durable_subscriber(&self, topic: &str, name: &str) -> Result<Consumer> {
        self.consumer_with(topic, ConsumerOptions::durable(name))
            .await
    }

    /// Deletes the durable subscription `name` of this client-id, with the
    /// messages it kept. Its consumer must be closed first.
    pub async fn unsubscribe(&self, name: &str) -> Result<()> {
        let inner = self.shared.inner();
        let link = inner.wait_link(inner.config.request_timeout).await?;
        let frame = Frame::new(Command::Unsubscribe).header("activemq.subscriptionName", name);
        link.client
            .request_within(frame, inner.config.request_timeout)
            .await
            .map(|_| ())
    }

    fn tx(&self, what: &str) -> Result<&Mutex<TxState>> {
        self.shared
            .tx
            .as_ref()
            .ok_or_else(|| Error::Usage(format!("{what} needs a transacted session")))
    }

    /// Commits the open transaction: its sends are delivered and its
    /// received messages acknowledged, all together; then a new
    /// transaction begins.
    ///
    /// Returns [`Error::TransactionRolledBack`] when nothing was committed:
    /// the connection failed over while the transaction was open (or while
    /// COMMIT was being sent), or the server refused it.
    ///
    /// Every COMMIT carries the session's transaction key
    /// (`fmq-producer-id`/`fmq-sequence`, see `docs/dedupe.md`), and the
    /// broker applies a key once. If the connection drops after COMMIT
    /// left and before its RECEIPT, the outcome is settled on the next
    /// connection under the same key, within the request timeout:
    ///
    /// * a transaction of sends only is re-run there. It is applied once
    ///   either way: the broker drops the re-run whole if the first COMMIT
    ///   was applied. Returns `Ok(())`.
    /// * a transaction that acknowledged messages is settled with an empty
    ///   transaction under the same key. If the broker answers that the key
    ///   was committed already, the transaction was applied: `Ok(())`.
    ///   Otherwise the empty COMMIT took the key, so the first one can never
    ///   be applied any more, wherever it is: [`Error::TransactionRolledBack`],
    ///   its sends discarded and its messages redelivered.
    ///
    /// [`Error::TransactionInDoubt`] remains only when no server accepted
    /// that settling COMMIT within the request timeout, or a server refused
    /// it. Commits of one session run one at a time; one never waits longer
    /// than about twice the request timeout once the previous one ended.
    pub async fn commit(&self) -> Result<()> {
        let (Some(tx), Some(key)) = (&self.shared.tx, &self.shared.commit_key) else {
            return Err(Error::Usage("commit needs a transacted session".into()));
        };
        // Commits of a session go one at a time, so their keys reach the
        // broker in order (a lower key arriving after a higher one would be
        // taken for a duplicate).
        let mut key = key.lock().await;
        let mut tx = tx.lock().await;
        let state = std::mem::take(&mut *tx);
        drop(tx);
        commit(self.shared.inner(), state, &mut key).await
    }

    /// Rolls the open transaction back: its sends are discarded and the
    /// messages it received are given back to the broker for redelivery.
    /// Then a new transaction begins. Never fails for a lost connection
    /// (the broker rolls back by itself).
    pub async fn rollback(&self) -> Result<()> {
        let mut tx = self.tx("rollback")?.lock().await;
        let state = std::mem::take(&mut *tx);
        drop(tx);
        let inner = self.shared.inner();
        let timeout = inner.config.request_timeout;
        if let Some((id, client)) = &state.begun {
            if client.is_connected() {
                let abort = Frame::new(Command::Abort).header("transaction", id.as_str());
                if let Err(e) = client.request_within(abort, timeout).await {
                    tracing::debug!(error = %e, "ABORT failed; the broker rolls back on its own");
                }
            }
        }
        give_back(&state.received).await;
        Ok(())
    }
}

impl Session {
    /// Redelivers every message the session's consumers delivered and the
    /// application has not acknowledged (JMS `Session.recover`): each is
    /// rejected (NACK) and the broker delivers it again, with
    /// [`Message::redelivered`](super::Message::redelivered) set, to this
    /// session's consumer or another one. Returns once the broker
    /// confirmed the rejections (within the request timeout).
    ///
    /// Messages acknowledged before are not delivered again, nor are
    /// messages the consumers received but the application did not read
    /// yet (they come before the redeliveries). In
    /// [`SessionMode::ClientIndividual`] the redeliveries may come in
    /// another order than the first deliveries; in [`SessionMode::Client`]
    /// they keep it. Acknowledge no message of the session while this
    /// runs. A redelivery counts as an attempt towards the broker's
    /// dead-letter limit.
    ///
    /// Never fails for a lost connection: the broker then redelivers the
    /// messages of that connection by itself, and the consumers drop them
    /// meanwhile. A no-op in [`SessionMode::Auto`] (every message is
    /// acknowledged as it is delivered). A transacted session fails with
    /// [`Error::Usage`]: use [`rollback`](Self::rollback).
    pub async fn recover(&self) -> Result<()> {
        match self.shared.mode {
            SessionMode::Auto => return Ok(()),
            SessionMode::Transacted => {
                return Err(Error::Usage(
                    "recover is for sessions that are not transacted; roll back instead".into(),
                ))
            }
            SessionMode::Client | SessionMode::ClientIndividual => {}
        }
        let mut nacks: Vec<RawMessage> = self
            .shared
            .consumers()
            .iter()
            .flat_map(|c| c.take_unacknowledged())
            .collect();
        // The last NACK asks for a RECEIPT: the broker handles a
        // connection's frames in order, so all of them are applied then.
        let last = nacks.pop();
        for m in &nacks {
            if let Err(e) = m.nack().await {
                tracing::debug!(error = %e, message_id = %m.message_id, "NACK for recover failed; the message is redelivered after the connection ends");
            }
        }
        if let Some(m) = last {
            let timeout = self.shared.inner().config.request_timeout;
            if let Err(e) = m.nack_within(timeout).await {
                tracing::debug!(error = %e, message_id = %m.message_id, "NACK for recover failed; the message is redelivered after the connection ends");
            }
        }
        Ok(())
    }
}

/// NACKs messages received in a transaction that did not commit, so the
/// broker redelivers them now rather than when the connection ends.
async fn give_back(received: &[Received]) {
    for r in received {
        if r.message.client().is_connected() {
            if let Err(e) = r.message.nack().await {
                tracing::debug!(error = %e, "NACK after rollback failed; the message is redelivered anyway");
            }
        }
    }
}

/// Commits `tx` (taken out of the session, which starts afresh) under the
/// session's transaction key.
async fn commit(inner: &Inner, mut tx: TxState, key: &mut CommitKey) -> Result<()> {
    if let Some(reason) = tx.broken.take() {
        return Err(Error::TransactionRolledBack(reason));
    }
    if tx.generation.is_none() {
        return Ok(()); // nothing happened in it
    }
    let (id, client) = tx.begin(inner).await?;
    for r in &tx.received {
        let Ok(ack_id) = r.message.ack_id_for("ACK") else {
            continue;
        };
        let frame = Client::ack_frame(Command::Ack, ack_id, Some(&id));
        if let Err(e) = client.write(frame).await {
            return Err(Error::TransactionRolledBack(format!(
                "the connection was lost before COMMIT: {e}"
            )));
        }
    }
    let timeout = inner.config.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let sequence = key.next;
    let pending = match client.start_request(key.frame(&id, sequence)).await {
        Ok(p) => p,
        Err(e) => {
            // Not queued: the broker never sees this key, which the next
            // COMMIT may use.
            return Err(Error::TransactionRolledBack(format!(
                "COMMIT could not be sent: {e}"
            )));
        }
    };
    key.next += 1;
    let receipt = pending.receipt().to_owned();
    let error = match pending.wait_until(deadline).await {
        Ok(frame) if is_duplicate(&frame) => {
            // Only this session uses the key and it never repeats one, so
            // this is not expected; but the broker applied nothing.
            tracing::warn!(producer = %key.producer, sequence, "the server had this COMMIT's key already; nothing of the transaction was applied");
            give_back(&tx.received).await;
            return Err(Error::TransactionRolledBack(format!(
                "the server had the transaction key {}/{sequence} already and applied nothing",
                key.producer
            )));
        }
        Ok(_) => {
            tx.acknowledged();
            return Ok(());
        }
        Err(e) => e,
    };
    if client.refused(&receipt) && !is_transient(&error) {
        return Err(Error::TransactionRolledBack(format!(
            "the server refused the commit: {error}"
        )));
    }
    // COMMIT left; its outcome is unknown until a server answers for its
    // key.
    client.abort(error.clone());
    settle(inner, &tx, key, sequence, error).await
}

/// Whether a RECEIPT says the broker had its frame's key already.
fn is_duplicate(receipt: &Frame) -> bool {
    receipt.get(DUPLICATE_HEADER) == Some("true")
}

impl TxState {
    /// Remembers the transaction's messages as acknowledged, so the
    /// consumers drop redeliveries of them.
    fn acknowledged(&self) {
        for r in &self.received {
            r.consumer.acknowledged(&r.identity, r.key.clone());
        }
    }
}

/// Settles a transaction whose COMMIT (key `sequence`) left and whose
/// RECEIPT was lost, on a connection newer than the transaction's, before
/// the request timeout passes: a send-only transaction is run again under
/// the same key; one that acknowledged messages is replaced by an empty
/// transaction under the same key. Either way the broker applies at most
/// one COMMIT with the key, and says whether it had it already.
async fn settle(
    inner: &Inner,
    tx: &TxState,
    key: &CommitKey,
    sequence: u64,
    first: Error,
) -> Result<()> {
    let timeout = inner.config.request_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut after = tx.generation.unwrap_or(0);
    let mut last = first;
    let rerun = tx.received.is_empty();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let link = match inner.wait_link_after(after, left).await {
            Ok(l) => l,
            Err(e) => {
                return Err(Error::TransactionInDoubt(format!(
                    "the connection was lost after COMMIT was sent ({last}) and no server \
                     answered for the transaction in time ({e}); it may or may not have been applied"
                )))
            }
        };
        after = link.generation;
        let client = &link.client;
        let id = client.next_id("tx");
        let mut result = client
            .write(Frame::new(Command::Begin).header("transaction", id.as_str()))
            .await;
        if rerun {
            for frame in &tx.sends {
                if result.is_err() {
                    break;
                }
                let mut f = frame.clone();
                f.headers.push("transaction", id.as_str());
                result = client.write(f).await;
            }
        }
        if result.is_ok() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match client.start_request(key.frame(&id, sequence)).await {
                Ok(pending) => {
                    let receipt = pending.receipt().to_owned();
                    match pending.wait_until(tokio::time::Instant::now() + left).await {
                        Ok(frame) => return settled(&link, tx, key, sequence, &frame, &last),
                        Err(e) if client.refused(&receipt) && !is_transient(&e) => {
                            return Err(Error::TransactionInDoubt(format!(
                                "the connection was lost after COMMIT was sent ({last}) and the \
                                 server refused the COMMIT that was to settle it: {e}; the \
                                 transaction may or may not have been applied"
                            )))
                        }
                        Err(e) => result = Err(e),
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        if let Err(e) = result {
            client.abort(e.clone());
            last = e;
        }
    }
}

/// The outcome of a transaction whose COMMIT receipt was lost, from the
/// RECEIPT of the COMMIT that settled it.
fn settled(
    link: &Link,
    tx: &TxState,
    key: &CommitKey,
    sequence: u64,
    receipt: &Frame,
    lost: &Error,
) -> Result<()> {
    let applied_before = is_duplicate(receipt);
    let (server, producer) = (&link.server, &key.producer);
    if tx.received.is_empty() {
        if applied_before {
            tracing::info!(%server, %producer, sequence, "the COMMIT whose receipt was lost had been applied; its re-run was dropped");
        } else {
            tracing::info!(%server, %producer, sequence, "transaction re-run after a lost COMMIT receipt");
        }
        return Ok(());
    }
    if applied_before {
        tracing::info!(%server, %producer, sequence, "the COMMIT whose receipt was lost had been applied");
        tx.acknowledged();
        return Ok(());
    }
    tracing::info!(%server, %producer, sequence, "the COMMIT whose receipt was lost was not applied; its key is now taken");
    Err(Error::TransactionRolledBack(format!(
        "the connection was lost after COMMIT was sent ({lost}), and {server} confirmed \
         that the transaction was not applied and now never will be; its messages will be \
         redelivered"
    )))
}
