//! The file system's state: every file and directory twice, as the page
//! cache holds it (what programs read) and as the disk holds it (what
//! survives a power cut).
//!
//! # What reaches the disk
//!
//! The rules are the strict POSIX ones that RocksDB's own fault-injection
//! file system also applies:
//!
//! - A file's data reaches the disk when the file is synced (`fsync` or
//!   `fdatasync`); its size follows its data.
//! - A directory's entries (creates, unlinks, renames in it) reach the disk
//!   when the directory itself is synced. A file synced in a directory that
//!   never was is lost with its name.
//! - Nothing else does, except at [`Loss::Torn`] power cuts, where each page
//!   written since the file's last sync may or may not have been written
//!   back by the kernel before the cut.
//!
//! Real file systems keep more (ext4 commits a new file's directory entry
//! with the file's `fsync`), so a program that keeps its data here keeps it
//! there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use rand::Rng;

use crate::error::{Error, Result};

/// Page size of the written-back-or-not decision at a torn power cut.
pub const PAGE: u64 = 4096;
/// The root directory's inode number.
pub const ROOT: u64 = 1;
/// Deepest directory tree the image writer follows.
const MAX_DEPTH: usize = 64;

/// What happens to writes not yet synced when the power is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// All of them are lost: the disk holds exactly what was synced.
    Unsynced,
    /// Each page written since its file's last sync independently reached
    /// the disk or not (a kernel writing back dirty pages in any order).
    /// Pages past the synced end that were not written back read as zeros
    /// if a later page was.
    Torn,
}

/// What a power cut kept and lost, for the test's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// Files in the image.
    pub files: usize,
    /// Directories in the image, the root included.
    pub dirs: usize,
    /// Unsynced pages of imaged files that reached the disk.
    pub pages_kept: usize,
    /// Unsynced pages of imaged files that were lost.
    pub pages_lost: usize,
}

/// A file or directory's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Directory or regular file.
    pub dir: bool,
    /// Size in bytes (entries for a directory).
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Last change.
    pub mtime: SystemTime,
}

#[derive(Debug)]
struct File {
    data: Vec<u8>,
    synced: Vec<u8>,
    /// Pages written (or truncated into) since the last sync.
    dirty: BTreeSet<u64>,
}

#[derive(Debug)]
struct Dir {
    entries: BTreeMap<OsString, u64>,
    synced: BTreeMap<OsString, u64>,
}

#[derive(Debug)]
enum Kind {
    File(File),
    Dir(Dir),
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
}

/// Errors are `errno` values, as the kernel wants them.
pub type Errno = i32;

