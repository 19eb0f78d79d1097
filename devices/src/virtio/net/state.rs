//! Quiescing virtio-net for a snapshot ([`VirtioDevice::quiesce`]).
//!
//! - **vhost-net**: the kernel's datapath is stopped as a reset stops it
//!   (each queue's backend detached, which flushes it), then asked where
//!   each queue stopped ([`VhostPath::quiesce`](super::vhost::VhostPath::quiesce)).
//! - **Userspace**: TX takes a chain, sends it and returns it in one go
//!   under the device's lock, so nothing of TX is in flight. RX keeps
//!   chains it has popped and not yet used (`Active::rx_chains`: the one
//!   the next read starts in, with MRG_RXBUF after a big frame enough for
//!   a maximal frame, and what is left of those until they are used):
//!   they go back to the avail ring
//!   (`next_avail` rewound over them) so the next activation offers them
//!   to frames again. Only where the ring interleaves them with chains
//!   already returned as invalid can they not be rewound over; those are
//!   returned used with length 0, which a driver takes as an empty
//!   (dropped) frame and refills.
//!
//!   A frame read from the TAP ahead, waiting in the bounce buffer (its
//!   start perhaps in the chains held, which are given back all the same:
//!   what the guest finds in them is not a frame) for enough RX buffers
//!   (`Active::pending`), is dropped and counted in
//!   `rx_dropped`: it has left the TAP and cannot be put back, and one lost
//!   frame is what a network may do anyway (the sender's TCP resends).
//!
//! A multi-queue device quiesces every pair it serves and its control
//! queue; a pair the driver left unused keeps the state the activation
//! gave it, and [`Net::saved_queue_pairs`](crate::virtio::VirtioDevice::saved_queue_pairs)
//! keeps how many pairs the driver enabled.
//!
//! The TAP's offloads stay as negotiated: the next activation sets them
//! again, and a reset clears them.
//!
//! [`VirtioDevice::quiesce`]: crate::virtio::VirtioDevice::quiesce

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{inc, rx_index, tx_index, Active, Net};
use crate::state::StateError;
use crate::virtio::GuestMemoryMmap;

impl Net {
    /// See the module's documentation.
    pub(super) fn quiesce_queues(&mut self) -> Result<Vec<QueueState>, StateError> {
        if !self.vhost.is_empty() {
            return self.quiesce_vhost();
        }
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let mut states = std::mem::take(&mut self.activated);
        for (p, mut a) in std::mem::take(&mut self.active).into_iter().enumerate() {
            if a.pending > 0 {
                inc(&self.counters.rx_dropped, 1);
            }
            a.give_back_rx();
            put(&mut states, rx_index(p), a.rx.state());
            put(&mut states, tx_index(p), a.tx.state());
        }
        if let Some(c) = self.ctrl.take() {
            put(&mut states, c.index(), c.state());
        }
        Ok(states)
    }

    fn quiesce_vhost(&mut self) -> Result<Vec<QueueState>, StateError> {
        let mut states = self.activated.clone();
        for (p, v) in self.vhost.iter_mut().enumerate() {
            match v.quiesce() {
                Ok([rx, tx]) => {
                    put(&mut states, rx_index(p), rx);
                    put(&mut states, tx_index(p), tx);
                }
                Err(why) => {
                    // The failed pair attached its TAP again; so do the
                    // pairs before it: the datapath carries on as it was.
                    for w in self.vhost.iter().take(p) {
                        w.reattach_all();
                    }
                    return Err(StateError::new(
                        "virtio-net",
                        format!("{}: {why}", self.tap_name()),
                    ));
                }
            }
        }
        self.set_vhost(Vec::new());
        if let Some(c) = self.ctrl.take() {
            put(&mut states, c.index(), c.state());
        }
        self.activated.clear();
        // As after a reset: the event loop polls the queue eventfds again,
        // and the next activation tries the kernel's datapath again.
        self.counters
            .vhost
            .store(!self.vhost_dev.is_empty(), Ordering::Relaxed);
        self.wake_event_loop();
        Ok(states)
    }
}

/// Sets `states[i]`, where the activation had a queue `i`.
fn put(states: &mut [QueueState], i: usize, state: QueueState) {
    if let Some(s) = states.get_mut(i) {
        *s = state;
    }
}

impl Active {
    /// Gives the RX chains popped but not filled back to the driver (see
    /// the module's documentation).
    fn give_back_rx(&mut self) {
        let mem = self.mem.clone();
        let held: Vec<u16> = self.rx_chains.drain(..).map(|c| c.head).collect();
        self.rx_cap = 0;
        let next = self.rx.next_avail();
        // How many of the held chains, from the last one back, are the
        // last ones popped from the ring: those the ring can offer again.
        let mut rewind: u16 = 0;
        for &head in held.iter().rev() {
            let Some(back) = rewind.checked_add(1) else {
                break;
            };
            // Ring positions are free-running u16 counters (virtio spec):
            // they wrap by design.
            if avail_entry(&self.rx, &mem, next.wrapping_sub(back)) != Some(head) {
                break;
            }
            rewind = back;
        }
        let keep = held.len().saturating_sub(usize::from(rewind));
        let mut used = false;
        for &head in held.get(..keep).unwrap_or_default() {
            match self.rx.add_used(&*mem, head, 0) {
                Ok(()) => used = true,
                Err(e) => tracing::debug!("virtio-net: cannot return RX chain {head}: {e}"),
            }
        }
        self.rx.set_next_avail(next.wrapping_sub(rewind));
        if used && self.rx_signal.needs_notification(&self.rx, &*mem) {
            self.interrupt.signal_used_queue();
        }
    }
}

/// The head the avail ring holds at free-running position `pos`.
fn avail_entry(q: &Queue, mem: &GuestMemoryMmap, pos: u16) -> Option<u16> {
    let slot = pos.checked_rem(q.size())?;
    // flags and idx (2 bytes each), then one u16 per slot.
    let off = u64::from(slot).checked_mul(2)?.checked_add(4)?;
    let addr = GuestAddress(q.avail_ring()).checked_add(off)?;
    mem.read_obj::<u16>(addr).ok().map(u16::from_le)
}
