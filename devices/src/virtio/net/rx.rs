//! Receiving: frames from a TAP queue into its pair's RX ring (see the
//! [module docs](super) for the buffering rules).

use std::io;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::QueueT;

use super::{
    inc, trim_scratch, Active, Net, NetCounters, Token, BIG_FRAMES_HOLD, MAX_FRAME,
    NUM_BUFFERS_OFFSET,
};
use crate::virtio::iov::{parse_chain_into, push_iovecs, write_segs, Seg, IOV_MAX};
use crate::virtio::tap::{Tap, VNET_HDR_LEN};
use crate::virtio::used::add_used_batch;
use crate::virtio::GuestMemoryMmap;

/// An RX chain popped from the ring and checked, not yet used.
#[derive(Default)]
pub(super) struct RxChain {
    pub(super) head: u16,
    pub(super) segs: Vec<Seg>,
    /// Host `(address, length)` of each buffer, resolved once when the
    /// chain is popped (plain integers keep the device `Send`; they stay
    /// valid while `Active::mem` lives).
    host: Vec<(usize, usize)>,
    pub(super) cap: usize,
}

/// How the next frame is read from the TAP (MRG_RXBUF decides; see the
/// [module docs](super)).
#[derive(Clone, Copy)]
enum RxRead {
    /// Into the chains at hand, which hold this many bytes: enough for a
    /// maximal frame, or the one chain a frame gets without MRG_RXBUF.
    Direct(usize),
    /// Into the chains at hand, which hold this many bytes (the front one,
    /// or every one held when wide reads are due but they cannot hold a
    /// maximal frame), and the bounce buffer behind them for the rest of a
    /// frame that does not fit.
    Split(usize),
    /// Into the bounce buffer alone: the chains at hand take more iovecs
    /// than one `readv` accepts (`IOV_MAX`, a guest's chain of a thousand
    /// descriptors).
    Bounce,
}

/// The longest segment list a spare chain keeps (see
/// [`Active::spare_chain`]).
const SPARE_SEGS: usize = 16;

enum RxOutcome {
    /// The TAP has nothing more to read.
    Drained,
    /// A frame may be waiting but the guest gave no (or too few) buffers.
    NoBuffers,
    /// This wake-up's budget of frames is spent; the TAP may hold more
    /// (it stays polled, so the event loop comes back after the others).
    Budget,
}

impl Net {
    /// Starts or stops polling pair `p`'s TAP queue.
    pub(super) fn set_tap_polling(&mut self, p: usize, ops: &mut EventOps, on: bool) {
        let (Some(tap), Some(reg)) = (self.taps.get(p), self.tap_registered.get_mut(p)) else {
            return;
        };
        if *reg == on {
            return;
        }
        let ev = Events::with_data(tap, Token::Tap(p).data(), EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => *reg = on,
            Err(e) => tracing::error!(
                "virtio-net {}: cannot change TAP polling: {e:?}",
                tap.name()
            ),
        }
    }

    /// Moves frames from the TAP to the guest until one side runs dry, and
    /// starts or stops polling the TAP accordingly.
    pub(super) fn handle_rx(&mut self, p: usize, ops: &mut EventOps) {
        // A pair the driver has not enabled gets no frames: its TAP queue
        // is detached, and nothing polls it.
        let enabled = p < self.enabled();
        let (Some(a), Some(tap), true) = (self.active.get_mut(p), self.taps.get(p), enabled) else {
            self.set_tap_polling(p, ops, false);
            return;
        };
        let mem = a.mem.clone();
        let mut used = false;
        let mut outcome = RxOutcome::Drained;
        let mut frames = self.budget.unwrap_or_else(|| a.rx.size()).max(1);
        for _ in 0..8 {
            let (o, u) = a.process_rx(&mem, tap, &self.counters, &mut frames);
            used |= u;
            outcome = o;
            if !matches!(outcome, RxOutcome::NoBuffers) {
                break;
            }
            // Out of buffers: ask the guest to notify us when it adds some.
            // If it added some meanwhile, go on reading.
            match a.rx.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!("virtio-net: enable_notification: {e}");
                    break;
                }
            }
        }
        if used && a.rx_signal.needs_notification(&a.rx, &*mem) {
            a.interrupt.signal_used_queue();
        }
        match outcome {
            RxOutcome::Drained | RxOutcome::Budget => {
                // The TAP is polled while there are buffers: RX
                // notifications are not needed meanwhile.
                if let Err(e) = a.rx.disable_notification(&*mem) {
                    tracing::debug!("virtio-net: disable_notification: {e}");
                }
                self.set_tap_polling(p, ops, true);
            }
            RxOutcome::NoBuffers => {
                if self.tap_registered.get(p).copied().unwrap_or(false) {
                    inc(&self.counters.rx_deferred, 1);
                }
                self.set_tap_polling(p, ops, false);
            }
        }
    }
}

