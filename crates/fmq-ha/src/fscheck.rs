//! `fmq fscheck DIR`: tests whether a directory can hold the pair's lock
//! file (and a shared store), before an operator trusts it with HA.
//!
//! The lock file is only as good as the filesystem's locking, and the
//! failure modes (host-local locks, locks that outlive their holder, fsync
//! that does nothing) are silent in normal operation and fatal at failover.
//! So this check exercises what the pair relies on, on a scratch file in the
//! directory: an OFD lock held by another *process* excludes us; killing
//! that process with SIGKILL releases its lock, and how fast; a lock survives
//! an unrelated open+close of the file; write+fsync+read back works; and the
//! mount options do not make locks host-local ([`check_mount`]).
//!
//! The other process is this same program, re-executed with the
//! [`HOLDER_ENV`] environment variable set to the scratch file. A binary that
//! uses [`run`] must therefore start its `main` with one line:
//!
//! ```no_run
//! // First line of the binary's `main`; never returns in the holder process.
//! fmq_ha::fscheck::dispatch_holder();
//! ```
//!
//! Run it once per host of the pair: it proves locking between processes of
//! one host and the mount options of that host, not the path between the
//! two hosts.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::libc;

use crate::error::{Error, Result};
use crate::lock::{check_mount, describe_mount, set_lock};

/// Environment variable that turns a re-executed program into the lock
/// holder of [`run`]: its value is the scratch file to lock.
pub const HOLDER_ENV: &str = "FMQ_FSCHECK_HOLDER";

/// Printed by the holder on stdout once it holds the lock. Other output on
/// the holder's stdout (e.g. a test harness's banner) is ignored.
const LOCKED_MARK: &str = "FMQ-FSCHECK-HOLDER LOCKED";
/// Printed by the holder, followed by the reason, when it cannot lock.
const FAILED_MARK: &str = "FMQ-FSCHECK-HOLDER FAILED";

/// How long the holder may take to start and lock.
const HOLDER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait for a killed holder's lock to be released. Generous so
/// a slow file server is measured rather than failed.
const KILL_RELEASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Poll period while waiting for the killed holder's lock.
const KILL_RELEASE_POLL: Duration = Duration::from_millis(2);
/// Write+fsync rounds and size of each write.
const FSYNC_ROUNDS: u32 = 5;
const FSYNC_BYTES: usize = 4096;
/// An fsync slower than this is reported, as it slows every persistent send.
const SLOW_FSYNC: Duration = Duration::from_millis(100);

/// One check of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short name, e.g. `"kill releases lock"`.
    pub name: &'static str,
    /// Whether the directory passed it.
    pub passed: bool,
    /// What was seen, or what is wrong and how to fix it.
    pub detail: String,
    /// How long the check took.
    pub elapsed: Duration,
}

/// The outcome of [`run`]; its `Display` is the operator's report, ending
/// with the verdict line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The directory checked.
    pub dir: PathBuf,
    /// The checks in the order they ran; a check whose prerequisite failed
    /// is not run and not listed.
    pub checks: Vec<Check>,
    /// Time from SIGKILL of the holder process to our lock succeeding.
    pub kill_release: Option<Duration>,
    /// Mean time of one fsync of a small write.
    pub fsync_mean: Option<Duration>,
    /// The mount the directory is on, e.g. `ext4 (/dev/sda1 on /)`.
    pub mount: Option<String>,
    /// Whether that mount is a network or cluster filesystem; a local one
    /// is suitable only for a pair on one host.
    pub network_fs: bool,
}

impl Report {
    /// True when every check passed (and at least one ran).
    pub fn suitable(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// The last line of the report: `OK: ...` or `NOT SUITABLE: ...`.
    pub fn verdict(&self) -> String {
        let dir = self.dir.display();
        if self.suitable() {
            let mut verdict =
                format!("OK: {dir} is suitable for a FerroMQ lock file / shared store");
            if !self.network_fs {
                verdict.push_str(
                    " (it is a local filesystem: only for a pair on this one host; two hosts need an NFSv4 or SMB share)",
                );
            }
            verdict
        } else {
            let failed: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.name)
                .collect();
            let first = self
                .checks
                .iter()
                .find(|c| !c.passed)
                .map_or("no check ran", |c| &c.detail);
            format!("NOT SUITABLE: {dir} failed {}: {first}", failed.join(", "))
        }
    }

