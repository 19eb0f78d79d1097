//! virtio-blk requests in descriptor chains, through a real `Block` on a
//! small image, set up and notified through `MmioTransport` registers.
//!
//! Checks, besides "no panic": the used ring follows the in-order model of
//! `vmm_fuzz::virtio` (one entry per valid head, in order, never more than
//! were available; used lengths within the chain's writable bytes); a
//! request's status byte is OK, IOERR or UNSUPP; the image never grows
//! (every access past the end is refused) and a read-only image never
//! changes. A backup started at any point (`Op::Backup`) ends as a copy of
//! the image as it was at that point, whatever the guest sent after it.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use devices::virtio::block::{SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};
use devices::virtio::mmio::reg;
use devices::virtio::test_utils::{start, write_reg, TestQueue};
use devices::virtio::{
    BackupRequest, Block, BlockConfig, GuestMemoryHandle, MmioTransport, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_fuzz::virtio::{
    add_indirect_chain, fill_stream, fresh_queue, guest_memory, queue_base, queue_size, walk_chain,
    writable_len, Addr, Alloc, BufSpec, InOrderModel, Len, Place,
};

const DISK_SECTORS: u64 = 16;
const QUEUE_MAX: u16 = 256;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DiskKind {
    Writable,
    ReadOnly,
    Direct,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::In => 0,
            Kind::Out => 1,
            Kind::Flush => 4,
            Kind::GetId => 8,
            Kind::Discard => 11,
            Kind::WriteZeroes => 13,
            Kind::Other(x) => x,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sector {
    Small(u8),
    NearEnd(u8),
    Raw(u64),
}

impl Sector {
    fn get(self) -> u64 {
        match self {
            Sector::Small(x) => u64::from(x % 32),
            Sector::NearEnd(x) => DISK_SECTORS.wrapping_sub(u64::from(x % 4)),
            Sector::Raw(x) => x,
        }
    }
}

/// How the 16-byte header is laid out in descriptors.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Header {
    Whole,
    /// Split in two descriptors at this byte.
    Split(u8),
    /// Shorter than 16 bytes.
    Short(u8),
    /// At an address the fuzzer picked.
    At(Addr),
}

/// The status descriptor.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Status {
    Byte,
    /// A longer writable buffer: the status is its last byte.
    Long(u8),
    ReadOnly,
    Missing,
    At(Addr, Len),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Segment {
    sector: Sector,
    num: u8,
    raw_num: Option<u32>,
    flags: u8,
}

#[derive(Arbitrary, Debug)]
struct Request {
    kind: Kind,
    sector: Sector,
    header: Header,
    data: Vec<BufSpec>,
    status: Status,
    segments: Vec<Segment>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Request(Request),
    Indirect(Request),
    /// A descriptor written as a hostile driver likes.
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
    Notify,
    Restart {
        features: u64,
        size: u8,
    },
    ReadConfig {
        offset: u8,
        len: u8,
    },
    /// The operator's `backup` starts now.
    Backup,
}

/// A backup the input started: its copy, the image at its instant, and
/// whether it reported success.
struct Backup {
    copy: File,
    instant: Vec<u8>,
    done: std::sync::mpsc::Receiver<Result<devices::virtio::BackupReport, String>>,
}

fn start_backup(h: &Harness, img: &Image) -> Option<Backup> {
    // SAFETY: memfd_create with a valid C string; the descriptor is owned
    // by the File from here on.
    let fd = unsafe { libc::memfd_create(c"vmm-fuzz-backup".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor that nothing else owns.
    let copy = unsafe { File::from_raw_fd(fd) };
    let (tx, done) = std::sync::mpsc::channel();
    let req = BackupRequest {
        dst: copy.try_clone().unwrap(),
        bytes_per_s: None,
        done: Box::new(move |r| {
            let _ = tx.send(r);
        }),
        started: None,
    };
    let instant = image_contents(img);
    h.blk.lock().unwrap().start_backup(req).ok()?;
    Some(Backup {
        copy,
        instant,
        done,
    })
}

/// Runs the device's event loop until the backup reports; its copy must be
/// the image at its instant.
fn finish_backup(h: &Harness, b: Backup) {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(h.blk.clone());
    let r = loop {
        if let Ok(r) = b.done.try_recv() {
            break r;
        }
        em.run_with_timeout(1000).unwrap();
    };
    let report = r.expect("a backup into memory completes");
    let mut copy = vec![0u8; b.instant.len() + 1];
    let n = b.copy.read_at(&mut copy, 0).unwrap();
    copy.truncate(n);
    assert_eq!(report.size, DISK_SECTORS * SECTOR_SIZE);
    assert!(
        copy == b.instant,
        "the copy is not the image at its instant"
    );
}

#[derive(Arbitrary, Debug)]
struct Input {
    disk: DiskKind,
    /// The disk's `poll_us`, 0 to 8 µs (past 8 µs a kick spins longer
    /// than it finds anything here), the window open from the first kick:
    /// the avail index read in a loop, whatever the guest left there, and
    /// the limits below the first window (1 to 3 µs).
    poll_us: u8,
    features: u64,
    size: u8,
    ops: Vec<Op>,
}

/// The image: an unlinked file reopened through `/proc/self/fd` for each
/// input (so nothing is left behind and each `Block` takes its own lock),
/// on tmpfs where there is one: no disk I/O, and discards are cheap.
struct Image {
    file: File,
    path: PathBuf,
    /// Whether its file system takes O_DIRECT (tmpfs since Linux 6.6).
    direct_ok: bool,
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("vmm-fuzz-blk-{}.img", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the image");
        std::fs::remove_file(&path).expect("unlink the image");
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let direct_ok = {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .is_ok()
        };
        let img = Image {
            file,
            path,
            direct_ok,
        };
        img.file.write_all_at(&pattern(), 0).unwrap();
        img
    })
}

fn pattern() -> Vec<u8> {
    (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8 ^ 0x5a)
        .collect()
}

fn image_contents(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; (DISK_SECTORS * SECTOR_SIZE) as usize + 1];
    let n = img.file.read_at(&mut v, 0).unwrap();
    v.truncate(n);
    v
}

struct Harness {
    blk: Arc<Mutex<Block>>,
    t: MmioTransport,
    mem: Arc<devices::virtio::GuestMemoryMmap>,
    q: TestQueue,
    alloc: Alloc,
    model: InOrderModel,
    /// Status byte address of each head published by `Request`, checked
    /// while `tidy`.
    status_at: Vec<Option<u64>>,
    /// Every chain so far was laid out by the allocator (no wrap), no
    /// descriptor was reused while in flight and no raw write happened: a
    /// status byte can only have been written by its own request.
    tidy: bool,
    /// Descriptors published since the device last served the queue.
    outstanding: usize,
    /// Chains published since then.
    published: u16,
}

impl Harness {
    fn restart(&mut self, features: u64, size: u8) {
        write_reg(&mut self.t, reg::STATUS, 0);
        self.q = fresh_queue(&self.mem, 0, queue_size(size, QUEUE_MAX));
        self.model = InOrderModel::new();
        self.status_at = vec![None; usize::from(self.q.size)];
        self.outstanding = 0;
        self.published = 0;
        start(&mut self.t, features, &[&self.q]);
    }

    fn request(&mut self, r: &Request, indirect: bool) {
        let placed = !matches!(r.header, Header::At(_))
            && r.data.iter().all(|b| matches!(b.place, Place::Next))
            && matches!(r.status, Status::Byte | Status::Long(_));
        let wraps = self.alloc.wraps;
        let mem = self.mem.clone();
        let mem = &*mem;
        let mut bufs = Vec::new();
        let hdr_addr = match r.header {
            Header::At(a) => a.get(),
            _ => self.alloc.place(16),
        };
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&r.kind.code().to_le_bytes());
        hdr[8..16].copy_from_slice(&r.sector.get().to_le_bytes());
        let _ = mem.write_slice(&hdr, GuestAddress(hdr_addr));
        match r.header {
            Header::Whole | Header::At(_) => bufs.push((hdr_addr, 16, false)),
            Header::Split(at) => {
                let at = u32::from(at % 17);
                bufs.push((hdr_addr, at, false));
                bufs.push((hdr_addr + u64::from(at), 16 - at, false));
            }
            Header::Short(n) => bufs.push((hdr_addr, u32::from(n % 16), false)),
        }
        let data: Vec<_> = r.data.iter().map(|s| self.alloc.resolve(s)).collect();
        // Readable payload: the segments for DISCARD/WRITE_ZEROES, a
        // pattern otherwise.
        let mut stream = Vec::new();
        for s in &r.segments {
            stream.extend_from_slice(&s.sector.get().to_le_bytes());
            let num = s.raw_num.unwrap_or(u32::from(s.num));
            stream.extend_from_slice(&num.to_le_bytes());
            stream.extend_from_slice(&u32::from(s.flags).to_le_bytes());
        }
        let readable: Vec<_> = data.iter().copied().filter(|b| !b.2).collect();
        if stream.is_empty() {
            let total: u64 = readable.iter().map(|b| u64::from(b.1)).sum();
            stream = (0..total.min(1 << 16)).map(|i| i as u8).collect();
        }
        fill_stream(mem, &readable, &stream);
        bufs.extend_from_slice(&data);
        let status = match r.status {
            Status::Byte => Some((self.alloc.place(1), 1, true)),
            Status::Long(n) => Some((self.alloc.place(u64::from(n) + 1), u32::from(n) + 1, true)),
            Status::ReadOnly => Some((self.alloc.place(1), 1, false)),
            Status::Missing => None,
            Status::At(a, l) => Some((a.get(), l.get(), true)),
        };
        bufs.extend(status);
        if bufs.is_empty() {
            return;
        }
        self.published = self.published.wrapping_add(1);
        let head = if indirect {
            self.outstanding += 1;
            add_indirect_chain(&mut self.q, mem, &mut self.alloc, &bufs)
        } else {
            self.outstanding += bufs.len();
            self.q.add_chain(mem, &bufs)
        };
        if !placed || self.alloc.wraps != wraps || self.outstanding > usize::from(self.q.size) {
            self.untidy();
        }
        // The status byte the device must fill when it returns the chain
        // with a non-zero length.
        let status_byte = match status {
            Some((a, l, _)) if self.tidy => Some(a + u64::from(l) - 1),
            _ => None,
        };
        if let Some(s) = self.status_at.get_mut(usize::from(head)) {
            *s = status_byte;
            if let Some(a) = status_byte {
                // 0xff: not written yet.
                let _ = mem.write_obj(0xffu8, GuestAddress(a));
            }
        }
    }

    fn untidy(&mut self) {
        self.tidy = false;
        self.status_at.iter_mut().for_each(|s| *s = None);
    }

    fn notify(&mut self) {
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, 0);
        // The event loop would drain the ioeventfd and call process_queue.
        let _ = self.t.queue_events()[0].read();
        let active = self.blk.lock().unwrap().is_activated();
        let queues = [(self.q.desc, self.q.size)];
        let exp = if active {
            self.model.before_run(&self.mem, &self.q, &queues)
        } else {
            None
        };
        let used_before = vmm_fuzz::virtio::Rings {
            mem: &self.mem,
            q: &self.q,
        }
        .used_idx();
        // Polling finds nothing more here (nothing else adds chains while
        // it looks), so the model's expectations hold with it on or off.
        self.blk.lock().unwrap().serve_kick();
        let used_after = vmm_fuzz::virtio::Rings {
            mem: &self.mem,
            q: &self.q,
        }
        .used_idx();
        // Chains the device did not take (it refused a bogus avail index)
        // still hold their descriptors: a later chain may overwrite them,
        // and their status bytes prove nothing any more.
        if active && used_after.wrapping_sub(used_before) < self.published {
            self.untidy();
        }
        self.outstanding = 0;
        self.published = 0;
        let mem = &*self.mem;
        if !active {
            let used = vmm_fuzz::virtio::Rings { mem, q: &self.q }.used_idx();
            assert_eq!(used, used_before, "an inactive device used buffers");
            return;
        }
        let Some(exp) = exp else { return };
        let q = &self.q;
        let entries = self.model.after_run(mem, q, &exp, |head| {
            walk_chain(mem, q.desc, q.size, head).map_or(0, |c| writable_len(&c))
        });
        for (id, len) in entries {
            let Some(Some(at)) = self.status_at.get(id as usize).copied() else {
                continue;
            };
            self.status_at[id as usize] = None;
            if len == 0 {
                continue;
            }
            let s: u8 = mem.read_obj(GuestAddress(at)).unwrap();
            assert!(
                [S_OK, S_IOERR, S_UNSUPP].contains(&s),
                "status {s:#x} for chain {id}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let img = image();
    let (read_only, direct) = match input.disk {
        DiskKind::Writable => (false, false),
        DiskKind::ReadOnly => (true, false),
        DiskKind::Direct => (false, img.direct_ok),
    };
    let mut blk = Block::new(&BlockConfig {
        path: img.path.clone(),
        read_only,
        id: Some("fuzz-serial".into()),
        direct,
        // Served synchronously, so each wake-up's completions can be checked against the
        // in-order model; the io_uring engine parses the same way (Disk::handle).
        engine: devices::virtio::IoEngine::Sync,
        queues: 1,
        poll: std::time::Duration::ZERO,
        // No limits: the in-order model expects each wake-up to serve what
        // is queued (the limits' bucket arithmetic is unit-tested).
        limits: Default::default(),
    })
    .expect("open the image");
    let poll = std::time::Duration::from_micros(u64::from(input.poll_us % 9));
    if !poll.is_zero() {
        blk.force_poll(poll);
    }
    let blk = Arc::new(Mutex::new(blk));
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().unwrap();
    let t = MmioTransport::new(blk.clone(), handle).unwrap();
    let mut h = Harness {
        blk,
        t,
        mem,
        q: TestQueue::new(queue_base(0), 1),
        alloc: Alloc::default(),
        model: InOrderModel::new(),
        status_at: Vec::new(),
        tidy: true,
        outstanding: 0,
        published: 0,
    };
    h.restart(input.features | VIRTIO_F_VERSION_1, input.size);
    let mut backup = None;
    for op in input.ops.iter().take(64) {
        match op {
            Op::Request(r) => h.request(r, false),
            Op::Indirect(r) => h.request(r, true),
            Op::RawDesc {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let i = index % h.q.size;
                h.q.write_desc(&h.mem, i, addr.get(), len.get(), *flags, *next);
                h.untidy();
            }
            Op::PushAvail(head) => h.q.push_avail(&h.mem, *head),
            Op::SetAvailIdx(v) => h.mem.write_obj(*v, GuestAddress(h.q.avail + 2)).unwrap(),
            Op::SetUsedEvent(v) => h.q.set_used_event(&h.mem, *v),
            Op::Poke { addr, bytes } => {
                let _ = h.mem.write_slice(bytes, GuestAddress(addr.get()));
                h.untidy();
            }
            Op::Notify => h.notify(),
            Op::Restart { features, size } => h.restart(*features, *size),
            Op::ReadConfig { offset, len } => {
                let mut buf = vec![0u8; usize::from(*len % 9)];
                devices::BusDevice::read(&mut h.t, 0x100 + u64::from(*offset), &mut buf);
            }
            Op::Backup => {
                if backup.is_none() {
                    backup = start_backup(&h, img);
                }
            }
        }
    }
    h.notify();
    if let Some(b) = backup {
        finish_backup(&h, b);
    }
    let size = img.file.metadata().unwrap().len();
    assert_eq!(size, DISK_SECTORS * SECTOR_SIZE, "the image changed size");
    let stats = h.blk.lock().unwrap().stats();
    if read_only || stats.write_requests + stats.other_requests == 0 {
        assert!(
            image_contents(img) == pattern(),
            "the image changed without a write"
        );
    } else {
        // Written (or discarded): back to the pattern for the next input.
        img.file.write_all_at(&pattern(), 0).unwrap();
    }
});
