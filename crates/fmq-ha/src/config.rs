//! The HA settings of a profile (`[ha]` in `fmq.toml`): the seed's keys in
//! snake_case, with the seed's defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::Role;

/// Storage mode of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Both servers use one store directory; only the lock holder opens it.
    Shared,
    /// Each server has its own store; the active ships every batch.
    Replicated,
}

/// How the active waits for its passive in replicated mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    /// A RECEIPT for a persistent change is sent only once the passive has
    /// made the batch durable too (while the passive is in sync).
    #[default]
    Sync,
    /// A RECEIPT is sent once the batch is durable on the active; the
    /// passive follows a little behind. A failover can lose the batches
    /// still in flight (see `fmq status` for the lag).
    Async,
}

/// HA settings. Durations are milliseconds in the profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// `shared` or `replicated`.
    pub mode: Mode,
    /// `primary` or `secondary`.
    pub role: Role,
    /// Name of the pair; both servers must use the same.
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Address this server's HA port binds (FMQGroup.Port's host).
    #[serde(default = "default_localhost")]
    pub bind_address: String,
    /// This server's HA port (FMQGroup.Port): 2000 primary, 3000 secondary.
    pub port: u16,
    /// The peer's HA address (FMQGroup.BackupHAIPAddress).
    #[serde(default = "default_localhost")]
    pub backup_ha_ip_address: String,
    /// The peer's HA port (FMQGroup.BackupHAPort).
    pub backup_ha_port: u16,
    /// The peer's client address (FMQGroup.BackupServerIp), told to clients.
    #[serde(default = "default_localhost")]
    pub backup_server_ip: String,
    /// The peer's client port (FMQGroup.BackupServerPort).
    pub backup_server_port: u16,
    /// The peer's admin port (BackupRMIServerPort).
    pub backup_rmi_server_port: u16,
    /// Heartbeat period on the HA channel (FMQGroup.PingInterval), ms.
    #[serde(default = "default_ping_interval")]
    pub ping_interval: u64,
    /// The lock file on the gateway machine (FMQGroup.LockFile).
    #[serde(default)]
    pub lock_file: Option<PathBuf>,
    /// The gateway machine (FMQGroup.GatewayServerIPAddress).
    #[serde(default = "default_localhost")]
    pub gateway_server_ip_address: String,
    /// The gateway's ping port (FMQGroup.GatewayServerPort).
    #[serde(default = "default_gateway_port")]
    pub gateway_server_port: u16,
    /// How often the active re-verifies its lock, ms.
    #[serde(default = "default_active_lock")]
    pub active_lock_reacquisition_interval: u64,
    /// How often a passive whose link is down tries the lock, ms; must be
    /// more than twice the active interval.
    #[serde(default = "default_passive_lock")]
    pub passive_lock_reacquisition_interval: u64,
    /// Connect timeout to the peer's HA port (FMQGroup.SocketCreationTimeout), ms.
    #[serde(default = "default_socket_creation")]
    pub socket_creation_timeout: u64,
    /// Time a peer has to complete the version handshake, ms.
    #[serde(default = "default_socket_init")]
    pub socket_initialization_timeout: u64,
    /// Nagle's algorithm on the HA channel (NagleAlgo).
    #[serde(default)]
    pub nagle_algo: bool,
    /// Longest a state change may take before it is abandoned, ms.
    #[serde(default = "default_max_wait")]
    pub max_wait_timeout: u64,
    /// Replicated mode: `sync` (the default) or `async`.
    #[serde(default)]
    pub replication: Replication,
    /// Replicated mode: how many recent batches each server keeps in its
    /// batch log, from which a passive that was away catches up without a
    /// full copy. Also where divergent batches are read back from.
    #[serde(default = "default_log_batches")]
    pub replication_log_batches: u64,
}

fn default_log_batches() -> u64 {
    200_000
}

fn default_cluster_name() -> String {
    "FerroMQ".into()
}
fn default_localhost() -> String {
    "127.0.0.1".into()
}
fn default_ping_interval() -> u64 {
    30_000
}
fn default_gateway_port() -> u16 {
    7
}
fn default_active_lock() -> u64 {
    30_000
}
fn default_passive_lock() -> u64 {
    60_000
}
fn default_socket_creation() -> u64 {
    10_000
}
fn default_socket_init() -> u64 {
    60_000
}
fn default_max_wait() -> u64 {
    30_000
}

