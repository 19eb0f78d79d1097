//! Multi-queue: queue pairs over their own TAP queues (sockets here), and
//! the control queue that enables them.

use super::*;
use crate::virtio::net::ctrl::{CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, ERR, OK};

const CMD: u64 = 0x90_0000;
const ACK: u64 = 0x90_1000;
const RX1BUF: u64 = 0x40_0000;
const TX1BUF: u64 = 0xa0_0000;

struct Mq {
    t: MmioTransport,
    mem: Arc<GuestMemoryMmap>,
    net: Arc<Mutex<Net>>,
    q: Vec<TestQueue>,
    em: Manager,
    hosts: Vec<OwnedFd>,
}

impl Mq {
    /// A two-pair device, started by a driver that took MQ and the control
    /// queue.
    fn start() -> Self {
        Self::with_driver(VIRTIO_F_VERSION_1 | F_CTRL_VQ | F_MQ, 5)
    }

    /// A two-pair device started by a driver that took `features` and set
    /// up its first `queues` queues (RX0, TX0, RX1, TX1, control).
    fn with_driver(features: u64, queues: usize) -> Self {
        let (d0, h0) = seqpacket_pair();
        let (d1, h1) = seqpacket_pair();
        let net = Arc::new(Mutex::new(Net::with_fds(vec![d0, d1], MAC)));
        let handle = GuestMemoryHandle::new(guest_memory());
        let mem = handle.get().unwrap();
        let mut t = MmioTransport::new(net.clone(), handle).unwrap();
        let mut em = Manager::new().unwrap();
        em.add_subscriber(net.clone());
        let q = vec![
            TestQueue::new(0x1000, QUEUE_SIZE),
            TestQueue::new(0x4000, QUEUE_SIZE),
            TestQueue::new(0x7000, QUEUE_SIZE),
            TestQueue::new(0xa000, QUEUE_SIZE),
            TestQueue::new(0xd000, 64),
        ];
        let refs: Vec<&TestQueue> = q.iter().take(queues).collect();
        assert_eq!(start(&mut t, features, &refs), 0xf);
        let mut m = Self {
            t,
            mem,
            net,
            q,
            em,
            hosts: vec![h0, h1],
        };
        m.settle();
        m
    }

    fn settle(&mut self) {
        while self.em.run_with_timeout(20).unwrap() > 0 {}
    }

    /// Sends a control command; returns the answer byte and the length
    /// the device reported.
    fn command(&mut self, bytes: &[u8]) -> (u8, u32) {
        self.command_on(4, bytes)
    }

    /// Sends a control command on queue `ctrl`.
    fn command_on(&mut self, ctrl: usize, bytes: &[u8]) -> (u8, u32) {
        self.mem.write_slice(&[0xee], GuestAddress(ACK)).unwrap();
        self.mem.write_slice(bytes, GuestAddress(CMD)).unwrap();
        let head = self.q[ctrl].add_chain(
            &self.mem,
            &[(CMD, bytes.len() as u32, false), (ACK, 1, true)],
        );
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, ctrl as u32);
        self.settle();
        let used = self.q[ctrl].used(&self.mem);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        let mut ack = [0u8];
        self.mem.read_slice(&mut ack, GuestAddress(ACK)).unwrap();
        (ack[0], used[0].1)
    }

    fn post_rx(&mut self, queue: usize, addr: u64) {
        self.q[queue].add_chain(&self.mem, &[(addr, 2048, true)]);
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, queue as u32);
        self.settle();
    }
}

#[test]
fn a_multi_queue_device_offers_mq_and_its_pair_count() {
    let (d0, _h0) = seqpacket_pair();
    let (d1, _h1) = seqpacket_pair();
    let net = Net::with_fds(vec![d0, d1], MAC);
    assert_ne!(net.device_features() & F_MQ, 0);
    assert_ne!(net.device_features() & F_CTRL_VQ, 0);
    assert_eq!(
        net.queue_max_sizes().len(),
        5,
        "two pairs and the control queue"
    );
    let mut cfg = [0u8; 2];
    net.read_config(8, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 2, "max_virtqueue_pairs");
    let (d, _h) = seqpacket_pair();
    let single = Net::with_fd(d, MAC);
    assert_eq!(single.device_features() & (F_MQ | F_CTRL_VQ), 0);
    assert_eq!(single.queue_max_sizes().len(), 2);
}

