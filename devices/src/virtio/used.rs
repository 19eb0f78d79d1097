//! Used-ring entries published together, and the EVENT_IDX decision that
//! goes with them.
//!
//! virtio-queue's `add_used` writes one entry and moves the used index
//! past it at once. A virtio-net frame spread over several RX chains
//! (`VIRTIO_NET_F_MRG_RXBUF`) takes several entries, and its first says
//! how many (`num_buffers`): a driver that polls the used ring while the
//! device adds them one by one can see the first entry without the rest.
//! Linux then counts a length error ("rx error: N buffers out of M
//! missing"), drops the frame, and later takes the rest as frames of their
//! own (their payload read as a header). [`add_used_batch`] writes every
//! entry first and moves the index once, as vhost-net's
//! `vhost_add_used_n` does.
//!
//! virtio-queue's `needs_notification` counts the entries `add_used` added
//! since it was last asked; entries published here are not counted, so a
//! queue that uses [`add_used_batch`] decides its interrupts with
//! [`UsedSignal`] instead (for every entry, however added).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Bytes before the used ring's first entry (flags, idx) and of one
/// entry (id, len), and before the avail ring's first slot.
const USED_HEADER: u64 = 4;
const USED_ELEM: u64 = 8;
const AVAIL_HEADER: u64 = 4;
const AVAIL_ELEM: u64 = 2;

/// Guest address of `used_event`, the avail ring's last slot (EVENT_IDX).
pub(crate) fn used_event_addr(q: &Queue) -> Option<u64> {
    q.avail_ring()
        .checked_add(AVAIL_HEADER + AVAIL_ELEM * u64::from(q.size()))
}

/// Guest address of `avail_event`, the used ring's last slot (EVENT_IDX).
pub(crate) fn avail_event_addr(q: &Queue) -> Option<u64> {
    q.used_ring()
        .checked_add(USED_HEADER + USED_ELEM * u64::from(q.size()))
}

/// Why a batch was not published (nothing of it is visible to the driver).
#[derive(Debug, thiserror::Error)]
pub enum UsedError {
    #[error("descriptor head {0} is outside the ring")]
    BadHead(u16),
    #[error("used ring address overflows")]
    Overflow,
    #[error("used ring write: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Adds `(head, len)` entries to `q`'s used ring in order and then moves
/// its used index past all of them with one store: the driver sees the
/// whole batch or none of it.
pub fn add_used_batch<M: GuestMemory>(
    q: &mut Queue,
    mem: &M,
    parts: &[(u16, u32)],
) -> Result<(), UsedError> {
    let size = q.size();
    let next = Wrapping(q.next_used());
    let ring = q.used_ring();
    for (i, &(head, len)) in parts.iter().enumerate() {
        if head >= size {
            return Err(UsedError::BadHead(head));
        }
        // Ring positions are free-running u16 counters (virtio spec).
        let pos = next + Wrapping(i as u16);
        let slot = u64::from(pos.0.checked_rem(size).ok_or(UsedError::Overflow)?);
        let addr = ring
            .checked_add(USED_HEADER + slot * USED_ELEM)
            .ok_or(UsedError::Overflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(addr))?;
    }
    let idx = ring.checked_add(2).ok_or(UsedError::Overflow)?;
    let new = next + Wrapping(parts.len() as u16);
    // The entries before the index (Release orders them).
    mem.store(new.0.to_le(), GuestAddress(idx), Ordering::Release)?;
    q.set_next_used(new.0);
    Ok(())
}

/// EVENT_IDX's "does the driver want an interrupt now" for a queue whose
/// entries are published with [`add_used_batch`]: it remembers where the
/// used index stood when it last answered, instead of counting
/// `add_used` calls.
#[derive(Debug)]
pub struct UsedSignal {
    /// The used index at the last answer.
    old: u16,
}

impl UsedSignal {
    /// Starts from where `q` stands (a fresh activation, or one restored
    /// at its saved position).
    pub fn new(q: &Queue) -> Self {
        Self { old: q.next_used() }
    }

