//! Events: `{"event":"<name>", ...fields, "vm":"<name>", "time":"<RFC 3339>"}` lines sent to
//! subscribed connections.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::time::rfc3339_millis;
use crate::types::{PanicAction, ResetCause, VmState, WatchdogAction};

/// What happened. The wire name is the `event` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `{"event":"state_changed","state":"paused","previous":"running"}`.
    StateChanged {
        /// New state.
        state: VmState,
        /// State before.
        previous: VmState,
    },
    /// `{"event":"reset","cause":"watchdog"}`: the guest is being rebooted inside the process.
    Reset {
        /// Why.
        cause: ResetCause,
    },
    /// `{"event":"boot","boot_count":2,"kernel":"mini"}`: a boot started.
    Boot {
        /// Boots since the VMM started, this one included.
        boot_count: u64,
        /// Kernel library entry being booted.
        kernel: String,
    },
    /// `{"event":"panic","action":"reset"}`: the guest reported a panic (pvpanic).
    Panic {
        /// The action the VMM takes.
        action: PanicAction,
    },
    /// `{"event":"watchdog","action":"reset","expiries":1}`: the watchdog expired.
    Watchdog {
        /// The action the VMM takes.
        action: WatchdogAction,
        /// Expiries since the VMM started, this one included.
        expiries: u64,
    },
    /// `{"event":"kernel_selected","kernel":"debian"}`: `set-kernel` chose the next kernel.
    KernelSelected {
        /// Kernel library entry for the next boot.
        kernel: String,
    },
    /// `{"event":"boot_failed","error":"no kernel ... in the disk's /boot ..."}`: a boot
    /// could not start (its kernel is missing or bad); the VM is stopped, and a
    /// `set-kernel` then `start` boots another.
    BootFailed {
        /// What went wrong, one line.
        error: String,
    },
    /// `{"event":"backup_started","disk":"disk0"}`: the instant a `backup` copies is now; its
    /// answer comes when the copy is complete. (Where the copy goes is the operator's: every
    /// subscriber, customers included, gets events.)
    BackupStarted {
        /// The disk (`disk0`...).
        disk: String,
    },
    /// `{"event":"restored","boot_count":3}`: this VMM continues a snapshot (`--restore`):
    /// the guest runs on in the boot it was in, not rebooted.
    Restored {
        /// The boot the snapshot was taken in.
        boot_count: u64,
    },
    /// `{"event":"migration","pass":2,"sent_bytes":..,"dirty_bytes":..}`: a live migration's
    /// copy pass ended (the guest runs meanwhile); `dirty_bytes` is what the guest wrote during
    /// it, which the next pass sends.
    Migration {
        /// Passes done (1: all memory).
        pass: u32,
        /// Bytes sent in that pass.
        sent_bytes: u64,
        /// Bytes written by the guest during it.
        dirty_bytes: u64,
        /// That pass's length, in milliseconds.
        pass_ms: u64,
        /// The vCPUs' throttle from this pass on, in percent of their time
        /// (`auto_converge`; absent: none).
        #[serde(default, skip_serializing_if = "crate::response::is_zero_u8")]
        throttle_pct: u8,
    },
}

impl Event {
    /// Every event name, in documentation order.
    pub const NAMES: &'static [&'static str] = &[
        "state_changed",
        "reset",
        "boot",
        "panic",
        "watchdog",
        "kernel_selected",
        "boot_failed",
        "backup_started",
        "restored",
        "migration",
    ];

    /// The wire name of this event.
    pub fn name(&self) -> &'static str {
        match self {
            Event::StateChanged { .. } => "state_changed",
            Event::Reset { .. } => "reset",
            Event::Boot { .. } => "boot",
            Event::Panic { .. } => "panic",
            Event::Watchdog { .. } => "watchdog",
            Event::KernelSelected { .. } => "kernel_selected",
            Event::BootFailed { .. } => "boot_failed",
            Event::BackupStarted { .. } => "backup_started",
            Event::Restored { .. } => "restored",
            Event::Migration { .. } => "migration",
        }
    }
}

/// An event as sent on the wire: the event, the VM's name and the time it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    /// What happened (flattened: `event` and its fields come first).
    #[serde(flatten)]
    pub event: Event,
    /// VM name.
    pub vm: String,
    /// UTC time, RFC 3339 with milliseconds (`2026-11-25T02:10:00.123Z`).
    pub time: String,
}

impl EventMessage {
    /// Stamps `event` with the VM name and the given time.
    pub fn new(vm: impl Into<String>, event: Event, time: SystemTime) -> Self {
        EventMessage {
            event,
            vm: vm.into(),
            time: rfc3339_millis(time),
        }
    }

    /// Stamps `event` with the VM name and the current time.
    pub fn now(vm: impl Into<String>, event: Event) -> Self {
        Self::new(vm, event, SystemTime::now())
    }

    /// The event line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self)
            // Plain data always serializes; keep the loop alive regardless.
            .unwrap_or_else(|_| format!("{{\"event\":\"{}\",\"vm\":\"?\"}}", self.event.name()));
        line.push('\n');
        line
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::client::{parse_response_line, ServerLine};
    use std::time::{Duration, UNIX_EPOCH};

    fn all_events() -> Vec<Event> {
        vec![
            Event::StateChanged {
                state: VmState::Paused,
                previous: VmState::Running,
            },
            Event::Reset {
                cause: ResetCause::Watchdog,
            },
            Event::Boot {
                boot_count: 2,
                kernel: "mini".into(),
            },
            Event::Panic {
                action: PanicAction::Reset,
            },
            Event::Watchdog {
                action: WatchdogAction::Reset,
                expiries: 3,
            },
            Event::KernelSelected {
                kernel: "debian".into(),
            },
            Event::BootFailed {
                error: "no kernel 6.1.0-1-amd64 in the disk's /boot".into(),
            },
            Event::BackupStarted {
                disk: "disk0".into(),
            },
            Event::Restored { boot_count: 3 },
            Event::Migration {
                pass: 2,
                sent_bytes: 1 << 28,
                dirty_bytes: 1 << 22,
                pass_ms: 3000,
                throttle_pct: 30,
            },
        ]
    }

    #[test]
    fn event_line_starts_with_its_name_and_ends_with_vm_and_time() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_832_999_250);
        let msg = EventMessage::new(
            "web1",
            Event::Watchdog {
                action: WatchdogAction::Reset,
                expiries: 1,
            },
            t,
        );
        assert_eq!(
            msg.to_line(),
            "{\"event\":\"watchdog\",\"action\":\"reset\",\"expiries\":1,\"vm\":\"web1\",\"time\":\"2026-11-28T02:29:59.250Z\"}\n"
        );
    }

    #[test]
    fn every_event_round_trips_and_is_named() {
        let names: Vec<_> = all_events().iter().map(|e| e.name()).collect();
        assert_eq!(names, Event::NAMES);
        for event in all_events() {
            let msg = EventMessage::now("vm-1", event.clone());
            let line = msg.to_line();
            assert!(
                line.starts_with(&format!("{{\"event\":\"{}\"", event.name())),
                "{line}"
            );
            match parse_response_line(&line).unwrap() {
                ServerLine::Event(back) => assert_eq!(back, msg),
                other => panic!("{other:?}"),
            }
        }
    }
}
