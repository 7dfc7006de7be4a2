//! The dispatch engine: one task that owns every queue, topic, subscription
//! and session's delivery state.
//!
//! Sessions parse and validate frames, then send [`Cmd`]s here. The engine
//! applies each command to memory, collects the store operations it implies
//! into one [`Batch`], commits that batch (the store groups concurrent
//! commits into one fsync), and dispatches to consumers. Owning all state in
//! one task keeps every ordering question (FIFO per producer, redelivery
//! order, ack vs. dispatch races) trivially answered, and the store's writer
//! thread, not this task, does the slow part.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use fmq_proto::{Command, Frame};
use fmq_selector::Selector;
use fmq_store::{Batch, Cf, Commit, Store};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::dedupe::{Marks, ProducerSeq, Verdict, DUPLICATES_HEADER, DUPLICATE_HEADER};
use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::message::{now_ms, Entry, Message, SelectorView};
use crate::queue::{ConsumerKey, Queue, QueueKey};

/// Session ids are unique for the life of the process.
pub type SessionId = u64;

/// How a subscription acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Acknowledged once written to the socket.
    Auto,
    /// ACK acknowledges this and every earlier message of the subscription.
    Client,
    /// ACK acknowledges one message.
    ClientIndividual,
}

/// What a session's writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Write a frame the session made (CONNECTED, RECEIPT, ERROR).
    Frame(Frame),
    /// Write a MESSAGE delivery.
    Message {
        /// The frame.
        frame: Frame,
        /// For auto-ack deliveries: (subscription id, message id) to report
        /// back once written, which acknowledges it.
        auto_ack: Option<(Arc<str>, u64)>,
        /// The store batch that wrote the message (0: recovered from the
        /// store, or not stored): the writer holds the frame, and every
        /// later one, until the engine's [`DurableBatches`] reaches it. A consumer
        /// never sees a message that a crash could still take back (a SEND
        /// whose RECEIPT was lost, a transaction the broker then reports
        /// rolled back), which it could not tell from a new one.
        after: u64,
    },
    /// Flush and close the connection.
    Close,
}

/// Where a session receives frames from the engine.
pub type OutboundTx = mpsc::UnboundedSender<Outbound>;

/// The engine's number of the last store batch known durable (written,
/// synced if it asked, and confirmed by the passive server in replicated
/// mode), with every batch before it. Batches are numbered from 1 in commit
/// order.
pub type DurableBatches = watch::Receiver<u64>;

/// Resolves once the store write carrying a command is applied (and synced
/// if the command asked). Shared because every command the engine handles in
/// one wake-up goes into one store batch.
pub type Durable = futures::future::Shared<Commit>;

/// The successful answer to a command that may need a durable store write.
#[derive(Debug)]
pub struct Done {
    /// Resolves once the store write is applied (and synced if asked); the
    /// RECEIPT waits for it.
    pub durable: Durable,
    /// Headers the RECEIPT carries besides `receipt-id` (`fmq-duplicate` for
    /// a SEND dropped as a duplicate, `fmq-duplicates` for a COMMIT).
    pub receipt_headers: ReceiptHeaders,
}