impl HaConfig {
    /// Checks the values on their own (the peer comparison is separate).
    pub fn validate(&self) -> Result<()> {
        let lock = self
            .lock_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty() && p.as_os_str() != "null");
        if lock.is_none() {
            return Err(Error::LockFile(
                "Lock file::null is not specified properly.\n=====\nUnable to validate permissions on lock file::null.\nEither file is not valid or lock file machine is not allowing to verify permissions on lock,\nUnable to boot the server\n=====\n(set ha.lock_file in the profile)".into(),
            ));
        }
        if self.passive_lock_reacquisition_interval <= 2 * self.active_lock_reacquisition_interval {
            return Err(Error::Config(format!(
                "ha.passive_lock_reacquisition_interval ({} ms) must be greater than 2 x ha.active_lock_reacquisition_interval ({} ms); the server will not start",
                self.passive_lock_reacquisition_interval, self.active_lock_reacquisition_interval
            )));
        }
        for (key, value) in [
            ("ha.ping_interval", self.ping_interval),
            (
                "ha.active_lock_reacquisition_interval",
                self.active_lock_reacquisition_interval,
            ),
            ("ha.socket_creation_timeout", self.socket_creation_timeout),
            (
                "ha.socket_initialization_timeout",
                self.socket_initialization_timeout,
            ),
            ("ha.max_wait_timeout", self.max_wait_timeout),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{key} must be at least 1 ms")));
            }
        }
        for (key, port) in [
            ("ha.port", self.port),
            ("ha.backup_ha_port", self.backup_ha_port),
            ("ha.gateway_server_port", self.gateway_server_port),
            ("ha.backup_server_port", self.backup_server_port),
            ("ha.backup_rmi_server_port", self.backup_rmi_server_port),
        ] {
            if port == 0 {
                return Err(Error::Config(format!("{key} must be 1 to 65535")));
            }
        }
        if self.cluster_name.trim().is_empty() {
            return Err(Error::Config("ha.cluster_name must not be empty".into()));
        }
        Ok(())
    }

    /// The settings both servers must share, as (seed name, value): what the
    /// HA handshake compares.
    pub fn must_match(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "ActiveLockReAcquisitionInterval",
                self.active_lock_reacquisition_interval.to_string(),
            ),
            (
                "PassiveLockAcquisitionInterval",
                self.passive_lock_reacquisition_interval.to_string(),
            ),
            ("PingInterval", self.ping_interval.to_string()),
            (
                "GatewayServerIPAddress",
                self.gateway_server_ip_address.clone(),
            ),
            ("GatewayServerPort", self.gateway_server_port.to_string()),
            (
                "LockFile",
                self.lock_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ]
    }

    /// Heartbeat period.
    pub fn ping(&self) -> Duration {
        Duration::from_millis(self.ping_interval)
    }
}

/// Names of the keys whose values differ, numbered as the seed prints them.
pub fn mismatched(ours: &[(&'static str, String)], theirs: &[(String, String)]) -> Vec<String> {
    ours.iter()
        .filter(|(name, value)| {
            theirs
                .iter()
                .find(|(n, _)| n == name)
                .is_none_or(|(_, v)| v != value)
        })
        .map(|(name, _)| (*name).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HaConfig {
        HaConfig {
            mode: Mode::Shared,
            role: Role::Primary,
            cluster_name: "FerroMQ".into(),
            bind_address: "127.0.0.1".into(),
            port: 2000,
            backup_ha_ip_address: "127.0.0.1".into(),
            backup_ha_port: 3000,
            backup_server_ip: "127.0.0.1".into(),
            backup_server_port: 1956,
            backup_rmi_server_port: 1859,
            ping_interval: 30_000,
            lock_file: Some("/tmp/lock.dat".into()),
            gateway_server_ip_address: "127.0.0.1".into(),
            gateway_server_port: 7,
            active_lock_reacquisition_interval: 30_000,
            passive_lock_reacquisition_interval: 60_001,
            socket_creation_timeout: 10_000,
            socket_initialization_timeout: 60_000,
            nagle_algo: false,
            max_wait_timeout: 30_000,
            replication: Default::default(),
            replication_log_batches: 1000,
        }
    }

    #[test]
    fn missing_lock_file_is_refused_with_the_seed_message() {
        for lock in [None, Some(PathBuf::from("null")), Some(PathBuf::new())] {
            let c = HaConfig {
                lock_file: lock,
                ..sample()
            };
            let e = c.validate().expect_err("refused").to_string();
            assert!(
                e.contains("Lock file::null is not specified properly"),
                "{e}"
            );
            assert!(e.contains("Unable to boot the server"), "{e}");
        }
    }

    #[test]
    fn passive_interval_must_exceed_twice_the_active() {
        let c = HaConfig {
            passive_lock_reacquisition_interval: 60_000,
            ..sample()
        };
        let e = c.validate().expect_err("refused").to_string();
        assert!(e.contains("must be greater than 2 x"), "{e}");
        assert!(sample().validate().is_ok());
    }

    #[test]
    fn mismatch_lists_the_differing_keys() {
        let ours = sample().must_match();
        let mut theirs: Vec<(String, String)> = ours
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        theirs[2].1 = "1000".into();
        theirs.retain(|(k, _)| k != "LockFile");
        assert_eq!(mismatched(&ours, &theirs), ["PingInterval", "LockFile"]);
        let e = Error::Mismatch(mismatched(&ours, &theirs)).to_string();
        assert!(
            e.starts_with("HA properties are not set properly in the backup server"),
            "{e}"
        );
    }
}
