use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mmio::reg;
use crate::virtio::test_utils::*;
use crate::virtio::{GuestMemoryHandle, MmioTransport, VIRTIO_F_VERSION_1};
use crate::BusDevice;

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x80_0000;

/// A `SOCK_SEQPACKET` pair: one end plays the TAP (frame boundaries are
/// kept), the other is the host side.
fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: socketpair returned two fresh descriptors we now own.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(a.as_raw_fd(), libc::F_GETFL);
        assert_eq!(
            libc::fcntl(a.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK),
            0
        );
    }
    (a, b)
}

fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: `data` is valid for reads of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(n, data.len() as isize);
}

fn recv_timeout(fd: &OwnedFd, ms: i32) -> Option<Vec<u8>> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
        return None;
    }
    let mut buf = vec![0u8; 70000];
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n >= 0);
    buf.truncate(n as usize);
    Some(buf)
}

/// A vnet header (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers) followed by `payload`.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v[0] = 1; // NEEDS_CSUM, to see the header pass through untouched
    v[6..8].copy_from_slice(&34u16.to_le_bytes());
    v[8..10].copy_from_slice(&16u16.to_le_bytes());
    v[10..12].copy_from_slice(&0xeeeeu16.to_le_bytes()); // must be overwritten
    v.extend_from_slice(payload);
    v
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Fixture {
    net: Arc<Mutex<Net>>,
    t: MmioTransport,
    mem: Arc<GuestMemoryMmap>,
    rxq: TestQueue,
    txq: TestQueue,
    em: Manager,
    next_rx: u64,
}

impl Fixture {
    fn start(net: Net, features: u64) -> Self {
        let net = Arc::new(Mutex::new(net));
        let handle = GuestMemoryHandle::new(guest_memory());
        let mem = handle.get().unwrap();
        let mut t = MmioTransport::new(net.clone(), handle).unwrap();
        let mut em = Manager::new().unwrap();
        em.add_subscriber(net.clone());
        let rxq = TestQueue::new(0x1000, QUEUE_SIZE);
        let txq = TestQueue::new(0x8000, QUEUE_SIZE);
        assert_eq!(start(&mut t, features, &[&rxq, &txq]), 0xf);
        let mut f = Self {
            net,
            t,
            mem,
            rxq,
            txq,
            em,
            next_rx: RXBUF,
        };
        f.settle();
        f
    }

    fn with_socket(features: u64) -> (Self, OwnedFd) {
        let (dev, host) = seqpacket_pair();
        (Self::start(Net::with_fd(dev, MAC), features), host)
    }

    /// Runs the event loop until it is idle.
    fn settle(&mut self) {
        while self.em.run_with_timeout(20).unwrap() > 0 {}
    }

    /// Posts `n` RX chains of `size` bytes each (one descriptor each).
    fn post_rx(&mut self, n: usize, size: u32) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let addr = self.next_rx;
            self.next_rx += u64::from(size);
            let head = self.rxq.add_chain(&self.mem, &[(addr, size, true)]);
            out.push((head, addr));
        }
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, 0);
        out
    }

    fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn stats(&self) -> NetStats {
        self.net.lock().unwrap().stats()
    }

    fn tap_polled(&self) -> bool {
        self.net.lock().unwrap().tap_registered[0]
    }

    /// Queues a TX chain with the given readable buffers and notifies.
    fn transmit(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.txq.add_chain(&self.mem, bufs);
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, 1);
        self.settle();
        head
    }
}

