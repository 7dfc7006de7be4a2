//! Store errors.

/// Errors raised by a [`Store`](crate::Store).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O or engine error while reading or writing. The operation did not
    /// take effect; the store is still usable.
    #[error("store I/O error: {0}")]
    Io(String),
    /// A write could not be made durable (for example `fsync` failed). After
    /// a failed sync the kernel may have dropped dirty pages, so the store can
    /// no longer be trusted: every later write fails with this error and the
    /// server must stop and recover from what is on disk.
    #[error("storage can no longer be trusted: {0}")]
    Poisoned(String),
    /// Stored bytes that do not decode: a torn or foreign record.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// [`Store::read_log`](crate::Store::read_log) was asked for batches
    /// that the batch log no longer (or never did) hold. The reader cannot
    /// catch up from the log and needs a full copy of the store instead.
    #[error("batch log truncated: batch {from} requested, but the log starts at batch {first}")]
    Truncated {
        /// The first sequence asked for.
        from: u64,
        /// The smallest sequence the log still holds (the store's last
        /// sequence + 1 when the log is empty).
        first: u64,
    },
    /// A batch committed with [`Store::commit_as`] would have been stored
    /// under another sequence than the one it must have. Nothing of it was
    /// written.
    #[error("batch refused: it must be stored as sequence {wanted}, but the store's next sequence is {next}; nothing was written")]
    OutOfOrder {
        /// The sequence the batch must have.
        wanted: u64,
        /// The sequence the store would have given it.
        next: u64,
    },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
    /// The store directory is in use by another process.
    #[error("store directory {path} is locked by another process")]
    Locked {
        /// The directory that is locked.
        path: String,
    },
}

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
