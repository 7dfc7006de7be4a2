//! The file system through the kernel: real `write`, `fsync`, `rename` and
//! directory `fsync` calls on a FUSE mount, then a power cut.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

use fmq_powerloss::{Loss, Mount};

fn sync_dir(path: &std::path::Path) {
    File::open(path)
        .and_then(|d| d.sync_all())
        .expect("fsync directory");
}

#[test]
fn synced_writes_survive_a_power_cut_and_the_rest_do_not() {
    let mnt = tempfile::tempdir().expect("mount dir");
    let image = tempfile::tempdir().expect("image dir");
    let mount = Mount::new(mnt.path()).expect("mount");
    let root = mount.path();

    let db = root.join("db");
    fs::create_dir(&db).expect("mkdir");
    sync_dir(root);
    let mut wal = File::create(db.join("wal.tmp")).expect("create");
    wal.write_all(b"record 1;").expect("write");
    wal.sync_data().expect("fdatasync");
    wal.write_all(b"record 2 unsynced;").expect("write");
    fs::rename(db.join("wal.tmp"), db.join("wal")).expect("rename");
    sync_dir(&db);
    // Reads see everything written, synced or not.
    let mut read = String::new();
    File::open(db.join("wal"))
        .and_then(|mut f| f.read_to_string(&mut read))
        .expect("read back");
    assert_eq!(read, "record 1;record 2 unsynced;");
    // A file whose data was synced but whose name never was.
    let mut orphan = File::create(db.join("orphan")).expect("create");
    orphan.write_all(b"lost").expect("write");
    orphan.sync_all().expect("fsync");
    // An overwrite in place that is never synced.
    let mut reused = OpenOptions::new()
        .write(true)
        .open(db.join("wal"))
        .expect("open");
    reused.seek(SeekFrom::Start(0)).expect("seek");
    reused.write_all(b"RECORD").expect("write");

    let cut = mount
        .power_off(Loss::Unsynced, 1, image.path())
        .expect("power off");
    assert_eq!((cut.files, cut.dirs), (1, 2), "{cut:?}");
    // The mount fails from the cut on.
    let err = wal.write_all(b"after").and_then(|()| wal.sync_data());
    assert!(err.is_err(), "writes after the power cut must fail");
    drop((wal, orphan, reused));
    drop(mount);

    assert_eq!(
        fs::read(image.path().join("db/wal")).expect("wal on disk"),
        b"record 1;"
    );
    assert!(!image.path().join("db/orphan").exists());
    assert!(!image.path().join("db/wal.tmp").exists());
}

#[test]
fn preallocation_and_truncation_through_the_kernel() {
    let mnt = tempfile::tempdir().expect("mount dir");
    let image = tempfile::tempdir().expect("image dir");
    let mount = Mount::new(mnt.path()).expect("mount");
    let path = mount.path().join("f");
    let f = File::create(&path).expect("create");
    f.set_len(10_000).expect("extend");
    f.set_len(3).expect("truncate");
    f.sync_all().expect("fsync");
    sync_dir(mount.path());
    assert_eq!(fs::metadata(&path).expect("stat").len(), 3);
    let cut = mount
        .power_off(Loss::Torn, 9, image.path())
        .expect("power off");
    assert_eq!(cut.files, 1);
    drop(f);
    drop(mount);
    assert_eq!(fs::read(image.path().join("f")).expect("f"), [0, 0, 0]);
}
