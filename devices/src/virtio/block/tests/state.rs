//! Snapshots (`state.rs`, the transport's `save_state`/`restore_state`):
//! requests queued or in flight at the save are served exactly once.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;
use crate::virtio::{INT_USED_RING, VIRTIO_F_VERSION_1};

/// What a new process does: the same image and a copy of guest memory in a
/// new device and transport (the state is not restored yet). The driver's
/// side (`q`) carries on.
fn reopen(f: Fixture, engine: IoEngine, read_only: bool) -> Fixture {
    let Fixture {
        file,
        blk,
        t,
        mem,
        q,
        more,
        em,
    } = f;
    // The old device must go first: it holds the image's lock.
    drop(em);
    drop(t);
    assert_eq!(Arc::strong_count(&blk), 1);
    drop(blk);
    let mut bytes = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    let copy = guest_memory();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    let handle = GuestMemoryHandle::new(copy);
    let mem = handle.get().unwrap();
    let blk = Block::new(&BlockConfig {
        path: file.as_path().to_owned(),
        read_only,
        id: Some("disk-serial-1".into()),
        direct: false,
        engine,
        queues: 1,
        poll: Default::default(),
        limits: Default::default(),
    });
    let blk = Arc::new(Mutex::new(blk.unwrap()));
    let t = MmioTransport::new(blk.clone(), handle).unwrap();
    let mut em = Manager::new().unwrap();
    em.add_subscriber(blk.clone());
    Fixture {
        file,
        blk,
        t,
        mem,
        q,
        more,
        em,
    }
}

/// Two requests served before the snapshot, then three queued (published,
/// not kicked): writes to sectors 10 and 11 and a read of sector 2.
fn served_two_queued_three(f: &mut Fixture) -> Vec<u16> {
    assert_eq!(f.write(2, &[0x5au8; 512]), (1, S_OK));
    assert_eq!(f.read(3, 512), (513, S_OK));
    vec![
        f.publish(0, T_OUT, 10, Some((&[0x10u8; 512], false))),
        f.publish(1, T_OUT, 11, Some((&[0x11u8; 512], false))),
        f.publish(2, T_IN, 2, Some((&[0u8; 512], true))),
    ]
}

/// The three queued requests were served, and nothing else (io_uring may
/// complete them in any order).
fn assert_served_once(f: &mut Fixture, heads: &[u16]) {
    let used = f.run_until_used(3);
    let mut got: Vec<u16> = used.iter().map(|&(h, _)| h as u16).collect();
    got.sort_unstable();
    let mut want = heads.to_vec();
    want.sort_unstable();
    assert_eq!(got, want);
    let read = used.iter().find(|&&(h, _)| h == u32::from(heads[2]));
    assert_eq!(read.map(|r| r.1), Some(513), "the read's length");
    assert!((0..3).all(|i| f.status_of(i) == S_OK));
    let disk = file_contents(&f.file);
    assert_eq!(&disk[10 * 512..11 * 512], &[0x10u8; 512][..]);
    assert_eq!(&disk[11 * 512..12 * 512], &[0x11u8; 512][..]);
    let mut buf = [0u8; 512];
    f.mem
        .read_slice(&mut buf, GuestAddress(DATA + 1024))
        .unwrap();
    assert_eq!(buf, [0x5au8; 512], "the write before the snapshot");
    // Nothing is served twice; the used ring goes on at 5.
    f.run();
    assert!(f.q.used(&f.mem).is_empty());
    let used_idx: u16 = f.mem.read_obj(GuestAddress(f.q.used + 2)).unwrap();
    assert_eq!(used_idx, 5);
    f.assert_still_serving();
}

fn queued_requests_are_served_once_after_a_restore_in_a_new_device(engine: IoEngine) {
    let mut f = Fixture::build_with(false, VIRTIO_F_VERSION_1, false, engine);
    let heads = served_two_queued_three(&mut f);
    let s = f.t.save_state().unwrap();
    assert!(!f.blk.lock().unwrap().is_activated(), "quiesced");
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (2, 2));
    // A kick now reaches no one: the old device is stopped.
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert!(f.q.used(&f.mem).is_empty());

    let mut f = reopen(f, engine, false);
    f.t.restore_state(&s).unwrap();
    assert_served_once(&mut f, &heads);
    let st = f.stats();
    assert_eq!((st.write_requests, st.read_requests), (2, 2));
}

#[test]
fn queued_requests_are_served_once_by_a_new_device_restored_from_the_state() {
    queued_requests_are_served_once_after_a_restore_in_a_new_device(IoEngine::Sync);
}

#[test]
fn queued_requests_are_served_once_by_a_new_io_uring_device_restored_from_the_state() {
    queued_requests_are_served_once_after_a_restore_in_a_new_device(IoEngine::Uring);
}