    /// Whether the driver wants an interrupt for the entries used since the
    /// last call: always without EVENT_IDX, else when the used index
    /// crossed `used_event` (the Linux `vring_need_event` test). An
    /// unreadable `used_event` answers yes: a spurious interrupt is
    /// harmless, a lost one stalls the queue.
    pub fn needs_notification<M: GuestMemory>(&mut self, q: &Queue, mem: &M) -> bool {
        let new = q.next_used();
        let old = std::mem::replace(&mut self.old, new);
        // The entries before reading what the driver asked for (it writes
        // used_event and then reads the used index).
        fence(Ordering::SeqCst);
        if !q.event_idx_enabled() {
            return true;
        }
        let Some(event) = used_event_addr(q)
            .and_then(|a| mem.load::<u16>(GuestAddress(a), Ordering::Relaxed).ok())
        else {
            return true;
        };
        let event = u16::from_le(event);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::*;
    use vm_memory::Address;

    fn used_idx(mem: &crate::virtio::GuestMemoryMmap, tq: &TestQueue) -> u16 {
        mem.read_obj(GuestAddress(tq.used + 2)).unwrap()
    }

    #[test]
    fn a_batch_lands_in_order_and_moves_the_index_once_across_the_wrap() {
        let mem = guest_memory();
        let tq = TestQueue::new(0x1000, 4);
        let mut q = tq.device_queue(true);
        // Three entries already used: the batch of three wraps the ring.
        q.set_next_used(3);
        add_used_batch(&mut q, &mem, &[(2, 100), (0, 4096), (3, 7)]).unwrap();
        assert_eq!(used_idx(&mem, &tq), 6);
        assert_eq!(q.next_used(), 6);
        // Slot 3, then slots 0 and 1.
        let read = |slot: u64| -> (u32, u32) {
            let a = GuestAddress(tq.used + 4 + 8 * slot);
            (
                mem.read_obj(a).unwrap(),
                mem.read_obj(a.unchecked_add(4)).unwrap(),
            )
        };
        assert_eq!([read(3), read(0), read(1)], [(2, 100), (0, 4096), (3, 7)]);
    }

    #[test]
    fn a_batch_with_a_head_outside_the_ring_publishes_nothing() {
        let mem = guest_memory();
        let tq = TestQueue::new(0x1000, 4);
        let mut q = tq.device_queue(true);
        let e = add_used_batch(&mut q, &mem, &[(1, 10), (4, 10)]).unwrap_err();
        assert!(matches!(e, UsedError::BadHead(4)), "{e}");
        assert_eq!(used_idx(&mem, &tq), 0);
        assert_eq!(q.next_used(), 0);
    }

    #[test]
    fn the_driver_is_signalled_once_the_used_index_crosses_used_event_and_not_before() {
        let mem = guest_memory();
        let tq = TestQueue::new(0x1000, 16);
        let mut q = tq.device_queue(true);
        let mut s = UsedSignal::new(&q);
        // The driver wants an interrupt once entry 2 (index 3) is used.
        tq.set_used_event(&mem, 2);
        add_used_batch(&mut q, &mem, &[(0, 1), (1, 1)]).unwrap();
        assert!(!s.needs_notification(&q, &mem), "index 2 has not crossed 2");
        // A batch that jumps past it (2 -> 5) signals.
        add_used_batch(&mut q, &mem, &[(2, 1), (3, 1), (4, 1)]).unwrap();
        assert!(s.needs_notification(&q, &mem));
        // Nothing new since: no second interrupt for the same crossing.
        assert!(!s.needs_notification(&q, &mem));
        // Entries added one at a time by virtio-queue count as well.
        tq.set_used_event(&mem, 5);
        q.add_used(&mem, 5, 1).unwrap();
        assert!(s.needs_notification(&q, &mem));
    }

    #[test]
    fn without_event_idx_every_call_signals() {
        let mem = guest_memory();
        let tq = TestQueue::new(0x1000, 16);
        let mut q = tq.device_queue(false);
        let mut s = UsedSignal::new(&q);
        tq.set_used_event(&mem, 100);
        add_used_batch(&mut q, &mem, &[(0, 1)]).unwrap();
        assert!(s.needs_notification(&q, &mem));
    }

    #[test]
    fn a_restored_queue_counts_from_its_saved_position() {
        let mem = guest_memory();
        let tq = TestQueue::new(0x1000, 16);
        let mut q = tq.device_queue(true);
        q.set_next_used(40);
        let mut s = UsedSignal::new(&q);
        // used_event 30 was crossed before the snapshot, not now.
        tq.set_used_event(&mem, 30);
        add_used_batch(&mut q, &mem, &[(0, 1)]).unwrap();
        assert!(!s.needs_notification(&q, &mem));
    }
}
