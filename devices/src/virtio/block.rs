//! virtio-blk over a raw image file (or block device).
//!
//! One request queue, or several with `VIRTIO_BLK_F_MQ` (a guest's blk-mq
//! gives each CPU its own), all served by whatever event loop the device is
//! registered on (the VMM gives each disk an I/O thread of its own, so a
//! slow image stalls nothing else). Reads and writes go straight between
//! the image and guest memory (no bounce buffer): through io_uring, many in
//! flight at once ([`uring`](self::uring)), or one `preadv`/`pwritev` at a
//! time with the sync engine. With `direct` the image is opened `O_DIRECT`
//! (host page cache bypassed; see [`direct`](self::direct) for unaligned
//! buffers). FLUSH completes before the guest sees the status. Supported
//! requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (the last two
//! only on writable disks).
//!
//! Where things are: `request.rs` turns one chain into a status or an I/O,
//! `serve.rs` walks the queues and returns completions, this file holds
//! the device (configuration, features, activation, event-loop glue).
//!
//! A request's buffers are read as a byte stream (virtio 1.x makes no
//! promise about how the driver splits them into descriptors): the first 16
//! device-readable bytes are the header, the status is the last byte of the
//! chain's last descriptor, which must be device-writable. What goes wrong
//! with a chain and what the guest gets:
//!
//! | chain | result |
//! |---|---|
//! | loops, too long, `next` out of range, unreadable table | used len 0, no status |
//! | last descriptor read-only, empty, or outside guest memory | used len 0, no status |
//! | header shorter than 16 bytes or outside guest memory | IOERR |
//! | readable descriptor after a writable one | IOERR |
//! | IN with device-readable data, OUT with device-writable data | IOERR |
//! | data outside guest memory, length not a multiple of 512 | IOERR |
//! | sector range past the end of the disk | IOERR |
//! | OUT, DISCARD, WRITE_ZEROES on a read-only disk | IOERR |
//! | unknown request type | UNSUPP |
//!
//! None of these stops the queue: the next request is served normally.
//!
//! A wake-up serves at most a queue's worth of requests (the queue size):
//! a guest that refills the ring as fast as it is drained would otherwise
//! keep the event loop here for good, starving the console, the control
//! socket and the other devices. With work left, the device kicks its own
//! queue eventfd and yields; the event loop comes back after the others.
//! A polling disk (`poll_us`, see [`poll`](self::poll)) may serve past that
//! budget for a bounded time ([`serve`](self::serve)'s `POLL_SPAN` plus one
//! window) before it yields.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

mod backup;
mod copy;
mod direct;
mod image_lock;
mod poll;
mod request;
mod serve;
mod state;
mod throttle;
mod uring;

pub use backup::{
    BackupInbox, BackupReport, BackupRequest, DoneFn as BackupDone, StartedFn as BackupStarted,
    SubmitError as BackupSubmitError, CHUNK as BACKUP_CHUNK,
};
use backup::{Job, Source, Step};
pub use copy::{CopyReader, CopySource, WriteLog, CHUNK as COPY_CHUNK};
pub use direct::AlignedBuf;
use direct::{bounce_read, bounce_write, in_chunks, DioAlign};
pub use image_lock::ImageLock;
use poll::PollWindow;
pub use poll::{PollControl, MAX_POLL};
use request::{Disk, Handled};
use throttle::Throttle;
pub use throttle::{Limits as IoLimits, ThrottleControl, MAX_IOPS};
use uring::{InFlight, IoKind, IoOp, Uring};

use super::iov::{
    parse_chain, preadv_all, push_iovecs, pwritev_all, read_segs, sub_segs, total_len, write_segs,
    ParsedChain, Seg,
};
use super::{
    new_queue_events, read_config_bytes, rearm_and_recheck, ActivateError, GuestMemoryMmap,
    Interrupt, VirtioDevice, COMMON_FEATURES,
};
use crate::state::StateError;

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID serial.
pub const ID_BYTES: usize = 20;

