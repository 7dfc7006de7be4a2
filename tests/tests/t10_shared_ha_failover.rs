//! Shared-storage HA (seed §3.1.2): a gateway responder and a primary and a
//! secondary `fmq` on one store directory and one lock file, all real
//! processes on loopback. The profiles are the shipped
//! `profiles/FerroMQ_HA_shared/{HAPrimary,HASecondary}/fmq.toml`, copied into
//! a temporary directory with the same layout (so their relative `db_path`
//! is exercised as shipped) with the ports changed and an absolute
//! `lock_file`; the last test runs the shipped relative `lock_file` too.
//!
//! - exactly one ACTIVE and one PASSIVE; the PASSIVE refuses CONNECT;
//! - SIGKILL of the ACTIVE under receipted persistent load: the PASSIVE
//!   takes over, no receipted message is lost, none is delivered twice;
//! - the killed server comes back PASSIVE;
//! - SIGSTOP of the ACTIVE never gives two ACTIVEs;
//! - no gateway, no take-over;
//! - a missing lock file and mismatched settings refuse to start;
//! - the shipped relative `lock_file = "../lock/lock.dat"` works in both.
//!
//! The tests of this file run one at a time (a file-wide mutex): each runs
//! three processes with 100 ms heartbeats, and running them side by side on
//! a small machine would measure CPU contention rather than failover.

