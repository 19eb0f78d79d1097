//! Small enums shared by requests, responses and events.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Error of the `FromStr` implementations: names the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{value}': expected one of {expected}")]
pub struct ParseEnumError {
    /// What was being parsed ("watchdog action", ...).
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted values, comma separated.
    pub expected: &'static str,
}

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $wire)] $variant ),+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The accepted wire names, comma separated (for messages and help texts).
            pub const NAMES: &'static str = wire_enum!(@join $($wire),+);

            /// The name used on the wire and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(ParseEnumError {
                        what: $what,
                        value: s.to_string(),
                        expected: Self::NAMES,
                    }),
                }
            }
        }
    };
    (@join $first:literal $(, $rest:literal)*) => {
        concat!($first $(, ", ", $rest)*)
    };
}

wire_enum! {
    /// Run state of the VM as reported by `status` and `state_changed` events.
    VmState, "VM state" {
        /// vCPUs are running the guest.
        Running => "running",
        /// The guest is frozen (by `pause`, a watchdog or panic action); `resume` continues it.
        Paused => "paused",
        /// No guest is running; the VMM process is alive and `start` boots the guest again.
        Stopped => "stopped",
    }
}

wire_enum! {
    /// Why the guest was (re)booted.
    ResetCause, "reset cause" {
        /// The `reset` command (hard reset).
        Command => "command",
        /// The `reboot` command: the guest rebooted itself after the request.
        Reboot => "reboot",
        /// The `reboot` command: the guest did not reboot in time and was reset.
        RebootTimeout => "reboot_timeout",
        /// The guest asked for a reboot (i8042 reset line, ACPI reset register).
        Guest => "guest",
        /// The guest triple-faulted (KVM shutdown exit).
        TripleFault => "triple_fault",
        /// The watchdog expired with action `reset`.
        Watchdog => "watchdog",
        /// The guest panicked (pvpanic) with panic action `reset`.
        Panic => "panic",
    }
}

wire_enum! {
    /// What the VMM does when the watchdog expires (`--watchdog action=...`, `set-watchdog`).
    #[derive(Default)]
    WatchdogAction, "watchdog action" {
        /// Hard reset of the guest (default).
        #[default]
        Reset => "reset",
        /// Hard power-off: the VM goes to `stopped`.
        Poweroff => "poweroff",
        /// Pause the VM for inspection.
        Pause => "pause",
        /// Graceful shutdown request, hard power-off after the timeout.
        Shutdown => "shutdown",
        /// Only the event (and alert hook); the guest keeps running.
        None => "none",
    }
}

wire_enum! {
    /// What the VMM does when the guest panics (`--on-panic`).
    #[derive(Default)]
    PanicAction, "panic action" {
        /// Hard reset of the guest (default).
        #[default]
        Reset => "reset",
        /// Pause the VM, keeping its state for inspection.
        Pause => "pause",
        /// Hard power-off: the VM goes to `stopped`.
        Poweroff => "poweroff",
        /// Only the event (and alert hook).
        None => "none",
    }
}

wire_enum! {
    /// How a live migration moves the VM's disks (`migrate`'s `disks`).
    #[derive(Default)]
    DiskMigration, "disk migration" {
        /// Both hosts open the same images (shared storage); nothing is copied.
        #[default]
        Shared => "shared",
        /// Every writable disk is copied into the target's own image while the guest runs.
        Copy => "copy",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_through_from_str_and_serde() {
        for a in WatchdogAction::ALL {
            assert_eq!(a.as_str().parse::<WatchdogAction>().unwrap(), *a);
            let json = serde_json::to_string(a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
            assert_eq!(serde_json::from_str::<WatchdogAction>(&json).unwrap(), *a);
        }
        for a in PanicAction::ALL {
            assert_eq!(a.as_str().parse::<PanicAction>().unwrap(), *a);
        }
        for s in VmState::ALL {
            assert_eq!(s.to_string().parse::<VmState>().unwrap(), *s);
        }
        for c in ResetCause::ALL {
            assert_eq!(c.to_string().parse::<ResetCause>().unwrap(), *c);
        }
    }

    #[test]
    fn unknown_enum_value_error_lists_accepted_values() {
        let err = "explode".parse::<WatchdogAction>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid watchdog action 'explode': expected one of reset, poweroff, pause, shutdown, none"
        );
    }

    #[test]
    fn defaults_are_reset() {
        assert_eq!(WatchdogAction::default(), WatchdogAction::Reset);
        assert_eq!(PanicAction::default(), PanicAction::Reset);
    }
}
