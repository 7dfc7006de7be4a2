//! Test support: a FUSE file system that loses, at a power cut, what a real
//! disk would lose.
//!
//! A SIGKILL leaves the kernel's page cache intact, so a crash test that
//! only kills the process never sees unsynced writes disappear. This file
//! system keeps every file twice in memory, as written and as synced (see
//! [`model`] for the rules), and [`Mount::power_off`] writes what the disk
//! would hold at that instant to a real directory, where the program under
//! test can be reopened to recover.
//!
//! ```no_run
//! # fn main() -> fmq_powerloss::Result<()> {
//! let mount = fmq_powerloss::Mount::new(std::path::Path::new("/tmp/mnt"))?;
//! // ... run the program under test on mount.path(), then:
//! let image = tempfile::tempdir().expect("image dir");
//! let cut = mount.power_off(fmq_powerloss::Loss::Torn, 42, image.path())?;
//! println!("{cut:?}");
//! # Ok(()) }
//! ```
//!
//! Mounting needs `/dev/fuse` and root (the FUSE mount system call).

pub mod error;
mod fs;
pub mod model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use error::{Error, Result};
pub use model::{Cut, Loss};

use crate::fs::PowerLossFs;
use crate::model::Model;

/// The environment variable that fixes [`seed`].
pub const SEED_VAR: &str = "FMQ_POWERLOSS_SEED";

/// A seed for [`Mount::power_off`]: `FMQ_POWERLOSS_SEED` when set (to
/// replay a failing run's torn-page choices), otherwise a new one. Tests
/// print it.
///
/// # Panics
///
/// If `FMQ_POWERLOSS_SEED` is set but not a number.
pub fn seed() -> u64 {
    match std::env::var(SEED_VAR) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR} must be a number, not {s:?}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// A mounted power-loss file system. Dropping it unmounts it.
pub struct Mount {
    model: Arc<Mutex<Model>>,
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("path", &self.path).finish()
    }
}

impl Mount {
    /// Mounts an empty file system on `path` (an existing directory),
    /// served by a thread of this process.
    pub fn new(path: &Path) -> Result<Mount> {
        Mount::with_model(path, Model::new())
    }

    /// Mounts on `path` a file system holding a copy of the directory tree
    /// `contents`, all of it synced: a disk that comes back after a power
    /// cut, from the image [`Mount::power_off`] wrote.
    pub fn with_contents(path: &Path, contents: &Path) -> Result<Mount> {
        Mount::with_model(path, Model::import(contents)?)
    }

    fn with_model(path: &Path, model: Model) -> Result<Mount> {
        let model = Arc::new(Mutex::new(model));
        let fs = PowerLossFs {
            model: model.clone(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("fmq-powerloss".into()),
            fuser::MountOption::NoAtime,
        ];
        let session = fuser::spawn_mount(fs, path, &config).map_err(|source| Error::Mount {
            path: path.to_owned(),
            source,
        })?;
        Ok(Mount {
            model,
            session: Some(session),
            path: path.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cuts the power: from this instant every operation on the mount fails
    /// with `EIO` (so a program still running cannot report anything as
    /// durable that was not), and what the disk holds is written into
    /// `image`, an existing empty directory. `seed` drives the
    /// [`Loss::Torn`] choices, so a failing cut can be replayed.
    ///
    /// The file system stays mounted (failing) until the `Mount` is
    /// dropped, so the caller can first stop the program that uses it.
    pub fn power_off(&self, loss: Loss, seed: u64, image: &Path) -> Result<Cut> {
        let mut rng = StdRng::seed_from_u64(seed);
        self.model.lock().power_off(loss, &mut rng, image)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if session.umount_and_join().is_err() {
                // Busy: a program still has files open on it. Detach it, so
                // no dead mount outlives this process; the kernel lets go
                // of it when those files close.
                let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
