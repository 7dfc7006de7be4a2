//! The HA state machine: a pure function of (state, event) to (state,
//! actions), with no clock and no sockets.
//!
//! The runtime feeds it what happened (the lock was acquired, the peer's
//! link went down, the gateway stopped answering, a timer it asked for
//! fired) and carries out what it returns (try the lock, open the store,
//! accept clients, broadcast our state, schedule a timer). Every transition
//! of the seed is therefore a plain unit test, and the safety rules are
//! property tests over random event sequences (see the tests below).
//!
//! Shared mode (seed §3.1.2): a server that gets the lock goes ACTIVATING,
//! opens the shared store, and goes ACTIVE; the other stays PASSIVE and
//! refuses clients. Rules FerroMQ enforces on top of the seed's diagram:
//! - only the lock holder may be ACTIVATING or ACTIVE;
//! - a server that cannot reach the gateway never tries to take over;
//! - an ACTIVE that loses the lock (a failed re-verification, EIO, ENOLCK)
//!   steps down at once; so does an ACTIVE that can reach neither the
//!   gateway nor its peer (it is isolated, and the other side may take over);
//! - an ACTIVE that hears its peer claim ACTIVE re-verifies its lock at once.

use crate::state::{LossRetries, Role, State};

/// Timers the machine asks the runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// A passive's next attempt at the lock.
    LockRetry,
    /// The active's next re-verification of its lock.
    LockVerify,
    /// ACTIVATING must reach ACTIVE before this (max_wait_timeout).
    ActivationDeadline,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server has booted: begin.
    Start,
    /// [`Action::TryLock`] got the lock; `epoch` is the new epoch written
    /// into the lock file.
    LockAcquired {
        /// The epoch this server now holds.
        epoch: u64,
    },
    /// [`Action::TryLock`] found the lock held by someone else.
    LockBusy,
    /// The lock is not (or no longer) ours: a failed verification, or an
    /// error from the lock call. `reason` is for the log.
    LockLost {
        /// What failed.
        reason: String,
    },
    /// [`Action::VerifyLock`] confirmed the lock is still ours.
    LockVerified,
    /// The gateway answers pings.
    GatewayReachable,
    /// The gateway stopped answering.
    GatewayUnreachable,
    /// The HA channel to the peer completed its handshake.
    LinkUp,
    /// The HA channel to the peer broke.
    LinkDown,
    /// The peer broadcast its state.
    PeerState {
        /// Its state now.
        current: State,
        /// Its state before.
        previous: State,
    },
    /// [`Action::OpenStore`] finished: the broker serves.
    ServicesActivated,
    /// [`Action::OpenStore`] failed.
    ServicesFailed {
        /// Why.
        reason: String,
    },
    /// A timer asked for with [`Action::Schedule`] fired.
    Timer(Timer),
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Try the lock without blocking; answer with LockAcquired, LockBusy or
    /// LockLost.
    TryLock,
    /// Re-verify the lock; answer with LockVerified or LockLost.
    VerifyLock,
    /// Release the lock (if held).
    ReleaseLock,
    /// Open the store and start the broker; answer with ServicesActivated
    /// or ServicesFailed.
    OpenStore,
    /// Stop the broker and close the store.
    CloseStore,
    /// Start accepting client connections.
    AcceptClients,
    /// Refuse client connections with an ERROR naming our state.
    RefuseClients,
    /// Tell the peer our present and previous state.
    Broadcast {
        /// Our state now.
        current: State,
        /// Our state before.
        previous: State,
    },
    /// Fire `timer` after `after_ms` (replacing a pending one of that kind).
    Schedule {
        /// Which.
        timer: Timer,
        /// Delay.
        after_ms: u64,
    },
    /// A console line, in the seed's words where it has them.
    Log(String),
}

/// Timer settings, from the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// active_lock_reacquisition_interval, ms.
    pub active_lock_ms: u64,
    /// passive_lock_reacquisition_interval, ms.
    pub passive_lock_ms: u64,
    /// max_wait_timeout, ms.
    pub max_wait_ms: u64,
}