impl Active {
    /// Pops and checks RX chains until `need` bytes are at hand or the ring
    /// is empty. Returns whether chains were returned as invalid.
    fn fill_rx(&mut self, mem: &GuestMemoryMmap, need: usize, c: &NetCounters) -> bool {
        let mut used = false;
        while self.rx_cap < need {
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let iovs = &mut self.fill_iov.0;
            iovs.clear();
            let p = &mut self.rx_parsed;
            let ok = parse_chain_into(chain, p).is_ok()
                && p.readable.is_empty()
                && p.writable_len() >= VNET_HDR_LEN as u64
                && push_iovecs(mem, &p.writable, iovs).is_some();
            if !ok {
                inc(&c.invalid_chains, 1);
                used |= self.rx.add_used(mem, head, 0).is_ok();
                continue;
            }
            let cap = usize::try_from(p.writable_len()).unwrap_or(usize::MAX);
            self.rx_cap = self.rx_cap.saturating_add(cap);
            // A spare chain's lists (or new ones) take the parsed ones'
            // place: no allocation per frame once the ring has gone round.
            let mut ch = self.rx_spare.pop().unwrap_or_default();
            std::mem::swap(&mut ch.segs, &mut p.writable);
            ch.host.clear();
            ch.host
                .extend(iovs.iter().map(|v| (v.iov_base as usize, v.iov_len)));
            ch.head = head;
            ch.cap = cap;
            self.rx_chains.push_back(ch);
        }
        trim_scratch(&mut self.fill_iov.0);
        trim_scratch(&mut self.rx_parsed.readable);
        trim_scratch(&mut self.rx_parsed.writable);
        used
    }

