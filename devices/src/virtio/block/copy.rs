//! A disk copied to another host while the guest keeps writing it (a live
//! migration with `"disks":"copy"`): the device logs which [`CHUNK`]s the
//! guest wrote, and the migration reads the image through a
//! [`CopySource`] on its own thread.
//!
//! The log is marked when a write has *completed* (its data is in the
//! image), never before: a pass that takes the log and then reads a chunk
//! reads what the guest wrote before the take; a write that completes
//! after the take marks the chunk again for the next pass. Once the
//! devices are quiesced (no request in flight) the last take holds
//! everything the previous passes missed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use super::direct::{AlignedBuf, DioAlign};

/// What the log tracks: a guest write of any size marks every chunk it
/// touches (the same unit as a backup's).
pub const CHUNK: u64 = super::backup::CHUNK;

/// The chunks the guest wrote since the last [`WriteLog::take`], logged
/// only between [`WriteLog::start`] and [`WriteLog::stop`] (a disk that is
/// not being copied pays one atomic load per write, and has no bitmap:
/// it is allocated at the first start, 2 MiB per TiB).
pub struct WriteLog {
    on: AtomicBool,
    chunks: u64,
    words: OnceLock<Box<[AtomicU64]>>,
}

impl WriteLog {
    /// A log for a disk of `size` bytes.
    pub(super) fn new(size: u64) -> Self {
        WriteLog {
            on: AtomicBool::new(false),
            chunks: size.div_ceil(CHUNK),
            words: OnceLock::new(),
        }
    }

    /// Allocates the bitmap if it is not yet; fails when it cannot be (the
    /// disk cannot be copied then).
    pub fn prepare(&self) -> Result<&[AtomicU64], String> {
        if let Some(w) = self.words.get() {
            return Ok(w);
        }
        let n = usize::try_from(self.chunks.div_ceil(64))
            .map_err(|_| "the disk is too large to track".to_string())?;
        let mut v = Vec::new();
        v.try_reserve_exact(n)
            .map_err(|_| "no memory to track the guest's writes to the disk".to_string())?;
        v.resize_with(n, || AtomicU64::new(0));
        // Another prepare at once (there is none: one migration at a time)
        // would keep its own; either is empty.
        Ok(self.words.get_or_init(|| v.into_boxed_slice()))
    }

    /// Starts logging, from an empty log ([`WriteLog::prepare`] first, if
    /// it was not called).
    pub fn start(&self) -> Result<(), String> {
        let words = self.prepare()?;
        for w in words {
            w.store(0, Ordering::Relaxed);
        }
        self.on.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops logging (a migration ended either way).
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    /// `len` bytes at `off` are in the image now.
    pub(super) fn mark(&self, off: u64, len: u64) {
        if len == 0 || !self.on.load(Ordering::Acquire) {
            return;
        }
        let Some(words) = self.words.get() else {
            return;
        };
        let first = off / CHUNK;
        let last = (off.saturating_add(len - 1) / CHUNK).min(self.chunks.saturating_sub(1));
        for i in first..=last {
            if let Some(w) = words.get((i / 64) as usize) {
                w.fetch_or(1 << (i % 64), Ordering::AcqRel);
            }
        }
    }

    /// The chunks written since the last take (bit i of word i/64: chunk
    /// i), clearing them.
    pub fn take(&self) -> Vec<u64> {
        self.words.get().map_or_else(Vec::new, |w| {
            w.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
        })
    }
}

/// What a migration reads a disk through: the device's image (a duplicate
/// of its descriptor, so with its `O_DIRECT` if it has one), its size and
/// its write log. Cheap to clone; reads need a [`CopyReader`].
#[derive(Clone)]
pub struct CopySource {
    file: Arc<File>,
    dio: Option<DioAlign>,
    size: u64,
    log: Arc<WriteLog>,
}

impl CopySource {
    pub(super) fn new(
        file: &File,
        dio: Option<DioAlign>,
        size: u64,
        log: Arc<WriteLog>,
    ) -> io::Result<Self> {
        Ok(CopySource {
            file: Arc::new(file.try_clone()?),
            dio,
            size,
            log,
        })
    }

    /// The disk's size in bytes (the guest's capacity).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its write log.
    pub fn log(&self) -> &WriteLog {
        &self.log
    }

