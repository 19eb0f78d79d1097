//! One request against the image: parsing the chain, checking it, and
//! running (or preparing) its I/O, independent of queues and threads.

use super::*;

/// The image and request execution, independent of queues.
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) id: [u8; ID_BYTES],
    /// Usable size in bytes (whole sectors).
    pub(super) capacity: u64,
    /// `Some` when the image is open with `O_DIRECT`.
    pub(super) dio: Option<DioAlign>,
    pub(super) counters: Arc<BlockCounters>,
    /// The backup in progress, if any (`backup.rs`). A cell: requests run
    /// through `&self`, and the device's own lock is what serialises them.
    pub(super) backup: RefCell<Option<Job>>,
    /// The chunks written while a migration copies the disk (`copy.rs`).
    pub(super) log: Arc<WriteLog>,
}

impl Disk {
    /// Executes one request, or prepares its I/O. `Done` carries the used
    /// length (bytes written to the chain, status included), 0 when no status
    /// could be written.
    pub(super) fn handle(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Handled {
        let c = &self.counters;
        let invalid = || {
            inc(&c.invalid_chains, 1);
            Handled::Done(0)
        };
        let Ok(parsed) = parse_chain(chain) else {
            return invalid();
        };
        let Some((last, true)) = parsed.last else {
            return invalid();
        };
        let Some(status_addr) = last
            .len
            .checked_sub(1)
            .and_then(|n| last.addr.checked_add(u64::from(n)))
        else {
            return invalid();
        };
        if !GuestMemoryBackend::check_range(mem, status_addr, 1) {
            return invalid();
        }
        let data_w = sub_segs(&parsed.writable, 0, parsed.writable_len().saturating_sub(1))
            .unwrap_or_default();
        match self.execute(mem, &parsed, &data_w) {
            Ok(Exec::Io(op)) => Handled::Io { status_addr, op },
            Ok(Exec::Done(n)) => Handled::Done(self.finish(mem, status_addr, Ok(n))),
            Err(s) => Handled::Done(self.finish(mem, status_addr, Err(s))),
        }
    }

    /// Runs a request's I/O on this thread.
    pub(super) fn run_io(&self, mem: &GuestMemoryMmap, op: &mut IoOp) -> io::Result<()> {
        match op.kind {
            IoKind::Read => self.transfer(Dir::Read, mem, &op.segs, &mut op.iovs, op.off, op.len),
            IoKind::Write => self.transfer(Dir::Write, mem, &op.segs, &mut op.iovs, op.off, op.len),
            IoKind::Flush => self.file.sync_data(),
        }
    }

    /// What an io_uring completion (`res`: bytes or -errno) means for the request. A short
    /// transfer, an interrupted call, or an O_DIRECT refusal of the guest's buffers is
    /// finished on this thread the way the synchronous engine does it.
    pub(super) fn async_result(
        &self,
        mem: &GuestMemoryMmap,
        op: &mut IoOp,
        res: i32,
    ) -> io::Result<()> {
        if res < 0 {
            let e = io::Error::from_raw_os_error(res.saturating_neg());
            let retry = matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
                || (self.dio.is_some() && e.raw_os_error() == Some(libc::EINVAL));
            return if retry { self.run_io(mem, op) } else { Err(e) };
        }
        if op.kind != IoKind::Flush && (res as u64) < op.len {
            // Reading or writing the same bytes again is harmless.
            return self.run_io(mem, op);
        }
        Ok(())
    }

    /// A request's I/O ended with `r`: its status (and counters).
    pub(super) fn complete(
        &self,
        mem: &GuestMemoryMmap,
        status_addr: GuestAddress,
        op: &IoOp,
        r: io::Result<()>,
    ) -> u32 {
        // Both engines end here once the kernel is done with the buffers.
        op.mark_read_dirty(mem);
        let c = &self.counters;
        let r = match (op.kind, r) {
            (IoKind::Read, Ok(())) => {
                inc(&c.read_requests, 1);
                inc(&c.read_bytes, op.len);
                u32::try_from(op.len).map_err(|_| S_IOERR)
            }
            (IoKind::Write, Ok(())) => {
                self.written(op.off, op.len);
                inc(&c.write_requests, 1);
                inc(&c.write_bytes, op.len);
                Ok(0)
            }
            (IoKind::Flush, Ok(())) => Ok(0),
            (IoKind::Read, Err(e)) => Err(self.io_err("read", e)),
            (IoKind::Write, Err(e)) => {
                // Some of it may have reached the image.
                self.written(op.off, op.len);
                Err(self.io_err("write", e))
            }
            (IoKind::Flush, Err(e)) => Err(self.io_err("flush", e)),
        };
        self.finish(mem, status_addr, r)
    }

    /// Writes the status byte; returns the used length (0: no status could be written).
    fn finish(&self, mem: &GuestMemoryMmap, status_addr: GuestAddress, r: Result<u32, u8>) -> u32 {
        let c = &self.counters;
        let (status, written) = match r {
            Ok(n) => (S_OK, n),
            Err(s) => {
                inc(
                    if s == S_UNSUPP {
                        &c.unsupported
                    } else {
                        &c.io_errors
                    },
                    1,
                );
                (s, 0)
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            inc(&c.invalid_chains, 1);
            return 0;
        }
        written.saturating_add(1)
    }

    fn execute(&self, mem: &GuestMemoryMmap, p: &ParsedChain, data_w: &[Seg]) -> Result<Exec, u8> {
        if !p.well_ordered {
            return Err(S_IOERR);
        }
        let mut hdr = [0u8; 16];
        read_segs(mem, &p.readable, 0, &mut hdr).ok_or(S_IOERR)?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        let extra_r = p.readable_len() - 16;
        let w_len = total_len(data_w);
        let c = &self.counters;
        match req_type {
            T_IN => {
                if extra_r != 0 {
                    return Err(S_IOERR);
                }
                let off = self.range(sector, w_len)?;
                u32::try_from(w_len).map_err(|_| S_IOERR)?;
                let mut iovs = Vec::with_capacity(data_w.len());
                push_iovecs(mem, data_w, &mut iovs).ok_or(S_IOERR)?;
                Ok(Exec::Io(IoOp {
                    kind: IoKind::Read,
                    off,
                    len: w_len,
                    segs: data_w.to_vec(),
                    iovs,
                }))
            }
            T_OUT => {
                if self.read_only || w_len != 0 {
                    return Err(S_IOERR);
                }
                let off = self.range(sector, extra_r)?;
                let data = sub_segs(&p.readable, 16, extra_r).ok_or(S_IOERR)?;
                self.before_write(off, extra_r);
                let mut iovs = Vec::with_capacity(data.len());
                push_iovecs(mem, &data, &mut iovs).ok_or(S_IOERR)?;
                Ok(Exec::Io(IoOp {
                    kind: IoKind::Write,
                    off,
                    len: extra_r,
                    segs: data,
                    iovs,
                }))
            }
            T_FLUSH => {
                inc(&c.flush_requests, 1);
                if self.read_only {
                    return Ok(Exec::Done(0));
                }
                Ok(Exec::Io(IoOp {
                    kind: IoKind::Flush,
                    off: 0,
                    len: 0,
                    segs: Vec::new(),
                    iovs: Vec::new(),
                }))
            }
            T_GET_ID => {
                inc(&c.other_requests, 1);
                let n = (w_len as usize).min(ID_BYTES);
                if n == 0 {
                    return Err(S_IOERR);
                }
                write_segs(mem, data_w, 0, &self.id[..n]).ok_or(S_IOERR)?;
                Ok(Exec::Done(n as u32))
            }
            T_DISCARD | T_WRITE_ZEROES => {
                inc(&c.other_requests, 1);
                if self.read_only || w_len != 0 {
                    return Err(S_IOERR);
                }
                self.discard_or_zero(mem, req_type, &p.readable, extra_r)?;
                Ok(Exec::Done(0))
            }
            _ => Err(S_UNSUPP),
        }
    }

    /// Moves `len` bytes between the image at `off` and the guest buffers
    /// `segs` (whose host iovecs are `iovs`): straight between the file and
    /// guest memory, or through a bounce buffer when `O_DIRECT` cannot take
    /// the guest's buffers as they are.
    fn transfer(
        &self,
        dir: Dir,
        mem: &GuestMemoryMmap,
        segs: &[Seg],
        iovs: &mut [libc::iovec],
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let direct = |iovs: &mut [libc::iovec]| match dir {
            Dir::Read => preadv_all(fd, iovs, off),
            Dir::Write => pwritev_all(fd, iovs, off),
        };
        let Some(dio) = self.dio else {
            return direct(iovs);
        };
        if dio.allows(iovs, off) {
            match direct(iovs) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                done => return done,
            }
        }
        match dir {
            Dir::Read => bounce_read(&self.file, dio, off, len, |at, bytes| {
                write_segs(mem, segs, at, bytes).ok_or_else(outside_memory)
            }),
            Dir::Write => bounce_write(&self.file, dio, off, len, |at, bytes| {
                read_segs(mem, segs, at, bytes).ok_or_else(outside_memory)
            }),
        }
    }

    /// A running backup copies what `len` bytes at `off` held at its
    /// instant before the guest's write changes them.
    fn before_write(&self, off: u64, len: u64) {
        if let Some(job) = self.backup.borrow_mut().as_mut() {
            job.before_write(
                Source {
                    file: &self.file,
                    dio: self.dio,
                },
                off,
                len,
            );
        }
    }

    /// `len` bytes at `off` of the image have been written (a migration's
    /// copy sends them again).
    pub(super) fn written(&self, off: u64, len: u64) {
        self.log.mark(off, len);
    }

    fn io_err(&self, what: &str, e: io::Error) -> u8 {
        crate::limited!(
            warn,
            "virtio-blk {}: {what} failed: {e}",
            self.path.display()
        );
        S_IOERR
    }

    /// Byte offset of `len` bytes at `sector`, if whole sectors inside the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err(S_IOERR);
        }
        let off = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        match off.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(off),
            _ => Err(S_IOERR),
        }
    }

    fn discard_or_zero(
        &self,
        mem: &GuestMemoryMmap,
        req_type: u32,
        readable: &[Seg],
        len: u64,
    ) -> Result<(), u8> {
        if len == 0 || len & 15 != 0 || len / 16 > u64::from(MAX_DISCARD_SEG) {
            return Err(S_IOERR);
        }
        for i in 0..len / 16 {
            let mut seg = [0u8; 16];
            read_segs(mem, readable, 16 + 16 * i, &mut seg).ok_or(S_IOERR)?;
            let mut s = [0u8; 8];
            s.copy_from_slice(&seg[0..8]);
            let sector = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if flags & !WRITE_ZEROES_FLAG_UNMAP != 0
                || (req_type == T_DISCARD && flags & WRITE_ZEROES_FLAG_UNMAP != 0)
            {
                return Err(S_UNSUPP);
            }
            if num > MAX_DISCARD_SECTORS {
                return Err(S_IOERR);
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            let off = self.range(sector, bytes)?;
            if bytes == 0 {
                continue;
            }
            self.before_write(off, bytes);
            let done = if req_type == T_DISCARD {
                // Discard is a hint: a file system without hole punching
                // simply keeps the data.
                match self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    bytes,
                ) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    r => r.map_err(|e| self.io_err("discard", e)),
                }
            } else {
                self.write_zeroes(off, bytes, flags & WRITE_ZEROES_FLAG_UNMAP != 0)
                    .map_err(|e| self.io_err("write zeroes", e))
            };
            // Done (or partly done): a migration's copy, which reads on a
            // thread of its own, reads the chunks again.
            self.written(off, bytes);
            done?;
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap
            && self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .is_ok()
        {
            return Ok(());
        }
        if self
            .fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        // The buffer starts zeroed and is only written out; aligned, so that
        // it also serves O_DIRECT images.
        let align = self.dio.map_or(SECTOR_SIZE, |d| d.mem);
        in_chunks(len, align, |done, zeros| {
            self.file.write_all_at(zeros, off + done)
        })
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(off).map_err(|_| io::ErrorKind::InvalidInput)?;
        let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What [`Disk::handle`] made of a request.
pub(super) enum Handled {
    /// Finished (or refused): the used length.
    Done(u32),
    /// Its I/O is still to run (synchronously, or in io_uring).
    Io { status_addr: GuestAddress, op: IoOp },
}

/// What [`Disk::execute`] made of a valid request.
enum Exec {
    /// Finished: bytes written to the guest.
    Done(u32),
    Io(IoOp),
}

/// Which way a [`Disk::transfer`] goes.
#[derive(Clone, Copy)]
enum Dir {
    /// Image → guest (IN).
    Read,
    /// Guest → image (OUT).
    Write,
}

fn outside_memory() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory")
}
