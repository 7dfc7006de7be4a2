//! The FerroMQ broker: STOMP 1.2 sessions over TCP, queues with competing
//! consumers, topics with durable subscriptions, acknowledgement modes,
//! transactions, redelivery with a dead-letter queue, expiry, priorities,
//! selectors, users with ACLs, and once-only sends (duplicate detection by
//! producer id and sequence, see [`dedupe`]), all kept in a
//! [`fmq_store::Store`].
//!
//! Start it with [`Broker::start`] and serve a listener with
//! [`Broker::serve`]; the `fmq` binary and the tests share this entry point.

#![warn(missing_docs)]

pub mod config;
pub mod dedupe;
pub mod destination;
pub mod engine;
pub mod error;
pub mod message;
pub mod queue;
pub mod security;
pub mod server;
pub mod session;

pub use config::Config;
pub use destination::Destination;
pub use engine::{QueueStats, Stats};
pub use error::{Error, Result};
pub use security::{AclEntry, Permission, Security};
pub use server::Broker;