    /// A reader with its own (aligned) buffer of `max` bytes.
    pub fn reader(&self, max: usize) -> CopyReader {
        let align = self.dio.map_or(4096, |d| d.mem);
        CopyReader {
            src: self.clone(),
            buf: AlignedBuf::new(max, align),
        }
    }
}

/// Reads a [`CopySource`] into a buffer of its own.
pub struct CopyReader {
    src: CopySource,
    buf: AlignedBuf,
}

impl CopyReader {
    pub fn size(&self) -> u64 {
        self.src.size
    }

    /// The most one read returns.
    pub fn max(&self) -> usize {
        self.buf.as_slice().len()
    }

    /// The first offset at or after `off` that may hold data (`SEEK_DATA`;
    /// `u64::MAX` when only a hole follows).
    pub fn next_data(&self, off: u64) -> io::Result<u64> {
        next_data(&self.src.file, off)
    }

    /// `len` bytes at `off` (at most [`CopyReader::max`], inside the disk).
    pub fn read(&mut self, off: u64, len: usize) -> io::Result<&[u8]> {
        let end = off.checked_add(len as u64).filter(|&e| e <= self.src.size);
        if end.is_none() || len > self.max() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {off} lie outside the disk or the buffer"),
            ));
        }
        read_exact_aligned(
            &self.src.file,
            self.src.dio,
            self.buf.as_mut_slice(),
            off,
            len,
        )?;
        Ok(&self.buf.as_slice()[..len])
    }
}

/// Reads `len` bytes at `off` into the start of `buf`. Under `O_DIRECT`
/// the read is rounded up to whole aligned blocks (`off` must be aligned,
/// as chunk offsets are, and `buf` must have room).
pub(super) fn read_exact_aligned(
    file: &File,
    dio: Option<DioAlign>,
    buf: &mut [u8],
    off: u64,
    len: usize,
) -> io::Result<()> {
    let align = dio.map_or(1, |d| d.offset.max(1));
    let want = (len as u64)
        .div_ceil(align)
        .saturating_mul(align)
        .min(buf.len() as u64) as usize;
    let buf = &mut buf[..want];
    let mut got = 0usize;
    while got < len {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image is shorter than the disk",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The first offset at or after `off` that holds data (`SEEK_DATA`), or
/// `u64::MAX` when only a hole follows. A file system that cannot tell
/// says `off` itself: everything is read.
pub(super) fn next_data(file: &File, off: u64) -> io::Result<u64> {
    let Ok(o) = libc::off_t::try_from(off) else {
        return Ok(off);
    };
    // SAFETY: lseek on a descriptor we own; it moves only the file offset,
    // which no I/O of the device uses (all of it is positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), o, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(u64::try_from(r).unwrap_or(off));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(u64::MAX),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(off),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, x) in v.iter().enumerate() {
            for b in 0..64 {
                if x & (1 << b) != 0 {
                    out.push(w as u64 * 64 + b);
                }
            }
        }
        out
    }

    #[test]
    fn a_log_marks_only_while_started_and_every_chunk_a_write_touches() {
        let log = WriteLog::new(200 * CHUNK);
        log.mark(0, 4096);
        assert!(bits(&log.take()).is_empty(), "not started: nothing");
        log.start().unwrap();
        log.mark(CHUNK - 512, 1024);
        log.mark(130 * CHUNK, 1);
        log.mark(199 * CHUNK, u64::MAX);
        assert_eq!(bits(&log.take()), vec![0, 1, 130, 199]);
        assert!(bits(&log.take()).is_empty(), "a take clears");
        log.stop();
        log.mark(5 * CHUNK, 1);
        assert!(bits(&log.take()).is_empty());
    }

    #[test]
    fn a_reader_reads_inside_the_disk_and_finds_data_past_holes() {
        let p = std::env::temp_dir().join(format!("vmm-copy-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(64 * CHUNK).unwrap();
        f.write_all_at(b"far in", 40 * CHUNK).unwrap();
        let src =
            CopySource::new(&f, None, 64 * CHUNK, Arc::new(WriteLog::new(64 * CHUNK))).unwrap();
        let mut r = src.reader(CHUNK as usize);
        let d = r.next_data(0).unwrap();
        assert!(d <= 40 * CHUNK, "{d}");
        assert_eq!(r.read(40 * CHUNK, 6).unwrap(), b"far in");
        assert!(r.read(64 * CHUNK - 1, 2).is_err(), "past the end");
        assert!(r.read(0, CHUNK as usize + 1).is_err(), "past the buffer");
        let _ = std::fs::remove_file(&p);
    }
}
