//! The durable, JMS-like API: a [`Connection`] to an HA pair (or any list
//! of servers) that reconnects and fails over by itself, [`Session`]s with
//! an acknowledgement mode or a transaction, [`Producer`]s and
//! [`Consumer`]s.
//!
//! ```no_run
//! # async fn demo() -> fmq_client::Result<()> {
//! use fmq_client::durable::{Connection, SendOptions, SessionMode};
//!
//! let connection = Connection::builder(["127.0.0.1:1856", "127.0.0.1:1956"])
//!     .credentials("admin", "passwd")
//!     .client_id("billing")
//!     .buffer_dir("/var/lib/billing/fmq-buffer")
//!     .connect()
//!     .await?;
//! let mut events = connection.events();
//! tokio::spawn(async move {
//!     while let Some(event) = events.next().await {
//!         println!("{event}");
//!     }
//! });
//!
//! let session = connection.session(SessionMode::ClientIndividual);
//! let producer = session.producer("invoices", "/queue/invoices").await?;
//! producer.send("invoice 1").await?;
//! producer
//!     .send_with("invoice 2", SendOptions::new().priority(9).header("region", "eu"))
//!     .await?;
//!
//! let mut consumer = session.consumer("/queue/invoices").await?;
//! while let Some(message) = consumer.receive().await? {
//!     println!("{:?}", message.body_str());
//!     message.ack().await?;
//! }
//! connection.close().await
//! # }
//! ```
//!
//! # Asynchronous delivery and recovery
//!
//! Besides [`Consumer::receive`], a consumer can be read as a
//! [`Stream`](futures::Stream) of its messages ([`Consumer::into_stream`])
//! or hand each message, in order, to an async handler running on a task of
//! its own ([`Consumer::listen`], the JMS `MessageListener`), which runs
//! until its [`Listener`] is stopped or dropped. Both are the same consumer
//! read another way: they follow failovers and the session's
//! acknowledgement mode as `receive` does.
//!
//! ```no_run
//! # async fn demo(connection: fmq_client::durable::Connection) -> fmq_client::Result<()> {
//! use fmq_client::durable::SessionMode;
//!
//! let session = connection.session(SessionMode::ClientIndividual);
//! let listener = session
//!     .consumer("/queue/invoices")
//!     .await?
//!     .listen(|message| async move {
//!         println!("{:?}", message.body_str());
//!         let _ = message.ack().await;
//!     });
//! // ...
//! listener.stop().await
//! # }
//! ```
//!
//! [`Session::recover`] (JMS `Session.recover`) hands every message the
//! session's consumers delivered and the application did not acknowledge
//! back to the broker, which delivers it again flagged
//! [`redelivered`](Message::redelivered).
//!
//! # Failover
//!
//! The connection tries the servers in the order given. A server that
//! answers CONNECT with an ERROR saying it is not the active one (its state
//! is PASSIVE, WAITING, ...) is skipped at once. When every server of the
//! list failed, the connection waits a capped, jittered exponential
//! [`Backoff`] and tries again, for as long as it is open. While a server
//! of the list answers that it is in standby (a takeover is under way),
//! rounds are retried every 50 ms instead, for up to 10 s, so the new
//! active server is found as soon as it accepts clients. After a dropped
//! connection the first round starts at once, with the server after the one
//! that was lost.
//!
//! On every new connection the consumers are subscribed again (durable
//! subscriptions by their name, so the broker hands over what it kept),
//! then the send buffer is replayed, and only then do new persistent sends
//! go straight to the broker again. [`Connection::events`] reports each
//! step.
//!
//! # Delivery guarantees
//!
//! * A persistent send returns once the broker receipted it
//!   ([`SendOutcome::Receipted`]) or once it is in the local buffer
//!   ([`SendOutcome::Buffered`], synced to disk when the connection has a
//!   [buffer directory](ConnectionBuilder::buffer_dir)), from where it is
//!   replayed in order, surviving failovers and restarts of the client.
//! * Every persistent send carries `fmq-producer-id` (stable per producer
//!   name and client-id, kept in the buffer directory) and `fmq-sequence`
//!   (increasing per producer, continued after a restart). A send is resent
//!   with the same two values until a RECEIPT comes back, so a broker that
//!   keeps per-producer high-water marks stores it once.
//! * Consumers remember what they acknowledged (a bounded window per
//!   consumer, by `message-id` and by producer id + sequence) and drop
//!   redeliveries of it, acknowledging them again.
//! * A transaction open when the connection fails over is rolled back by
//!   the broker; [`Session::commit`] then returns
//!   [`Error::TransactionRolledBack`](crate::Error::TransactionRolledBack).
//! * Every COMMIT carries the session's transaction key (its own
//!   `fmq-producer-id` and a commit counter as `fmq-sequence`), which the
//!   broker applies once. If the connection drops after COMMIT left, the
//!   outcome is settled on the next server under the same key: a
//!   transaction of sends only is re-run (and dropped whole by the broker
//!   if the first COMMIT was applied), so the commit succeeds; one that
//!   also acknowledged messages is settled by an empty COMMIT with the
//!   key, and the commit succeeds if the broker had the key already, or
//!   returns [`Error::TransactionRolledBack`](crate::Error::TransactionRolledBack)
//!   (messages redelivered) if the empty COMMIT took it, which fences the
//!   first one off for good. Only when no server answers the settling
//!   COMMIT within the request timeout, or one refuses it, does the commit
//!   return [`Error::TransactionInDoubt`](crate::Error::TransactionInDoubt).
//! * Every call that waits on a server is bounded by the builder's
//!   timeouts.

mod backoff;
mod connection;
mod consumer;
mod dedupe;
mod event;
mod outbox;
mod producer;
mod session;

pub use backoff::Backoff;
pub use connection::{Connection, ConnectionBuilder};
pub use consumer::{Consumer, ConsumerOptions, Listener, Message, Messages};
pub use event::{Event, Events};
pub use producer::{Producer, SendOptions, SendOutcome};
pub use session::{Session, SessionMode};

/// SEND header naming the producer of a persistent message; COMMIT header
/// naming the session's transaction key.
pub const PRODUCER_ID_HEADER: &str = "fmq-producer-id";
/// SEND header carrying the producer's sequence number; COMMIT header
/// carrying the session's commit counter.
pub const SEQUENCE_HEADER: &str = "fmq-sequence";
/// RECEIPT header set to `true` when the broker already had the send, or
/// the COMMIT's key.
pub const DUPLICATE_HEADER: &str = "fmq-duplicate";
