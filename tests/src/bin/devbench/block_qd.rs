//! Random 4 KiB reads with many requests in flight (QD32, what a database
//! or `fio --iodepth=32` asks of a disk), on one request queue or spread
//! over several (`VIRTIO_BLK_F_MQ`, as a guest's blk-mq does with a queue
//! per CPU): the device's io_uring engine against the host's own io_uring
//! at the same depth on the same file, `O_DIRECT` both.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::block::AlignedBuf;
use devices::virtio::{Block, BlockConfig, VIRTIO_F_VERSION_1};
use io_uring::{opcode, types, IoUring};
use vm_memory::{Bytes, GuestAddress};

use crate::block::{wait_completion, Wait, RAND_BLOCK};
use crate::driver::{thread_cpu_secs, Driver, Pass, Stopwatch, Vq};

/// `VIRTIO_BLK_F_MQ`.
const F_MQ: u64 = 1 << 12;
const QUEUES: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x1_0000;
const HDR: u64 = 0x20_0000;
const STATUS: u64 = 0x21_0000;
const DATA: u64 = 0x30_0000;
const MEM: usize = 16 << 20;

/// The host alone: io_uring reads, `depth` in flight.
pub fn host_pass(path: &Path, offsets: &[u64], depth: usize) -> io::Result<Pass> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut ring = IoUring::new(u32::try_from(depth * 2).unwrap_or(64))?;
    let mut bufs: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::new(RAND_BLOCK, 4096))
        .collect();
    let mut free: Vec<usize> = (0..depth).collect();
    let (mut next, mut in_flight) = (0usize, 0usize);
    let sw = Stopwatch::start(thread_cpu_secs());
    loop {
        while let (Some(&off), Some(slot)) = (offsets.get(next), free.pop()) {
            let buf = bufs[slot].as_mut_slice();
            let sqe = opcode::Read::new(
                types::Fd(f.as_raw_fd()),
                buf.as_mut_ptr(),
                RAND_BLOCK as u32,
            )
            .offset(off)
            .build()
            .user_data(slot as u64);
            // SAFETY: the buffer lives in `bufs` until its completion is
            // reaped below (the loop only ends with nothing in flight).
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("submission queue full"))?;
            next += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqe.result() != RAND_BLOCK as i32 {
                return Err(io::Error::other(format!("read: {}", cqe.result())));
            }
            free.push(cqe.user_data() as usize);
            in_flight -= 1;
        }
    }
    Ok(sw.finish(thread_cpu_secs()))
}

/// The same reads as virtio-blk requests, `depth` in flight spread over
/// `queues` request queues, through the real device (`direct=on`,
/// io_uring), transport and event loop.
pub fn device_pass(
    path: &Path,
    offsets: &[u64],
    depth: usize,
    queues: u16,
    poll: Duration,
    wait: Wait,
) -> io::Result<Pass> {
    let blk = Block::new(&BlockConfig {
        path: path.to_owned(),
        read_only: true,
        id: None,
        direct: true,
        engine: devices::virtio::IoEngine::Auto,
        queues,
        poll,
        limits: Default::default(),
    })
    .map_err(io::Error::other)?;
    let mut d = Driver::new(Arc::new(Mutex::new(blk)), MEM)?;
    let mut qs: Vec<Vq> = (0..u32::from(queues))
        .map(|i| Vq::new(i, QUEUES + u64::from(i) * QUEUE_STRIDE, 256))
        .collect();
    {
        let refs: Vec<&Vq> = qs.iter().collect();
        d.start(VIRTIO_F_VERSION_1 | F_MQ, &refs)?;
    }
    let mem = d.mem.clone();
    d.set_halt_poll(wait.halt_poll());
    for q in &qs {
        q.set_interrupts(&mem, wait != Wait::Polls)?;
    }
    let gm = |e| io::Error::other(format!("guest memory: {e}"));
    // Slot s: its header, status byte and data page; on queue s % queues.
    let nq = qs.len();
    let mut slot_of: Vec<Vec<usize>> = vec![vec![usize::MAX; 256]; nq];
    let mut free: Vec<usize> = (0..depth).collect();
    let (mut next, mut in_flight) = (0usize, 0usize);
    let sw = Stopwatch::start(d.device_cpu_secs());
    loop {
        let mut touched = vec![false; nq];
        while let (Some(&off), Some(s)) = (offsets.get(next), free.pop()) {
            let (hdr, st, data) = (
                HDR + s as u64 * 16,
                STATUS + s as u64,
                DATA + s as u64 * 4096,
            );
            let mut h = [0u8; 16];
            h[8..].copy_from_slice(&(off / 512).to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).map_err(gm)?;
            mem.write_obj(0xffu8, GuestAddress(st)).map_err(gm)?;
            let q = s % nq;
            let head = qs[q]
                .add(
                    &mem,
                    &[
                        (hdr, 16, false),
                        (data, RAND_BLOCK as u32, true),
                        (st, 1, true),
                    ],
                )
                .ok_or_else(|| io::Error::other("queue full"))?;
            slot_of[q][usize::from(head)] = s;
            touched[q] = true;
            next += 1;
            in_flight += 1;
        }
        for (q, t) in touched.iter().enumerate() {
            if *t {
                qs[q].publish(&mem)?;
                if qs[q].kick_needed(&mem) {
                    d.notify(q)?;
                }
            }
        }
        if in_flight == 0 {
            break;
        }
        wait_completion(&mut d, &qs, wait)?;
        for (q, vq) in qs.iter_mut().enumerate() {
            for (head, _) in vq.take_used(&mem) {
                vq.release(head);
                let s = slot_of[q][usize::from(head)];
                let status: u8 = mem.read_obj(GuestAddress(STATUS + s as u64)).map_err(gm)?;
                if status != 0 {
                    return Err(io::Error::other(format!("request failed: status {status}")));
                }
                free.push(s);
                in_flight -= 1;
            }
        }
    }
    Ok(sw.finish(d.device_cpu_secs()))
}
