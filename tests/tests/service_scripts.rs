//! The operations scripts against a real `fmq` binary: `scripts/fmq.sh`,
//! `scripts/shutdown-fmq.sh`, the init.d script and the systemd unit in
//! `scripts/service/`.
//!
//! Each test copies `profiles/FerroMQ` into a temp dir with free loopback
//! ports; a guard SIGKILLs whatever server the pid file names when the test
//! ends, so a failing test leaves no process behind. Self-contained on
//! purpose (std, nix, serde_json, tempfile) so it does not depend on the
//! shared test helpers while they change.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Longest a script may run before the test kills it and fails.
const SCRIPT_LIMIT: Duration = Duration::from_secs(45);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `$FMQ_BIN`, else `<target>/release/fmq` beside this test's `deps/`.
fn fmq_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FMQ_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FMQ_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/release/deps");
    let bin = release.join("fmq");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p fmq-server`, or set FMQ_BIN",
        bin.display()
    );
    bin
}

fn script(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

/// Two distinct free loopback ports (both held while picking).
fn two_free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let pa = a.local_addr().expect("local addr").port();
    let pb = b.local_addr().expect("local addr").port();
    (pa, pb)
}

fn port_answers(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn is_fmq(pid: i32) -> bool {
    alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("fmq"))
            .unwrap_or(false)
}

fn wait_gone(pid: i32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !alive(pid)
}

/// A temp copy of `profiles/FerroMQ` on free ports. Dropping it SIGKILLs the
/// server its pid file names, if still running, then removes the directory.
struct TempProfile {
    dir: tempfile::TempDir,
    port: u16,
    admin_port: u16,
    /// Extra pids to kill on drop (servers not recorded in the pid file).
    extra: Vec<i32>,
}

impl TempProfile {
    fn new() -> TempProfile {
        let dir = tempfile::Builder::new()
            .prefix("fmq-service-")
            .tempdir()
            .expect("temp dir");
        let (port, admin_port) = two_free_ports();
        let shipped = std::fs::read_to_string(workspace_root().join("profiles/FerroMQ/fmq.toml"))
            .expect("read profiles/FerroMQ/fmq.toml");
        let (mut saw_port, mut saw_admin) = (false, false);
        let text: Vec<String> = shipped
            .lines()
            .map(|line| {
                let t = line.trim_start();
                if t.starts_with("port =") || t.starts_with("port=") {
                    saw_port = true;
                    format!("port = {port}")
                } else if t.starts_with("admin_port =") || t.starts_with("admin_port=") {
                    saw_admin = true;
                    format!("admin_port = {admin_port}")
                } else if t.starts_with("bind_address") {
                    "bind_address = \"127.0.0.1\"".to_owned()
                } else if t.starts_with("admin_bind_address") {
                    "admin_bind_address = \"127.0.0.1\"".to_owned()
                } else {
                    line.to_owned()
                }
            })
            .collect();
        assert!(saw_port && saw_admin, "shipped profile lost its port lines");
        let profile = dir.path().join("FerroMQ");
        std::fs::create_dir_all(&profile).expect("create profile dir");
        std::fs::write(profile.join("fmq.toml"), text.join("\n") + "\n").expect("write fmq.toml");
        TempProfile {
            dir,
            port,
            admin_port,
            extra: Vec::new(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("FerroMQ")
    }

    fn pid_file(&self) -> PathBuf {
        self.path().join("run/fmq.pid")
    }

    fn out_file(&self) -> PathBuf {
        self.path().join("run/fmq.out")
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `bash SCRIPT` with a clean FerroMQ environment pointing at this
    /// profile's binary, run from the temp dir.
    fn command(&self, rel: &str) -> Command {
        let mut c = Command::new(if rel.ends_with(".sh") { "bash" } else { "sh" });
        c.arg(script(rel))
            .current_dir(self.dir.path())
            .env("FMQ_BIN", fmq_bin())
            .env("FMQ_START_TIMEOUT", "30")
            .env("FMQ_STOP_TIMEOUT", "30")
            // Never read a real /etc/default/fmq.
            .env("FMQ_DEFAULTS", self.dir.path().join("no-such-defaults"));
        for var in [
            "FMQ_RUN_DIR",
            "FMQ_PROFILES",
            "FMQ_PROFILE",
            "FMQ_HOME",
            "FMQ_USER",
            "FMQ_ADMIN_USER",
            "FMQ_ADMIN_PASSWORD",
        ] {
            c.env_remove(var);
        }
        c
    }

    fn fmq_status_json(&self) -> Option<serde_json::Value> {
        let out = Command::new(fmq_bin())
            .args(["status", "--json", "--admin-port"])
            .arg(self.admin_port.to_string())
            .output()
            .expect("run fmq status");
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn describe(&self) -> String {
        let out = std::fs::read_to_string(self.out_file()).unwrap_or_default();
        let tail: Vec<&str> = out.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("fmq.out:\n{}", tail.join("\n"))
    }
}

impl Drop for TempProfile {
    fn drop(&mut self) {
        let mut pids = self.extra.clone();
        pids.extend(self.pid());
        for pid in pids {
            if is_fmq(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                wait_gone(pid, Duration::from_secs(5));
            }
        }
    }
}

/// Kills and reaps a child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs a command to completion within `SCRIPT_LIMIT`, capturing its output.
fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(SCRIPT_LIMIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {what}: {e}")),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("{what} did not finish within {SCRIPT_LIMIT:?}");
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn scripts_parse_and_service_files_are_complete() {
    for rel in [
        "scripts/fmq.sh",
        "scripts/shutdown-fmq.sh",
        "scripts/service/fmq-linux",
    ] {
        let out = run(Command::new("bash").arg("-n").arg(script(rel)));
        assert!(out.status.success(), "bash -n {rel}: {}", text(&out));
        let meta = std::fs::metadata(script(rel)).expect("stat script");
        use std::os::unix::fs::PermissionsExt;
        assert!(
            meta.permissions().mode() & 0o111 != 0,
            "{rel} is not executable"
        );
    }
    let out = run(Command::new("sh")
        .arg("-n")
        .arg(script("scripts/service/fmq-linux")));
    assert!(out.status.success(), "sh -n fmq-linux: {}", text(&out));

    let init = std::fs::read_to_string(script("scripts/service/fmq-linux")).expect("read init");
    for needle in [
        "# chkconfig: 345 90 10",
        "# description:",
        "### BEGIN INIT INFO",
        "# Provides:",
        "# Default-Start:",
        "### END INIT INFO",
        "/etc/default/fmq",
    ] {
        assert!(init.contains(needle), "fmq-linux lacks {needle:?}");
    }

    // The unit, by its keys.
    let unit_path = script("scripts/service/fmq.service");
    let unit = std::fs::read_to_string(&unit_path).expect("read fmq.service");
    let mut section = String::new();
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("fmq.service: not key=value: {line}"));
        keys.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    let get = |sec: &str, key: &str| {
        keys.iter()
            .find(|(s, k, _)| s == sec && k == key)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_else(|| panic!("fmq.service lacks [{sec}] {key}="))
    };
    assert!(!get("Unit", "Description").is_empty());
    assert_eq!(get("Service", "Type"), "simple");
    let exec_start = get("Service", "ExecStart");
    assert!(
        exec_start.starts_with("/opt/ferromq/bin/fmq ") && exec_start.contains("-profile FerroMQ"),
        "ExecStart={exec_start}"
    );
    assert!(get("Service", "ExecStop").contains("fmq shutdown --admin-port"));
    assert_eq!(get("Service", "KillSignal"), "SIGTERM");
    get("Service", "TimeoutStopSec")
        .parse::<u32>()
        .expect("TimeoutStopSec is seconds");
    assert_eq!(get("Service", "Restart"), "on-failure");
    get("Service", "LimitNOFILE")
        .parse::<u64>()
        .expect("LimitNOFILE is a number");
    assert_eq!(get("Install", "WantedBy"), "multi-user.target");
    assert!(
        unit.lines().any(|l| l.trim_start().starts_with("#User=")),
        "fmq.service has no commented User= line"
    );

    // systemd's own check, with the binary path pointing at the real build.
    let have_analyze = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if have_analyze {
        let dir = tempfile::tempdir().expect("temp dir");
        let local = dir.path().join("fmq.service");
        let bin = fmq_bin();
        std::fs::write(
            &local,
            unit.replace("/opt/ferromq/bin/fmq", &bin.display().to_string())
                .replace("WorkingDirectory=/opt/ferromq", "WorkingDirectory=/tmp"),
        )
        .expect("write unit copy");
        let out = run(Command::new("systemd-analyze").arg("verify").arg(&local));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            text(&out)
        );
    } else {
        eprintln!("systemd-analyze not installed: checked fmq.service by its keys only");
    }

    for (rel, needle) in [
        ("scripts/service/install-fmq-service.bat", "sc.exe create"),
        ("scripts/service/uninstall-fmq-service.bat", "sc.exe delete"),
    ] {
        let bat = std::fs::read_to_string(script(rel)).expect("read bat");
        assert!(bat.contains(needle), "{rel} lacks {needle}");
        assert!(bat.contains("NOT tested"), "{rel} lacks the untested note");
    }
    assert!(script("scripts/service/README.md").is_file());
}

#[test]
fn fmq_sh_starts_refuses_second_start_and_shutdown_stops() {
    let p = TempProfile::new();
    let profile = p.path();

    let out = run(p.command("scripts/fmq.sh").arg("-profile").arg(&profile));
    assert!(
        out.status.success(),
        "fmq.sh start: {}\n{}",
        text(&out),
        p.describe()
    );
    let pid = p.pid().expect("fmq.sh wrote the pid file");
    assert!(is_fmq(pid), "pid {pid} from the pid file is no fmq process");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("pid {pid}")),
        "fmq.sh does not print the pid: {}",
        text(&out)
    );
    assert!(
        port_answers(p.port),
        "client port {} does not answer",
        p.port
    );

    // A second start is refused and leaves the first alone.
    let again = run(p.command("scripts/fmq.sh").arg("-profile").arg(&profile));
    assert_eq!(code(&again), 2, "second start: {}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains(&format!("FerroMQ already running with pid {pid}")),
        "second start: {}",
        text(&again)
    );
    assert_eq!(p.pid(), Some(pid));

    // fmq status reaches it, and it is the process fmq.sh reported.
    let status = p.fmq_status_json().expect("fmq status answers");
    assert_eq!(
        status.get("pid").and_then(serde_json::Value::as_i64),
        Some(i64::from(pid)),
        "status: {status}"
    );
    let st = run(p
        .command("scripts/fmq.sh")
        .args(["-status", "-profile"])
        .arg(&profile));
    assert_eq!(code(&st), 0, "fmq.sh -status: {}", text(&st));

    // shutdown-fmq.sh by admin port only (no pid file known to it).
    let down = run(p
        .command("scripts/shutdown-fmq.sh")
        .arg("-rmiPort")
        .arg(p.admin_port.to_string()));
    assert_eq!(code(&down), 0, "shutdown-fmq.sh: {}", text(&down));
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "fmq pid {pid} still running after shutdown-fmq.sh"
    );
    assert!(!port_answers(p.port), "client port still answers");
    if Command::new("ss").arg("-V").output().is_ok() {
        // ss found the pid by its admin port, and with it the pid file.
        assert!(
            String::from_utf8_lossy(&down.stdout).contains(&format!("pid {pid}")),
            "{}",
            text(&down)
        );
        assert!(!p.pid_file().exists(), "pid file left: {}", text(&down));
    }
    assert!(
        p.describe().contains("FerroMQ server stopped"),
        "no clean stop in the output: {}",
        p.describe()
    );

    // Nothing left to stop: exit status 1, and no pid file stays.
    let down = run(p
        .command("scripts/shutdown-fmq.sh")
        .arg("-profile")
        .arg(&profile));
    assert_eq!(code(&down), 1, "second shutdown: {}", text(&down));
    assert!(!p.pid_file().exists(), "stale pid file left behind");
    let st = run(p
        .command("scripts/fmq.sh")
        .args(["-status", "-profile"])
        .arg(&profile));
    assert_eq!(code(&st), 3, "fmq.sh -status when stopped: {}", text(&st));
}

#[test]
fn shutdown_falls_back_to_sigterm_when_the_admin_shutdown_is_refused() {
    let p = TempProfile::new();
    let out = run(p.command("scripts/fmq.sh").arg("-profile").arg(p.path()));
    assert!(
        out.status.success(),
        "fmq.sh start: {}\n{}",
        text(&out),
        p.describe()
    );
    let pid = p.pid().expect("pid file");

    // Wrong admin password: the admin port refuses, the pid file is known.
    let down = run(p
        .command("scripts/shutdown-fmq.sh")
        .arg("-profile")
        .arg(p.path())
        .env("FMQ_ADMIN_PASSWORD", "wrong"));
    assert_eq!(code(&down), 0, "shutdown-fmq.sh: {}", text(&down));
    assert!(
        String::from_utf8_lossy(&down.stdout).contains(&format!("sending SIGTERM to pid {pid}")),
        "{}",
        text(&down)
    );
    assert!(!alive(pid), "pid {pid} still running");
    assert!(!p.pid_file().exists(), "pid file left behind");
}

#[test]
fn fmq_sh_reports_a_server_that_dies_during_startup() {
    let mut p = TempProfile::new();
    // Hold the admin port: fmq binds the client port, fails on the admin
    // port and exits.
    let _holder = TcpListener::bind(("127.0.0.1", p.admin_port)).expect("hold admin port");
    let out = run(p.command("scripts/fmq.sh").arg("-profile").arg(p.path()));
    let dead = p.pid();
    p.extra.extend(dead);
    assert_eq!(code(&out), 1, "fmq.sh: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited during startup") && err.contains("already in use"),
        "fmq.sh does not show why: {}",
        text(&out)
    );
    assert!(!p.pid_file().exists(), "pid file of a dead server left");

    // No binary at all: a clear message on how to build one.
    let out = run(p
        .command("scripts/fmq.sh")
        .arg("-profile")
        .arg(p.path())
        .env("FMQ_BIN", p.dir.path().join("no-such-fmq")));
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an executable"),
        "{}",
        text(&out)
    );
    let out = run(p
        .command("scripts/fmq.sh")
        .arg("-profile")
        .arg("NoSuchProfile"));
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("profile 'NoSuchProfile' not found"),
        "{}",
        text(&out)
    );
}

#[test]
fn init_script_start_status_stop() {
    let p = TempProfile::new();
    let init = |action: &str| {
        let mut c = p.command("scripts/service/fmq-linux");
        c.arg(action)
            .env("FMQ_HOME", workspace_root())
            .env("FMQ_PROFILE", p.path());
        run(&mut c)
    };

    let st = init("status");
    assert_eq!(code(&st), 3, "status before start: {}", text(&st));

    let out = init("start");
    assert_eq!(
        code(&out),
        0,
        "init start: {}\n{}",
        text(&out),
        p.describe()
    );
    let pid = p.pid().expect("pid file after init start");
    assert!(is_fmq(pid));
    assert!(port_answers(p.port));

    let st = init("status");
    assert_eq!(code(&st), 0, "init status: {}", text(&st));
    let so = String::from_utf8_lossy(&st.stdout);
    assert!(
        so.contains(&format!("running with pid {pid}")) && so.contains("State:"),
        "init status shows no pid and fmq status: {}",
        text(&st)
    );

    // LSB: start on a running service succeeds and changes nothing.
    let again = init("start");
    assert_eq!(code(&again), 0, "second init start: {}", text(&again));
    assert_eq!(p.pid(), Some(pid));

    let out = init("stop");
    assert_eq!(code(&out), 0, "init stop: {}", text(&out));
    assert!(!alive(pid), "pid {pid} alive after init stop");
    assert!(!p.pid_file().exists(), "pid file left after init stop");

    let st = init("status");
    assert_eq!(code(&st), 3, "status after stop: {}", text(&st));
    // LSB: stop on a stopped service succeeds.
    let out = init("stop");
    assert_eq!(code(&out), 0, "second init stop: {}", text(&out));

    let out = init("bogus");
    assert_eq!(code(&out), 2, "unknown action: {}", text(&out));
}

#[test]
fn nobackground_runs_in_the_foreground_and_stops_on_sigterm() {
    let p = TempProfile::new();
    let log = p.dir.path().join("foreground.out");
    let log_file = std::fs::File::create(&log).expect("create log");
    let child = p
        .command("scripts/fmq.sh")
        .arg("-profile")
        .arg(p.path())
        .arg("-nobackground")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn fmq.sh -nobackground");
    let mut guard = ChildGuard(child);
    let pid = guard.0.id() as i32;
    let read_log = || {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    };

    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = guard.0.try_wait().expect("try_wait") {
            panic!("fmq.sh -nobackground exited early ({st}):\n{}", read_log());
        }
        if port_answers(p.port) && p.fmq_status_json().is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "server did not come up:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // exec: the script's pid is the server's, and the pid file says so.
    assert_eq!(p.pid(), Some(pid), "pid file vs foreground pid");
    let status = p.fmq_status_json().expect("status");
    assert_eq!(
        status.get("pid").and_then(serde_json::Value::as_i64),
        Some(i64::from(pid))
    );
    assert!(is_fmq(pid), "the foreground process is not fmq");

    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    let st = wait_exit(&mut guard.0, Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no exit 30 s after SIGTERM:\n{}", read_log()));
    assert!(st.success(), "exit after SIGTERM: {st}\n{}", read_log());
    assert!(!port_answers(p.port));
}
