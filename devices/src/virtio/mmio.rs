//! The virtio-mmio transport, version 2 (virtio 1.x), as a [`BusDevice`].
//!
//! Register layout (offsets within the device's [`MMIO_SIZE`] window); all
//! registers below 0x100 are 32-bit and other access widths are ignored
//! (reads return zeros):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000 | MagicValue `"virt"` | R |
//! | 0x004 | Version (2) | R |
//! | 0x008 | DeviceID | R |
//! | 0x00c | VendorID | R |
//! | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
//! | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
//! | 0x030 | QueueSel | W |
//! | 0x034 | QueueNumMax | R |
//! | 0x038 | QueueNum | W |
//! | 0x044 | QueueReady | RW |
//! | 0x050 | QueueNotify | W |
//! | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
//! | 0x070 | Status | RW |
//! | 0x080.. 0x0a4 | QueueDesc/Driver/Device Low/High | W |
//! | 0x0fc | ConfigGeneration | R |
//! | 0x100.. | device config space | RW |
//!
//! Status follows ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK; a write
//! that skips a step or clears bits is ignored (and logged). FEATURES_OK is
//! refused (left clear, so the driver sees it missing when it reads the
//! status back) unless the driver accepted `VIRTIO_F_VERSION_1` and nothing
//! the device did not offer. DRIVER_OK validates every queue
//! (`Queue::is_valid` against the current guest memory) and activates the
//! device; on failure the status gets DEVICE_NEEDS_RESET and a config-change
//! interrupt. Writing 0 resets the device, the queues and the interrupt
//! status. FAILED is recorded.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemoryHandle, Interrupt, VirtioDevice};
use crate::bus::{lock, BusDevice};

mod lifecycle;
mod registers;
mod rings;
mod state;
pub use rings::{RingView, RingWatch};
pub use state::{SavedQueue, TransportState};

/// Size of one virtio-mmio device window on the bus.
pub const MMIO_SIZE: u64 = 0x200;
/// Offset of QueueNotify: register each queue's eventfd as an ioeventfd at
/// `base + NOTIFY_OFFSET`, 4 bytes, datamatch = queue index.
pub const NOTIFY_OFFSET: u64 = 0x50;
/// Offset of InterruptACK: register [`Interrupt::ack_event`](super::Interrupt::ack_event)
/// there, 4 bytes, datamatch = [`INT_USED_RING`](super::INT_USED_RING).
pub const ACK_OFFSET: u64 = reg::INTERRUPT_ACK;
/// Offset of the device config space.
pub const CONFIG_OFFSET: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryHandle,
    interrupt: Interrupt,
    /// Duplicates of the device's queue eventfds (same eventfd objects).
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_id: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    /// The running queues, for reports that must not wait for this lock.
    rings: RingWatch,
}

impl MmioTransport {
    /// Wraps `device`. Guest memory is read from `mem` at each DRIVER_OK.
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemoryHandle) -> io::Result<Self> {
        let (device_id, device_features, queues, queue_evts) = {
            let d = lock(&device);
            let sizes = d.queue_max_sizes();
            if sizes.len() != d.queue_events().len() {
                return Err(io::Error::other("device has a queue without an eventfd"));
            }
            let queues = sizes
                .iter()
                .map(|&s| Queue::new(s).map_err(|e| io::Error::other(e.to_string())))
                .collect::<io::Result<Vec<_>>>()?;
            let evts = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<io::Result<Vec<_>>>()?;
            (d.device_type(), d.device_features(), queues, evts)
        };
        Ok(Self {
            device,
            mem,
            interrupt: Interrupt::new()?,
            queue_evts,
            queues,
            device_id,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            rings: RingWatch::default(),
        })
    }

    /// One eventfd per queue, in queue order: register each as an ioeventfd
    /// at `base + NOTIFY_OFFSET` with datamatch = its index (u32).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd to register as the device's KVM irqfd.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// The interrupt state (status bits, config generation).
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The running queues' rings, shared (see [`RingWatch`]).
    pub fn rings(&self) -> RingWatch {
        self.rings.clone()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// Resets device, queues and interrupt state, as a guest write of 0 to
    /// Status does. The VMM calls this on every guest reset.
    pub fn reset(&mut self) {
        self.rings.stop();
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let v = if data.len() == 4 && offset & 3 == 0 {
            self.read_reg(offset)
        } else {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            0
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data.fill(0);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset & 3 == 0 {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests;
