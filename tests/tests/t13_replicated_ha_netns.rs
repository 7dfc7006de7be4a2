//! Replicated HA under network faults: the gateway, the primary and the
//! secondary each run in a network namespace of their own, created by the
//! test, each server on its OWN store; the faults are links set down with
//! `ip link`, as in `t11_shared_ha_netns`.
//!
//! The topology is [`fmq_tests::netns`]'s, with its client links.
//! The HA port and the gateway are on the namespaces' service addresses
//! (`lo`), reached over the direct links only. The STOMP and admin ports
//! listen on every address, so the test (the clients) reaches each server
//! over its client link, which no fault touches: a server cut from its peer
//! and the gateway still answers `status` and still talks to clients. A
//! namespace has routes only to its direct links' far ends (no default
//! route), so the client links are no path between the servers, whether or
//! not the test host forwards. The lock file is a local file both
//! processes open: a partition never hides it, and it is released only when
//! its holder steps down.
//!
//! - the HA link alone is cut: the ACTIVE goes STANDALONE (it keeps the
//!   lock), the PASSIVE goes WAITING and stays there, refusing clients,
//!   however long the partition lasts; healed, it goes PASSIVE_SYNC then
//!   PASSIVE and catches up what was sent meanwhile;
//! - the ACTIVE is cut from its peer and the gateway under receipted load:
//!   it steps down to WAITING (releasing the lock), the PASSIVE goes
//!   STANDALONE, the producers fail over, and every receipted message is on
//!   the new server exactly once; healed, the old ACTIVE rejoins as PASSIVE
//!   at the same position.
//!
//! The tests need root and `ip netns`; without them they are skipped (with a
//! message). They run one at a time, across test processes too (see
//! [`fmq_tests::netns::host_lock`]), since the client links put addresses on
//! the test host.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fmq_tests::load::{
    drain_acking, first_receipt_from, refusal, Producers, Sent, Workload, LOGIN,
};
use fmq_tests::netns::{prerequisites, NsPair, LINK_AB};
use fmq_tests::pair::{HaPair, PRIMARY, SECONDARY};
use fmq_tests::samples::{as_serving, first_at, serving, show, Samplers};
use fmq_tests::{longest_double_active, Sample, Stomp};

const QUEUE: &str = "/queue/t13.rpl";
const BODY_LEN: usize = 256;
const LOAD: Workload = Workload::new(QUEUE, BODY_LEN);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// State samples

/// The samples from `from` to `to`.
fn window(v: &[Sample], from: Duration, to: Duration) -> impl Iterator<Item = &Sample> {
    v.iter().filter(move |(t, _)| *t >= from && *t <= to)
}

// ---------------------------------------------------------------------------
// Clients

