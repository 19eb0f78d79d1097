//! The VM's power lifecycle as a pure state machine: the run state plus a
//! pending graceful stop, and for every input (a control request, the
//! guest resetting or powering off, the graceful-stop deadline) the list of
//! actions `vm.rs` carries out, in order. No KVM, no timers, no I/O here, so
//! every pair of inputs is unit-tested.
//!
//! The rule that matters to a customer: a pending `shutdown`/`reboot` is
//! settled by the next power action, whoever takes it, and its deadline
//! dies with it. A VM that was halted stays halted.
//!
//! While a snapshot's files are written (off the event loop, the guest
//! paused and its devices quiesced as captured) the machine is *held*:
//! every input that would boot, halt, pause or resume it is refused, so
//! nothing changes the machine under the writer, and the snapshot's own
//! end decides what runs next. A graceful `shutdown`/`reboot` is the one
//! exception: it only asks the guest (which sees the request when it runs
//! again), so it is taken, and `systemctl stop` during a snapshot still
//! shuts the guest down cleanly; its deadline waits for the end (`vm.rs`).

use std::fmt;

use protocol::{ResetCause, StopResult, VmState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    Shutdown,
    Reboot,
}

/// Something that may change the VM's power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// `start`.
    Start,
    /// A hard power-off (`poweroff`, a panic or watchdog policy).
    Poweroff,
    /// A hard reset (`reset`, a panic or watchdog policy).
    Reset(ResetCause),
    /// `pause`, or a panic/watchdog policy.
    Pause,
    /// `resume`.
    Resume,
    /// `shutdown`/`reboot`: ask the guest, force it at the deadline.
    Graceful(StopKind),
    /// The guest reset itself (keyboard controller, ACPI, triple fault).
    GuestReset(ResetCause),
    /// The guest powered itself off (ACPI S5).
    GuestPoweroff,
    /// The graceful-stop deadline passed.
    StopDeadline,
}

/// What `vm.rs` does, in the order given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Boot afresh (tearing down the running machine, if any). `None` is
    /// a power-on (`start`); `Some` records why the guest was reset.
    Boot(Option<ResetCause>),
    /// Tear the machine down: the VM is stopped.
    Halt,
    Pause,
    Resume,
    /// Ask the guest to stop (Ctrl-Alt-Del, plus the ACPI power button for
    /// a shutdown) and arm the deadline.
    AskGuest(StopKind),
    /// Answer the pending `shutdown`/`reboot` and disarm its deadline.
    Settle(StopResult),
}

/// Why a request cannot be carried out in this state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the VM is {0}, not stopped")]
    NotStopped(VmState),
    #[error("the VM is {0}, not running")]
    NotRunning(VmState),
    #[error("the VM is {0}, not paused")]
    NotPaused(VmState),
    #[error("the VM is paused: resume it first")]
    Paused,
    #[error(
        "a snapshot of this VM is being written (the guest is paused meanwhile): \
         try again once it is answered"
    )]
    Held,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    state: VmState,
    pending: Option<StopKind>,
    /// A snapshot is being written: every input but a graceful stop's is
    /// refused.
    held: bool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pending {
            Some(k) => write!(f, "{} ({k:?} pending)", self.state)?,
            None => write!(f, "{}", self.state)?,
        }
        if self.held {
            write!(f, " (held)")?;
        }
        Ok(())
    }
}

