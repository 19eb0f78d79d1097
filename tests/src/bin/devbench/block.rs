//! virtio-blk through the harness vs the host doing the same I/O on the
//! same file with `O_DIRECT`: sequential 1 MiB reads and writes, random
//! 4 KiB reads, one request in flight (what `dd iflag=direct` or a QD1 fio
//! job does in a guest).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::block::AlignedBuf;
use devices::virtio::{Block, BlockConfig, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

use crate::driver::{thread_cpu_secs, Driver, HaltPoll, Pass, Stopwatch, Vq};

pub const SEQ_BLOCK: usize = 1 << 20;
pub const RAND_BLOCK: usize = 4096;

const QUEUE: u64 = 0x1_0000;
const HDR: u64 = 0x2_0000;
const STATUS: u64 = 0x2_1000;
const DATA: u64 = 0x10_0000;
const MEM: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    SeqRead,
    SeqWrite,
    RandRead,
}

impl Op {
    pub fn block(self) -> usize {
        match self {
            Op::SeqRead | Op::SeqWrite => SEQ_BLOCK,
            Op::RandRead => RAND_BLOCK,
        }
    }
}

/// The offsets one pass visits: the whole file in order, or `count`
/// pseudo-random 4 KiB blocks (the same sequence for host and device).
pub fn offsets(op: Op, file_size: u64, count: usize) -> Vec<u64> {
    let bs = op.block() as u64;
    let blocks = file_size / bs;
    match op {
        Op::SeqRead | Op::SeqWrite => (0..blocks).map(|b| b * bs).collect(),
        Op::RandRead => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            (0..count)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % blocks) * bs
                })
                .collect()
        }
    }
}

/// Creates (or reuses) a file of `size` bytes of non-zero data.
pub fn prepare_file(path: &Path, size: u64) -> io::Result<()> {
    if std::fs::metadata(path).map(|m| m.len()).ok() == Some(size) {
        return Ok(());
    }
    let f = File::create(path)?;
    let chunk: Vec<u8> = (0..SEQ_BLOCK).map(|i| (i * 31 + 7) as u8).collect();
    let mut off = 0;
    while off < size {
        f.write_all_at(&chunk, off)?;
        off += SEQ_BLOCK as u64;
    }
    f.sync_all()
}

/// The host alone: `pread`/`pwrite` with O_DIRECT.
pub fn host_pass(path: &Path, op: Op, offsets: &[u64]) -> io::Result<Pass> {
    let f = OpenOptions::new()
        .read(true)
        .write(op == Op::SeqWrite)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut a = AlignedBuf::new(op.block(), 4096);
    let buf = a.as_mut_slice();
    // Real, written pages, as the guest's are.
    buf.fill(0x5a);
    let sw = Stopwatch::start(thread_cpu_secs());
    for &off in offsets {
        match op {
            Op::SeqWrite => f.write_all_at(buf, off)?,
            _ => f.read_exact_at(buf, off)?,
        }
    }
    if op == Op::SeqWrite {
        f.sync_data()?;
    }
    Ok(sw.finish(thread_cpu_secs()))
}

/// How the harness's driver learns that a request completed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// It sleeps until the device's interrupt (a guest's usual queue).
    Interrupt,
    /// It waits for the device's interrupt as a vCPU on KVM does: halt
    /// polling first (KVM's default, see [`crate::driver::HaltPoll`]),
    /// then sleep.
    HaltPolls,
    /// It spins on the used ring with interrupts off, as a Linux guest does
    /// on virtio-blk's poll queues (`virtio_blk.poll_queues=N`, io_uring
    /// with IOPOLL, `fio --hipri`).
    Polls,
}

impl Wait {
    /// The driver's halt polling for this way of waiting.
    pub fn halt_poll(self) -> Option<HaltPoll> {
        (self == Wait::HaltPolls).then(HaltPoll::default)
    }
}

/// Waits as `wait` says: until one of `qs` has used entries to take, or
/// until the device's interrupt (which may find nothing new to take).
pub fn wait_completion(d: &mut Driver, qs: &[Vq], wait: Wait) -> io::Result<()> {
    match wait {
        Wait::Polls => {
            let started = std::time::Instant::now();
            while !qs.iter().any(|q| q.has_used(&d.mem)) {
                std::hint::spin_loop();
                if started.elapsed() > Duration::from_secs(10) {
                    return Err(io::Error::other("no completion from virtio-blk in 10 s"));
                }
            }
            Ok(())
        }
        Wait::Interrupt | Wait::HaltPolls if d.wait_interrupt(Duration::from_secs(10))? => Ok(()),
        Wait::Interrupt | Wait::HaltPolls => {
            Err(io::Error::other("no interrupt from virtio-blk in 10 s"))
        }
    }
}