/// Sends `n` receipted persistent messages `{tag}-{k}` on one connection.
async fn send_batch(addr: SocketAddr, tag: &str, n: usize) -> Result<Vec<String>> {
    let mut c = Stomp::connect_with(addr, &LOGIN).await?;
    let mut ids = Vec::with_capacity(n);
    for k in 0..n {
        let id = format!("{tag}-{k}");
        c.request(LOAD.send_frame(&id), &id)
            .await
            .with_context(|| format!("send {id} to {addr}"))?;
        ids.push(id);
    }
    c.disconnect().await?;
    Ok(ids)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_of_ha_link_only() -> Result<()> {
    let Some(_exclusive) = prerequisites(&SERIAL, "partition_of_ha_link_only").await? else {
        return Ok(());
    };
    let mut pair = NsPair::new("t13")?;
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(20))?;
    pair.wait_link_up(Duration::from_secs(5))?;
    let (a_addr, p_addr) = (pair.nodes[active].addr(), pair.nodes[passive].addr());
    let mut receipted = send_batch(a_addr, "before", 100).await?;
    let in_sync = pair.wait_same_position(0, Duration::from_secs(10))?;
    let switches_before = [pair.switches(PRIMARY).len(), pair.switches(SECONDARY).len()];

    let t0 = Instant::now();
    let samplers = Samplers::start([pair.poll(active), pair.poll(passive)], t0);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let cut_at = t0.elapsed();
    pair.net.link_down(LINK_AB)?;
    let standalone = pair.wait_state(active, "STANDALONE", Duration::from_secs(5))?;
    pair.wait_state(passive, "WAITING", Duration::from_secs(5))?;
    println!(
        "HA link cut: {} STANDALONE after {} ms",
        pair.nodes[active].name,
        standalone.as_millis()
    );

    // Traffic the passive will have to catch up; receipts come from the
    // STANDALONE alone. The passive refuses clients meanwhile.
    receipted.extend(send_batch(a_addr, "during", 300).await?);
    refusal(p_addr, "WAITING").await?;
    // Past max_wait_timeout (3 s) and many passive lock attempts (500 ms).
    let hold_until = t0 + cut_at + Duration::from_secs(5);
    while Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a_ha, p_ha) = (pair.ha(active)?, pair.ha(passive)?);
    let (a_pos, p_pos) = (pair.position(active)?, pair.position(passive)?);
    println!("before healing: active at {a_pos:?}, passive at {p_pos:?}");
    assert_eq!(a_ha["state"], "STANDALONE", "{a_ha}");
    assert_eq!(a_ha["holds_lock"], true, "{a_ha}");
    assert_eq!(a_ha["link_up"], false, "{a_ha}");
    assert_eq!(p_ha["state"], "WAITING", "{p_ha}");
    assert_eq!(p_ha["holds_lock"], false, "{p_ha}");
    assert_eq!(p_ha["gateway_reachable"], true, "{p_ha}");
    assert_eq!(p_ha["link_up"], false, "{p_ha}");
    assert_eq!(a_pos.0, in_sync.0, "the active opened a new epoch");
    assert!(
        a_pos.1 >= p_pos.1 + 300,
        "the passive is not behind: active {a_pos:?}, passive {p_pos:?}"
    );

    let heal_at = t0.elapsed();
    pair.net.link_up(LINK_AB)?;
    let roles = pair.wait_roles(Duration::from_secs(20));
    let same = roles
        .as_ref()
        .ok()
        .map(|_| pair.wait_same_position(0, Duration::from_secs(10)));
    let healed_in = t0.elapsed() - heal_at;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let [a, p]: [Vec<Sample>; 2] = samplers
        .finish()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    println!(
        "cut at {} ms, healed at {} ms\n  {} (active):{}\n  {} (passive):{}",
        cut_at.as_millis(),
        heal_at.as_millis(),
        pair.nodes[active].name,
        show(&a),
        pair.nodes[passive].name,
        show(&p)
    );
    assert_eq!(roles?, (active, passive), "the roles changed");
    let healed = same.unwrap_or_else(|| Err(anyhow!("no roles")))?;
    println!(
        "ACTIVE/PASSIVE again and both at {healed:?} {} ms after healing",
        healed_in.as_millis()
    );
    assert!(healed.1 >= a_pos.1, "{healed:?} is behind {a_pos:?}");

    // Exactly one served throughout the partition.
    for (t, s) in window(&a, cut_at, heal_at) {
        assert!(
            s.as_deref().is_some_and(serving),
            "the active was {s:?} {} ms into the partition:{}",
            (*t - cut_at).as_millis(),
            show(&a)
        );
    }
    for (t, s) in window(&p, cut_at, heal_at) {
        assert!(
            s.as_deref().is_some_and(|s| !serving(s)),
            "the passive was {s:?} {} ms into the partition:{}",
            (*t - cut_at).as_millis(),
            show(&p)
        );
    }
    let waiting_seen = window(&p, cut_at + Duration::from_secs(1), heal_at)
        .all(|(_, s)| s.as_deref() == Some("WAITING"));
    assert!(
        waiting_seen,
        "the passive left WAITING during the partition:{}",
        show(&p)
    );
    // The console tells the same story: the active went STANDALONE, then
    // ACTIVE_SYNC and ACTIVE; the passive WAITING, then PASSIVE_SYNC and
    // PASSIVE.
    let a_switches = pair.switches(active)[switches_before[active]..].to_vec();
    let p_switches = pair.switches(passive)[switches_before[passive]..].to_vec();
    println!("console: active {a_switches:?}, passive {p_switches:?}");
    assert_eq!(
        a_switches,
        ["STANDALONE", "ACTIVE_SYNC", "ACTIVE"],
        "{}",
        pair.logs()
    );
    assert!(
        p_switches.iter().all(|s| !serving(s)),
        "the passive served: {p_switches:?}"
    );
    assert_eq!(p_switches.first().map(String::as_str), Some("WAITING"));
    assert!(
        p_switches.ends_with(&["PASSIVE_SYNC".to_owned(), "PASSIVE".to_owned()]),
        "{p_switches:?}"
    );
    let p_ha = pair.ha(passive)?;
    assert_eq!(p_ha["diverged"], serde_json::json!([]), "{p_ha}");

    // Everything receipted is on the active.
    let (seen, corrupt) = drain_acking(a_addr, QUEUE, BODY_LEN).await?;
    let expected: BTreeSet<&String> = receipted.iter().collect();
    let got: BTreeSet<&String> = seen.keys().collect();
    assert_eq!(got, expected);
    assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_isolated_from_everything() -> Result<()> {
    let Some(_exclusive) = prerequisites(&SERIAL, "active_isolated_from_everything").await? else {
        return Ok(());
    };
    let mut pair = NsPair::new("t13")?;
    pair.start_all()?;
    let (old, new) = pair.wait_roles(Duration::from_secs(20))?;
    pair.wait_link_up(Duration::from_secs(5))?;
    let addrs = [pair.nodes[PRIMARY].addr(), pair.nodes[SECONDARY].addr()];
    let epoch_before = pair.position(old)?.0;

    let live = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producers = Producers::start(2, LOAD, addrs, old, &stop, &live);
    let warm = Instant::now();
    loop {
        let count = live.lock().unwrap_or_else(|e| e.into_inner()).len();
        if count >= 200 && warm.elapsed() > Duration::from_millis(500) {
            break;
        }
        if warm.elapsed() > Duration::from_secs(20) {
            bail!(
                "only {count} receipted sends in 20 s before the cut:\n{}",
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t0 = Instant::now();
    let samplers = Samplers::start([pair.poll(old), pair.poll(new)], t0);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let before_cut = live.lock().unwrap_or_else(|e| e.into_inner()).len();
    let cut_at = t0.elapsed();
    let cut = Instant::now();
    let ends = pair.net.isolate(pair.nodes[old].ns)?;
    let stepped = pair.wait_state(old, "WAITING", Duration::from_secs(5));
    let took = pair.wait_state(new, "STANDALONE", Duration::from_secs(8));

    // Both producers get receipts from the new server.
    let deadline = cut + Duration::from_secs(20);
    let first_receipt = loop {
        if let Some(t) = first_receipt_from(&live, 2, new, cut) {
            break Some(t);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reports = producers.finish().await?;
    let [o, n]: [Vec<Sample>; 2] = samplers
        .finish()?
        .try_into()
        .map_err(|_| anyhow!("two sample series"))?;
    println!(
        "isolated {} at {} ms\n  {} (isolated):{}\n  {}:{}",
        pair.nodes[old].name,
        cut_at.as_millis(),
        pair.nodes[old].name,
        show(&o),
        pair.nodes[new].name,
        show(&n)
    );
    stepped?;
    took?;
    let first_receipt = first_receipt.ok_or_else(|| {
        anyhow!(
            "the producers got no receipts from {} within 20 s of the cut:\n{}",
            pair.nodes[new].name,
            pair.logs()
        )
    })?;

    let down = first_at(&o, cut_at, "WAITING")
        .ok_or_else(|| anyhow!("the sampler never saw the isolated server WAITING"))?
        - cut_at;
    let up = first_at(&n, cut_at, "STANDALONE")
        .ok_or_else(|| anyhow!("the sampler never saw the other server STANDALONE"))?
        - cut_at;
    let failover = first_receipt.duration_since(cut);
    println!(
        "isolated server WAITING after {} ms, other STANDALONE after {} ms, first receipt from it after {} ms",
        down.as_millis(),
        up.as_millis(),
        failover.as_millis()
    );
    // The isolated server answered status all along (client link), and
    // never served again once it stepped down.
    assert!(
        o.iter()
            .filter(|(t, _)| *t >= cut_at)
            .all(|(_, s)| s.is_some()),
        "the isolated server stopped answering status:{}",
        show(&o)
    );
    assert!(
        o.iter()
            .filter(|(t, _)| *t >= cut_at + down)
            .all(|(_, s)| s.as_deref().is_some_and(|s| !serving(s))),
        "the isolated server served again:{}",
        show(&o)
    );
    // The lock decides: the other served only after the isolated one
    // stopped (up to the two samplers' skew).
    let double = longest_double_active(&as_serving(&o), &as_serving(&n));
    assert!(
        double <= Duration::from_millis(200),
        "both served for {double:?}:\n{}",
        pair.logs()
    );
    assert!(
        up + Duration::from_millis(100) >= down,
        "the other server served {} ms before the isolated one stepped down",
        (down - up).as_millis()
    );
    let ha = pair.ha(old)?;
    assert_eq!(ha["state"], "WAITING", "{ha}");
    assert_eq!(ha["holds_lock"], false, "{ha}");
    assert_eq!(ha["gateway_reachable"], false, "{ha}");
    assert_eq!(ha["link_up"], false, "{ha}");
    let ha = pair.ha(new)?;
    assert_eq!(ha["state"], "STANDALONE", "{ha}");
    assert_eq!(ha["holds_lock"], true, "{ha}");
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    let new_pos = pair.position(new)?;
    assert!(new_pos.0 > epoch_before, "no new epoch: {new_pos:?}");
    refusal(pair.nodes[old].addr(), "WAITING").await?;

    // Every receipted message is on the new server, once.
    let sent = Sent::from_reports(&reports);
    let on_new = sent.receipted_by(new);
    let (seen, corrupt) = drain_acking(pair.nodes[new].addr(), QUEUE, BODY_LEN).await?;
    let check = sent.check(&seen);
    println!(
        "receipted {} ({before_cut} before the cut, {on_new} by the new server), in doubt {}, connect attempts {:?}; drained {}: lost {}, duplicates {}, in-doubt delivered {}",
        sent.receipted.len(),
        sent.unreceipted.len(),
        reports.iter().map(|r| r.connect_attempts).collect::<Vec<_>>(),
        seen.len(),
        check.lost.len(),
        check.dups.len(),
        check.in_doubt_delivered
    );
    check.assert_clean();
    assert!(corrupt.is_empty(), "corrupt bodies: {corrupt:?}");
    assert!(on_new > 0, "no sends receipted by the new server");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    // Healed, the old server follows the new one.
    let healed = Instant::now();
    for e in ends {
        pair.net.end_up(e)?;
    }
    pair.wait_roles(Duration::from_secs(30)).and_then(|roles| {
        if roles == (new, old) {
            Ok(())
        } else {
            Err(anyhow!("roles after healing: {roles:?}"))
        }
    })?;
    let at = pair.wait_same_position(0, Duration::from_secs(10))?;
    let ha = pair.ha(old)?;
    println!(
        "healed: {} PASSIVE at {at:?} after {} ms (diverged: {})",
        pair.nodes[old].name,
        healed.elapsed().as_millis(),
        ha["diverged"]
    );
    assert_eq!(ha["gateway_reachable"], true, "{ha}");
    Ok(())
}
