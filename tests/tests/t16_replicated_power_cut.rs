//! Power cuts of a replicated pair's disks under receipted load.
//!
//! - Both servers at once (the double failure a rack-wide power loss
//!   causes), then only one of them comes back: the old active in one
//!   test, the old passive in the other. It goes STANDALONE after
//!   `max_wait_timeout`, alone, and must hold every message the pair
//!   receipted.
//! - The active alone: the passive takes over and serves on; the old active
//!   comes back from what its disk held and rejoins as PASSIVE.
//!
//! A RECEIPT for a persistent SEND means "on both disks": the active
//! fsyncs the batch and the passive fsyncs it before its ack. A SIGKILL
//! cannot test that, as the page cache survives it; here each server's
//! `run/` directory (where it creates its store directory, `run/db`) is an
//! `fmq-powerloss` FUSE mount, which keeps only what was synced (plus, at
//! this torn cut, a random part of the rest) when its power is cut. A disk
//! comes back holding its image before its server starts again. The server that serves last is drained: every receipted id must
//! be there, once, with its body.
//!
//! The mounts need `/dev/fuse` and root, as CI has. The torn cut's page
//! choices are replayed with `FMQ_POWERLOSS_SEED`, which each run prints
//! (the moment of the cut depends on timing).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fmq_powerloss::{seed, SEED_VAR};
use fmq_tests::load::{
    drain_pipelined, duplicates, first_receipt_from, sample, ProducerReport, Producers, Receipted,
    Workload,
};
use fmq_tests::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use fmq_tests::power::PoweredPair;
use fmq_tests::replicated_profile;

const DEST: &str = "/queue/rpl.power";
const BODY_LEN: usize = 512;
const PRODUCERS: usize = 3;
/// Receipts before the cut.
const RECEIPTS: usize = 400;
/// `replication_log_batches` of the test of a single power cut.
const LOG_BATCHES: u64 = 200;
/// How long a WAITING server waits for its peer before it serves alone.
const MAX_WAIT_MS: u64 = 3000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivor {
    OldActive,
    OldPassive,
}

