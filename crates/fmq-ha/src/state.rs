//! Server states, named and printed as the seed names them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The state of one server of an HA pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Replicated: waiting for the backup server to connect.
    Waiting,
    /// Replicated: serving clients while sending the passive what it lacks.
    ActiveSync,
    /// Replicated: receiving what it lacks from the active.
    PassiveSync,
    /// Serving clients with a peer in standby.
    Active,
    /// Standby: refuses clients, watches the active.
    Passive,
    /// Replicated: serving clients without a peer.
    Standalone,
    /// Shared: holds the lock and is opening the shared store.
    Activating,
    /// A peer that is not there (never a server's own state).
    Dead,
}

impl State {
    /// Whether a server in this state accepts client connections.
    pub fn accepts_clients(self) -> bool {
        matches!(self, State::Active | State::ActiveSync | State::Standalone)
    }

    /// The seed's name: `ACTIVE`, `ACTIVE_SYNC`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "WAITING",
            State::ActiveSync => "ACTIVE_SYNC",
            State::PassiveSync => "PASSIVE_SYNC",
            State::Active => "ACTIVE",
            State::Passive => "PASSIVE",
            State::Standalone => "STANDALONE",
            State::Activating => "ACTIVATING",
            State::Dead => "DEAD",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The seed's console line for a server that changes state:
/// `Primary Server switched to ACTIVE`.
pub fn switched_line(role: Role, next: State) -> String {
    format!("{} Server switched to {next}", role.title())
}

/// The seed's two console lines for a change of the peer's state:
/// `Old status of remote server = DEAD`, `New status of remote server = WAITING`.
pub fn peer_change_lines(old: State, new: State) -> [String; 2] {
    [
        format!("Old status of remote server = {old}"),
        format!("New status of remote server = {new}"),
    ]
}

/// Which half of the pair a server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the primary profile; wins ties.
    Primary,
    /// Runs the secondary profile.
    Secondary,
}

impl Role {
    /// `Primary` / `Secondary`, as in "Primary Server switched to ACTIVE".
    pub fn title(self) -> &'static str {
        match self {
            Role::Primary => "Primary",
            Role::Secondary => "Secondary",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// Delay between the quick lock attempts that follow the loss of the peer.
pub const PEER_LOSS_RETRY_MS: u64 = 20;
/// How many quick lock attempts follow the loss of the peer.
pub const PEER_LOSS_RETRIES: u32 = 10;

/// The lock attempts that follow the loss of the peer. A peer killed while
/// holding the lock closes its sockets (which tells us it is gone) and
/// releases its lock file as its process exits, and the two are not ordered:
/// the attempt made at once can find the lock still held for a moment. So
/// for [`PEER_LOSS_RETRIES`] attempts after a link loss a busy lock is tried
/// again after [`PEER_LOSS_RETRY_MS`], not after the passive interval;
/// without this, one take-over in ten or so waited the whole
/// `passive_lock_reacquisition_interval`. A peer that is alive keeps its
/// lock, so the extra attempts only fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LossRetries(u32);

impl LossRetries {
    /// The link to the peer went down: the next attempts are quick.
    pub(crate) fn arm(&mut self) {
        self.0 = PEER_LOSS_RETRIES;
    }

    /// The link is back: the passive interval applies.
    pub(crate) fn disarm(&mut self) {
        self.0 = 0;
    }

    /// The delay before the next lock attempt, given the passive interval.
    pub(crate) fn next_delay(&mut self, passive_ms: u64) -> u64 {
        if self.0 > 0 {
            self.0 -= 1;
            PEER_LOSS_RETRY_MS.min(passive_ms)
        } else {
            passive_ms
        }
    }
}

/// Checks the delays a machine gave a busy lock after losing its peer:
/// [`PEER_LOSS_RETRIES`] quick ones, then the passive interval.
#[cfg(test)]
pub(crate) fn assert_loss_retry_delays(delays: &[u64], passive_ms: u64) {
    let quick = PEER_LOSS_RETRIES as usize;
    assert_eq!(delays.len(), quick + 1, "{delays:?}");
    assert!(
        delays[..quick].iter().all(|d| *d == PEER_LOSS_RETRY_MS),
        "{delays:?}"
    );
    assert_eq!(delays[quick], passive_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serving_states_accept_clients() {
        let serving: Vec<State> = [
            State::Waiting,
            State::ActiveSync,
            State::PassiveSync,
            State::Active,
            State::Passive,
            State::Standalone,
            State::Activating,
            State::Dead,
        ]
        .into_iter()
        .filter(|s| s.accepts_clients())
        .collect();
        assert_eq!(
            serving,
            [State::ActiveSync, State::Active, State::Standalone]
        );
        assert_eq!(State::ActiveSync.to_string(), "ACTIVE_SYNC");
    }
}
