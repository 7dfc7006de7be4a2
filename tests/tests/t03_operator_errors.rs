//! The server refuses to start, quickly and with a message naming the
//! problem, on operator mistakes; `fmq status` says when no server answers.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;
use fmq_tests::{
    free_port, output_text, run_fmq, tail_file, wait_child, Server, Stomp, TempProfile,
};

/// Runs a server that must fail; returns its exit status and its output.
fn start_must_fail(profile: &TempProfile, db: &std::path::Path, tag: &str) -> String {
    let mut child = Server::spawn_raw(profile, db, tag).expect("spawn fmq");
    let status = wait_child(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{tag}: the server should have refused to start: {e}"));
    let out = format!(
        "{}\n{}",
        tail_file(&profile.root().join(format!("{tag}.out")), 40),
        tail_file(&profile.root().join(format!("{tag}.err")), 40)
    );
    assert!(
        !status.success(),
        "{tag}: exit {status} but expected failure:\n{out}"
    );
    out
}

#[test]
fn client_port_in_use() {
    let profile = TempProfile::new();
    let _squatter = TcpListener::bind(("127.0.0.1", profile.port)).expect("bind squatter");
    let out = start_must_fail(&profile, &profile.db(), "port-in-use");
    assert!(
        out.contains("already in use") && out.contains(&profile.port.to_string()),
        "port-in-use message should say the port {} is in use:\n{out}",
        profile.port
    );
    assert!(
        out.contains("network.port"),
        "should name the key network.port:\n{out}"
    );
}

#[test]
fn admin_port_in_use() {
    let profile = TempProfile::new();
    let _squatter = TcpListener::bind(("127.0.0.1", profile.admin_port)).expect("bind squatter");
    let out = start_must_fail(&profile, &profile.db(), "admin-in-use");
    assert!(
        out.contains("already in use") && out.contains("network.admin_port"),
        "should say the admin port is in use:\n{out}"
    );
}

#[test]
fn bad_value_type_names_the_key() {
    let mut profile = TempProfile::new();
    profile.write_text("[network]\nport = \"x\"\n");
    let out = start_must_fail(&profile, &profile.db(), "bad-type");
    assert!(out.contains("fmq.toml"), "should name the file:\n{out}");
    assert!(out.contains("port"), "should name the key port:\n{out}");
}

#[test]
fn unknown_key_is_named() {
    let mut profile = TempProfile::new();
    let (port, admin) = (profile.port, profile.admin_port);
    profile.write_text(&format!(
        "[network]\nport = {port}\nadmin_port = {admin}\nprot = 1\n"
    ));
    let out = start_must_fail(&profile, &profile.db(), "unknown-key");
    assert!(out.contains("fmq.toml"), "should name the file:\n{out}");
    assert!(
        out.contains("unknown field") && out.contains("prot"),
        "should name the unknown key prot:\n{out}"
    );
}

#[test]
fn missing_profile() {
    let out = run_fmq(&["-profile", "NoSuchProfileHere"]);
    let text = output_text(&out);
    assert!(!out.status.success(), "started without a profile: {text}");
    assert!(
        text.contains("NoSuchProfileHere") && text.contains("not found"),
        "should say the profile is not found:\n{text}"
    );

    let out = run_fmq(&[]);
    let text = output_text(&out);
    assert!(!out.status.success(), "started with no profile: {text}");
    assert!(
        text.contains("no profile given"),
        "should say that no profile was given:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_locked_by_a_running_server() -> Result<()> {
    let first = Server::start(TempProfile::new())?;
    let second = TempProfile::new();
    let out = start_must_fail(&second, &first.profile().db(), "second");
    assert!(
        out.to_lowercase().contains("locked"),
        "second server on the same store should say it is locked:\n{out}"
    );
    // The first one is unharmed.
    assert!(first.status().is_ok(), "first server stopped answering");
    let mut c = Stomp::connect(first.addr(), "admin", "passwd").await?;
    c.publish("/queue/t03.ok", b"still here", &[("persistent", "true")])
        .await?;
    c.disconnect().await?;
    Ok(())
}

#[test]
fn status_against_a_dead_port() {
    let port = free_port().to_string();
    let out = run_fmq(&["status", "--admin-port", &port]);
    let text = output_text(&out);
    assert!(!out.status.success(), "status of nothing succeeded: {text}");
    assert!(
        text.contains("no FerroMQ server answers") && text.contains(&port),
        "should say no server answers on the port:\n{text}"
    );
}

#[test]
fn status_and_shutdown_of_a_live_server() {
    let mut server = Server::start(TempProfile::new()).expect("start");
    let port = server.admin_port().to_string();
    let out = run_fmq(&["status", "--admin-port", &port, "--json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON");
    assert_eq!(v["state"], "RUNNING", "{v}");
    assert_eq!(v["pid"].as_u64(), server.pid().map(u64::from), "{v}");

    // Wrong admin password is refused and names authentication.
    let out = run_fmq(&[
        "shutdown",
        "--admin-port",
        &port,
        "--admin-password",
        "nope",
    ]);
    assert!(
        !out.status.success(),
        "shutdown with a wrong password worked"
    );
    assert!(
        output_text(&out).contains("authentication"),
        "{}",
        output_text(&out)
    );

    let out = run_fmq(&["shutdown", "--admin-port", &port]);
    assert!(out.status.success(), "{}", output_text(&out));
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("server exits after fmq shutdown");
    assert!(status.success(), "exit after shutdown: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_size_the_runtime_and_out_of_range_is_refused() -> Result<()> {
    let mut profile = TempProfile::new();
    profile.set("server", "worker_threads", "3");
    let server = Server::start(profile)?;
    // The line reports the runtime's own count, not the setting.
    let log = server.log_tail(200);
    assert!(
        log.contains("worker threads: 3 (server.worker_threads = 3"),
        "the server should run and report 3 worker threads:\n{log}"
    );
    let mut c = Stomp::connect(server.addr(), "admin", "passwd").await?;
    c.publish("/queue/t03.workers", b"served", &[("persistent", "true")])
        .await?;
    c.disconnect().await?;

    let mut bad = TempProfile::new();
    bad.set("server", "worker_threads", "5000");
    let out = start_must_fail(&bad, &bad.db(), "bad-workers");
    assert!(
        out.contains("server.worker_threads") && out.contains("1024"),
        "should name the key and its range:\n{out}"
    );
    Ok(())
}
