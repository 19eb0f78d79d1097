//! virtio-net's control queue: commands from a hostile driver to a real
//! two-pair `Net` (over socket pairs in place of a multi-queue TAP),
//! notified through the MMIO transport and served by the event loop.
//!
//! Checks: the device never panics or wedges; every chain it returns on
//! the control queue has 0 or 1 byte written; a well-formed command (its
//! bytes readable, one writable answer byte after them) is answered `OK`
//! exactly when it asks for 1 to the number of pairs the driver set up
//! (two with MQ, one without) and `ERR` otherwise, and the pairs the
//! device reports as enabled follow it; a frame sent to a pair's TAP end
//! reaches the guest only through an enabled pair.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::virtio::mmio::reg;
use devices::virtio::net::{F_CTRL_VQ, F_MQ};
use devices::virtio::test_utils::{start, write_reg, TestQueue};
use devices::virtio::{MmioTransport, Net, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::net::{send, seqpacket_pair, served, settle, Manager};
use vmm_fuzz::virtio::{fill_stream, queue_size, Alloc, BufSpec, RING_AREA};

/// Room for one small queue's rings (size 32 at most here).
const QUEUE_AREA: u64 = 0x600;
const MAX_SIZE: u16 = 32;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A command laid out as a driver does: its bytes, then the answer.
    Command {
        bytes: Vec<u8>,
    },
    /// Any chain at all on the control queue.
    Raw {
        bufs: Vec<BufSpec>,
        data: Vec<u8>,
    },
    /// A notification of any queue.
    Notify(u8),
    /// A frame arrives on pair `p`'s TAP queue; an RX buffer is posted on
    /// pair `p` first when `post` says so.
    Frame {
        pair: bool,
        post: bool,
    },
    Restart {
        features: u64,
        sizes: [u8; 5],
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    sizes: [u8; 5],
    ops: Vec<Op>,
}

struct Harness {
    net: Arc<Mutex<Net>>,
    t: MmioTransport,
    mem: Arc<devices::virtio::GuestMemoryMmap>,
    em: Manager,
    hosts: Vec<std::os::fd::OwnedFd>,
    queues: Vec<TestQueue>,
    alloc: Alloc,
    acked: u64,
    running: bool,
}

impl Harness {
    fn restart(&mut self, features: u64, sizes: [u8; 5]) {
        write_reg(&mut self.t, reg::STATUS, 0);
        let offered = self
            .net
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_features();
        self.acked = (features & offered) | VIRTIO_F_VERSION_1;
        self.queues = (0..5)
            .map(|i| {
                let base = RING_AREA.0 + QUEUE_AREA * i as u64;
                self.mem
                    .write_slice(&[0u8; QUEUE_AREA as usize], GuestAddress(base))
                    .expect("ring area");
                TestQueue::new(base, queue_size(sizes[i], MAX_SIZE))
            })
            .collect();
        let refs: Vec<&TestQueue> = self.queues.iter().collect();
        self.running = start(&mut self.t, self.acked, &refs) & 0x4 != 0;
        self.settle();
    }

    fn settle(&mut self) {
        settle(&mut self.em);
    }

    fn mq(&self) -> bool {
        self.acked & F_MQ != 0
    }

    /// The control queue's index, where the driver has one.
    fn ctrl(&self) -> Option<usize> {
        (self.acked & F_CTRL_VQ != 0).then(|| if self.mq() { 4 } else { 2 })
    }

    fn enabled(&self) -> u64 {
        self.net
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()
            .enabled_pairs()
    }

    fn notify(&mut self, q: usize) {
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, q as u32);
        self.settle();
    }
}

fuzz_target!(|input: Input| {
    let (d0, h0) = seqpacket_pair();
    let (d1, h1) = seqpacket_pair();
    let (net, t, mem, em) = served(Net::with_fds(vec![d0, d1], [2, 0, 0, 0, 0, 1]));
    let mut h = Harness {
        net,
        t,
        mem,
        em,
        hosts: vec![h0, h1],
        queues: Vec::new(),
        alloc: Alloc::default(),
        acked: 0,
        running: false,
    };
    h.restart(input.features, input.sizes);
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Command { bytes } => {
                let Some(c) = h.ctrl() else { continue };
                let bytes = &bytes[..bytes.len().min(64)];
                if bytes.is_empty() {
                    continue;
                }
                let cmd = h.alloc.place(bytes.len() as u64);
                let ack = h.alloc.place(1);
                let _ = h.mem.write_slice(bytes, GuestAddress(cmd));
                let _ = h.mem.write_slice(&[0xee], GuestAddress(ack));
                let before = h.enabled();
                let mem = h.mem.clone();
                h.queues[c].add_chain(&mem, &[(cmd, bytes.len() as u32, false), (ack, 1, true)]);
                h.notify(c);
                if !h.running {
                    continue;
                }
                let used = h.queues[c].used(&h.mem);
                // A ring of 1 or 2 descriptors wraps the chain onto itself.
                if h.queues[c].size < 2 || used.is_empty() {
                    continue;
                }
                let mut answer = [0u8];
                h.mem
                    .read_slice(&mut answer, GuestAddress(ack))
                    .expect("ack");
                let serving = if h.mq() { 2 } else { 1 };
                let want = match bytes {
                    [4, 0, a, b, ..] => {
                        let n = u64::from(u16::from_le_bytes([*a, *b]));
                        (1..=serving).contains(&n).then_some(n)
                    }
                    _ => None,
                };
                match want {
                    Some(n) => {
                        assert_eq!(answer[0], 0, "{bytes:?} answered");
                        assert_eq!(h.enabled(), n);
                    }
                    None => {
                        assert_eq!(answer[0], 1, "{bytes:?} answered");
                        assert_eq!(h.enabled(), before);
                    }
                }
            }
            Op::Raw { bufs, data } => {
                let Some(c) = h.ctrl() else { continue };
                if bufs.is_empty() {
                    continue;
                }
                let bufs: Vec<_> = bufs.iter().take(8).map(|b| h.alloc.resolve(b)).collect();
                fill_stream(&h.mem, &bufs, &data);
                let mem = h.mem.clone();
                h.queues[c].add_chain(&mem, &bufs);
                h.notify(c);
                for (_, len) in h.queues[c].used(&h.mem) {
                    assert!(len <= 1, "a control answer of {len} bytes");
                }
            }
            Op::Notify(q) => h.notify(usize::from(q % 6)),
            Op::Frame { pair, post } => {
                let p = usize::from(pair);
                let rxq = 2 * p;
                // Without MQ a control queue sits where pair 1's RX would.
                if h.ctrl() == Some(rxq) {
                    continue;
                }
                if post && h.queues[rxq].size >= 2 {
                    let buf = h.alloc.place(2048);
                    let mem = h.mem.clone();
                    h.queues[rxq].add_chain(&mem, &[(buf, 2048, true)]);
                    h.notify(rxq);
                }
                let mut frame = vec![0u8; 12];
                frame.extend_from_slice(&[0xab; 60]);
                send(&h.hosts[p], &frame);
                h.settle();
                let used = h.queues[rxq].used(&h.mem);
                if p as u64 >= h.enabled() {
                    assert!(
                        used.iter().all(|&(_, len)| len == 0),
                        "a frame on a disabled pair"
                    );
                }
            }
            Op::Restart { features, sizes } => h.restart(features, sizes),
        }
        assert!((1..=2).contains(&h.enabled()));
    }
});