#[test]
fn io_uring_requests_in_flight_at_the_save_are_completed_by_the_old_device_only() {
    let mut f = Fixture::uring();
    for i in 0..4 {
        f.publish(i, T_OUT, 20 + i, Some((&[0x40 + i as u8; 512], false)));
    }
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.run(), 1);
    assert_eq!(f.blk.lock().unwrap().in_flight(), 4);
    let later = [
        f.publish(4, T_OUT, 30, Some((&[0x55u8; 512], false))),
        f.publish(5, T_FLUSH, 0, None),
    ];
    let s = f.t.save_state().unwrap();
    assert_eq!(f.blk.lock().unwrap().in_flight(), 0);
    // Completed into the used ring before the state was taken, with the
    // interrupt they deserve.
    assert_eq!(f.q.used(&f.mem).len(), 4);
    assert!((0..4).all(|i| f.status_of(i) == S_OK));
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (4, 4));
    assert_eq!(s.interrupt_status, INT_USED_RING);

    let mut f = reopen(f, IoEngine::Uring, false);
    f.t.restore_state(&s).unwrap();
    assert_eq!(f.t.interrupt_event().read().unwrap(), 1, "signalled again");
    // The flush completes after the write before it (IO_DRAIN).
    let used = f.run_until_used(2);
    let got: Vec<u16> = used.iter().map(|&(h, _)| h as u16).collect();
    assert_eq!(got, later);
    f.run();
    assert!(f.q.used(&f.mem).is_empty(), "nothing served twice");
    assert_eq!(f.stats().write_requests, 1);
    let disk = file_contents(&f.file);
    for i in 0..4u8 {
        let at = (20 + usize::from(i)) * 512;
        assert_eq!(&disk[at..at + 512], &[0x40 + i; 512][..]);
    }
    assert_eq!(&disk[30 * 512..31 * 512], &[0x55u8; 512][..]);
}

#[test]
fn a_snapshot_that_does_not_stop_the_vm_carries_on_with_the_same_transport() {
    let mut f = Fixture::uring();
    let heads = served_two_queued_three(&mut f);
    let s = f.t.save_state().unwrap();
    f.t.restore_state(&s).unwrap();
    assert_served_once(&mut f, &heads);
}

#[test]
fn a_state_that_accepted_discard_is_refused_by_a_read_only_disk() {
    let f = Fixture::with_features(false, VIRTIO_F_VERSION_1 | F_DISCARD);
    let mut f = f;
    let s = f.t.save_state().unwrap();
    let mut f = reopen(f, IoEngine::Sync, true);
    let e = f.t.restore_state(&s).unwrap_err().to_string();
    assert!(e.contains("does not offer") && e.contains("0x2000"), "{e}");
    assert!(!f.blk.lock().unwrap().is_activated());
}

#[test]
fn a_device_that_refuses_the_restored_queues_asks_its_driver_for_a_reset() {
    let mut f = Fixture::new(false);
    let mut s = f.t.save_state().unwrap();
    // The disk needs its first queue.
    s.queues[0].ready = false;
    let e = f.t.restore_state(&s).unwrap_err().to_string();
    assert!(e.contains("did not start"), "{e}");
    assert_ne!(
        f.t.status() & crate::virtio::mmio::status::DEVICE_NEEDS_RESET,
        0
    );
    assert!(!f.blk.lock().unwrap().is_activated());
}

#[test]
fn a_running_backup_carries_on_across_a_save_and_restore() {
    let mut f = Fixture::build_sized(false, VIRTIO_F_VERSION_1, false, IoEngine::Sync, 4096);
    let before = file_contents(&f.file);
    let dst = TempFile::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let req = BackupRequest {
        dst: dst.as_file().try_clone().unwrap(),
        // 1 MiB a second: the first share copies half the disk, the rest
        // a second later.
        bytes_per_s: Some(1 << 20),
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        started: None,
    };
    assert!(f.blk.lock().unwrap().start_backup(req).is_ok());
    f.run();
    // Past the first share, before and after the snapshot.
    assert_eq!(f.write(3000, &[0xa1u8; 4096]), (1, S_OK));
    let s = f.t.save_state().unwrap();
    assert!(f.blk.lock().unwrap().backup_running());
    f.t.restore_state(&s).unwrap();
    assert_eq!(f.write(3500, &[0xa2u8; 4096]), (1, S_OK));
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        assert!(Instant::now() < deadline, "the backup did not finish");
        f.run();
        if let Ok(r) = rx.try_recv() {
            break r;
        }
    };
    let r = r.expect("the backup completes");
    assert_eq!(file_contents(&dst), before, "the disk at the instant");
    assert_eq!(r.chunks_before_writes, 2, "{r:?}");
}
