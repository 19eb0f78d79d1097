//! A point-in-time copy of a disk that the guest keeps writing (the
//! control socket's `backup`): copy before write.
//!
//! The instant is [`Block::start_backup`](super::Block::start_backup),
//! called with the device's lock held, so between two of the guest's
//! requests. From then on:
//! - before a guest write (OUT, DISCARD, WRITE_ZEROES) reaches the image,
//!   every [`CHUNK`] it touches that is not in the copy yet is copied
//!   first, on the disk's own I/O thread ([`Job::before_write`]);
//! - the rest is copied a share at a time on the same thread, between
//!   the guest's requests, woken by a timer ([`Job::step`]); an optional
//!   rate keeps a big copy from crowding the guest's own I/O. Holes of
//!   the image (`SEEK_DATA`) are not read, and chunks that read as zeros
//!   are not written: the copy is as sparse as the image.
//!
//! So the copy holds every write the guest saw completed before the
//! instant and none it issued after. A write still in flight at the
//! instant (io_uring) may or may not be in it, as after a power cut: the
//! copy is crash-consistent, which is what a journaling file system
//! recovers from.
//!
//! Nothing that goes wrong with the copy reaches the guest: a failed
//! write to the copy ends the backup (reported through its `done`
//! callback) and the guest's request goes on as if there were none.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;

use super::direct::{AlignedBuf, DioAlign};

/// The unit the copy tracks: a guest write of any size into a chunk not yet
/// copied first copies the whole chunk (QEMU's backup jobs use 64 KiB too).
pub const CHUNK: u64 = 64 * 1024;
/// The most one wake-up copies when no rate is set: the guest's requests
/// are served between two shares.
const SHARE: u64 = 4 << 20;

/// What the caller reports when the copy is complete (or why it is not).
pub type DoneFn = Box<dyn FnOnce(Result<BackupReport, String>) + Send>;

/// A backup to start: where the copy goes and whom to tell.
pub struct BackupRequest {
    /// The copy: an empty file opened for writing (it is sized here).
    pub dst: File,
    /// At most this many bytes read per second by the background copy
    /// (copies ahead of guest writes are never held back); `None`: as fast
    /// as the disk goes.
    pub bytes_per_s: Option<u64>,
    /// Called once, on the disk's I/O thread, when the copy is complete
    /// and synced, or has failed (also when the device goes away first).
    pub done: DoneFn,
    /// Called on the disk's I/O thread at the instant, if the copy starts
    /// (before any later guest request is served).
    pub started: Option<StartedFn>,
}

/// What the caller runs at a backup's instant.
pub type StartedFn = Box<dyn FnOnce() + Send>;

/// Hands a backup request from another thread (the control socket's) to the
/// disk's own I/O thread, which starts it between two guest requests.
///
/// Why not take the device's lock and start it there: the I/O thread holds
/// that lock for a whole wake-up, synchronous I/O included, so a stalled
/// image would stall the caller, and with it the control socket. Here the
/// caller only takes a lock that nothing holds for longer than a swap.
#[derive(Clone)]
pub struct BackupInbox(Arc<Inbox>);

struct Inbox {
    slot: Mutex<Slot>,
    /// Wakes the disk's I/O thread (its event loop watches it).
    kick: EventFd,
}

#[derive(Default)]
struct Slot {
    pending: Option<BackupRequest>,
    /// The device is gone: nothing would ever take a request.
    closed: bool,
}

/// Why a request was not queued (it comes back with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// A request is already waiting for the disk's thread.
    Busy,
    /// The device is gone, or its thread cannot take requests.
    Gone,
}