/// The same I/O as virtio-blk requests through the real device
/// (`direct=on`), transport and event loop.
pub fn device_pass(
    path: &Path,
    op: Op,
    offsets: &[u64],
    poll: Duration,
    wait: Wait,
) -> io::Result<Pass> {
    let (mut d, mut q) = start_device(BlockConfig {
        path: path.to_owned(),
        read_only: false,
        id: None,
        direct: true,
        engine: devices::virtio::IoEngine::Auto,
        queues: 1,
        poll,
        limits: Default::default(),
    })?;
    // The guest's data pages are real, written pages (as the host buffer
    // is), not the untouched zero page.
    d.mem
        .write_slice(&vec![0x5au8; SEQ_BLOCK], GuestAddress(DATA))
        .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
    d.set_halt_poll(wait.halt_poll());
    q.set_interrupts(&d.mem, wait != Wait::Polls)?;
    let len = op.block() as u32;
    let sw = Stopwatch::start(d.device_cpu_secs());
    for &off in offsets {
        let (kind, data_writable) = match op {
            Op::SeqWrite => (1u32, false),
            _ => (0u32, true),
        };
        request(&mut d, &mut q, kind, off / 512, len, data_writable, wait)?;
    }
    if op == Op::SeqWrite {
        // FLUSH, as a guest's fsync / dd conv=fsync ends with.
        request(&mut d, &mut q, 4, 0, 0, false, wait)?;
    }
    Ok(sw.finish(d.device_cpu_secs()))
}

/// `count` GET_ID requests, one at a time: the round trip kick → event
/// loop → device → interrupt → driver, with no disk I/O in it.
pub fn device_round_trips(path: &Path, count: usize) -> io::Result<Pass> {
    let (mut d, mut q) = start_device(BlockConfig {
        path: path.to_owned(),
        read_only: true,
        id: Some("devbench".into()),
        direct: true,
        engine: devices::virtio::IoEngine::Auto,
        queues: 1,
        poll: Default::default(),
        limits: Default::default(),
    })?;
    let sw = Stopwatch::start(d.device_cpu_secs());
    for _ in 0..count {
        request(&mut d, &mut q, 8, 0, 20, true, Wait::Interrupt)?;
    }
    Ok(sw.finish(d.device_cpu_secs()))
}

/// The device on the event loop, its queue set up and DRIVER_OK.
fn start_device(cfg: BlockConfig) -> io::Result<(Driver, Vq)> {
    let blk = Block::new(&cfg).map_err(io::Error::other)?;
    let mut d = Driver::new(Arc::new(Mutex::new(blk)), MEM)?;
    let q = Vq::new(0, QUEUE, 256);
    d.start(VIRTIO_F_VERSION_1, &[&q])?;
    Ok((d, q))
}

fn request(
    d: &mut Driver,
    q: &mut Vq,
    kind: u32,
    sector: u64,
    len: u32,
    data_writable: bool,
    wait: Wait,
) -> io::Result<()> {
    let mem = d.mem.clone();
    let w = |v: u64, at: u64, n: usize| {
        mem.write_slice(&v.to_le_bytes()[..n], GuestAddress(at))
            .map_err(|e| io::Error::other(format!("guest memory: {e}")))
    };
    w(u64::from(kind), HDR, 4)?;
    w(0, HDR + 4, 4)?;
    w(sector, HDR + 8, 8)?;
    w(0xff, STATUS, 1)?;
    let mut bufs = vec![(HDR, 16, false)];
    if len > 0 {
        bufs.push((DATA, len, data_writable));
    }
    bufs.push((STATUS, 1, true));
    q.add(&mem, &bufs)
        .ok_or_else(|| io::Error::other("queue full"))?;
    q.publish(&mem)?;
    // As a real driver: no kick while the device said it needs none (it
    // is serving the queue, or polling it).
    if q.kick_needed(&mem) {
        d.notify(0)?;
    }
    loop {
        wait_completion(d, std::slice::from_ref(q), wait)?;
        let used = q.take_used(&mem);
        for &(head, _) in &used {
            q.release(head);
        }
        if !used.is_empty() {
            break;
        }
    }
    let st: u8 = mem
        .read_obj(GuestAddress(STATUS))
        .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
    if st != 0 {
        return Err(io::Error::other(format!(
            "virtio-blk request failed: status {st}"
        )));
    }
    Ok(())
}
