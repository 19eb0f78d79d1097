//! The point-in-time backup (`backup.rs`), driven through the queue as a
//! guest drives it.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

/// 2 MiB and three sectors: 33 chunks, the last one partial.
const SECTORS: u64 = 4096 + 3;

type Outcome = Result<BackupReport, String>;

fn fixture(engine: IoEngine, direct: bool) -> Fixture {
    let f = Fixture::build_sized(false, VIRTIO_F_VERSION_1, direct, engine, SECTORS);
    assert_eq!(f.blk.lock().unwrap().capacity_sectors(), SECTORS);
    f
}

/// Starts a backup of `f`'s disk into a new temporary file.
fn start(f: &Fixture, bytes_per_s: Option<u64>) -> (TempFile, mpsc::Receiver<Outcome>) {
    let dst = TempFile::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let req = BackupRequest {
        dst: dst.as_file().try_clone().unwrap(),
        bytes_per_s,
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        started: None,
    };
    assert!(f.blk.lock().unwrap().start_backup(req).is_ok());
    (dst, rx)
}

/// Runs the event loop until the backup reports, at most 20 s.
fn wait_done(f: &mut Fixture, rx: &mpsc::Receiver<Outcome>) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        f.run();
        if let Ok(r) = rx.try_recv() {
            return r;
        }
    }
    panic!("the backup did not finish within 20 s");
}

fn a_backup_is_the_disk_as_it_was_at_its_start(mut f: Fixture) {
    let before = file_contents(&f.file);
    // 1 MiB a second: the first share copies chunks 0-15 and the writes
    // below land before the second, a second later.
    let (dst, rx) = start(&f, Some(1 << 20));
    f.run();
    let new = vec![0xa5u8; 4096];
    for sector in [40, 8 * 320, SECTORS - 3] {
        let data = &new[..if sector == SECTORS - 3 { 1536 } else { 4096 }];
        assert_eq!(f.write(sector, data), (1, S_OK), "sector {sector}");
    }
    let r = wait_done(&mut f, &rx).expect("the backup completes");
    let after = file_contents(&f.file);
    assert_eq!(
        &after[40 * 512..40 * 512 + 4096],
        &new[..],
        "the guest's write"
    );
    assert_eq!(
        file_contents(&dst),
        before,
        "the copy is the disk at the instant"
    );
    assert_eq!(r.size, SECTORS * SECTOR_SIZE);
    assert!(
        r.chunks_before_writes >= 2,
        "the writes past the first share were copied first: {r:?}"
    );
    // Sector 0 and 256 (byte value 0) make two zero sectors, not a zero chunk.
    assert_eq!(r.data_bytes, r.size, "{r:?}");
    assert!(!f.blk.lock().unwrap().backup_running());
    f.assert_still_serving();
}

#[test]
fn a_backup_is_the_disk_at_its_start_though_the_guest_overwrites_it_meanwhile() {
    a_backup_is_the_disk_as_it_was_at_its_start(fixture(IoEngine::Sync, false));
}

#[test]
fn a_backup_of_a_disk_served_through_io_uring_is_the_disk_at_its_start() {
    a_backup_is_the_disk_as_it_was_at_its_start(fixture(IoEngine::Uring, false));
}

#[test]
fn a_backup_of_a_direct_disk_is_the_disk_at_its_start() {
    a_backup_is_the_disk_as_it_was_at_its_start(fixture(IoEngine::Sync, true));
}

#[test]
fn discard_and_write_zeroes_are_copied_first_too() {
    let mut f = fixture(IoEngine::Sync, false);
    let before = file_contents(&f.file);
    let (dst, rx) = start(&f, Some(1 << 20));
    f.run();
    // Past the first share: chunks 20 and 30.
    let st = f.discard_like(T_DISCARD, &[discard_seg(2560, 128, 0)]);
    assert_eq!(st, S_OK);
    let st = f.discard_like(T_WRITE_ZEROES, &[discard_seg(3840, 16, 0)]);
    assert_eq!(st, S_OK);
    let r = wait_done(&mut f, &rx).unwrap();
    assert_eq!(file_contents(&dst), before);
    assert_eq!(r.chunks_before_writes, 2, "{r:?}");
}

#[test]
fn a_backup_leaves_holes_and_zeros_out_of_the_copy() {
    let mut f = fixture(IoEngine::Sync, false);
    // A sparse disk: 2 MiB of hole, then the data of one chunk.
    let img = f.file.as_file();
    img.set_len(0).unwrap();
    img.set_len(SECTORS * SECTOR_SIZE).unwrap();
    img.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
    let (dst, rx) = start(&f, None);
    let r = wait_done(&mut f, &rx).unwrap();
    assert_eq!(file_contents(&dst), file_contents(&f.file));
    assert_eq!(r.data_bytes, BACKUP_CHUNK, "{r:?}");
    let allocated = dst.as_file().metadata().unwrap().blocks() * 512;
    assert!(
        allocated <= 256 << 10,
        "the copy is sparse: {allocated} bytes"
    );
}

