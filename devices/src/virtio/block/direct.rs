//! `direct=on` disks: the image is opened with `O_DIRECT`, so guest I/O
//! bypasses the host page cache (the guest caches; the host does not cache a
//! second copy, and host memory use does not grow with disk traffic).
//!
//! `O_DIRECT` needs the file offset, each buffer's address and each buffer's
//! length aligned (to what `statx(STATX_DIOALIGN)` reports, 512 bytes when
//! the kernel does not say). The guest's buffers usually are (Linux hands
//! the device page-aligned bio pages), and then the request goes straight
//! between guest memory and the disk in one `preadv`/`pwritev`. When one is
//! not — any guest may build such a chain — the request is copied through an
//! aligned bounce buffer, 1 MiB at a time, instead of failing.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// The alignment `O_DIRECT` asks for on one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// For each buffer's address.
    pub mem: u64,
    /// For the file offset and each buffer's length.
    pub offset: u64,
}

/// What is assumed when the kernel does not report it (pre-6.1 kernels).
const DEFAULT_ALIGN: u64 = 512;
/// Bounce buffers are aligned to this (covers any `mem` alignment seen in
/// practice; larger reported values are honoured too).
const BOUNCE_ALIGN: usize = 4096;
/// The most a bounce buffer holds; longer requests go in pieces.
const BOUNCE_CHUNK: usize = 1 << 20;

impl DioAlign {
    /// Asks the kernel (`statx` with `STATX_DIOALIGN`) for `file`'s
    /// alignment; 512 for both when it does not answer.
    pub fn probe(file: &File) -> Self {
        let fallback = Self {
            mem: DEFAULT_ALIGN,
            offset: DEFAULT_ALIGN,
        };
        // SAFETY: statx is plain old data; all-zero is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: the path is a valid NUL-terminated empty string, used with
        // AT_EMPTY_PATH on a descriptor we own; `stx` is a valid out pointer.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
            return fallback;
        }
        let pow2 = |v: u32| u64::from(v.max(1)).next_power_of_two();
        Self {
            mem: pow2(stx.stx_dio_mem_align),
            offset: pow2(stx.stx_dio_offset_align),
        }
    }

    /// Whether an `O_DIRECT` transfer of `iovs` at `offset` may go straight.
    /// (Both alignments are powers of two.)
    pub fn allows(&self, iovs: &[libc::iovec], offset: u64) -> bool {
        let (mem_mask, off_mask) = (self.mem - 1, self.offset - 1);
        offset & off_mask == 0
            && iovs.iter().all(|v| {
                (v.iov_base as usize as u64) & mem_mask == 0 && (v.iov_len as u64) & off_mask == 0
            })
    }
}

/// A zeroed buffer whose start is aligned for `O_DIRECT`.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zeroed bytes starting at a multiple of `align` (at least 4096).
    pub fn new(len: usize, align: u64) -> Self {
        let align = usize::try_from(align)
            .unwrap_or(BOUNCE_ALIGN)
            .max(BOUNCE_ALIGN);
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        Self {
            storage,
            start,
            len,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

/// Reads `len` bytes at `offset` through a bounce buffer, handing each
/// piece to `deliver(done, bytes)` (which copies it into guest memory).
pub(crate) fn bounce_read(
    file: &File,
    align: DioAlign,
    offset: u64,
    len: u64,
    mut deliver: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    in_chunks(len, align.mem, |done, piece| {
        file.read_exact_at(piece, offset + done)?;
        deliver(done, piece)
    })
}

/// Writes `len` bytes at `offset` through a bounce buffer, asking
/// `fetch(done, bytes)` to fill each piece (from guest memory).
pub(crate) fn bounce_write(
    file: &File,
    align: DioAlign,
    offset: u64,
    len: u64,
    mut fetch: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    in_chunks(len, align.mem, |done, piece| {
        fetch(done, piece)?;
        file.write_all_at(piece, offset + done)
    })
}

/// Walks `len` bytes in pieces of at most [`BOUNCE_CHUNK`], handing
/// `step(done, piece)` one zeroed-at-first buffer aligned to `mem_align`,
/// reused for every piece.
pub(crate) fn in_chunks(
    len: u64,
    mem_align: u64,
    mut step: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = AlignedBuf::new(chunk(len), mem_align);
    let mut done = 0u64;
    while done < len {
        let n = chunk(len - done);
        step(done, &mut buf.as_mut_slice()[..n])?;
        done += n as u64;
    }
    Ok(())
}

fn chunk(remaining: u64) -> usize {
    usize::try_from(remaining).map_or(BOUNCE_CHUNK, |r| r.min(BOUNCE_CHUNK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_starts_on_the_boundary() {
        for align in [512, 4096, 8192] {
            let mut b = AlignedBuf::new(1000, align);
            assert_eq!(b.as_mut_slice().as_ptr() as u64 % align.max(4096), 0);
            assert_eq!(b.as_slice().len(), 1000);
        }
    }

    #[test]
    fn allows_checks_offset_address_and_length() {
        let a = DioAlign {
            mem: 512,
            offset: 512,
        };
        let mut buf = AlignedBuf::new(8192, 4096);
        let base = buf.as_mut_slice().as_mut_ptr();
        let iov = |off: usize, len: usize| libc::iovec {
            iov_base: base.wrapping_add(off).cast(),
            iov_len: len,
        };
        assert!(a.allows(&[iov(0, 4096), iov(4096, 512)], 1024));
        assert!(!a.allows(&[iov(0, 4096)], 100));
        assert!(!a.allows(&[iov(8, 512)], 0));
        assert!(!a.allows(&[iov(0, 100)], 0));
    }
}
