//! virtio-net RX: frames from the host side (a socket pair in place of the
//! TAP) into RX chains a hostile driver posts, with and without
//! MRG_RXBUF, through a real `Net` served by the event loop.
//!
//! Checks: used entries name heads below the queue size; while the device
//! cannot have written over its rings (and no descriptor was rewritten
//! under a chain it holds), the used lengths a run adds sum to the frames
//! it delivered (`rx_bytes` plus a 12-byte header per `rx_packets`); the
//! device never delivers or drops more frames, or more bytes, than the
//! host sent; nothing goes out on the TX side.
#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::net::F_MRG_RXBUF;
use devices::virtio::VIRTIO_F_VERSION_1;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::net::{recv_all, send, NetHarness, RX};
use vmm_fuzz::virtio::{add_indirect_chain, rings_protected, Addr, BufSpec, Len, Rings};

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    /// Shorter than the vnet header.
    Tiny(u8),
    Small(u8),
    Mtu(u16),
    /// Up to a maximal GSO frame.
    Big(u16),
    Max,
}

impl Size {
    fn get(self) -> usize {
        match self {
            Size::Tiny(x) => usize::from(x % 12),
            Size::Small(x) => 12 + usize::from(x),
            Size::Mtu(x) => 12 + usize::from(x) % 1515,
            Size::Big(x) => 12 + usize::from(x) + 18,
            Size::Max => 12 + 18 + 65535,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Post(Vec<BufSpec>),
    PostIndirect(Vec<BufSpec>),
    /// `n` one-descriptor chains of the same length.
    PostMany {
        n: u8,
        len: Len,
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
    Send {
        size: Size,
        seed: u8,
    },
    Notify,
    Run,
    Restart {
        features: u64,
        rx_size: u8,
        tx_size: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    mrg: bool,
    features: u64,
    rx_size: u8,
    tx_size: u8,
    ops: Vec<Op>,
}

struct State {
    frames_sent: u64,
    /// Bytes past the vnet header of the frames sent.
    payload_sent: u64,
    /// Descriptors posted since the last restart.
    posted: usize,
    /// A descriptor may have been rewritten under a chain the device holds.
    hostile: bool,
}

fn run(h: &mut NetHarness, st: &mut State, notify: bool) {
    let queues = h.queues();
    let check = !st.hostile && h.active() && rings_protected(&h.mem, &queues);
    let used_before = Rings {
        mem: &h.mem,
        q: &h.rxq,
    }
    .used_idx();
    let before = h.stats();
    if notify {
        h.notify(RX);
    }
    h.settle();
    let after = h.stats();
    assert!(recv_all(&h.host).is_empty(), "a frame went out");
    assert!(
        after.rx_packets + after.rx_dropped <= st.frames_sent,
        "{after:?}"
    );
    assert!(after.rx_bytes <= st.payload_sent, "{after:?}");
    assert_eq!(after.tx_packets, 0);
    if !check {
        return;
    }
    let r = Rings {
        mem: &h.mem,
        q: &h.rxq,
    };
    let added = r.used_idx().wrapping_sub(used_before);
    if added > h.rxq.size {
        return;
    }
    let mut sum = 0u64;
    for i in 0..added {
        let (id, len) = r.used_entry(used_before.wrapping_add(i));
        assert!(id < u32::from(h.rxq.size), "used id {id}");
        sum += u64::from(len);
    }
    let delivered =
        (after.rx_bytes - before.rx_bytes) + 12 * (after.rx_packets - before.rx_packets);
    assert_eq!(
        sum, delivered,
        "used lengths vs frames delivered ({added} entries)"
    );
}

fuzz_target!(|input: Input| {
    let mut features = input.features | VIRTIO_F_VERSION_1;
    if input.mrg {
        features |= F_MRG_RXBUF;
    }
    let mut h = NetHarness::new(features, input.rx_size, input.tx_size);
    let mut st = State {
        frames_sent: 0,
        payload_sent: 0,
        posted: 0,
        hostile: false,
    };
    run(&mut h, &mut st, false);
    for op in input.ops.iter().take(64) {
        match op {
            Op::Post(bufs) | Op::PostIndirect(bufs) => {
                let bufs: Vec<_> = bufs.iter().take(300).map(|b| h.alloc.resolve(b)).collect();
                if bufs.is_empty() {
                    continue;
                }
                if matches!(op, Op::PostIndirect(_)) {
                    st.posted += 1;
                    add_indirect_chain(&mut h.rxq, &h.mem, &mut h.alloc, &bufs);
                } else {
                    st.posted += bufs.len();
                    h.rxq.add_chain(&h.mem, &bufs);
                }
            }
            Op::PostMany { n, len } => {
                let len = len.get() % (1 << 17);
                for _ in 0..*n {
                    let addr = h.alloc.place(u64::from(len));
                    h.rxq.add_chain(&h.mem, &[(addr, len, true)]);
                    st.posted += 1;
                }
            }
            Op::RawDesc {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let i = index % h.rxq.size;
                h.rxq
                    .write_desc(&h.mem, i, addr.get(), len.get(), *flags, *next);
                st.hostile = true;
            }
            Op::PushAvail(head) => h.rxq.push_avail(&h.mem, *head),
            Op::SetAvailIdx(v) => h.mem.write_obj(*v, GuestAddress(h.rxq.avail + 2)).unwrap(),
            Op::SetUsedEvent(v) => h.rxq.set_used_event(&h.mem, *v),
            Op::Poke { addr, bytes } => {
                let _ = h.mem.write_slice(bytes, GuestAddress(addr.get()));
                st.hostile = true;
            }
            Op::Send { size, seed } => {
                let n = size.get();
                let frame: Vec<u8> = (0..n).map(|i| (i as u8) ^ seed).collect();
                if send(&h.host, &frame) {
                    st.frames_sent += 1;
                    st.payload_sent += n.saturating_sub(12) as u64;
                }
            }
            Op::Notify => run(&mut h, &mut st, true),
            Op::Run => run(&mut h, &mut st, false),
            Op::Restart {
                features,
                rx_size,
                tx_size,
            } => {
                let mut f = *features | VIRTIO_F_VERSION_1;
                if input.mrg {
                    f |= F_MRG_RXBUF;
                }
                h.restart(f, *rx_size, *tx_size);
                // The device dropped every chain it held.
                st.posted = 0;
                st.hostile = false;
                run(&mut h, &mut st, false);
            }
        }
        if st.posted > usize::from(h.rxq.size) {
            st.hostile = true;
        }
    }
    run(&mut h, &mut st, true);
});
