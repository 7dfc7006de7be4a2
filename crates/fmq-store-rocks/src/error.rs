//! Mapping of RocksDB and file-system errors into [`fmq_store::Error`].
//!
//! The broker only knows the engine-neutral error of `fmq-store`, so every
//! engine error is turned into one of its variants here, with a short context
//! naming the operation that failed: "store I/O error: reading messages: ..."
//! tells an operator far more than the bare RocksDB status string.

use fmq_store::Error;
use rocksdb::ErrorKind;

/// Maps a RocksDB error. Corruption reports become [`Error::Corrupt`] (the
/// operator must restore or repair, retrying is pointless); everything else
/// is an [`Error::Io`].
pub(crate) fn engine(context: &str, err: &rocksdb::Error) -> Error {
    match err.kind() {
        ErrorKind::Corruption => Error::Corrupt(format!("{context}: {err}")),
        _ => Error::Io(format!("{context}: {err}")),
    }
}

/// Maps an error of the standard library's file-system calls.
pub(crate) fn io(context: &str, err: &std::io::Error) -> Error {
    Error::Io(format!("{context}: {err}"))
}
