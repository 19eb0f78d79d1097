//! Guest RAM as the VMM maps it: each region at a 2 MiB-aligned host
//! address, marked for transparent huge pages and left out of core dumps.
//!
//! Why not vm-memory's `GuestMemoryMmap::from_ranges`: its `mmap` lets the
//! kernel place a region at any 4 KiB boundary, and KVM maps a guest page
//! with a 2 MiB page of its own (EPT/NPT) only where the guest address and
//! the host address agree modulo 2 MiB *and* the host backs it with a huge
//! page. A region placed 0x1a8000 past a boundary (as one was, measured in
//! the test host) never gets a single one, even where the host's THP mode is
//! `always`; where it is `madvise` (Ubuntu's default) nothing is a huge page
//! without `MADV_HUGEPAGE`. QEMU aligns and advises its RAM the same way.
//!
//! `MADV_DONTDUMP`: a VMM that aborts (every panic does) writes a core file
//! where the host keeps them; the customer's memory has no place in it, and
//! a 16 GiB guest would make it 16 GiB.
//!
//! The mapping is made here, so vm-memory's region does not own it: the
//! region's bitmap ([`GuestBitmap`]) does, and unmaps it when the last
//! clone of the memory is gone, exactly when vm-memory's own would have.

use std::io;
use std::ops::Deref;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use super::{GuestMemoryMmap, GuestRegionMmap};

/// The huge page size of x86-64 that KVM maps guest memory with.
pub const HUGE_PAGE: usize = 2 << 20;

/// A region's dirty-page bitmap ([`AtomicBitmap`], which it derefs to),
/// and the mapping of the region it belongs to where [`guest_ram`] made it.
#[derive(Debug, Default)]
pub struct GuestBitmap {
    bits: AtomicBitmap,
    _mapping: Option<Arc<Mapping>>,
}

impl Deref for GuestBitmap {
    type Target = AtomicBitmap;

    fn deref(&self) -> &AtomicBitmap {
        &self.bits
    }
}

impl<'a> WithBitmapSlice<'a> for GuestBitmap {
    type S = RefSlice<'a, AtomicBitmap>;
}

impl Bitmap for GuestBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.bits.mark_dirty(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, AtomicBitmap> {
        self.bits.slice_at(offset)
    }
}

/// For vm-memory's own constructors (`from_ranges`, used by tests): the
/// mapping is then vm-memory's.
impl NewBitmap for GuestBitmap {
    fn with_len(len: usize) -> Self {
        GuestBitmap {
            bits: AtomicBitmap::with_len(len),
            _mapping: None,
        }
    }
}

/// An anonymous private mapping of ours, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// `len` bytes of fresh zero memory at a [`HUGE_PAGE`]-aligned address;
    /// `len` a whole number of 4 KiB pages (guest RAM comes in MiBs).
    fn new(len: usize) -> io::Result<Mapping> {
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory of {len} bytes is not a whole number of pages"),
            ));
        }
        let span = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: a new anonymous mapping at an address the kernel picks; it
        // overlaps nothing of ours. MAP_NORESERVE: pages are only taken
        // when the guest touches them, as vm-memory's own mapping does.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let (start, head, tail) = carve(base, span, len);
        // SAFETY: both pieces lie within the mapping made above (page
        // aligned: `base`, `start` and `len` are) and outside
        // [start, start + len), which nothing has seen yet.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        advise(start as *mut u8, len);
        Ok(Mapping { addr: start, len })
    }
}

/// Where in a mapping of `span` bytes at `base` the [`HUGE_PAGE`]-aligned
/// `len` bytes start, and how much of it lies before (`head`) and after
/// (`tail`) them: (start, head, tail). `span` is `len + HUGE_PAGE`.
fn carve(base: usize, span: usize, len: usize) -> (usize, usize, usize) {
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    (start, head, span - head - len)
}

