//! Runs the examples against an in-process broker.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{reserve_port, TestBroker};

/// Path of an example binary built by `cargo test` next to this test.
fn example(name: &str) -> PathBuf {
    // `cargo test -p fmq-client` builds the examples; `--test examples`
    // alone does not, and then this test must fail rather than pass empty.
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "example {name} not built: run `cargo build --release -p fmq-client --examples` \
         or the whole `cargo test -p fmq-client`"
    );
    path
}

async fn run(name: &str, args: &[&str]) -> String {
    let path = example(name);
    let child = tokio::process::Command::new(&path)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), child)
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within 120 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} failed: {stdout}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn args<'a>(addr: &'a str, destination: &'a str, count: &'a str) -> Vec<&'a str> {
    vec![
        "--addr",
        addr,
        "--login",
        "admin",
        "--passcode",
        "passwd",
        "--destination",
        destination,
        "--count",
        count,
    ]
}

#[tokio::test]
async fn producer_then_consumer() {
    let broker = TestBroker::with_auth().await;
    let addr = broker.addr.to_string();
    let out = run("producer", &args(&addr, "/queue/demo", "250")).await;
    assert!(out.contains("sent 250 messages to /queue/demo"), "{out}");
    let out = run("consumer", &args(&addr, "/queue/demo", "250")).await;
    assert!(
        out.contains("received 250 messages from /queue/demo"),
        "{out}"
    );
    assert!(out.contains("message 0"), "{out}");
    assert!(out.contains("message 249"), "{out}");
}

#[tokio::test]
async fn durable_subscriber_keeps_what_was_published_between_runs() {
    let broker = TestBroker::with_auth().await;
    let addr = broker.addr.to_string();
    let mut sub = args(&addr, "/topic/demo", "0");
    sub.extend(["--client-id", "reporting", "--name", "daily"]);
    let out = run("durable_subscriber", &sub).await;
    assert!(out.contains("subscription daily kept"), "{out}");
    let out = run("producer", &args(&addr, "/topic/demo", "3")).await;
    assert!(out.contains("sent 3 messages"), "{out}");
    let mut sub = args(&addr, "/topic/demo", "3");
    sub.extend(["--client-id", "reporting", "--name", "daily", "--delete"]);
    let out = run("durable_subscriber", &sub).await;
    assert!(out.contains("message 0\nmessage 1\nmessage 2\n"), "{out}");
    assert!(out.contains("subscription daily deleted"), "{out}");
}

#[tokio::test]
async fn failover_demo_skips_a_dead_server_and_delivers_everything() {
    let broker = TestBroker::with_auth().await;
    let dead = reserve_port();
    let list = format!("{dead},{}", broker.addr);
    let dir = tempfile::tempdir().unwrap();
    let mut demo = args(&list, "/queue/failover-demo", "200");
    let buffer = dir.path().to_str().unwrap();
    demo.extend(["--buffer-dir", buffer]);
    let out = run("failover_demo", &demo).await;
    assert!(
        out.contains(&format!("could not connect to {dead}")),
        "{out}"
    );
    assert!(out.contains("sent 200 messages"), "{out}");
    assert!(
        out.contains("received 200 distinct messages: 0 missing, 0 duplicates"),
        "{out}"
    );
}

#[tokio::test]
async fn examples_explain_their_arguments() {
    for name in [
        "producer",
        "consumer",
        "durable_subscriber",
        "failover_demo",
    ] {
        let out = run(name, &["--help"]).await;
        assert!(
            out.contains("usage:") && out.contains("--addr"),
            "{name}: {out}"
        );
    }
}