/// Extra RECEIPT headers.
pub type ReceiptHeaders = Vec<(&'static str, String)>;

/// The reply to commands that may need a durable store write.
pub type CommitReply = oneshot::Sender<Result<Done, String>>;

/// What a SUBSCRIBE asks for.
#[derive(Debug)]
pub struct SubscribeReq {
    /// Subscription id (the `id` header).
    pub id: Arc<str>,
    /// Where.
    pub destination: Destination,
    /// Ack mode.
    pub ack: AckMode,
    /// Most unacknowledged deliveries at once.
    pub prefetch: usize,
    /// Message filter.
    pub selector: Option<Selector>,
    /// Durable subscription name (topics only).
    pub durable: Option<Arc<str>>,
    /// Make the store write durable before replying.
    pub sync: bool,
    /// Attach without delivering until [`Cmd::Resume`]: used when the client
    /// asked for a RECEIPT, so the RECEIPT precedes the first MESSAGE.
    pub paused: bool,
}

/// One buffered ACK or NACK of a transaction.
#[derive(Debug, Clone, Copy)]
pub struct AckReq {
    /// Message id from the `id`/`message-id` header.
    pub message_id: u64,
    /// NACK instead of ACK.
    pub nack: bool,
}

/// Commands sessions and the server send to the engine.
#[derive(Debug)]
pub enum Cmd {
    /// A session completed CONNECT.
    Open {
        /// Session.
        session: SessionId,
        /// Its outbound queue.
        out: OutboundTx,
        /// `client-id` header, needed for durable subscriptions.
        client_id: Option<String>,
        /// Refused when the client id is in use; else where the session's
        /// writer learns which deliveries it may write.
        reply: oneshot::Sender<Result<DurableBatches, String>>,
    },
    /// A session ended: its unacknowledged messages are redelivered and its
    /// client-id is free again.
    Close {
        /// Session.
        session: SessionId,
        /// Answered once that is done (DISCONNECT's RECEIPT waits for it).
        reply: Option<CommitReply>,
    },
    /// A SEND outside a transaction.
    Send {
        /// Session.
        session: SessionId,
        /// The message (id assigned here).
        message: Message,
        /// Producer id and sequence, when the SEND asks for duplicate
        /// detection.
        producer: Option<ProducerSeq>,
        /// Make it durable before replying; `None` for fire-and-forget.
        reply: Option<CommitReply>,
        /// Whether the reply waits for a sync.
        sync: bool,
    },
    /// A SUBSCRIBE.
    Subscribe {
        /// Session.
        session: SessionId,
        /// What.
        req: SubscribeReq,
        /// Outcome.
        reply: CommitReply,
    },
    /// An UNSUBSCRIBE.
    Unsubscribe {
        /// Session.
        session: SessionId,
        /// Subscription id.
        id: Option<Arc<str>>,
        /// Durable subscription to delete.
        durable: Option<Arc<str>>,
        /// Outcome.
        reply: CommitReply,
    },
    /// An ACK or NACK outside a transaction.
    Ack {
        /// Session.
        session: SessionId,
        /// What.
        ack: AckReq,
        /// Whether the reply waits for a sync.
        sync: bool,
        /// Outcome.
        reply: CommitReply,
    },
    /// COMMIT of a transaction's sends and acks, applied as one batch.
    /// Sends that carry a producer id and sequence are checked for
    /// duplicates here, in order, and their marks written in the same batch.
    ///
    /// A COMMIT with a key (its own producer id and sequence) is checked
    /// against that producer's mark first: a duplicate applies nothing (no
    /// ack, no send, no ack validation) and is answered with
    /// `fmq-duplicate:true`; a fresh one moves the mark in the batch that
    /// holds the transaction's effects.
    Commit {
        /// Session.
        session: SessionId,
        /// The transaction's key (`fmq-producer-id`/`fmq-sequence` of the
        /// COMMIT frame), if any.
        key: Option<ProducerSeq>,
        /// Sends in order, each with its producer id and sequence if any.
        sends: Vec<(Message, Option<ProducerSeq>)>,
        /// Acks in order.
        acks: Vec<AckReq>,
        /// Outcome once durable.
        reply: CommitReply,
    },
    /// Auto-ack deliveries that reached the socket.
    Written {
        /// Session.
        session: SessionId,
        /// (subscription, message id).
        items: Vec<(Arc<str>, u64)>,
    },
    /// Statistics for `fmq status`.
    Stats {
        /// Answer.
        reply: oneshot::Sender<Stats>,
    },
    /// Starts deliveries to a subscription attached paused.
    Resume {
        /// Session.
        session: SessionId,
        /// Subscription id.
        id: Arc<str>,
    },
    /// Periodic housekeeping (expiry, forgetting idle producers).
    Tick,
    /// Commit whatever is collected, synced; used at shutdown.
    Flush {
        /// The final commit.
        reply: CommitReply,
    },
}

/// One queue's figures.
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// Name as operators see it.
    pub name: String,
    /// Waiting for a consumer.
    pub pending: usize,
    /// Delivered, not acknowledged.
    pub inflight: usize,
    /// Consumers attached.
    pub consumers: usize,
    /// Ever enqueued since start.
    pub enqueued: u64,
    /// Ever dequeued since start.
    pub dequeued: u64,
}

/// Broker figures.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Connected sessions.
    pub sessions: usize,
    /// Queues and subscriptions.
    pub queues: Vec<QueueStats>,
    /// Messages accepted since start.
    pub messages_in: u64,
    /// Messages delivered since start.
    pub messages_out: u64,
    /// Messages moved to the dead-letter queue since start.
    pub dead_lettered: u64,
    /// Messages expired since start.
    pub expired: u64,
    /// Store sequence number.
    pub store_sequence: u64,
    /// SENDs and keyed COMMITs dropped as duplicates since start (see
    /// [`crate::dedupe`]).
    pub duplicates: u64,
    /// Producer ids whose dedupe mark is tracked.
    pub producers: usize,
    /// Producer marks forgotten since start after the retention.
    pub producers_pruned: u64,
    /// Producer marks forgotten since start to stay within the bound.
    pub producers_evicted: u64,
}

#[derive(Debug)]
struct Consumer {
    queue: QueueKey,
    ack: AckMode,
    prefetch: usize,
    selector: Option<Selector>,
    /// Delivered and unacknowledged, in delivery order.
    delivered: VecDeque<u64>,
    /// Attached but not yet receiving (see [`SubscribeReq::paused`]).
    paused: bool,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        !self.paused && self.delivered.len() < self.prefetch
    }
}

#[derive(Debug)]
struct SessionState {
    out: OutboundTx,
    client_id: Option<Arc<str>>,
    consumers: HashMap<Arc<str>, Consumer>,
    /// Message id -> subscription id, for ACKs that name only the message.
    delivered: HashMap<u64, Arc<str>>,
}

/// A committed batch: its number and its outcome.
type Committed = (u64, Durable);

