//! A power cut of both servers of a replicated pair under receipted load
//! (the double failure a rack-wide power loss causes), then only one of
//! them comes back: it alone must hold every message the pair receipted.
//!
//! A RECEIPT for a persistent SEND means "on both disks": the active
//! fsyncs the batch and the passive fsyncs it before its ack. A SIGKILL
//! cannot test that, as the page cache survives it; here each server's
//! `run/` directory (where it creates its store directory, `run/db`) is an
//! `fmq-powerloss` FUSE mount, which keeps only what was synced (plus, at
//! this torn cut, a random part of the rest) when its power is cut. The
//! images of both disks replace the `run/` directories, and only one server
//! is started again: the old active in one test, the
//! old passive in the other. It goes STANDALONE after `max_wait_timeout`
//! and is drained: every receipted id must be there, once, with its body.
//!
//! The mounts need `/dev/fuse` and root, as CI has. The torn cut's page
//! choices are replayed with `FMQ_POWERLOSS_SEED`, which each run prints
//! (the moment of the cut depends on timing).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fmq_powerloss::{seed, Loss, Mount, SEED_VAR};
use fmq_tests::load::{drain_pipelined, duplicates, sample, Producers, Workload};
use fmq_tests::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use fmq_tests::replicated_profile;

const DEST: &str = "/queue/rpl.power";
const BODY_LEN: usize = 512;
const PRODUCERS: usize = 3;
/// Receipts before the cut.
const RECEIPTS: usize = 400;
/// How long a WAITING server waits for its peer before it serves alone.
const MAX_WAIT_MS: u64 = 3000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivor {
    OldActive,
    OldPassive,
}

/// Moves every entry of `from` into the empty directory `to`.
fn move_entries(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::rename(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("moving {} into {}", entry.path().display(), to.display()))?;
    }
    Ok(())
}

async fn power_cut_of_both(survivor: Survivor) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut pair = LocalPair::new("fmq-power-test-");
    pair.create_lock_file();
    let mut mounts = Vec::new();
    for i in [PRIMARY, SECONDARY] {
        let mut changes = pair.local_changes(i);
        changes.push(("ha", "max_wait_timeout", MAX_WAIT_MS.to_string()));
        pair.write_profile(i, &replicated_profile(pair.nodes[i].name, &changes));
        std::fs::create_dir_all(pair.run_dir(i))?;
        mounts.push(Mount::new(&pair.run_dir(i)).context("power-loss mount")?);
    }
    pair.start_all()?;
    let (active, passive) = pair.wait_roles(Duration::from_secs(30))?;
    let addrs = [pair.nodes[PRIMARY].addr(), pair.nodes[SECONDARY].addr()];

    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(Vec::new()));
    let load = Workload {
        connect_timeout: Duration::from_secs(2),
        receipt_timeout: Duration::from_secs(5),
        ..Workload::new(DEST, BODY_LEN)
    };
    let producers = Producers::start(PRODUCERS, load, addrs, active, &stop, &live);
    let started = Instant::now();
    while live.lock().unwrap_or_else(|e| e.into_inner()).len() < RECEIPTS {
        if started.elapsed() > Duration::from_secs(60) {
            stop.store(true, Ordering::Relaxed);
            bail!("fewer than {RECEIPTS} receipts in 60 s:\n{}", pair.logs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Both disks at once (the active's first: from then on it can receipt
    // nothing more). A RECEIPT that arrives after the cut was for a batch
    // both servers synced before it, so every receipt counts.
    let seed = seed();
    let images = [
        pair.root.path().join("image0"),
        pair.root.path().join("image1"),
    ];
    for i in [active, passive] {
        std::fs::create_dir(&images[i])?;
        let cut = mounts[i].power_off(Loss::Torn, seed + i as u64, &images[i])?;
        println!(
            "power cut of {} ({SEED_VAR}={seed}): {cut:?}",
            pair.nodes[i].name
        );
    }
    let at_cut = live.lock().unwrap_or_else(|e| e.into_inner()).len();
    pair.kill9(active);
    pair.kill9(passive);
    stop.store(true, Ordering::Relaxed);
    let reports = producers.finish().await?;
    drop(mounts);

    // Each `run/` now holds what its disk held.
    for i in [PRIMARY, SECONDARY] {
        move_entries(&images[i], &pair.run_dir(i))?;
    }
    let back = match survivor {
        Survivor::OldActive => active,
        Survivor::OldPassive => passive,
    };
    pair.start(back)?;
    pair.wait_state(back, "STANDALONE", Duration::from_secs(30))?;
    let drained = drain_pipelined(pair.nodes[back].addr(), DEST, BODY_LEN).await?;

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
        "{} alone after the cut: {} receipted ({at_cut} when the power went), {} in doubt of which {in_doubt_kept} kept; drained {}",
        pair.nodes[back].name,
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
