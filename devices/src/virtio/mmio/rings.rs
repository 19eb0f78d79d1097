//! Where each running queue stands, read from its rings in guest memory:
//! what `status` shows so that a stalled queue can be placed (the driver
//! posting no buffers, the device using none, or an interrupt the driver
//! never took) without a debugger on the guest or the VMM.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::bus::lock;
use crate::virtio::used::{avail_event_addr, used_event_addr};
use crate::virtio::GuestMemoryMmap;

/// One running queue's split-ring indices, as guest memory holds them at
/// the moment of reading (all wrap at 2^16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingView {
    /// The queue's index on the device.
    pub queue: u16,
    /// Descriptors in the ring (the driver's QueueNum).
    pub size: u16,
    /// The driver's avail index: buffers it has posted.
    pub avail_idx: u16,
    /// The device's used index: buffers it has returned.
    pub used_idx: u16,
    /// With `VIRTIO_RING_F_EVENT_IDX`: the driver wants an interrupt once
    /// the used index passes this (the avail ring's last slot).
    pub used_event: Option<u16>,
    /// With `VIRTIO_RING_F_EVENT_IDX`: the device wants a notification once
    /// the avail index passes this (the used ring's last slot).
    pub avail_event: Option<u16>,
}

/// The rings of a running device, as the transport started them: shared
/// with whoever reports them (`status`), so that reading them never waits
/// for the transport's lock, which an activation or a reset holds while it
/// waits for the device (a stalled disk's thread). Its own lock is held
/// only to copy the rings in or out, or to read a few indices.
#[derive(Clone, Default)]
pub struct RingWatch(Arc<Mutex<Option<Running>>>);

struct Running {
    mem: Arc<GuestMemoryMmap>,
    event_idx: bool,
    /// The queues the driver enabled, with their index on the device.
    queues: Vec<(u16, Queue)>,
}

fn read_u16<M: GuestMemory>(mem: &M, addr: Option<u64>) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(addr?))
        .ok()
        .map(u16::from_le)
}

fn view<M: GuestMemory>(i: u16, q: &Queue, mem: &M, event_idx: bool) -> Option<RingView> {
    Some(RingView {
        queue: i,
        size: q.size(),
        avail_idx: q.avail_idx(mem, Ordering::Acquire).ok()?.0,
        used_idx: q.used_idx(mem, Ordering::Acquire).ok()?.0,
        used_event: event_idx
            .then(|| read_u16(mem, used_event_addr(q)))
            .flatten(),
        avail_event: event_idx
            .then(|| read_u16(mem, avail_event_addr(q)))
            .flatten(),
    })
}

impl RingWatch {
    /// The device started (DRIVER_OK) with these queues.
    pub(super) fn start(&self, mem: Arc<GuestMemoryMmap>, event_idx: bool, queues: &[Queue]) {
        let queues = (0u16..)
            .zip(queues)
            .filter(|(_, q)| q.ready())
            // (virtio-queue's Queue is not Clone; its state round-trips.)
            .filter_map(|(i, q)| Some((i, Queue::try_from(q.state()).ok()?)))
            .collect();
        *lock(&self.0) = Some(Running {
            mem,
            event_idx,
            queues,
        });
    }

    /// The device stopped (reset): nothing to show, and its memory let go.
    pub(super) fn stop(&self) {
        *lock(&self.0) = None;
    }

    /// The indices of every queue the driver enabled, read from guest
    /// memory now; empty unless the device is running. Guest memory is the
    /// truth for either datapath (the VMM's threads or the host kernel's
    /// vhost-net worker move the used index there), so this takes no
    /// device lock.
    pub fn views(&self) -> Vec<RingView> {
        let running = lock(&self.0);
        let Some(r) = running.as_ref() else {
            return Vec::new();
        };
        r.queues
            .iter()
            .filter_map(|(i, q)| view(*i, q, &*r.mem, r.event_idx))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::reg;
    use super::super::tests::{queues, setup};
    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    fn used_idx_and_avail_event(q: &TestQueue, mem: &impl GuestMemory, used: u16, event: u16) {
        let (ring, len) = q.used_ring();
        mem.write_obj(used, GuestAddress(ring + 2)).unwrap();
        mem.write_obj(event, GuestAddress(ring + len - 2)).unwrap();
    }

    #[test]
    fn a_running_queue_shows_the_indices_the_driver_and_the_device_wrote() {
        let (_, mut t) = setup();
        let mut qs = queues();
        let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
        assert_eq!(t.rings().views(), Vec::new(), "nothing before DRIVER_OK");
        assert_eq!(start(&mut t, features, &[&qs[0], &qs[1]]), 0xf);
        let mem = t.mem.get().unwrap();
        for _ in 0..3 {
            qs[0].add_chain(&mem, &[(0x8000, 64, true)]);
        }
        qs[0].set_used_event(&mem, 1);
        used_idx_and_avail_event(&qs[0], &*mem, 2, 5);
        assert_eq!(
            t.rings().views(),
            vec![
                RingView {
                    queue: 0,
                    size: 16,
                    avail_idx: 3,
                    used_idx: 2,
                    used_event: Some(1),
                    avail_event: Some(5),
                },
                RingView {
                    queue: 1,
                    size: 32,
                    avail_idx: 0,
                    used_idx: 0,
                    used_event: Some(0),
                    avail_event: Some(0),
                },
            ]
        );
        // A reset stops the device: nothing is running to show.
        write_reg(&mut t, reg::STATUS, 0);
        assert_eq!(t.rings().views(), Vec::new());
    }

    #[test]
    fn without_event_idx_only_the_indices_are_shown_and_unused_queues_are_left_out() {
        let (_, mut t) = setup();
        let mut qs = queues();
        // The driver enabled queue 1 only.
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        qs[1].setup(&mut t, 1);
        write_reg(&mut t, reg::STATUS, 0xf);
        assert_eq!(read_reg(&mut t, reg::STATUS), 0xf);
        let mem = t.mem.get().unwrap();
        qs[1].add_chain(&mem, &[(0x8000, 64, true)]);
        used_idx_and_avail_event(&qs[1], &*mem, 1, 9);
        assert_eq!(
            t.rings().views(),
            vec![RingView {
                queue: 1,
                size: 32,
                avail_idx: 1,
                used_idx: 1,
                used_event: None,
                avail_event: None,
            }]
        );
    }
}
