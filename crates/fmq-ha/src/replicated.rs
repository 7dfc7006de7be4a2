//! The replicated-mode HA state machine (seed §3.1.1): a pure function of
//! (state, event) to (state, actions), with no clock, no sockets and no
//! store, like [`machine`](crate::machine) for shared mode.
//!
//! Each server has its own store. The one that serves (STANDALONE,
//! ACTIVE_SYNC, ACTIVE) ships every batch to the other (PASSIVE_SYNC while
//! it catches up, PASSIVE once it follows the live stream). The seed's
//! numbered rules, as this machine applies them:
//!
//! 1. A server starts in WAITING. With the HA link up it goes PASSIVE_SYNC
//!    if the peer serves (STANDALONE, ACTIVE_SYNC or ACTIVE); if the peer is
//!    WAITING too, the one with the newer repository (epoch, sequence)
//!    takes the lock and goes ACTIVE_SYNC, the primary on a tie, and the
//!    other goes PASSIVE_SYNC once the winner serves.
//! 2. A server that serves without a peer is STANDALONE, and only while it
//!    holds the lock and reaches the gateway. A WAITING server with no peer
//!    takes the lock after `max_wait_timeout` (so two servers restarted
//!    together meet first and the newer history wins); a PASSIVE that was
//!    in sync tries at once and every `passive_lock_reacquisition_interval`.
//!    A STANDALONE whose peer comes up WAITING goes ACTIVE_SYNC.
//! 3. ACTIVE_SYNC serves clients while the passive (PASSIVE_SYNC) catches up;
//!    when it has caught up both move on: ACTIVE and PASSIVE.
//! 4. An ACTIVE ships every batch to its PASSIVE; a RECEIPT waits for the
//!    passive ([`Action::RequireSync`]). If the ACTIVE fails, the PASSIVE
//!    takes the lock and goes STANDALONE.
//! 5. A server that serves and loses the lock goes WAITING at once. One that
//!    loses its peer confirms, before serving alone, that it still holds the
//!    lock and reaches the gateway; otherwise it is isolated and steps down
//!    to WAITING, and the receipts its peer had not confirmed are never
//!    sent.
//! 6. Every state change is broadcast to the peer with the previous state;
//!    transitions depend on our state, the peer's present state and
//!    repository position, and whether we hold the lock.

use crate::state::{LossRetries, Role, State};

/// A repository position: (epoch, sequence). Compared as a tuple.
pub type Position = (u64, u64);

/// Timers the machine asks the runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// Try the lock again (WAITING).
    LockRetry,
    /// Re-verify the lock we hold (serving states).
    LockVerify,
    /// The peer had `max_wait_timeout` to show up (WAITING).
    PeerWait,
    /// Replication may be retried after a failure.
    SinkRetry,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server started.
    Start,
    /// The lock is ours, with the lock file's new epoch.
    LockAcquired {
        /// The epoch written to the lock file.
        epoch: u64,
    },
    /// Someone else holds the lock.
    LockBusy,
    /// The lock could not be taken or verified.
    LockLost {
        /// Why, for the console.
        reason: String,
    },
    /// A verification found the lock still ours.
    LockVerified,
    /// The gateway answers again.
    GatewayReachable,
    /// The gateway stopped answering.
    GatewayUnreachable,
    /// The answer to [`Action::ProbeGateway`].
    GatewayProbe {
        /// Whether the gateway answered.
        ok: bool,
    },
    /// The HA link to the peer is up.
    LinkUp,
    /// The HA link to the peer is down.
    LinkDown,
    /// The peer's state (sent on every change and after every handshake).
    PeerState {
        /// Present state.
        current: State,
        /// Previous state.
        previous: State,
        /// The peer's repository position when it sent this.
        position: Option<Position>,
    },
    /// The broker is serving on our store (after [`Action::StartBroker`]).
    ServicesActivated,
    /// The broker could not start.
    ServicesFailed {
        /// Why.
        reason: String,
    },
    /// ACTIVE_SYNC: the passive has caught up. PASSIVE_SYNC: we have.
    SyncComplete,
    /// PASSIVE_SYNC/PASSIVE: the replication stream failed while the link
    /// is up (refused epoch, corrupt batch, closed connection).
    ReplicationFailed {
        /// Why.
        reason: String,
    },
    /// A timer fired.
    Timer(Timer),
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Try once to take the lock; answer LockAcquired, LockBusy or LockLost.
    TryLock,
    /// Re-verify the lock; answer LockVerified or LockLost.
    VerifyLock,
    /// Give the lock up.
    ReleaseLock,
    /// Ping the gateway once now; answer GatewayProbe.
    ProbeGateway,
    /// Open a new epoch ([`Machine::epoch`]) in our store and start the
    /// broker on it; answer ServicesActivated or ServicesFailed. Clients are
    /// accepted once the state accepts them.
    StartBroker,
    /// Stop the broker: refuse clients, and fail every commit the passive
    /// has not confirmed (no RECEIPT is sent for them).
    StopBroker,
    /// Connect to the peer and replicate its store into ours.
    StartSink,
    /// Stop replicating from the peer.
    StopSink,
    /// Whether RECEIPTs wait for the passive's confirmation (synchronous
    /// replication); the runtime ignores `true` when replication is async.
    RequireSync(bool),
    /// Tell the peer our present and previous state (and our position).
    Broadcast {
        /// Present state.
        current: State,
        /// Previous state.
        previous: State,
    },
    /// Deliver `Event::Timer(timer)` after `after_ms` (replacing an earlier
    /// schedule of the same timer).
    Schedule {
        /// Which.
        timer: Timer,
        /// When, ms from now.
        after_ms: u64,
    },
    /// A console line.
    Log(String),
}

/// Longest wait before a passive retries replication after failures in a
/// row.
pub const SINK_RETRY_MAX_MS: u64 = 10_000;

/// The wait before retrying replication after `failures` failed streams
/// in a row before this one: `base`, doubled for each, at most
/// [`SINK_RETRY_MAX_MS`] (and never below `base`).
fn sink_retry_after(base: u64, failures: u32) -> u64 {
    base.saturating_mul(1u64 << failures.min(16))
        .min(SINK_RETRY_MAX_MS)
        .max(base)
}

/// Timer settings, from the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// active_lock_reacquisition_interval, ms.
    pub active_lock_ms: u64,
    /// passive_lock_reacquisition_interval, ms.
    pub passive_lock_ms: u64,
    /// max_wait_timeout: how long a WAITING server waits for its peer, ms.
    pub max_wait_ms: u64,
    /// Delay before retrying replication after a failure, ms.
    pub sink_retry_ms: u64,
}