    /// Reads frames from the TAP into RX buffers. Returns the outcome and
    /// whether used buffers were added.
    fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        tap: &Tap,
        c: &NetCounters,
        frames: &mut u16,
    ) -> (RxOutcome, bool) {
        let mut used = false;
        let mut errors = 0;
        let mut unsignalled: u16 = 0;
        loop {
            if *frames == 0 {
                return (RxOutcome::Budget, used);
            }
            if self.pending > 0 {
                used |= self.fill_rx(mem, self.pending, c);
                if self.rx_cap < self.pending {
                    return (RxOutcome::NoBuffers, used);
                }
                let n = std::mem::take(&mut self.pending);
                let in_place = std::mem::take(&mut self.pending_in_place);
                self.complete_rx(mem, n, in_place, c);
                used = true;
                *frames = frames.saturating_sub(1);
                self.signal_every_batch(&mut unsignalled);
                continue;
            }
            // Wide reads need chains for a maximal frame; a read over the
            // front chain and the bounce buffer needs one.
            let need = if self.mrg_rxbuf && self.big_frames_hold > 0 {
                MAX_FRAME
            } else {
                1
            };
            used |= self.fill_rx(mem, need, c);
            let Some(front_cap) = self.rx_chains.front().map(|ch| ch.cap) else {
                return (RxOutcome::NoBuffers, used);
            };
            let read = self.rx_iovecs();
            let got = match tap.readv(&self.rx_iov.0) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return (RxOutcome::Drained, used);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The TAP dropped the frame (e.g. it did not fit).
                    tracing::debug!("virtio-net: TAP read: {e}");
                    inc(&c.rx_dropped, 1);
                    errors += 1;
                    if errors > 16 {
                        return (RxOutcome::Drained, used);
                    }
                    continue;
                }
            };
            // A reader may report more than fit (the TAP counts a frame it
            // truncated): never trust it beyond the buffers offered. How
            // much of the frame is in the guest's chains already:
            let (n, in_place) = match read {
                RxRead::Direct(cap) => (got.min(cap), got.min(cap)),
                RxRead::Split(cap) => (got.min(MAX_FRAME), got.min(cap)),
                // Without MRG_RXBUF a frame has one chain: cut to it, as a
                // direct read into that chain would cut it.
                RxRead::Bounce if !self.mrg_rxbuf => (got.min(front_cap), 0),
                RxRead::Bounce => (got.min(MAX_FRAME), 0),
            };
            // Written behind vm-memory's back: mark it (even a runt that is
            // dropped below changed the buffers).
            self.mark_rx_written(in_place);
            if n == 0 {
                return (RxOutcome::Drained, used);
            }
            if n < VNET_HDR_LEN {
                inc(&c.rx_dropped, 1);
                continue;
            }
            // A frame bigger than one chain: read the next ones wide.
            if n > front_cap {
                self.big_frames_hold = BIG_FRAMES_HOLD;
            } else {
                self.big_frames_hold = self.big_frames_hold.saturating_sub(1);
            }
            if in_place < n {
                // The rest waits in the bounce buffer for enough chains.
                self.pending = n;
                self.pending_in_place = in_place;
                continue;
            }
            self.complete_rx(mem, n, n, c);
            used = true;
            *frames = frames.saturating_sub(1);
            self.signal_every_batch(&mut unsignalled);
        }
    }

    /// After a frame: counts the used entries it took (several with
    /// MRG_RXBUF) towards the next mid-wake-up interrupt.
    fn signal_every_batch(&mut self, unsignalled: &mut u16) {
        let added = u16::try_from(self.rx_parts.len()).unwrap_or(u16::MAX);
        let (rx, signal, mem) = (&self.rx, &mut self.rx_signal, &self.mem);
        super::signal_every_batch(&self.interrupt, unsignalled, added, || {
            signal.needs_notification(rx, &**mem)
        });
    }

    /// Builds `rx_iov` for the next read (see [`RxRead`]).
    fn rx_iovecs(&mut self) -> RxRead {
        let iovs = &mut self.rx_iov.0;
        iovs.clear();
        let wide = self.mrg_rxbuf && self.big_frames_hold > 0;
        let mut cap = 0usize;
        for ch in &self.rx_chains {
            iovs.extend(ch.host.iter().map(|&(base, len)| libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            }));
            cap = cap.saturating_add(ch.cap);
            if !wide || cap >= MAX_FRAME {
                break;
            }
        }
        if iovs.len() <= IOV_MAX && (!self.mrg_rxbuf || cap >= MAX_FRAME) {
            return RxRead::Direct(cap);
        }
        self.bounce.resize(MAX_FRAME, 0);
        let bounce = self.bounce.as_mut_ptr().cast();
        // The chains at hand (one, or all held when wide reads are due but
        // the guest has not posted enough for a maximal frame) and the
        // bounce buffer for the rest: one more iovec.
        if self.mrg_rxbuf && iovs.len() < IOV_MAX {
            iovs.push(libc::iovec {
                iov_base: bounce,
                iov_len: MAX_FRAME - cap,
            });
            return RxRead::Split(cap);
        }
        iovs.clear();
        iovs.push(libc::iovec {
            iov_base: bounce,
            iov_len: MAX_FRAME,
        });
        RxRead::Bounce
    }

    /// Keeps a used chain's lists for the next chain popped: at most a
    /// ring's worth, none with room for more than [`SPARE_SEGS`] segments
    /// (a guest's chain of a thousand descriptors once does not keep its
    /// lists for good).
    fn spare_chain(&mut self, ch: RxChain) {
        if self.rx_spare.len() < usize::from(self.rx.size()) && ch.segs.capacity() <= SPARE_SEGS {
            self.rx_spare.push(ch);
        }
    }

    /// Hands a frame of `n` bytes to the guest: its first `in_place` bytes
    /// are already in the front chains, the rest at the start of `bounce`.
    fn complete_rx(&mut self, mem: &GuestMemoryMmap, n: usize, in_place: usize, c: &NetCounters) {
        let mut parts = std::mem::take(&mut self.rx_parts);
        parts.clear();
        let mut first: Option<RxChain> = None;
        let mut done = 0usize;
        while done < n {
            let Some(ch) = self.rx_chains.pop_front() else {
                break;
            };
            self.rx_cap -= ch.cap;
            let len = ch.cap.min(n - done);
            let end = done + len;
            if end > in_place {
                // This chain's bytes from `from` on are in the bounce buffer.
                let from = in_place.max(done);
                let copied = self
                    .bounce
                    .get(from - in_place..end - in_place)
                    .and_then(|src| write_segs(mem, &ch.segs, (from - done) as u64, src));
                if copied.is_none() {
                    inc(&c.invalid_chains, 1);
                }
            }
            parts.push((ch.head, len as u32));
            if first.is_none() {
                first = Some(ch);
            } else {
                self.spare_chain(ch);
            }
            done += len;
        }
        let num_buffers = parts.len() as u16;
        if let Some(ch) = first {
            // The TAP leaves num_buffers alone: fill it in before the guest
            // can see the first buffer.
            let _ = write_segs(
                mem,
                &ch.segs,
                NUM_BUFFERS_OFFSET,
                &num_buffers.to_le_bytes(),
            );
            self.spare_chain(ch);
        }
        // All of the frame's entries or none: a driver polling the used
        // ring meanwhile must not see the first without the rest.
        if let Err(e) = add_used_batch(&mut self.rx, mem, &parts) {
            tracing::debug!("virtio-net: cannot return an RX frame's chains: {e}");
        }
        self.rx_parts = parts;
        inc(&c.rx_packets, 1);
        c.count_pair(self.pair, 0);
        inc(&c.rx_bytes, (n - VNET_HDR_LEN) as u64);
    }
}
