//! Adaptive polling (`poll_us`): what the disk's thread finds while it
//! polls is served without a kick or a second wake-up, and a broken ring
//! cannot keep it spinning.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::*;

/// A second request's buffers, apart from the fixture's.
const HDR2: u64 = 0x50_0000;
const DATA2: u64 = 0x50_1000;
const STATUS2: u64 = 0x50_2000;

/// Publishes a 512-byte read of `sector` (no kick); its head.
fn publish_read(f: &mut Fixture, sector: u64) -> u16 {
    f.hdr(T_IN, sector);
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let bufs = [(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)];
    f.q.add_chain(&f.mem, &bufs)
}

/// Whether a driver that just moved the avail index from `old` to `new`
/// must kick, for the used ring at `used` of a `size`-entry queue: its
/// `NO_NOTIFY` flag, or with EVENT_IDX whether the move crossed
/// `avail_event` (the kernel's `vring_need_event`).
fn kick_needed(
    mem: &GuestMemoryMmap,
    used: u64,
    size: u16,
    event_idx: bool,
    old: u16,
    new: u16,
) -> bool {
    if !event_idx {
        let flags: u16 = mem.read_obj(GuestAddress(used)).unwrap();
        return flags & 1 == 0;
    }
    let ev: u16 = mem
        .read_obj(GuestAddress(used + 4 + 8 * u64::from(size)))
        .unwrap();
    new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A GET_ID request's descriptors (the second request's buffers), not
/// yet in the avail ring; its head.
fn unpublished_get_id(f: &mut Fixture) -> u16 {
    f.mem.write_obj(T_GET_ID, GuestAddress(HDR2)).unwrap();
    f.mem.write_obj(0xffu8, GuestAddress(STATUS2)).unwrap();
    let idx = f.q.alloc(3);
    f.q.write_desc(&f.mem, idx[0], HDR2, 16, VRING_DESC_F_NEXT, idx[1]);
    let w = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
    f.q.write_desc(&f.mem, idx[1], DATA2, ID_BYTES as u32, w, idx[2]);
    f.q.write_desc(&f.mem, idx[2], STATUS2, 1, VRING_DESC_F_WRITE, 0);
    idx[0]
}