#[test]
fn config_space_and_features() {
    let (mut f, _host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let mut cfg = [0u8; 8];
    f.t.read(0x100, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "LINK_UP");
    assert_eq!(read_reg(&mut f.t, reg::DEVICE_ID), 1);
    write_reg(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    let lo = u64::from(read_reg(&mut f.t, reg::DEVICE_FEATURES));
    write_reg(&mut f.t, reg::DEVICE_FEATURES_SEL, 1);
    let hi = u64::from(read_reg(&mut f.t, reg::DEVICE_FEATURES));
    let feats = lo | hi << 32;
    for bit in [
        F_CSUM,
        F_GUEST_CSUM,
        F_MAC,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_HOST_TSO4,
        F_HOST_TSO6,
        F_MRG_RXBUF,
        F_STATUS,
        VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(feats & bit, 0, "{bit:#x}");
    }
    assert_eq!(feats & (1 << 14), 0, "no HOST_UFO");
}

#[test]
fn mac_from_tap_name_is_stable_local_unicast() {
    let a = mac_from_name("tap0");
    assert_eq!(a, mac_from_name("tap0"));
    assert_ne!(a, mac_from_name("tap1"));
    assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
    assert_eq!(parse_mac("02:11:22:33:44:55"), Some(MAC));
    assert_eq!(parse_mac("02:11:22:33:44"), None);
    assert_eq!(parse_mac("02:11:22:33:44:55:66"), None);
    assert_eq!(parse_mac("0g:11:22:33:44:55"), None);
    assert_eq!(format_mac(MAC), "02:11:22:33:44:55");
    assert_eq!(parse_mac(&format_mac(a)), Some(a), "round trip");
}

#[test]
fn tx_gathers_header_and_data_into_one_frame() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let frame = framed(&payload(300, 1));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    let head = f.transmit(&[
        (TXBUF, 12, false),
        (TXBUF + 12, 100, false),
        (TXBUF + 112, 200, false),
    ]);
    assert_eq!(recv_timeout(&host, 1000).unwrap(), frame);
    assert_eq!(f.txq.used(&f.mem), vec![(u32::from(head), 0)]);
    let s = f.stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, 300));
    assert!(f.t.interrupt_event().read().is_ok());
}

#[test]
fn tx_invalid_chains_are_returned_and_queue_keeps_going() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let frame = framed(&payload(60, 2));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    // A device-writable buffer in a TX chain.
    f.transmit(&[(TXBUF, 12, false), (TXBUF + 12, 60, true)]);
    // Shorter than the vnet header.
    f.transmit(&[(TXBUF, 8, false)]);
    // Outside guest memory.
    f.transmit(&[(TXBUF, 12, false), (MEM_SIZE as u64, 60, false)]);
    // Looping.
    let i = f.txq.alloc(1)[0];
    f.txq.write_desc(&f.mem, i, TXBUF, 12, VRING_DESC_F_NEXT, i);
    f.txq.push_avail(&f.mem, i);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    f.settle();
    assert_eq!(f.txq.used(&f.mem).len(), 4);
    assert!(recv_timeout(&host, 50).is_none());
    assert_eq!(f.stats().invalid_chains, 4);
    f.transmit(&[(TXBUF, 72, false)]);
    assert_eq!(recv_timeout(&host, 1000).unwrap(), frame);
}

#[test]
fn rx_without_mrg_rxbuf_uses_one_chain_per_frame() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let bufs = f.post_rx(2, 2048);
    f.settle();
    let frame = framed(&payload(1000, 3));
    send(&host, &frame);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 1012)]);
    let got = f.read_mem(bufs[0].1, 1012);
    assert_eq!(&got[..10], &frame[..10], "header passes through");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &frame[12..]);
    let s = f.stats();
    assert_eq!((s.rx_packets, s.rx_bytes), (1, 1000));
    assert!(f.t.interrupt_event().read().is_ok());
}

#[test]
fn rx_chains_of_changing_shapes_each_get_their_whole_frame() {
    // The device reuses a used chain's lists for the next chain it pops:
    // a chain of three buffers after one-buffer chains, and one-buffer
    // chains after it, must each be filled as their own descriptors say.
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    for round in 0..3u8 {
        let frame = framed(&payload(700, round));
        let (head, bufs): (u16, Vec<(u64, u32)>) = if round == 1 {
            // num_buffers (bytes 10 and 11) straddles the first two.
            let b = vec![(0x40000, 11), (0x41000, 300), (0x42000, 1000)];
            let descs: Vec<(u64, u32, bool)> = b.iter().map(|&(a, l)| (a, l, true)).collect();
            let head = f.rxq.add_chain(&f.mem, &descs);
            write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
            (head, b)
        } else {
            let (head, addr) = f.post_rx(1, 2048)[0];
            (head, vec![(addr, 2048)])
        };
        f.settle();
        send(&host, &frame);
        f.settle();
        assert_eq!(
            f.rxq.used(&f.mem),
            vec![(u32::from(head), 712)],
            "round {round}"
        );
        let mut got = Vec::new();
        for (addr, len) in bufs {
            got.extend(f.read_mem(addr, len as usize));
        }
        got.truncate(712);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[12..], &frame[12..], "round {round}");
    }
    assert_eq!(f.stats().rx_packets, 3);
}