#[test]
fn a_second_backup_of_a_disk_is_refused_while_the_first_runs() {
    let mut f = fixture(IoEngine::Sync, false);
    let (_dst, rx) = start(&f, Some(1 << 16));
    let other = TempFile::new().unwrap();
    let again = BackupRequest {
        dst: other.as_file().try_clone().unwrap(),
        bytes_per_s: None,
        done: Box::new(|_| panic!("a refused backup reports nothing")),
        started: None,
    };
    assert!(f.blk.lock().unwrap().start_backup(again).is_err());
    assert!(f.blk.lock().unwrap().backup_running());
    f.assert_still_serving();
    drop(f);
    assert!(
        rx.recv().unwrap().unwrap_err().contains("went away"),
        "a device dropped mid-backup reports it"
    );
}

#[test]
fn a_copy_that_cannot_be_written_fails_the_backup_and_not_the_guest() {
    let mut f = fixture(IoEngine::Sync, false);
    let before = file_contents(&f.file);
    let ro = TempFile::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let req = BackupRequest {
        dst: File::open(ro.as_path()).unwrap(),
        bytes_per_s: None,
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        started: None,
    };
    f.blk.lock().unwrap().start_backup(req).ok().unwrap();
    let err = wait_done(&mut f, &rx).unwrap_err();
    assert!(err.contains("copy"), "{err}");
    assert_eq!(f.write(8, &[9u8; 512]), (1, S_OK));
    assert_eq!(file_contents(&f.file)[8 * 512], 9);
    assert_ne!(file_contents(&f.file), before);
    // And a new backup may start.
    let (dst, rx) = start(&f, None);
    wait_done(&mut f, &rx).unwrap();
    assert_eq!(file_contents(&dst), file_contents(&f.file));
}

/// A request through the inbox, as the control socket's thread hands it.
fn submit(
    inbox: &BackupInbox,
    dst: &TempFile,
) -> (
    Result<(), BackupSubmitError>,
    mpsc::Receiver<Outcome>,
    mpsc::Receiver<()>,
) {
    let (tx, rx) = mpsc::channel();
    let (stx, srx) = mpsc::channel();
    let req = BackupRequest {
        dst: dst.as_file().try_clone().unwrap(),
        bytes_per_s: None,
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        started: Some(Box::new(move || {
            let _ = stx.send(());
        })),
    };
    (inbox.submit(req).map_err(|(e, _)| e), rx, srx)
}

#[test]
fn a_backup_handed_to_the_inbox_starts_on_the_disks_thread_without_its_lock() {
    let mut f = fixture(IoEngine::Sync, false);
    let inbox = f.blk.lock().unwrap().backup_inbox();
    let dst = TempFile::new().unwrap();
    // The device's lock is held (as its thread holds it through a slow
    // wake-up): handing the request over does not wait for it.
    let held = f.blk.lock().unwrap();
    let (queued, rx, started) = submit(&inbox, &dst);
    assert_eq!(queued, Ok(()));
    // A second request while the first waits is refused at once.
    let other = TempFile::new().unwrap();
    assert_eq!(submit(&inbox, &other).0, Err(BackupSubmitError::Busy));
    assert!(
        started.try_recv().is_err(),
        "nothing starts before the thread wakes"
    );
    drop(held);
    let before = file_contents(&f.file);
    f.run();
    started.try_recv().expect("started at the thread's wake-up");
    assert_eq!(f.write(8, &[3u8; 512]), (1, S_OK));
    wait_done(&mut f, &rx).expect("the backup completes");
    assert_eq!(
        file_contents(&dst),
        before,
        "the copy is the disk at its instant"
    );
}

#[test]
fn a_request_the_inbox_takes_while_a_backup_runs_is_answered_with_busy() {
    let mut f = fixture(IoEngine::Sync, false);
    let (_dst, first) = start(&f, Some(1 << 16));
    let inbox = f.blk.lock().unwrap().backup_inbox();
    let other = TempFile::new().unwrap();
    let (queued, rx, started) = submit(&inbox, &other);
    assert_eq!(queued, Ok(()));
    f.run();
    let err = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap_err();
    assert!(err.contains("already running"), "{err}");
    assert!(started.try_recv().is_err());
    assert!(f.blk.lock().unwrap().backup_running(), "the first goes on");
    drop(f);
    assert!(first.recv().unwrap().is_err());
}

#[test]
fn a_request_left_in_the_inbox_of_a_device_that_goes_away_is_answered() {
    let f = fixture(IoEngine::Sync, false);
    let inbox = f.blk.lock().unwrap().backup_inbox();
    let dst = TempFile::new().unwrap();
    let (queued, rx, _) = submit(&inbox, &dst);
    assert_eq!(queued, Ok(()));
    drop(f);
    let err = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap_err();
    assert!(err.contains("went away"), "{err}");
    // And nothing is taken any more.
    assert_eq!(submit(&inbox, &dst).0, Err(BackupSubmitError::Gone));
}