/// Advises `len` bytes of guest RAM at `host` as the top of this file says:
/// for a new mapping, and again wherever a `MAP_FIXED` mapping replaced a
/// piece of it (a snapshot's memory file mapped over it), since a new
/// mapping keeps none of the old one's advice. A kernel without THP
/// refuses `MADV_HUGEPAGE` (EINVAL): the memory works as before, with
/// small pages. A refused `MADV_DONTDUMP` is logged.
pub fn advise(host: *mut u8, len: usize) {
    // SAFETY: these two advices change no contents and no access rights, at
    // any address: at worst the kernel refuses them.
    let huge = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if huge != 0 {
        tracing::debug!(
            "guest memory: no huge pages (MADV_HUGEPAGE: {})",
            io::Error::last_os_error()
        );
    }
    // SAFETY: as above.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTDUMP) } != 0 {
        tracing::warn!(
            "guest memory stays in core dumps (MADV_DONTDUMP: {})",
            io::Error::last_os_error()
        );
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and the last reference to the region
        // that pointed into it is being dropped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Fresh, zeroed guest memory of `ranges` (guest address, bytes), each
/// region mapped as the top of this file says.
pub fn guest_ram(ranges: &[(GuestAddress, usize)]) -> io::Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(at, len) in ranges {
        let map = Arc::new(Mapping::new(len)?);
        let ptr = map.addr as *mut u8;
        let bitmap = GuestBitmap {
            bits: AtomicBitmap::with_len(len),
            _mapping: Some(map),
        };
        let builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
        // SAFETY: `ptr` and `len` are the mapping just made, which the
        // region's own bitmap keeps mapped for as long as the region lives.
        let region = unsafe { builder.with_raw_mmap_pointer(ptr) }
            .build()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let region = GuestRegionMmap::new(region, at).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory at {:#x} overflows", at.0),
            )
        })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

    use super::*;

    /// The `/proc/self/smaps` lines of the mapping that starts at `addr`.
    fn smaps_of(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let is_head = |l: &str| {
            l.split(' ')
                .next()
                .and_then(|w| w.split_once('-'))
                .is_some_and(|(a, b)| {
                    !a.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
                })
        };
        let mut lines = smaps.lines();
        let head = format!("{addr:x}-");
        lines.find(|l| is_head(l) && l.starts_with(&head))?;
        Some(
            lines
                .take_while(|l| !is_head(l))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    fn host_addr(mem: &GuestMemoryMmap, at: u64) -> usize {
        mem.get_host_address(GuestAddress(at)).unwrap() as usize
    }

    #[test]
    fn every_region_starts_on_a_huge_page_boundary_and_reads_back_what_was_written() {
        let mem =
            guest_ram(&[(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 3 << 20)]).unwrap();
        for r in mem.iter() {
            let host = host_addr(&mem, r.start_addr().0);
            assert_eq!(host % HUGE_PAGE, 0, "region at {:#x}", r.start_addr().0);
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress((6 << 20) - 4))
            .unwrap();
        mem.write_obj(7u64, GuestAddress((1 << 32) + (3 << 20) - 8))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress((1 << 32) + (3 << 20) - 8))
                .unwrap(),
            7
        );
    }

    #[test]
    fn the_aligned_part_fits_and_the_slack_around_it_is_whole_pages() {
        let len = 6 << 20;
        let span = len + HUGE_PAGE;
        for base in [
            0x7f00_0000_0000usize,
            0x7f00_0000_1000,
            0x7f00_001f_f000,
            0x7f00_0010_0000,
        ] {
            let (start, head, tail) = carve(base, span, len);
            assert_eq!(start % HUGE_PAGE, 0);
            assert_eq!(start, base + head);
            assert!(head < HUGE_PAGE);
            assert_eq!(head + len + tail, span);
            assert_eq!((head % 4096, tail % 4096), (0, 0));
            assert!(tail >= 4096, "base {base:#x}: {tail}");
        }
    }

    #[test]
    fn memory_that_is_not_whole_pages_is_refused() {
        assert!(guest_ram(&[(GuestAddress(0), 0)]).is_err());
        assert!(guest_ram(&[(GuestAddress(0), (1 << 20) + 512)]).is_err());
    }

    #[test]
    fn the_memory_asks_for_huge_pages_and_stays_out_of_core_dumps() {
        let mem = guest_ram(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let block = smaps_of(host_addr(&mem, 0)).expect("the mapping in smaps");
        let flags = block
            .lines()
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("VmFlags")
            .split_whitespace()
            .collect::<Vec<_>>();
        assert!(flags.contains(&"dd"), "not MADV_DONTDUMP: {flags:?}");
        // A kernel built without THP refuses the advice; this one has it.
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert!(flags.contains(&"hg"), "not MADV_HUGEPAGE: {flags:?}");
        }
    }

    #[test]
    fn writes_through_vm_memory_are_dirty_pages_for_a_migration() {
        let mem = guest_ram(&[(GuestAddress(0), 2 << 20)]).unwrap();
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        let r = mem.iter().next().unwrap();
        assert!(MmapRegion::bitmap(r).dirty_at(0x5000));
        assert!(!MmapRegion::bitmap(r).dirty_at(0x4000));
        let taken = crate::virtio::take_dirty_pages(&mem);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0][0], 1 << 5, "page 5 only");
        assert!(crate::virtio::take_dirty_pages(&mem)[0]
            .iter()
            .all(|w| *w == 0));
    }

    #[test]
    fn the_mapping_goes_when_the_last_clone_of_the_memory_goes() {
        let mem = guest_ram(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let r = mem.iter().next().unwrap();
        let mapping = Arc::downgrade(MmapRegion::bitmap(r)._mapping.as_ref().unwrap());
        let clone = mem.clone();
        drop(mem);
        assert!(mapping.upgrade().is_some(), "unmapped while a clone lives");
        clone.write_obj(3u8, GuestAddress(0)).unwrap();
        drop(clone);
        assert!(
            mapping.upgrade().is_none(),
            "still mapped after the last clone"
        );
    }
}