#[test]
fn rx_mrg_rxbuf_frame_spans_chains_and_says_how_many() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    // 256 x 512 bytes: the frame's start is read into the first chain, its
    // rest (through the bounce buffer) copied into the next two.
    let bufs = f.post_rx(256, 512);
    f.settle();
    let frame = framed(&payload(1400, 4));
    send(&host, &frame);
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![
            (u32::from(bufs[0].0), 512),
            (u32::from(bufs[1].0), 512),
            (u32::from(bufs[2].0), 388)
        ]
    );
    let mut got = Vec::new();
    for (i, len) in [(0, 512), (1, 512), (2, 388)] {
        got.extend(f.read_mem(bufs[i].1, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &frame[12..]);
    // The next frame continues with the next chain.
    let small = framed(&payload(50, 5));
    send(&host, &small);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[3].0), 62)]);
    let got = f.read_mem(bufs[3].1, 62);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[12..], &small[12..]);
}

#[test]
fn rx_mrg_rxbuf_with_few_buffers_still_delivers() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let bufs = f.post_rx(4, 512);
    f.settle();
    let frame = framed(&payload(1400, 6));
    send(&host, &frame);
    let small = framed(&payload(100, 7));
    send(&host, &small);
    let big = framed(&payload(3000, 8));
    send(&host, &big);
    f.settle();
    // Frame 1 in chains 0..3, frame 2 in chain 3, frame 3 waits.
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![
            (u32::from(bufs[0].0), 512),
            (u32::from(bufs[1].0), 512),
            (u32::from(bufs[2].0), 388),
            (u32::from(bufs[3].0), 112)
        ]
    );
    let mut got = Vec::new();
    for (i, len) in [(0, 512), (1, 512), (2, 388)] {
        got.extend(f.read_mem(bufs[i].1, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[12..], &frame[12..]);
    assert_eq!(&f.read_mem(bufs[3].1, 112)[12..], &small[12..]);
    // The TAP is no longer polled while frame 3 waits for buffers.
    assert!(!f.tap_polled());
    assert_eq!(f.em.run_with_timeout(50).unwrap(), 0);
    // Enough buffers for it, a few at a time.
    let more = f.post_rx(3, 512);
    f.settle();
    assert!(f.rxq.used(&f.mem).is_empty());
    let more2 = f.post_rx(4, 512);
    f.settle();
    let used = f.rxq.used(&f.mem);
    assert_eq!(used.len(), 6);
    let mut got = Vec::new();
    for (k, &(id, len)) in used.iter().enumerate() {
        let (head, addr) = if k < 3 { more[k] } else { more2[k - 3] };
        assert_eq!(id, u32::from(head));
        got.extend(f.read_mem(addr, len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 6);
    assert_eq!(&got[12..], &big[12..]);
    assert_eq!(f.stats().rx_packets, 3);
}

/// RX chains the device has popped and holds for the next frames.
fn rx_chains_held(f: &Fixture) -> usize {
    f.net.lock().unwrap().active[0].rx_chains.len()
}

#[test]
fn an_mtu_frame_is_read_into_one_chain_and_a_bigger_one_overflows_into_the_next() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let bufs = f.post_rx(8, 2048);
    f.settle();
    // MTU-sized traffic: the device takes one chain at a time.
    assert_eq!(rx_chains_held(&f), 1);
    let mtu = framed(&payload(1514, 1));
    send(&host, &mtu);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 1526)]);
    let got = f.read_mem(bufs[0].1, 1526);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &mtu[12..]);
    assert_eq!(rx_chains_held(&f), 1);
    // A frame that does not fit the front chain: its rest was read into
    // the bounce buffer and is copied into the next chain.
    let big = framed(&payload(3000, 2));
    send(&host, &big);
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![(u32::from(bufs[1].0), 2048), (u32::from(bufs[2].0), 964)]
    );
    let mut got = f.read_mem(bufs[1].1, 2048);
    got.extend(f.read_mem(bufs[2].1, 964));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &big[12..]);
    let s = f.stats();
    assert_eq!((s.rx_packets, s.rx_bytes, s.invalid_chains), (2, 4514, 0));
}