impl BackupInbox {
    pub(super) fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(Inbox {
            slot: Mutex::new(Slot::default()),
            kick: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })))
    }

    /// Queues `req` for the disk's I/O thread, which starts it (or refuses
    /// it through its `done`) at its next wake-up.
    pub fn submit(&self, req: BackupRequest) -> Result<(), (SubmitError, BackupRequest)> {
        let mut slot = lock(&self.0.slot);
        if slot.closed {
            return Err((SubmitError::Gone, req));
        }
        if slot.pending.is_some() {
            return Err((SubmitError::Busy, req));
        }
        slot.pending = Some(req);
        drop(slot);
        // Only an overflowing counter fails, and then the thread is due to
        // wake anyway.
        if let Err(e) = self.0.kick.write(1) {
            tracing::warn!("virtio-blk: cannot wake the disk thread for a backup: {e}");
        }
        Ok(())
    }

    pub(super) fn kick(&self) -> &EventFd {
        &self.0.kick
    }

    /// On the disk's thread: the request waiting, if any.
    pub(super) fn take(&self) -> Option<BackupRequest> {
        // Drained so that the eventfd stops being readable.
        let _ = self.0.kick.read();
        lock(&self.0.slot).pending.take()
    }

    /// No request is taken from now on (the device is going away, or its
    /// thread cannot watch the inbox); the one waiting, if any, is answered
    /// with `why`.
    pub(super) fn close(&self, why: &str) {
        let pending = {
            let mut slot = lock(&self.0.slot);
            slot.closed = true;
            slot.pending.take()
        };
        if let Some(req) = pending {
            (req.done)(Err(why.to_string()));
        }
    }
}

/// How a completed backup went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    /// The disk's size in bytes (the copy's size).
    pub size: u64,
    /// Bytes of data written to the copy (holes and zero chunks are not).
    pub data_bytes: u64,
    /// Chunks copied just before a guest write to them.
    pub chunks_before_writes: u64,
    /// What those copies added to the guest's writes, in all.
    pub write_delay: Duration,
    /// From the instant to the synced copy.
    pub duration: Duration,
}

/// The image a job reads: the device's descriptor and its `O_DIRECT`
/// alignment, if any.
#[derive(Clone, Copy)]
pub(super) struct Source<'a> {
    pub file: &'a File,
    pub dio: Option<DioAlign>,
}

/// What [`Job::step`] leaves to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Wake again after this long.
    Again(Duration),
    /// Complete or failed; `done` has been called.
    Finished,
}

/// One running backup (see the module's documentation).
pub(super) struct Job {
    dst: File,
    size: u64,
    chunks: u64,
    /// One bit per chunk: already in the copy (or a hole when it was looked at).
    copied: Vec<u64>,
    /// The background copy's next chunk.
    cursor: u64,
    bytes_per_s: Option<u64>,
    started: Instant,
    data_bytes: u64,
    chunks_before_writes: u64,
    write_delay: Duration,
    buf: AlignedBuf,
    done: Option<DoneFn>,
}

impl Job {
    /// The instant: a copy of an image of `size` bytes starts now.
    pub fn start(req: BackupRequest, size: u64, dio: Option<DioAlign>) -> Job {
        let chunks = size.div_ceil(CHUNK);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        let mut job = Job {
            dst: req.dst,
            size,
            chunks,
            copied: Vec::new(),
            cursor: 0,
            bytes_per_s: req.bytes_per_s.filter(|&r| r > 0),
            started: Instant::now(),
            data_bytes: 0,
            chunks_before_writes: 0,
            write_delay: Duration::ZERO,
            buf: AlignedBuf::new(CHUNK as usize, dio.map_or(4096, |d| d.mem)),
            done: Some(req.done),
        };
        // A bitmap for a disk larger than memory can hold fails the job,
        // not the VMM.
        if job.copied.try_reserve_exact(words).is_err() {
            job.fail("the disk is too large to track".into());
            return job;
        }
        job.copied.resize(words, 0);
        if let Err(e) = job.dst.set_len(size) {
            job.fail(format!("cannot size the copy: {e}"));
        }
        job
    }

    /// Complete or failed: nothing more to copy.
    pub fn finished(&self) -> bool {
        self.done.is_none()
    }