/// A pair on power-loss disks, with `[ha]` keys changed in both profiles,
/// started: `(it, active, passive)`.
fn powered_pair(ha: &[(&'static str, &str)]) -> Result<(PoweredPair, usize, usize)> {
    let pair = LocalPair::new("fmq-power-test-");
    pair.create_lock_file();
    for i in [PRIMARY, SECONDARY] {
        let mut changes = pair.local_changes(i);
        changes.push(("ha", "max_wait_timeout", MAX_WAIT_MS.to_string()));
        changes.extend(ha.iter().map(|(k, v)| ("ha", *k, v.to_string())));
        pair.write_profile(i, &replicated_profile(pair.nodes[i].name, &changes));
    }
    let mut powered = PoweredPair::new(pair)?;
    powered.pair.start_all()?;
    let (active, passive) = powered.pair.wait_roles(Duration::from_secs(30))?;
    Ok((powered, active, passive))
}

fn receipts(live: &Mutex<Vec<Receipted>>) -> usize {
    live.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// Waits until `live` holds `n` receipts.
async fn wait_receipts(pair: &LocalPair, live: &Mutex<Vec<Receipted>>, n: usize) -> Result<()> {
    let started = Instant::now();
    while receipts(live) < n {
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "{} receipts of {n} after 60 s:\n{}",
                receipts(live),
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Checks what server `i` serves of the load: every receipted id once,
/// nothing never sent.
async fn check_drain(
    pair: &LocalPair,
    i: usize,
    reports: &[ProducerReport],
    at_cut: usize,
) -> Result<()> {
    let drained = drain_pipelined(pair.nodes[i].addr(), DEST, BODY_LEN).await?;
    let receipted: BTreeSet<&String> = reports
        .iter()
        .flat_map(|r| r.receipted.iter().map(|x| &x.id))
        .collect();
    let unreceipted: BTreeSet<&String> = reports.iter().flat_map(|r| &r.unreceipted).collect();
    let got: BTreeSet<&String> = drained.iter().collect();
    let lost: Vec<&String> = receipted.difference(&got).copied().collect();
    let strangers: Vec<&String> = got
        .iter()
        .filter(|id| !receipted.contains(*id) && !unreceipted.contains(*id))
        .copied()
        .collect();
    let in_doubt_kept = got.iter().filter(|id| unreceipted.contains(*id)).count();
    println!(
        "{}: {} receipted ({at_cut} when the power went), {} in doubt of which {in_doubt_kept} kept; drained {}",
        pair.nodes[i].name,
        receipted.len(),
        unreceipted.len(),
        drained.len()
    );
    assert!(
        lost.is_empty(),
        "{} receipted messages lost, e.g. {:?}:\n{}",
        lost.len(),
        sample(lost.iter().copied()),
        pair.logs()
    );
    let dups = duplicates(&drained);
    assert!(dups.is_empty(), "duplicates: {:?}", sample(dups.iter()));
    assert!(strangers.is_empty(), "never sent: {strangers:?}");
    Ok(())
}

fn load() -> Workload {
    Workload {
        connect_timeout: Duration::from_secs(2),
        receipt_timeout: Duration::from_secs(5),
        ..Workload::new(DEST, BODY_LEN)
    }
}

/// A powered pair under load: the producers started on the active and
/// [`RECEIPTS`] receipts in, and the seed of the test's power cuts
/// (printed, for a replay).
struct Loaded {
    seed: u64,
    powered: PoweredPair,
    active: usize,
    passive: usize,
    stop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<Receipted>>>,
    producers: Producers,
}

/// [`powered_pair`] with `ha`, then the load until [`RECEIPTS`] receipts.
async fn loaded_pair(ha: &[(&'static str, &str)]) -> Result<Loaded> {
    let (powered, active, passive) = powered_pair(ha)?;
    let addrs = [
        powered.pair.nodes[PRIMARY].addr(),
        powered.pair.nodes[SECONDARY].addr(),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let producers = Producers::start(PRODUCERS, load(), addrs, active, &stop, &live);
    wait_receipts(&powered.pair, &live, RECEIPTS).await?;
    let seed = seed();
    println!("{SEED_VAR}={seed}");
    Ok(Loaded {
        seed,
        powered,
        active,
        passive,
        stop,
        live,
        producers,
    })
}

async fn power_cut_of_both(survivor: Survivor) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Loaded {
        seed,
        mut powered,
        active,
        passive,
        stop,
        live,
        producers,
    } = loaded_pair(&[]).await?;

    // Both disks at once (the active's first: from then on it can receipt
    // nothing more). A RECEIPT that arrives after the cut was for a batch
    // both servers synced before it, so every receipt counts.
    let images = [
        powered.cut_power(active, seed)?,
        powered.cut_power(passive, seed + 1)?,
    ];
    let at_cut = receipts(&live);
    powered.pair.kill9(active);
    powered.pair.kill9(passive);
    stop.store(true, Ordering::Relaxed);
    let reports = producers.finish().await?;

    // Only one disk comes back, holding what it held at the cut.
    let back = match survivor {
        Survivor::OldActive => active,
        Survivor::OldPassive => passive,
    };
    powered.restore(back, &images[usize::from(back == passive)])?;
    let pair = &mut powered.pair;
    pair.start(back)?;
    pair.wait_state(back, "STANDALONE", Duration::from_secs(30))?;
    print!("alone after the cut, ");
    check_drain(pair, back, &reports, at_cut).await?;
    pair.all_alive()?;
    Ok(())
}

/// The active's host loses power alone: the passive takes over with every
/// receipted message and serves on; the old active comes back from what its
/// disk held (its unsynced tail gone, torn pages in its write-ahead log)
/// and rejoins as PASSIVE at the same position, through a checkpoint, as
/// the survivor's batch log no longer reaches back to it; the survivor
/// then serves every receipted message, from before and after the cut,
/// once.
async fn power_cut_of_the_active() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let Loaded {
        seed,
        mut powered,
        active,
        passive,
        stop,
        live,
        producers,
    } = loaded_pair(&[("replication_log_batches", &LOG_BATCHES.to_string())]).await?;

    let image = powered.cut_power(active, seed)?;
    let at_cut = receipts(&live);
    let cut_at = Instant::now();
    powered.pair.kill9(active);
    let pair = &mut powered.pair;
    let took = pair.wait_state(passive, "STANDALONE", Duration::from_secs(20));
    if took.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    println!(
        "{} STANDALONE {:?} after the cut",
        pair.nodes[passive].name, took?
    );
    // The producers go on with the survivor.
    let deadline = cut_at + Duration::from_secs(30);
    while first_receipt_from(&live, PRODUCERS, passive, cut_at).is_none() {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "no receipts from the survivor within 30 s of the cut:\n{}",
                pair.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // More batches than the survivor's log keeps: the old active gets a
    // checkpoint (hard links of the survivor's files) rather than batches.
    wait_receipts(pair, &live, receipts(&live) + 2 * LOG_BATCHES as usize).await?;

    // The old active, from its disk image, rejoins.
    powered.restore(active, &image)?;
    let pair = &mut powered.pair;
    pair.start(active)?;
    let rejoined = pair.wait_state(active, "PASSIVE", Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    println!(
        "{} PASSIVE {:?} after its restart",
        pair.nodes[active].name, rejoined?
    );
    let reports = producers.finish().await?;
    let seq = pair.store_sequence(passive)?;
    let at = pair.wait_same_position(seq, Duration::from_secs(30))?;
    let out = pair.output(active);
    assert!(
        out.contains("checkpoint from the active server installed"),
        "{} rejoined without a checkpoint:\n{out}",
        pair.nodes[active].name
    );
    let diverged = pair.ha(active)?["diverged"].clone();
    println!("same position {at:?}; divergent batches saved aside: {diverged}");
    print!("after the rejoin, ");
    check_drain(pair, passive, &reports, at_cut).await?;
    pair.all_alive()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_of_both_then_the_old_active_alone_has_every_receipt() -> Result<()> {
    power_cut_of_both(Survivor::OldActive).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_of_both_then_the_old_passive_alone_has_every_receipt() -> Result<()> {
    power_cut_of_both(Survivor::OldPassive).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_of_the_active_then_it_rejoins_from_its_disk() -> Result<()> {
    power_cut_of_the_active().await
}
