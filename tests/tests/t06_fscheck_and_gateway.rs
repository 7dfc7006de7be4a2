//! `fmq fscheck DIR` and `fmq gateway` through the real binary. fscheck
//! re-runs itself as the lock holder, kills it, and prints a verdict an
//! operator can act on; the gateway answers the HA servers' pings.

use std::process::Command;

use fmq_tests::fmq_bin;

#[test]
fn fscheck_passes_on_a_local_directory_and_reports_timings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(fmq_bin())
        .arg("fscheck")
        .arg(dir.path())
        .output()
        .expect("run fmq fscheck");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fmq fscheck failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "[PASS] lock held by other process",
        "[PASS] kill releases lock",
        "[PASS] write + fsync",
        "OK: ",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("read dir").count(),
        0,
        "test file left behind"
    );
}

#[test]
fn fscheck_refuses_a_missing_directory() {
    let out = Command::new(fmq_bin())
        .arg("fscheck")
        .arg("/nonexistent/fmq-fscheck")
        .output()
        .expect("run fmq fscheck");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/fmq-fscheck"), "{stderr}");
}

#[test]
fn gateway_answers_ha_pings_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let port = fmq_tests::free_port();
    let mut child = Command::new(fmq_bin())
        .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start fmq gateway");
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut first)
        .expect("banner");
    assert!(first.contains("answering HA pings"), "{first}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"FMQPING FerroMQ test\n").expect("ping");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("pong");
    assert_eq!(answer, "FMQPONG\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}
