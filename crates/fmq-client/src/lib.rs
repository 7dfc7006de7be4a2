//! Asynchronous STOMP 1.2 client for the FerroMQ broker.
//!
//! Two layers:
//!
//! * [`durable`]: the JMS-like API for applications: a [`Connection`] to a
//!   list of servers (an HA pair) that reconnects and fails over by itself,
//!   buffers persistent sends on disk while no server is reachable, resends
//!   them once-only (producer id + sequence), and resubscribes consumers;
//!   [`Session`]s with acknowledgement modes or transactions, [`Producer`]s,
//!   [`Consumer`]s, and an [`Events`] stream.
//! * [`Client`]: one STOMP connection to one server, the transport the
//!   durable layer runs on, also used directly by FerroMQ's tests and
//!   benchmarks.
//!
//! # The basic client
//!
//! A connection is served by a driver task that owns the
//! socket; [`Client`] and the objects it hands out ([`Subscription`],
//! [`Message`], [`Transaction`]) are handles that talk to it over channels,
//! so they can be cloned and used from many tasks at once.
//!
//! ```no_run
//! # async fn demo() -> fmq_client::Result<()> {
//! use fmq_client::{AckMode, Client, ConnectOptions, SubscribeOptions};
//!
//! let client = Client::connect(
//!     "127.0.0.1:1856",
//!     ConnectOptions::with_credentials("admin", "passwd"),
//! )
//! .await?;
//! let mut sub = client
//!     .subscribe("/queue/demo", SubscribeOptions::ack(AckMode::ClientIndividual))
//!     .await?;
//! client
//!     .send_with_receipt("/queue/demo", "hello", &[("persistent", "true")])
//!     .await?;
//! if let Some(message) = sub.next().await {
//!     println!("{:?}", message.body_str());
//!     message.ack().await?;
//! }
//! client.disconnect().await
//! # }
//! ```
//!
//! Semantics worth knowing:
//!
//! * Calls that wait for the broker (`connect`, `*_with_receipt`,
//!   `subscribe`, `commit`, `abort`, `unsubscribe*`, `disconnect`) are
//!   bounded by [`ConnectOptions::timeout`].
//! * Heart-beats are negotiated on CONNECT; the client sends EOLs when idle
//!   and declares the connection dead ([`Error::Timeout`]) when the server
//!   is silent for twice its interval.
//! * After an ERROR frame ([`Error::Server`]) or a socket error, every
//!   pending and later call fails with that error and subscriptions end.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod client;
mod connection;
pub mod durable;
mod error;
mod subscription;
mod transaction;

pub use bytes::Bytes;
pub use client::{Client, ConnectOptions};
pub use durable::{
    Backoff, Connection, ConnectionBuilder, Consumer, ConsumerOptions, Event, Events, Producer,
    SendOptions, SendOutcome, Session, SessionMode,
};
pub use error::{Error, Result};
pub use fmq_proto::Headers;
pub use subscription::{AckMode, Message, SubscribeOptions, Subscription};
pub use transaction::Transaction;
