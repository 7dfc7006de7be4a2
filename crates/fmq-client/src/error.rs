//! The client's error type.

use std::sync::Arc;

/// Result alias used throughout the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a FerroMQ broker.
///
/// Errors are [`Clone`]: once a connection fails, every pending and every
/// later call on it reports the same error, so the cause is never lost.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket error (connecting, reading or writing).
    #[error("I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// The server sent something this client cannot make sense of (a
    /// malformed frame, an unexpected command, a bad `heart-beat` header).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server sent an ERROR frame. `message` is its `message` header and
    /// `detail` its body. The server closes the connection after an ERROR.
    #[error("server error: {message}")]
    Server {
        /// The ERROR frame's `message` header.
        message: String,
        /// The ERROR frame's body, as text.
        detail: String,
    },
    /// A call did not complete within [`ConnectOptions::timeout`], or the
    /// server stopped sending heart-beats. The text names what was awaited.
    ///
    /// [`ConnectOptions::timeout`]: crate::ConnectOptions::timeout
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The connection is closed (after [`Client::disconnect`] or because the
    /// server closed the socket without an ERROR).
    ///
    /// [`Client::disconnect`]: crate::Client::disconnect
    #[error("connection closed")]
    Closed,
    /// The call cannot be made in the current state, e.g. NACK of a message
    /// received on an `auto` subscription.
    #[error("invalid use: {0}")]
    Usage(String),
    /// No server of a durable [`Connection`]'s list accepted a connection in
    /// time. The text lists what each server answered.
    ///
    /// [`Connection`]: crate::durable::Connection
    #[error("no server available: {0}")]
    Unavailable(String),
    /// The transaction did not commit, and nothing of it took effect: the
    /// connection failed over (or dropped) while it was open, the server
    /// refused it, or its COMMIT left but its RECEIPT was lost and a server
    /// then confirmed, under the transaction's key, that it was not applied
    /// (and now never will be). Messages it received are redelivered. The
    /// text says why.
    #[error("transaction rolled back: {0}")]
    TransactionRolledBack(String),
    /// The connection dropped after COMMIT left and before its RECEIPT
    /// came back, and its outcome could not be settled: no server accepted
    /// the COMMIT that settles it (same transaction key) within the request
    /// timeout, or a server refused that COMMIT. The transaction may or may
    /// not have committed. Every other lost RECEIPT ends in `Ok` or
    /// [`Error::TransactionRolledBack`].
    #[error("transaction outcome unknown: {0}")]
    TransactionInDoubt(String),
    /// The local send buffer is full: the send was neither delivered nor
    /// buffered. Raise the limits on the builder or wait for a server.
    #[error("local send buffer is full ({records} sends, {bytes} bytes pending)")]
    BufferFull {
        /// Sends waiting in the buffer.
        records: usize,
        /// Bytes they take.
        bytes: u64,
    },
    /// The local send buffer could not be read or written. After such an
    /// error the buffer can no longer be trusted to hold what was handed to
    /// it; the connection refuses further buffered sends.
    #[error("local send buffer: {0}")]
    Buffer(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl From<fmq_proto::Error> for Error {
    fn from(e: fmq_proto::Error) -> Self {
        match e {
            fmq_proto::Error::Io(io) => Error::Io(Arc::new(io)),
            other => Error::Protocol(other.to_string()),
        }
    }
}

impl Error {
    /// Whether this error means the connection is gone (socket error,
    /// silence, close, timeout) rather than something the server refused.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            Error::Io(_) | Error::Timeout(_) | Error::Closed | Error::Protocol(_)
        )
    }

    /// The error an ERROR frame stands for.
    pub(crate) fn from_error_frame(frame: &fmq_proto::Frame) -> Error {
        Error::Server {
            message: frame.get("message").unwrap_or("").to_owned(),
            detail: String::from_utf8_lossy(&frame.body).into_owned(),
        }
    }
}
