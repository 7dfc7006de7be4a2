//! HA errors.

/// Errors of the HA layer. Their texts follow the seed's console wording
/// where an operator would look for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A profile value the HA layer cannot work with; the text names the key.
    #[error("{0}")]
    Config(String),
    /// The lock file is missing, unreadable, unwritable or unlockable.
    #[error("{0}")]
    LockFile(String),
    /// The peer's settings differ from ours in keys that must match.
    #[error("HA properties are not set properly in the backup server. Please verify whether the following properties are configured to use same values in the backup server: {}", .0.join(", "))]
    Mismatch(Vec<String>),
    /// The peer spoke a protocol we do not understand.
    #[error("HA peer protocol error: {0}")]
    Protocol(String),
    /// Socket or file error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
