//! A [`LocalPair`] on disks whose power a test can cut: each server's
//! `run/` directory (where it creates its store, `run/db`) is an
//! `fmq-powerloss` mount, which keeps only what the server synced (plus,
//! at a torn cut, a random part of the rest) when its power goes.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use fmq_powerloss::{Loss, Mount};
use serde_json::Value;

use crate::pair::{HaPair, LocalPair, PRIMARY, SECONDARY};
use crate::Proc;

/// A pair and the power-loss disks of its servers. Dropping it kills the
/// servers before it unmounts their disks.
#[derive(Debug)]
pub struct PoweredPair {
    /// The pair; its profiles are written, its servers not yet started.
    pub pair: LocalPair,
    mounts: [Option<Mount>; 2],
    cuts: u32,
}

impl PoweredPair {
    /// Mounts an empty power-loss disk on each server's `run/`.
    pub fn new(pair: LocalPair) -> Result<PoweredPair> {
        let mut mounts = [None, None];
        for i in [PRIMARY, SECONDARY] {
            let run = pair.run_dir(i);
            std::fs::create_dir_all(&run)?;
            mounts[i] = Some(Mount::new(&run).context("power-loss mount")?);
        }
        Ok(PoweredPair {
            pair,
            mounts,
            cuts: 0,
        })
    }

    /// Cuts the power of server `i`'s disk (a torn cut from `seed`): from
    /// now on every file operation of the server fails, and what its disk
    /// held is written to a new directory, returned; what the cut kept and
    /// lost is printed. The server process is left to the caller.
    pub fn cut_power(&mut self, i: usize, seed: u64) -> Result<PathBuf> {
        self.cuts += 1;
        let image = self
            .pair
            .root
            .path()
            .join(format!("image-{}-{}", self.pair.nodes[i].name, self.cuts));
        std::fs::create_dir(&image)?;
        let mount = self.mounts[i]
            .as_ref()
            .ok_or_else(|| anyhow!("{} has no disk", self.pair.nodes[i].name))?;
        let cut = mount.power_off(Loss::Torn, seed, &image)?;
        println!(
            "power cut of {} (torn, seed {seed}): {cut:?}",
            self.pair.nodes[i].name
        );
        Ok(image)
    }

    /// Brings server `i`'s disk back after a cut, holding `image` (its
    /// server must be stopped): a new power-loss mount with a copy of it.
    pub fn restore(&mut self, i: usize, image: &Path) -> Result<()> {
        self.mounts[i] = None;
        let run = self.pair.run_dir(i);
        self.mounts[i] = Some(Mount::with_contents(&run, image).context("power-loss mount")?);
        Ok(())
    }
}

impl Drop for PoweredPair {
    fn drop(&mut self) {
        self.pair.kill9(PRIMARY);
        self.pair.kill9(SECONDARY);
        self.mounts = [None, None];
    }
}

impl HaPair for PoweredPair {
    fn status(&self, i: usize) -> Option<Value> {
        self.pair.status(i)
    }

    fn name(&self, i: usize) -> &str {
        self.pair.name(i)
    }

    fn process(&self, i: usize) -> Option<&Proc> {
        self.pair.process(i)
    }

    fn alive(&self, i: usize) -> Result<()> {
        self.pair.alive(i)
    }

    fn logs(&self) -> String {
        self.pair.logs()
    }
}