#[test]
fn a_frame_started_in_the_front_chain_waits_there_for_buffers_for_its_rest() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    let first = f.post_rx(1, 2048);
    f.settle();
    let big = framed(&payload(3000, 4));
    send(&host, &big);
    f.settle();
    assert!(f.rxq.used(&f.mem).is_empty(), "no room for its rest yet");
    assert!(!f.tap_polled());
    let second = f.post_rx(1, 2048);
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![(u32::from(first[0].0), 2048), (u32::from(second[0].0), 964)]
    );
    let mut got = f.read_mem(first[0].1, 2048);
    got.extend(f.read_mem(second[0].1, 964));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &big[12..]);
    assert_eq!(f.stats().rx_packets, 1);
}

#[test]
fn after_a_big_frame_reads_go_wide_and_return_to_one_chain_after_a_run_of_small_ones() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    f.post_rx(256, 2048);
    f.settle();
    send(&host, &framed(&payload(3000, 1)));
    f.settle();
    assert_eq!(f.rxq.used(&f.mem).len(), 2);
    // Chains for a maximal frame (33 of 2 KiB) are held for the next read.
    assert_eq!(rx_chains_held(&f), 33);
    let small = framed(&payload(100, 2));
    for _ in 0..BIG_FRAMES_HOLD - 1 {
        send(&host, &small);
        f.settle();
    }
    assert_eq!(rx_chains_held(&f), 33, "still wide");
    // A big frame now is read in place, no copy, and restarts the hold.
    let big = framed(&payload(5000, 3));
    send(&host, &big);
    f.settle();
    let used = f.rxq.used(&f.mem);
    let tail: Vec<u32> = used[used.len() - 3..].iter().map(|u| u.1).collect();
    assert_eq!(tail, vec![2048, 2048, 916]);
    for _ in 0..BIG_FRAMES_HOLD - 1 {
        send(&host, &small);
        f.settle();
    }
    assert_eq!(rx_chains_held(&f), 33, "the big frame restarted the hold");
    send(&host, &small);
    f.settle();
    // The chains already held are used first; once down to what the next
    // read needs, one is taken at a time again.
    let mut sent = 0;
    while rx_chains_held(&f) > 1 {
        send(&host, &small);
        f.settle();
        sent += 1;
        assert!(sent <= 40, "the device kept holding chains");
    }
    // 33 held at the last wide read, one of them used by its frame.
    assert_eq!(sent, 31);
    let s = f.stats();
    assert_eq!(s.rx_packets, 1 + 2 * u64::from(BIG_FRAMES_HOLD) + sent);
    assert_eq!(s.invalid_chains + s.rx_dropped, 0);
}

#[test]
fn rx_without_buffers_stops_polling_the_tap_until_the_guest_adds_some() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    // No buffers at all after activation: the TAP is not polled.
    assert!(!f.tap_polled());
    let bufs = f.post_rx(1, 2048);
    f.settle();
    assert!(f.tap_polled());
    let frames: Vec<_> = (0..3).map(|i| framed(&payload(100 + i, i as u8))).collect();
    for fr in &frames {
        send(&host, fr);
    }
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 112)]);
    assert!(!f.tap_polled());
    assert_eq!(f.stats().rx_deferred, 1);
    // Idle: nothing wakes the loop although two frames are waiting.
    let t0 = Instant::now();
    assert_eq!(f.em.run_with_timeout(100).unwrap(), 0);
    assert!(t0.elapsed() >= Duration::from_millis(90));
    // The guest refills: both waiting frames arrive, none was lost.
    let bufs = f.post_rx(4, 2048);
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![(u32::from(bufs[0].0), 113), (u32::from(bufs[1].0), 114)]
    );
    assert_eq!(&f.read_mem(bufs[1].1, 114)[12..], &frames[2][12..]);
    assert!(f.tap_polled());
    assert_eq!(f.stats().rx_packets, 3);
}

#[test]
fn rx_invalid_chains_are_returned_and_next_chain_is_used() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    // Device-readable buffer, too small for the header, outside memory.
    let bad1 = f.rxq.add_chain(&f.mem, &[(RXBUF, 2048, false)]);
    let bad2 = f.rxq.add_chain(&f.mem, &[(RXBUF, 8, true)]);
    let bad3 = f
        .rxq
        .add_chain(&f.mem, &[(MEM_SIZE as u64 - 100, 2048, true)]);
    let good = f.rxq.add_chain(&f.mem, &[(RXBUF + 4096, 2048, true)]);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.settle();
    send(&host, &framed(&payload(64, 9)));
    f.settle();
    assert_eq!(
        f.rxq.used(&f.mem),
        vec![
            (u32::from(bad1), 0),
            (u32::from(bad2), 0),
            (u32::from(bad3), 0),
            (u32::from(good), 76)
        ]
    );
    assert_eq!(f.stats().invalid_chains, 3);
}

