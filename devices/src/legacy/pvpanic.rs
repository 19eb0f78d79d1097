//! pvpanic at I/O port 0x505 (ACPI `QEMU0001`).
//!
//! Reads return the events this device supports; a non-zero write is the
//! guest reporting them: bit 0 `PANICKED` (the kernel panicked), bit 1
//! `CRASH_LOADED` (it panicked and is booting a kdump kernel itself, so a
//! VMM should only report it and not reset). Each non-zero write becomes
//! `GuestEvent::Panic(value)` with the raw bits; zero is ignored.

use std::sync::Arc;

use super::fill_unclaimed;
use crate::{BusDevice, GuestEvent, GuestEventSink};

/// The conventional pvpanic port.
pub const PVPANIC_PORT: u64 = 0x505;
/// One port.
pub const PVPANIC_LEN: u64 = 1;
/// The guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest panicked with a crash kernel loaded.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What reads of the port return.
pub const PVPANIC_SUPPORTED: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

pub struct PvPanicDevice {
    events: Arc<dyn GuestEventSink>,
    reports: u64,
}

impl PvPanicDevice {
    pub fn new(events: Arc<dyn GuestEventSink>) -> Self {
        Self { events, reports: 0 }
    }

    /// How many panic reports the guest made.
    pub fn reports(&self) -> u64 {
        self.reports
    }
}

impl BusDevice for PvPanicDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, &mut *data) {
            (0, [b]) => *b = PVPANIC_SUPPORTED,
            _ => fill_unclaimed(data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, &[value]) = (offset, data) {
            if value != 0 {
                self.reports += 1;
                self.events.notify(GuestEvent::Panic(value));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::RecordingSink;

    fn dev() -> (PvPanicDevice, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (PvPanicDevice::new(sink.clone()), sink)
    }

    #[test]
    fn read_reports_supported_events() {
        let (mut d, _) = dev();
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b, [0x03]);
    }

    #[test]
    fn nonzero_write_reports_panic_with_its_bits() {
        let (mut d, sink) = dev();
        d.write(0, &[PVPANIC_PANICKED]);
        d.write(0, &[PVPANIC_CRASH_LOADED]);
        d.write(0, &[0x80]);
        assert_eq!(
            sink.take(),
            vec![
                GuestEvent::Panic(1),
                GuestEvent::Panic(2),
                GuestEvent::Panic(0x80)
            ]
        );
        assert_eq!(d.reports(), 3);
    }

    #[test]
    fn zero_and_bad_accesses_are_ignored() {
        let (mut d, sink) = dev();
        d.write(0, &[0]);
        d.write(0, &[1, 1]);
        d.write(0, &[]);
        d.write(1, &[1]);
        assert!(sink.take().is_empty());
        let mut two = [0u8; 2];
        d.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut one = [0u8];
        d.read(7, &mut one);
        assert_eq!(one, [0xff]);
        d.read(0, &mut []);
    }
}