use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fmq_tests::load::{
    drain_acking, expect_refusal, first_receipt_from, Producers, Sent, Workload, LOGIN,
};
use fmq_tests::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use fmq_tests::samples::show;
use fmq_tests::{
    ha_state, longest_double_active, quick_status, sample_states, set_toml_key, shipped_profile,
    Sample, Stomp,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The shipped fast local timings (profiles/FerroMQ_HA_shared).
const PING_MS: u64 = 100;
const ACTIVE_LOCK_MS: u64 = 200;
const PASSIVE_LOCK_MS: u64 = 500;

const QUEUE: &str = "/queue/ha.failover";
const BODY_LEN: usize = 1024;
const LOAD: Workload = Workload::new(QUEUE, BODY_LEN);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test at a time in this file (see the module comment).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Removes `key` from `[section]`.
fn remove_key(text: &str, section: &str, key: &str) -> String {
    let header = format!("[{section}]");
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.to_owned();
        }
        let is_key = !t.starts_with('#') && t.split_once('=').is_some_and(|(k, _)| k.trim() == key);
        if !(current == header && is_key) {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}

/// A gateway, two servers, a shared store and a lock file in a temporary
/// directory laid out like `profiles/FerroMQ_HA_shared`: the shipped
/// profiles with free ports and an absolute lock file; the lock file is
/// created (empty) unless `with_lock` is false.
fn new_pair(with_lock: bool) -> LocalPair {
    let mut pair = LocalPair::new("fmq-ha-test-");
    pair.status_wait = Duration::from_millis(300);
    std::fs::create_dir_all(pair.root.path().join("run/db")).expect("mkdir db");
    if with_lock {
        pair.create_lock_file();
    }
    for i in [PRIMARY, SECONDARY] {
        let mut t = shipped_profile(&format!("FerroMQ_HA_shared/{}", pair.nodes[i].name));
        for (section, key, value) in pair.local_changes(i) {
            t = set_toml_key(&t, section, key, &value);
        }
        pair.write_profile(i, &t);
    }
    pair
}

/// The gateway, then the primary, then the secondary.
fn start_all(pair: &mut LocalPair) -> Result<()> {
    pair.start_gateway(Duration::from_secs(10))?;
    pair.start(PRIMARY)?;
    pair.start(SECONDARY)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_active_one_passive_and_the_passive_refuses_clients() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    start_all(&mut pair)?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    println!(
        "ACTIVE: {}, PASSIVE: {}",
        pair.nodes[active].name, pair.nodes[passive].name
    );

    // `fmq status --json` shows the HA fields, on both servers.
    for (i, want, peer) in [
        (active, "ACTIVE", "PASSIVE"),
        (passive, "PASSIVE", "ACTIVE"),
    ] {
        let port = pair.nodes[i].admin.to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = fmq_tests::run_fmq(&["status", "--admin-port", &port, "--json"]);
            let text = fmq_tests::output_text(&out);
            assert!(out.status.success(), "fmq status --json failed: {text}");
            let v: Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("status --json is not JSON: {text}"))?;
            let ha = &v["ha"];
            assert_eq!(ha["state"], want, "{text}");
            let role = if i == PRIMARY { "primary" } else { "secondary" };
            assert_eq!(ha["role"], role, "{text}");
            assert!(ha["epoch"].is_u64(), "ha.epoch missing: {text}");
            assert!(ha["in_state_ms"].is_u64(), "ha.in_state_ms missing: {text}");
            assert_eq!(ha["gateway_reachable"], true, "{text}");
            // The peer's state arrives over the HA link, which may come up a
            // little after the lock decided the roles.
            if ha["peer"] == peer {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: ha.peer is not {peer} within 5 s: {text}",
                    pair.nodes[i].name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The seed's console lines.
    let a_out = pair.nodes[active]
        .proc_
        .as_ref()
        .expect("server running")
        .output();
    let p_out = pair.nodes[passive]
        .proc_
        .as_ref()
        .expect("server running")
        .output();
    let a_title = if active == PRIMARY {
        "Primary"
    } else {
        "Secondary"
    };
    let p_title = if passive == PRIMARY {
        "Primary"
    } else {
        "Secondary"
    };
    for needle in [
        format!("{a_title} Server switched to PASSIVE"),
        "Successfully acquired lock on ::".to_owned(),
        format!("{a_title} Server switched to ACTIVATING"),
        format!("{a_title} Server switched to ACTIVE"),
    ] {
        assert!(
            a_out.contains(&needle),
            "ACTIVE's console lacks {needle:?}:\n{a_out}"
        );
    }
    let needle = format!("{p_title} Server switched to PASSIVE");
    assert!(
        p_out.contains(&needle),
        "PASSIVE's console lacks {needle:?}:\n{p_out}"
    );
    assert!(
        !p_out.contains(&format!("{p_title} Server switched to ACTIVE")),
        "PASSIVE's console claims it was ACTIVE:\n{p_out}"
    );

    // The PASSIVE refuses every CONNECT (twice: the port stays usable).
    for _ in 0..2 {
        expect_refusal(pair.nodes[passive].addr(), "PASSIVE").await?;
    }
    // The ACTIVE serves.
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"hello", &[("persistent", "true")])
        .await?;
    c.disconnect().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_the_active_under_load_fails_over_without_loss() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    start_all(&mut pair)?;
    let (old, new) = pair.wait_roles(Duration::from_secs(5))?;
    let addrs = [pair.nodes[PRIMARY].addr(), pair.nodes[SECONDARY].addr()];

    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let producers = Producers::start(2, LOAD, addrs, old, &stop, &live);

    // Let the load run, then kill the ACTIVE.
    let warm = Instant::now();
    loop {
        let count = live.lock().unwrap_or_else(|e| e.into_inner()).len();
        if count >= 200 && warm.elapsed() > Duration::from_millis(500) {
            break;
        }
        if warm.elapsed() > Duration::from_secs(20) {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "only {count} receipted sends in 20 s before the kill:\n{}",
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = live.lock().unwrap_or_else(|e| e.into_inner()).len();
    let killed_at = Instant::now();
    pair.kill9(old);

    // Watch the PASSIVE become ACTIVE.
    let mut to_active = None;
    let deadline = killed_at + Duration::from_secs(15);
    while Instant::now() < deadline {
        if pair.state(new).as_deref() == Some("ACTIVE") {
            to_active = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Then wait for both producers to get receipts from the new ACTIVE and
    // keep the load on a little longer.
    let first_receipt = loop {
        if let Some(t) = first_receipt_from(&live, 2, new, killed_at) {
            break t;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "producers got no receipt from the new ACTIVE {} within 15 s of the kill (state reached ACTIVE after {to_active:?}):\n{}",
                pair.nodes[new].name,
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reports = producers.finish().await?;

    let failover = first_receipt.duration_since(killed_at);
    let to_active = to_active.ok_or_else(|| anyhow!("new ACTIVE never reported ACTIVE"))?;
    let sent = Sent::from_reports(&reports);
    let on_new = sent.receipted_by(new);
    println!(
        "FAILOVER ({} killed, {} took over): status ACTIVE after {} ms; first receipted SEND on the new ACTIVE {} ms after kill -9",
        pair.nodes[old].name,
        pair.nodes[new].name,
        to_active.as_millis(),
        failover.as_millis()
    );
    println!(
        "receipted: {} ({} before the kill, {} on the new ACTIVE), unreceipted (in doubt): {}, connect attempts: {:?}",
        sent.receipted.len(),
        before_kill,
        on_new,
        sent.unreceipted.len(),
        reports.iter().map(|r| r.connect_attempts).collect::<Vec<_>>()
    );

    // Drain from the new ACTIVE, acknowledging each message individually.
    let (seen, corrupt) = drain_acking(pair.nodes[new].addr(), QUEUE, BODY_LEN).await?;

    let check = sent.check(&seen);
    println!(
        "drained {} messages: lost {}, duplicates {}, in-doubt sends delivered {}",
        seen.len(),
        check.lost.len(),
        check.dups.len(),
        check.in_doubt_delivered
    );
    check.assert_clean();
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:?}");
    assert!(on_new > 0, "no sends receipted by the new ACTIVE");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_killed_server_comes_back_passive() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    start_all(&mut pair)?;
    let (old, new) = pair.wait_roles(Duration::from_secs(5))?;
    pair.kill9(old);
    let took = pair.wait_state(new, "ACTIVE", Duration::from_secs(10))?;
    println!(
        "{} ACTIVE {} ms after kill -9 of {}",
        pair.nodes[new].name,
        took.as_millis(),
        pair.nodes[old].name
    );

    pair.start(old)?;
    pair.wait_state(old, "PASSIVE", Duration::from_secs(5))?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    assert_eq!(
        (active, passive),
        (new, old),
        "the restarted server took over"
    );
    // Stable, and both agree about each other once the link is up.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = quick_status(pair.nodes[active].admin, Duration::from_secs(1));
        let p = quick_status(pair.nodes[passive].admin, Duration::from_secs(1));
        let (a, p) = (a.unwrap_or_default(), p.unwrap_or_default());
        if a["ha"]["peer"] == "PASSIVE" && p["ha"]["peer"] == "ACTIVE" {
            assert_eq!(a["ha"]["state"], "ACTIVE");
            assert_eq!(p["ha"]["state"], "PASSIVE");
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "peers do not see each other within 5 s: active {} passive {}\n{}",
                a["ha"],
                p["ha"],
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_refusal(pair.nodes[passive].addr(), "PASSIVE").await?;
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"after restart", &[]).await?;
    c.disconnect().await?;
    Ok(())
}

/// Polls `admin` every 50 ms until `stop`.
fn sampler(admin: u16, t0: Instant, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Sample>> {
    sample_states(
        move || quick_status(admin, Duration::from_millis(150)).and_then(|s| ha_state(&s)),
        t0,
        stop,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_of_the_active_never_gives_two_actives() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    start_all(&mut pair)?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    // Let the HA link come up so the PASSIVE knows its peer.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stop_for = Duration::from_secs(3);
    assert!(stop_for > Duration::from_millis(3 * PING_MS + PASSIVE_LOCK_MS));
    let t0 = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let sa = sampler(pair.nodes[active].admin, t0, done.clone());
    let sp = sampler(pair.nodes[passive].admin, t0, done.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stopped_at = t0.elapsed();
    pair.signal(active, Signal::SIGSTOP);
    tokio::time::sleep(stop_for).await;
    pair.signal(active, Signal::SIGCONT);
    let continued_at = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, Ordering::Relaxed);
    let a = sa.join().map_err(|_| anyhow!("sampler panicked"))?;
    let p = sp.join().map_err(|_| anyhow!("sampler panicked"))?;

    println!(
        "stopped {} at {} ms, continued at {} ms\n  {} (stopped):{}\n  {}:{}",
        pair.nodes[active].name,
        stopped_at.as_millis(),
        continued_at.as_millis(),
        pair.nodes[active].name,
        show(&a),
        pair.nodes[passive].name,
        show(&p)
    );

    let double = longest_double_active(&a, &p);
    let bound = Duration::from_millis(ACTIVE_LOCK_MS + 300);
    assert!(
        double <= bound,
        "both ACTIVE for {double:?} (bound {bound:?}):\n{}",
        pair.logs()
    );
    // The lock of a stopped process stays held: the PASSIVE must never have
    // taken over.
    let took_over: Vec<&Sample> = p
        .iter()
        .filter(|(_, s)| matches!(s.as_deref(), Some("ACTIVE") | Some("ACTIVATING")))
        .collect();
    assert!(
        took_over.is_empty(),
        "the PASSIVE became {:?} while the ACTIVE was stopped:\n{}",
        took_over.first(),
        pair.logs()
    );
    assert!(
        p.iter().all(|(_, s)| s.is_some()),
        "the PASSIVE stopped answering status"
    );
    // The stopped server answers again within ~1 s of SIGCONT, as ACTIVE.
    let resumed = a
        .iter()
        .find(|(t, s)| *t > continued_at && s.is_some())
        .ok_or_else(|| anyhow!("the stopped server never answered after SIGCONT"))?;
    assert!(
        resumed.0 - continued_at < Duration::from_millis(1500),
        "answered only {:?} after SIGCONT",
        resumed.0 - continued_at
    );
    let (now_active, now_passive) = pair.wait_roles(Duration::from_secs(2))?;
    assert_eq!(
        (now_active, now_passive),
        (active, passive),
        "roles changed across SIGSTOP/SIGCONT"
    );
    // It still serves.
    let mut c = Stomp::connect_with(pair.nodes[active].addr(), &LOGIN).await?;
    c.publish("/queue/ha.smoke", b"after sigcont", &[]).await?;
    c.disconnect().await?;
    expect_refusal(pair.nodes[passive].addr(), "PASSIVE").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_gateway_nobody_takes_over() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    pair.start(PRIMARY)?;
    pair.start(SECONDARY)?;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for i in [PRIMARY, SECONDARY] {
            let v = quick_status(pair.nodes[i].admin, Duration::from_millis(500))
                .ok_or_else(|| anyhow!("{} does not answer status", pair.nodes[i].name))?;
            assert_eq!(
                v["ha"]["state"],
                "PASSIVE",
                "{} is not PASSIVE without a gateway: {}\n{}",
                pair.nodes[i].name,
                v["ha"],
                pair.logs()
            );
            assert_eq!(v["ha"]["gateway_reachable"], false, "{}", v["ha"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_refusal(pair.nodes[PRIMARY].addr(), "PASSIVE").await?;
    expect_refusal(pair.nodes[SECONDARY].addr(), "PASSIVE").await?;

    let started = Instant::now();
    pair.start_gateway(Duration::from_secs(10))?;
    let (active, _) = pair.wait_roles(Duration::from_secs(5))?;
    println!(
        "{} ACTIVE {} ms after the gateway started",
        pair.nodes[active].name,
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Runs server `i` expecting it to exit non-zero within 15 s; its output.
fn expect_refused(pair: &mut LocalPair, i: usize) -> Result<String> {
    pair.spawn(i)?;
    let p = pair.nodes[i].proc_.as_ref().expect("server running");
    let status = p
        .wait_exit(Duration::from_secs(15))
        .ok_or_else(|| anyhow!("server did not exit within 15 s:\n{}", p.tail(30)))?;
    let out = p.output();
    assert!(!status.success(), "exited 0:\n{out}");
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_lock_file_is_refused() -> Result<()> {
    let _serial = serial().await;
    // The lock_file key absent: the seed's "Lock file::null".
    let mut pair = new_pair(true);
    pair.start_gateway(Duration::from_secs(10))?;
    let text = remove_key(&pair.profile_text(PRIMARY), "ha", "lock_file");
    pair.write_profile(PRIMARY, &text);
    let out = expect_refused(&mut pair, PRIMARY)?;
    assert!(
        out.contains("Lock file::null is not specified properly"),
        "{out}"
    );
    assert!(out.contains("Unable to boot the server"), "{out}");

    // The key set, the file not created by the operator.
    let mut pair = new_pair(false);
    pair.start_gateway(Duration::from_secs(10))?;
    let out = expect_refused(&mut pair, SECONDARY)?;
    assert!(out.contains("Lock file::"), "{out}");
    assert!(out.contains("is not specified properly"), "{out}");
    assert!(
        out.contains("lock.dat"),
        "the message should name the file: {out}"
    );
    assert!(
        !Path::new(&pair.lock_path()).exists(),
        "the server created the missing lock file"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mismatched_ping_interval_is_refused() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    pair.start_gateway(Duration::from_secs(10))?;
    let text = set_toml_key(&pair.profile_text(SECONDARY), "ha", "ping_interval", "150");
    pair.write_profile(SECONDARY, &text);
    pair.spawn(PRIMARY)?;
    pair.spawn(SECONDARY)?;

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut exits: [Option<ExitStatus>; 2] = [None, None];
    while Instant::now() < deadline && exits.iter().any(Option::is_none) {
        for (i, exit) in exits.iter_mut().enumerate() {
            if exit.is_none() {
                *exit = pair.nodes[i]
                    .proc_
                    .as_ref()
                    .expect("server running")
                    .exited();
            }
        }
        // Both should go; give the second a moment after the first.
        if exits.iter().any(Option::is_some) {
            let grace = Instant::now() + Duration::from_secs(3);
            while Instant::now() < grace && exits.iter().any(Option::is_none) {
                for (i, exit) in exits.iter_mut().enumerate() {
                    if exit.is_none() {
                        *exit = pair.nodes[i]
                            .proc_
                            .as_ref()
                            .expect("server running")
                            .exited();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused: Vec<usize> = (0..2).filter(|i| exits[*i].is_some()).collect();
    println!(
        "exited: {:?}",
        refused
            .iter()
            .map(|i| (pair.nodes[*i].name, exits[*i]))
            .collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "neither server exited on mismatched ping_interval:\n{}",
        pair.logs()
    );
    for i in refused {
        let out = pair.nodes[i]
            .proc_
            .as_ref()
            .expect("server running")
            .output();
        let status = exits[i].expect("exited");
        assert!(!status.success(), "{} exited 0:\n{out}", pair.nodes[i].name);
        assert!(
            out.contains("HA properties are not set properly in the backup server"),
            "{}:\n{out}",
            pair.nodes[i].name
        );
        assert!(
            out.contains("PingInterval"),
            "{}:\n{out}",
            pair.nodes[i].name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_relative_lock_file_path_works() -> Result<()> {
    let _serial = serial().await;
    let mut pair = new_pair(true);
    for i in [PRIMARY, SECONDARY] {
        let text = set_toml_key(
            &pair.profile_text(i),
            "ha",
            "lock_file",
            "\"../lock/lock.dat\"",
        );
        pair.write_profile(i, &text);
    }
    start_all(&mut pair)?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(5))?;
    // Stable for a second: neither refused the other's settings.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [active, passive] {
        if let Some(status) = pair.nodes[i]
            .proc_
            .as_ref()
            .expect("server running")
            .exited()
        {
            bail!(
                "{} exited with {status}:\n{}",
                pair.nodes[i].name,
                pair.logs()
            );
        }
    }
    assert_eq!(pair.wait_roles(Duration::from_secs(2))?, (active, passive));
    Ok(())
}
