//! Directory operations that survive a power cut.
//!
//! A file's `fsync` makes its data durable, not its name: the entry in its
//! directory is durable once the directory itself is synced. Stores sync
//! their own directories; these helpers cover the directories around them
//! (a store directory created at the first start, a file saved aside).

use std::fs::File;
use std::io;
use std::path::Path;

/// Syncs directory `dir`: the entries created, renamed or removed in it so
/// far survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Like [`std::fs::create_dir_all`], then syncs the directory holding each
/// directory it created, so the new directories survive a power cut.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    std::fs::create_dir_all(dir)?;
    for created in missing {
        match created.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_parents_and_accepts_an_existing_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let deep = root.join("a/b/c");
        create_dir_all(&deep).expect("create");
        assert!(deep.is_dir());
        create_dir_all(&deep).expect("again");
        sync_dir(&deep).expect("sync");
        let file = root.join("a/file");
        std::fs::write(&file, b"x").expect("write");
        let err = create_dir_all(&file.join("d")).expect_err("under a file");
        assert_eq!(err.kind(), io::ErrorKind::NotADirectory, "{err}");
    }
}