    fn push(
        &mut self,
        name: &'static str,
        started: Instant,
        outcome: std::result::Result<String, String>,
    ) -> bool {
        let passed = outcome.is_ok();
        let detail = outcome.unwrap_or_else(|e| e);
        self.checks.push(Check {
            name,
            passed,
            detail,
            elapsed: started.elapsed(),
        });
        passed
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "FerroMQ file system check of {}", self.dir.display())?;
        if let Some(mount) = &self.mount {
            writeln!(f, "  mount: {mount}")?;
        }
        for c in &self.checks {
            writeln!(
                f,
                "  [{}] {:<26} {:>10.3} ms  {}",
                if c.passed { "PASS" } else { "FAIL" },
                c.name,
                c.elapsed.as_secs_f64() * 1000.0,
                c.detail
            )?;
        }
        write!(f, "{}", self.verdict())
    }
}

/// Makes this process the lock holder of [`run`] if it was started as one
/// ([`HOLDER_ENV`] set), and otherwise returns at once. Call it first in
/// `main`.
pub fn dispatch_holder() {
    if let Some(path) = std::env::var_os(HOLDER_ENV) {
        holder_main(Path::new(&path));
    }
}

/// The holder process: locks `path` (OFD write lock on the whole file),
/// prints a marker line on stdout, then holds the lock until its stdin
/// closes (the checking process ended or dropped it) or it is killed. Exits
/// with 1 after printing the reason if it cannot lock.
pub fn holder_main(path: &Path) -> ! {
    let code = match hold(path) {
        Ok(()) => 0,
        Err(e) => {
            // Nothing to do if stdout is gone: the parent will see EOF.
            let _ = writeln!(
                io::stdout(),
                "{FAILED_MARK} {}",
                e.to_string().replace('\n', " ")
            );
            let _ = io::stdout().flush();
            1
        }
    };
    std::process::exit(code)
}

fn hold(path: &Path) -> Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    match set_lock(&file, libc::F_WRLCK) {
        Ok(true) => {}
        Ok(false) => return Err(Error::LockFile("another process holds the lock".into())),
        Err(e) => return Err(Error::LockFile(format!("cannot lock: {e}"))),
    }
    // Written to the stdout handle, not with println!, so a test harness
    // that captures println! output still lets the marker through.
    let mut out = io::stdout().lock();
    writeln!(out, "{LOCKED_MARK}")?;
    out.flush()?;
    drop(out);
    let mut stdin = io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(file);
    Ok(())
}

/// Checks `dir`, re-executing this program (`current_exe`) with
/// [`HOLDER_ENV`] set as the lock holder; see [`dispatch_holder`].
pub fn run(dir: &Path) -> Result<Report> {
    let exe = std::env::current_exe()?;
    run_with(dir, move |path| {
        let mut command = Command::new(&exe);
        command.env(HOLDER_ENV, path);
        command
    })
}

