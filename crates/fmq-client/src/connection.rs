//! The connection driver: the tasks that own the socket and the state they
//! share with the handles.
//!
//! A connection runs two tasks. The *reader* owns the socket's read half: it
//! routes MESSAGE frames to their subscription, completes RECEIPT waiters,
//! turns an ERROR frame into the connection's terminal error and watches the
//! server's heart-beats. The *writer* owns the write half: it drains the
//! bounded frame channel the handles write into (so a slow socket pushes
//! back on senders) and sends heart-beat EOLs when the connection is idle.
//!
//! Handles register receipt waiters and subscriptions in [`Shared`] *before*
//! the frame leaves, so the reply can never overtake the registration. When
//! either task fails, [`Shared::fail`] records the first error, fails every
//! waiter with it, closes every subscription channel and stops the other
//! task; registrations after that fail at once with the same error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fmq_proto::{Command, Frame, Item, StompCodec};
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Most frames taken from the channel before the writer flushes.
const WRITE_BATCH: usize = 64;

/// How long the writer may spend flushing and shutting down the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A RECEIPT waiter; it is handed the RECEIPT frame (whose headers may say
/// more, e.g. `fmq-duplicate:true`).
pub(crate) type ReceiptTx = oneshot::Sender<Result<Frame>>;

/// State shared by the handles and the two driver tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
    connected: AtomicBool,
    next_id: AtomicU64,
    /// Cancelled when the connection ends, whichever side ended it.
    pub(crate) closed: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    /// Receipt id → waiter.
    pending: HashMap<String, ReceiptTx>,
    /// Subscription id → channel of its MESSAGE frames.
    subs: HashMap<String, mpsc::UnboundedSender<Frame>>,
    /// Why the connection ended; set once.
    terminal: Option<Error>,
    /// The `receipt-id` of the ERROR frame that ended the connection, i.e.
    /// the receipt of the frame the server refused.
    error_receipt: Option<String>,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            state: Mutex::new(State::default()),
            connected: AtomicBool::new(true),
            next_id: AtomicU64::new(0),
            closed: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection-unique id with the given prefix.
    pub(crate) fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}-{n}")
    }

    /// Whether the connection is still usable.
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The error every call fails with once the connection has ended
    /// ([`Error::Closed`] if it has not recorded one).
    pub(crate) fn terminal(&self) -> Error {
        self.lock().terminal.clone().unwrap_or(Error::Closed)
    }

    /// `Err` with the terminal error if the connection has ended.
    pub(crate) fn check(&self) -> Result<()> {
        match &self.lock().terminal {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Registers a RECEIPT waiter, unless the connection has ended.
    pub(crate) fn expect_receipt(&self, id: String) -> Result<oneshot::Receiver<Result<Frame>>> {
        let mut state = self.lock();
        if let Some(e) = &state.terminal {
            return Err(e.clone());
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    /// Forgets a RECEIPT waiter that gave up.
    pub(crate) fn forget_receipt(&self, id: &str) {
        self.lock().pending.remove(id);
    }

    /// Registers a subscription's channel, unless the connection has ended.
    pub(crate) fn add_subscription(&self, id: String) -> Result<mpsc::UnboundedReceiver<Frame>> {
        let mut state = self.lock();
        if let Some(e) = &state.terminal {
            return Err(e.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        state.subs.insert(id, tx);
        Ok(rx)
    }

    /// Stops routing messages to a subscription.
    pub(crate) fn remove_subscription(&self, id: &str) {
        self.lock().subs.remove(id);
    }

    /// The `receipt-id` of the ERROR frame that ended the connection, if
    /// it named one: the frame the server refused carried that receipt.
    pub(crate) fn error_receipt(&self) -> Option<String> {
        self.lock().error_receipt.clone()
    }

    /// Ends the connection with `error` (the first error recorded wins):
    /// every waiter fails, every subscription channel closes, both tasks stop.
    pub(crate) fn fail(&self, error: Error) {
        self.fail_on(error, None);
    }

    /// Like [`fail`](Self::fail), also recording which receipt the
    /// server's ERROR frame named.
    fn fail_on(&self, error: Error, receipt: Option<String>) {
        let (pending, subs, error) = {
            let mut state = self.lock();
            if state.terminal.is_none() {
                state.error_receipt = receipt;
            }
            let error = state.terminal.get_or_insert(error).clone();
            (
                std::mem::take(&mut state.pending),
                std::mem::take(&mut state.subs),
                error,
            )
        };
        self.connected.store(false, Ordering::Release);
        self.closed.cancel();
        if !pending.is_empty() || !subs.is_empty() {
            tracing::debug!(%error, pending = pending.len(), "connection ended");
        }
        for (_, waiter) in pending {
            let _ = waiter.send(Err(error.clone()));
        }
        drop(subs);
    }

    fn complete_receipt(&self, frame: Frame) {
        let Some(id) = frame.get("receipt-id").map(str::to_owned) else {
            return;
        };
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(frame));
            }
            None => tracing::trace!(receipt = %id, "RECEIPT nobody waits for"),
        }
    }

    /// Routes a MESSAGE to its subscription. Returns the id of a
    /// subscription whose receiver has gone, so the caller can cancel it.
    fn dispatch(&self, frame: Frame) -> Option<String> {
        let Some(id) = frame.get("subscription").map(str::to_owned) else {
            tracing::warn!("MESSAGE without a subscription header dropped");
            return None;
        };
        let mut state = self.lock();
        let tx = match state.subs.get(&id) {
            Some(tx) => tx,
            None => {
                tracing::trace!(subscription = %id, "MESSAGE for an unknown subscription dropped");
                return None;
            }
        };
        if tx.send(frame).is_err() {
            state.subs.remove(&id);
            return Some(id);
        }
        None
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads frames until the connection ends. `heart_beat` is the negotiated
/// interval at which the server sends; silence for twice that long is fatal.
pub(crate) async fn read_loop(
    mut stream: FramedRead<OwnedReadHalf, StompCodec>,
    shared: std::sync::Arc<Shared>,
    out: mpsc::WeakSender<Frame>,
    heart_beat: Option<Duration>,
) {
    let limit = heart_beat.map(|d| d * 2);
    let mut last_read = Instant::now();
    let mut error_receipt = None;
    let error = loop {
        let item = tokio::select! {
            _ = shared.closed.cancelled() => return,
            item = stream.next() => item,
            _ = sleep_until(limit.map(|l| last_read + l)) => {
                tracing::debug!("no data from the server within twice its heart-beat interval");
                break Error::Timeout("a heart-beat from the server");
            }
        };
        last_read = Instant::now();
        let frame = match item {
            None => break Error::Closed,
            Some(Err(e)) => break Error::from(e),
            Some(Ok(Item::HeartBeat)) => continue,
            Some(Ok(Item::Frame(frame))) => frame,
        };
        match frame.command {
            Command::Message => {
                if let Some(id) = shared.dispatch(frame) {
                    // Nobody listens any more: tell the server, best effort.
                    // (The sender is weak so that the reader alone does not
                    // keep the connection open once every handle is gone.)
                    if let Some(out) = out.upgrade() {
                        let _ = out.try_send(Frame::new(Command::Unsubscribe).header("id", id));
                    }
                }
            }
            Command::Receipt => match frame.get("receipt-id") {
                Some(_) => shared.complete_receipt(frame),
                None => break Error::Protocol("RECEIPT frame without a receipt-id".into()),
            },
            Command::Error => {
                error_receipt = frame.get("receipt-id").map(str::to_owned);
                break Error::from_error_frame(&frame);
            }
            other => break Error::Protocol(format!("unexpected {other} frame from the server")),
        }
    };
    shared.fail_on(error, error_receipt);
}

/// Writes what the handles send, plus heart-beats every `heart_beat` of
/// idleness, until the connection ends or every handle is gone.
pub(crate) async fn write_loop(
    mut sink: FramedWrite<OwnedWriteHalf, StompCodec>,
    mut rx: mpsc::Receiver<Frame>,
    shared: std::sync::Arc<Shared>,
    heart_beat: Option<Duration>,
) {
    let mut last_write = Instant::now();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        let step = tokio::select! {
            biased;
            _ = shared.closed.cancelled() => break,
            n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    // Every handle is gone: leave politely.
                    batch.push(Frame::new(Command::Disconnect));
                }
                let items: Vec<Item> = batch.drain(..).map(Item::Frame).collect();
                tokio::select! {
                    _ = shared.closed.cancelled() => break,
                    r = write_all(&mut sink, items) => r.map(|()| n == 0),
                }
            }
            _ = sleep_until(heart_beat.map(|b| last_write + b)) => {
                tokio::select! {
                    _ = shared.closed.cancelled() => break,
                    r = sink.send(Item::HeartBeat) => r.map(|()| false),
                }
            }
        };
        match step {
            Ok(false) => last_write = Instant::now(),
            Ok(true) => {
                shared.fail(Error::Closed);
                break;
            }
            Err(e) => {
                shared.fail(Error::from(e));
                break;
            }
        }
    }
    // Flush what is buffered and shut the write side down, without letting
    // a peer that stopped reading hold the task forever.
    let _ = tokio::time::timeout(CLOSE_GRACE, SinkExt::<Item>::close(&mut sink)).await;
}

async fn write_all(
    sink: &mut FramedWrite<OwnedWriteHalf, StompCodec>,
    items: Vec<Item>,
) -> Result<(), fmq_proto::Error> {
    for item in items {
        sink.feed(item).await?;
    }
    SinkExt::<Item>::flush(sink).await
}
