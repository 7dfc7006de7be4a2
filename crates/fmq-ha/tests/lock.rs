//! Lock file tests. Contention is between separate processes: the test
//! binary re-executes itself filtered to `agent_entry`, which, with
//! `FMQ_TEST_LOCK_AGENT` set, runs commands read from stdin against its own
//! `LockFile` and answers on stdout.

#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fmq_ha::lock::{mount_problem, LockFile};
use fmq_ha::Error;

const AGENT_ENV: &str = "FMQ_TEST_LOCK_AGENT";
const REPLY: &str = "AGENT-REPLY ";

/// The child side: one `LockFile`, driven by stdin lines.
#[test]
fn agent_entry() {
    let Some(path) = std::env::var_os(AGENT_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let mut lock: Option<LockFile> = None;
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        let reply = match (words.next().unwrap_or(""), lock.as_mut()) {
            ("open", _) => match LockFile::open(&path) {
                Ok(l) => {
                    lock = Some(l);
                    "ok".to_owned()
                }
                Err(e) => format!("err {e}"),
            },
            ("acquire", Some(l)) => format!("{:?}", l.try_acquire().map_err(|e| e.to_string())),
            ("takeover", Some(l)) => format!(
                "{:?}",
                l.take_over(words.next().unwrap())
                    .map_err(|e| e.to_string())
            ),
            ("verify", Some(l)) => {
                let server = words.next().unwrap();
                let epoch: u64 = words.next().unwrap().parse().unwrap();
                format!("{:?}", l.verify(server, epoch).map_err(|e| e.to_string()))
            }
            ("release", Some(l)) => format!("{:?}", l.release().map_err(|e| e.to_string())),
            // An unrelated open+close of the lock file in this process.
            ("openclose", _) => {
                drop(fs::File::open(&path).unwrap());
                drop(
                    fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .unwrap(),
                );
                "ok".to_owned()
            }
            (other, _) => format!("unknown or not open: {other}"),
        };
        // Not println!: the harness would capture it.
        writeln!(out, "{REPLY}{}", reply.replace('\n', " ")).unwrap();
        out.flush().unwrap();
    }
    std::process::exit(0);
}

/// The parent side of an agent process; killed and reaped on drop.
struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: mpsc::Receiver<String>,
}