/// The shared-mode HA state machine of one server.
#[derive(Debug, Clone)]
pub struct Machine {
    role: Role,
    timings: Timings,
    state: State,
    previous: State,
    started: bool,
    /// Whether this server believes it holds the lock.
    holds_lock: bool,
    epoch: u64,
    /// A TryLock is out and not yet answered.
    trying: bool,
    gateway_ok: bool,
    link_up: bool,
    /// Quick lock attempts left after the peer's link went down.
    loss_retries: LossRetries,
    peer: State,
}

impl Machine {
    /// A server that has not started: PASSIVE, refusing clients, peer DEAD,
    /// gateway not yet known to be reachable.
    pub fn new(role: Role, timings: Timings) -> Machine {
        Machine {
            role,
            timings,
            state: State::Passive,
            previous: State::Dead,
            started: false,
            holds_lock: false,
            epoch: 0,
            trying: false,
            gateway_ok: false,
            link_up: false,
            loss_retries: LossRetries::default(),
            peer: State::Dead,
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

    /// Applies one event; returns what to do.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => {
                if !self.started {
                    self.started = true;
                    out.push(Action::RefuseClients);
                    self.set_state(State::Passive, &mut out);
                    self.maybe_try_lock(&mut out);
                    if !self.gateway_ok {
                        out.push(Action::Log(
                            "Gateway server not reachable yet; this server will not become active until it is".into(),
                        ));
                    }
                }
            }
            Event::LockAcquired { epoch } => {
                self.trying = false;
                self.holds_lock = true;
                self.epoch = epoch;
                if self.state == State::Passive && self.gateway_ok && !peer_serving(self.peer) {
                    self.set_state(State::Activating, &mut out);
                    out.push(Action::OpenStore);
                    out.push(Action::Schedule {
                        timer: Timer::ActivationDeadline,
                        after_ms: self.timings.max_wait_ms,
                    });
                } else if self.state == State::Passive {
                    // Things changed while the attempt was out: give it back.
                    self.holds_lock = false;
                    out.push(Action::ReleaseLock);
                    self.schedule_retry(&mut out);
                }
            }
            Event::LockBusy => {
                self.trying = false;
                if self.state == State::Passive {
                    self.schedule_retry(&mut out);
                }
            }
            Event::LockLost { reason } => {
                self.trying = false;
                match self.state {
                    State::Active | State::Activating => {
                        out.push(Action::Log(format!("Lock lost ({reason}); stepping down")));
                        self.step_down(&mut out);
                    }
                    _ => {
                        self.holds_lock = false;
                        out.push(Action::Log(format!("Lock not acquired: {reason}")));
                        self.schedule_retry(&mut out);
                    }
                }
            }
            Event::LockVerified => {
                if self.state == State::Active {
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
                    self.maybe_try_lock(&mut out);
                }
            }
            Event::GatewayUnreachable => {
                if self.gateway_ok {
                    self.gateway_ok = false;
                    out.push(Action::Log("Gateway server is not reachable".into()));
                    if is_serving(self.state) && !self.link_up {
                        out.push(Action::Log(
                            "Neither the gateway nor the backup server is reachable: this server is isolated; stepping down".into(),
                        ));
                        self.step_down(&mut out);
                    }
                }
            }
            Event::LinkUp => {
                self.link_up = true;
                self.loss_retries.disarm();
                // Tell the peer where we are; it tells us the same.
                out.push(Action::Broadcast {
                    current: self.state,
                    previous: self.previous,
                });
            }
            Event::LinkDown => {
                if self.link_up {
                    self.link_up = false;
                    self.loss_retries.arm();
                    self.peer_changed(State::Dead, &mut out);
                    if is_serving(self.state) && !self.gateway_ok {
                        out.push(Action::Log(
                            "Neither the gateway nor the backup server is reachable: this server is isolated; stepping down".into(),
                        ));
                        self.step_down(&mut out);
                    } else {
                        self.maybe_try_lock(&mut out);
                    }
                }
            }
            Event::PeerState {
                current,
                previous: _,
            } => {
                if self.link_up {
                    self.peer_changed(current, &mut out);
                    if peer_serving(current) && is_serving(self.state) {
                        // Two servers claim to serve: the lock decides.
                        out.push(Action::VerifyLock);
                    } else {
                        self.maybe_try_lock(&mut out);
                    }
                }
            }
            Event::ServicesActivated => {
                if self.state == State::Activating {
                    self.set_state(State::Active, &mut out);
                    out.push(Action::AcceptClients);
                    out.push(Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: self.timings.active_lock_ms,
                    });
                }
            }
            Event::ServicesFailed { reason } => {
                if self.state == State::Activating {
                    out.push(Action::Log(format!("Activation failed: {reason}")));
                    self.step_down(&mut out);
                }
            }
            Event::Timer(Timer::ActivationDeadline) => {
                if self.state == State::Activating {
                    out.push(Action::Log(format!(
                        "Activation did not complete within max_wait_timeout ({} ms)",
                        self.timings.max_wait_ms
                    )));
                    self.step_down(&mut out);
                }
            }
            Event::Timer(Timer::LockVerify) => {
                if self.state == State::Active {
                    out.push(Action::VerifyLock);
                }
            }
            Event::Timer(Timer::LockRetry) => {
                self.maybe_try_lock(&mut out);
                if self.state == State::Passive && !self.trying {
                    self.schedule_retry(&mut out);
                }
            }
        }
        out
    }

    fn set_state(&mut self, next: State, out: &mut Vec<Action>) {
        if next == self.state && self.previous != State::Dead {
            return;
        }
        self.previous = self.state;
        self.state = next;
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

    /// PASSIVE with a reachable gateway and no serving peer: try the lock.
    fn maybe_try_lock(&mut self, out: &mut Vec<Action>) {
        if self.started
            && self.state == State::Passive
            && self.gateway_ok
            && !peer_serving(self.peer)
            && !self.trying
        {
            self.trying = true;
            out.push(Action::TryLock);
        }
    }

    fn schedule_retry(&mut self, out: &mut Vec<Action>) {
        out.push(Action::Schedule {
            timer: Timer::LockRetry,
            after_ms: self.loss_retries.next_delay(self.timings.passive_lock_ms),
        });
    }

    /// Leaves ACTIVE/ACTIVATING for PASSIVE: clients refused first, then
    /// the store closed, then the lock given up.
    fn step_down(&mut self, out: &mut Vec<Action>) {
        out.push(Action::RefuseClients);
        out.push(Action::CloseStore);
        out.push(Action::ReleaseLock);
        self.holds_lock = false;
        self.set_state(State::Passive, out);
        self.schedule_retry(out);
    }
}

