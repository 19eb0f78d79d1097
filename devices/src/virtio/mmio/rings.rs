//! Where each running queue stands, read from its rings in guest memory:
//! what `status` shows so that a stalled queue can be placed (the driver
//! posting no buffers, the device using none, or an interrupt the driver
//! never took) without a debugger on the guest or the VMM.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{status, MmioTransport};
use crate::virtio::VIRTIO_RING_F_EVENT_IDX;

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

/// Byte offset of the `used_event` / `avail_event` slot behind a ring of
/// `size` elements of `elem` bytes (after the 4-byte flags and index).
fn event_offset(size: u16, elem: u64) -> u64 {
    4 + elem * u64::from(size)
}

fn read_u16<M: GuestMemory>(mem: &M, addr: u64, offset: u64) -> Option<u16> {
    let a = addr.checked_add(offset)?;
    mem.read_obj::<u16>(GuestAddress(a)).ok().map(u16::from_le)
}

fn view<M: GuestMemory>(i: usize, q: &Queue, mem: &M, event_idx: bool) -> Option<RingView> {
    let size = q.size();
    Some(RingView {
        queue: u16::try_from(i).ok()?,
        size,
        avail_idx: q.avail_idx(mem, Ordering::Acquire).ok()?.0,
        used_idx: q.used_idx(mem, Ordering::Acquire).ok()?.0,
        used_event: event_idx
            .then(|| read_u16(mem, q.avail_ring(), event_offset(size, 2)))
            .flatten(),
        avail_event: event_idx
            .then(|| read_u16(mem, q.used_ring(), event_offset(size, 8)))
            .flatten(),
    })
}

impl MmioTransport {
    /// The indices of every queue the driver enabled, read from guest
    /// memory now; empty unless the device is running (DRIVER_OK). Guest
    /// memory is the truth for either datapath (the VMM's threads or the
    /// host kernel's vhost-net worker move the used index there), so this
    /// takes no device lock.
    pub fn ring_views(&self) -> Vec<RingView> {
        if self.status & status::DRIVER_OK == 0 {
            return Vec::new();
        }
        let Some(mem) = self.mem.get() else {
            return Vec::new();
        };
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .filter_map(|(i, q)| view(i, q, &*mem, event_idx))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::reg;
    use super::super::tests::{queues, setup};
    use super::*;
    use crate::virtio::test_utils::*;
    use crate::virtio::VIRTIO_F_VERSION_1;

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
        assert_eq!(t.ring_views(), Vec::new(), "nothing before DRIVER_OK");
        assert_eq!(start(&mut t, features, &[&qs[0], &qs[1]]), 0xf);
        let mem = t.mem.get().unwrap();
        for _ in 0..3 {
            qs[0].add_chain(&mem, &[(0x8000, 64, true)]);
        }
        qs[0].set_used_event(&mem, 1);
        used_idx_and_avail_event(&qs[0], &*mem, 2, 5);
        assert_eq!(
            t.ring_views(),
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
        assert_eq!(t.ring_views(), Vec::new());
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
            t.ring_views(),
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
