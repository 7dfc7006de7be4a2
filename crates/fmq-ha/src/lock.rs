//! The lock file on the gateway machine: only the server holding an
//! exclusive lock on it may be active.
//!
//! The lock is an open-file-description (OFD) lock, `fcntl(F_OFD_SETLK)`,
//! on the whole file, not a classic POSIX record lock: a POSIX lock belongs
//! to the process and is silently dropped when the process closes *any*
//! descriptor of the file (a status probe, a log rotation helper, a library
//! that opens the path to stat it), which would let the passive become
//! active while this server still runs as active. An OFD lock belongs to the
//! one descriptor [`LockFile`] opens and keeps open for the life of the
//! process, so only closing that descriptor (or the process dying) releases
//! it. Over NFSv4 and SMB the kernel forwards OFD locks to the server, so
//! they are exclusive between hosts, as long as the mount does not make
//! locking host-local; [`check_mount`] refuses those mounts.
//!
//! Besides the lock, the file holds one JSON line naming the holder and an
//! epoch that grows by one at each take-over. The active re-reads it in
//! [`LockFile::verify`]: if the other server took the lock (because ours was
//! lost, e.g. an NFS lease expired while the network was cut), the epoch in
//! the file no longer matches ours and we step down even if the kernel has
//! not yet told us the lock is gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The holder line is short; reading more than this means the file is not
/// ours (or is corrupt), and it is then treated as unparseable.
const MAX_HOLDER_LEN: usize = 4096;

/// Identity written into the lock file by its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Who holds the lock, e.g. `"Primary@host:pid"`.
    pub server: String,
    /// Take-over count: each new holder writes the previous epoch plus one,
    /// so a server that lost its lock can tell it was replaced.
    pub epoch: u64,
    /// When the holder took the lock, milliseconds since the Unix epoch (for
    /// `fmq status`; 0 if the line did not carry it).
    #[serde(default)]
    pub acquired_ms: u64,
}

/// The opened lock file. The descriptor is opened once, read+write, and kept
/// until this value is dropped: the OFD lock lives on that descriptor, so
/// dropping the `LockFile` releases the lock.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
    /// Whether the last lock operation on our descriptor left us holding the
    /// lock, as far as this process can tell.
    held: bool,
}