/// The guest publishes a request right after the device's last look at
/// the avail ring and before it turns kicks back on (it was told not to
/// kick, so it does not): the re-arm sees the index moved and the same
/// wake-up serves it. (A pass that popped nothing used to stop there,
/// taking the moved index for a broken ring.)
#[test]
fn a_request_published_just_before_kicks_are_re_armed_is_served_without_a_kick() {
    let mut f = Fixture::new(true);
    let head = unpublished_get_id(&mut f);
    let (mem, avail) = (f.mem.clone(), f.q.avail);
    f.blk.lock().unwrap().before_rearm = Some(Box::new(move || {
        // Avail slot 0, then the index: a driver's publish, no kick.
        mem.write_obj(head, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    }));
    // A wake-up that finds nothing (a stale kick, or polling's last look).
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert_eq!(f.q.used(&f.mem), vec![(u32::from(head), 21)]);
    let mut serial = [0u8; 13];
    f.mem.read_slice(&mut serial, GuestAddress(DATA2)).unwrap();
    assert_eq!(&serial, b"disk-serial-1");
}

/// Request 1 is kicked; request 2 (GET_ID) is published by another thread
/// once request 1's interrupt came and the device has told the driver not
/// to kick (it is polling), and never kicked. One wake-up serves both.
fn serve_an_unkicked_request_while_polling(event_idx: bool) {
    let features = if event_idx {
        VIRTIO_F_VERSION_1 | super::super::super::VIRTIO_RING_F_EVENT_IDX
    } else {
        VIRTIO_F_VERSION_1
    };
    let mut f = Fixture::with_features(true, features);
    f.blk.lock().unwrap().force_poll(Duration::from_millis(300));
    let head2 = unpublished_get_id(&mut f);
    let avail = f.q.avail;
    let used = f.q.used;
    let size = f.q.size;
    let mem = f.mem.clone();
    let irq = f.t.interrupt_event().try_clone().unwrap();
    // Whatever setting the device up signalled.
    let _ = irq.read();
    let publisher = std::thread::spawn(move || {
        let mut pfd = libc::pollfd {
            fd: irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(ready, 1, "request 1 never came back");
        // The device polls, and says so: no kick wanted for request 2.
        let deadline = Instant::now() + Duration::from_secs(5);
        while kick_needed(&mem, used, size, event_idx, 1, 2) {
            assert!(
                Instant::now() < deadline,
                "the polling device still asks for kicks"
            );
            std::hint::spin_loop();
        }
        // Avail slot 1, then the index: what a driver does, minus the kick.
        mem.write_obj(head2, GuestAddress(avail + 4 + 2)).unwrap();
        mem.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
    });

    let head1 = publish_read(&mut f, 1);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    // One wake-up, for the one kick.
    f.run();
    publisher.join().unwrap();

    let got = f.q.used(&f.mem);
    assert_eq!(got, vec![(u32::from(head1), 513), (u32::from(head2), 21)]);
    assert_eq!(f.status(), S_OK);
    assert_eq!(f.data(512), vec![1u8; 512]);
    let mut serial = [0u8; 13];
    f.mem.read_slice(&mut serial, GuestAddress(DATA2)).unwrap();
    assert_eq!(&serial, b"disk-serial-1");
    assert!(f.stats().polled >= 1);
    // The thread sleeps again: the guest's next request must kick.
    let left_off = !kick_needed(&f.mem, used, size, event_idx, 2, 3);
    assert!(!left_off, "the guest was left told not to kick");
}

#[test]
fn a_polling_disk_serves_a_request_the_guest_published_without_a_kick() {
    serve_an_unkicked_request_while_polling(false);
}

#[test]
fn a_polling_disk_with_event_idx_serves_a_request_the_guest_published_without_a_kick() {
    serve_an_unkicked_request_while_polling(true);
}

#[test]
fn a_polling_disk_completes_io_uring_reads_without_waking_again() {
    let mut f = Fixture::uring();
    f.blk.lock().unwrap().force_poll(Duration::from_millis(300));
    let head = publish_read(&mut f, 2);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    // Without polling, the completion needs a wake-up of its own.
    f.run();
    assert_eq!(f.q.used(&f.mem), vec![(u32::from(head), 513)]);
    assert_eq!((f.status(), f.data(512)), (S_OK, vec![2u8; 512]));
    assert_eq!(f.stats().polled, 1);
}

#[test]
fn a_disk_that_does_not_poll_leaves_an_unkicked_request_for_the_kick() {
    let mut f = Fixture::new(true);
    let head = publish_read(&mut f, 3);
    f.run();
    assert!(f.q.used(&f.mem).is_empty(), "served without a kick");
    assert_eq!(f.notify_and_wait(head), 513);
    assert_eq!(f.stats().polled, 0);
}

#[test]
fn a_broken_avail_index_does_not_keep_a_polling_disk_spinning() {
    let mut f = Fixture::new(true);
    f.blk.lock().unwrap().force_poll(Duration::from_secs(3));
    // An index 1000 past the device's: more than the queue holds.
    f.mem
        .write_obj(1000u16, GuestAddress(f.q.avail + 2))
        .unwrap();
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    let t = Instant::now();
    f.run();
    // Polling the whole window would take 3 s.
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(f.q.used(&f.mem).is_empty());
    assert_eq!(f.stats().polled, 0);
}

#[test]
fn a_disk_whose_polling_the_operator_turns_off_while_it_runs_stops_polling_at_its_next_wake_up() {
    let mut f = Fixture::uring();
    f.blk.lock().unwrap().force_poll(Duration::from_millis(300));
    // What `set-disk` does, from another thread, without the device's lock.
    let control = f.blk.lock().unwrap().poll_control();
    control.set(0);
    let head = publish_read(&mut f, 2);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    // The kick's wake-up no longer polls for the completion, which comes
    // on a wake-up of its own.
    f.run();
    assert!(f.q.used(&f.mem).is_empty(), "the completion was polled");
    assert_eq!(f.run_until_used(1), vec![(u32::from(head), 513)]);
    assert_eq!((f.status(), f.data(512)), (S_OK, vec![2u8; 512]));
    assert_eq!(f.stats().polled, 0);
}
