//! FerroMQ high availability: two servers (primary and secondary) that
//! clients see as one broker, after the FioranoMQ HA model.
//!
//! - [`machine`] (shared mode) and [`replicated`] (replicated mode): the
//!   sans-IO state machines, `(state, event) -> actions`,
//!   with no clock and no sockets, so every transition is a unit test;
//! - [`lock`]: the lock file on the gateway machine (fcntl OFD locks), with
//!   holder identity and epoch;
//! - [`gateway`]: the gateway ping and the responder `fmq gateway` runs;
//! - [`heartbeat`]: the HA channel between the two servers: handshake,
//!   settings comparison, state broadcasts and pings.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod state;
// (modules are added below this line)
pub mod fscheck;
pub mod gateway;
pub mod heartbeat;
pub mod lock;
pub mod machine;
pub mod replicated;
pub mod replication;

pub use config::{HaConfig, Mode};
pub use error::{Error, Result};
pub use state::{Role, State};
