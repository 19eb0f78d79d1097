use std::io::{Read, Write};
use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::GuestAddress;
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::mmio::{reg, status};
use crate::virtio::test_utils::*;
use crate::virtio::{GuestMemoryHandle, MmioTransport, VIRTIO_F_VERSION_1};
use crate::{Bus, BusDevice};

type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x40_0000;
const DISK_SECTORS: u64 = 64;

struct Fixture {
    file: TempFile,
    blk: Arc<Mutex<Block>>,
    t: MmioTransport,
    mem: Arc<GuestMemoryMmap>,
    q: TestQueue,
    /// Queues 1.. of a multi-queue disk, where the driver set them up.
    more: Vec<TestQueue>,
    em: Manager,
}

fn image(sectors: u64) -> TempFile {
    image_in(sectors, None)
}

fn image_in(sectors: u64, dir: Option<&Path>) -> TempFile {
    let f = match dir {
        Some(d) => TempFile::new_in(d).unwrap(),
        None => TempFile::new().unwrap(),
    };
    let data: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i / 512) as u8)
        .collect();
    f.as_file().write_all(&data).unwrap();
    f
}

fn file_contents(f: &TempFile) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(f.as_path())
        .unwrap()
        .read_to_end(&mut v)
        .unwrap();
    v
}

impl Fixture {
    fn new(read_only: bool) -> Self {
        Self::with_features(read_only, VIRTIO_F_VERSION_1)
    }

    fn with_features(read_only: bool, features: u64) -> Self {
        Self::build(read_only, features, false)
    }

    /// A writable disk opened with O_DIRECT, on a file system that has it
    /// (tmpfs before Linux 6.6 does not: then the crate's own directory).
    fn direct() -> Self {
        Self::build(false, VIRTIO_F_VERSION_1, true)
    }

    /// A writable disk served through io_uring.
    fn uring() -> Self {
        Self::build_with(false, VIRTIO_F_VERSION_1, false, IoEngine::Uring)
    }

    fn build(read_only: bool, features: u64, direct: bool) -> Self {
        Self::build_with(read_only, features, direct, IoEngine::Sync)
    }

    fn build_with(read_only: bool, features: u64, direct: bool, engine: IoEngine) -> Self {
        Self::build_sized(read_only, features, direct, engine, DISK_SECTORS)
    }

    fn build_sized(
        read_only: bool,
        features: u64,
        direct: bool,
        engine: IoEngine,
        sectors: u64,
    ) -> Self {
        Self::build_queues(read_only, features, direct, engine, sectors, (1, 1))
    }

    /// A disk offering `queues.0` request queues, of which the driver sets
    /// up the first `queues.1` (queue 0 is `q`, the others `more`).
    fn build_queues(
        read_only: bool,
        features: u64,
        direct: bool,
        engine: IoEngine,
        sectors: u64,
        queues: (u16, u16),
    ) -> Self {
        // O_DIRECT needs a file system that has it (tmpfs before Linux 6.6 does not).
        let cfg = |file: &TempFile| BlockConfig {
            path: file.as_path().to_owned(),
            read_only,
            id: Some("disk-serial-1".into()),
            direct,
            engine,
            queues: queues.0,
            poll: Default::default(),
            limits: Default::default(),
        };
        let mut file = image(sectors);
        let mut blk = Block::new(&cfg(&file));
        if let Err(BlockError::DirectUnsupported { .. }) = blk {
            file = image_in(sectors, Some(Path::new(env!("CARGO_MANIFEST_DIR"))));
            blk = Block::new(&cfg(&file));
        }
        let blk = Arc::new(Mutex::new(blk.unwrap()));
        let handle = GuestMemoryHandle::new(guest_memory());
        let mem = handle.get().unwrap();
        let mut t = MmioTransport::new(blk.clone(), handle).unwrap();
        let mut em = Manager::new().unwrap();
        em.add_subscriber(blk.clone());
        let q = TestQueue::new(0x1000, QUEUE_SIZE);
        let more: Vec<TestQueue> = (1..queues.1)
            .map(|i| TestQueue::new(0x1000 + 0x10000 * u64::from(i), QUEUE_SIZE))
            .collect();
        let all: Vec<&TestQueue> = std::iter::once(&q).chain(more.iter()).collect();
        assert_eq!(start(&mut t, features, &all), 0xf);
        let mut f = Self {
            file,
            blk,
            t,
            mem,
            q,
            more,
            em,
        };
        // Activation kicks the queue once; consume that.
        f.run();
        f
    }

    fn run(&mut self) -> usize {
        self.em.run_with_timeout(100).unwrap()
    }

