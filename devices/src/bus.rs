//! Address buses: port I/O and MMIO ranges dispatched to devices.
//!
//! A `Bus` is built once per boot and then shared read-only between vCPU
//! threads; each device sits behind its own `Mutex`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus range. `offset` is relative to the start
/// of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Non-overlapping ranges of addresses, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= entry.len).then_some((offset, entry))
    }

    /// Reads from the device at `addr`. Returns false (and leaves `data`
    /// untouched) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if a previous holder panicked: device state stays
/// usable, a poisoned lock must not take the VMM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn reg(n: usize) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(Reg(vec![0; n])))
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let mut bus = Bus::new();
        bus.insert(reg(8), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [7]);
    }

    #[test]
    fn access_outside_or_straddling_a_range_misses() {
        let mut bus = Bus::new();
        bus.insert(reg(4), 0x100, 4).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0xff, &mut b[..1]));
        assert!(!bus.read(0x104, &mut b[..1]));
        assert!(!bus.read(0x103, &mut b));
    }

    #[test]
    fn overlapping_or_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(reg(4), 0x100, 4).unwrap();
        assert_eq!(
            bus.insert(reg(4), 0x102, 4),
            Err(BusError::Overlap {
                base: 0x102,
                len: 4
            })
        );
        assert_eq!(
            bus.insert(reg(4), 0xfe, 4),
            Err(BusError::Overlap { base: 0xfe, len: 4 })
        );
        assert!(bus.insert(reg(4), 0x104, 4).is_ok());
        assert!(bus.insert(reg(4), 0x200, 0).is_err());
        assert!(bus.insert(reg(4), u64::MAX, 2).is_err());
    }
}