/// The whole file system. Inodes are never freed: one unlinked in the page
/// cache may still be named on the disk.
#[derive(Debug)]
pub struct Model {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// Set by the power cut: every later operation fails with `EIO`.
    off: bool,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

fn pages(from: u64, to: u64) -> impl Iterator<Item = u64> {
    let last = if to > from { to.div_ceil(PAGE) } else { 0 };
    (from / PAGE)..last
}

impl Model {
    /// An empty file system: the root directory, synced.
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir(Dir {
                    entries: BTreeMap::new(),
                    synced: BTreeMap::new(),
                }),
                perm: 0o755,
                mtime: SystemTime::now(),
            },
        );
        Model {
            nodes,
            next: ROOT + 1,
            off: false,
        }
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        if self.off {
            return Err(libc::EIO);
        }
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&Dir, Errno> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir, Errno> {
        let node = self.node_mut(ino)?;
        node.mtime = SystemTime::now();
        match &mut node.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut File, Errno> {
        let node = self.node_mut(ino)?;
        node.mtime = SystemTime::now();
        match &mut node.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// The attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (dir, size) = match &node.kind {
            Kind::File(f) => (false, f.data.len() as u64),
            Kind::Dir(d) => (true, d.entries.len() as u64),
        };
        Ok(Attr {
            ino,
            dir,
            size,
            perm: node.perm,
            mtime: node.mtime,
        })
    }

    /// The inode named `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// Creates an empty file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        let kind = if dir {
            Kind::Dir(Dir {
                entries: BTreeMap::new(),
                synced: BTreeMap::new(),
            })
        } else {
            Kind::File(File {
                data: Vec::new(),
                synced: Vec::new(),
                dirty: BTreeSet::new(),
            })
        };
        self.nodes.insert(
            ino,
            Node {
                kind,
                perm,
                mtime: SystemTime::now(),
            },
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        match &self.node(ino)?.kind {
            Kind::File(f) => {
                let len = f.data.len();
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
                let end = start.saturating_add(size as usize).min(len);
                Ok(&f.data[start..end])
            }
            Kind::Dir(_) => Err(libc::EISDIR),
        }
    }

    /// Writes `data` at `offset`, growing the file (with zeros) as needed.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let f = self.file_mut(ino)?;
        let start = usize::try_from(offset).map_err(|_| libc::EFBIG)?;
        let end = start.checked_add(data.len()).ok_or(libc::EFBIG)?;
        if f.data.len() < end {
            let old = f.data.len() as u64;
            f.data.resize(end, 0);
            f.dirty.extend(pages(old, offset));
        }
        f.data[start..end].copy_from_slice(data);
        f.dirty.extend(pages(offset, end as u64));
        Ok(data.len())
    }

    /// Truncates or extends (with zeros) the file to `size` bytes.
    pub fn set_size(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        let f = self.file_mut(ino)?;
        let new = usize::try_from(size).map_err(|_| libc::EFBIG)?;
        let old = f.data.len() as u64;
        f.data.resize(new, 0);
        // The page the new end falls in changes either way; pages past it
        // change when the file grows.
        f.dirty
            .extend(pages(old.min(size), old.max(size).max(size + 1)));
        Ok(())
    }

    /// `fallocate`: with `keep_size` only reserves (nothing to model),
    /// otherwise also extends the file to `offset + len`.
    pub fn allocate(
        &mut self,
        ino: u64,
        offset: u64,
        len: u64,
        keep_size: bool,
    ) -> Result<(), Errno> {
        let size = self.attr(ino)?.size;
        let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
        if !keep_size && end > size {
            self.set_size(ino, end)?;
        }
        Ok(())
    }

    /// Gives file `ino` a second name, `new_parent/new_name` (a hard
    /// link, as RocksDB's checkpoints make). The image writes each name as
    /// a file of its own.
    pub fn link(&mut self, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<(), Errno> {
        if self.attr(ino)?.dir {
            return Err(libc::EPERM);
        }
        if self.dir(new_parent)?.entries.contains_key(new_name) {
            return Err(libc::EEXIST);
        }
        self.dir_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), ino);
        Ok(())
    }

    /// Removes the file `name` from `parent`.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if self.attr(ino)?.dir {
            return Err(libc::EISDIR);
        }
        self.dir_mut(parent)?.entries.remove(name);
        Ok(())
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_mut(parent)?.entries.remove(name);
        Ok(())
    }

    /// Whether `ino` is `dir` or lies under it.
    fn within(&self, ino: u64, dir: u64) -> bool {
        if ino == dir {
            return true;
        }
        let Ok(d) = self.dir(dir) else {
            return false;
        };
        d.entries.values().any(|&child| self.within(ino, child))
    }

    /// Renames `parent/name` to `new_parent/new_name`, replacing a file or
    /// an empty directory there unless `no_replace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let moving_dir = self.attr(ino)?.dir;
        self.dir(new_parent)?;
        if moving_dir && self.within(new_parent, ino) {
            return Err(libc::EINVAL);
        }
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            if no_replace {
                return Err(libc::EEXIST);
            }
            match (moving_dir, self.attr(old)?.dir) {
                (false, true) => return Err(libc::EISDIR),
                (true, false) => return Err(libc::ENOTDIR),
                (true, true) if !self.dir(old)?.entries.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), ino);
        Ok(())
    }

    /// The entries of directory `ino`: (inode, is a directory, name).
    pub fn entries(&self, ino: u64) -> Result<Vec<(u64, bool, OsString)>, Errno> {
        let d = self.dir(ino)?;
        d.entries
            .iter()
            .map(|(name, &child)| Ok((child, self.attr(child)?.dir, name.clone())))
            .collect()
    }

    /// `fsync` / `fdatasync` of a file, or of a directory (its entries).
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => {
                f.synced.resize(f.data.len(), 0);
                let len = f.data.len() as u64;
                for page in std::mem::take(&mut f.dirty) {
                    let start = page * PAGE;
                    if start >= len {
                        break;
                    }
                    let end = ((page + 1) * PAGE).min(len);
                    let range = start as usize..end as usize;
                    f.synced[range.clone()].copy_from_slice(&f.data[range]);
                }
            }
            Kind::Dir(d) => d.synced = d.entries.clone(),
        }
        Ok(())
    }

    /// A file system holding a copy of the directory tree `dir` (regular
    /// files and directories; nothing else is expected there), all synced:
    /// a disk brought back after a power cut, or prepared beforehand.
    pub fn import(dir: &Path) -> Result<Model> {
        let mut m = Model::new();
        m.import_dir(dir, ROOT, 0)?;
        Ok(m)
    }

    fn import_dir(&mut self, path: &Path, ino: u64, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep(MAX_DEPTH));
        }
        let read_err = |p: &Path, source| Error::Import {
            path: p.to_owned(),
            source,
        };
        let model_err = |p: &Path, e: Errno| read_err(p, std::io::Error::from_raw_os_error(e));
        for entry in std::fs::read_dir(path).map_err(|e| read_err(path, e))? {
            let entry = entry.map_err(|e| read_err(path, e))?;
            let child_path = entry.path();
            let kind = entry.file_type().map_err(|e| read_err(&child_path, e))?;
            let dir = kind.is_dir();
            let child = self
                .create(
                    ino,
                    &entry.file_name(),
                    dir,
                    if dir { 0o755 } else { 0o644 },
                )
                .map_err(|e| model_err(&child_path, e))?;
            if dir {
                self.import_dir(&child_path, child, depth + 1)?;
            } else {
                let bytes = std::fs::read(&child_path).map_err(|e| read_err(&child_path, e))?;
                self.write(child, 0, &bytes)
                    .map_err(|e| model_err(&child_path, e))?;
            }
            self.sync(child).map_err(|e| model_err(&child_path, e))?;
        }
        self.sync(ino).map_err(|e| model_err(path, e))
    }

    /// Cuts the power: every later operation fails with `EIO`, and what the
    /// disk holds now is written under `image` (an existing empty
    /// directory), with `loss` deciding the fate of unsynced pages.
    pub fn power_off(&mut self, loss: Loss, rng: &mut impl Rng, image: &Path) -> Result<Cut> {
        if self.off {
            return Err(Error::AlreadyOff);
        }
        self.off = true;
        let mut cut = Cut::default();
        self.write_dir(ROOT, image, loss, rng, &mut cut, 0)?;
        Ok(cut)
    }

    fn write_dir(
        &self,
        ino: u64,
        path: &Path,
        loss: Loss,
        rng: &mut impl Rng,
        cut: &mut Cut,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep(MAX_DEPTH));
        }
        cut.dirs += 1;
        let Some(Node {
            kind: Kind::Dir(dir),
            ..
        }) = self.nodes.get(&ino)
        else {
            return Ok(());
        };
        for (name, &child) in &dir.synced {
            let child_path = path.join(name);
            let image_err = |source| Error::Image {
                path: child_path.clone(),
                source,
            };
            match self.nodes.get(&child).map(|n| &n.kind) {
                Some(Kind::Dir(_)) => {
                    std::fs::create_dir(&child_path).map_err(image_err)?;
                    self.write_dir(child, &child_path, loss, rng, cut, depth + 1)?;
                }
                Some(Kind::File(f)) => {
                    let bytes = on_disk(f, loss, rng, cut);
                    let mut out = std::fs::File::create(&child_path).map_err(image_err)?;
                    out.write_all(&bytes).map_err(image_err)?;
                    cut.files += 1;
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// What the disk holds of `f` after a power cut.
fn on_disk(f: &File, loss: Loss, rng: &mut impl Rng, cut: &mut Cut) -> Vec<u8> {
    let mut bytes = f.synced.clone();
    let len = f.data.len() as u64;
    for &page in &f.dirty {
        let start = page * PAGE;
        if start >= len {
            break;
        }
        if loss == Loss::Unsynced || !rng.random_bool(0.5) {
            cut.pages_lost += 1;
            continue;
        }
        cut.pages_kept += 1;
        let end = ((page + 1) * PAGE).min(len) as usize;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start as usize..end].copy_from_slice(&f.data[start as usize..end]);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn cut(m: &mut Model, loss: Loss, seed: u64) -> (tempfile::TempDir, Cut) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = StdRng::seed_from_u64(seed);
        let c = m.power_off(loss, &mut rng, dir.path()).expect("power off");
        (dir, c)
    }

    #[test]
    fn only_synced_data_under_synced_names_survives() {
        let mut m = Model::new();
        let a = m.create(ROOT, name("a"), false, 0o644).expect("create");
        let b = m.create(ROOT, name("b"), false, 0o644).expect("create");
        m.write(a, 0, b"synced").expect("write");
        m.sync(a).expect("sync");
        m.write(a, 6, b" and not").expect("write");
        m.write(b, 0, b"file synced, name not").expect("write");
        m.sync(ROOT).expect("sync root");
        let c = m.create(ROOT, name("c"), false, 0o644).expect("create");
        m.write(c, 0, b"lost with its name").expect("write");
        m.sync(c).expect("sync");
        assert_eq!(m.read(a, 0, 100).expect("read"), b"synced and not");

        let (dir, report) = cut(&mut m, Loss::Unsynced, 1);
        assert_eq!(std::fs::read(dir.path().join("a")).expect("a"), b"synced");
        // b's name reached the disk with the root's sync; its data never did.
        assert_eq!(std::fs::read(dir.path().join("b")).expect("b"), b"");
        assert!(!dir.path().join("c").exists());
        assert_eq!(report.files, 2);
        assert_eq!(report.pages_lost, 2);
        assert_eq!(m.attr(a), Err(libc::EIO), "power is off");
    }

    #[test]
    fn renames_and_unlinks_reach_the_disk_with_their_directory() {
        let mut m = Model::new();
        let d = m.create(ROOT, name("d"), true, 0o755).expect("mkdir");
        let f = m.create(d, name("old"), false, 0o644).expect("create");
        m.write(f, 0, b"x").expect("write");
        m.sync(f).expect("sync");
        m.sync(d).expect("sync d");
        m.sync(ROOT).expect("sync root");
        m.rename(d, name("old"), d, name("new"), false)
            .expect("rename");
        let g = m.create(d, name("gone"), false, 0o644).expect("create");
        m.sync(d).expect("sync d");
        m.unlink(d, name("gone")).expect("unlink");
        assert_eq!(m.lookup(d, name("gone")), Err(libc::ENOENT));
        assert_eq!(m.lookup(d, name("new")), Ok(f));
        assert_ne!(g, f);

        let (dir, _) = cut(&mut m, Loss::Unsynced, 1);
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("d"))
            .expect("read d")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["gone", "new"]);
        assert_eq!(std::fs::read(dir.path().join("d/new")).expect("new"), b"x");
    }

    #[test]
    fn a_torn_cut_keeps_some_unsynced_pages_over_the_old_bytes() {
        let page = PAGE as usize;
        let mut m = Model::new();
        let f = m.create(ROOT, name("wal"), false, 0o644).expect("create");
        m.write(f, 0, &vec![b'o'; 8 * page]).expect("write");
        m.sync(f).expect("sync");
        m.sync(ROOT).expect("sync root");
        // Overwrite in place (a reused file) and append past the old end.
        m.write(f, 0, &vec![b'n'; 12 * page]).expect("write");
        let (dir, report) = cut(&mut m, Loss::Torn, 7);
        let bytes = std::fs::read(dir.path().join("wal")).expect("wal");
        assert_eq!(report.pages_kept + report.pages_lost, 12);
        assert!(report.pages_kept > 0 && report.pages_lost > 0, "{report:?}");
        for (i, chunk) in bytes.chunks(page).enumerate() {
            let first = chunk[0];
            assert!(chunk.iter().all(|&b| b == first), "page {i} is torn inside");
            // Within the old size: old or new bytes; past it: new or zeros.
            assert!(
                first == b'n' || (i < 8 && first == b'o') || (i >= 8 && first == 0),
                "page {i} holds {first}"
            );
        }
        assert!(bytes.len() >= 8 * page && bytes.len() <= 12 * page);
    }

    #[test]
    fn truncation_and_regrowth_sync_as_zeros() {
        let mut m = Model::new();
        let f = m.create(ROOT, name("f"), false, 0o644).expect("create");
        m.write(f, 0, &[7u8; 10_000]).expect("write");
        m.sync(f).expect("sync");
        m.set_size(f, 100).expect("truncate");
        m.set_size(f, 9_000).expect("extend");
        m.sync(f).expect("sync");
        m.sync(ROOT).expect("sync root");
        let (dir, _) = cut(&mut m, Loss::Unsynced, 1);
        let bytes = std::fs::read(dir.path().join("f")).expect("f");
        assert_eq!(bytes.len(), 9_000);
        assert!(bytes[..100].iter().all(|&b| b == 7));
        assert!(bytes[100..].iter().all(|&b| b == 0));
    }

    #[test]
    fn directory_rules() {
        let mut m = Model::new();
        let d = m.create(ROOT, name("d"), true, 0o755).expect("mkdir");
        let e = m.create(d, name("e"), true, 0o755).expect("mkdir");
        m.create(e, name("f"), false, 0o644).expect("create");
        assert_eq!(m.create(ROOT, name("d"), false, 0o644), Err(libc::EEXIST));
        assert_eq!(m.rmdir(d, name("e")), Err(libc::ENOTEMPTY));
        assert_eq!(m.unlink(ROOT, name("d")), Err(libc::EISDIR));
        assert_eq!(
            m.rename(ROOT, name("d"), e, name("loop"), false),
            Err(libc::EINVAL)
        );
        assert_eq!(
            m.rename(e, name("f"), ROOT, name("d"), false),
            Err(libc::EISDIR)
        );
        m.create(ROOT, name("g"), false, 0o644).expect("create");
        assert_eq!(
            m.rename(ROOT, name("g"), e, name("f"), true),
            Err(libc::EEXIST)
        );
        m.rename(ROOT, name("g"), e, name("f"), false)
            .expect("replace");
        assert_eq!(m.entries(e).expect("entries").len(), 1);
        assert_eq!(m.link(d, ROOT, name("h")), Err(libc::EPERM));
    }

    #[test]
    fn an_imported_tree_is_all_synced() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("db/sub")).expect("mkdir");
        std::fs::write(src.path().join("db/CURRENT"), b"MANIFEST-1\n").expect("write");
        std::fs::write(
            src.path().join("db/sub/big"),
            vec![9u8; 3 * PAGE as usize + 5],
        )
        .expect("write");
        let mut m = Model::import(src.path()).expect("import");
        let db = m.lookup(ROOT, name("db")).expect("db");
        let current = m.lookup(db, name("CURRENT")).expect("CURRENT");
        assert_eq!(m.read(current, 0, 100), Ok(&b"MANIFEST-1\n"[..]));
        let (dir, report) = cut(&mut m, Loss::Torn, 3);
        assert_eq!((report.files, report.dirs), (2, 3), "{report:?}");
        assert_eq!(report.pages_kept + report.pages_lost, 0, "nothing unsynced");
        assert_eq!(
            std::fs::read(dir.path().join("db/sub/big")).expect("big"),
            vec![9u8; 3 * PAGE as usize + 5]
        );
    }

    #[test]
    fn a_hard_link_outlives_the_unlink_of_the_first_name() {
        let mut m = Model::new();
        let f = m.create(ROOT, name("sst"), false, 0o644).expect("create");
        m.write(f, 0, b"table").expect("write");
        m.sync(f).expect("sync");
        let d = m
            .create(ROOT, name("checkpoint"), true, 0o755)
            .expect("mkdir");
        m.link(f, d, name("sst")).expect("link");
        assert_eq!(m.link(f, d, name("sst")), Err(libc::EEXIST));
        m.unlink(ROOT, name("sst")).expect("unlink");
        let linked = m.lookup(d, name("sst")).expect("lookup");
        assert_eq!(m.read(linked, 0, 10), Ok(&b"table"[..]));
        m.sync(d).expect("sync");
        m.sync(ROOT).expect("sync root");
        let (dir, report) = cut(&mut m, Loss::Unsynced, 1);
        let bytes = std::fs::read(dir.path().join("checkpoint/sst")).expect("sst");
        assert_eq!(bytes, b"table");
        assert!(!dir.path().join("sst").exists());
        assert_eq!(report.files, 1);
    }
}
