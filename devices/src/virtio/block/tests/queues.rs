//! Multi-queue disks (`VIRTIO_BLK_F_MQ`): each queue is served, and its
//! completions come back on it.

use super::*;

const F_MQ_BIT: u64 = 1 << 12;

pub(super) fn two_queues(engine: IoEngine) -> Fixture {
    Fixture::build_queues(
        false,
        VIRTIO_F_VERSION_1,
        false,
        engine,
        DISK_SECTORS,
        (2, 2),
    )
}

/// A request on queue `qi` (1..): (used length, status); panics unless it
/// comes back on that queue.
fn request_on(
    f: &mut Fixture,
    qi: usize,
    req_type: u32,
    sector: u64,
    len: u32,
    writable: bool,
) -> (u32, u8) {
    f.hdr(req_type, sector);
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let bufs = [(HDR, 16, false), (DATA, len, writable), (STATUS, 1, true)];
    let head = f.more[qi - 1].add_chain(&f.mem, &bufs);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, qi as u32);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut used = Vec::new();
    while used.is_empty() && std::time::Instant::now() < deadline {
        f.run();
        used = f.more[qi - 1].used(&f.mem);
        assert!(f.q.used(&f.mem).is_empty(), "a completion on queue 0");
    }
    assert_eq!(used.len(), 1, "one completion on queue {qi}");
    assert_eq!(used[0].0, u32::from(head));
    (used[0].1, f.status())
}

fn both_queues_are_served(mut f: Fixture) {
    let mut cfg = [0u8; 2];
    f.blk.lock().unwrap().read_config(34, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 2, "num_queues");
    assert_ne!(f.blk.lock().unwrap().device_features() & F_MQ_BIT, 0);
    // Written through queue 1, read back through queue 0.
    f.mem
        .write_slice(&[0x5au8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request_on(&mut f, 1, T_OUT, 4, 1024, false), (1, S_OK));
    assert_eq!(f.read(4, 1024), (1025, S_OK));
    assert_eq!(f.data(1024), vec![0x5a; 1024]);
    assert_eq!(file_contents(&f.file)[4 * 512..6 * 512], [0x5a; 1024]);
    // And the other way round.
    assert_eq!(f.write(9, &[0xa5; 512]), (1, S_OK));
    assert_eq!(request_on(&mut f, 1, T_IN, 9, 512, true), (513, S_OK));
    assert_eq!(f.data(512), vec![0xa5; 512]);
}

#[test]
fn a_disk_with_two_queues_serves_each_and_answers_on_the_queue_asked() {
    both_queues_are_served(two_queues(IoEngine::Sync));
}

#[test]
fn through_io_uring_each_queues_completions_come_back_on_it() {
    both_queues_are_served(two_queues(IoEngine::Uring));
}

#[test]
fn a_driver_that_sets_up_only_the_first_of_four_queues_is_served() {
    let mut f = Fixture::build_queues(
        false,
        VIRTIO_F_VERSION_1,
        false,
        IoEngine::Sync,
        DISK_SECTORS,
        (4, 1),
    );
    assert!(f.blk.lock().unwrap().is_activated());
    assert_eq!(f.write(3, &[7u8; 512]), (1, S_OK));
    f.assert_still_serving();
}

#[test]
fn a_driver_ok_without_the_first_queue_ready_is_refused() {
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().unwrap();
    let file = image(DISK_SECTORS);
    let cfg = BlockConfig {
        path: file.as_path().to_owned(),
        read_only: false,
        id: None,
        direct: false,
        engine: IoEngine::Sync,
        queues: 2,
        poll: Default::default(),
        limits: Default::default(),
    };
    let mut blk = Block::new(&cfg).unwrap();
    let mut unready: Vec<Queue> = (0..2).map(|_| Queue::new(QUEUE_SIZE).unwrap()).collect();
    unready[1].set_ready(true);
    let irq = Interrupt::new().unwrap();
    assert!(matches!(
        blk.activate(mem, unready, VIRTIO_F_VERSION_1, irq),
        Err(ActivateError::InvalidQueue(0))
    ));
    assert!(!blk.is_activated());
}

#[test]
fn a_single_queue_disk_does_not_offer_multi_queue() {
    let f = Fixture::new(false);
    assert_eq!(f.blk.lock().unwrap().device_features() & F_MQ_BIT, 0);
    let mut cfg = [0u8; 2];
    f.blk.lock().unwrap().read_config(34, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 1);
}