    fn is_copied(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        self.copied.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn mark(&mut self, i: u64) {
        let (w, b) = ((i / 64) as usize, i % 64);
        if let Some(x) = self.copied.get_mut(w) {
            *x |= 1 << b;
        }
    }

    /// The guest is about to overwrite `len` bytes at `off` (already checked
    /// to lie inside the disk): copies what of them is still the instant's.
    pub fn before_write(&mut self, src: Source<'_>, off: u64, len: u64) {
        if self.finished() || len == 0 {
            return;
        }
        let t0 = Instant::now();
        let first = off / CHUNK;
        let last = off.saturating_add(len - 1) / CHUNK;
        for i in first..=last.min(self.chunks.saturating_sub(1)) {
            if self.is_copied(i) {
                continue;
            }
            if let Err(e) = self.copy_chunk(src, i) {
                self.fail(format!("copying ahead of a guest write: {e}"));
                return;
            }
            self.chunks_before_writes += 1;
        }
        self.write_delay += t0.elapsed();
    }

    /// One wake-up's share of the background copy.
    pub fn step(&mut self, src: Source<'_>) -> Step {
        if self.finished() {
            return Step::Finished;
        }
        let t0 = Instant::now();
        let share = self.bytes_per_s.map_or(SHARE, |r| r.clamp(CHUNK, SHARE));
        let mut read = 0u64;
        while self.cursor < self.chunks && read < share {
            let i = self.cursor;
            if self.is_copied(i) {
                self.cursor += 1;
                continue;
            }
            match super::copy::next_data(src.file, i * CHUNK) {
                // A hole up to `data` (or to the end): nothing to read.
                Ok(data) if data >= (i + 1) * CHUNK => {
                    // The chunks wholly inside the hole (at least chunk i).
                    let whole = (data / CHUNK).min(self.chunks);
                    for j in i..whole {
                        self.mark(j);
                    }
                    self.cursor = whole;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    self.fail(format!("reading the disk: {e}"));
                    return Step::Finished;
                }
            }
            if let Err(e) = self.copy_chunk(src, i) {
                self.fail(e.to_string());
                return Step::Finished;
            }
            read += CHUNK;
            self.cursor += 1;
        }
        if self.cursor < self.chunks {
            let wait = match self.bytes_per_s {
                Some(r) => {
                    Duration::from_secs_f64(read as f64 / r as f64).saturating_sub(t0.elapsed())
                }
                None => Duration::ZERO,
            };
            return Step::Again(wait);
        }
        if let Err(e) = self.dst.sync_all() {
            self.fail(format!("syncing the copy: {e}"));
            return Step::Finished;
        }
        let report = BackupReport {
            size: self.size,
            data_bytes: self.data_bytes,
            chunks_before_writes: self.chunks_before_writes,
            write_delay: self.write_delay,
            duration: self.started.elapsed(),
        };
        if let Some(done) = self.done.take() {
            done(Ok(report));
        }
        Step::Finished
    }

    /// Copies chunk `i` from the image to the copy (skipping all-zero data).
    fn copy_chunk(&mut self, src: Source<'_>, i: u64) -> io::Result<()> {
        let off = i * CHUNK;
        let len = CHUNK.min(self.size - off);
        // O_DIRECT reads whole aligned blocks; the copy takes `len` of them.
        super::copy::read_exact_aligned(
            src.file,
            src.dio,
            self.buf.as_mut_slice(),
            off,
            len as usize,
        )?;
        let data = &self.buf.as_slice()[..len as usize];
        if data.iter().any(|&b| b != 0) {
            self.dst
                .write_all_at(data, off)
                .map_err(|e| io::Error::new(e.kind(), format!("writing the copy: {e}")))?;
            self.data_bytes += len;
        }
        self.mark(i);
        Ok(())
    }

    /// The copy cannot be completed: say why, once.
    fn fail(&mut self, why: String) {
        if let Some(done) = self.done.take() {
            done(Err(why));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.fail("the disk went away before the copy was complete".into());
    }
}