impl Agent {
    fn spawn(path: &Path) -> Agent {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "agent_entry", "--test-threads=1", "-q"])
            .env(AGENT_ENV, path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(reply) = line.strip_prefix(REPLY) {
                    if tx.send(reply.to_owned()).is_err() {
                        break;
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Agent {
            child,
            stdin,
            replies,
        }
    }

    fn cmd(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        self.replies
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("agent gave no reply to {command:?}: {e}"))
    }

    /// Spawns an agent that has opened the file.
    fn opened(path: &Path) -> Agent {
        let mut agent = Agent::spawn(path);
        assert_eq!(agent.cmd("open"), "ok");
        agent
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir with an empty lock file in it, as the operator would create.
fn lock_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fmq.lock");
    fs::write(&path, b"").unwrap();
    (dir, path)
}

#[test]
fn exclusive_between_processes() {
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    let mut b = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    assert_eq!(
        a.cmd("acquire"),
        "Ok(true)",
        "re-acquiring our own lock succeeds"
    );
    assert_eq!(b.cmd("acquire"), "Ok(false)");
    let mut ours = LockFile::open(&path).unwrap();
    assert!(!ours.try_acquire().unwrap());
    assert_eq!(a.cmd("release"), "Ok(())");
    assert_eq!(b.cmd("acquire"), "Ok(true)");
    assert_eq!(a.cmd("acquire"), "Ok(false)");
    assert!(!ours.try_acquire().unwrap());
}

#[test]
fn sigkilled_holder_releases_the_lock() {
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    let mut ours = LockFile::open(&path).unwrap();
    assert!(!ours.try_acquire().unwrap());
    a.sigkill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ours.try_acquire().unwrap() {
        assert!(
            Instant::now() < deadline,
            "lock of a killed process not released"
        );
        thread::sleep(Duration::from_millis(5));
    }
    assert!(ours.is_held());
}

#[test]
fn take_over_increments_the_epoch_across_holders() {
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    assert_eq!(a.cmd("takeover Primary@a:1"), "Ok(1)");
    a.sigkill();

    let mut b = Agent::opened(&path);
    assert_eq!(b.cmd("acquire"), "Ok(true)");
    assert_eq!(b.cmd("takeover Secondary@b:2"), "Ok(2)");

    let reader = LockFile::open(&path).unwrap();
    let holder = reader.read_holder().unwrap().unwrap();
    assert_eq!((holder.server.as_str(), holder.epoch), ("Secondary@b:2", 2));
    assert!(holder.acquired_ms > 0);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON line: {text:?}");
    assert!(
        text.starts_with(r#"{"server":"Secondary@b:2","epoch":2,"acquired_ms":"#),
        "{text}"
    );

    assert_eq!(b.cmd("release"), "Ok(())");
    let mut c = LockFile::open(&path).unwrap();
    assert!(c.try_acquire().unwrap());
    assert_eq!(c.take_over("Primary@a:3").unwrap(), 3);
    assert!(c.verify("Primary@a:3", 3).unwrap());
}

#[test]
fn take_over_needs_the_lock() {
    let (_dir, path) = lock_file();
    let mut ours = LockFile::open(&path).unwrap();
    assert!(matches!(
        ours.take_over("Primary@a:1"),
        Err(Error::LockFile(_))
    ));
    assert_eq!(
        fs::read(&path).unwrap(),
        b"",
        "nothing written without the lock"
    );
}

#[test]
fn verify_fails_after_the_holder_line_is_overwritten() {
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    assert_eq!(a.cmd("takeover Primary@a:1"), "Ok(1)");
    assert_eq!(a.cmd("verify Primary@a:1 1"), "Ok(true)");
    assert_eq!(a.cmd("verify Primary@a:1 2"), "Ok(false)", "wrong epoch");
    assert_eq!(a.cmd("verify Secondary@b:1 1"), "Ok(false)", "wrong server");
    // Another process (this one) overwrites the line, as a server that took
    // the lock after ours was lost would.
    fs::write(
        &path,
        b"{\"server\":\"Secondary@b:2\",\"epoch\":2,\"acquired_ms\":1}\n",
    )
    .unwrap();
    assert_eq!(a.cmd("verify Primary@a:1 1"), "Ok(false)");
    fs::write(&path, b"garbage").unwrap();
    assert_eq!(a.cmd("verify Primary@a:1 1"), "Ok(false)");
}

#[test]
fn verify_fails_after_release() {
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    assert_eq!(a.cmd("takeover Primary@a:1"), "Ok(1)");
    assert_eq!(a.cmd("release"), "Ok(())");
    assert_eq!(a.cmd("verify Primary@a:1 1"), "Ok(false)");

    // In-process too, and verify does not quietly re-take a released lock.
    let mut ours = LockFile::open(&path).unwrap();
    assert!(ours.try_acquire().unwrap());
    let epoch = ours.take_over("Secondary@b:2").unwrap();
    assert_eq!(epoch, 2);
    ours.release().unwrap();
    assert!(!ours.verify("Secondary@b:2", epoch).unwrap());
    let mut other = LockFile::open(&path).unwrap();
    assert!(other.try_acquire().unwrap(), "the lock stayed released");
}

#[test]
fn unrelated_open_and_close_keeps_the_lock() {
    // A classic POSIX (F_SETLK) lock is dropped when its process closes any
    // descriptor of the file; the OFD lock must not be.
    let (_dir, path) = lock_file();
    let mut a = Agent::opened(&path);
    assert_eq!(a.cmd("acquire"), "Ok(true)");
    assert_eq!(a.cmd("takeover Primary@a:1"), "Ok(1)");
    assert_eq!(a.cmd("openclose"), "ok");
    let mut ours = LockFile::open(&path).unwrap();
    assert!(
        !ours.try_acquire().unwrap(),
        "lock lost by an unrelated close"
    );
    assert_eq!(a.cmd("verify Primary@a:1 1"), "Ok(true)");

    // Same within one process: two descriptions conflict, and closing a
    // third one does not release the first one's lock.
    drop(a);
    let (_dir2, path2) = lock_file();
    let mut first = LockFile::open(&path2).unwrap();
    assert!(first.try_acquire().unwrap());
    drop(LockFile::open(&path2).unwrap());
    drop(fs::File::open(&path2).unwrap());
    let mut second = LockFile::open(&path2).unwrap();
    assert!(!second.try_acquire().unwrap());
}

#[test]
fn read_holder_of_empty_and_foreign_files() {
    let (_dir, path) = lock_file();
    let lock = LockFile::open(&path).unwrap();
    assert_eq!(lock.read_holder().unwrap(), None);
    fs::write(&path, b"not json\n").unwrap();
    assert_eq!(lock.read_holder().unwrap(), None);
    fs::write(
        &path,
        b"{\"server\":\"Primary@h:1\",\"epoch\":7}\ntrailing junk",
    )
    .unwrap();
    let holder = lock.read_holder().unwrap().unwrap();
    assert_eq!(
        (holder.server.as_str(), holder.epoch, holder.acquired_ms),
        ("Primary@h:1", 7, 0)
    );
    assert_eq!(lock.path(), path.as_path());
}

fn open_error(path: &Path) -> String {
    match LockFile::open(path) {
        Err(Error::LockFile(text)) => text,
        other => panic!("expected a lock file error, got {other:?}"),
    }
}

#[test]
fn missing_file_is_refused_in_the_seed_wording() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.lock");
    let text = open_error(&path);
    let p = path.display();
    assert!(
        text.starts_with(&format!("Lock file::{p} is not specified properly.")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "Unable to validate permissions on lock file::{p}."
        )),
        "{text}"
    );
    assert!(text.contains("Unable to boot the server"), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    assert!(!path.exists(), "open must never create the lock file");

    // A path inside a directory that does not exist.
    let deep = dir.path().join("no-such-dir").join("fmq.lock");
    assert!(open_error(&deep).contains("does not exist"));
}

#[test]
fn directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = open_error(dir.path());
    assert!(
        text.contains("is not specified properly") && text.contains("directory"),
        "{text}"
    );
}

