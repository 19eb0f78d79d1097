//! Unit tests of the virtio-mmio transport, and the [`Dummy`] device and
//! set-up helpers the transport's other test modules share.

use super::*;
use crate::state::StateError;
use crate::virtio::test_utils::*;
use crate::virtio::{ActivateError, GuestMemoryMmap, COMMON_FEATURES, VIRTIO_F_VERSION_1};
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
fn with_used_acks_absorbed_by_kvm_the_guest_reading_the_status_rearms_the_line() {
    let (_, mut t) = setup();
    t.interrupt().absorb_used_acks();
    // Raised once until the guest's handler reads the status...
    t.interrupt().signal_used_queue();
    t.interrupt().signal_used_queue();
    assert_eq!(t.interrupt_event().read().unwrap(), 1);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
    // ...whose acknowledgement KVM keeps: the bit stays set, and a
    // completion after the read raises the line again.
    t.interrupt().signal_used_queue();
    assert_eq!(t.interrupt_event().read().unwrap(), 1);
    assert_eq!(t.interrupt().pending(), 1);
    // `status` and snapshots read the bits without re-arming anything;
    // `status` shows the used bit only while the guest has not taken it.
    assert_eq!(t.interrupt().status(), 1);
    assert_eq!(t.interrupt().untaken(), 1);
    t.interrupt().signal_used_queue();
    assert!(t.interrupt_event().read().is_err());
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
    assert_eq!(t.interrupt().untaken(), 0);
    assert_eq!(t.interrupt().pending(), 1);
    // A config change still fires once until acknowledged (its
    // acknowledgement always reaches the VMM), and an acknowledgement of
    // both bits, which KVM does not keep, clears both.
    t.interrupt().signal_config_change();
    t.interrupt().signal_config_change();
    assert_eq!(t.interrupt_event().read().unwrap(), 1);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 3);
    write_reg(&mut t, reg::INTERRUPT_ACK, 3);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 0);
    // A reset clears the bit and re-arms the line.
    t.interrupt().signal_used_queue();
    write_reg(&mut t, reg::STATUS, 0);
    assert_eq!(t.interrupt().pending(), 0);
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