    /// Runs the event loop until `n` chains came back (io_uring completes on a later
    /// wake-up than the kick), at most 5 s.
    fn run_until_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut used = Vec::new();
        while used.len() < n && std::time::Instant::now() < deadline {
            self.run();
            used.extend(self.q.used(&self.mem));
        }
        used
    }

    fn hdr(&self, req_type: u32, sector: u64) {
        self.mem.write_obj(req_type, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Publishes a chain, notifies through QueueNotify, runs the event loop
    /// and returns the used length.
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.q.add_chain(&self.mem, bufs);
        self.notify_and_wait(head)
    }

    fn notify_and_wait(&mut self, head: u16) -> u32 {
        write_reg(&mut self.t, reg::QUEUE_NOTIFY, 0);
        let used = self.run_until_used(1);
        assert_eq!(used.len(), 1, "exactly one completion");
        assert_eq!(used[0].0, u32::from(head));
        used[0].1
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn request(&mut self, req_type: u32, sector: u64, data_len: u32, writable: bool) -> (u32, u8) {
        self.hdr(req_type, sector);
        let mut bufs = vec![(HDR, 16, false)];
        if data_len > 0 {
            bufs.push((DATA, data_len, writable));
        }
        bufs.push((STATUS, 1, true));
        let len = self.submit(&bufs);
        (len, self.status())
    }

    fn read(&mut self, sector: u64, len: u32) -> (u32, u8) {
        self.request(T_IN, sector, len, true)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.request(T_OUT, sector, data.len() as u32, false)
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    /// A good read after a bad request: the queue is still served.
    fn assert_still_serving(&mut self) {
        let (len, st) = self.read(1, 512);
        assert_eq!((len, st), (513, S_OK));
        assert_eq!(self.data(512), vec![1u8; 512]);
    }

    fn stats(&self) -> BlockStats {
        self.blk.lock().unwrap().stats()
    }
}

mod backup;
mod dirty;
mod polling;
mod queues;
mod state;
mod throttle;

#[test]
fn config_space_reports_capacity_seg_max_blk_size() {
    let mut f = Fixture::new(false);
    let mut cap = [0u8; 8];
    f.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(read_reg(&mut f.t, 0x100 + 12), SEG_MAX);
    assert_eq!(read_reg(&mut f.t, 0x100 + 20), 512);
    assert_eq!(read_reg(&mut f.t, reg::DEVICE_ID), 2);
    write_reg(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    let feats = read_reg(&mut f.t, reg::DEVICE_FEATURES);
    assert_ne!(feats & (1 << 9), 0, "FLUSH");
    assert_eq!(feats & (1 << 5), 0, "not RO");
}

#[test]
fn block_read_write_flush_get_id_round_trip() {
    let mut f = Fixture::new(false);
    let (len, st) = f.read(3, 1024);
    assert_eq!((len, st), (1025, S_OK));
    let d = f.data(1024);
    assert!(d[..512].iter().all(|&b| b == 3) && d[512..].iter().all(|&b| b == 4));

    let payload: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(f.write(10, &payload), (1, S_OK));
    let on_disk = file_contents(&f.file);
    assert_eq!(&on_disk[10 * 512..14 * 512], &payload[..]);

    // Read back through a chain split into several data descriptors.
    f.mem.write_slice(&[0u8; 2048], GuestAddress(DATA)).unwrap();
    f.hdr(T_IN, 10);
    let len = f.submit(&[
        (HDR, 16, false),
        (DATA, 100, true),
        (DATA + 100, 1000, true),
        (DATA + 1100, 948, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, f.status()), (2049, S_OK));
    assert_eq!(f.data(2048), payload);

    assert_eq!(f.request(T_FLUSH, 0, 0, false), (1, S_OK));

    let (len, st) = f.request(T_GET_ID, 0, 20, true);
    assert_eq!((len, st), (21, S_OK));
    let mut want = [0u8; 20];
    want[..13].copy_from_slice(b"disk-serial-1");
    assert_eq!(f.data(20), want);

    let s = f.stats();
    assert_eq!(s.read_requests, 2);
    assert_eq!(s.read_bytes, 1024 + 2048);
    assert_eq!(s.write_requests, 1);
    assert_eq!(s.write_bytes, 2048);
    assert_eq!(s.flush_requests, 1);
    assert_eq!(s.other_requests, 1);
    assert_eq!(s.io_errors + s.unsupported + s.invalid_chains, 0);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // virtio 1.x: no assumption about framing. Header+data in one
    // descriptor for OUT, data+status in one for IN.
    let mut f = Fixture::new(false);
    f.hdr(T_OUT, 5);
    f.mem
        .write_slice(&[0xabu8; 512], GuestAddress(HDR + 16))
        .unwrap();
    let len = f.submit(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
    assert_eq!((len, f.status()), (1, S_OK));
    assert_eq!(
        &file_contents(&f.file)[5 * 512..6 * 512],
        &[0xabu8; 512][..]
    );

    f.hdr(T_IN, 5);
    f.mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    let head =
        f.q.add_chain(&f.mem, &[(HDR, 16, false), (DATA, 513, true)]);
    assert_eq!(f.notify_and_wait(head), 513);
    assert_eq!(f.data(512), vec![0xab; 512]);
    assert_eq!(
        f.mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        S_OK
    );
}

#[test]
fn block_read_past_end_returns_ioerr() {
    let mut f = Fixture::new(false);
    assert_eq!(f.read(DISK_SECTORS - 1, 1024).1, S_IOERR);
    assert_eq!(f.read(DISK_SECTORS, 512).1, S_IOERR);
    assert_eq!(f.read(u64::MAX, 512).1, S_IOERR);
    assert_eq!(f.read(u64::MAX / 512 + 1, 512).1, S_IOERR);
    assert_eq!(f.write(DISK_SECTORS, &[1u8; 512]).1, S_IOERR);
    // The last sector itself is fine.
    assert_eq!(f.read(DISK_SECTORS - 1, 512), (513, S_OK));
    assert_eq!(f.stats().io_errors, 5);
    f.assert_still_serving();
}

#[test]
fn unaligned_data_length_returns_ioerr() {
    let mut f = Fixture::new(false);
    assert_eq!(f.read(0, 100).1, S_IOERR);
    assert_eq!(f.write(0, &[1u8; 513]).1, S_IOERR);
    f.assert_still_serving();
}

#[test]
fn unknown_request_type_returns_unsupp() {
    let mut f = Fixture::new(false);
    assert_eq!(f.request(0x1234, 0, 512, true), (1, S_UNSUPP));
    // SCSI passthrough is not supported either.
    assert_eq!(f.request(2, 0, 0, false), (1, S_UNSUPP));
    assert_eq!(f.stats().unsupported, 2);
    f.assert_still_serving();
}

#[test]
fn short_or_unreadable_header_returns_ioerr() {
    let mut f = Fixture::new(false);
    f.hdr(T_IN, 0);
    // Header of 8 bytes.
    assert_eq!(
        f.submit(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // Header device-writable: no readable header at all.
    assert_eq!(
        f.submit(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // Header outside guest memory.
    let out = MEM_SIZE as u64 + 0x1000;
    assert_eq!(
        f.submit(&[(out, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // Header straddling the end of guest memory.
    let edge = MEM_SIZE as u64 - 8;
    assert_eq!(f.submit(&[(edge, 16, false), (STATUS, 1, true)]), 1);
    assert_eq!(f.status(), S_IOERR);
    f.assert_still_serving();
}

#[test]
fn data_with_wrong_direction_returns_ioerr() {
    let mut f = Fixture::new(false);
    let before = file_contents(&f.file);
    // IN whose data buffer is device-readable.
    assert_eq!(f.request(T_IN, 0, 512, false), (1, S_IOERR));
    // OUT whose data buffer is device-writable.
    assert_eq!(f.request(T_OUT, 0, 512, true), (1, S_IOERR));
    // A readable buffer after a writable one.
    f.hdr(T_IN, 0);
    let len = f.submit(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (DATA + 512, 512, false),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, f.status()), (1, S_IOERR));
    assert_eq!(file_contents(&f.file), before);
    f.assert_still_serving();
}

#[test]
fn data_outside_guest_memory_returns_ioerr() {
    let mut f = Fixture::new(false);
    let before = file_contents(&f.file);
    let out = MEM_SIZE as u64 + 0x10000;
    f.hdr(T_IN, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (out, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // OUT with its second data buffer outside memory: nothing is written.
    f.hdr(T_OUT, 0);
    f.mem.write_slice(&[9u8; 512], GuestAddress(DATA)).unwrap();
    let len = f.submit(&[
        (HDR, 16, false),
        (DATA, 512, false),
        (out, 512, false),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, f.status()), (1, S_IOERR));
    // Straddling the end of memory.
    f.hdr(T_IN, 0);
    let edge = MEM_SIZE as u64 - 256;
    assert_eq!(
        f.submit(&[(HDR, 16, false), (edge, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // Address overflow.
    assert_eq!(
        f.submit(&[
            (HDR, 16, false),
            (u64::MAX - 100, 512, true),
            (STATUS, 1, true)
        ]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    assert_eq!(file_contents(&f.file), before);
    f.assert_still_serving();
}

#[test]
fn missing_or_unwritable_status_returns_chain_with_len_0() {
    let mut f = Fixture::new(false);
    f.hdr(T_FLUSH, 0);
    // No status descriptor at all.
    assert_eq!(f.submit(&[(HDR, 16, false)]), 0);
    assert_eq!(f.status(), 0xff);
    // Status descriptor read-only.
    assert_eq!(f.submit(&[(HDR, 16, false), (STATUS, 1, false)]), 0);
    assert_eq!(f.status(), 0xff);
    // Status descriptor of length 0.
    assert_eq!(f.submit(&[(HDR, 16, false), (STATUS, 0, true)]), 0);
    assert_eq!(f.status(), 0xff);
    // IN with a read-only status after writable data.
    f.hdr(T_IN, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]),
        0
    );
    assert_eq!(f.status(), 0xff);
    // Status outside guest memory.
    f.hdr(T_FLUSH, 0);
    let out = MEM_SIZE as u64 + 0x1000;
    assert_eq!(f.submit(&[(HDR, 16, false), (out, 1, true)]), 0);
    assert_eq!(f.stats().invalid_chains, 5);
    f.assert_still_serving();
}

#[test]
fn looping_or_broken_chains_return_len_0() {
    let mut f = Fixture::new(false);
    f.hdr(T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    let idx = f.q.alloc(2);
    f.q.write_desc(&f.mem, idx[0], HDR, 16, VRING_DESC_F_NEXT, idx[1]);
    f.q.write_desc(
        &f.mem,
        idx[1],
        STATUS,
        1,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        idx[0],
    );
    f.q.push_avail(&f.mem, idx[0]);
    assert_eq!(f.notify_and_wait(idx[0]), 0);
    // A descriptor pointing to itself.
    let i = f.q.alloc(1)[0];
    f.q.write_desc(
        &f.mem,
        i,
        STATUS,
        1,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        i,
    );
    f.q.push_avail(&f.mem, i);
    assert_eq!(f.notify_and_wait(i), 0);
    // `next` out of range.
    let i = f.q.alloc(1)[0];
    f.q.write_desc(&f.mem, i, HDR, 16, VRING_DESC_F_NEXT, QUEUE_SIZE + 5);
    f.q.push_avail(&f.mem, i);
    assert_eq!(f.notify_and_wait(i), 0);
    // Indirect table outside guest memory.
    let i = f.q.alloc(1)[0];
    f.q.write_desc(
        &f.mem,
        i,
        MEM_SIZE as u64 + 0x1000,
        32,
        VRING_DESC_F_INDIRECT,
        0,
    );
    f.q.push_avail(&f.mem, i);
    assert_eq!(f.notify_and_wait(i), 0);
    // Indirect table that loops.
    let table = 0x50_0000u64;
    f.mem.write_obj(HDR, GuestAddress(table)).unwrap();
    f.mem.write_obj(16u32, GuestAddress(table + 8)).unwrap();
    f.mem
        .write_obj(VRING_DESC_F_NEXT, GuestAddress(table + 12))
        .unwrap();
    f.mem.write_obj(0u16, GuestAddress(table + 14)).unwrap();
    let i = f.q.alloc(1)[0];
    f.q.write_desc(&f.mem, i, table, 16, VRING_DESC_F_INDIRECT, 0);
    f.q.push_avail(&f.mem, i);
    assert_eq!(f.notify_and_wait(i), 0);
    assert_eq!(f.stats().invalid_chains, 5);
    f.assert_still_serving();
}

#[test]
fn indirect_descriptors_are_served() {
    let mut f = Fixture::new(false);
    f.hdr(T_IN, 2);
    let table = 0x50_0000u64;
    let descs: [(u64, u32, u16); 3] = [
        (HDR, 16, VRING_DESC_F_NEXT),
        (DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
        (STATUS, 1, VRING_DESC_F_WRITE),
    ];
    for (k, (addr, len, flags)) in descs.iter().enumerate() {
        let a = table + 16 * k as u64;
        f.mem.write_obj(*addr, GuestAddress(a)).unwrap();
        f.mem.write_obj(*len, GuestAddress(a + 8)).unwrap();
        f.mem.write_obj(*flags, GuestAddress(a + 12)).unwrap();
        f.mem.write_obj(k as u16 + 1, GuestAddress(a + 14)).unwrap();
    }
    let i = f.q.alloc(1)[0];
    f.q.write_desc(&f.mem, i, table, 48, VRING_DESC_F_INDIRECT, 0);
    f.q.push_avail(&f.mem, i);
    assert_eq!(f.notify_and_wait(i), 513);
    assert_eq!(f.status(), S_OK);
    assert_eq!(f.data(512), vec![2u8; 512]);
}

#[test]
fn head_index_out_of_range_is_skipped() {
    let mut f = Fixture::new(false);
    f.q.push_avail(&f.mem, QUEUE_SIZE + 3);
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.run();
    assert!(f.q.used(&f.mem).is_empty());
    assert_eq!(f.stats().invalid_chains, 1);
    f.assert_still_serving();
}

#[test]
fn broken_avail_index_does_not_spin() {
    let mut f = Fixture::new(false);
    // The driver claims 1000 new entries in a 256-entry ring.
    f.mem
        .write_obj(1000u16, GuestAddress(f.q.avail + 2))
        .unwrap();
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.run(), 1);
    assert!(f.q.used(&f.mem).is_empty());
    // Nothing left to do: the loop is idle.
    assert_eq!(f.em.run_with_timeout(20).unwrap(), 0);
}

#[test]
fn get_id_with_short_buffer_and_default_id() {
    let mut f = Fixture::new(false);
    assert_eq!(f.request(T_GET_ID, 0, 4, true), (5, S_OK));
    assert_eq!(f.data(4), b"disk");
    assert_eq!(f.request(T_GET_ID, 0, 0, false), (1, S_IOERR));

    let file = image(8);
    let blk = Block::new(&BlockConfig {
        path: file.as_path().to_owned(),
        read_only: true,
        id: None,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(blk.disk.id, [0u8; 20]);
    let long = Block::new(&BlockConfig {
        path: file.as_path().to_owned(),
        read_only: true,
        id: Some("x".repeat(21)),
        ..Default::default()
    });
    assert!(matches!(long, Err(BlockError::IdTooLong { .. })));
}

#[test]
fn read_only_disk_rejects_writes_and_image_is_unchanged() {
    let mut f = Fixture::new(true);
    write_reg(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    let feats = read_reg(&mut f.t, reg::DEVICE_FEATURES);
    assert_ne!(feats & (1 << 5), 0, "RO offered");
    assert_eq!(feats & (1 << 13 | 1 << 14), 0, "no DISCARD/WRITE_ZEROES");
    let before = file_contents(&f.file);
    // The guest ignores the RO flag.
    assert_eq!(f.write(0, &[0x55u8; 4096]), (1, S_IOERR));
    let seg = discard_seg(0, 8, 0);
    assert_eq!(f.discard_like(T_DISCARD, &[seg]), S_IOERR);
    assert_eq!(f.discard_like(T_WRITE_ZEROES, &[seg]), S_IOERR);
    assert_eq!(f.request(T_FLUSH, 0, 0, false), (1, S_OK));
    assert_eq!(file_contents(&f.file), before);
    assert_eq!(f.stats().io_errors, 3);
    f.assert_still_serving();
}

fn discard_seg(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

impl Fixture {
    fn discard_like(&mut self, req_type: u32, segs: &[[u8; 16]]) -> u8 {
        self.hdr(req_type, 0);
        let bytes: Vec<u8> = segs.iter().flatten().copied().collect();
        self.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let len = self.submit(&[
            (HDR, 16, false),
            (DATA, bytes.len() as u32, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(len, 1);
        self.status()
    }
}

#[test]
fn discard_and_write_zeroes() {
    let mut f = Fixture::new(false);
    assert_eq!(
        f.discard_like(
            T_WRITE_ZEROES,
            &[discard_seg(2, 2, 0), discard_seg(8, 1, 1)]
        ),
        S_OK
    );
    let d = file_contents(&f.file);
    assert!(d[2 * 512..4 * 512].iter().all(|&b| b == 0));
    assert!(d[8 * 512..9 * 512].iter().all(|&b| b == 0));
    assert!(d[4 * 512..5 * 512].iter().all(|&b| b == 4));
    assert_eq!(f.discard_like(T_DISCARD, &[discard_seg(16, 8, 0)]), S_OK);
    // Discard with the unmap flag is UNSUPP; ranges past the end are IOERR.
    assert_eq!(f.discard_like(T_DISCARD, &[discard_seg(0, 1, 1)]), S_UNSUPP);
    assert_eq!(
        f.discard_like(T_WRITE_ZEROES, &[discard_seg(DISK_SECTORS, 1, 0)]),
        S_IOERR
    );
    // Too many segments.
    let many = vec![discard_seg(0, 1, 0); MAX_DISCARD_SEG as usize + 1];
    assert_eq!(f.discard_like(T_DISCARD, &many), S_IOERR);
    f.assert_still_serving();
}

#[test]
fn a_migrations_write_log_marks_the_chunks_of_completed_writes_and_zeroes_on_both_engines() {
    for engine in [IoEngine::Sync, IoEngine::Uring] {
        // 512 KiB: chunks 0 to 7.
        let mut f = Fixture::build_sized(false, VIRTIO_F_VERSION_1, false, engine, 1024);
        let src = f.blk.lock().unwrap().copy_source().unwrap();
        let log = src.log();
        assert_eq!(f.write(0, &[1u8; 512]).1, S_OK);
        assert!(
            log.take().is_empty(),
            "{engine:?}: nothing logged before the first start"
        );
        log.start().unwrap();
        // Sector 300 is byte 153 600: chunk 2.
        assert_eq!(f.write(300, &[7u8; 1024]).1, S_OK);
        assert_eq!(f.read(600, 512).1, S_OK);
        // Sector 900 is byte 460 800: chunk 7.
        assert_eq!(
            f.discard_like(T_WRITE_ZEROES, &[discard_seg(900, 8, 0)]),
            S_OK
        );
        assert_eq!(
            log.take(),
            vec![(1 << 2) | (1 << 7)],
            "{engine:?}: the writes' chunks, not the read's"
        );
        let mut r = src.reader(COPY_CHUNK as usize);
        assert_eq!(r.read(300 * 512, 1024).unwrap(), &[7u8; 1024][..]);
        log.stop();
        assert_eq!(f.write(0, &[2u8; 512]).1, S_OK);
        assert_eq!(log.take(), vec![0], "{engine:?}: stopped");
    }
}

#[test]
fn writable_image_already_locked_is_a_clear_error() {
    let file = image(8);
    let cfg = BlockConfig {
        path: file.as_path().to_owned(),
        read_only: false,
        id: None,
        ..Default::default()
    };
    let _first = Block::new(&cfg).unwrap();
    let err = Block::new(&cfg).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "disk image {} is locked by another process",
            file.as_path().display()
        )
    );
    // Nor can it be opened read-only while a writer holds it.
    let ro = BlockConfig {
        read_only: true,
        ..cfg.clone()
    };
    assert!(matches!(Block::new(&ro), Err(BlockError::Locked { .. })));
    drop(_first);
    // Several read-only users may share it.
    let _a = Block::new(&ro).unwrap();
    let _b = Block::new(&ro).unwrap();
    assert!(matches!(Block::new(&cfg), Err(BlockError::Locked { .. })));
}

#[test]
fn missing_image_is_a_clear_error() {
    let cfg = BlockConfig {
        path: "/nonexistent/disk.img".into(),
        read_only: false,
        id: None,
        ..Default::default()
    };
    let msg = Block::new(&cfg).err().unwrap().to_string();
    assert!(
        msg.starts_with("cannot open disk image /nonexistent/disk.img: No such file or directory"),
        "{msg}"
    );
    let dir = BlockConfig {
        path: "/".into(),
        read_only: true,
        id: None,
        ..Default::default()
    };
    let msg = Block::new(&dir).err().unwrap().to_string();
    assert_eq!(msg, "disk image / is not a regular file or block device");
}

#[test]
fn partial_last_sector_is_not_exposed() {
    let f = TempFile::new().unwrap();
    f.as_file().write_all(&[1u8; 1000]).unwrap();
    let blk = Block::new(&BlockConfig {
        path: f.as_path().to_owned(),
        read_only: true,
        id: None,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(blk.capacity_sectors(), 1);
}

#[test]
fn reset_mid_flight_leaves_no_stale_state() {
    let mut f = Fixture::new(false);
    // A request is queued and notified, and a completion interrupt is
    // pending, when the driver resets the device.
    f.hdr(T_OUT, 0);
    f.mem
        .write_slice(&[0x77u8; 512], GuestAddress(DATA))
        .unwrap();
    f.q.add_chain(
        &f.mem,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    f.t.interrupt().signal_used_queue();
    write_reg(&mut f.t, reg::STATUS, 0);

    assert_eq!(read_reg(&mut f.t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(read_reg(&mut f.t, reg::STATUS), 0);
    assert_eq!(read_reg(&mut f.t, reg::QUEUE_READY), 0);
    assert!(!f.blk.lock().unwrap().is_activated());
    // The pending notification reaches a stopped device: nothing happens.
    let before = file_contents(&f.file);
    f.run();
    assert!(f.q.used(&f.mem).is_empty());
    assert_eq!(file_contents(&f.file), before);
    assert_eq!(f.stats().write_requests, 0);

    // A fresh driver sets the device up again on new rings and is served
    // from index 0.
    f.q = TestQueue::new(0x8000, 128);
    assert_eq!(start(&mut f.t, VIRTIO_F_VERSION_1, &[&f.q]), 0xf);
    f.run();
    let _ = f.t.interrupt_event().read();
    f.assert_still_serving();
    assert_eq!(f.t.interrupt_event().read().unwrap(), 1);
}

#[test]
fn requests_queued_before_driver_ok_are_served_at_activation() {
    let file = image(8);
    let blk = Arc::new(Mutex::new(
        Block::new(&BlockConfig {
            path: file.as_path().to_owned(),
            read_only: false,
            id: None,
            ..Default::default()
        })
        .unwrap(),
    ));
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().unwrap();
    let mut t = MmioTransport::new(blk.clone(), handle).unwrap();
    let mut em = Manager::new().unwrap();
    em.add_subscriber(blk.clone());
    let mut q = TestQueue::new(0x1000, 16);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    q.setup(&mut t, 0);
    mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
    mem.write_obj(3u64, GuestAddress(HDR + 8)).unwrap();
    q.add_chain(
        &mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    // Before DRIVER_OK nothing is served, even when notified.
    write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
    em.run_with_timeout(50).unwrap();
    assert!(q.used(&mem).is_empty());
    write_reg(&mut t, reg::STATUS, 0xf);
    let mut used = Vec::new();
    for _ in 0..50 {
        em.run_with_timeout(100).unwrap();
        used.extend(q.used(&mem));
        if !used.is_empty() {
            break;
        }
    }
    assert_eq!(used, vec![(0, 513)]);
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut f = Fixture::with_features(
        false,
        VIRTIO_F_VERSION_1 | super::super::VIRTIO_RING_F_EVENT_IDX,
    );
    let _ = f.t.interrupt_event().read();
    // The driver wants an interrupt only after the 3rd completion.
    f.q.set_used_event(&f.mem, 2);
    for i in 0..3 {
        f.read(1, 512);
        let fired = f.t.interrupt_event().read().is_ok();
        assert_eq!(fired, i == 2, "completion {i}");
        write_reg(&mut f.t, reg::INTERRUPT_ACK, 1);
    }
}

/// The VMM's wiring without KVM: the transport on an MMIO bus (vCPU side),
/// the device on an `EventManager` running on another thread (VMM side),
/// the queue notified through the eventfd an ioeventfd would signal, and
/// completion observed on the irqfd eventfd.
#[test]
fn bus_and_event_loop_share_the_device_across_threads() {
    let file = image(DISK_SECTORS);
    let blk = Arc::new(Mutex::new(
        Block::new(&BlockConfig {
            path: file.as_path().to_owned(),
            read_only: false,
            id: None,
            ..Default::default()
        })
        .unwrap(),
    ));
    let handle = GuestMemoryHandle::new(guest_memory());
    let mem = handle.get().unwrap();
    let transport = MmioTransport::new(blk.clone(), handle).unwrap();
    let notify = transport.queue_events()[0].try_clone().unwrap();
    let irq = transport.interrupt_event().try_clone().unwrap();
    let transport = Arc::new(Mutex::new(transport));
    let base = 0xd000_0000u64;
    let mut bus = Bus::new();
    bus.insert(transport.clone(), base, crate::virtio::MMIO_SIZE)
        .unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let sub: Arc<Mutex<dyn MutEventSubscriber + Send>> = blk.clone();
    let looper = std::thread::spawn(move || {
        let mut em = Manager::new().unwrap();
        em.add_subscriber(sub);
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            em.run_with_timeout(10).unwrap();
        }
    });

    let w = |off: u64, v: u32| assert!(bus.write(base + off, &v.to_le_bytes()));
    let r = |off: u64| {
        let mut b = [0u8; 4];
        assert!(bus.read(base + off, &mut b));
        u32::from_le_bytes(b)
    };
    let mut q = TestQueue::new(0x1000, 64);
    w(reg::STATUS, status::ACKNOWLEDGE);
    w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    w(reg::DRIVER_FEATURES_SEL, 1);
    w(reg::DRIVER_FEATURES, 1);
    w(reg::STATUS, 0xb);
    q.setup(&mut transport.lock().unwrap(), 0);
    w(reg::STATUS, 0xf);
    assert_eq!(r(reg::STATUS), 0xf);

    let poll_irq = || {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&irq),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 5000) }, 1, "interrupt");
        irq.read().unwrap();
    };
    for i in 0..32u64 {
        mem.write_obj(T_OUT, GuestAddress(HDR)).unwrap();
        mem.write_obj(i, GuestAddress(HDR + 8)).unwrap();
        mem.write_slice(&[i as u8 ^ 0x5a; 512], GuestAddress(DATA))
            .unwrap();
        q.add_chain(
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        notify.write(1).unwrap(); // what KVM does on the guest's QueueNotify write
        poll_irq();
        assert_eq!(r(reg::INTERRUPT_STATUS), 1);
        w(reg::INTERRUPT_ACK, 1);
        assert_eq!(q.used(&mem), vec![(i as u32 * 3 % 64, 1)]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    looper.join().unwrap();
    let d = file_contents(&file);
    for i in 0..32usize {
        assert!(d[i * 512..(i + 1) * 512]
            .iter()
            .all(|&b| b == i as u8 ^ 0x5a));
    }
    assert_eq!(blk.lock().unwrap().stats().write_requests, 32);
}

#[test]
fn direct_disk_serves_aligned_and_unaligned_guest_buffers() {
    direct_disk_serves(Fixture::direct());
}

#[test]
fn direct_disk_through_io_uring_serves_aligned_and_unaligned_guest_buffers() {
    let f = Fixture::build_with(false, VIRTIO_F_VERSION_1, true, IoEngine::Uring);
    assert_eq!(f.blk.lock().unwrap().engine_name(), "io_uring");
    direct_disk_serves(f);
}

fn direct_disk_serves(mut f: Fixture) {
    assert!(f.blk.lock().unwrap().disk.dio.is_some());
    // Page-aligned buffer: straight O_DIRECT.
    let (len, st) = f.read(3, 1024);
    assert_eq!((len, st), (1025, S_OK));
    let d = f.data(1024);
    assert!(d[..512].iter().all(|&b| b == 3) && d[512..].iter().all(|&b| b == 4));
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    assert_eq!(f.write(8, &payload), (1, S_OK));
    assert_eq!(&file_contents(&f.file)[8 * 512..16 * 512], &payload[..]);

    // The same data split over buffers O_DIRECT cannot take (odd address,
    // lengths not multiples of 512): served through the bounce buffer.
    let odd = DATA + 0x1_0000 + 3;
    f.hdr(T_IN, 8);
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = f.q.add_chain(
        &f.mem,
        &[
            (HDR, 16, false),
            (odd, 100, true),
            (odd + 1000, 3996, true),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(f.notify_and_wait(head), 4097);
    assert_eq!(f.status(), S_OK);
    let mut got = vec![0u8; 4096];
    f.mem
        .read_slice(&mut got[..100], GuestAddress(odd))
        .unwrap();
    f.mem
        .read_slice(&mut got[100..], GuestAddress(odd + 1000))
        .unwrap();
    assert_eq!(got, payload);

    let back: Vec<u8> = payload.iter().map(|b| b ^ 0x5a).collect();
    f.mem.write_slice(&back[..100], GuestAddress(odd)).unwrap();
    f.mem
        .write_slice(&back[100..], GuestAddress(odd + 1000))
        .unwrap();
    f.hdr(T_OUT, 20);
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head = f.q.add_chain(
        &f.mem,
        &[
            (HDR, 16, false),
            (odd, 100, false),
            (odd + 1000, 3996, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(f.notify_and_wait(head), 1);
    assert_eq!(f.status(), S_OK);
    assert_eq!(&file_contents(&f.file)[20 * 512..28 * 512], &back[..]);

    f.assert_still_serving();
    let s = f.stats();
    assert_eq!((s.read_requests, s.write_requests, s.io_errors), (3, 2, 0));
}

#[test]
fn direct_disk_reports_its_logical_block_size() {
    let mut f = Fixture::direct();
    let dio = f.blk.lock().unwrap().disk.dio.unwrap();
    let expect = dio.offset.clamp(512, 4096) as u32;
    assert_eq!(read_reg(&mut f.t, 0x100 + 20), expect);
}

#[test]
fn direct_disk_rejects_hostile_chains_and_keeps_serving() {
    let mut f = Fixture::direct();
    let before = file_contents(&f.file);
    // An unaligned buffer (bounce path) straddling the end of guest memory.
    let edge = MEM_SIZE as u64 - 253;
    f.hdr(T_IN, 0);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (edge, 512, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    // OUT whose second, unaligned buffer lies outside memory: nothing is
    // written, not even the first buffer's bytes.
    f.hdr(T_OUT, 0);
    f.mem
        .write_slice(&[9u8; 100], GuestAddress(DATA + 3))
        .unwrap();
    let len = f.submit(&[
        (HDR, 16, false),
        (DATA + 3, 100, false),
        (MEM_SIZE as u64 + 0x1000, 412, false),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, f.status()), (1, S_IOERR));
    // Unaligned and past the end of the disk.
    f.hdr(T_IN, DISK_SECTORS - 1);
    assert_eq!(
        f.submit(&[(HDR, 16, false), (DATA + 3, 1024, true), (STATUS, 1, true)]),
        1
    );
    assert_eq!(f.status(), S_IOERR);
    assert_eq!(file_contents(&f.file), before);
    f.assert_still_serving();
}

#[test]
fn a_wake_up_serves_at_most_its_budget_and_comes_back_for_the_rest() {
    let mut f = Fixture::new(false);
    f.blk.lock().unwrap().set_budget(2);
    // Five FLUSH requests (header + status) published at once, one kick.
    f.hdr(T_FLUSH, 0);
    let heads: Vec<u16> = (0..5)
        .map(|_| {
            f.q.add_chain(&f.mem, &[(HDR, 16, false), (STATUS, 1, true)])
        })
        .collect();
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    let mut served = Vec::new();
    let mut per_wake = Vec::new();
    for _ in 0..5 {
        if f.run() == 0 {
            break;
        }
        let used = f.q.used(&f.mem);
        per_wake.push(used.len());
        served.extend(used.into_iter().map(|(h, _)| h as u16));
    }
    // Two, two, one: each wake-up yields to the event loop after its
    // budget, and the device's own kick brings it back for the rest.
    assert_eq!(per_wake, vec![2, 2, 1]);
    assert_eq!(served, heads);
    assert_eq!(f.run(), 0, "no wake-up once the ring is empty");
}

impl Fixture {
    /// Publishes request `i` (its own header, data and status bytes) without kicking.
    fn publish(&mut self, i: u64, req_type: u32, sector: u64, data: Option<(&[u8], bool)>) -> u16 {
        let hdr = HDR + 16 * i;
        self.mem.write_obj(req_type, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + i))
            .unwrap();
        let mut bufs = vec![(hdr, 16, false)];
        if let Some((bytes, writable)) = data {
            let at = DATA + 512 * i;
            self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
            bufs.push((at, bytes.len() as u32, writable));
        }
        bufs.push((STATUS + i, 1, true));
        self.q.add_chain(&self.mem, &bufs)
    }

    fn status_of(&self, i: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + i)).unwrap()
    }
}

#[test]
fn io_uring_serves_the_whole_round_trip_and_hostile_chains() {
    let mut f = Fixture::uring();
    assert_eq!(f.blk.lock().unwrap().engine_name(), "io_uring");
    assert_eq!(f.write(5, &[0xabu8; 1024]), (1, S_OK));
    assert_eq!(f.request(T_FLUSH, 0, 0, false), (1, S_OK));
    assert_eq!(f.read(5, 1024), (1025, S_OK));
    assert_eq!(f.data(1024), vec![0xabu8; 1024]);
    assert_eq!(
        &file_contents(&f.file)[5 * 512..7 * 512],
        &[0xabu8; 1024][..]
    );
    assert_eq!(f.read(DISK_SECTORS - 1, 1024), (1, S_IOERR), "past the end");
    // Data outside guest memory.
    f.hdr(T_IN, 0);
    let len = f.submit(&[
        (HDR, 16, false),
        (MEM_SIZE as u64 - 256, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!((len, f.status()), (1, S_IOERR));
    f.assert_still_serving();
    let s = f.stats();
    assert_eq!((s.write_requests, s.write_bytes), (1, 1024));
    assert_eq!(s.flush_requests, 1);
}

#[test]
fn io_uring_keeps_a_queues_worth_of_requests_in_flight() {
    let mut f = Fixture::uring();
    const N: u64 = 32;
    let heads: Vec<u16> = (0..N)
        .map(|i| f.publish(i, T_IN, i % DISK_SECTORS, Some((&[0u8; 512], true))))
        .collect();
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    // One wake-up submits them all; none is waited for there.
    assert_eq!(f.run(), 1);
    assert_eq!(f.blk.lock().unwrap().in_flight(), N as usize);
    let used = f.run_until_used(N as usize);
    let mut got: Vec<u16> = used.iter().map(|&(h, _)| h as u16).collect();
    got.sort_unstable();
    let mut want = heads.clone();
    want.sort_unstable();
    assert_eq!(got, want);
    for i in 0..N {
        assert_eq!(f.status_of(i), S_OK);
        let mut buf = [0u8; 512];
        f.mem
            .read_slice(&mut buf, GuestAddress(DATA + 512 * i))
            .unwrap();
        assert_eq!(buf, [(i % DISK_SECTORS) as u8; 512], "request {i}");
    }
    assert_eq!(f.blk.lock().unwrap().in_flight(), 0);
}

#[test]
fn io_uring_completes_a_flush_after_the_writes_before_it_and_before_the_ones_after() {
    let mut f = Fixture::uring();
    let writes: Vec<u16> = (0..8)
        .map(|i| f.publish(i, T_OUT, i, Some((&[0x11u8; 512], false))))
        .collect();
    let flush = f.publish(8, T_FLUSH, 0, None);
    let after = f.publish(9, T_OUT, 9, Some((&[0x22u8; 512], false)));
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    let used = f.run_until_used(10);
    let order: Vec<u16> = used.iter().map(|&(h, _)| h as u16).collect();
    let pos = |h: u16| order.iter().position(|&x| x == h).unwrap();
    for w in writes {
        assert!(
            pos(w) < pos(flush),
            "write {w} completed after the flush: {order:?}"
        );
    }
    assert!(
        pos(after) > pos(flush),
        "a later write overtook the flush: {order:?}"
    );
    assert!((0..10).all(|i| f.status_of(i) == S_OK));
    let disk = file_contents(&f.file);
    assert_eq!(&disk[..8 * 512], &[0x11u8; 8 * 512][..]);
    assert_eq!(&disk[9 * 512..10 * 512], &[0x22u8; 512][..]);
}

#[test]
fn a_reset_with_requests_in_flight_waits_for_them_and_returns_none_to_the_next_driver() {
    let mut f = Fixture::uring();
    for i in 0..16 {
        f.publish(i, T_OUT, i, Some((&[0x33u8; 512], false)));
    }
    write_reg(&mut f.t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(f.run(), 1);
    assert_eq!(f.blk.lock().unwrap().in_flight(), 16);
    // The driver resets the device: every request in flight is finished first.
    write_reg(&mut f.t, reg::STATUS, 0);
    assert_eq!(f.blk.lock().unwrap().in_flight(), 0);
    assert!(f.q.used(&f.mem).is_empty(), "the old queue got completions");
    // A new driver starts from scratch (fresh rings) and is served.
    f.mem
        .write_slice(&[0u8; 0x3000], GuestAddress(0x1000))
        .unwrap();
    f.q = TestQueue::new(0x1000, QUEUE_SIZE);
    assert_eq!(start(&mut f.t, VIRTIO_F_VERSION_1, &[&f.q]), 0xf);
    f.run();
    let _ = f.q.used(&f.mem);
    assert_eq!(f.read(20, 512), (513, S_OK));
    assert_eq!(f.data(512), vec![20u8; 512]);
    // The writes in flight at the reset were carried out, not lost halfway.
    assert_eq!(&file_contents(&f.file)[..16 * 512], &[0x33u8; 16 * 512][..]);
}