#[test]
fn the_second_pair_carries_frames_only_once_the_driver_enables_it() {
    let mut m = Mq::start();
    m.post_rx(2, RX1BUF);
    send(&m.hosts[1], &framed(&payload(100, 1)));
    m.settle();
    assert!(m.q[2].used(&m.mem).is_empty(), "pair 1 is not enabled yet");

    assert_eq!(m.command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]), (OK, 1));
    m.settle();
    let used = m.q[2].used(&m.mem);
    assert_eq!(used.len(), 1, "the waiting frame reached pair 1's RX ring");
    let mut got = vec![0u8; used[0].1 as usize];
    m.mem.read_slice(&mut got, GuestAddress(RX1BUF)).unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &payload(100, 1)[..]);

    // Pair 1's TX leaves on its own TAP queue.
    let out = framed(&payload(80, 2));
    m.mem.write_slice(&out, GuestAddress(TX1BUF)).unwrap();
    m.q[3].add_chain(&m.mem, &[(TX1BUF, out.len() as u32, false)]);
    write_reg(&mut m.t, reg::QUEUE_NOTIFY, 3);
    m.settle();
    assert_eq!(recv_timeout(&m.hosts[1], 1000).as_deref(), Some(&out[..]));
    assert_eq!(recv_timeout(&m.hosts[0], 0), None);
}

#[test]
fn bad_control_commands_are_refused_and_change_nothing() {
    let mut m = Mq::start();
    for bad in [
        &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0][..],
        &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0],
        &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0xff, 0xff],
        &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2],
        &[0, 0, 1],
        &[CTRL_MQ],
    ] {
        assert_eq!(m.command(bad), (ERR, 1), "{bad:?}");
    }
    assert_eq!(m.net.lock().unwrap().enabled(), 1);

    // A chain with no room for the answer comes back unused.
    m.mem.write_slice(&[4, 0, 2, 0], GuestAddress(CMD)).unwrap();
    m.q[4].add_chain(&m.mem, &[(CMD, 4, false)]);
    write_reg(&mut m.t, reg::QUEUE_NOTIFY, 4);
    m.settle();
    assert_eq!(m.q[4].used(&m.mem)[0].1, 0);
    assert_eq!(m.net.lock().unwrap().enabled(), 1);
    assert_eq!(m.net.lock().unwrap().stats().invalid_chains, 1);
}

#[test]
fn a_snapshot_keeps_the_enabled_pairs_and_every_queue() {
    let mut m = Mq::start();
    assert_eq!(m.command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]).0, OK);
    let s = m.t.save_state().unwrap();
    assert_eq!(s.queue_pairs, Some(2));
    assert_eq!(s.queues.len(), 5);
    assert_eq!(s.queues[4].next_avail, 1, "the control queue's position");
    m.t.restore_state(&s).unwrap();
    assert_eq!(m.net.lock().unwrap().enabled(), 2);
    // Pair 1 still receives after the restore.
    m.post_rx(2, RX1BUF);
    send(&m.hosts[1], &framed(&payload(64, 3)));
    m.settle();
    assert_eq!(m.q[2].used(&m.mem).len(), 1);
}

#[test]
fn a_driver_without_mq_gets_one_pair_and_no_control_queue() {
    let m = Mq::with_driver(VIRTIO_F_VERSION_1, 2);
    let n = m.net.lock().unwrap();
    assert_eq!(n.active.len(), 1);
    assert!(n.ctrl.is_none());
}

#[test]
fn a_driver_with_a_control_queue_but_no_mq_finds_it_after_the_first_pair() {
    let mut m = Mq::with_driver(VIRTIO_F_VERSION_1 | F_CTRL_VQ, 3);
    // Queue 2 is the control queue: each command is answered there.
    assert_eq!(
        m.command_on(2, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0]),
        (OK, 1)
    );
    assert_eq!(
        m.command_on(2, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0]),
        (ERR, 1),
        "one pair without MQ"
    );
}

#[test]
fn a_ring_full_of_commands_is_served_a_few_per_wake_up_and_all_answered() {
    let mut m = Mq::start();
    let mut heads = Vec::new();
    for i in 0..20u64 {
        let cmd = CMD + i * 16;
        let ack = ACK + i;
        let n = 1 + (i % 2) as u8;
        m.mem
            .write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, n, 0], GuestAddress(cmd))
            .unwrap();
        heads.push(m.q[4].add_chain(&m.mem, &[(cmd, 4, false), (ack, 1, true)]));
    }
    write_reg(&mut m.t, reg::QUEUE_NOTIFY, 4);
    // One wake-up serves a few and re-arms the queue.
    m.em.run_with_timeout(20).unwrap();
    let first = m.q[4].used(&m.mem).len();
    assert!((1..20).contains(&first), "{first} served in one wake-up");
    m.settle();
    assert_eq!(first + m.q[4].used(&m.mem).len(), 20);
    let mut acks = [0xeeu8; 20];
    m.mem.read_slice(&mut acks, GuestAddress(ACK)).unwrap();
    assert!(acks.iter().all(|&a| a == OK), "{acks:?}");
    assert_eq!(m.net.lock().unwrap().enabled(), 2, "the last command wins");
}