impl Lifecycle {
    /// Before the first boot: stopped, nothing pending.
    pub fn new() -> Self {
        Lifecycle {
            state: VmState::Stopped,
            pending: None,
            held: false,
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn pending(&self) -> Option<StopKind> {
        self.pending
    }

    /// A boot failed (bad kernel, no memory): nothing runs.
    pub fn boot_failed(&mut self) {
        self.state = VmState::Stopped;
    }

    /// Holds the machine for a snapshot being written: from now until
    /// [`Lifecycle::release`], every input but a graceful stop's request is
    /// refused ([`Refusal::Held`]). Only a machine that runs or is paused
    /// can be held, and only once.
    pub fn hold(&mut self) -> Result<(), Refusal> {
        if self.held {
            return Err(Refusal::Held);
        }
        if self.state == VmState::Stopped {
            return Err(Refusal::NotRunning(self.state));
        }
        self.held = true;
        Ok(())
    }

    /// The snapshot is written (or failed): inputs are served again.
    pub fn release(&mut self) {
        self.held = false;
    }

    pub fn is_held(&self) -> bool {
        self.held
    }

    /// Decides what `input` does now. A refusal changes nothing.
    pub fn on(&mut self, input: Input) -> Result<Vec<Action>, Refusal> {
        use Action::*;
        if self.held && !matches!(input, Input::Graceful(_)) {
            return Err(Refusal::Held);
        }
        let state = self.state;
        let mut acts = Vec::new();
        // Settles a pending stop that `input` overrides.
        let supersede = |acts: &mut Vec<Action>, pending: &mut Option<StopKind>| {
            if pending.take().is_some() {
                acts.push(Settle(StopResult::Superseded));
            }
        };
        match input {
            Input::Start => {
                if state != VmState::Stopped {
                    return Err(Refusal::NotStopped(state));
                }
                supersede(&mut acts, &mut self.pending);
                acts.push(Boot(None));
                self.state = VmState::Running;
            }
            Input::Poweroff => {
                supersede(&mut acts, &mut self.pending);
                acts.push(Halt);
                self.state = VmState::Stopped;
            }
            Input::Reset(cause) => {
                supersede(&mut acts, &mut self.pending);
                acts.push(Boot(Some(cause)));
                self.state = VmState::Running;
            }
            Input::Pause => {
                if state != VmState::Running {
                    return Err(Refusal::NotRunning(state));
                }
                // A pending stop keeps its deadline: pausing is not an
                // answer to it, and the customer asked for the stop.
                acts.push(Pause);
                self.state = VmState::Paused;
            }
            Input::Resume => {
                if state != VmState::Paused {
                    return Err(Refusal::NotPaused(state));
                }
                acts.push(Resume);
                self.state = VmState::Running;
            }
            Input::Graceful(kind) => match state {
                VmState::Running => {
                    supersede(&mut acts, &mut self.pending);
                    acts.push(AskGuest(kind));
                    self.pending = Some(kind);
                }
                VmState::Paused => return Err(Refusal::Paused),
                VmState::Stopped => return Err(Refusal::NotRunning(state)),
            },
            Input::GuestReset(cause) => {
                if state == VmState::Stopped {
                    return Ok(acts); // from a machine that is gone
                }
                match self.pending.take() {
                    // Ctrl-Alt-Del means reboot to most inits: we asked
                    // for a shutdown, so the VM stops here.
                    Some(StopKind::Shutdown) => {
                        acts.extend([Halt, Settle(StopResult::Graceful)]);
                        self.state = VmState::Stopped;
                    }
                    Some(StopKind::Reboot) => {
                        acts.extend([Boot(Some(ResetCause::Reboot)), Settle(StopResult::Graceful)]);
                        self.state = VmState::Running;
                    }
                    None => {
                        acts.push(Boot(Some(cause)));
                        self.state = VmState::Running;
                    }
                }
            }
            Input::GuestPoweroff => {
                if state == VmState::Stopped {
                    return Ok(acts);
                }
                match self.pending.take() {
                    // Asked to reboot, the guest powered off: boot it again.
                    Some(StopKind::Reboot) => {
                        acts.extend([Boot(Some(ResetCause::Reboot)), Settle(StopResult::Graceful)]);
                        self.state = VmState::Running;
                    }
                    Some(StopKind::Shutdown) => {
                        acts.extend([Halt, Settle(StopResult::Graceful)]);
                        self.state = VmState::Stopped;
                    }
                    None => {
                        acts.push(Halt);
                        self.state = VmState::Stopped;
                    }
                }
            }
            Input::StopDeadline => match self.pending.take() {
                // A deadline nobody waits for any more: nothing happens.
                None => {}
                Some(StopKind::Shutdown) => {
                    acts.extend([Halt, Settle(StopResult::Forced)]);
                    self.state = VmState::Stopped;
                }
                Some(StopKind::Reboot) => {
                    acts.extend([
                        Boot(Some(ResetCause::RebootTimeout)),
                        Settle(StopResult::Forced),
                    ]);
                    self.state = VmState::Running;
                }
            },
        }
        Ok(acts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    const ALL_STATES: [VmState; 3] = [VmState::Running, VmState::Paused, VmState::Stopped];
    const ALL_PENDING: [Option<StopKind>; 3] =
        [None, Some(StopKind::Shutdown), Some(StopKind::Reboot)];

    fn all_inputs() -> Vec<Input> {
        vec![
            Input::Start,
            Input::Poweroff,
            Input::Reset(ResetCause::Command),
            Input::Pause,
            Input::Resume,
            Input::Graceful(StopKind::Shutdown),
            Input::Graceful(StopKind::Reboot),
            Input::GuestReset(ResetCause::Guest),
            Input::GuestPoweroff,
            Input::StopDeadline,
        ]
    }

    fn at(state: VmState, pending: Option<StopKind>) -> Lifecycle {
        Lifecycle {
            state,
            pending,
            held: false,
        }
    }

    fn running() -> Lifecycle {
        at(VmState::Running, None)
    }

    #[test]
    fn a_halted_vm_stays_halted_when_the_reboot_it_superseded_would_have_timed_out() {
        let mut l = running();
        assert_eq!(
            l.on(Input::Graceful(StopKind::Reboot)),
            Ok(vec![AskGuest(StopKind::Reboot)])
        );
        assert_eq!(
            l.on(Input::Poweroff),
            Ok(vec![Settle(StopResult::Superseded), Halt])
        );
        assert_eq!(l.on(Input::StopDeadline), Ok(vec![]));
        assert_eq!(l.state(), VmState::Stopped);
    }

    #[test]
    fn a_started_vm_is_not_powered_off_by_the_deadline_of_an_earlier_shutdown() {
        let mut l = running();
        l.on(Input::Graceful(StopKind::Shutdown)).unwrap();
        l.on(Input::Poweroff).unwrap();
        assert_eq!(l.on(Input::Start), Ok(vec![Boot(None)]));
        assert_eq!(l.on(Input::StopDeadline), Ok(vec![]));
        assert_eq!(l.state(), VmState::Running);
    }

    #[test]
    fn a_guest_that_complies_settles_the_stop_gracefully() {
        let mut l = running();
        l.on(Input::Graceful(StopKind::Shutdown)).unwrap();
        assert_eq!(
            l.on(Input::GuestPoweroff),
            Ok(vec![Halt, Settle(StopResult::Graceful)])
        );
        let mut l = running();
        l.on(Input::Graceful(StopKind::Reboot)).unwrap();
        assert_eq!(
            l.on(Input::GuestReset(ResetCause::Guest)),
            Ok(vec![
                Boot(Some(ResetCause::Reboot)),
                Settle(StopResult::Graceful)
            ])
        );
        assert_eq!(l.pending(), None);
    }

    #[test]
    fn an_init_that_reboots_on_ctrl_alt_del_is_stopped_when_a_shutdown_was_asked() {
        let mut l = running();
        l.on(Input::Graceful(StopKind::Shutdown)).unwrap();
        assert_eq!(
            l.on(Input::GuestReset(ResetCause::Guest)),
            Ok(vec![Halt, Settle(StopResult::Graceful)])
        );
        assert_eq!(l.state(), VmState::Stopped);
    }

    #[test]
    fn a_guest_that_ignores_the_request_is_forced_at_the_deadline() {
        let mut l = running();
        l.on(Input::Graceful(StopKind::Shutdown)).unwrap();
        assert_eq!(
            l.on(Input::StopDeadline),
            Ok(vec![Halt, Settle(StopResult::Forced)])
        );
        assert_eq!(l.state(), VmState::Stopped);
        let mut l = running();
        l.on(Input::Graceful(StopKind::Reboot)).unwrap();
        assert_eq!(
            l.on(Input::StopDeadline),
            Ok(vec![
                Boot(Some(ResetCause::RebootTimeout)),
                Settle(StopResult::Forced)
            ])
        );
        assert_eq!(l.state(), VmState::Running);
    }

    #[test]
    fn a_new_shutdown_replaces_a_pending_reboot() {
        let mut l = running();
        l.on(Input::Graceful(StopKind::Reboot)).unwrap();
        assert_eq!(
            l.on(Input::Graceful(StopKind::Shutdown)),
            Ok(vec![
                Settle(StopResult::Superseded),
                AskGuest(StopKind::Shutdown)
            ])
        );
        assert_eq!(l.pending(), Some(StopKind::Shutdown));
    }

    #[test]
    fn requests_that_do_not_fit_the_state_are_refused_and_change_nothing() {
        for (state, input, refusal) in [
            (
                VmState::Running,
                Input::Start,
                Refusal::NotStopped(VmState::Running),
            ),
            (
                VmState::Paused,
                Input::Start,
                Refusal::NotStopped(VmState::Paused),
            ),
            (
                VmState::Paused,
                Input::Pause,
                Refusal::NotRunning(VmState::Paused),
            ),
            (
                VmState::Stopped,
                Input::Pause,
                Refusal::NotRunning(VmState::Stopped),
            ),
            (
                VmState::Running,
                Input::Resume,
                Refusal::NotPaused(VmState::Running),
            ),
            (
                VmState::Stopped,
                Input::Resume,
                Refusal::NotPaused(VmState::Stopped),
            ),
            (
                VmState::Paused,
                Input::Graceful(StopKind::Shutdown),
                Refusal::Paused,
            ),
            (
                VmState::Stopped,
                Input::Graceful(StopKind::Reboot),
                Refusal::NotRunning(VmState::Stopped),
            ),
        ] {
            let mut l = at(state, None);
            assert_eq!(l.on(input), Err(refusal), "{input:?} in {state}");
            assert_eq!(l, at(state, None), "{input:?} in {state} changed the state");
        }
    }

    #[test]
    fn a_held_machine_refuses_every_power_input_unchanged_and_serves_them_again_once_released() {
        for state in [VmState::Running, VmState::Paused] {
            for pending in ALL_PENDING {
                let mut l = at(state, pending);
                assert_eq!(l.hold(), Ok(()));
                assert_eq!(l.hold(), Err(Refusal::Held), "held once only");
                let held = l;
                for input in all_inputs() {
                    if matches!(input, Input::Graceful(_)) {
                        continue;
                    }
                    assert_eq!(l.on(input), Err(Refusal::Held), "{input:?} in {held}");
                    assert_eq!(l, held, "{input:?} changed {held}");
                }
                l.release();
                assert_eq!(l, at(state, pending), "released as it was");
                // What it refused is served now, as on a machine never held.
                for input in all_inputs() {
                    let (mut a, mut b) = (l, at(state, pending));
                    assert_eq!(a.on(input), b.on(input), "{input:?}");
                }
            }
        }
    }

    #[test]
    fn a_graceful_stop_asked_while_held_asks_the_guest_as_on_a_machine_never_held() {
        for state in [VmState::Running, VmState::Paused] {
            for pending in ALL_PENDING {
                for kind in [StopKind::Shutdown, StopKind::Reboot] {
                    let mut held = at(state, pending);
                    held.hold().unwrap();
                    let mut free = at(state, pending);
                    let input = Input::Graceful(kind);
                    assert_eq!(held.on(input), free.on(input), "{input:?} in {free}");
                    assert!(held.is_held(), "still held");
                    held.release();
                    assert_eq!(held, free, "{input:?}");
                }
            }
        }
        // Its deadline, when it falls while held, waits (`vm.rs` retries).
        let mut l = running();
        l.hold().unwrap();
        l.on(Input::Graceful(StopKind::Shutdown)).unwrap();
        assert_eq!(l.on(Input::StopDeadline), Err(Refusal::Held));
        l.release();
        assert_eq!(
            l.on(Input::StopDeadline),
            Ok(vec![Halt, Settle(StopResult::Forced)])
        );
    }

    #[test]
    fn a_stopped_machine_cannot_be_held() {
        let mut l = at(VmState::Stopped, None);
        assert_eq!(l.hold(), Err(Refusal::NotRunning(VmState::Stopped)));
        assert!(!l.is_held());
        assert_eq!(l.on(Input::Start), Ok(vec![Boot(None)]));
    }

    /// Every input in every reachable state, then every second input:
    /// the invariants that make the lifecycle safe to reason about.
    #[test]
    fn every_pair_of_inputs_keeps_the_lifecycle_invariants() {
        for state in ALL_STATES {
            for pending in ALL_PENDING {
                // A pending stop exists only while a machine exists.
                if state == VmState::Stopped && pending.is_some() {
                    continue;
                }
                for first in all_inputs() {
                    for second in all_inputs() {
                        let mut l = at(state, pending);
                        for input in [first, second] {
                            let before = l;
                            let Ok(acts) = l.on(input) else {
                                assert_eq!(l, before, "a refusal changed {before} on {input:?}");
                                continue;
                            };
                            check(before, input, &acts, l);
                        }
                    }
                }
            }
        }
    }

    fn check(before: Lifecycle, input: Input, acts: &[Action], after: Lifecycle) {
        let ctx = format!("{before} + {input:?} -> {acts:?} -> {after}");
        let settles = acts.iter().filter(|a| matches!(a, Settle(_))).count();
        // Each pending request is answered exactly once, and only then.
        let answered = before.pending.is_some() && after.pending != before.pending
            || before.pending.is_some() && acts.iter().any(|a| matches!(a, AskGuest(_)));
        assert_eq!(settles, usize::from(answered), "{ctx}");
        // Nothing pends on a stopped VM: no deadline can wake it up.
        if after.state == VmState::Stopped {
            assert_eq!(after.pending, None, "{ctx}");
        }
        // The actions end in the state the lifecycle reports.
        let last_power = acts.iter().rev().find_map(|a| match a {
            Boot(_) | Resume => Some(VmState::Running),
            Halt => Some(VmState::Stopped),
            Pause => Some(VmState::Paused),
            _ => None,
        });
        assert_eq!(last_power.unwrap_or(before.state), after.state, "{ctx}");
        // A deadline alone never starts a VM that is stopped.
        if input == Input::StopDeadline && before.state == VmState::Stopped {
            assert!(acts.is_empty(), "{ctx}");
        }
        // Only requests start a stopped VM.
        if before.state == VmState::Stopped && after.state != VmState::Stopped {
            assert!(matches!(input, Input::Start | Input::Reset(_)), "{ctx}");
        }
    }
}
