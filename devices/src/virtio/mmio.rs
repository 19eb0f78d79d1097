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

use super::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::{GuestMemoryHandle, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::{lock, BusDevice};

mod rings;
mod state;
pub use rings::{RingView, RingWatch};
pub use state::{SavedQueue, TransportState};

/// Size of one virtio-mmio device window on the bus.
pub const MMIO_SIZE: u64 = 0x200;
/// Offset of QueueNotify: register each queue's eventfd as an ioeventfd at
/// `base + NOTIFY_OFFSET`, 4 bytes, datamatch = queue index.
pub const NOTIFY_OFFSET: u64 = 0x50;
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

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if queue setup is allowed now (features
    /// negotiated, not yet running, queue not yet enabled).
    fn queue_for_setup(&mut self) -> Option<&mut Queue> {
        use status::*;
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            tracing::debug!(
                "virtio-mmio: queue setup in status {:#x} ignored",
                self.status
            );
            return None;
        }
        let q = self.queues.get_mut(self.queue_sel as usize)?;
        (!q.ready()).then_some(q)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length reads as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x} ignored");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                use status::*;
                if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    tracing::debug!(
                        "virtio-mmio: driver features write in status {:#x} ignored",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {
                        if v != 0 {
                            tracing::debug!(
                                "virtio-mmio: driver features page {} ignored",
                                self.driver_features_sel
                            );
                        }
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_for_setup() {
                    let size = u16::try_from(v).unwrap_or(0);
                    // An invalid size (0, not a power of two, above the
                    // maximum) is kept out; `is_valid` at DRIVER_OK catches
                    // a driver that never sets a valid one.
                    if q.try_set_size(size).is_err() {
                        tracing::debug!("virtio-mmio: invalid queue size {v}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    use status::*;
                    let setup = self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK;
                    if setup {
                        q.set_ready(v == 1);
                    }
                }
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue notify failed: {e}");
                    }
                }
                None => tracing::debug!("virtio-mmio: notify of queue {v} ignored"),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => {
                self.with_setup_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.with_setup_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.with_setup_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.with_setup_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.with_setup_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.with_setup_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            _ => tracing::debug!("virtio-mmio: write of register {offset:#x} ignored"),
        }
    }

    fn with_setup_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue_for_setup() {
            f(q);
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & VIRTIO_F_VERSION_1 != 0
            && self.driver_features & !self.device_features == 0
    }

    fn set_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            crate::limited!(
                info,
                "virtio-mmio: driver set FAILED (device id {})",
                self.device_id
            );
            self.status |= FAILED;
            return;
        }
        if v & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        // Apply the new bits one step at a time, in protocol order.
        for bit in [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK] {
            if v & bit == 0 || self.status & bit != 0 {
                continue;
            }
            let ok = match bit {
                ACKNOWLEDGE => self.status == 0,
                DRIVER => self.status == ACKNOWLEDGE,
                FEATURES_OK => {
                    let ok = self.status == ACKNOWLEDGE | DRIVER && self.features_acceptable();
                    if !ok {
                        crate::limited!(
                            warn,
                            "virtio-mmio: refusing FEATURES_OK for features {:#x} (device offers {:#x}, VERSION_1 is required)",
                            self.driver_features,
                            self.device_features
                        );
                    }
                    ok
                }
                _ => {
                    if self.status != ACKNOWLEDGE | DRIVER | FEATURES_OK {
                        false
                    } else if let Err(e) = self.activate() {
                        crate::limited!(
                            warn,
                            "virtio-mmio: device {} failed to start: {e}",
                            self.device_id
                        );
                        self.status |= DEVICE_NEEDS_RESET;
                        self.interrupt.signal_config_change();
                        return;
                    } else {
                        true
                    }
                }
            };
            if !ok {
                tracing::debug!("virtio-mmio: status {v:#x} from {:#x} ignored", self.status);
                return;
            }
            self.status |= bit;
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mem = self.mem.get().ok_or(ActivateError::NoMemory)?;
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            // A driver may leave queues unused (a multi-queue disk with
            // fewer CPUs than queues): those stay not ready, and each
            // device decides which it needs.
            if q.ready() && !q.is_valid(&*mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            let mut copy =
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(i))?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        let rings = mem.clone();
        lock(&self.device).activate(mem, queues, self.driver_features, self.interrupt.clone())?;
        self.rings.start(rings, event_idx, &self.queues);
        Ok(())
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
mod tests {
    use super::*;
    use crate::state::StateError;
    use crate::virtio::test_utils::*;
    use crate::virtio::{GuestMemoryMmap, COMMON_FEATURES};
    use status::*;
    use virtio_queue::QueueState;

    /// A device that records what the transport does to it.
    pub(super) struct Dummy {
        sizes: Vec<u16>,
        pub(super) evts: Vec<EventFd>,
        config: [u8; 8],
        pub(super) activated: Option<(usize, u64)>,
        /// The queues of the last activation.
        pub(super) queues: Vec<QueueState>,
        pub(super) resets: usize,
    }

    impl Dummy {
        pub(super) fn new() -> Self {
            Self {
                sizes: vec![16, 32],
                evts: crate::virtio::new_queue_events(2).unwrap(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activated: None,
                queues: Vec::new(),
                resets: 0,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn device_features(&self) -> u64 {
            COMMON_FEATURES | 1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            if let Some(dst) = self.config.get_mut(o..o + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: Arc<GuestMemoryMmap>,
            queues: Vec<Queue>,
            acked: u64,
            _interrupt: Interrupt,
        ) -> Result<(), ActivateError> {
            self.activated = Some((queues.len(), acked));
            self.queues = queues.iter().map(Queue::state).collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn quiesce(&mut self) -> Result<Vec<QueueState>, StateError> {
            Ok(match self.activated.take() {
                Some(_) => std::mem::take(&mut self.queues),
                None => Vec::new(),
            })
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
    }

    pub(super) fn setup() -> (Arc<Mutex<Dummy>>, MmioTransport) {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::new(dev.clone(), GuestMemoryHandle::new(guest_memory())).unwrap();
        (dev, t)
    }

    pub(super) fn queues() -> Vec<TestQueue> {
        vec![TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 32)]
    }

    #[test]
    fn identification_registers() {
        let (_, mut t) = setup();
        assert_eq!(read_reg(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(read_reg(&mut t, reg::VERSION), 2);
        assert_eq!(read_reg(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(read_reg(&mut t, reg::VENDOR_ID), 0);
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read_reg(&mut t, reg::DEVICE_FEATURES),
            (1 << 28) | (1 << 29) | (1 << 3)
        );
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), 1);
        write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(read_reg(&mut t, reg::DEVICE_FEATURES), 0);
        // Narrow accesses to registers read zero.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (dev, mut t) = setup();
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        write_features(&mut t, 1 << 3); // legacy driver: no VERSION_1
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read_reg(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // It cannot go on to DRIVER_OK either.
        write_reg(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(read_reg(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        assert!(!dev.lock().unwrap().is_activated());
    }

    #[test]
    fn features_ok_refused_for_unoffered_features() {
        let (_, mut t) = setup();
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        write_features(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read_reg(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        write_features(&mut t, VIRTIO_F_VERSION_1 | 1 << 3);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            read_reg(&mut t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1 | 1 << 3);
    }

    #[test]
    fn status_machine_follows_the_protocol_order() {
        let (dev, mut t) = setup();
        // Skipping ACKNOWLEDGE is ignored.
        write_reg(&mut t, reg::STATUS, DRIVER);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE);
        // DRIVER_OK before FEATURES_OK is ignored.
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER_OK);
        assert_eq!(read_reg(&mut t, reg::STATUS), ACKNOWLEDGE);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        // Clearing bits is ignored.
        write_reg(&mut t, reg::STATUS, DRIVER);
        assert_eq!(read_reg(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // Driver features are only taken in the DRIVER state.
        write_features(&mut t, VIRTIO_F_VERSION_1);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            read_reg(&mut t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        write_features(&mut t, VIRTIO_F_VERSION_1 | 1 << 3);
        assert_eq!(t.acked_features(), VIRTIO_F_VERSION_1);
        let qs = queues();
        for (i, q) in qs.iter().enumerate() {
            q.setup(&mut t, i as u32);
        }
        write_reg(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            read_reg(&mut t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert_eq!(dev.lock().unwrap().activated, Some((2, VIRTIO_F_VERSION_1)));
        // Queue setup is frozen while running.
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 4);
        write_reg(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 1);
        // FAILED is recorded.
        write_reg(&mut t, reg::STATUS, FAILED);
        assert_ne!(read_reg(&mut t, reg::STATUS) & FAILED, 0);
        // Zero resets.
        write_reg(&mut t, reg::STATUS, 0);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0);
        assert!(!dev.lock().unwrap().is_activated());
        assert_eq!(t.acked_features(), 0);
    }

    #[test]
    fn bulk_status_write_steps_through_each_state() {
        let (dev, mut t) = setup();
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        write_features(&mut t, VIRTIO_F_VERSION_1);
        for (i, q) in queues().iter().enumerate() {
            // Queue setup before FEATURES_OK is ignored...
            q.setup(&mut t, i as u32);
        }
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        for (i, q) in queues().iter().enumerate() {
            q.setup(&mut t, i as u32);
        }
        write_reg(&mut t, reg::STATUS, 0xf);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0xf);
        assert!(dev.lock().unwrap().is_activated());
    }

    #[test]
    fn invalid_queue_fails_activation_with_needs_reset() {
        let (dev, mut t) = setup();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        queues()[0].setup(&mut t, 0);
        // Queue 1 placed outside guest memory.
        TestQueue::new(0x4000_0000, 32).setup(&mut t, 1);
        write_reg(&mut t, reg::STATUS, 0xf);
        let s = read_reg(&mut t, reg::STATUS);
        assert_eq!(s & DRIVER_OK, 0);
        assert_ne!(s & DEVICE_NEEDS_RESET, 0);
        assert_ne!(read_reg(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
        assert_eq!(read_reg(&mut t, reg::CONFIG_GENERATION), 1);
        assert!(!dev.lock().unwrap().is_activated());
        // A queue that was never enabled is not invalid: it is handed
        // over not ready, and the device decides (a multi-queue disk serves
        // the others, virtio-net refuses).
        write_reg(&mut t, reg::STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        queues()[0].setup(&mut t, 0);
        write_reg(&mut t, reg::STATUS, 0xf);
        assert_ne!(read_reg(&mut t, reg::STATUS) & DRIVER_OK, 0);
        assert!(dev.lock().unwrap().is_activated());
    }

    #[test]
    fn no_memory_fails_activation() {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let mut t = MmioTransport::new(dev.clone(), GuestMemoryHandle::empty()).unwrap();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        for (i, q) in queues().iter().enumerate() {
            q.setup(&mut t, i as u32);
        }
        write_reg(&mut t, reg::STATUS, 0xf);
        assert_ne!(read_reg(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_registers_and_invalid_selector() {
        let (_, mut t) = setup();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write_reg(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 32);
        write_reg(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        write_reg(&mut t, reg::QUEUE_READY, 1); // ignored, no panic
        write_reg(&mut t, reg::QUEUE_NUM, 8);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 7);
    }

    #[test]
    fn queue_notify_write_signals_the_queue_eventfd() {
        let (dev, mut t) = setup();
        write_reg(&mut t, reg::QUEUE_NOTIFY, 1);
        let d = dev.lock().unwrap();
        assert!(d.evts[0].read().is_err());
        assert_eq!(d.evts[1].read().unwrap(), 1);
        // The transport's copies are the same eventfds.
        t.queue_events()[0].write(3).unwrap();
        assert_eq!(d.evts[0].read().unwrap(), 3);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (_, mut t) = setup();
        t.interrupt().signal_used_queue();
        assert_eq!(t.interrupt_event().read().unwrap(), 1);
        // A second signal while pending does not re-fire the irqfd.
        t.interrupt().signal_used_queue();
        assert!(t.interrupt_event().read().is_err());
        t.interrupt().signal_config_change();
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 3);
        write_reg(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 2);
        write_reg(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
        t.interrupt().signal_used_queue();
        assert_eq!(t.interrupt_event().read().unwrap(), 2);
    }

    #[test]
    fn while_another_writer_raises_the_irqfd_the_used_bit_reads_set_through_acks() {
        let (_, mut t) = setup();
        let direct = t.interrupt().direct_used();
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
        // Nothing the VMM raised: `status` and a snapshot see none.
        assert_eq!(t.interrupt().pending(), 0);
        write_reg(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
        // The VMM's own signals still go through: a config change shows
        // with it and is acknowledged on its own.
        t.interrupt().signal_config_change();
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 3);
        write_reg(&mut t, reg::INTERRUPT_ACK, 3);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
        // Its end sets the bit for real and raises the irqfd: an interrupt
        // the other writer raised last is not ignored by the guest.
        let _ = t.interrupt_event().read();
        drop(direct);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
        assert_eq!(t.interrupt_event().read().unwrap(), 1);
        write_reg(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn config_space_is_at_0x100_with_any_width() {
        let (dev, mut t) = setup();
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        let mut w = [0u8; 4];
        t.read(0x106, &mut w);
        assert_eq!(w, [7, 8, 0, 0]);
        t.write(0x100, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 9);
    }

    #[test]
    fn reset_clears_queues_and_interrupts() {
        let (dev, mut t) = setup();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        write_reg(&mut t, reg::QUEUE_NUM, 8);
        for (i, q) in queues().iter().enumerate() {
            q.setup(&mut t, i as u32);
        }
        write_reg(&mut t, reg::STATUS, 0xf);
        t.interrupt().signal_used_queue();
        write_reg(&mut t, reg::QUEUE_SEL, 1);
        write_reg(&mut t, reg::STATUS, 0);
        assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        for i in 0..2 {
            write_reg(&mut t, reg::QUEUE_SEL, i);
            assert_eq!(read_reg(&mut t, reg::QUEUE_READY), 0);
        }
        // Selector and features are back to their initial values.
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 32);
        write_reg(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read_reg(&mut t, reg::QUEUE_NUM_MAX), 16);
        assert_eq!(t.acked_features(), 0);
    }
}
