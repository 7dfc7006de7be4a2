//! [`Event`]s a durable connection reports, and the [`Events`] stream.

use std::fmt;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::error::Error;

/// Something that happened to a durable connection. Every event is also
/// logged through `tracing`; [`Display`](fmt::Display) gives a one-line
/// description.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The first connection is up.
    Connected {
        /// The server's address, as given in the list.
        server: String,
    },
    /// The connection is up again on the server it lost.
    Reconnected {
        /// The server.
        server: String,
        /// Time from noticing the loss to being connected again.
        after: Duration,
    },
    /// The connection is up again, on another server than the one it lost.
    FailedOver {
        /// The server the connection was lost on.
        from: String,
        /// The server now connected.
        to: String,
        /// Time from noticing the loss to being connected again.
        after: Duration,
    },
    /// A server refused the connection because it is not the active one
    /// (its state is PASSIVE, WAITING, ...): it was skipped at once.
    Skipped {
        /// The server.
        server: String,
        /// Its ERROR message, which names its state.
        reason: String,
    },
    /// Connecting to a server failed (refused, timed out, ...).
    ConnectFailed {
        /// The server.
        server: String,
        /// What went wrong.
        error: Error,
    },
    /// No server of the list accepted a connection; the next round starts
    /// after `delay` (the back-off).
    Waiting {
        /// Rounds that failed since the last connection.
        attempt: u32,
        /// The wait before the next round.
        delay: Duration,
    },
    /// The connection to a server was lost; reconnecting starts at once.
    Disconnected {
        /// The server.
        server: String,
        /// Why the connection ended.
        error: Error,
    },
    /// Sends from the local buffer were delivered (receipted) after a
    /// (re)connection.
    Replayed {
        /// The server they went to.
        server: String,
        /// How many.
        count: usize,
    },
    /// Consumers were subscribed again after a (re)connection.
    Resubscribed {
        /// The server.
        server: String,
        /// How many consumers.
        count: usize,
    },
    /// A buffered send was refused by the server (e.g. a destination it
    /// does not allow) and was dropped from the buffer.
    SendRejected {
        /// Its producer id.
        producer_id: String,
        /// Its sequence number.
        sequence: u64,
        /// The server's ERROR.
        error: Error,
    },
    /// A consumer could not be subscribed again and was closed; its
    /// `receive` returns the error.
    ConsumerLost {
        /// The consumer's destination.
        destination: String,
        /// The server's ERROR.
        error: Error,
    },
    /// A redelivered message the consumer had acknowledged already was
    /// dropped (and acknowledged again).
    DuplicateDropped {
        /// The consumer's destination.
        destination: String,
        /// The message's `message-id`.
        message_id: String,
    },
    /// The connection was closed by the application; no more events follow.
    Closed,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connected { server } => write!(f, "connected to {server}"),
            Event::Reconnected { server, after } => {
                write!(f, "reconnected to {server} in {} ms", after.as_millis())
            }
            Event::FailedOver { from, to, after } => write!(
                f,
                "failed over from {from} to {to} in {} ms",
                after.as_millis()
            ),
            Event::Skipped { server, reason } => {
                write!(f, "skipped {server}: not the active server ({reason})")
            }
            Event::ConnectFailed { server, error } => {
                write!(f, "could not connect to {server}: {error}")
            }
            Event::Waiting { attempt, delay } => write!(
                f,
                "no server available (round {}); retrying in {} ms",
                attempt + 1,
                delay.as_millis()
            ),
            Event::Disconnected { server, error } => {
                write!(f, "disconnected from {server}: {error}")
            }
            Event::Replayed { server, count } => {
                write!(f, "{count} buffered sends replayed to {server}")
            }
            Event::Resubscribed { server, count } => {
                write!(f, "{count} consumers resubscribed on {server}")
            }
            Event::SendRejected {
                producer_id,
                sequence,
                error,
            } => write!(
                f,
                "buffered send {producer_id}#{sequence} refused and dropped: {error}"
            ),
            Event::ConsumerLost { destination, error } => {
                write!(f, "consumer of {destination} lost: {error}")
            }
            Event::DuplicateDropped {
                destination,
                message_id,
            } => write!(
                f,
                "redelivered message {message_id} from {destination} was acknowledged before; dropped"
            ),
            Event::Closed => f.write_str("connection closed"),
        }
    }
}

/// The events of a connection, from the moment [`events`] was called.
///
/// Events are kept in a bounded queue (1024): a reader that falls that far
/// behind skips the oldest ones (a `tracing` warning says how many).
///
/// [`events`]: super::Connection::events
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
    /// [`Event::Closed`] was handed out: nothing follows.
    ended: bool,
}

impl Events {
    /// Events from `rx`; `ended` for a connection already closing.
    pub(crate) fn new(rx: broadcast::Receiver<Event>, ended: bool) -> Events {
        Events { rx, ended }
    }

    /// The next event; `None` after [`Event::Closed`] (the connection was
    /// closed, explicitly or by dropping every handle).
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        loop {
            match self.rx.recv().await {
                Ok(e) => {
                    self.ended = matches!(e, Event::Closed);
                    return Some(e);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "event reader fell behind; events skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one arrives within `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .flatten()
    }

    /// An event that is already there, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        loop {
            match self.rx.try_recv() {
                Ok(e) => {
                    self.ended = matches!(e, Event::Closed);
                    return Some(e);
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}
