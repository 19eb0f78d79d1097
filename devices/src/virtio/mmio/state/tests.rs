use std::sync::{Arc, Mutex};

use super::super::tests::{queues, setup, Dummy};
use super::*;
use crate::virtio::mmio::reg;
use crate::virtio::test_utils::*;
use crate::virtio::{GuestMemoryHandle, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use status::*;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << 3;

/// A transport whose driver set DRIVER_OK with both queues.
fn running() -> (Arc<Mutex<Dummy>>, MmioTransport) {
    let (dev, mut t) = setup();
    let qs = queues();
    assert_eq!(start(&mut t, FEATURES, &[&qs[0], &qs[1]]), 0xf);
    (dev, t)
}

fn refused(s: &TransportState) -> String {
    let (dev, mut t) = setup();
    let e = t.restore_state(s).expect_err("a bad state is refused");
    // Nothing changed.
    assert_eq!(t.status(), 0);
    assert_eq!(t.acked_features(), 0);
    assert!(!dev.lock().unwrap().is_activated());
    e.to_string()
}

#[test]
fn a_transport_that_is_not_running_round_trips_its_registers() {
    let (dev, mut t) = setup();
    negotiate(&mut t, FEATURES);
    queues()[0].setup(&mut t, 0);
    write_reg(&mut t, reg::QUEUE_SEL, 1);
    write_reg(&mut t, reg::QUEUE_NUM, 8);
    write_reg(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    t.interrupt().signal_config_change();
    let s = t.save_state().unwrap();
    assert_eq!(s.status, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!((s.driver_features, s.queue_sel), (FEATURES, 1));
    assert_eq!((s.interrupt_status, s.config_generation), (2, 1));
    assert!(s.queues[0].ready && !s.queues[1].ready);
    assert_eq!((s.queues[0].size, s.queues[1].size), (16, 8));
    assert_eq!(dev.lock().unwrap().resets, 0, "nothing was stopped");

    let (dev2, mut t2) = setup();
    t2.restore_state(&s).unwrap();
    assert_eq!(t2.save_state().unwrap(), s);
    assert!(!dev2.lock().unwrap().is_activated());
    assert_eq!(read_reg(&mut t2, reg::DEVICE_FEATURES), 1, "selector 1");
    assert_eq!(read_reg(&mut t2, reg::CONFIG_GENERATION), 1);
    assert_eq!(
        t2.interrupt_event().read().unwrap(),
        1,
        "pending bit signalled"
    );
    // The driver carries on where it was: DRIVER_OK starts the device.
    queues()[1].setup(&mut t2, 1);
    write_reg(&mut t2, reg::STATUS, 0xf);
    assert_eq!(dev2.lock().unwrap().activated, Some((2, FEATURES)));
}

#[test]
fn a_running_device_is_quiesced_and_a_fresh_one_continues_at_its_positions() {
    let (dev, mut t) = running();
    // The device has served some requests meanwhile.
    dev.lock().unwrap().queues[1].next_avail = 7;
    dev.lock().unwrap().queues[1].next_used = 5;
    t.interrupt().signal_used_queue();
    let _ = t.interrupt_event().read();
    let s = t.save_state().unwrap();
    assert!(!dev.lock().unwrap().is_activated(), "quiesced");
    assert_eq!(s.status, 0xf);
    assert_eq!((s.queues[1].next_avail, s.queues[1].next_used), (7, 5));
    assert!(s.queues[1].event_idx_enabled);
    assert_eq!(s.interrupt_status, INT_USED_RING);
    assert_eq!(t.save_state().unwrap(), s, "saving again gives the same");

    let (dev2, mut t2) = setup();
    t2.restore_state(&s).unwrap();
    let d = dev2.lock().unwrap();
    assert_eq!(d.activated, Some((2, FEATURES)));
    assert_eq!((d.queues[1].next_avail, d.queues[1].next_used), (7, 5));
    assert!(d.queues.iter().all(|q| q.event_idx_enabled && q.ready));
    assert_eq!(d.queues[0].desc_table, queues()[0].desc);
    // Every queue is kicked, the pending interrupt signalled again.
    assert!(d.evts.iter().all(|e| e.read().unwrap() == 1));
    assert_eq!(t2.interrupt_event().read().unwrap(), 1);
    assert_eq!(read_reg(&mut t2, reg::INTERRUPT_STATUS), INT_USED_RING);
}

#[test]
fn a_snapshot_that_does_not_stop_the_vm_restores_the_same_transport() {
    let (dev, mut t) = running();
    dev.lock().unwrap().queues[0].next_avail = 3;
    let s = t.save_state().unwrap();
    t.restore_state(&s).unwrap();
    let d = dev.lock().unwrap();
    assert_eq!(d.activated, Some((2, FEATURES)));
    assert_eq!(d.queues[0].next_avail, 3);
    assert_eq!(d.resets, 0, "quiesced, not reset");
    assert_eq!(t.status(), 0xf);
}

#[test]
fn restoring_onto_a_running_transport_stops_its_device_first() {
    let (_, mut t) = setup();
    let s = t.save_state().unwrap();
    let (dev, mut t2) = running();
    t2.restore_state(&s).unwrap();
    assert_eq!(t2.status(), 0);
    assert!(!dev.lock().unwrap().is_activated());
    assert_eq!(dev.lock().unwrap().resets, 1);
}

#[test]
fn a_state_of_another_device_or_with_features_not_offered_here_is_refused() {
    let (_, mut t) = running();
    let good = t.save_state().unwrap();

    let mut s = good.clone();
    s.device_id = 2;
    assert!(refused(&s).contains("id 2"), "{}", refused(&s));

    let mut s = good.clone();
    s.driver_features |= 1 << 5;
    let e = refused(&s);
    assert!(e.contains("does not offer") && e.contains("0x20"), "{e}");

    let mut s = good.clone();
    s.driver_features &= !VIRTIO_F_VERSION_1;
    assert!(refused(&s).contains("VERSION_1"));

    // Before FEATURES_OK the driver's features are not checked yet: the
    // FEATURES_OK write does that.
    let (_, mut t) = setup();
    write_reg(&mut t, reg::STATUS, ACKNOWLEDGE);
    write_reg(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    write_features(&mut t, VIRTIO_F_VERSION_1 | 1 << 5);
    let s = t.save_state().unwrap();
    let (_, mut t2) = setup();
    t2.restore_state(&s).unwrap();
    write_reg(&mut t2, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(t2.status(), ACKNOWLEDGE | DRIVER);
}

#[test]
fn a_corrupt_queue_status_or_interrupt_state_is_refused() {
    let (_, mut t) = running();
    let good = t.save_state().unwrap();
    let check = |f: &dyn Fn(&mut TransportState), want: &str| {
        let mut s = good.clone();
        f(&mut s);
        let e = refused(&s);
        assert!(e.contains(want), "{e:?} should say {want:?}");
        assert!(e.starts_with("virtio-mmio: "), "{e}");
    };
    check(&|s| s.queues[1].size = 64, "above this device's maximum 32");
    check(&|s| s.queues[0].size = 12, "queue 0");
    check(&|s| s.queues[0].size = 0, "queue 0");
    check(&|s| s.queues.push(SavedQueue::default()), "3 queues saved");
    check(&|s| s.queues.truncate(1), "1 queues saved");
    check(&|s| s.queues[0].desc_table = 0x1001, "queue 0");
    check(
        &|s| s.queues[1].used_ring = 0x4000_0000,
        "not inside guest memory",
    );
    check(&|s| s.status = DRIVER_OK, "not a valid device status");
    check(&|s| s.status = 0x1f, "not a valid device status");
    check(
        &|s| s.status |= DEVICE_NEEDS_RESET,
        "not a valid device status",
    );
    check(&|s| s.interrupt_status = 4, "unknown bits");
    check(
        &|s| {
            s.status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
            s.queues[0].next_avail = 1;
        },
        "not running",
    );
}

#[test]
fn a_running_state_without_guest_memory_is_refused() {
    let (_, mut t) = running();
    let s = t.save_state().unwrap();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    let mut t2 = MmioTransport::new(dev.clone(), GuestMemoryHandle::empty()).unwrap();
    let e = t2.restore_state(&s).unwrap_err();
    assert!(e.to_string().contains("no guest memory"), "{e}");
    assert_eq!(t2.status(), 0);
}

#[test]
fn a_failed_device_round_trips_with_needs_reset_and_its_pending_interrupt() {
    let dev = Arc::new(Mutex::new(Dummy::new()));
    let mut t = MmioTransport::new(dev.clone(), GuestMemoryHandle::empty()).unwrap();
    let qs = queues();
    let st = start(&mut t, FEATURES, &[&qs[0], &qs[1]]);
    assert_ne!(st & DEVICE_NEEDS_RESET, 0);
    let s = t.save_state().unwrap();
    let (dev2, mut t2) = setup();
    t2.restore_state(&s).unwrap();
    assert_eq!(t2.status(), st);
    assert!(!dev2.lock().unwrap().is_activated());
    assert_eq!(read_reg(&mut t2, reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(read_reg(&mut t2, reg::CONFIG_GENERATION), 1);
}

#[test]
fn transport_state_round_trips_through_json() {
    let (dev, mut t) = running();
    dev.lock().unwrap().queues[0].next_avail = 0xfffe;
    let s = t.save_state().unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: TransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    assert!(serde_json::from_str::<TransportState>("{\"device_id\":1}").is_err());
}