#[test]
fn read_only_file_is_refused_even_for_root() {
    // Tests run as root in CI, and root opens a 0444 file for writing; so
    // open refuses a file with no write bit at all before trying, which
    // works for any user. (A user lacking permission on a writable-mode
    // file is refused by the O_RDWR open itself; not testable as root.)
    let (_dir, path) = lock_file();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
    let text = open_error(&path);
    assert!(text.contains("is not specified properly"), "{text}");
    assert!(text.contains("read-only (mode 0444)"), "{text}");
}

const MOUNTINFO: &str = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
25 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 22 0:35 / /mnt/gw rw,relatime shared:20 - nfs4 gw:/export rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.2,local_lock=flock,addr=10.0.0.1
41 22 0:36 / /mnt/gw3 rw,relatime shared:21 - nfs gw:/export3 rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.1,mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.1
42 22 0:37 / /mnt/smb rw,relatime shared:22 - cifs //gw/share rw,vers=3.1.1,cache=strict,username=fmq,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.1,file_mode=0755,dir_mode=0755,soft,nounix,serverino,mapposix,nobrl,rsize=4194304,wsize=4194304,bsize=1048576,echo_interval=60,actimeo=1
43 22 0:38 / /mnt/good rw,relatime shared:23 - nfs4 gw:/good rw,vers=4.2,hard,proto=tcp,sec=sys,local_lock=none,addr=10.0.0.1
44 22 0:39 / /mnt/smbgood rw,relatime shared:24 - cifs //gw/good rw,vers=3.1.1,cache=strict,soft,serverino,mapposix,rsize=4194304
45 22 0:40 / /mnt/my\\040share rw,relatime shared:25 - nfs4 gw:/sp rw,vers=4.1,local_lock=posix
46 43 252:1 / /mnt/good/local rw,relatime shared:26 - ext4 /dev/vdb1 rw
47 22 0:41 / /mnt/gw/over rw,relatime shared:27 - nfs4 gw:/over rw,vers=4.2,local_lock=none
";

#[test]
fn mount_problem_on_sample_mountinfo() {
    let nfs4 = mount_problem(MOUNTINFO, Path::new("/mnt/gw/ha/fmq.lock")).unwrap();
    assert!(
        nfs4.contains("lock file /mnt/gw/ha/fmq.lock is on a nfs4 mount"),
        "{nfs4}"
    );
    assert!(nfs4.contains("local_lock=flock"), "{nfs4}");
    assert!(nfs4.contains("remount with local_lock=none"), "{nfs4}");

    let nfs3 = mount_problem(MOUNTINFO, Path::new("/mnt/gw3/fmq.lock")).unwrap();
    assert!(
        nfs3.contains("nfs mount") && nfs3.contains("with nolock"),
        "{nfs3}"
    );
    assert!(nfs3.contains("remount without nolock"), "{nfs3}");

    let smb = mount_problem(MOUNTINFO, Path::new("/mnt/smb/fmq.lock")).unwrap();
    assert!(
        smb.contains("cifs mount") && smb.contains("with nobrl"),
        "{smb}"
    );
    assert!(smb.contains("remount without nobrl"), "{smb}");

    let spaced = mount_problem(MOUNTINFO, Path::new("/mnt/my share/fmq.lock")).unwrap();
    assert!(
        spaced.contains("local_lock=posix") && spaced.contains("on /mnt/my share)"),
        "{spaced}"
    );

    for fine in [
        "/var/lib/fmq/fmq.lock",    // ext4 root
        "/mnt/good/fmq.lock",       // nfs4 local_lock=none
        "/mnt/smbgood/fmq.lock",    // cifs with byte-range locks
        "/mnt/good/local/fmq.lock", // longest match: ext4 below nfs4
        "/mnt/gw/over/fmq.lock",    // good nfs4 mounted below the bad one
        "/mnt/gwx/fmq.lock",        // not under /mnt/gw: components, not string prefix
    ] {
        assert_eq!(mount_problem(MOUNTINFO, Path::new(fine)), None, "{fine}");
    }
    assert_eq!(mount_problem("", Path::new("/x")), None);
}

#[test]
fn mount_problem_takes_the_last_of_stacked_mounts() {
    let stacked = "\
22 1 252:1 / / rw - ext4 /dev/vda1 rw
30 22 0:35 / /mnt/gw rw - nfs4 gw:/a rw,local_lock=none
31 30 0:36 / /mnt/gw rw - nfs4 gw:/b rw,local_lock=all
";
    let problem = mount_problem(stacked, Path::new("/mnt/gw/fmq.lock")).unwrap();
    assert!(
        problem.contains("gw:/b") && problem.contains("local_lock=all"),
        "{problem}"
    );
}

#[test]
fn open_accepts_a_local_lock_file() {
    // The temp dir is on a local filesystem, which check_mount lets through.
    let (_dir, path) = lock_file();
    fmq_ha::lock::check_mount(&path).unwrap();
    let lock = LockFile::open(&path).unwrap();
    assert!(!lock.is_held());
}