impl LockFile {
    /// Opens the configured lock file. It must already exist: FerroMQ never
    /// creates it, because the operator must create it on the gateway
    /// machine's share and grant both servers access; creating it here could
    /// give each server its own private file (e.g. when the share is not
    /// mounted yet) and so two active servers.
    ///
    /// Checks, each failing with [`Error::LockFile`] in the seed's wording:
    /// the path exists and is a regular file; it is not read-only (no write
    /// bit at all, which even root is refused, since root could otherwise
    /// write where the operator said not to); it opens for reading and
    /// writing; its mount does not make locks host-local ([`check_mount`]);
    /// and the filesystem answers a lock query.
    pub fn open(path: &Path) -> Result<LockFile> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_valid(
                    path,
                    "the file does not exist; FerroMQ never creates it: create it on the gateway machine's share and give both servers read and write access",
                ))
            }
            Err(e) => return Err(not_valid(path, &format!("cannot read its attributes: {e}"))),
        };
        if meta.is_dir() {
            return Err(not_valid(
                path,
                "it is a directory; ha.lock_file must name a file",
            ));
        }
        if !meta.is_file() {
            return Err(not_valid(path, "it is not a regular file"));
        }
        let mode = meta.permissions().mode();
        if mode & 0o222 == 0 {
            return Err(not_valid(
                path,
                &format!(
                    "it is read-only (mode {:04o}); both servers must be able to write it: chmod ug+rw",
                    mode & 0o7777
                ),
            ));
        }
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(not_valid(
                    path,
                    &format!("this server may not open it for reading and writing ({e}); give the server's user read and write permission"),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                return Err(not_valid(path, "its filesystem is mounted read-only"))
            }
            Err(e) => return Err(not_valid(path, &format!("cannot open it for reading and writing: {e}"))),
        };
        check_mount(path)?;
        // A lock query now turns "the lock file machine does not do locks"
        // into a boot error instead of an error at the first take-over.
        let mut probe = whole_file(libc::F_WRLCK);
        if let Err(e) = fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)) {
            return Err(not_valid(
                path,
                &format!(
                    "its filesystem refuses lock queries (fcntl F_OFD_GETLK: {e}){}",
                    errno_hint(e)
                ),
            ));
        }
        Ok(LockFile {
            file,
            path: path.to_path_buf(),
            held: false,
        })
    }

    /// Tries once, without waiting, to take the exclusive lock on the whole
    /// file. `Ok(true)`: we hold it (also when we already held it);
    /// `Ok(false)`: another open file description, in this or another
    /// process or host, holds it. `Err` for anything else (`EIO` when an NFS
    /// client lost its state, `ENOLCK` when the lock service is gone, ...):
    /// the caller treats that as "lock lost".
    pub fn try_acquire(&mut self) -> Result<bool> {
        match set_lock(&self.file, libc::F_WRLCK) {
            Ok(acquired) => {
                self.held = acquired;
                Ok(acquired)
            }
            Err(e) => {
                self.held = false;
                Err(lock_error(&self.path, "take the lock", e))
            }
        }
    }

    /// Writes this server as the new holder, once the lock is ours: reads
    /// the previous epoch, writes `{"server":..,"epoch":previous+1,
    /// "acquired_ms":..}` through the locked descriptor (write at offset 0,
    /// truncate, fsync, so the other server reads the whole line or the old
    /// one) and returns the new epoch.
    ///
    /// An empty or unparseable file counts as epoch 0.
    pub fn take_over(&mut self, server: &str) -> Result<u64> {
        self.take_over_after(server, 0)
    }

    /// [`take_over`](Self::take_over), with an epoch also greater than
    /// `at_least_after`: a replicated server passes its store's epoch, so a
    /// reset or different lock file never hands out an epoch its history
    /// has already used.
    pub fn take_over_after(&mut self, server: &str, at_least_after: u64) -> Result<u64> {
        if !self.held {
            return Err(Error::LockFile(format!(
                "lock file {}: cannot write the holder without holding the lock",
                self.path.display()
            )));
        }
        let previous = self
            .read_holder()?
            .map_or(0, |h| h.epoch)
            .max(at_least_after);
        let epoch = previous.checked_add(1).ok_or_else(|| {
            Error::LockFile(format!("lock file {}: epoch overflow", self.path.display()))
        })?;
        let holder = Holder {
            server: server.to_owned(),
            epoch,
            acquired_ms: now_ms(),
        };
        let mut line = serde_json::to_vec(&holder).map_err(|e| {
            Error::LockFile(format!(
                "lock file {}: cannot encode holder: {e}",
                self.path.display()
            ))
        })?;
        line.push(b'\n');
        let io_err = |what: &str, e: io::Error| {
            Error::LockFile(format!(
                "lock file {}: cannot {what}: {e}",
                self.path.display()
            ))
        };
        self.file
            .write_all_at(&line, 0)
            .map_err(|e| io_err("write the holder", e))?;
        // usize -> u64 never truncates on the 64- and 32-bit targets we build.
        self.file
            .set_len(line.len() as u64)
            .map_err(|e| io_err("truncate", e))?;
        self.file.sync_all().map_err(|e| io_err("fsync", e))?;
        Ok(epoch)
    }

    /// The active's periodic check that it may stay active: the kernel (and,
    /// over NFS/SMB, the file server) still sees our lock, and the file still
    /// names us with our epoch. `Ok(false)` or `Err` both mean "step down
    /// now".
    ///
    /// The lock part is two calls on our own descriptor: `F_OFD_GETLK`
    /// reports any conflicting lock of another description, and re-issuing
    /// `F_OFD_SETLK` makes the NFS client go to the server (an expired lease
    /// surfaces here as `EIO` or a conflict) and, as a side effect, drops the
    /// client's cached pages of the file, so the holder line read next is the
    /// server's copy, not a stale cache.
    pub fn verify(&mut self, server: &str, epoch: u64) -> Result<bool> {
        if !self.held {
            return Ok(false);
        }
        let mut query = whole_file(libc::F_WRLCK);
        if let Err(e) = fcntl(&self.file, FcntlArg::F_OFD_GETLK(&mut query)) {
            self.held = false;
            return Err(lock_error(&self.path, "query the lock", e));
        }
        if libc::c_int::from(query.l_type) != libc::F_UNLCK {
            self.held = false;
            return Ok(false);
        }
        if !self.try_acquire()? {
            return Ok(false);
        }
        Ok(self
            .read_holder()?
            .is_some_and(|h| h.server == server && h.epoch == epoch))
    }

    /// Reads the holder line, for `fmq status` and for the passive to report
    /// who holds the lock. `None` if the file is empty or the line does not
    /// parse. Without holding the lock, an NFS client may serve this from its
    /// cache, so a passive's answer can lag the active's writes.
    pub fn read_holder(&self) -> Result<Option<Holder>> {
        let mut buf = vec![0u8; MAX_HOLDER_LEN];
        let mut len = 0;
        while len < buf.len() {
            match self.file.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::LockFile(format!(
                        "lock file {}: cannot read the holder: {e}",
                        self.path.display()
                    )))
                }
            }
        }
        let data = &buf[..len];
        let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Ok(serde_json::from_slice(line).ok())
    }

    /// Releases the lock (`F_UNLCK`), keeping the descriptor open so the
    /// server can try again later. Releasing a lock we do not hold is fine.
    pub fn release(&mut self) -> Result<()> {
        self.held = false;
        set_lock(&self.file, libc::F_UNLCK)
            .map(|_| ())
            .map_err(|e| lock_error(&self.path, "release the lock", e))
    }

    /// Whether our last lock operation left us holding the lock. This is
    /// what this process believes, not a check: use [`LockFile::verify`].
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A lock request on the whole file (`l_start` 0, `l_len` 0 = to the end,
/// however long the file grows). `l_pid` must be 0 for OFD requests.
pub(crate) fn whole_file(l_type: libc::c_int) -> libc::flock {
    libc::flock {
        // F_WRLCK, F_UNLCK and SEEK_SET are small constants that fit a short.
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// `F_OFD_SETLK` on `file`: `Ok(false)` when another description holds a
/// conflicting lock (EAGAIN, or EACCES which POSIX also allows).
pub(crate) fn set_lock(file: &File, l_type: libc::c_int) -> std::result::Result<bool, Errno> {
    let request = whole_file(l_type);
    match fcntl(file, FcntlArg::F_OFD_SETLK(&request)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(e),
    }
}

fn lock_error(path: &Path, what: &str, e: Errno) -> Error {
    Error::LockFile(format!(
        "lock file {}: cannot {what}: {e}{}",
        path.display(),
        errno_hint(e)
    ))
}

/// What an errno from a lock call most likely means for the operator.
fn errno_hint(e: Errno) -> &'static str {
    match e {
        Errno::EIO => " (the lock was lost: the file server was unreachable longer than its lease, or it restarted)",
        Errno::ENOLCK => " (the lock file machine refuses locks: is its lock service running, and is the share mounted with locking?)",
        Errno::EINVAL | Errno::EOPNOTSUPP => " (this filesystem or kernel does not support OFD locks)",
        _ => "",
    }
}

/// The seed's boot error for a lock file it cannot use, with our detail.
fn not_valid(path: &Path, detail: &str) -> Error {
    let p = path.display();
    Error::LockFile(format!(
        "Lock file::{p} is not specified properly.\n=====\nUnable to validate permissions on lock file::{p}.\nEither file is not valid or lock file machine is not allowing to verify permissions on lock,\nUnable to boot the server\n=====\n({detail})"
    ))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Refuses a lock file whose mount makes locks local to one host, where
/// both servers could hold "the" lock at once: NFS with `nolock` or with
/// `local_lock=` other than `none`, SMB/CIFS with `nobrl`. Local filesystems
/// pass: a pair on one host (and the tests) may use them.
///
/// Finds the mount through `/proc/self/mountinfo`, so it sees this
/// process's mount namespace, as the server does.
pub fn check_mount(path: &Path) -> Result<()> {
    let resolved = std::fs::canonicalize(path).map_err(|e| {
        Error::LockFile(format!(
            "lock file {}: cannot resolve its path to check its mount: {e}",
            path.display()
        ))
    })?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| {
        Error::LockFile(format!(
            "cannot read /proc/self/mountinfo to check the mount of lock file {}: {e}",
            path.display()
        ))
    })?;
    match mount_problem(&mountinfo, &resolved) {
        Some(problem) => Err(Error::LockFile(problem)),
        None => Ok(()),
    }
}

/// One line of mountinfo, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    pub(crate) point: PathBuf,
    pub(crate) fstype: String,
    pub(crate) source: String,
    /// Per-mount options followed by the superblock options, where NFS and
    /// CIFS list theirs.
    pub(crate) options: Vec<String>,
}

impl Mount {
    fn option(&self, name: &str) -> bool {
        self.options.iter().any(|o| o == name)
    }

    fn option_value(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    }
}

/// The mount `path` (absolute, symlinks resolved) lives on: the longest
/// mount point that is a prefix of it, the last one listed when a point is
/// mounted over.
pub(crate) fn find_mount(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for mount in mountinfo.lines().filter_map(parse_mountinfo_line) {
        if !path.starts_with(&mount.point) {
            continue;
        }
        let longer = best
            .as_ref()
            .is_none_or(|b| mount.point.components().count() >= b.point.components().count());
        if longer {
            best = Some(mount);
        }
    }
    best
}

/// Parses `36 35 98:0 /root /mnt rw,noatime shared:1 - nfs4 srv:/x rw,vers=4.2`.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let point = unescape(left.get(4)?);
    let fstype = unescape(right.next()?);
    let source = unescape(right.next().unwrap_or_default());
    let super_options = right.next().unwrap_or_default();
    let options = left
        .get(5)
        .copied()
        .unwrap_or_default()
        .split(',')
        .chain(super_options.split(','))
        .filter(|o| !o.is_empty())
        .map(unescape)
        .collect();
    Some(Mount {
        point: PathBuf::from(point),
        fstype,
        source,
        options,
    })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash); anything else is kept as written.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.len() - i >= 4 {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why the mount of `path` (absolute, symlinks resolved) cannot carry a
/// lock file shared by two hosts, or `None` if it can (or is local, or is
/// not found). The text names the option and the remount that fixes it.
pub fn mount_problem(mountinfo: &str, path: &Path) -> Option<String> {
    let mount = find_mount(mountinfo, path)?;
    let (option, fix) = match mount.fstype.as_str() {
        "nfs" | "nfs4" => {
            if mount.option("nolock") {
                (
                    "nolock".to_owned(),
                    "remount without nolock (with NFSv3 the lock service, rpc.statd/lockd, must run on both hosts; NFSv4 is preferred)",
                )
            } else {
                match mount.option_value("local_lock") {
                    Some(mode) if mode != "none" => (
                        format!("local_lock={mode}"),
                        "remount with local_lock=none (the default) so locks are sent to the NFS server",
                    ),
                    _ => return None,
                }
            }
        }
        "cifs" | "smb3" | "smbfs" if mount.option("nobrl") => (
            "nobrl".to_owned(),
            "remount without nobrl so byte-range locks are sent to the SMB server",
        ),
        "fuse.sshfs" => (
            "sshfs".to_owned(),
            "use an NFSv4 or SMB share instead: sshfs does not forward locks to the server",
        ),
        _ => return None,
    };
    Some(format!(
        "lock file {} is on a {} mount ({} on {}) with {option}: locks there are local to one host, so both servers could hold it; {fix}",
        path.display(),
        mount.fstype,
        mount.source,
        mount.point.display(),
    ))
}

/// One line describing the mount of `path`, for reports; `None` if it
/// cannot be found.
pub(crate) fn describe_mount(path: &Path) -> Option<(String, bool)> {
    let resolved = std::fs::canonicalize(path).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = find_mount(&mountinfo, &resolved)?;
    let network = matches!(
        mount.fstype.as_str(),
        "nfs"
            | "nfs4"
            | "cifs"
            | "smb3"
            | "smbfs"
            | "ceph"
            | "glusterfs"
            | "lustre"
            | "gpfs"
            | "ocfs2"
            | "gfs2"
    ) || mount.fstype.starts_with("fuse");
    Some((
        format!(
            "{} ({} on {})",
            mount.fstype,
            mount.source,
            mount.point.display()
        ),
        network,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/mnt/my\040share"), "/mnt/my share");
        assert_eq!(unescape(r"a\134b\011c"), "a\\b\tc");
        assert_eq!(unescape(r"bad\09x\"), r"bad\09x\");
        assert_eq!(unescape(r"end\04"), r"end\04");
    }
}