/// The link-loss check of a serving server: both answers are needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Check {
    lock: Option<bool>,
    gateway: Option<bool>,
}

/// The replicated-mode HA state machine of one server.
#[derive(Debug, Clone)]
pub struct Machine {
    role: Role,
    timings: Timings,
    state: State,
    previous: State,
    started: bool,
    holds_lock: bool,
    epoch: u64,
    trying: bool,
    gateway_ok: bool,
    link_up: bool,
    /// Quick lock attempts left after the peer's link went down.
    loss_retries: LossRetries,
    peer: State,
    peer_position: Option<Position>,
    position: Position,
    /// WAITING may take the lock without waiting for the peer (we were an
    /// in-sync PASSIVE when the link went, or the peer wait is over).
    may_take_over: bool,
    /// The broker is being started; the state it will serve in is decided
    /// when it is up.
    starting: bool,
    /// A serving server lost its peer and checks the lock and gateway.
    check: Option<Check>,
    /// Replication failed; wait for SinkRetry before trying again.
    sink_backoff: bool,
    /// Replication streams in a row that failed before this server was in
    /// sync (PASSIVE): each doubles the wait before the next, up to
    /// [`SINK_RETRY_MAX_MS`], so a cause that repeats (a checkpoint the
    /// active cannot make, a full disk here) does not cost the active a
    /// catch-up every few hundred milliseconds.
    sink_failures: u32,
    /// ACTIVE: the stream that brought the passive in sync is still up. A
    /// peer report of WAITING then predates that stream (the peer's state
    /// travels on the HA link, its batches on their own connection, and
    /// the two are not ordered), so it must not end synchronous
    /// replication; the stream ending ([`Event::ReplicationFailed`]) does.
    feeding: bool,
}

impl Machine {
    /// A server that has not started: WAITING, refusing clients, peer DEAD.
    pub fn new(role: Role, timings: Timings) -> Machine {
        Machine {
            role,
            timings,
            state: State::Waiting,
            previous: State::Dead,
            started: false,
            holds_lock: false,
            epoch: 0,
            trying: false,
            gateway_ok: false,
            link_up: false,
            loss_retries: LossRetries::default(),
            peer: State::Dead,
            peer_position: None,
            position: (0, 0),
            may_take_over: false,
            starting: false,
            check: None,
            sink_backoff: false,
            sink_failures: 0,
            feeding: false,
        }
    }

    /// Own state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Own previous state.
    pub fn previous(&self) -> State {
        self.previous
    }

    /// The peer's last known state (DEAD while the link is down).
    pub fn peer(&self) -> State {
        self.peer
    }

    /// The peer's last reported repository position.
    pub fn peer_position(&self) -> Option<Position> {
        self.peer_position
    }

    /// Whether this server believes it holds the lock.
    pub fn holds_lock(&self) -> bool {
        self.holds_lock
    }

    /// The epoch of the lock this server holds (or last held).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the gateway is believed reachable.
    pub fn gateway_reachable(&self) -> bool {
        self.gateway_ok
    }

    /// Whether the HA link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Our repository position, kept current by the runtime.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Tells the machine our repository position (the runtime calls this
    /// before each event; it only matters while WAITING).
    pub fn set_position(&mut self, position: Position) {
        self.position = position;
    }

    /// Whether our repository wins over the peer's when both are WAITING:
    /// the newer (epoch, sequence), the primary on a tie.
    pub fn wins_over_peer(&self) -> bool {
        let theirs = self.peer_position.unwrap_or((0, 0));
        self.position > theirs || (self.position == theirs && self.role == Role::Primary)
    }

