//! Legacy PC devices on the port I/O bus: the COM1 8250 UART, an i8042
//! keyboard controller (reset and Ctrl-Alt-Del), the ib700 watchdog,
//! pvpanic and the hardware-reduced ACPI power-management registers.
//!
//! Each device is a register-level state machine with no knowledge of KVM;
//! it implements [`BusDevice`](crate::BusDevice) so the VMM can insert it on
//! the PIO bus at the base and length given by the module's constants.
//! Interrupts leave through an [`EventFdTrigger`] that the VMM registers as a
//! KVM irqfd; VM-wide events go to a [`GuestEventSink`](crate::GuestEventSink).
//!
//! Conventions shared by all of them:
//! - Every register is one byte wide. Accesses of any other size are ignored:
//!   writes have no effect and reads return all ones (`0xff` in every byte),
//!   like an unclaimed ISA port.
//! - Nothing the guest writes can panic the VMM; guest-driven oddities are
//!   logged at `debug`/`trace` level only, so a guest cannot flood the log.
//! - Snapshots: each device has `save_state` / `restore_state` with its own
//!   serde state type (see [`crate::state`]); host-side plumbing (interrupt
//!   lines, event sinks, writers, hooks) is never part of it.

pub mod acpi_pm;
pub mod i8042;
pub mod ib700;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::{AcpiPmDevice, AcpiPmState};
pub use i8042::{I8042Device, I8042Error, I8042Port, I8042State};
pub use ib700::{Ib700Device, Ib700State, Ib700Watchdog, WatchdogStatus};
pub use pvpanic::{PvPanicDevice, PvPanicState};
pub use serial::{SerialDevice, SerialState};

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The value every byte of an ignored read is set to.
pub(crate) const UNCLAIMED: u8 = 0xff;

/// Fills `data` as an unclaimed/invalid read.
pub(crate) fn fill_unclaimed(data: &mut [u8]) {
    data.fill(UNCLAIMED);
}

/// An interrupt line backed by an `EventFd`: each `trigger` adds 1 to the
/// counter. The VMM registers the same `EventFd` as a KVM irqfd for the
/// device's GSI (use [`EventFdTrigger::eventfd`]), so a trigger is one edge
/// on that line.
///
/// Cloning shares the same `EventFd` (no new file descriptor).
#[derive(Clone, Debug)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(Arc::new(evt))
    }

    /// The underlying `EventFd`, for `KVM_IRQFD` registration.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use super::EventFdTrigger;
    use crate::{GuestEvent, GuestEventSink};
    use vmm_sys_util::eventfd::EventFd;

    /// Records every event it is told about.
    #[derive(Default)]
    pub struct RecordingSink(Mutex<Vec<GuestEvent>>);

    impl RecordingSink {
        pub fn take(&self) -> Vec<GuestEvent> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl GuestEventSink for RecordingSink {
        fn notify(&self, event: GuestEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    /// A non-blocking trigger and a way to count how often it fired.
    pub fn irq() -> EventFdTrigger {
        EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap())
    }

    /// How many times `t` fired since the last call (0 when none).
    pub fn fired(t: &EventFdTrigger) -> u64 {
        t.eventfd().read().unwrap_or(0)
    }
}