#[test]
fn reset_drops_rx_state_and_stops_serving() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1 | F_MRG_RXBUF);
    f.post_rx(4, 512);
    f.settle();
    send(&host, &framed(&payload(3000, 1)));
    f.settle();
    write_reg(&mut f.t, reg::STATUS, 0);
    assert!(!f.net.lock().unwrap().is_activated());
    send(&host, &framed(&payload(10, 2)));
    f.settle();
    assert!(!f.tap_polled());
    assert!(f.rxq.used(&f.mem).is_empty());
    assert_eq!(read_reg(&mut f.t, reg::INTERRUPT_STATUS), 0);
    // A new driver: fresh rings, the frame queued meanwhile arrives.
    f.rxq = TestQueue::new(0x20000, 64);
    f.txq = TestQueue::new(0x28000, 64);
    assert_eq!(start(&mut f.t, VIRTIO_F_VERSION_1, &[&f.rxq, &f.txq]), 0xf);
    let bufs = f.post_rx(1, 2048);
    f.settle();
    assert_eq!(f.rxq.used(&f.mem), vec![(u32::from(bufs[0].0), 22)]);
}

#[test]
fn a_driver_that_never_enables_the_transmit_queue_is_refused_at_driver_ok() {
    let (dev, _host) = seqpacket_pair();
    let net = Arc::new(Mutex::new(Net::with_fd(dev, MAC)));
    let handle = GuestMemoryHandle::new(guest_memory());
    let mut t = MmioTransport::new(net.clone(), handle).unwrap();
    // Only the receive queue is set up.
    let rxq = TestQueue::new(0x1000, QUEUE_SIZE);
    let status = start(&mut t, VIRTIO_F_VERSION_1, &[&rxq]);
    assert_eq!(status & 0x4, 0, "DRIVER_OK refused: {status:#x}");
    assert!(!net.lock().unwrap().is_activated());
}

// --- A real TAP, inside a network namespace of this test's own thread ---

const ETH_P_ALL: u16 = 0x0003;
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn ioctl_ifreq(sock: &OwnedFd, req: libc::Ioctl, ifr: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: the ioctl reads/writes one ifreq, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req, ifr as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn socket(domain: i32, ty: i32, proto: i32) -> OwnedFd {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn link_up(name: &str) -> i32 {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    // SAFETY: ifreq is plain old data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut ifr).unwrap();
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut ifr).unwrap();
    ioctl_ifreq(&sock, libc::SIOCGIFINDEX, &mut ifr).unwrap();
    // SAFETY: SIOCGIFINDEX filled the index member.
    unsafe { ifr.ifr_ifru.ifru_ifindex }
}

fn packet_socket(ifindex: i32) -> OwnedFd {
    let s = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from(ETH_P_ALL.to_be()),
    );
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            s.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    s
}

