//! Transmitting: chains from a pair's TX ring to its TAP queue.

use virtio_queue::QueueT;

use super::{inc, trim_scratch, tx_index, Net};
use crate::virtio::iov::{parse_chain_into, push_iovecs};
use crate::virtio::rearm_and_recheck;
use crate::virtio::tap::VNET_HDR_LEN;

impl Net {
    /// Sends every available TX chain to the TAP.
    pub(super) fn process_tx(&mut self, p: usize) {
        let (Some(a), Some(tap), Some(kick)) = (
            self.active.get_mut(p),
            self.taps.get(p),
            self.queue_evts.get(tx_index(p)),
        ) else {
            return;
        };
        let mem = a.mem.clone();
        let c = &self.counters;
        let mut used = false;
        let budget = self.budget.unwrap_or_else(|| a.tx.size()).max(1);
        let mut served: u16 = 0;
        let mut more = false;
        let mut unsignalled: u16 = 0;
        let mut rechecked = false;
        'wake: loop {
            if let Err(e) = a.tx.disable_notification(&*mem) {
                tracing::debug!("virtio-net: disable_notification: {e}");
            }
            let mut popped = false;
            while let Some(chain) = a.tx.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                let iovs = &mut a.tx_iov.0;
                iovs.clear();
                let parsed = &mut a.tx_parsed;
                match parse_chain_into(chain, parsed) {
                    Ok(())
                        if parsed.writable.is_empty()
                            && parsed.readable_len() >= VNET_HDR_LEN as u64
                            && push_iovecs(&mem, &parsed.readable, iovs).is_some() =>
                    {
                        match tap.writev(iovs) {
                            Ok(_) => {
                                inc(&c.tx_packets, 1);
                                c.count_pair(p, 1);
                                inc(&c.tx_bytes, parsed.readable_len() - VNET_HDR_LEN as u64);
                            }
                            Err(e) => {
                                tracing::debug!("virtio-net {}: TAP write: {e}", tap.name());
                                inc(&c.tx_dropped, 1);
                            }
                        }
                    }
                    _ => inc(&c.invalid_chains, 1),
                }
                match a.tx.add_used(&*mem, head, 0) {
                    Ok(()) => used = true,
                    Err(e) => tracing::debug!("virtio-net: cannot return TX chain {head}: {e}"),
                }
                super::signal_every_batch(&a.interrupt, &mut unsignalled, 1, || {
                    a.tx.needs_notification(&*mem).unwrap_or(true)
                });
                served = served.saturating_add(1);
                if served >= budget {
                    // Notifications stay off: the self-kick below brings
                    // the event loop back, the guest need not.
                    more = true;
                    break 'wake;
                }
            }
            #[cfg(test)]
            if let Some(hook) = self.before_rearm.take() {
                hook();
            }
            if !rearm_and_recheck(&mut a.tx, &mem, popped, &mut rechecked, "virtio-net") {
                break;
            }
        }
        trim_scratch(&mut a.tx_iov.0);
        trim_scratch(&mut a.tx_parsed.readable);
        trim_scratch(&mut a.tx_parsed.writable);
        if used && a.tx.needs_notification(&*mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        if more {
            if let Err(e) = kick.write(1) {
                tracing::warn!("virtio-net: cannot re-arm its TX queue: {e}");
            }
        }
    }
}
