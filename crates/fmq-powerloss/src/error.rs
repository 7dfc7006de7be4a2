//! Errors of the power-loss file system.

use std::path::PathBuf;

/// Errors raised while mounting, cutting the power or writing the image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The FUSE mount failed. Mounting needs `/dev/fuse` and root (or
    /// `CAP_SYS_ADMIN`).
    #[error(
        "mounting the power-loss file system on {path}: {source} (it needs /dev/fuse and root)"
    )]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing what the disk held at the power cut failed.
    #[error("writing the power-loss image to {path}: {source}")]
    Image {
        /// The file or directory being written.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading the directory tree a file system starts with failed.
    #[error("importing {path}: {source}")]
    Import {
        /// The file or directory being read.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The durable directory tree is deeper than any real store's.
    #[error("the durable directory tree is deeper than {0} levels (a rename cycle?)")]
    TooDeep(usize),
    /// The power was already cut.
    #[error("the power was already cut")]
    AlreadyOff,
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
