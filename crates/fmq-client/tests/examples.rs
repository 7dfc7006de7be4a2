//! Runs the `producer` and `consumer` examples against an in-process broker.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::TestBroker;

/// Path of an example binary built by `cargo test` next to this test.
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("examples").join(name);
    path.exists().then_some(path)
}

async fn run(path: PathBuf, broker: &TestBroker, count: &str) -> String {
    let addr = broker.addr.to_string();
    let args = [
        "--addr",
        &addr,
        "--login",
        "admin",
        "--passcode",
        "passwd",
        "--destination",
        "/queue/demo",
        "--count",
        count,
    ];
    let out = tokio::process::Command::new(&path)
        .args(args)
        .output()
        .await
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

#[tokio::test]
async fn producer_then_consumer() {
    // `cargo test -p fmq-client` builds the examples; `--test examples`
    // alone does not, and then this test must fail rather than pass empty.
    let (Some(producer), Some(consumer)) = (example("producer"), example("consumer")) else {
        panic!("example binaries not built: run `cargo build --release -p fmq-client --examples` or the whole `cargo test -p fmq-client`");
    };
    let broker = TestBroker::with_auth().await;
    let out = run(producer, &broker, "250").await;
    assert!(out.contains("sent 250 messages to /queue/demo"), "{out}");
    let out = run(consumer, &broker, "250").await;
    assert!(
        out.contains("received 250 messages from /queue/demo"),
        "{out}"
    );
    assert!(out.contains("message 0"), "{out}");
    assert!(out.contains("message 249"), "{out}");
}