/// States in which a server serves (or is about to serve) clients.
fn is_serving(s: State) -> bool {
    matches!(
        s,
        State::Active | State::Activating | State::ActiveSync | State::Standalone
    )
}

/// A peer in one of these states owns the clients; we must not compete.
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
        max_wait_ms: 5000,
    };

    fn has(actions: &[Action], a: &Action) -> bool {
        actions.contains(a)
    }

    fn logs(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// A started primary with a reachable gateway.
    fn booted() -> Machine {
        let mut m = Machine::new(Role::Primary, T);
        m.handle(Event::GatewayReachable);
        m
    }

    fn active() -> Machine {
        let mut m = booted();
        m.handle(Event::Start);
        m.handle(Event::LockAcquired { epoch: 1 });
        m.handle(Event::ServicesActivated);
        assert_eq!(m.state(), State::Active);
        m
    }

    fn passive_with_active_peer() -> Machine {
        let mut m = Machine::new(Role::Secondary, T);
        m.handle(Event::GatewayReachable);
        m.handle(Event::Start);
        m.handle(Event::LockBusy);
        m.handle(Event::LinkUp);
        m.handle(Event::PeerState {
            current: State::Active,
            previous: State::Activating,
        });
        assert_eq!(m.state(), State::Passive);
        m
    }

    /// (name, setup, event, expected state, actions that must be present,
    /// actions that must be absent)
    type Case = (
        &'static str,
        fn() -> Machine,
        Event,
        State,
        Vec<Action>,
        Vec<Action>,
    );

    #[test]
    fn seed_transitions() {
        let cases: Vec<Case> = vec![
            (
                "boot: refuses clients and tries the lock",
                booted,
                Event::Start,
                State::Passive,
                vec![Action::RefuseClients, Action::TryLock],
                vec![Action::OpenStore],
            ),
            (
                "lock obtained: PASSIVE -> ACTIVATING opens the store",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m
                },
                Event::LockAcquired { epoch: 7 },
                State::Activating,
                vec![
                    Action::OpenStore,
                    Action::Broadcast {
                        current: State::Activating,
                        previous: State::Passive,
                    },
                    Action::Schedule {
                        timer: Timer::ActivationDeadline,
                        after_ms: 5000,
                    },
                ],
                vec![Action::AcceptClients],
            ),
            (
                "services activated: ACTIVATING -> ACTIVE accepts clients",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m.handle(Event::LockAcquired { epoch: 1 });
                    m
                },
                Event::ServicesActivated,
                State::Active,
                vec![
                    Action::AcceptClients,
                    Action::Broadcast {
                        current: State::Active,
                        previous: State::Activating,
                    },
                    Action::Schedule {
                        timer: Timer::LockVerify,
                        after_ms: 200,
                    },
                ],
                vec![],
            ),
            (
                "lock busy at boot: stays PASSIVE and retries after the passive interval",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m
                },
                Event::LockBusy,
                State::Passive,
                vec![Action::Schedule {
                    timer: Timer::LockRetry,
                    after_ms: 500,
                }],
                vec![Action::OpenStore],
            ),
            (
                "lock lost: ACTIVE steps down at once",
                active,
                Event::LockLost {
                    reason: "EIO".into(),
                },
                State::Passive,
                vec![
                    Action::RefuseClients,
                    Action::CloseStore,
                    Action::ReleaseLock,
                ],
                vec![],
            ),
            (
                "lock lost while ACTIVATING: back to PASSIVE",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m.handle(Event::LockAcquired { epoch: 1 });
                    m
                },
                Event::LockLost {
                    reason: "ENOLCK".into(),
                },
                State::Passive,
                vec![Action::CloseStore, Action::ReleaseLock],
                vec![Action::AcceptClients],
            ),
            (
                "verify timer: ACTIVE re-verifies its lock",
                active,
                Event::Timer(Timer::LockVerify),
                State::Active,
                vec![Action::VerifyLock],
                vec![],
            ),
            (
                "verified: next verification scheduled",
                active,
                Event::LockVerified,
                State::Active,
                vec![Action::Schedule {
                    timer: Timer::LockVerify,
                    after_ms: 200,
                }],
                vec![],
            ),
            (
                "failure detected (link down) with the gateway reachable: ACTIVE stays",
                || {
                    let mut m = active();
                    m.handle(Event::LinkUp);
                    m.handle(Event::PeerState {
                        current: State::Passive,
                        previous: State::Dead,
                    });
                    m
                },
                Event::LinkDown,
                State::Active,
                vec![],
                vec![Action::CloseStore],
            ),
            (
                "isolated (link down, then gateway lost): ACTIVE steps down",
                active,
                Event::GatewayUnreachable,
                State::Passive,
                vec![
                    Action::RefuseClients,
                    Action::CloseStore,
                    Action::ReleaseLock,
                ],
                vec![],
            ),
            (
                "gateway lost but peer still linked: ACTIVE stays",
                || {
                    let mut m = active();
                    m.handle(Event::LinkUp);
                    m
                },
                Event::GatewayUnreachable,
                State::Active,
                vec![],
                vec![Action::CloseStore],
            ),
            (
                "failure detected on the PASSIVE: tries the lock at once",
                passive_with_active_peer,
                Event::LinkDown,
                State::Passive,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "PASSIVE with an ACTIVE peer does not try the lock on its retry timer",
                passive_with_active_peer,
                Event::Timer(Timer::LockRetry),
                State::Passive,
                vec![],
                vec![Action::TryLock],
            ),
            (
                "PASSIVE whose peer also is PASSIVE tries the lock",
                passive_with_active_peer,
                Event::PeerState {
                    current: State::Passive,
                    previous: State::Active,
                },
                State::Passive,
                vec![Action::TryLock],
                vec![],
            ),
            (
                "peer claims ACTIVE while we are ACTIVE: re-verify at once",
                || {
                    let mut m = active();
                    m.handle(Event::LinkUp);
                    m
                },
                Event::PeerState {
                    current: State::Active,
                    previous: State::Activating,
                },
                State::Active,
                vec![Action::VerifyLock],
                vec![],
            ),
            (
                "activation deadline passes: back to PASSIVE",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m.handle(Event::LockAcquired { epoch: 1 });
                    m
                },
                Event::Timer(Timer::ActivationDeadline),
                State::Passive,
                vec![Action::CloseStore, Action::ReleaseLock],
                vec![],
            ),
            (
                "activation fails: back to PASSIVE",
                || {
                    let mut m = booted();
                    m.handle(Event::Start);
                    m.handle(Event::LockAcquired { epoch: 1 });
                    m
                },
                Event::ServicesFailed {
                    reason: "store locked".into(),
                },
                State::Passive,
                vec![Action::CloseStore, Action::ReleaseLock],
                vec![Action::AcceptClients],
            ),
            (
                "gateway unreachable at boot: no lock attempt",
                || Machine::new(Role::Primary, T),
                Event::Start,
                State::Passive,
                vec![Action::RefuseClients],
                vec![Action::TryLock],
            ),
            (
                "gateway becomes reachable: the waiting PASSIVE tries",
                || {
                    let mut m = Machine::new(Role::Primary, T);
                    m.handle(Event::Start);
                    m
                },
                Event::GatewayReachable,
                State::Passive,
                vec![Action::TryLock],
                vec![],
            ),
        ];
        for (name, setup, event, state, present, absent) in cases {
            let mut m = setup();
            let actions = m.handle(event);
            assert_eq!(m.state(), state, "{name}: state ({actions:?})");
            for a in &present {
                assert!(has(&actions, a), "{name}: missing {a:?} in {actions:?}");
            }
            for a in &absent {
                assert!(!has(&actions, a), "{name}: unexpected {a:?} in {actions:?}");
            }
        }
    }

    #[test]
    fn console_lines_use_the_seed_wording() {
        let mut m = booted();
        let mut lines = logs(&m.handle(Event::Start));
        lines.extend(logs(&m.handle(Event::LockAcquired { epoch: 1 })));
        lines.extend(logs(&m.handle(Event::ServicesActivated)));
        m.handle(Event::LinkUp);
        lines.extend(logs(&m.handle(Event::PeerState {
            current: State::Passive,
            previous: State::Dead,
        })));
        lines.extend(logs(&m.handle(Event::LinkDown)));
        assert_eq!(
            lines,
            [
                "Primary Server switched to PASSIVE",
                "Primary Server switched to ACTIVATING",
                "Primary Server switched to ACTIVE",
                "Old status of remote server = DEAD",
                "New status of remote server = PASSIVE",
                "Old status of remote server = PASSIVE",
                "New status of remote server = DEAD",
            ]
        );
        let mut s = Machine::new(Role::Secondary, T);
        s.handle(Event::GatewayReachable);
        assert_eq!(
            logs(&s.handle(Event::Start)),
            ["Secondary Server switched to PASSIVE"]
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
        let mut m = passive_with_active_peer();
        assert!(has(&m.handle(Event::LinkDown), &Action::TryLock));
        // The dying active's lock is released a moment after its sockets
        // closed: the first answers are busy.
        let mut delays = Vec::new();
        for _ in 0..=crate::state::PEER_LOSS_RETRIES {
            delays.extend(retries(&m.handle(Event::LockBusy)));
            assert!(has(
                &m.handle(Event::Timer(Timer::LockRetry)),
                &Action::TryLock
            ));
        }
        crate::state::assert_loss_retry_delays(&delays, T.passive_lock_ms);
        m.handle(Event::LockAcquired { epoch: 2 });
        assert_eq!(m.state(), State::Activating);
    }

    #[test]
    fn a_busy_lock_with_the_link_up_waits_the_passive_interval() {
        let mut m = passive_with_active_peer();
        m.handle(Event::LinkDown);
        m.handle(Event::LinkUp);
        m.handle(Event::PeerState {
            current: State::Passive,
            previous: State::Active,
        });
        assert_eq!(retries(&m.handle(Event::LockBusy)), [T.passive_lock_ms]);
    }

    #[test]
    fn every_state_change_is_broadcast_with_present_and_previous() {
        let mut m = booted();
        let mut broadcasts = Vec::new();
        for e in [
            Event::Start,
            Event::LockAcquired { epoch: 1 },
            Event::ServicesActivated,
            Event::LockLost { reason: "x".into() },
        ] {
            for a in m.handle(e) {
                if let Action::Broadcast { current, previous } = a {
                    broadcasts.push((current, previous));
                }
            }
        }
        assert_eq!(
            broadcasts,
            [
                (State::Passive, State::Passive),
                (State::Activating, State::Passive),
                (State::Active, State::Activating),
                (State::Passive, State::Active),
            ]
        );
    }

    // ---- property tests: two servers, one lock, random faults ----

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        /// Deliver a pending timer of server i.
        Timer(usize, Timer),
        /// The gateway becomes (un)reachable for server i.
        Gateway(usize, bool),
        /// The HA link goes up or down.
        Link(bool),
        /// The OS/NFS server drops server i's lock without telling it
        /// (a lease expiry): it still believes it holds it.
        LockExpires(usize),
        /// Server i's activation finishes (ok or not).
        Activation(usize, bool),
    }

    fn fault() -> impl Strategy<Value = Fault> {
        let i = 0usize..2;
        prop_oneof![
            (
                i.clone(),
                prop_oneof![
                    Just(Timer::LockRetry),
                    Just(Timer::LockVerify),
                    Just(Timer::ActivationDeadline)
                ]
            )
                .prop_map(|(i, t)| Fault::Timer(i, t)),
            (i.clone(), any::<bool>()).prop_map(|(i, up)| Fault::Gateway(i, up)),
            any::<bool>().prop_map(Fault::Link),
            i.clone().prop_map(Fault::LockExpires),
            (i, any::<bool>()).prop_map(|(i, ok)| Fault::Activation(i, ok)),
        ]
    }

    /// Two machines and a simulated world: an exclusive lock, a link, and
    /// pending store activations.
    struct World {
        m: [Machine; 2],
        lock_holder: Option<usize>,
        epoch: u64,
        link: bool,
        activating: [bool; 2],
        checks: u64,
    }

    impl World {
        fn new() -> World {
            World {
                m: [
                    Machine::new(Role::Primary, T),
                    Machine::new(Role::Secondary, T),
                ],
                lock_holder: None,
                epoch: 0,
                link: false,
                activating: [false; 2],
                checks: 0,
            }
        }

        /// Delivers `event` to server `i` and carries out its actions,
        /// checking the invariants after every step.
        fn deliver(&mut self, i: usize, event: Event) {
            let mut queue = vec![(i, event)];
            while let Some((i, event)) = queue.pop() {
                let before = self.m[i].state();
                let gateway = self.m[i].gateway_reachable();
                let actions = self.m[i].handle(event);
                let after = self.m[i].state();
                // Never takes over without the gateway.
                if before == State::Passive && after == State::Activating {
                    assert!(gateway, "server {i} took over without reaching the gateway");
                }
                for a in actions {
                    match a {
                        Action::TryLock => {
                            let reply = match self.lock_holder {
                                None => {
                                    self.lock_holder = Some(i);
                                    self.epoch += 1;
                                    Event::LockAcquired { epoch: self.epoch }
                                }
                                Some(h) if h == i => Event::LockAcquired { epoch: self.epoch },
                                Some(_) => Event::LockBusy,
                            };
                            queue.push((i, reply));
                        }
                        Action::VerifyLock => {
                            let reply =
                                if self.lock_holder == Some(i) && self.m[i].epoch() == self.epoch {
                                    Event::LockVerified
                                } else {
                                    Event::LockLost {
                                        reason: "verification failed".into(),
                                    }
                                };
                            queue.push((i, reply));
                        }
                        Action::ReleaseLock => {
                            if self.lock_holder == Some(i) {
                                self.lock_holder = None;
                            }
                        }
                        Action::OpenStore => self.activating[i] = true,
                        Action::CloseStore => self.activating[i] = false,
                        Action::Broadcast { current, previous } => {
                            if self.link {
                                queue.push((1 - i, Event::PeerState { current, previous }));
                            }
                        }
                        Action::AcceptClients
                        | Action::RefuseClients
                        | Action::Schedule { .. }
                        | Action::Log(_) => {}
                    }
                }
                self.check();
            }
        }

        fn check(&mut self) {
            self.checks += 1;
            for (i, m) in self.m.iter().enumerate() {
                if matches!(m.state(), State::Active | State::Activating) {
                    assert!(
                        m.holds_lock(),
                        "server {i} is {} without believing it holds the lock",
                        m.state()
                    );
                }
            }
            let both = self.m.iter().all(|m| m.state() == State::Active);
            if both {
                assert!(
                    self.m.iter().all(Machine::holds_lock),
                    "two ACTIVE servers, not both believing they hold the lock"
                );
            }
        }

        fn apply(&mut self, f: Fault) {
            match f {
                Fault::Timer(i, t) => self.deliver(i, Event::Timer(t)),
                Fault::Gateway(i, up) => self.deliver(
                    i,
                    if up {
                        Event::GatewayReachable
                    } else {
                        Event::GatewayUnreachable
                    },
                ),
                Fault::Link(up) => {
                    if up != self.link {
                        self.link = up;
                        let e = if up { Event::LinkUp } else { Event::LinkDown };
                        self.deliver(0, e.clone());
                        self.deliver(1, e);
                    }
                }
                Fault::LockExpires(i) => {
                    if self.lock_holder == Some(i) {
                        self.lock_holder = None;
                    }
                }
                Fault::Activation(i, ok) => {
                    if self.activating[i] && self.m[i].state() == State::Activating {
                        let e = if ok {
                            Event::ServicesActivated
                        } else {
                            Event::ServicesFailed { reason: "x".into() }
                        };
                        self.deliver(i, e);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Never two ACTIVE servers unless each believes it holds the lock;
        /// a server that cannot reach the gateway never takes over; only a
        /// server believing it holds the lock is ACTIVATING/ACTIVE.
        #[test]
        fn safety_under_random_faults(faults in proptest::collection::vec(fault(), 1..80)) {
            let mut w = World::new();
            w.deliver(0, Event::Start);
            w.deliver(1, Event::Start);
            for f in faults {
                w.apply(f);
            }
            prop_assert!(w.checks > 0);
        }

        /// After both servers re-verify, at most one is ACTIVE: a stale
        /// belief (expired lock) lasts at most one verification interval.
        #[test]
        fn verification_resolves_double_active(faults in proptest::collection::vec(fault(), 1..80)) {
            let mut w = World::new();
            w.deliver(0, Event::Start);
            w.deliver(1, Event::Start);
            for f in faults {
                w.apply(f);
            }
            w.deliver(0, Event::Timer(Timer::LockVerify));
            w.deliver(1, Event::Timer(Timer::LockVerify));
            let active = w.m.iter().filter(|m| m.state() == State::Active).count();
            prop_assert!(active <= 1, "{active} ACTIVE servers after verification");
        }

        /// With a reachable gateway and the lock free, someone becomes
        /// ACTIVE once activations complete (liveness of the simple case).
        #[test]
        fn someone_takes_over_when_possible(first in 0usize..2) {
            let mut w = World::new();
            w.deliver(first, Event::GatewayReachable);
            w.deliver(first, Event::Start);
            w.deliver(1 - first, Event::GatewayReachable);
            w.deliver(1 - first, Event::Start);
            w.apply(Fault::Activation(first, true));
            prop_assert_eq!(w.m[first].state(), State::Active);
            prop_assert_eq!(w.m[1 - first].state(), State::Passive);
        }
    }
}
