//! Broker errors.

/// Errors raised by the broker outside a client session. Problems caused by a
/// client's frames are answered with a STOMP ERROR frame, not this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] fmq_store::Error),
    /// A stored record could not be decoded.
    #[error("corrupt {what} record: {detail}")]
    Corrupt {
        /// Kind of record.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A security operation was refused (unknown user, bad pattern, ...).
    #[error("{0}")]
    Security(String),
    /// The broker has stopped.
    #[error("broker has stopped")]
    Stopped,
    /// Socket error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
