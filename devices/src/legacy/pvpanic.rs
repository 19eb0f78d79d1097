//! pvpanic at I/O port 0x505 (ACPI `QEMU0001`).
//!
//! Reads return the events this device supports; a non-zero write is the
//! guest reporting them: bit 0 `PANICKED` (the kernel panicked), bit 1
//! `CRASH_LOADED` (it panicked and is booting a kdump kernel itself, so a
//! VMM should only report it and not reset). Each non-zero write becomes
//! `GuestEvent::Panic(value)` with the raw bits; zero is ignored.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fill_unclaimed;
use crate::state::StateError;
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

/// The device's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvPanicState {
    /// The events the port advertised ([`PVPANIC_SUPPORTED`]). The guest
    /// driver read them once at probe time and will keep writing those
    /// bits, so a device advertising different ones cannot take over.
    pub supported: u8,
    /// Panic reports the guest made so far (kept monotonic).
    pub reports: u64,
}

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

    pub fn save_state(&self) -> PvPanicState {
        PvPanicState {
            supported: PVPANIC_SUPPORTED,
            reports: self.reports,
        }
    }

    /// Takes `s` if it was saved from a device advertising the same events;
    /// on error nothing changes.
    pub fn restore_state(&mut self, s: &PvPanicState) -> Result<(), StateError> {
        if s.supported != PVPANIC_SUPPORTED {
            return Err(StateError::new(
                "pvpanic",
                format!(
                    "the guest was shown events {:#04x}, this device supports {PVPANIC_SUPPORTED:#04x}",
                    s.supported
                ),
            ));
        }
        self.reports = s.reports;
        Ok(())
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
#[allow(clippy::unwrap_used)]
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

    #[test]
    fn restored_pvpanic_keeps_counting_reports_and_reads_the_same() {
        let (mut a, _) = dev();
        a.write(0, &[PVPANIC_PANICKED]);
        a.write(0, &[PVPANIC_CRASH_LOADED]);
        let saved = a.save_state();
        let (mut b, sink) = dev();
        assert_eq!(b.restore_state(&saved).map_err(|e| e.to_string()), Ok(()));
        assert_eq!(b.reports(), 2);
        assert!(sink.take().is_empty(), "restoring reports nothing");
        let mut byte = [0u8];
        b.read(0, &mut byte);
        assert_eq!(byte, [PVPANIC_SUPPORTED]);
        b.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(sink.take(), vec![GuestEvent::Panic(PVPANIC_PANICKED)]);
        assert_eq!(b.reports(), 3);
    }

    #[test]
    fn pvpanic_state_with_other_events_is_refused() {
        let (mut d, _) = dev();
        d.write(0, &[PVPANIC_PANICKED]);
        for supported in [0, PVPANIC_PANICKED, 0xff] {
            let bad = PvPanicState {
                supported,
                reports: 9,
            };
            let err = d.restore_state(&bad).map_err(|e| e.device);
            assert_eq!(err, Err("pvpanic"));
            assert_eq!(d.reports(), 1, "unchanged");
        }
    }

    #[test]
    fn pvpanic_state_survives_a_json_round_trip() {
        let s = PvPanicState {
            supported: PVPANIC_SUPPORTED,
            reports: u64::MAX,
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(serde_json::from_str::<PvPanicState>(&json).ok(), Some(s));
    }
}
