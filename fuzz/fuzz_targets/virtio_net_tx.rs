//! virtio-net TX: chains from a hostile driver through a real `Net` (over a
//! socket pair in place of the TAP), notified through the MMIO transport
//! and served by the event loop.
//!
//! Checks: the TX ring follows the in-order model of `vmm_fuzz::virtio`
//! with used length 0; every frame that leaves is the concatenation of a
//! chain's buffers (in chain order, frames in ring order), and each chain
//! the model expects to be sent is either sent or counted as dropped, each
//! malformed one counted invalid; nothing is sent otherwise.
#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::test_utils::TestQueue;
use devices::virtio::{GuestMemoryMmap, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_fuzz::net::{recv_all, NetHarness, TX};
use vmm_fuzz::virtio::{
    add_indirect_chain, fill_stream, walk_chain, Addr, BufSpec, Desc, InOrderModel, Len, RING_AREA,
};

#[derive(Arbitrary, Debug)]
enum Op {
    Frame {
        bufs: Vec<BufSpec>,
        seed: u8,
    },
    Indirect {
        bufs: Vec<BufSpec>,
        seed: u8,
    },
    RawDesc {
        index: u16,
        addr: Addr,
        len: Len,
        flags: u16,
        next: u16,
    },
    PushAvail(u16),
    SetAvailIdx(u16),
    SetUsedEvent(u16),
    Poke {
        addr: Addr,
        bytes: Vec<u8>,
    },
    Notify,
    /// A notification of the RX queue (no buffers there): must not send.
    NotifyRx,
    Restart {
        features: u64,
        rx_size: u8,
        tx_size: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    rx_size: u8,
    tx_size: u8,
    ops: Vec<Op>,
}

/// The frame a TX chain must become, `None` for a chain the device must
/// return as invalid: malformed, any device-writable buffer, shorter than
/// the 12-byte vnet header, or a buffer outside guest memory. The bool
/// says whether the bytes can be compared (a buffer over the rings may
/// have changed while the device worked).
fn expected_frame(mem: &GuestMemoryMmap, q: &TestQueue, head: u16) -> Option<(Vec<u8>, bool)> {
    let chain = walk_chain(mem, q.desc, q.size, head)?;
    if chain.iter().any(|d| d.writable()) {
        return None;
    }
    let total: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
    if total < 12 {
        return None;
    }
    // Every byte, not just both ends: a buffer from region A to region B
    // has both ends in memory and the hole between them.
    let in_memory = |d: &&Desc| {
        d.len == 0
            || (d.len <= 0x4_0000
                && mem
                    .find_region(GuestAddress(d.addr))
                    .is_some_and(|r| d.addr - r.start_addr().0 + u64::from(d.len) <= r.len()))
    };
    if !chain.iter().all(|d| in_memory(&d)) {
        return None;
    }
    if total > 1 << 18 {
        // Larger than any socket takes: it can only be dropped (an empty
        // frame matches nothing sent).
        return Some((Vec::new(), false));
    }
    let mut frame = Vec::new();
    let mut exact = true;
    for d in &chain {
        if d.len == 0 {
            continue;
        }
        let mut buf = vec![0u8; d.len as usize];
        mem.read_slice(&mut buf, GuestAddress(d.addr)).ok()?;
        let end = d.addr.saturating_add(u64::from(d.len));
        if d.addr < RING_AREA.0 + RING_AREA.1 && end > RING_AREA.0 {
            exact = false;
        }
        frame.extend(buf);
    }
    Some((frame, exact))
}

fn run(h: &mut NetHarness, model: &mut InOrderModel, notify_tx: bool) {
    let active = h.active();
    let queues = h.queues();
    let exp = if active && notify_tx {
        model.before_run(&h.mem, &h.txq, &queues)
    } else {
        None
    };
    let before = h.stats();
    h.notify(if notify_tx { TX } else { 0 });
    h.settle();
    let frames = recv_all(&h.host);
    let after = h.stats();
    assert_eq!(
        after.tx_packets - before.tx_packets,
        frames.len() as u64,
        "frames counted"
    );
    if !notify_tx || !active {
        assert!(frames.is_empty(), "a frame without a TX notification");
        return;
    }
    let Some(exp) = exp else { return };
    let mem = &*h.mem;
    let q = &h.txq;
    model.after_run(mem, q, &exp, |_| 0);
    let want: Vec<_> = exp
        .popped
        .iter()
        .map(|&head| expected_frame(mem, q, head))
        .collect();
    let invalid = want.iter().filter(|w| w.is_none()).count() as u64;
    assert_eq!(
        after.invalid_chains - before.invalid_chains,
        invalid,
        "invalid chains"
    );
    // The frames sent are the expected ones in order, some maybe dropped.
    let mut sent = frames.iter();
    let mut next = sent.next();
    let mut dropped = 0u64;
    for (frame, exact) in want.iter().flatten() {
        match next {
            Some(got) if got.len() == frame.len() && (!exact || got == frame) => {
                next = sent.next();
            }
            _ => dropped += 1,
        }
    }
    assert!(
        next.is_none(),
        "a frame that no chain made: {} bytes",
        next.map_or(0, Vec::len)
    );
    assert_eq!(
        after.tx_dropped - before.tx_dropped,
        dropped,
        "dropped frames"
    );
}

fuzz_target!(|input: Input| {
    let mut h = NetHarness::new(
        input.features | VIRTIO_F_VERSION_1,
        input.rx_size,
        input.tx_size,
    );
    let mut model = InOrderModel::new();
    run(&mut h, &mut model, true);
    for op in input.ops.iter().take(64) {
        match op {
            Op::Frame { bufs, seed } | Op::Indirect { bufs, seed } => {
                let bufs: Vec<_> = bufs.iter().take(300).map(|b| h.alloc.resolve(b)).collect();
                let total: u64 = bufs.iter().map(|b| u64::from(b.1)).sum();
                let data: Vec<u8> = (0..total.min(1 << 18))
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(*seed))
                    .collect();
                fill_stream(&h.mem, &bufs, &data);
                if bufs.is_empty() {
                    continue;
                }
                if matches!(op, Op::Indirect { .. }) {
                    add_indirect_chain(&mut h.txq, &h.mem, &mut h.alloc, &bufs);
                } else {
                    h.txq.add_chain(&h.mem, &bufs);
                }
            }
            Op::RawDesc {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let i = index % h.txq.size;
                h.txq
                    .write_desc(&h.mem, i, addr.get(), len.get(), *flags, *next);
            }
            Op::PushAvail(head) => h.txq.push_avail(&h.mem, *head),
            Op::SetAvailIdx(v) => h.mem.write_obj(*v, GuestAddress(h.txq.avail + 2)).unwrap(),
            Op::SetUsedEvent(v) => h.txq.set_used_event(&h.mem, *v),
            Op::Poke { addr, bytes } => {
                let _ = h.mem.write_slice(bytes, GuestAddress(addr.get()));
            }
            Op::Notify => run(&mut h, &mut model, true),
            Op::NotifyRx => run(&mut h, &mut model, false),
            Op::Restart {
                features,
                rx_size,
                tx_size,
            } => {
                h.restart(*features, *rx_size, *tx_size);
                // Activation kicks TX: whatever the new ring holds is
                // served at once, as after a notification.
                model = InOrderModel::new();
                run(&mut h, &mut model, true);
            }
        }
    }
    run(&mut h, &mut model, true);
});
