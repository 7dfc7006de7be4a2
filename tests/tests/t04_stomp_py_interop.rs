//! Runs `tests/interop/stomp_py_interop.py` (stomp.py, STOMP 1.2) against a
//! real server. Fails, never skips, when stomp.py is not installed.

use std::process::{Command as ProcessCommand, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fmq_tests::{workspace_root, Server, TempProfile};

#[test]
fn stomp_py_interop() -> Result<()> {
    let probe = ProcessCommand::new("python3")
        .args(["-c", "import stomp"])
        .output()
        .context("python3 is needed for the stomp.py interop test")?;
    assert!(
        probe.status.success(),
        "stomp.py is not importable by python3: pip install stomp.py\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let mut profile = TempProfile::new();
    // Heart-beats short enough to see some during the 3 s check, and a
    // small redelivery limit to keep the DLQ check short.
    profile.set("network", "heart_beat_ms", "[500, 500]");
    profile.set("broker", "max_redeliveries", "3");
    let mut server = Server::start(profile)?;
    server.admin_ok(&["user", "add", "interop-limited", "--password", "limited-pw"]);
    server.admin_ok(&[
        "acl",
        "grant",
        "interop-limited",
        "/queue/interop.allowed.>",
        "rw",
    ]);

    let script = workspace_root().join("tests/interop/stomp_py_interop.py");
    let port = server.addr().port().to_string();
    let mut child = ProcessCommand::new("python3")
        .arg("-u")
        .arg(&script)
        .args(["127.0.0.1", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run the interop script")?;
    // Bounded: the script's checks take a few seconds each at most.
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !stderr.is_empty() {
        println!("--- stderr ---\n{stderr}");
    }
    assert!(
        out.status.success(),
        "stomp.py interop failed ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        server.log_tail(40)
    );
    assert!(
        stdout.contains("all ") && stdout.contains("checks ok"),
        "the script did not report success:\n{stdout}"
    );
    let status = server.stop()?;
    assert!(status.success(), "server exit after SIGTERM: {status}");
    Ok(())
}
