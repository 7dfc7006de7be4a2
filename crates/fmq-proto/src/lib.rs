//! STOMP wire protocol for FerroMQ.
//!
//! This crate is *sans-IO*: it knows how bytes map to frames and back, and
//! nothing about sockets, timers or the broker. The server and the client both
//! wrap [`StompCodec`] in a `tokio_util::codec::Framed`, so parsing rules, limits
//! and escaping live in exactly one place.
//!
//! * [`Frame`], [`Command`] and [`Headers`] model a frame. Headers keep their
//!   order and repeats because STOMP 1.2 says the *first* occurrence of a
//!   repeated header wins, and a relay must not reorder what it forwards.
//! * [`StompCodec`] decodes incrementally (linear in the input, limits enforced
//!   before buffering) and encodes with the escaping of the negotiated
//!   [`Version`].
//! * [`negotiate_version`], [`parse_heart_beat`] and [`negotiate_heart_beat`]
//!   implement the CONNECT/CONNECTED handshake arithmetic.
//! * [`Error`] names every protocol violation and turns into the ERROR frame a
//!   server sends before closing ([`Error::to_frame`]).
#![warn(missing_docs)]
// Tests may unwrap; library code handles every input without panicking.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod codec;
mod error;
mod frame;
mod heartbeat;
mod version;

pub use codec::{Item, Limits, StompCodec};
pub use error::{Error, Result};
pub use frame::{Command, Frame, Headers};
pub use heartbeat::{negotiate_heart_beat, parse_heart_beat};
pub use version::{negotiate_version, Version};