/// Request queues a disk offers at most (`VIRTIO_BLK_F_MQ`).
pub const MAX_QUEUES: u16 = 16;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
const MAX_DISCARD_SEG: u32 = 16;
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
const CONFIG_SIZE: usize = 60;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Request status bytes.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_MQ: u64 = 1 << 12;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// One `--disk`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial returned by GET_ID (`/sys/block/vdX/serial`), at most 20 bytes.
    pub id: Option<String>,
    /// Open the image with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// How reads, writes and flushes reach the image.
    pub engine: IoEngine,
    /// Request queues offered (`VIRTIO_BLK_F_MQ` when more than one; the
    /// guest's blk-mq gives each CPU its own); 0 is 1, at most
    /// [`MAX_QUEUES`].
    pub queues: u16,
    /// Adaptive polling up to this long after the last work (`poll_us`;
    /// see [`poll`](self::poll)); zero (the default) is off, at most
    /// [`MAX_POLL`].
    pub poll: Duration,
    /// Requests and bytes a second at most (see [`throttle`]); none by
    /// default.
    pub limits: IoLimits,
}

/// How a disk's reads, writes and flushes reach the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring where the kernel offers it, else synchronous.
    #[default]
    Auto,
    /// One request at a time, `preadv`/`pwritev`/`fdatasync` on the disk's thread.
    Sync,
    /// io_uring: up to a queue's worth of requests in flight (an error where unavailable).
    Uring,
}

impl std::str::FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoEngine::Auto),
            "sync" => Ok(IoEngine::Sync),
            "io_uring" | "uring" => Ok(IoEngine::Uring),
            _ => Err(format!("unknown I/O engine {s:?} (auto, sync, io_uring)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {}: its file system does not support direct=on (O_DIRECT)", path.display())]
    DirectUnsupported { path: PathBuf },
    #[error("disk image {} is locked by another process", path.display())]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("disk image {} is not a regular file or block device", path.display())]
    NotAFile { path: PathBuf },
    #[error("cannot read the size of disk image {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("disk id {id:?} is longer than {ID_BYTES} bytes")]
    IdTooLong { id: String },
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
    #[error("disk image {}: io=io_uring asked, but this kernel does not offer it: {source}", path.display())]
    Uring { path: PathBuf, source: io::Error },
}

/// Per-device counters, readable without the device lock.
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_requests: AtomicU64,
    write_requests: AtomicU64,
    flush_requests: AtomicU64,
    other_requests: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    io_errors: AtomicU64,
    unsupported: AtomicU64,
    invalid_chains: AtomicU64,
    polled: AtomicU64,
    throttled: AtomicU64,
}

/// A snapshot of [`BlockCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    /// GET_ID, DISCARD, WRITE_ZEROES.
    pub other_requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Requests completed with IOERR.
    pub io_errors: u64,
    /// Requests completed with UNSUPP.
    pub unsupported: u64,
    /// Chains returned with no status (see the module table).
    pub invalid_chains: u64,
    /// Requests and completions the disk's thread found while polling,
    /// without a wake-up (`poll_us`).
    pub polled: u64,
    /// Times a request waited for the disk's limits (`iops`, `mib_s`).
    pub throttled: u64,
}