/// Checks `dir`, spawning the lock holder with `holder_command(scratch
/// file)`; the command must end up calling [`holder_main`] with that path
/// (tests re-execute their own binary with a filter to one test that does).
/// Stdin, stdout and stderr of the command are set here.
///
/// `Err` only when `dir` is not a directory we can look at; every other
/// problem is a failed check in the report.
pub fn run_with(dir: &Path, holder_command: impl Fn(&Path) -> Command) -> Result<Report> {
    let meta = fs::metadata(dir).map_err(|e| {
        Error::LockFile(format!(
            "{}: cannot check this directory: {e}",
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(Error::LockFile(format!(
            "{}: not a directory",
            dir.display()
        )));
    }
    let described = describe_mount(dir);
    let mut report = Report {
        dir: dir.to_path_buf(),
        checks: Vec::new(),
        kill_release: None,
        fsync_mean: None,
        network_fs: described.as_ref().is_some_and(|(_, network)| *network),
        mount: described.map(|(text, _)| text),
    };

    let started = Instant::now();
    let mount = check_mount(dir)
        .map(|()| match &report.mount {
            Some(m) => format!("{m}: no option makes locks local to one host"),
            None => "mount not found in /proc/self/mountinfo; options not checked".into(),
        })
        .map_err(|e| e.to_string());
    report.push("mount options", started, mount);

    let started = Instant::now();
    let scratch = match Scratch::create(dir) {
        Ok(scratch) => scratch,
        Err(e) => {
            report.push(
                "create test file",
                started,
                Err(format!("cannot create a file in the directory: {e}")),
            );
            return Ok(report);
        }
    };
    report.push(
        "create test file",
        started,
        Ok(format!("created {}", scratch.path.display())),
    );

    let started = Instant::now();
    let fsync = check_fsync(&scratch.path, &mut report.fsync_mean);
    report.push("write + fsync + read back", started, fsync);

    let started = Instant::now();
    let mut holder = match start_holder(&scratch.path, &holder_command) {
        Ok(holder) => holder,
        Err(e) => {
            report.push("lock held by other process", started, Err(e));
            return Ok(report);
        }
    };
    let ours = match OpenOptions::new()
        .read(true)
        .write(true)
        .open(&scratch.path)
    {
        Ok(file) => file,
        Err(e) => {
            report.push(
                "lock held by other process",
                started,
                Err(format!("cannot reopen the test file: {e}")),
            );
            return Ok(report);
        }
    };
    let exclusive = match set_lock(&ours, libc::F_WRLCK) {
        Ok(false) => Ok("another process holds the lock, so ours is refused".to_owned()),
        Ok(true) => Err("we took the lock while another process held it: locks here are not exclusive, so both servers could be active".to_owned()),
        Err(e) => Err(format!("lock request failed: {e}")),
    };
    if !report.push("lock held by other process", started, exclusive) {
        return Ok(report);
    }

    let started = Instant::now();
    let released = holder.kill_and_wait_for_lock(&ours);
    if let Ok(elapsed) = &released {
        report.kill_release = Some(*elapsed);
    }
    let network = report.network_fs;
    let released = released.map(|elapsed| {
        let mut detail = format!(
            "lock free {:.1} ms after SIGKILL of the holder",
            elapsed.as_secs_f64() * 1000.0
        );
        if network {
            detail.push_str(
                " (a killed process's lock goes with its descriptors; a crashed or cut-off host's only when the file server's lease expires, e.g. 90 s on NFSv4)",
            );
        }
        detail
    });
    if !report.push("kill releases lock", started, released) {
        return Ok(report);
    }

    // `ours` holds the lock now. An unrelated open+close of the file in this
    // process must leave it held: a classic POSIX lock would be dropped here.
    let started = Instant::now();
    let survives = (|| {
        drop(File::open(&scratch.path).map_err(|e| format!("cannot open the test file: {e}"))?);
        let other = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&scratch.path)
            .map_err(|e| format!("cannot open the test file: {e}"))?;
        match set_lock(&other, libc::F_WRLCK) {
            Ok(false) => Ok("the lock survives an unrelated open+close of the file and excludes another descriptor".to_owned()),
            Ok(true) => Err("a second descriptor took the lock after an unrelated close: OFD locks are not supported as such here".to_owned()),
            Err(e) => Err(format!("lock request failed: {e}")),
        }
    })();
    report.push("lock survives other close", started, survives);
    let _ = set_lock(&ours, libc::F_UNLCK);
    drop(ours);

    let started = Instant::now();
    let removed = scratch
        .remove()
        .map(|()| "test file removed".to_owned())
        .map_err(|e| format!("cannot remove the test file: {e}"));
    report.push("clean up", started, removed);
    Ok(report)
}

/// Writes, fsyncs and reads back (through a second descriptor) a few
/// blocks; `Ok` carries the timing.
fn check_fsync(path: &Path, mean: &mut Option<Duration>) -> std::result::Result<String, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open: {e}"))?;
    let mut total = Duration::ZERO;
    let mut max = Duration::ZERO;
    let mut data = vec![0u8; FSYNC_BYTES];
    for round in 0..FSYNC_ROUNDS {
        for (i, b) in data.iter_mut().enumerate() {
            // A different pattern each round, so a stale read is noticed.
            *b = (i as u32).wrapping_mul(31).wrapping_add(round * 7) as u8;
        }
        file.write_all_at(&data, 0)
            .map_err(|e| format!("write failed: {e}"))?;
        let t = Instant::now();
        file.sync_all().map_err(|e| format!("fsync failed: {e}"))?;
        let took = t.elapsed();
        total += took;
        max = max.max(took);
        let mut back = vec![0u8; FSYNC_BYTES];
        File::open(path)
            .and_then(|f| f.read_exact_at(&mut back, 0))
            .map_err(|e| format!("read back failed: {e}"))?;
        if back != data {
            return Err(format!(
                "round {round}: data read back differs from data written and fsynced"
            ));
        }
    }
    let avg = total / FSYNC_ROUNDS;
    *mean = Some(avg);
    let mut detail = format!(
        "{FSYNC_ROUNDS} x {FSYNC_BYTES} B write + fsync: mean {:.3} ms, max {:.3} ms; read back matches",
        avg.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    if avg > SLOW_FSYNC {
        detail.push_str(" (slow: every persistent message waits for an fsync)");
    }
    Ok(detail)
}

/// The scratch file, removed on drop if [`Scratch::remove`] was not called.
struct Scratch {
    path: PathBuf,
    removed: bool,
}

impl Scratch {
    fn create(dir: &Path) -> io::Result<Scratch> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(".fmq-fscheck-{}-{nanos}.lock", std::process::id()));
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Scratch {
            path,
            removed: false,
        })
    }

    fn remove(mut self) -> io::Result<()> {
        self.removed = true;
        fs::remove_file(&self.path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.removed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The holder child, killed and reaped on drop so no path leaves it behind.
struct HolderProcess {
    child: Child,
    reaped: bool,
}

fn start_holder(
    path: &Path,
    holder_command: &impl Fn(&Path) -> Command,
) -> std::result::Result<HolderProcess, String> {
    let mut command = holder_command(path);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start the holder process: {e}"))?;
    let stdout = child.stdout.take();
    let mut holder = HolderProcess {
        child,
        reaped: false,
    };
    let stdout = stdout.ok_or("the holder process has no stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + HOLDER_START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.trim() == LOCKED_MARK => return Ok(holder),
            Ok(line) => {
                if let Some(reason) = line.strip_prefix(FAILED_MARK) {
                    return Err(format!(
                        "the holder process could not lock the test file:{reason}"
                    ));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "the holder process did not lock the test file within {HOLDER_START_TIMEOUT:?}"
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = holder
                    .child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                holder.reaped = true;
                return Err(format!(
                    "the holder process ended without locking the test file ({status})"
                ));
            }
        }
    }
}

impl HolderProcess {
    /// SIGKILLs the holder and polls `ours` for the lock; returns the time
    /// from the kill to our lock succeeding (`ours` then holds it).
    fn kill_and_wait_for_lock(&mut self, ours: &File) -> std::result::Result<Duration, String> {
        let killed = Instant::now();
        self.child
            .kill()
            .map_err(|e| format!("cannot kill the holder process: {e}"))?;
        loop {
            match set_lock(ours, libc::F_WRLCK) {
                Ok(true) => break,
                Ok(false) if killed.elapsed() < KILL_RELEASE_TIMEOUT => thread::sleep(KILL_RELEASE_POLL),
                Ok(false) => {
                    return Err(format!(
                        "the lock of the killed holder was still held after {KILL_RELEASE_TIMEOUT:?}: a server that dies would block failover"
                    ))
                }
                Err(e) => return Err(format!("lock request failed after killing the holder: {e}")),
            }
        }
        let elapsed = killed.elapsed();
        let _ = self.child.wait();
        self.reaped = true;
        Ok(elapsed)
    }
}

impl Drop for HolderProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