    /// Applies one event; returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => {
                if !self.started {
                    self.started = true;
                    self.set_state(State::Waiting, &mut out);
                    out.push(Action::Log(
                        "Backup Server not Connected. Check configuration or Start backup Server ..."
                            .into(),
                    ));
                    out.push(Action::Schedule {
                        timer: Timer::PeerWait,
                        after_ms: self.timings.max_wait_ms,
                    });
                    if !self.gateway_ok {
                        out.push(Action::Log(
                            "Gateway server not reachable yet; this server will not serve until it is"
                                .into(),
                        ));
                    }
                    self.waiting_next(&mut out);
                }
            }
            Event::LockAcquired { epoch } => {
                self.trying = false;
                if self.state == State::Waiting && !self.starting && self.may_serve() {
                    self.holds_lock = true;
                    self.epoch = epoch;
                    self.starting = true;
                    out.push(Action::StartBroker);
                } else {
                    // Things changed while the attempt was out: give it back.
                    out.push(Action::ReleaseLock);
                    self.holds_lock = false;
                    if self.state == State::Waiting {
                        self.schedule_retry(&mut out);
                    }
                }
            }
            Event::LockBusy => {
                self.trying = false;
                if self.state == State::Waiting {
                    self.schedule_retry(&mut out);
                }
            }
            Event::LockLost { reason } => {
                self.trying = false;
                if is_serving(self.state) || self.starting {
                    out.push(Action::Log(format!(
                        "Lock lost ({reason}); {} Server stops serving",
                        self.role.title()
                    )));
                    self.step_down(&mut out);
                } else if self.check.is_some() {
                    self.check_answer(Some(false), None, &mut out);
                } else {
                    self.holds_lock = false;
                    out.push(Action::Log(format!("Lock not acquired: {reason}")));
                    if self.state == State::Waiting {
                        self.schedule_retry(&mut out);
                    }
                }
            }
            Event::LockVerified => {
                if self.check.is_some() {
                    self.check_answer(Some(true), None, &mut out);
                } else if is_serving(self.state) {
                    out.push(Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: self.timings.active_lock_ms,
                    });
                }
            }
            Event::GatewayReachable => {
                if !self.gateway_ok {
                    self.gateway_ok = true;
                    out.push(Action::Log("Gateway server is reachable".into()));
                    self.waiting_next(&mut out);
                }
            }
            Event::GatewayUnreachable => {
                if self.gateway_ok {
                    self.gateway_ok = false;
                    out.push(Action::Log("Gateway server is not reachable".into()));
                    if is_serving(self.state) && !self.link_up && self.check.is_none() {
                        out.push(Action::Log(
                            "Neither the gateway nor the backup server is reachable: this server is isolated; stepping down".into(),
                        ));
                        self.step_down(&mut out);
                    }
                }
            }
            Event::GatewayProbe { ok } => {
                // The monitor's view (gateway_ok) changes only through its
                // own edge events; a probe answers the check alone.
                if self.check.is_some() {
                    self.check_answer(None, Some(ok), &mut out);
                }
            }
            Event::LinkUp => {
                self.link_up = true;
                self.loss_retries.disarm();
                out.push(Action::Broadcast {
                    current: self.state,
                    previous: self.previous,
                });
            }
            Event::LinkDown => {
                if self.link_up {
                    self.link_up = false;
                    self.loss_retries.arm();
                    self.peer_position = None;
                    self.peer_changed(State::Dead, &mut out);
                    self.peer_lost(&mut out);
                }
            }
            Event::PeerState {
                current,
                previous: _,
                position,
            } => {
                if self.link_up {
                    self.peer_changed(current, &mut out);
                    if position.is_some() {
                        self.peer_position = position;
                    }
                    self.peer_update(&mut out);
                }
            }
            Event::ServicesActivated => {
                if self.starting {
                    self.starting = false;
                    let next = if self.link_up && self.peer != State::Dead {
                        State::ActiveSync
                    } else {
                        State::Standalone
                    };
                    self.set_state(next, &mut out);
                    out.push(Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: self.timings.active_lock_ms,
                    });
                }
            }
            Event::ServicesFailed { reason } => {
                if self.starting {
                    self.starting = false;
                    out.push(Action::Log(format!("Activation failed: {reason}")));
                    self.step_down(&mut out);
                }
            }
            Event::SyncComplete => match self.state {
                State::ActiveSync => {
                    self.set_state(State::Active, &mut out);
                    self.feeding = true;
                    out.push(Action::RequireSync(true));
                }
                State::PassiveSync => {
                    self.sink_failures = 0;
                    self.set_state(State::Passive, &mut out);
                }
                _ => {}
            },
            Event::ReplicationFailed { reason } => {
                if self.state == State::Active {
                    // The stream to the passive ended. Receipts keep waiting
                    // until the peer says it stopped following (WAITING):
                    // until then it may still take over as an in-sync
                    // stand-in.
                    self.feeding = false;
                    out.push(Action::Log(format!(
                        "Replication to the backup server ended: {reason}"
                    )));
                    // Only a peer that reports WAITING over a live link is
                    // let go here; a lost link goes through the lock and
                    // gateway check instead, which holds the receipts.
                    if self.link_up && self.peer == State::Waiting {
                        self.peer_update(&mut out);
                    }
                } else if matches!(self.state, State::PassiveSync | State::Passive) {
                    out.push(Action::Log(format!(
                        "Replication from the backup server failed: {reason}"
                    )));
                    out.push(Action::StopSink);
                    self.sink_backoff = true;
                    // A PASSIVE's count was reset when it got in sync, so
                    // its first failure retries after the base wait.
                    out.push(Action::Schedule {
                        timer: Timer::SinkRetry,
                        after_ms: sink_retry_after(self.timings.sink_retry_ms, self.sink_failures),
                    });
                    self.sink_failures = self.sink_failures.saturating_add(1);
                    // An in-sync PASSIVE stays a valid stand-in (its stream
                    // often breaks just before the link reports the active's
                    // death); one still catching up waits for its peer.
                    self.may_take_over = self.state == State::Passive;
                    if !self.may_take_over {
                        out.push(Action::Schedule {
                            timer: Timer::PeerWait,
                            after_ms: self.timings.max_wait_ms,
                        });
                    }
                    self.set_state(State::Waiting, &mut out);
                    self.waiting_next(&mut out);
                }
            }
            Event::Timer(Timer::PeerWait) => {
                if self.state == State::Waiting && !self.may_take_over {
                    self.may_take_over = true;
                    if !self.link_up {
                        out.push(Action::Log(format!(
                            "Backup Server did not connect within max_wait_timeout ({} ms); {} Server will serve alone once it holds the lock",
                            self.timings.max_wait_ms,
                            self.role.title()
                        )));
                    }
                    self.waiting_next(&mut out);
                }
            }
            Event::Timer(Timer::LockRetry) => {
                if self.state == State::Waiting {
                    self.waiting_next(&mut out);
                }
            }
            Event::Timer(Timer::LockVerify) => {
                if is_serving(self.state) && self.check.is_none() {
                    out.push(Action::VerifyLock);
                }
            }
            Event::Timer(Timer::SinkRetry) => {
                self.sink_backoff = false;
                if self.state == State::Waiting {
                    self.waiting_next(&mut out);
                }
            }
        }
        out
    }

    /// Whether a WAITING server may take the lock now: the gateway answers,
    /// and either the peer is WAITING and we win, or there is no peer and
    /// we may take over.
    fn may_serve(&self) -> bool {
        if !self.gateway_ok {
            return false;
        }
        if self.link_up {
            match self.peer {
                State::Waiting => self.wins_over_peer(),
                // A peer that claims to follow us (stale) or is gone.
                State::Passive | State::PassiveSync | State::Dead => self.may_take_over,
                _ => false,
            }
        } else {
            self.may_take_over
        }
    }

    /// What a WAITING server does next, given what it knows.
    fn waiting_next(&mut self, out: &mut Vec<Action>) {
        if !self.started || self.state != State::Waiting || self.starting {
            return;
        }
        if self.link_up && peer_serving(self.peer) {
            if !self.sink_backoff {
                self.set_state(State::PassiveSync, out);
                out.push(Action::StartSink);
            }
            return;
        }
        if self.may_serve() && !self.trying {
            self.trying = true;
            out.push(Action::TryLock);
        }
    }

    /// The link went down.
    fn peer_lost(&mut self, out: &mut Vec<Action>) {
        match self.state {
            State::Active | State::ActiveSync => {
                // Receipts stay held until we know we may serve alone.
                self.check = Some(Check::default());
                out.push(Action::VerifyLock);
                out.push(Action::ProbeGateway);
            }
            State::Passive => {
                out.push(Action::StopSink);
                self.may_take_over = true;
                self.set_state(State::Waiting, out);
                self.waiting_next(out);
                if !self.trying {
                    self.schedule_retry(out);
                }
            }
            State::PassiveSync => {
                // Not caught up: not a safe stand-in yet. Wait for the peer
                // to come back, then for max_wait_timeout.
                out.push(Action::StopSink);
                self.may_take_over = false;
                self.set_state(State::Waiting, out);
                out.push(Action::Schedule {
                    timer: Timer::PeerWait,
                    after_ms: self.timings.max_wait_ms,
                });
            }
            State::Waiting => self.waiting_next(out),
            _ => {}
        }
    }

    /// The peer's state changed (link up).
    fn peer_update(&mut self, out: &mut Vec<Action>) {
        match self.state {
            State::Waiting => {
                if self.may_take_over && matches!(self.peer, State::ActiveSync | State::Standalone)
                {
                    // The peer serves without waiting for us any more: from
                    // now on it may confirm batches we do not have, so we are
                    // no longer an up-to-date stand-in.
                    self.may_take_over = false;
                    out.push(Action::Schedule {
                        timer: Timer::PeerWait,
                        after_ms: self.timings.max_wait_ms,
                    });
                }
                self.waiting_next(out);
            }
            State::Standalone | State::ActiveSync | State::Active if peer_serving(self.peer) => {
                // Two servers claim to serve: the lock decides.
                out.push(Action::VerifyLock);
            }
            State::Standalone if self.peer == State::Waiting => {
                self.set_state(State::ActiveSync, out);
            }
            State::Active if self.peer == State::Waiting && self.feeding => {
                // Older than the stream that is in sync: see `feeding`.
            }
            State::Active if matches!(self.peer, State::Waiting | State::Dead) => {
                // The passive dropped out of sync: serve on, resync it.
                out.push(Action::RequireSync(false));
                self.set_state(State::ActiveSync, out);
            }
            State::Passive | State::PassiveSync if !peer_serving(self.peer) => {
                out.push(Action::StopSink);
                self.may_take_over = self.state == State::Passive;
                self.set_state(State::Waiting, out);
                self.waiting_next(out);
            }
            _ => {}
        }
    }

    /// One answer of the link-loss check.
    fn check_answer(&mut self, lock: Option<bool>, gateway: Option<bool>, out: &mut Vec<Action>) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        if lock.is_some() {
            check.lock = lock;
        }
        if gateway.is_some() {
            check.gateway = gateway;
        }
        let check = *check;
        match (check.lock, check.gateway) {
            (Some(false), _) | (_, Some(false)) => {
                self.check = None;
                out.push(Action::Log(
                    if check.lock == Some(false) {
                        "Backup server lost and the lock is no longer ours; stepping down"
                    } else {
                        "Neither the gateway nor the backup server is reachable: this server is isolated; stepping down"
                    }
                    .into(),
                ));
                self.step_down(out);
            }
            (Some(true), Some(true)) => {
                self.check = None;
                if is_serving(self.state) && !self.link_up {
                    out.push(Action::RequireSync(false));
                    self.set_state(State::Standalone, out);
                    out.push(Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: self.timings.active_lock_ms,
                    });
                } else if is_serving(self.state) {
                    // The link came back during the check.
                    out.push(Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: self.timings.active_lock_ms,
                    });
                }
            }
            _ => {}
        }
    }

    fn set_state(&mut self, next: State, out: &mut Vec<Action>) {
        if next == self.state && self.previous != State::Dead {
            return;
        }
        self.previous = self.state;
        self.state = next;
        if next != State::Active {
            self.feeding = false;
        }
        out.push(Action::Log(crate::state::switched_line(self.role, next)));
        out.push(Action::Broadcast {
            current: next,
            previous: self.previous,
        });
    }

    fn peer_changed(&mut self, current: State, out: &mut Vec<Action>) {
        if current != self.peer {
            out.extend(
                crate::state::peer_change_lines(self.peer, current)
                    .into_iter()
                    .map(Action::Log),
            );
            self.peer = current;
        }
    }

    fn schedule_retry(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Schedule {
            timer: Timer::LockRetry,
            after_ms: self.loss_retries.next_delay(self.timings.passive_lock_ms),
        });
    }

    /// Leaves a serving state for WAITING: the broker stops first (failing
    /// what the peer has not confirmed), then the lock is given up.
    fn step_down(&mut self, out: &mut Vec<Action>) {
        self.starting = false;
        self.check = None;
        out.push(Action::StopBroker);
        out.push(Action::ReleaseLock);
        self.holds_lock = false;
        self.may_take_over = false;
        self.set_state(State::Waiting, out);
        out.push(Action::Schedule {
            timer: Timer::PeerWait,
            after_ms: self.timings.max_wait_ms,
        });
        self.waiting_next(out);
    }
}