impl BlockCounters {
    pub fn snapshot(&self) -> BlockStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            read_requests: g(&self.read_requests),
            write_requests: g(&self.write_requests),
            flush_requests: g(&self.flush_requests),
            other_requests: g(&self.other_requests),
            read_bytes: g(&self.read_bytes),
            write_bytes: g(&self.write_bytes),
            io_errors: g(&self.io_errors),
            unsupported: g(&self.unsupported),
            invalid_chains: g(&self.invalid_chains),
            polled: g(&self.polled),
            throttled: g(&self.throttled),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Active {
    mem: Arc<GuestMemoryMmap>,
    /// Every queue the transport has; those the driver left not ready are
    /// never served.
    queues: Vec<Queue>,
    interrupt: Interrupt,
}

/// A virtio-blk device. See the [module docs](super) for how it is shared
/// between the MMIO bus and the event loop.
pub struct Block {
    disk: Disk,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    config: [u8; CONFIG_SIZE],
    features: u64,
    active: Option<Active>,
    /// Requests served per wake-up at most; `None`: the queue's size.
    budget: Option<u16>,
    /// The io_uring engine; `None`: requests run synchronously.
    ring: Option<Uring>,
    /// Wakes the I/O thread for a backup's next share of copying.
    backup_timer: TimerFd,
    /// Backup requests from the control socket's thread.
    backup_inbox: BackupInbox,
    /// How long to poll before sleeping (`poll_us`).
    poll: PollWindow,
    /// The operator's `poll_us`, which `poll` follows at each wake-up.
    poll_control: PollControl,
    /// The disk's limits (`iops`, `mib_s`), following `throttle_control`
    /// at each wake-up; `throttle_timer` wakes the thread when a request
    /// the limits held back may go.
    throttle: Throttle,
    throttle_control: ThrottleControl,
    /// The control's generation `throttle` was last set from.
    throttle_seen: u64,
    throttle_timer: TimerFd,
    /// A request is being held back (counted once per wait in `throttled`).
    throttle_waiting: bool,
    /// Where the next pass over the queues starts while limits are set, so
    /// that held-back requests do not leave the later queues starved.
    next_queue: usize,
    /// When the thread last finished work: how long the guest or the disk
    /// then took is what adapts the window.
    idle_since: Option<Instant>,
    /// Runs once, right before a queue's kicks are re-armed (tests: the
    /// guest publishing at the worst moment).
    #[cfg(test)]
    pub(crate) before_rearm: Option<Box<dyn FnOnce() + Send>>,
}

/// Event-loop token of the io_uring completion eventfd (queue eventfds use their index).
const RING_TOKEN: u32 = 0x100;
/// Event-loop token of the backup's timer.
const BACKUP_TOKEN: u32 = 0x101;
/// Event-loop token of the backup inbox's eventfd.
const BACKUP_INBOX_TOKEN: u32 = 0x102;
/// Event-loop token of the limits' timer.
const THROTTLE_TOKEN: u32 = 0x103;
/// Event-loop token of the limits' control (`set-disk`).
const CONTROL_TOKEN: u32 = 0x104;

/// A timer whose read never blocks: a handler earlier in the same batch of
/// events may have re-armed or disarmed it, which leaves nothing to read.
fn nonblocking_timer() -> Result<TimerFd, BlockError> {
    let t =
        TimerFd::new().map_err(|e| BlockError::EventFd(io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
    let ok = unsafe {
        let fl = libc::fcntl(t.as_raw_fd(), libc::F_GETFL);
        fl >= 0 && libc::fcntl(t.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(BlockError::EventFd(io::Error::last_os_error()));
    }
    Ok(t)
}

impl Block {
    /// Opens and locks the image: writable images get an exclusive `flock`,
    /// read-only ones a shared one, so a second VM cannot write an image in
    /// use (nor read one being written).
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        Self::open(cfg, true)
    }

    /// Opens the image without its lock, for a migration's target: the
    /// source holds it until it lets go of the guest; [`ImageLock::acquire`]
    /// takes it then.
    pub fn new_unlocked(cfg: &BlockConfig) -> Result<Self, BlockError> {
        Self::open(cfg, false)
    }

    fn open(cfg: &BlockConfig, lock: bool) -> Result<Self, BlockError> {
        let path = cfg.path.clone();
        let id_str = cfg.id.clone().unwrap_or_default();
        if id_str.len() > ID_BYTES {
            return Err(BlockError::IdTooLong { id: id_str });
        }
        let mut id = [0u8; ID_BYTES];
        id[..id_str.len()].copy_from_slice(id_str.as_bytes());

        let direct_flag = if cfg.direct { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .custom_flags(libc::O_CLOEXEC | direct_flag)
            .open(&path)
            .map_err(|source| {
                if cfg.direct && source.raw_os_error() == Some(libc::EINVAL) {
                    BlockError::DirectUnsupported { path: path.clone() }
                } else {
                    BlockError::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            return Err(BlockError::NotAFile { path });
        }
        if lock {
            image_lock::flock(&file, &path, cfg.read_only)?;
        }
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let capacity = size / SECTOR_SIZE * SECTOR_SIZE;
        let dio = cfg.direct.then(|| DioAlign::probe(&file));
        // The guest's logical block size: O_DIRECT offsets and lengths must
        // be multiples of the host's, so tell the guest to use at least that.
        let block_size = dio.map_or(SECTOR_SIZE, |d| d.offset.clamp(SECTOR_SIZE, 4096)) as u32;

        let queues = cfg.queues.clamp(1, MAX_QUEUES);
        let mut features = COMMON_FEATURES | F_FLUSH | F_SEG_MAX | F_BLK_SIZE;
        if queues > 1 {
            features |= F_MQ;
        }
        if cfg.read_only {
            features |= F_RO;
        } else {
            features |= F_DISCARD | F_WRITE_ZEROES;
        }

        let mut config = [0u8; CONFIG_SIZE];
        let mut put =
            |off: usize, bytes: &[u8]| config[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(capacity / SECTOR_SIZE).to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &block_size.to_le_bytes());
        put(34, &queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[1]);

        // Room for every queue's worth in flight.
        let ring_entries = QUEUE_SIZE.saturating_mul(queues);
        let ring = match cfg.engine {
            IoEngine::Sync => None,
            IoEngine::Uring => {
                Some(
                    Uring::new(ring_entries).map_err(|source| BlockError::Uring {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            IoEngine::Auto => match Uring::new(ring_entries) {
                Ok(r) => Some(r),
                Err(e) => {
                    crate::limited!(
                        info,
                        "virtio-blk {}: io_uring unavailable ({e}); serving requests one at a time",
                        path.display()
                    );
                    None
                }
            },
        };
        let backup_timer = nonblocking_timer()?;
        let backup_inbox = BackupInbox::new().map_err(BlockError::EventFd)?;
        let throttle_timer = nonblocking_timer()?;
        let throttle_control = ThrottleControl::new(cfg.limits).map_err(BlockError::EventFd)?;
        Ok(Self {
            ring,
            backup_timer,
            backup_inbox,
            disk: Disk {
                file,
                path,
                read_only: cfg.read_only,
                id,
                capacity,
                dio,
                counters: Arc::default(),
                backup: RefCell::new(None),
                log: Arc::new(WriteLog::new(capacity)),
            },
            queue_sizes: vec![QUEUE_SIZE; usize::from(queues)],
            queue_evts: new_queue_events(usize::from(queues)).map_err(BlockError::EventFd)?,
            config,
            features,
            active: None,
            budget: None,
            poll: PollWindow::new(cfg.poll),
            poll_control: PollControl::new(cfg.poll),
            throttle: Throttle::new(cfg.limits, Instant::now()),
            throttle_seen: throttle_control.generation(),
            throttle_control,
            throttle_timer,
            throttle_waiting: false,
            next_queue: 0,
            idle_since: None,
            #[cfg(test)]
            before_rearm: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Disk size in 512-byte sectors (a partial last sector is not exposed).
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity / SECTOR_SIZE
    }

    /// Shared counters (read them without locking the device).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.disk.counters.clone()
    }

    /// Where the operator changes `poll_us` while the disk runs (read and
    /// set without the device's lock, which its thread may hold).
    pub fn poll_control(&self) -> PollControl {
        self.poll_control.clone()
    }

    /// Where the operator changes the disk's limits while it runs (as
    /// [`Self::poll_control`]).
    pub fn throttle_control(&self) -> ThrottleControl {
        self.throttle_control.clone()
    }

    pub fn stats(&self) -> BlockStats {
        self.disk.counters.snapshot()
    }

    /// The engine serving this disk: `io_uring` or `sync`.
    pub fn engine_name(&self) -> &'static str {
        if self.ring.is_some() {
            "io_uring"
        } else {
            "sync"
        }
    }

    /// Starts a point-in-time copy of the disk into `req.dst` (see
    /// `backup.rs`): this call, between two of the guest's requests, is the
    /// instant. The request comes back when a backup of this disk is still
    /// running.
    pub fn start_backup(&mut self, req: BackupRequest) -> Result<(), BackupRequest> {
        if self.backup_running() {
            return Err(req);
        }
        *self.disk.backup.get_mut() = Some(Job::start(req, self.disk.capacity, self.disk.dio));
        self.arm_backup(Duration::ZERO);
        Ok(())
    }

    /// What a live migration copies the disk through (`copy.rs`): the
    /// image, its size and the log of what the guest writes meanwhile.
    pub fn copy_source(&self) -> io::Result<CopySource> {
        CopySource::new(
            &self.disk.file,
            self.disk.dio,
            self.disk.capacity,
            self.disk.log.clone(),
        )
    }

    /// Where another thread hands this disk a backup request (its I/O
    /// thread starts it: [`BackupInbox`]).
    pub fn backup_inbox(&self) -> BackupInbox {
        self.backup_inbox.clone()
    }

    /// The inbox woke the I/O thread: start what waits there.
    fn take_backup_request(&mut self) {
        let Some(mut req) = self.backup_inbox.take() else {
            return;
        };
        let started = req.started.take();
        match self.start_backup(req) {
            // A copy that failed at once (it could not be sized) has
            // answered already: no instant to tell.
            Ok(()) if self.backup_running() => {
                if let Some(f) = started {
                    f();
                }
            }
            Ok(()) => {}
            Err(req) => (req.done)(Err("a backup of this disk is already running".into())),
        }
    }

    /// Is a backup of this disk running?
    pub fn backup_running(&self) -> bool {
        self.disk
            .backup
            .borrow()
            .as_ref()
            .is_some_and(|j| !j.finished())
    }

    /// The backup timer fired: its next share.
    fn backup_step(&mut self) {
        let src = Source {
            file: &self.disk.file,
            dio: self.disk.dio,
        };
        let slot = self.disk.backup.get_mut();
        let Some(job) = slot.as_mut() else {
            return;
        };
        match job.step(src) {
            Step::Again(wait) => self.arm_backup(wait),
            Step::Finished => *slot = None,
        }
    }

    fn arm_backup(&mut self, wait: Duration) {
        // A zero time would disarm the timer.
        if let Err(e) = self
            .backup_timer
            .reset(wait.max(Duration::from_nanos(1)), None)
        {
            tracing::warn!(
                "virtio-blk {}: cannot wake the backup: {e}",
                self.disk.path.display()
            );
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<Queue>,
        _acked_features: u64,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        // A multi-queue driver may leave later queues unused, but every
        // driver uses the first; DRIVER_OK without it is a broken driver
        // (the transport then sets DEVICE_NEEDS_RESET).
        if !queues.first().is_some_and(|q| q.ready()) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        // Serve whatever the driver queued before DRIVER_OK (one kick
        // serves every queue).
        if let Some(Err(e)) = self.queue_evts.first().map(|e| e.write(1)) {
            tracing::warn!("virtio-blk: cannot kick the request queue: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        // No completion of the old queue may reach a new one; the guest memory stays mapped
        // meanwhile (each request holds it).
        // A write finished here is in the image: a migration copying the
        // disk must send it again (a reset does not end the migration).
        let disk = &self.disk;
        if let Some(ring) = self.ring.as_mut() {
            ring.wait_all(|req, _| {
                req.op.mark_read_dirty(&req.mem);
                if req.op.kind == IoKind::Write {
                    disk.written(req.op.off, req.op.len);
                }
            });
        }
        self.active = None;
    }

    fn quiesce(&mut self) -> Result<Vec<QueueState>, StateError> {
        self.quiesce_queues()
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(ring) = &self.ring {
            if let Err(e) = ops.add(Events::with_data(
                ring.event(),
                RING_TOKEN,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )) {
                tracing::error!(
                    "virtio-blk {}: cannot register the io_uring eventfd: {e:?}",
                    self.disk.path.display()
                );
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.backup_timer,
            BACKUP_TOKEN,
            EventSet::IN,
        )) {
            tracing::error!(
                "virtio-blk {}: cannot register the backup timer: {e:?}",
                self.disk.path.display()
            );
        }
        for (fd, token) in [
            (self.throttle_timer.as_raw_fd(), THROTTLE_TOKEN),
            (self.throttle_control.wake().as_raw_fd(), CONTROL_TOKEN),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!(
                    "virtio-blk {}: cannot register the limits' descriptors: {e:?}",
                    self.disk.path.display()
                );
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            self.backup_inbox.kick(),
            BACKUP_INBOX_TOKEN,
            EventSet::IN,
        )) {
            tracing::error!(
                "virtio-blk {}: cannot register the backup inbox: {e:?}",
                self.disk.path.display()
            );
            // Nothing would take a request: refuse them at once.
            self.backup_inbox
                .close("the disk's thread cannot take backups");
        }
        // Edge-triggered, and never read: every kick is a new edge (KVM's
        // ioeventfd and the self-kick both write), and each wake-up serves
        // the queue until the guest's avail index says there is nothing
        // left, so a read to re-arm them would only cost a system call per
        // wake-up. The counter cannot fill: it saturates at 2^64 - 2 kicks.
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let edge = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, edge)) {
                tracing::error!(
                    "virtio-blk {}: cannot register queue eventfd: {e:?}",
                    self.disk.path.display()
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.data() == RING_TOKEN {
            self.serve_completions();
            return;
        }
        if events.data() == BACKUP_INBOX_TOKEN {
            self.take_backup_request();
            return;
        }
        if events.data() == THROTTLE_TOKEN || events.data() == CONTROL_TOKEN {
            // Read so they stop being readable (neither blocks: an earlier
            // handler may have re-armed the timer, leaving nothing).
            if events.data() == THROTTLE_TOKEN {
                let _ = self.throttle_timer.wait();
            } else {
                let _ = self.throttle_control.wake().read();
            }
            self.serve_kick();
            return;
        }
        if events.data() == BACKUP_TOKEN {
            // Read the expiry count so the timer stops being readable.
            let _ = self.backup_timer.wait();
            self.backup_step();
            return;
        }
        self.serve_kick();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // A request handed over after the thread's last wake-up is answered
        // here, never left waiting.
        self.backup_inbox
            .close("the disk went away before the copy started");
    }
}

#[cfg(test)]
mod tests;
