//! Descriptor chains as lists of guest buffers, and scatter-gather I/O
//! straight between files and guest memory.

use std::io;
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::GuestMemoryMmap;

/// Linux `IOV_MAX`: the most iovecs one `readv`/`writev` call accepts.
pub(crate) const IOV_MAX: usize = 1024;

/// One guest buffer from a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain could not be walked to its end.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// Empty, looping, longer than the queue, a `next` out of range, an
    /// unreadable descriptor table or a bad indirect table.
    Malformed,
}

/// A descriptor chain split into its device-readable and device-writable
/// buffers, in chain order.
#[derive(Debug, Default)]
pub(crate) struct ParsedChain {
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    /// False when a readable descriptor follows a writable one.
    pub well_ordered: bool,
    /// The last descriptor and whether it is device-writable.
    pub last: Option<(Seg, bool)>,
}

impl ParsedChain {
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

pub(crate) fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks a chain to its end. A chain whose walk stops early (the iterator
/// yields nothing, or its last descriptor still says NEXT: a loop, a chain
/// longer than the queue, a `next` index out of range, an unreadable or
/// invalid indirect table) is `Malformed`.
pub(crate) fn parse_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<ParsedChain, ChainError> {
    let mut parsed = ParsedChain::default();
    parse_chain_into(chain, &mut parsed)?;
    Ok(parsed)
}

/// [`parse_chain`] into `parsed`, whose lists are cleared first and keep
/// their allocations: a datapath that parses a chain per frame reuses one.
pub(crate) fn parse_chain_into(
    chain: DescriptorChain<&GuestMemoryMmap>,
    parsed: &mut ParsedChain,
) -> Result<(), ChainError> {
    parsed.readable.clear();
    parsed.writable.clear();
    parsed.well_ordered = true;
    parsed.last = None;
    let mut last_has_next = false;
    for desc in chain {
        let seg = Seg {
            addr: desc.addr(),
            len: desc.len(),
        };
        let writable = desc.is_write_only();
        if writable {
            parsed.writable.push(seg);
        } else {
            if !parsed.writable.is_empty() {
                parsed.well_ordered = false;
            }
            parsed.readable.push(seg);
        }
        parsed.last = Some((seg, writable));
        last_has_next = desc.has_next();
    }
    if parsed.last.is_none() || last_has_next {
        return Err(ChainError::Malformed);
    }
    Ok(())
}

/// The bytes `[offset, offset + len)` of the stream formed by `segs`.
/// Returns `None` if the stream is shorter.
pub(crate) fn sub_segs(segs: &[Seg], offset: u64, len: u64) -> Option<Vec<Seg>> {
    let mut out = Vec::new();
    each_sub_seg(segs, offset, len, |s| {
        out.push(s);
        Some(())
    })?;
    Some(out)
}

/// Calls `f` on each piece of [`sub_segs`] without collecting them (no
/// allocation: the datapaths do this per frame). Nothing is called when the
/// stream is shorter or an address overflows: the walk is checked first.
fn each_sub_seg(
    segs: &[Seg],
    offset: u64,
    len: u64,
    mut f: impl FnMut(Seg) -> Option<()>,
) -> Option<()> {
    walk_sub_segs(segs, offset, len, |_| Some(()))?;
    walk_sub_segs(segs, offset, len, &mut f)
}

fn walk_sub_segs(
    segs: &[Seg],
    mut offset: u64,
    mut len: u64,
    mut f: impl FnMut(Seg) -> Option<()>,
) -> Option<()> {
    for s in segs {
        if len == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if offset >= slen {
            offset -= slen;
            continue;
        }
        let take = (slen - offset).min(len);
        f(Seg {
            addr: s.addr.checked_add(offset)?,
            // `take <= s.len`, so it fits in u32.
            len: u32::try_from(take).ok()?,
        })?;
        len -= take;
        offset = 0;
    }
    (len == 0).then_some(())
}

/// Reads `buf.len()` bytes at `offset` of the stream formed by `segs`.
pub(crate) fn read_segs(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    offset: u64,
    buf: &mut [u8],
) -> Option<()> {
    let mut done = 0usize;
    each_sub_seg(segs, offset, buf.len() as u64, |s| {
        let n = s.len as usize;
        mem.read_slice(buf.get_mut(done..done + n)?, s.addr).ok()?;
        done += n;
        Some(())
    })
}

/// Writes `data` at `offset` of the stream formed by `segs`.
pub(crate) fn write_segs(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    offset: u64,
    data: &[u8],
) -> Option<()> {
    let mut done = 0usize;
    each_sub_seg(segs, offset, data.len() as u64, |s| {
        let n = s.len as usize;
        mem.write_slice(data.get(done..done + n)?, s.addr).ok()?;
        done += n;
        Some(())
    })
}

/// Appends host iovecs covering `segs` to `out`. Fails if any byte is
/// outside guest memory. The pointers stay valid as long as `mem` lives
/// (mmap-backed regions never move).
///
/// Whatever is written through these pointers escapes guest memory's dirty
/// bitmap: a caller that lets the kernel write through them calls
/// [`mark_written`] once the write has completed.
pub(crate) fn push_iovecs(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    out: &mut Vec<libc::iovec>,
) -> Option<()> {
    for s in segs {
        if s.len == 0 {
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            let slice = slice.ok()?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(())
}

/// Marks the first `len` bytes of the stream formed by `segs` dirty in guest
/// memory's bitmap (see [`take_dirty_pages`](super::take_dirty_pages)), for
/// writes vm-memory did not see: the kernel filling iovecs from
/// [`push_iovecs`]. Call it only after the write has completed: a harvest
/// of the bitmap between the mark and the write would clear the mark and
/// the page's new contents would never be sent. Bytes past the end of
/// `segs`, or outside guest memory (nothing was written there), are ignored.
pub(crate) fn mark_written(mem: &GuestMemoryMmap, segs: &[Seg], len: u64) {
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let n = u64::from(s.len).min(left);
        left -= n;
        // `n <= s.len`, a u32, so it fits in usize.
        let Ok(n) = usize::try_from(n) else {
            return;
        };
        // The slices split the range where it crosses regions: each region
        // has its own bitmap.
        for slice in GuestMemoryBackend::get_slices(mem, s.addr, n) {
            let Ok(slice) = slice else {
                break;
            };
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

/// Drops `n` bytes from the front of `iovs`, and any empty iovecs after them.
pub(crate) fn advance(iovs: &mut &mut [libc::iovec], mut n: usize) {
    while let Some(first) = iovs.first_mut() {
        if n < first.iov_len {
            // SAFETY: `n < iov_len`, so the new base stays inside the buffer
            // the iovec describes.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
            if first.iov_len > 0 {
                return;
            }
        } else {
            n -= first.iov_len;
        }
        let taken = std::mem::take(iovs);
        *iovs = &mut taken[1..];
    }
}

fn strip_empty(iovs: &mut &mut [libc::iovec]) {
    advance(iovs, 0);
}

/// `preadv` until every iovec is full. Reading past end of file is an error
/// (`UnexpectedEof`): callers check bounds first, so it means the file shrank.
pub(crate) fn preadv_all(fd: RawFd, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    vectored_all(fd, iovs, offset, libc::preadv, io::ErrorKind::UnexpectedEof)
}

/// `pwritev` until every iovec is written.
pub(crate) fn pwritev_all(fd: RawFd, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
    vectored_all(fd, iovs, offset, libc::pwritev, io::ErrorKind::WriteZero)
}

type VectoredFn = unsafe extern "C" fn(
    libc::c_int,
    *const libc::iovec,
    libc::c_int,
    libc::off_t,
) -> libc::ssize_t;

/// Repeats `op` (`preadv` or `pwritev`) until every iovec is done, retrying
/// on EINTR; a call that moves 0 bytes is the error `on_zero`.
fn vectored_all(
    fd: RawFd,
    iovs: &mut [libc::iovec],
    mut offset: u64,
    op: VectoredFn,
    on_zero: io::ErrorKind,
) -> io::Result<()> {
    let mut iovs = iovs;
    strip_empty(&mut iovs);
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX) as libc::c_int;
        let off = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: every iovec points into guest memory that the caller keeps
        // mapped for the duration of the call (it holds the `Arc` to the
        // guest memory); `cnt` does not exceed the slice length.
        let r = unsafe { op(fd, iovs.as_ptr(), cnt, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(on_zero.into());
        }
        offset += r as u64;
        advance(&mut iovs, r as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// 16 bytes at 0x1000, then 8 at 0x2000.
    fn two_segs() -> [Seg; 2] {
        [
            Seg {
                addr: GuestAddress(0x1000),
                len: 16,
            },
            Seg {
                addr: GuestAddress(0x2000),
                len: 8,
            },
        ]
    }

    #[test]
    fn sub_segs_carves_ranges_across_buffers() {
        let segs = two_segs();
        assert_eq!(
            sub_segs(&segs, 12, 8),
            Some(vec![
                Seg {
                    addr: GuestAddress(0x100c),
                    len: 4
                },
                Seg {
                    addr: GuestAddress(0x2000),
                    len: 4
                }
            ])
        );
        assert_eq!(sub_segs(&segs, 20, 5), None);
        assert_eq!(sub_segs(&segs, 24, 0), Some(vec![]));
    }

    #[test]
    fn reads_and_writes_span_buffers_and_a_short_stream_is_left_untouched() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = two_segs();
        let data: Vec<u8> = (1..=10).collect();
        assert_eq!(write_segs(&mem, &segs, 12, &data), Some(()));
        let mut back = [0u8; 10];
        assert_eq!(read_segs(&mem, &segs, 12, &mut back), Some(()));
        assert_eq!(&back[..], &data[..]);
        let mut first = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(0x100c)).unwrap();
        assert_eq!(first, [1, 2, 3, 4]);
        // 20 bytes from offset 12 run past the 24-byte stream: none written.
        assert_eq!(write_segs(&mem, &segs, 12, &[0xff; 20]), None);
        assert_eq!(read_segs(&mem, &segs, 12, &mut back), Some(()));
        assert_eq!(&back[..], &data[..], "a refused write changes nothing");
        assert_eq!(read_segs(&mem, &segs, 20, &mut [0u8; 5]), None);
    }

    #[test]
    fn parsing_into_a_reused_chain_forgets_the_previous_one() {
        use crate::virtio::test_utils::TestQueue;
        use virtio_queue::QueueT;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut tq = TestQueue::new(0x1000, 16);
        // Writable before readable: not well ordered.
        tq.add_chain(
            &mem,
            &[(0x4000, 10, true), (0x5000, 20, false), (0x6000, 30, false)],
        );
        tq.add_chain(&mem, &[(0x7000, 40, true)]);
        let mut q = tq.device_queue(false);
        let mut parsed = ParsedChain::default();
        parse_chain_into(q.pop_descriptor_chain(&mem).unwrap(), &mut parsed).unwrap();
        assert_eq!((parsed.readable.len(), parsed.writable.len()), (2, 1));
        assert!(!parsed.well_ordered);
        parse_chain_into(q.pop_descriptor_chain(&mem).unwrap(), &mut parsed).unwrap();
        assert!(parsed.readable.is_empty());
        assert_eq!(
            parsed.writable,
            vec![Seg {
                addr: GuestAddress(0x7000),
                len: 40
            }]
        );
        assert!(parsed.well_ordered);
        assert_eq!(parsed.writable_len(), 40);
        assert_eq!(parsed.last, Some((parsed.writable[0], true)));
    }

    #[test]
    fn mark_written_marks_the_written_prefix_across_buffers_and_regions() {
        use crate::virtio::{take_dirty_pages, DIRTY_PAGE_SIZE};
        let page = DIRTY_PAGE_SIZE;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let segs = [
            // Straddles the boundary between the two regions.
            Seg {
                addr: GuestAddress(0xf800),
                len: 0x1000,
            },
            Seg {
                addr: GuestAddress(0x14000),
                len: 0x3000,
            },
        ];
        // 0x1000 + 0x1001 bytes: all of the first buffer, two pages of the second.
        mark_written(&mem, &segs, 0x2001);
        let pages = take_dirty_pages(&mem);
        assert_eq!(pages[0], vec![1 << (0xf800 / page)]);
        assert_eq!(pages[1], vec![1 | 1 << 4 | 1 << 5]);
        // Past the buffers, or outside guest memory: nothing, and no panic.
        mark_written(&mem, &segs[..1], u64::MAX);
        let outside = [Seg {
            addr: GuestAddress(0x1_0000_0000),
            len: 16,
        }];
        mark_written(&mem, &outside, 16);
        let pages = take_dirty_pages(&mem);
        assert_eq!(pages[0], vec![1 << (0xf800 / page)]);
        assert_eq!(pages[1], vec![1]);
    }

    #[test]
    fn advance_skips_consumed_and_empty_iovecs() {
        let mut a = [0u8; 4];
        let mut b = [0u8; 4];
        let mut v = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 4,
            },
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 4,
            },
        ];
        let mut s: &mut [libc::iovec] = &mut v;
        advance(&mut s, 5);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].iov_len, 3);
        advance(&mut s, 3);
        assert!(s.is_empty());
    }
}
