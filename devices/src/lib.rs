//! Device emulation for the VMM. Register-level state machines here know
//! nothing about KVM; the `vmm` crate wires them to buses, irqfds and the
//! event loop.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod state;
pub mod virtio;

pub use bus::{Bus, BusDevice};

/// Why a guest restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// 0xFE written to the i8042 command port.
    I8042,
    /// The ACPI reset register (FADT) was written.
    AcpiReset,
    /// The vCPU triple-faulted (KVM shutdown exit).
    TripleFault,
    /// The watchdog expired with action reset.
    Watchdog,
    /// The guest panicked (pvpanic) with action reset.
    Panic,
    /// The operator or customer asked for it.
    Request,
}

/// Something a device tells the VMM that changes the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    Reset(ResetCause),
    /// ACPI S5 through the FADT sleep control register.
    PowerOff,
    /// pvpanic: the guest kernel reported a panic (the bits written).
    Panic(u8),
    /// The hardware watchdog ran out.
    WatchdogExpired,
}

/// Where devices send `GuestEvent`s. The VMM's implementation wakes its
/// event loop; tests record them.
pub trait GuestEventSink: Send + Sync {
    fn notify(&self, event: GuestEvent);
}