/// States in which a server serves clients.
fn is_serving(s: State) -> bool {
    matches!(s, State::Active | State::ActiveSync | State::Standalone)
}

/// A peer in one of these states serves clients; we follow it.
fn peer_serving(s: State) -> bool {
    is_serving(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Timings = Timings {
        active_lock_ms: 200,
        passive_lock_ms: 500,
        max_wait_ms: 3000,
        sink_retry_ms: 1000,
    };

    fn logs(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    fn peer(current: State, position: Position) -> Event {
        Event::PeerState {
            current,
            previous: State::Waiting,
            position: Some(position),
        }
    }

    fn started(role: Role, position: Position) -> Machine {
        let mut m = Machine::new(role, T);
        m.set_position(position);
        m.handle(Event::GatewayReachable);
        m.handle(Event::Start);
        assert_eq!(m.state(), State::Waiting);
        m
    }

    /// WAITING, peer connected and WAITING too.
    fn both_waiting(role: Role, ours: Position, theirs: Position) -> Machine {
        let mut m = started(role, ours);
        m.handle(Event::LinkUp);
        m.handle(peer(State::Waiting, theirs));
        m
    }

    fn serving(next: State) -> Machine {
        let mut m = both_waiting(Role::Primary, (1, 10), (1, 10));
        m.handle(Event::LockAcquired { epoch: 2 });
        m.handle(Event::ServicesActivated);
        assert_eq!(m.state(), State::ActiveSync);
        match next {
            State::ActiveSync => {}
            State::Active => {
                m.handle(peer(State::PassiveSync, (1, 10)));
                m.handle(Event::SyncComplete);
            }
            State::Standalone => {
                m.handle(Event::LinkDown);
                m.handle(Event::LockVerified);
                m.handle(Event::GatewayProbe { ok: true });
            }
            _ => unreachable!(),
        }
        assert_eq!(m.state(), next);
        m
    }

    fn standalone_alone() -> Machine {
        let mut m = started(Role::Secondary, (3, 5));
        m.handle(Event::Timer(Timer::PeerWait));
        m.handle(Event::LockAcquired { epoch: 4 });
        m.handle(Event::ServicesActivated);
        assert_eq!(m.state(), State::Standalone);
        m
    }

    fn following(next: State) -> Machine {
        let mut m = started(Role::Secondary, (1, 3));
        m.handle(Event::LinkUp);
        m.handle(peer(State::Standalone, (2, 9)));
        assert_eq!(m.state(), State::PassiveSync);
        if next == State::Passive {
            m.handle(peer(State::ActiveSync, (2, 9)));
            m.handle(Event::SyncComplete);
        }
        assert_eq!(m.state(), next);
        m
    }

    /// (rule, setup, event, expected state, must contain, must not contain)
    type Case = (
        &'static str,
        fn() -> Machine,
        Event,
        State,
        Vec<Action>,
        Vec<Action>,
    );

    #[test]
    fn seed_rules() {
        let cases: Vec<Case> = vec![
            // Rule 1: start WAITING; PASSIVE_SYNC when the peer serves;
            // repository timestamps decide between two WAITING servers.
            (
                "1: boot enters WAITING and waits for the peer",
                || {
                    let mut m = Machine::new(Role::Primary, T);
                    m.handle(Event::GatewayReachable);
                    m
                },
                Event::Start,
                State::Waiting,
                vec![
                    Action::Schedule {
                        timer: Timer::PeerWait,
                        after_ms: 3000,
                    },
                    Action::Log("Primary Server switched to WAITING".into()),
                ],
                vec![Action::TryLock, Action::StartBroker],
            ),
            (
                "1: WAITING, peer STANDALONE -> PASSIVE_SYNC",
                || {
                    let mut m = started(Role::Primary, (9, 9));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Standalone, (1, 1)),
                State::PassiveSync,
                vec![Action::StartSink],
                vec![Action::TryLock],
            ),
            (
                "1: WAITING, peer ACTIVE -> PASSIVE_SYNC",
                || {
                    let mut m = started(Role::Secondary, (1, 1));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Active, (1, 1)),
                State::PassiveSync,
                vec![Action::StartSink],
                vec![],
            ),
            (
                "1: both WAITING, newer epoch wins even with fewer batches",
                || {
                    let mut m = started(Role::Secondary, (5, 10));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (4, 900)),
                State::Waiting,
                vec![Action::TryLock],
                vec![Action::StartSink],
            ),
            (
                "1: both WAITING, older repository waits for the winner",
                || {
                    let mut m = started(Role::Primary, (4, 900));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (5, 10)),
                State::Waiting,
                vec![],
                vec![Action::TryLock, Action::StartSink],
            ),
            (
                "1: both WAITING, same epoch: more batches wins",
                || {
                    let mut m = started(Role::Secondary, (5, 11));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (5, 10)),
                State::Waiting,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "1: both WAITING, tie: the primary takes the lock",
                || {
                    let mut m = started(Role::Primary, (5, 10));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (5, 10)),
                State::Waiting,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "1: both WAITING, tie: the secondary does not",
                || {
                    let mut m = started(Role::Secondary, (5, 10));
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (5, 10)),
                State::Waiting,
                vec![],
                vec![Action::TryLock],
            ),
            (
                "1: winner with the lock starts the broker",
                || both_waiting(Role::Primary, (5, 10), (5, 10)),
                Event::LockAcquired { epoch: 6 },
                State::Waiting,
                vec![Action::StartBroker],
                vec![Action::ReleaseLock],
            ),
            (
                "1: winner's broker is up with the peer there -> ACTIVE_SYNC",
                || {
                    let mut m = both_waiting(Role::Primary, (5, 10), (5, 10));
                    m.handle(Event::LockAcquired { epoch: 6 });
                    m
                },
                Event::ServicesActivated,
                State::ActiveSync,
                vec![Action::Log("Primary Server switched to ACTIVE_SYNC".into())],
                vec![],
            ),
            (
                "1: loser follows once the winner serves",
                || both_waiting(Role::Secondary, (5, 10), (5, 10)),
                peer(State::ActiveSync, (6, 11)),
                State::PassiveSync,
                vec![Action::StartSink],
                vec![],
            ),
            (
                "1/2: no peer within max_wait_timeout: take the lock",
                || started(Role::Secondary, (1, 1)),
                Event::Timer(Timer::PeerWait),
                State::Waiting,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "2: WAITING without gateway never takes the lock",
                || {
                    let mut m = started(Role::Primary, (1, 1));
                    m.handle(Event::GatewayUnreachable);
                    m
                },
                Event::Timer(Timer::PeerWait),
                State::Waiting,
                vec![],
                vec![Action::TryLock],
            ),
            (
                "2: lock and no peer -> STANDALONE",
                || {
                    let mut m = started(Role::Primary, (1, 1));
                    m.handle(Event::Timer(Timer::PeerWait));
                    m.handle(Event::LockAcquired { epoch: 3 });
                    m
                },
                Event::ServicesActivated,
                State::Standalone,
                vec![
                    Action::Log("Primary Server switched to STANDALONE".into()),
                    Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: 200,
                    },
                ],
                vec![],
            ),
            (
                "2: lock busy: retry every passive interval",
                || {
                    let mut m = started(Role::Primary, (1, 1));
                    m.handle(Event::Timer(Timer::PeerWait));
                    m
                },
                Event::LockBusy,
                State::Waiting,
                vec![Action::Schedule {
                    timer: Timer::LockRetry,
                    after_ms: 500,
                }],
                vec![Action::StartBroker],
            ),
            (
                "2: STANDALONE, peer comes up WAITING -> ACTIVE_SYNC",
                || {
                    let mut m = standalone_alone();
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Waiting, (3, 5)),
                State::ActiveSync,
                vec![Action::Log(
                    "Secondary Server switched to ACTIVE_SYNC".into(),
                )],
                vec![Action::RequireSync(true)],
            ),
            (
                "2/4: in-sync PASSIVE loses the link: tries the lock at once",
                || following(State::Passive),
                Event::LinkDown,
                State::Waiting,
                vec![Action::StopSink, Action::TryLock],
                vec![],
            ),
            (
                "2/4: ... and gets it: STANDALONE",
                || {
                    let mut m = following(State::Passive);
                    m.handle(Event::LinkDown);
                    m.handle(Event::LockAcquired { epoch: 3 });
                    m
                },
                Event::ServicesActivated,
                State::Standalone,
                vec![Action::Log(
                    "Secondary Server switched to STANDALONE".into(),
                )],
                vec![],
            ),
            (
                "2/4: a PASSIVE whose stream broke first still takes over at once",
                || {
                    let mut m = following(State::Passive);
                    m.handle(Event::ReplicationFailed {
                        reason: "closed".into(),
                    });
                    assert_eq!(m.state(), State::Waiting);
                    m
                },
                Event::LinkDown,
                State::Waiting,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "2: ... but not once the active serves without it",
                || {
                    let mut m = following(State::Passive);
                    m.handle(Event::ReplicationFailed {
                        reason: "closed".into(),
                    });
                    m.handle(peer(State::ActiveSync, (2, 9)));
                    m
                },
                Event::LinkDown,
                State::Waiting,
                vec![],
                vec![Action::TryLock],
            ),
            (
                "2: a PASSIVE_SYNC whose stream broke waits for its peer again",
                || following(State::PassiveSync),
                Event::ReplicationFailed {
                    reason: "closed".into(),
                },
                State::Waiting,
                vec![Action::Schedule {
                    timer: Timer::PeerWait,
                    after_ms: 3000,
                }],
                vec![Action::TryLock],
            ),
            (
                "2: a PASSIVE_SYNC that loses the link does not take over at once",
                || following(State::PassiveSync),
                Event::LinkDown,
                State::Waiting,
                vec![Action::StopSink],
                vec![Action::TryLock],
            ),
            (
                "2: a PASSIVE without gateway does not take over",
                || {
                    let mut m = following(State::Passive);
                    m.handle(Event::GatewayUnreachable);
                    m
                },
                Event::LinkDown,
                State::Waiting,
                vec![],
                vec![Action::TryLock],
            ),
            // Rule 3: ACTIVE_SYNC -> ACTIVE and PASSIVE_SYNC -> PASSIVE.
            (
                "3: sync complete on the active -> ACTIVE, receipts wait for the passive",
                || serving(State::ActiveSync),
                Event::SyncComplete,
                State::Active,
                vec![Action::RequireSync(true)],
                vec![],
            ),
            (
                "3: sync complete on the passive -> PASSIVE",
                || following(State::PassiveSync),
                Event::SyncComplete,
                State::Passive,
                vec![Action::Log("Secondary Server switched to PASSIVE".into())],
                vec![],
            ),
            (
                "3: PASSIVE_SYNC whose stream fails -> WAITING, retry later",
                || following(State::PassiveSync),
                Event::ReplicationFailed {
                    reason: "refused".into(),
                },
                State::Waiting,
                vec![
                    Action::StopSink,
                    Action::Schedule {
                        timer: Timer::SinkRetry,
                        after_ms: 1000,
                    },
                ],
                vec![Action::StartSink],
            ),
            // Rule 4: ACTIVE loses its passive.
            (
                "4: ACTIVE loses the link: verify lock and gateway before serving alone",
                || serving(State::Active),
                Event::LinkDown,
                State::Active,
                vec![Action::VerifyLock, Action::ProbeGateway],
                vec![Action::RequireSync(false), Action::StopBroker],
            ),
            (
                "4: ... both confirmed: STANDALONE, held receipts released",
                || {
                    let mut m = serving(State::Active);
                    m.handle(Event::LinkDown);
                    m.handle(Event::GatewayProbe { ok: true });
                    m
                },
                Event::LockVerified,
                State::Standalone,
                vec![Action::RequireSync(false)],
                vec![Action::StopBroker],
            ),
            (
                "4/5: ... gateway silent: isolated, step down without releasing",
                || {
                    let mut m = serving(State::Active);
                    m.handle(Event::LinkDown);
                    m.handle(Event::LockVerified);
                    m
                },
                Event::GatewayProbe { ok: false },
                State::Waiting,
                vec![Action::StopBroker, Action::ReleaseLock],
                vec![Action::RequireSync(false)],
            ),
            (
                "4: ACTIVE whose passive drops out of sync (stream ended, then WAITING) -> ACTIVE_SYNC",
                || {
                    let mut m = serving(State::Active);
                    m.handle(Event::ReplicationFailed {
                        reason: "closed by the peer".into(),
                    });
                    assert_eq!(m.state(), State::Active);
                    m
                },
                peer(State::Waiting, (1, 10)),
                State::ActiveSync,
                vec![Action::RequireSync(false)],
                vec![],
            ),
            (
                "4: ACTIVE whose passive reported WAITING: the stream ending lets it go -> ACTIVE_SYNC",
                || {
                    let mut m = serving(State::Active);
                    m.handle(peer(State::Waiting, (1, 10)));
                    assert_eq!(m.state(), State::Active);
                    m
                },
                Event::ReplicationFailed {
                    reason: "closed by the peer".into(),
                },
                State::ActiveSync,
                vec![Action::RequireSync(false)],
                vec![],
            ),
            (
                "4: a WAITING report older than the in-sync stream keeps ACTIVE and its receipts waiting",
                || serving(State::Active),
                peer(State::Waiting, (1, 10)),
                State::Active,
                vec![],
                vec![Action::RequireSync(false)],
            ),
            (
                "4: the stream ending while the passive still says PASSIVE keeps receipts waiting",
                || {
                    let mut m = serving(State::Active);
                    m.handle(peer(State::Passive, (1, 10)));
                    m
                },
                Event::ReplicationFailed {
                    reason: "closed by the peer".into(),
                },
                State::Active,
                vec![],
                vec![Action::RequireSync(false)],
            ),
            // Rule 5: lose the lock -> WAITING.
            (
                "5: ACTIVE loses the lock -> WAITING",
                || serving(State::Active),
                Event::LockLost {
                    reason: "EIO".into(),
                },
                State::Waiting,
                vec![Action::StopBroker, Action::ReleaseLock],
                vec![Action::RequireSync(false)],
            ),
            (
                "5: ACTIVE loses the link and the lock -> WAITING",
                || {
                    let mut m = serving(State::Active);
                    m.handle(Event::LinkDown);
                    m
                },
                Event::LockLost {
                    reason: "held by another".into(),
                },
                State::Waiting,
                vec![Action::StopBroker],
                vec![Action::RequireSync(false)],
            ),
            (
                "5: STANDALONE loses the lock -> WAITING",
                standalone_alone,
                Event::LockLost {
                    reason: "EIO".into(),
                },
                State::Waiting,
                vec![Action::StopBroker, Action::ReleaseLock],
                vec![],
            ),
            (
                "5: STANDALONE loses the gateway -> WAITING (isolated)",
                standalone_alone,
                Event::GatewayUnreachable,
                State::Waiting,
                vec![Action::StopBroker],
                vec![],
            ),
            (
                "5: two servers serving: verify the lock at once",
                || {
                    let mut m = standalone_alone();
                    m.handle(Event::LinkUp);
                    m
                },
                peer(State::Standalone, (9, 9)),
                State::Standalone,
                vec![Action::VerifyLock],
                vec![],
            ),
        ];
        for (name, setup, event, state, must, must_not) in cases {
            let mut m = setup();
            let actions = m.handle(event.clone());
            assert_eq!(
                m.state(),
                state,
                "{name}: state after {event:?}: {actions:?}"
            );
            for a in &must {
                assert!(actions.contains(a), "{name}: missing {a:?} in {actions:?}");
            }
            for a in &must_not {
                assert!(
                    !actions.contains(a),
                    "{name}: unexpected {a:?} in {actions:?}"
                );
            }
        }
    }

    /// The SinkRetry wait scheduled by `actions`.
    fn sink_retry(actions: &[Action]) -> Option<u64> {
        actions.iter().find_map(|a| match a {
            Action::Schedule {
                timer: Timer::SinkRetry,
                after_ms,
            } => Some(*after_ms),
            _ => None,
        })
    }

    #[test]
    fn failed_catch_ups_in_a_row_back_off_and_sync_resets_them() {
        let mut m = following(State::PassiveSync);
        let mut waits = Vec::new();
        for _ in 0..7 {
            let actions = m.handle(Event::ReplicationFailed {
                reason: "checkpoint failed".into(),
            });
            assert_eq!(m.state(), State::Waiting, "{actions:?}");
            waits.push(sink_retry(&actions).expect("a retry is scheduled"));
            let actions = m.handle(Event::Timer(Timer::SinkRetry));
            assert!(actions.contains(&Action::StartSink), "{actions:?}");
            assert_eq!(m.state(), State::PassiveSync, "{actions:?}");
        }
        assert_eq!(waits, [1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]);
        // In sync again: the next failure retries after the base wait.
        m.handle(Event::SyncComplete);
        assert_eq!(m.state(), State::Passive);
        let actions = m.handle(Event::ReplicationFailed {
            reason: "link blinked".into(),
        });
        assert_eq!(sink_retry(&actions), Some(1000), "{actions:?}");
        assert_eq!(sink_retry_after(200, 0), 200);
        assert_eq!(sink_retry_after(200, 40), SINK_RETRY_MAX_MS);
        assert_eq!(sink_retry_after(20_000, 3), 20_000, "never below the base");
    }

    #[test]
    fn rule_6_every_change_is_broadcast_with_the_previous_state() {
        let mut m = started(Role::Primary, (1, 1));
        let mut seen = Vec::new();
        for e in [
            Event::LinkUp,
            peer(State::Standalone, (2, 2)),
            Event::SyncComplete,
            Event::LinkDown,
            Event::LockAcquired { epoch: 3 },
            Event::ServicesActivated,
        ] {
            let before = m.state();
            let actions = m.handle(e);
            if m.state() != before {
                assert!(
                    actions.contains(&Action::Broadcast {
                        current: m.state(),
                        previous: before
                    }),
                    "{actions:?}"
                );
                seen.push(m.state());
            }
        }
        assert_eq!(
            seen,
            [
                State::PassiveSync,
                State::Passive,
                State::Waiting,
                State::Standalone
            ]
        );
    }

    #[test]
    fn console_uses_the_seed_wording() {
        let mut m = Machine::new(Role::Primary, T);
        let lines = logs(&m.handle(Event::Start));
        assert!(lines.contains(&"Primary Server switched to WAITING".to_owned()));
        assert!(lines.contains(
            &"Backup Server not Connected. Check configuration or Start backup Server ..."
                .to_owned()
        ));
        m.handle(Event::LinkUp);
        let lines = logs(&m.handle(peer(State::Waiting, (0, 0))));
        assert_eq!(
            lines,
            [
                "Old status of remote server = DEAD",
                "New status of remote server = WAITING"
            ]
        );
    }

    /// The delays of the `LockRetry` timers in `actions`.
    fn retries(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Schedule {
                    timer: Timer::LockRetry,
                    after_ms,
                } => Some(*after_ms),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_busy_lock_after_the_active_dies_is_retried_quickly_for_a_while() {
        let mut m = following(State::Passive);
        let lost = m.handle(Event::LinkDown);
        assert!(lost.contains(&Action::TryLock));
        assert_eq!(m.state(), State::Waiting);
        // The dying active's lock is released a moment after its sockets
        // closed: the first answers are busy.
        let mut delays = Vec::new();
        for _ in 0..=crate::state::PEER_LOSS_RETRIES {
            delays.extend(retries(&m.handle(Event::LockBusy)));
            m.handle(Event::Timer(Timer::LockRetry));
        }
        crate::state::assert_loss_retry_delays(&delays, T.passive_lock_ms);
        // Once free, it is ours.
        m.handle(Event::LockAcquired { epoch: 3 });
        assert!(m.holds_lock());
    }

    #[test]
    fn a_busy_lock_with_the_link_up_waits_the_passive_interval() {
        let mut m = following(State::Passive);
        m.handle(Event::LinkDown);
        // The peer is back: a busy lock is no longer a dying peer's.
        m.handle(Event::LinkUp);
        assert_eq!(m.state(), State::Waiting);
        assert_eq!(retries(&m.handle(Event::LockBusy)), [T.passive_lock_ms]);
    }

    #[test]
    fn a_stale_lock_grant_is_given_back() {
        // The lock arrives after the peer started serving: release it.
        let mut m = started(Role::Primary, (1, 1));
        m.handle(Event::Timer(Timer::PeerWait));
        m.handle(Event::LinkUp);
        m.handle(peer(State::Standalone, (2, 2)));
        assert_eq!(m.state(), State::PassiveSync);
        let actions = m.handle(Event::LockAcquired { epoch: 4 });
        assert!(actions.contains(&Action::ReleaseLock));
        assert!(!m.holds_lock());
        assert!(!actions.contains(&Action::StartBroker));
    }

    // --- Model check: two machines, one lock, random faults -------------

    #[derive(Debug, Clone)]
    enum Fault {
        Deliver(usize),
        Cut,
        Heal,
        Gateway(usize, bool),
        Fire(usize, Timer),
        Crash(usize),
        Sync(usize),
        Append(usize),
    }

    fn fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            6 => (0usize..2).prop_map(Fault::Deliver),
            1 => Just(Fault::Cut),
            1 => Just(Fault::Heal),
            1 => ((0usize..2), any::<bool>()).prop_map(|(i, b)| Fault::Gateway(i, b)),
            2 => ((0usize..2), prop_oneof![
                Just(Timer::LockRetry),
                Just(Timer::LockVerify),
                Just(Timer::PeerWait),
                Just(Timer::SinkRetry)
            ]).prop_map(|(i, t)| Fault::Fire(i, t)),
            1 => (0usize..2).prop_map(Fault::Crash),
            2 => (0usize..2).prop_map(Fault::Sync),
            2 => (0usize..2).prop_map(Fault::Append),
        ]
    }

    /// Two servers, a lock that only one process can hold (released when
    /// its holder dies or gives it up), a link, and a store position each.
    struct World {
        m: [Machine; 2],
        inbox: [Vec<Event>; 2],
        lock: Option<usize>,
        epoch: u64,
        link: bool,
        pos: [Position; 2],
        gateway: [bool; 2],
    }

    impl World {
        fn new() -> World {
            let mut w = World {
                m: [
                    Machine::new(Role::Primary, T),
                    Machine::new(Role::Secondary, T),
                ],
                inbox: [Vec::new(), Vec::new()],
                lock: None,
                epoch: 0,
                link: true,
                pos: [(0, 0), (0, 0)],
                gateway: [true, true],
            };
            for i in 0..2 {
                w.inbox[i].push(Event::GatewayReachable);
                w.inbox[i].push(Event::Start);
                w.inbox[i].push(Event::LinkUp);
            }
            w
        }

        fn run(&mut self, i: usize, e: Event) {
            self.m[i].set_position(self.pos[i]);
            for a in self.m[i].handle(e) {
                match a {
                    Action::TryLock => {
                        let ev = match self.lock {
                            None => {
                                self.lock = Some(i);
                                self.epoch += 1;
                                Event::LockAcquired { epoch: self.epoch }
                            }
                            Some(h) if h == i => Event::LockAcquired { epoch: self.epoch },
                            Some(_) => Event::LockBusy,
                        };
                        self.inbox[i].push(ev);
                    }
                    Action::VerifyLock => self.inbox[i].push(if self.lock == Some(i) {
                        Event::LockVerified
                    } else {
                        Event::LockLost {
                            reason: "not ours".into(),
                        }
                    }),
                    Action::ReleaseLock if self.lock == Some(i) => self.lock = None,
                    Action::ProbeGateway => {
                        let ok = self.gateway[i];
                        self.inbox[i].push(Event::GatewayProbe { ok });
                    }
                    Action::StartBroker => {
                        let e = self.m[i].epoch();
                        self.pos[i] = (e, self.pos[i].1 + 1);
                        self.inbox[i].push(Event::ServicesActivated);
                    }
                    // The passive's stream ends: the active's source sees it.
                    Action::StopSink => self.inbox[1 - i].push(Event::ReplicationFailed {
                        reason: "the passive stopped following".into(),
                    }),
                    Action::Broadcast { current, previous } if self.link => {
                        let position = Some(self.pos[i]);
                        self.inbox[1 - i].push(Event::PeerState {
                            current,
                            previous,
                            position,
                        });
                    }
                    _ => {}
                }
            }
        }

        fn apply(&mut self, f: Fault) {
            match f {
                Fault::Deliver(i) => {
                    if !self.inbox[i].is_empty() {
                        let e = self.inbox[i].remove(0);
                        self.run(i, e);
                    }
                }
                Fault::Cut => {
                    if self.link {
                        self.link = false;
                        for i in 0..2 {
                            self.inbox[i].retain(|e| !matches!(e, Event::PeerState { .. }));
                            self.inbox[i].push(Event::LinkDown);
                            self.inbox[i].push(Event::ReplicationFailed {
                                reason: "cut".into(),
                            });
                        }
                    }
                }
                Fault::Heal => {
                    if !self.link {
                        self.link = true;
                        for i in 0..2 {
                            self.inbox[i].push(Event::LinkUp);
                        }
                    }
                }
                Fault::Gateway(i, ok) => {
                    self.gateway[i] = ok;
                    self.inbox[i].push(if ok {
                        Event::GatewayReachable
                    } else {
                        Event::GatewayUnreachable
                    });
                }
                Fault::Fire(i, t) => self.inbox[i].push(Event::Timer(t)),
                Fault::Crash(i) => {
                    if self.lock == Some(i) {
                        self.lock = None;
                    }
                    self.m[i] = Machine::new(
                        if i == 0 {
                            Role::Primary
                        } else {
                            Role::Secondary
                        },
                        T,
                    );
                    self.inbox[i] = vec![Event::GatewayReachable, Event::Start];
                    if self.link {
                        self.inbox[1 - i].retain(|e| !matches!(e, Event::PeerState { .. }));
                        self.inbox[1 - i].push(Event::LinkDown);
                        self.inbox[1 - i].push(Event::ReplicationFailed {
                            reason: "peer crashed".into(),
                        });
                        self.inbox[1 - i].push(Event::LinkUp);
                        self.inbox[i].push(Event::LinkUp);
                    }
                }
                Fault::Sync(i) => {
                    if matches!(self.m[i].state(), State::ActiveSync | State::PassiveSync) {
                        self.inbox[i].push(Event::SyncComplete);
                    }
                }
                Fault::Append(i) => {
                    if self.m[i].state().accepts_clients() {
                        self.pos[i].1 += 1;
                    }
                }
            }
        }

        fn check(&self) {
            for i in 0..2 {
                let m = &self.m[i];
                if m.state().accepts_clients() {
                    prop_assert_lock(m.holds_lock(), i, m.state());
                }
            }
            // The lock is only ever given up by its holder (or by its
            // death), so two servers can never serve at once.
            let serving = (0..2)
                .filter(|&i| self.m[i].state().accepts_clients())
                .count();
            assert!(
                serving <= 1,
                "both serve: {} and {}",
                self.m[0].state(),
                self.m[1].state()
            );
            if let Some(i) = (0..2).find(|&i| self.m[i].state().accepts_clients()) {
                assert_eq!(self.lock, Some(i), "server {i} serves without the lock");
            }
        }
    }

    fn prop_assert_lock(holds: bool, i: usize, s: State) {
        assert!(
            holds,
            "server {i} is {s} without believing it holds the lock"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_serving_without_the_lock(faults in proptest::collection::vec(fault(), 1..120)) {
            let mut w = World::new();
            for f in faults {
                w.apply(f);
                w.check();
            }
        }

        #[test]
        fn a_server_serves_once_things_settle(faults in proptest::collection::vec(fault(), 0..60)) {
            let mut w = World::new();
            for f in faults {
                w.apply(f);
            }
            // Heal everything and let time pass: someone must serve.
            w.apply(Fault::Heal);
            for i in 0..2 {
                w.apply(Fault::Gateway(i, true));
            }
            for _ in 0..40 {
                for i in 0..2 {
                    while !w.inbox[i].is_empty() {
                        w.apply(Fault::Deliver(i));
                    }
                    for t in [Timer::PeerWait, Timer::LockRetry, Timer::SinkRetry, Timer::LockVerify] {
                        w.run(i, Event::Timer(t));
                    }
                    w.apply(Fault::Sync(i));
                }
            }
            let serving = (0..2).filter(|&i| w.m[i].state().accepts_clients()).count();
            prop_assert_eq!(serving, 1, "states: {} {}", w.m[0].state(), w.m[1].state());
            let other = (0..2).find(|&i| !w.m[i].state().accepts_clients()).unwrap_or(0);
            prop_assert!(matches!(w.m[other].state(), State::Passive | State::PassiveSync), "other: {}", w.m[other].state());
        }
    }
}