/// The engine's state. Built by [`Engine::recover`], driven by [`Engine::run`].
pub struct Engine {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    queues: HashMap<QueueKey, Queue>,
    topics: HashMap<Arc<str>, Vec<QueueKey>>,
    sessions: HashMap<SessionId, SessionState>,
    client_ids: HashMap<Arc<str>, SessionId>,
    /// Stored entries referencing each persistent message.
    refs: HashMap<u64, u32>,
    /// Per-producer high-water marks for duplicate detection.
    marks: Marks,
    batch: Batch,
    next_id: u64,
    dead: Vec<(Arc<Message>, String)>,
    stats: Stats,
    /// Replies waiting for the batch of the current wake-up.
    waiters: Vec<(CommitReply, Result<ReceiptHeaders, String>)>,
    /// Whether a waiter of the current wake-up asked for a sync.
    sync_wanted: bool,
    /// The number of the batch the current wake-up builds.
    batch_no: u64,
    /// Committed batches, in order, for the task that tracks which are
    /// durable ([`track_durable`], started by [`Engine::run`]).
    committed: mpsc::UnboundedSender<Committed>,
    /// That task's ends until it starts.
    tracker: Option<(mpsc::UnboundedReceiver<Committed>, watch::Sender<u64>)>,
    /// What the tracker reports.
    durable: DurableBatches,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("queues", &self.queues.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

const META_ID_BLOCK: &[u8] = b"message_id_block";

fn corrupt(what: &'static str, detail: impl Into<String>) -> Error {
    Error::Corrupt {
        what,
        detail: detail.into(),
    }
}

/// Stored form of a durable subscription: topic and selector text.
fn encode_subscription(topic: &str, selector: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(selector.unwrap_or("").as_bytes());
    out
}

fn decode_subscription(bytes: &[u8]) -> Option<(String, Option<String>)> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(bytes.get(4..4 + len)?).ok()?.to_owned();
    let sel = std::str::from_utf8(bytes.get(4 + len..)?).ok()?;
    Some((topic, (!sel.is_empty()).then(|| sel.to_owned())))
}

impl Engine {
    /// Loads every queue, durable subscription and message from the store.
    pub fn recover(store: Arc<dyn Store>, config: Arc<Config>) -> Result<Engine> {
        // Message ids: a new block of 2^32 per start, so ids never repeat
        // even though the counter itself is not stored per message.
        let block = match store.get(Cf::Meta, META_ID_BLOCK)? {
            Some(v) => fmq_store::decode_sequence(&v)? + 1,
            None => 1,
        };
        let mut batch = Batch::new();
        batch.put(
            Cf::Meta,
            META_ID_BLOCK.to_vec(),
            block.to_be_bytes().to_vec(),
        );
        batch.set_sync(true);
        drop(store.commit(batch));
        store.sync()?;

        let marks = Marks::new(config.dedupe_retention, config.dedupe_max_producers);
        let (committed, committed_rx) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(0);
        let mut engine = Engine {
            store: store.clone(),
            config,
            queues: HashMap::new(),
            topics: HashMap::new(),
            sessions: HashMap::new(),
            client_ids: HashMap::new(),
            refs: HashMap::new(),
            marks,
            batch: Batch::new(),
            next_id: block << 32,
            dead: Vec::new(),
            stats: Stats::default(),
            waiters: Vec::new(),
            sync_wanted: false,
            batch_no: 1,
            committed,
            tracker: Some((committed_rx, durable_tx)),
            durable,
        };

        store.scan_prefix(Cf::Destinations, b"", &mut |k, _| {
            if let Some(key @ QueueKey::Named(_)) = QueueKey::decode(k) {
                engine.queues.insert(key.clone(), Queue::new(key));
            }
            Ok(())
        })?;
        let mut subs = Vec::new();
        store.scan_prefix(Cf::Subscriptions, b"", &mut |k, v| {
            subs.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        for (k, v) in subs {
            let key = QueueKey::decode(&k)
                .ok_or_else(|| corrupt("subscription", format!("bad key {k:?}")))?;
            let (topic, selector) = decode_subscription(&v).ok_or_else(|| {
                corrupt("subscription", format!("bad value for {}", key.display()))
            })?;
            let selector = match selector {
                Some(text) => Some(
                    Selector::parse(&text).map_err(|e| corrupt("subscription", e.to_string()))?,
                ),
                None => None,
            };
            engine.add_subscription_queue(key, topic.into(), selector);
        }

        let mut messages: HashMap<u64, Arc<Message>> = HashMap::new();
        let mut failure = None;
        store.scan_prefix(Cf::Messages, b"", &mut |k, v| {
            let id = match <[u8; 8]>::try_from(k) {
                Ok(b) => u64::from_be_bytes(b),
                Err(_) => {
                    failure = Some(corrupt("message", format!("key of {} bytes", k.len())));
                    return Ok(());
                }
            };
            match Message::decode(id, v) {
                Ok(m) => {
                    messages.insert(id, Arc::new(m));
                }
                Err(e) => failure = Some(e),
            }
            Ok(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let mut orphans = Batch::new();
        let mut entries = Vec::new();
        store.scan_prefix(Cf::QueueEntries, b"", &mut |k, v| {
            entries.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        for (k, v) in entries {
            let Some((key, id)) = QueueKey::split_entry_key(&k) else {
                return Err(corrupt("queue entry", format!("bad key {k:?}")));
            };
            let deliveries = v
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            let (Some(message), Some(queue)) = (messages.get(&id), engine.queues.get_mut(&key))
            else {
                tracing::warn!(queue = %key.display(), id, "dropping a stored entry whose message or queue is missing");
                orphans.delete(Cf::QueueEntries, k);
                continue;
            };
            queue.push_back(Entry {
                message: message.clone(),
                deliveries,
                batch: 0,
            });
            *engine.refs.entry(id).or_insert(0) += 1;
        }
        for id in messages.keys() {
            if !engine.refs.contains_key(id) {
                orphans.delete(Cf::Messages, id.to_be_bytes().to_vec());
            }
        }
        // Producer marks, minus those idle past the retention or beyond the
        // bound (a smaller bound than the store was written with).
        let mut marks = Vec::new();
        store.scan_prefix(Cf::Dedupe, b"", &mut |k, v| {
            marks.push((k.to_vec(), v.to_vec()));
            Ok(())
        })?;
        for (k, v) in marks {
            let producer = fmq_store::dedupe::producer(&k)?;
            let mark = fmq_store::dedupe::decode(&v)?;
            engine.marks.load(producer, mark);
        }
        let forgotten = engine.marks.prune(now_ms(), &mut orphans);
        if forgotten > 0 {
            tracing::info!(
                producers = forgotten,
                "forgot dedupe marks of idle producers"
            );
        }
        if !orphans.is_empty() {
            drop(store.commit(orphans));
        }
        let total: usize = engine.queues.values().map(Queue::pending_len).sum();
        tracing::info!(
            queues = engine.queues.len(),
            messages = total,
            producers = engine.marks.len(),
            sequence = store.last_sequence(),
            "recovered broker state from the store"
        );
        Ok(engine)
    }

    /// Serves commands until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        if let Some((committed, durable)) = self.tracker.take() {
            tokio::spawn(track_durable(committed, durable));
        }
        let mut cmds = Vec::with_capacity(256);
        while rx.recv_many(&mut cmds, 256).await > 0 {
            for cmd in cmds.drain(..) {
                self.handle(cmd);
            }
            self.finish();
        }
        self.finish();
        tracing::debug!("engine stopped");
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues a reply for the end of this wake-up.
    fn reply(&mut self, reply: CommitReply, result: Result<(), String>, sync: bool) {
        self.reply_with(reply, result.map(|()| Vec::new()), sync);
    }

    /// Queues a reply whose RECEIPT carries extra headers.
    fn reply_with(
        &mut self,
        reply: CommitReply,
        result: Result<ReceiptHeaders, String>,
        sync: bool,
    ) {
        self.sync_wanted |= sync && result.is_ok();
        self.waiters.push((reply, result));
    }

    /// Commits everything the commands of this wake-up changed as one batch
    /// and hands its completion to every waiter.
    fn finish(&mut self) {
        self.process_dead();
        let sync = std::mem::take(&mut self.sync_wanted);
        let mut batch = std::mem::take(&mut self.batch);
        let durable = if batch.is_empty() && !sync {
            if self.waiters.is_empty() {
                return; // nothing written, nobody to answer
            }
            futures::FutureExt::shared(Commit::ready(Ok(self.store.last_sequence())))
        } else {
            batch.set_sync(sync);
            let durable = futures::FutureExt::shared(self.store.commit(batch));
            let _ = self.committed.send((self.batch_no, durable.clone()));
            self.batch_no += 1;
            durable
        };
        for (reply, result) in self.waiters.drain(..) {
            let _ = reply.send(result.map(|receipt_headers| Done {
                durable: durable.clone(),
                receipt_headers,
            }));
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open {
                session,
                out,
                client_id,
                reply,
            } => {
                let client_id: Option<Arc<str>> = client_id.map(Into::into);
                if let Some(cid) = &client_id {
                    if self.client_ids.contains_key(cid) {
                        let _ = reply.send(Err(format!("client-id '{cid}' is already connected")));
                        return;
                    }
                    self.client_ids.insert(cid.clone(), session);
                }
                self.sessions.insert(
                    session,
                    SessionState {
                        out,
                        client_id,
                        consumers: HashMap::new(),
                        delivered: HashMap::new(),
                    },
                );
                let _ = reply.send(Ok(self.durable.clone()));
            }
            Cmd::Close { session, reply } => {
                self.close_session(session);
                if let Some(reply) = reply {
                    self.reply(reply, Ok(()), true);
                }
            }
            Cmd::Send {
                session: _,
                message,
                producer,
                reply,
                sync,
            } => {
                if self.check_duplicate(&message, producer.as_ref(), now_ms()) {
                    // The RECEIPT of a duplicate waits for a synced write:
                    // the mark it was checked against may come from a batch
                    // that is applied but not yet durable, and a sync makes
                    // every earlier batch durable too.
                    if let Some(reply) = reply {
                        self.reply_with(reply, Ok(vec![(DUPLICATE_HEADER, "true".into())]), true);
                    }
                    return;
                }
                self.accept(message);
                if let Some(reply) = reply {
                    self.reply(reply, Ok(()), sync);
                }
            }
            Cmd::Subscribe {
                session,
                req,
                reply,
            } => {
                let sync = req.sync;
                let result = self.subscribe(session, req);
                self.reply(reply, result, sync);
            }
            Cmd::Unsubscribe {
                session,
                id,
                durable,
                reply,
            } => {
                let result = self.unsubscribe(session, id, durable);
                self.reply(reply, result, true);
            }
            Cmd::Ack {
                session,
                ack,
                sync,
                reply,
            } => {
                let result = self
                    .check_acks(session, &[ack])
                    .map(|()| self.apply_ack(session, ack));
                self.reply(reply, result, sync);
            }
            Cmd::Commit {
                session,
                key,
                sends,
                acks,
                reply,
            } => {
                let now = now_ms();
                if let Some(key) = key.as_ref().filter(|k| self.marks.is_duplicate(k)) {
                    // A transaction with this key was committed already (or
                    // its key taken by an empty COMMIT): this one is a no-op
                    // success, whatever its acks name. Checking the mark
                    // refreshes the producer's idle time and counts the
                    // duplicate; like a duplicate SEND, the RECEIPT waits
                    // for a synced write so the mark it matched is durable.
                    self.marks.check(key, true, now, &mut self.batch);
                    tracing::debug!(
                        producer = %key.producer,
                        sequence = key.sequence,
                        sends = sends.len(),
                        acks = acks.len(),
                        "dropping a duplicate commit"
                    );
                    self.reply_with(reply, Ok(vec![(DUPLICATE_HEADER, "true".into())]), true);
                    return;
                }
                // Validate first so a failing transaction changes nothing,
                // its key's mark included.
                let result = self.check_acks(session, &acks).map(|()| {
                    if let Some(key) = &key {
                        // Fresh (checked above, and nothing ran since): the
                        // mark is written in this transaction's batch.
                        self.marks.check(key, true, now, &mut self.batch);
                    }
                    for ack in acks {
                        self.apply_ack(session, ack);
                    }
                    let mut duplicates = 0u64;
                    for (message, producer) in sends {
                        if self.check_duplicate(&message, producer.as_ref(), now) {
                            duplicates += 1;
                        } else {
                            self.accept(message);
                        }
                    }
                    if duplicates == 0 {
                        Vec::new()
                    } else {
                        vec![(DUPLICATES_HEADER, duplicates.to_string())]
                    }
                });
                self.reply_with(reply, result, true);
            }
            Cmd::Written { session, items } => {
                for (sub, id) in items {
                    self.ack_written(session, &sub, id);
                }
            }
            Cmd::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Cmd::Resume { session, id } => {
                let key = self
                    .sessions
                    .get_mut(&session)
                    .and_then(|s| s.consumers.get_mut(&id))
                    .map(|c| {
                        c.paused = false;
                        c.queue.clone()
                    });
                if let Some(key) = key {
                    self.dispatch(&key);
                }
            }
            Cmd::Flush { reply } => self.reply(reply, Ok(()), true),
            Cmd::Tick => {
                self.expire();
                let forgotten = self.marks.prune(now_ms(), &mut self.batch);
                if forgotten > 0 {
                    tracing::info!(
                        producers = forgotten,
                        "forgot dedupe marks of producers idle longer than the retention"
                    );
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let mut queues: Vec<QueueStats> = self
            .queues
            .values()
            .map(|q| QueueStats {
                name: q.key.display(),
                pending: q.pending_len(),
                inflight: q.inflight.len(),
                consumers: q.consumers.len(),
                enqueued: q.enqueued,
                dequeued: q.dequeued,
            })
            .collect();
        queues.sort_by(|a, b| a.name.cmp(&b.name));
        let dedupe = self.marks.counters();
        Stats {
            sessions: self.sessions.len(),
            queues,
            store_sequence: self.store.last_sequence(),
            duplicates: dedupe.duplicates,
            producers: self.marks.len(),
            producers_pruned: dedupe.pruned,
            producers_evicted: dedupe.evicted,
            ..self.stats.clone()
        }
    }

    fn ensure_named_queue(&mut self, name: &Arc<str>) -> QueueKey {
        let key = QueueKey::Named(name.clone());
        if !self.queues.contains_key(&key) {
            self.batch.put(Cf::Destinations, key.encode(), Vec::new());
            self.queues.insert(key.clone(), Queue::new(key.clone()));
        }
        key
    }

    fn add_subscription_queue(
        &mut self,
        key: QueueKey,
        topic: Arc<str>,
        selector: Option<Selector>,
    ) {
        let mut q = Queue::new(key.clone());
        q.topic = Some(topic.clone());
        q.selector = selector;
        self.queues.insert(key.clone(), q);
        self.topics.entry(topic).or_default().push(key);
    }

    /// Checks a send against its producer's mark. Returns true for a
    /// duplicate, which must be dropped; a fresh persistent send has put its
    /// producer's new mark into the batch that will also store the message.
    fn check_duplicate(
        &mut self,
        message: &Message,
        producer: Option<&ProducerSeq>,
        now: u64,
    ) -> bool {
        let Some(producer) = producer else {
            return false;
        };
        match self
            .marks
            .check(producer, message.persistent, now, &mut self.batch)
        {
            Verdict::Fresh => false,
            Verdict::Duplicate => {
                tracing::debug!(
                    producer = %producer.producer,
                    sequence = producer.sequence,
                    destination = %message.destination,
                    "dropping a duplicate send"
                );
                true
            }
        }
    }

    /// Accepts a message: stores it with its entries and dispatches it.
    fn accept(&mut self, mut message: Message) {
        message.id = self.next_id();
        self.stats.messages_in += 1;
        let message = Arc::new(message);
        let targets: Vec<QueueKey> = match &message.destination {
            Destination::Queue(name) => vec![self.ensure_named_queue(name)],
            Destination::Topic(name) => self
                .topics
                .get(name)
                .map(|keys| {
                    keys.iter()
                        .filter(|k| {
                            self.queues.get(k).is_some_and(|q| {
                                q.selector
                                    .as_ref()
                                    .is_none_or(|s| s.matches(&SelectorView(&message)))
                            })
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        };
        let stores = |key: &QueueKey| message.persistent && key.persistent();
        let stored =
            u32::try_from(targets.iter().filter(|k| stores(k)).count()).unwrap_or(u32::MAX);
        // Deliveries of a stored message wait for this wake-up's batch.
        let batch = if stored > 0 { self.batch_no } else { 0 };
        for key in &targets {
            if stores(key) {
                self.batch.put(
                    Cf::QueueEntries,
                    key.entry_key(message.id),
                    0u32.to_be_bytes().to_vec(),
                );
            }
            if let Some(q) = self.queues.get_mut(key) {
                q.push_back(Entry {
                    message: message.clone(),
                    deliveries: 0,
                    batch,
                });
            }
        }
        if stored > 0 {
            self.batch.put(
                Cf::Messages,
                message.id.to_be_bytes().to_vec(),
                message.encode(),
            );
            self.refs.insert(message.id, stored);
        }
        for key in targets {
            self.dispatch(&key);
        }
    }

    /// Removes an entry for good (acknowledged, expired or dead-lettered).
    fn forget(&mut self, key: &QueueKey, message: &Message) {
        if let Some(q) = self.queues.get_mut(key) {
            q.dequeued += 1;
        }
        if !(message.persistent && key.persistent()) {
            return;
        }
        self.batch
            .delete(Cf::QueueEntries, key.entry_key(message.id));
        if let Some(n) = self.refs.get_mut(&message.id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&message.id);
                self.batch
                    .delete(Cf::Messages, message.id.to_be_bytes().to_vec());
            }
        }
    }

    /// Puts an unacknowledged entry back, or dead-letters it past the limit.
    fn requeue(&mut self, key: &QueueKey, mut entry: Entry) {
        entry.deliveries += 1;
        if entry.deliveries > self.config.max_redeliveries {
            let reason = format!(
                "delivered {} times without acknowledgement (limit {})",
                entry.deliveries, self.config.max_redeliveries
            );
            self.forget(key, &entry.message);
            self.dead.push((entry.message, reason));
            return;
        }
        if entry.message.persistent && key.persistent() {
            self.batch.put(
                Cf::QueueEntries,
                key.entry_key(entry.message.id),
                entry.deliveries.to_be_bytes().to_vec(),
            );
        }
        if let Some(q) = self.queues.get_mut(key) {
            q.push_front(entry);
        }
    }

    /// Moves dead messages to the dead-letter queue.
    fn process_dead(&mut self) {
        while !self.dead.is_empty() {
            let dead = std::mem::take(&mut self.dead);
            for (message, reason) in dead {
                self.stats.dead_lettered += 1;
                let dlq: Arc<str> = self.config.dead_letter_queue.as_str().into();
                if message.destination == Destination::Queue(dlq.clone()) {
                    tracing::warn!(
                        id = message.id,
                        "dropping a message that failed in the dead-letter queue itself"
                    );
                    continue;
                }
                tracing::info!(id = message.id, from = %message.destination, %reason, "message moved to the dead-letter queue");
                let mut headers = message.headers.clone();
                headers.set("original-destination", message.destination.to_string());
                headers.set("dlq-reason", reason);
                self.accept(Message {
                    id: 0,
                    destination: Destination::Queue(dlq),
                    headers,
                    body: message.body.clone(),
                    persistent: message.persistent,
                    priority: message.priority,
                    expires: 0,
                    timestamp: message.timestamp,
                });
            }
        }
    }

    fn subscribe(&mut self, session: SessionId, req: SubscribeReq) -> Result<(), String> {
        let state = self
            .sessions
            .get(&session)
            .ok_or_else(|| "session is not open".to_owned())?;
        if state.consumers.contains_key(&req.id) {
            return Err(format!(
                "subscription id '{}' is already in use on this connection",
                req.id
            ));
        }
        let client_id = state.client_id.clone();
        let (key, consumer_selector) = match (&req.destination, &req.durable) {
            (Destination::Queue(name), _) => (self.ensure_named_queue(name), req.selector),
            (Destination::Topic(topic), Some(name)) => {
                let Some(cid) = client_id else {
                    return Err(format!(
                        "durable subscription '{name}' needs a client-id header on CONNECT"
                    ));
                };
                let key = QueueKey::Durable(cid.clone(), name.clone());
                let sel_text = req.selector.as_ref().map(|s| s.as_str().to_owned());
                let changed = match self.queues.get(&key) {
                    Some(q) => {
                        if !q.consumers.is_empty() {
                            return Err(format!(
                                "durable subscription '{name}' of client-id '{cid}' is already active"
                            ));
                        }
                        q.topic.as_deref() != Some(&**topic)
                            || q.selector.as_ref().map(|s| s.as_str()) != sel_text.as_deref()
                    }
                    None => true,
                };
                if changed {
                    // JMS: changing a durable subscription's topic or
                    // selector is deleting it and creating a new one.
                    self.delete_subscription_queue(&key);
                    self.batch.put(
                        Cf::Subscriptions,
                        key.encode(),
                        encode_subscription(topic, sel_text.as_deref()),
                    );
                    self.add_subscription_queue(key.clone(), topic.clone(), req.selector);
                }
                (key, None)
            }
            (Destination::Topic(topic), None) => {
                let key = QueueKey::Temp(session, req.id.clone());
                self.add_subscription_queue(key.clone(), topic.clone(), req.selector);
                (key, None)
            }
        };
        if let Some(q) = self.queues.get_mut(&key) {
            q.consumers.push((session, req.id.clone()));
        }
        if let Some(state) = self.sessions.get_mut(&session) {
            state.consumers.insert(
                req.id,
                Consumer {
                    queue: key.clone(),
                    ack: req.ack,
                    prefetch: req.prefetch.max(1),
                    selector: consumer_selector,
                    delivered: VecDeque::new(),
                    paused: req.paused,
                },
            );
        }
        self.dispatch(&key);
        Ok(())
    }

    fn unsubscribe(
        &mut self,
        session: SessionId,
        id: Option<Arc<str>>,
        durable: Option<Arc<str>>,
    ) -> Result<(), String> {
        let client_id = self
            .sessions
            .get(&session)
            .and_then(|s| s.client_id.clone());
        let mut found = false;
        if let Some(id) = &id {
            found = self.detach(session, id);
        }
        if let Some(name) = durable {
            let Some(cid) = client_id else {
                return Err(format!(
                    "cannot remove durable subscription '{name}': the connection has no client-id"
                ));
            };
            let key = QueueKey::Durable(cid.clone(), name.clone());
            match self.queues.get(&key) {
                None => {
                    return Err(format!(
                        "no durable subscription '{name}' for client-id '{cid}'"
                    ));
                }
                Some(q) if !q.consumers.is_empty() => {
                    return Err(format!(
                        "durable subscription '{name}' is in use; unsubscribe its consumer first"
                    ));
                }
                Some(_) => {
                    self.delete_subscription_queue(&key);
                    tracing::info!(client_id = %cid, subscription = %name, "durable subscription removed");
                }
            }
            return Ok(());
        }
        match (found, id) {
            (true, _) => Ok(()),
            (false, Some(id)) => Err(format!("no subscription with id '{id}' on this connection")),
            (false, None) => Err("UNSUBSCRIBE needs an id header".to_owned()),
        }
    }

    /// Removes a subscription queue and its stored entries.
    fn delete_subscription_queue(&mut self, key: &QueueKey) {
        let Some(mut q) = self.queues.remove(key) else {
            return;
        };
        if let Some(topic) = &q.topic {
            if let Some(keys) = self.topics.get_mut(topic) {
                keys.retain(|k| k != key);
                if keys.is_empty() {
                    self.topics.remove(topic);
                }
            }
        }
        if key.persistent() {
            self.batch.delete(Cf::Subscriptions, key.encode());
        }
        let mut entries = q.take_pending();
        entries.extend(q.inflight.drain().map(|(_, e)| e));
        self.queues.insert(key.clone(), q);
        for e in entries {
            self.forget(key, &e.message);
        }
        self.queues.remove(key);
    }

    /// Detaches one consumer; its unacknowledged messages go back to the
    /// queue. Returns whether it existed.
    fn detach(&mut self, session: SessionId, id: &Arc<str>) -> bool {
        let Some(state) = self.sessions.get_mut(&session) else {
            return false;
        };
        let Some(consumer) = state.consumers.remove(id) else {
            return false;
        };
        for mid in &consumer.delivered {
            state.delivered.remove(mid);
        }
        let key = consumer.queue;
        let mut back = Vec::new();
        if let Some(q) = self.queues.get_mut(&key) {
            q.consumers.retain(|c| !(c.0 == session && &c.1 == id));
            for mid in consumer.delivered.iter().rev() {
                if let Some(e) = q.inflight.remove(mid) {
                    back.push(e);
                }
            }
        }
        if matches!(key, QueueKey::Temp(..)) {
            // Nothing outlives a non-durable subscription.
            self.delete_subscription_queue(&key);
            return true;
        }
        for e in back {
            self.requeue(&key, e);
        }
        self.dispatch(&key);
        true
    }

    fn close_session(&mut self, session: SessionId) {
        let ids: Vec<Arc<str>> = match self.sessions.get(&session) {
            Some(s) => s.consumers.keys().cloned().collect(),
            None => return,
        };
        for id in ids {
            self.detach(session, &id);
        }
        self.process_dead();
        if let Some(state) = self.sessions.remove(&session) {
            if let Some(cid) = state.client_id {
                if self.client_ids.get(&cid) == Some(&session) {
                    self.client_ids.remove(&cid);
                }
            }
        }
    }

    fn check_acks(&self, session: SessionId, acks: &[AckReq]) -> Result<(), String> {
        let state = self
            .sessions
            .get(&session)
            .ok_or_else(|| "session is not open".to_owned())?;
        let mut seen = HashSet::new();
        for ack in acks {
            if !state.delivered.contains_key(&ack.message_id) && !seen.contains(&ack.message_id) {
                return Err(format!(
                    "{} of message {}: it is not delivered and unacknowledged on this connection",
                    if ack.nack { "NACK" } else { "ACK" },
                    ack.message_id
                ));
            }
            seen.insert(ack.message_id);
        }
        Ok(())
    }

    /// Applies a checked ACK/NACK (cumulative for `client` subscriptions).
    fn apply_ack(&mut self, session: SessionId, ack: AckReq) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(sub) = state.delivered.get(&ack.message_id).cloned() else {
            return; // acknowledged earlier in the same transaction
        };
        let Some(consumer) = state.consumers.get_mut(&sub) else {
            return;
        };
        let ids: Vec<u64> = if consumer.ack == AckMode::Client {
            let Some(pos) = consumer.delivered.iter().position(|&m| m == ack.message_id) else {
                return;
            };
            consumer.delivered.drain(..=pos).collect()
        } else {
            consumer.delivered.retain(|&m| m != ack.message_id);
            vec![ack.message_id]
        };
        for id in &ids {
            state.delivered.remove(id);
        }
        let key = consumer.queue.clone();
        let mut entries = Vec::new();
        if let Some(q) = self.queues.get_mut(&key) {
            for id in &ids {
                if let Some(e) = q.inflight.remove(id) {
                    entries.push(e);
                }
            }
        }
        if ack.nack {
            for e in entries.into_iter().rev() {
                self.requeue(&key, e);
            }
        } else {
            for e in entries {
                self.forget(&key, &e.message);
            }
        }
        self.dispatch(&key);
    }

    /// An auto-ack delivery reached the socket: its prefetch credit returns.
    fn ack_written(&mut self, session: SessionId, sub: &Arc<str>, id: u64) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(consumer) = state.consumers.get_mut(sub) else {
            return;
        };
        consumer.delivered.retain(|&m| m != id);
        state.delivered.remove(&id);
        let key = consumer.queue.clone();
        self.dispatch(&key);
    }

    fn expire(&mut self) {
        let now = now_ms();
        let keys: Vec<QueueKey> = self.queues.keys().cloned().collect();
        for key in keys {
            let Some(q) = self.queues.get_mut(&key) else {
                continue;
            };
            if q.pending_len() == 0 {
                continue;
            }
            let (expired, kept): (Vec<Entry>, Vec<Entry>) = q
                .take_pending()
                .into_iter()
                .partition(|e| e.message.expired(now));
            q.restore_pending(kept);
            for e in expired {
                self.stats.expired += 1;
                self.forget(&key, &e.message);
            }
        }
    }

    /// Delivers pending entries of `key` to consumers with free prefetch.
    fn dispatch(&mut self, key: &QueueKey) {
        let now = now_ms();
        let Some(q) = self.queues.get_mut(key) else {
            return;
        };
        if q.consumers.is_empty() || q.pending_len() == 0 {
            return;
        }
        let sessions = &mut self.sessions;
        let has_credit = |sessions: &HashMap<SessionId, SessionState>, c: &ConsumerKey| {
            sessions
                .get(&c.0)
                .and_then(|s| s.consumers.get(&c.1))
                .is_some_and(Consumer::has_credit)
        };
        let any_selector = q.consumers.iter().any(|c| {
            sessions
                .get(&c.0)
                .and_then(|s| s.consumers.get(&c.1))
                .is_some_and(|k| k.selector.is_some())
        });
        let mut expired = Vec::new();
        let mut acked = Vec::new();
        let mut delivered = 0u64;
        if !any_selector {
            loop {
                let n = q.consumers.len();
                let Some(idx) = (0..n)
                    .map(|i| (q.rr + i) % n)
                    .find(|&i| has_credit(sessions, &q.consumers[i]))
                else {
                    break;
                };
                let Some(entry) = q.pop_front() else {
                    break;
                };
                if entry.message.expired(now) {
                    expired.push(entry);
                    continue;
                }
                q.rr = (idx + 1) % n;
                let ck = q.consumers[idx].clone();
                acked.extend(deliver(sessions, q, &ck, entry));
                delivered += 1;
            }
        } else {
            // Scan in priority order; skip entries no consumer with free
            // prefetch selects. Bounded so a large backlog that nobody
            // selects does not make every ACK a full scan.
            const MAX_SKIPPED: usize = 10_000;
            let pending = q.take_pending();
            let mut kept = Vec::new();
            let mut iter = pending.into_iter();
            for entry in iter.by_ref() {
                if entry.message.expired(now) {
                    expired.push(entry);
                    continue;
                }
                let n = q.consumers.len();
                let chosen = (0..n).map(|i| (q.rr + i) % n).find(|&i| {
                    let c = &q.consumers[i];
                    sessions
                        .get(&c.0)
                        .and_then(|s| s.consumers.get(&c.1))
                        .is_some_and(|k| {
                            k.has_credit()
                                && k.selector
                                    .as_ref()
                                    .is_none_or(|s| s.matches(&SelectorView(&entry.message)))
                        })
                });
                match chosen {
                    Some(idx) => {
                        q.rr = (idx + 1) % n;
                        let ck = q.consumers[idx].clone();
                        acked.extend(deliver(sessions, q, &ck, entry));
                        delivered += 1;
                    }
                    None => kept.push(entry),
                }
                if kept.len() >= MAX_SKIPPED || !q.consumers.iter().any(|c| has_credit(sessions, c))
                {
                    break;
                }
            }
            kept.extend(iter);
            q.restore_pending(kept);
        }
        self.stats.messages_out += delivered;
        for e in expired {
            self.stats.expired += 1;
            self.forget(key, &e.message);
        }
        for e in acked {
            self.forget(key, &e.message);
        }
    }
}

/// Follows the engine's committed batches in commit order and publishes the
/// number of the last one durable. A failed write is not published: its
/// messages wait for the next write that succeeds (their RECEIPTs reported
/// the failure). A store that failed for good (a poisoned RocksDB store, a
/// replicated active that stopped serving) never has one, so they are
/// never shown to a consumer.
async fn track_durable(
    mut committed: mpsc::UnboundedReceiver<Committed>,
    durable: watch::Sender<u64>,
) {
    let mut failing = false;
    while let Some((number, commit)) = committed.recv().await {
        match commit.await {
            Ok(_) => {
                failing = false;
                durable.send_replace(number);
            }
            // Said once per run of failures: a store that stopped fails
            // every batch still queued.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(batch = number, error = %e, "a store write failed; the deliveries it holds wait for the next write that succeeds");
            }
            Err(_) => {}
        }
    }
}

/// Hands one entry to a consumer: records it in flight and queues the frame.
/// Returns the entry when the subscription is `auto`: it counts as
/// acknowledged once sent (ActiveMQ's STOMP semantics), so the caller removes
/// it from the store; the consumer's prefetch credit stays taken until the
/// session reports the frame written, which is what bounds a slow reader.
fn deliver(
    sessions: &mut HashMap<SessionId, SessionState>,
    q: &mut Queue,
    ck: &ConsumerKey,
    entry: Entry,
) -> Option<Entry> {
    let Some(state) = sessions.get_mut(&ck.0) else {
        q.push_front(entry);
        return None;
    };
    let Some(consumer) = state.consumers.get_mut(&ck.1) else {
        q.push_front(entry);
        return None;
    };
    let id = entry.message.id;
    let frame = message_frame(&entry, &ck.1);
    consumer.delivered.push_back(id);
    state.delivered.insert(id, ck.1.clone());
    let auto = consumer.ack == AckMode::Auto;
    let auto_ack = auto.then(|| (ck.1.clone(), id));
    // A send error means the session is closing; its Close command will
    // requeue what is in flight.
    let _ = state.out.send(Outbound::Message {
        frame,
        auto_ack,
        after: entry.batch,
    });
    if auto {
        Some(entry)
    } else {
        q.inflight.insert(id, entry);
        None
    }
}

/// Builds the MESSAGE frame for one delivery.
pub fn message_frame(entry: &Entry, subscription: &str) -> Frame {
    let m = &entry.message;
    let mut frame = Frame::new(Command::Message)
        .header("subscription", subscription)
        .header("message-id", format!("ID:fmq-{}", m.id))
        .header("ack", m.id.to_string())
        .header("destination", m.destination.to_string())
        .header("timestamp", m.timestamp.to_string())
        .header("priority", m.priority.to_string());
    if m.expires != 0 {
        frame = frame.header("expires", m.expires.to_string());
    }
    if m.persistent {
        frame = frame.header("persistent", "true");
    }
    if entry.deliveries > 0 {
        frame = frame.header("redelivered", "true");
    }
    for (k, v) in m.headers.iter() {
        frame.headers.push(k, v);
    }
    frame.body = m.body.clone();
    frame
}