fn tap_test_body() {
    // SAFETY: unshare only changes this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "skipping TAP test: unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let net = match Net::new(&NetConfig {
        tap: "vtest0".into(),
        mac: None,
        vhost: super::vhost::VhostMode::Off,
        queues: 1,
        poll_us: 0,
    }) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("skipping TAP test: {e}");
            return;
        }
    };
    let mac = net.mac();
    assert_eq!(mac, mac_from_name("vtest0"));
    let ifindex = link_up("vtest0");
    let pkt = packet_socket(ifindex);
    let mut f = Fixture::start(
        net,
        VIRTIO_F_VERSION_1
            | F_MRG_RXBUF
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6,
    );
    let bufs = f.post_rx(64, 2048);
    f.settle();

    // Host -> guest. The kernel may also send its own frames (IPv6
    // neighbour discovery, ...): look for ours.
    let mut frame = Vec::new();
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&TEST_ETHERTYPE);
    frame.extend_from_slice(b"hello guest, from the host");
    frame.resize(200, 0xa5);
    send(&pkt, &frame);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    let mut seen = 0usize;
    while !found && Instant::now() < deadline {
        f.em.run_with_timeout(100).unwrap();
        for (id, len) in f.rxq.used(&f.mem) {
            let &(_, addr) = bufs.iter().find(|b| u32::from(b.0) == id).unwrap();
            let got = f.read_mem(addr, len as usize);
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
            seen += 1;
            if got[12..] == frame[..] {
                found = true;
            }
        }
    }
    assert!(found, "frame reached the guest ({seen} frames seen)");

    // Guest -> host.
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend_from_slice(&[0xff; 6]);
    out.extend_from_slice(&mac);
    out.extend_from_slice(&TEST_ETHERTYPE);
    out.extend_from_slice(b"hello host, from the guest");
    out.resize(VNET_HDR_LEN + 100, 0x5a);
    f.mem.write_slice(&out, GuestAddress(TXBUF)).unwrap();
    f.transmit(&[(TXBUF, 12, false), (TXBUF + 12, 100, false)]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    while !found && Instant::now() < deadline {
        if let Some(got) = recv_timeout(&pkt, 100) {
            found = got == out[VNET_HDR_LEN..];
        }
    }
    assert!(found, "frame reached the host");
    let s = f.stats();
    assert_eq!(s.tx_packets, 1);
    assert!(s.rx_packets >= 1);
}

#[test]
fn tap_tx_and_rx_in_a_network_namespace() {
    // A thread of its own: the namespace dies with it.
    std::thread::spawn(tap_test_body).join().unwrap();
}

/// Used entries that each single event-loop pass returns, until idle.
fn used_per_pass(f: &mut Fixture, tx: bool) -> Vec<usize> {
    let mut per_pass = Vec::new();
    while f.em.run_with_timeout(20).unwrap() > 0 {
        let q = if tx { &mut f.txq } else { &mut f.rxq };
        per_pass.push(q.used(&f.mem).len());
    }
    per_pass
}

#[test]
fn a_tx_wake_up_sends_at_most_its_budget_and_comes_back_for_the_rest() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    f.net.lock().unwrap().set_budget(2);
    let frame = framed(&payload(60, 7));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    for _ in 0..5 {
        f.txq.add_chain(&f.mem, &[(TXBUF, 72, false)]);
    }
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(used_per_pass(&mut f, true), vec![2, 2, 1]);
    for _ in 0..5 {
        assert_eq!(recv_timeout(&host, 1000).as_deref(), Some(&frame[..]));
    }
}

/// The guest queues a frame right after the device's last look at the TX
/// ring and before it turns kicks back on (it was told not to kick, so it
/// does not): the re-arm sees the index moved and the same wake-up sends
/// it.
#[test]
fn a_frame_queued_just_before_tx_kicks_are_re_armed_is_sent_without_a_kick() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    let frame = framed(&payload(60, 9));
    f.mem.write_slice(&frame, GuestAddress(TXBUF)).unwrap();
    let head = f.txq.alloc(1)[0];
    f.txq
        .write_desc(&f.mem, head, TXBUF, frame.len() as u32, 0, 0);
    let (mem, avail) = (f.mem.clone(), f.txq.avail);
    f.net.lock().unwrap().before_rearm = Some(Box::new(move || {
        mem.write_obj(head, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    }));
    // A wake-up that finds nothing.
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 1);
    f.em.run_with_timeout(20).unwrap();
    assert_eq!(f.txq.used(&f.mem), vec![(u32::from(head), 0)]);
    assert_eq!(recv_timeout(&host, 1000).as_deref(), Some(&frame[..]));
}

#[test]
fn an_rx_wake_up_delivers_at_most_its_budget_and_the_tap_brings_it_back() {
    let (mut f, host) = Fixture::with_socket(VIRTIO_F_VERSION_1);
    f.net.lock().unwrap().set_budget(2);
    f.post_rx(6, 2048);
    f.settle();
    assert!(f.tap_polled());
    for i in 0..5 {
        send(&host, &framed(&payload(100, i)));
    }
    assert_eq!(used_per_pass(&mut f, false), vec![2, 2, 1]);
    assert_eq!(f.stats().rx_packets, 5);
    assert!(f.tap_polled(), "a buffer is left: the TAP stays polled");
}

mod dirty;
mod publish;
mod signal;
mod state;

mod mq;
