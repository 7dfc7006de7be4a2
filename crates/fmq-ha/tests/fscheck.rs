//! `fscheck` on a temp dir, with this test binary re-executed (filtered to
//! `holder_entry`) as the lock holder.

#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use std::path::Path;
use std::process::Command;

use fmq_ha::fscheck::{self, HOLDER_ENV};

/// The holder side: a no-op unless re-executed with `HOLDER_ENV`.
#[test]
fn holder_entry() {
    fscheck::dispatch_holder();
}

fn holder_command(path: &Path) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "holder_entry", "--test-threads=1", "-q"])
        .env(HOLDER_ENV, path);
    command
}

#[test]
fn temp_dir_is_suitable() {
    let dir = tempfile::tempdir().unwrap();
    let report = fscheck::run_with(dir.path(), holder_command).unwrap();
    let text = report.to_string();
    eprintln!("{text}");
    assert!(report.suitable(), "{text}");
    let names: Vec<&str> = report.checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "mount options",
            "create test file",
            "write + fsync + read back",
            "lock held by other process",
            "kill releases lock",
            "lock survives other close",
            "clean up",
        ]
    );
    let release = report.kill_release.unwrap();
    assert!(release.as_secs() < 10, "{release:?}");
    assert!(report.fsync_mean.is_some());
    assert!(text.contains("after SIGKILL of the holder"), "{text}");
    let verdict = text.lines().last().unwrap();
    assert!(
        verdict.starts_with(&format!(
            "OK: {} is suitable for a FerroMQ lock file / shared store",
            dir.path().display()
        )),
        "{verdict}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "test file left behind"
    );
}

#[test]
fn holder_that_cannot_start_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let report =
        fscheck::run_with(dir.path(), |_| Command::new("/nonexistent/fmq-holder")).unwrap();
    assert!(!report.suitable());
    let verdict = report.verdict();
    assert!(
        verdict.starts_with("NOT SUITABLE:") && verdict.contains("lock held by other process"),
        "{verdict}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "test file left behind"
    );
}

#[test]
fn holder_that_exits_without_locking_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let report = fscheck::run_with(dir.path(), |_| Command::new("true")).unwrap();
    assert!(!report.suitable());
    assert!(
        report.verdict().contains("ended without locking"),
        "{}",
        report.verdict()
    );
}

#[test]
fn missing_dir_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(fscheck::run_with(&dir.path().join("absent"), holder_command).is_err());
}
