//! The VMM's own writes into guest memory, as dirty pages for live migration.
//!
//! KVM's dirty log sees only what the vCPUs write. Everything the VMM writes
//! (device data, used rings, status bytes, the instruction emulator) lands in
//! the [`AtomicBitmap`](vm_memory::bitmap::AtomicBitmap) of each
//! [`GuestMemoryMmap`] region instead: vm-memory's own accessors mark it, and
//! the devices mark what the kernel wrote through raw iovecs once that write
//! has completed (see `iov::mark_written`). A migration takes both logs each
//! round and sends the union.
//!
//! Not covered: vhost-net, whose kernel worker writes guest memory behind
//! the VMM's back; a migrating VM must run its network on the userspace
//! datapath. Requests still in flight are marked when they complete, so the
//! final round must come after the devices are quiesced.

use vm_memory::{GuestMemoryBackend, MmapRegion};

use super::GuestMemoryMmap;

/// Bytes of guest memory per bit of the bitmaps: the page size
/// `AtomicBitmap::with_len` gives them (the host's, 4 KiB on x86-64).
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// Takes the pages the VMM wrote since the last call (or
/// [`clear_dirty_pages`]) and clears them, atomically word by word, so a
/// write racing with the call shows up now or in the next call, never in
/// neither.
///
/// One `Vec` per region of `mem`, in region order (ascending guest address,
/// as `mem.iter()` gives them). In a region's `Vec`, bit `i % 64` of word
/// `i / 64` is page `i` of that region: guest bytes
/// `[start + i * DIRTY_PAGE_SIZE, start + (i + 1) * DIRTY_PAGE_SIZE)`.
/// Bits past the region's last page are always zero.
pub fn take_dirty_pages(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|r| MmapRegion::bitmap(r).get_and_reset())
        .collect()
}

/// Forgets every page marked so far (for instance what loading the guest
/// or restoring a snapshot wrote, before a migration's first full pass).
pub fn clear_dirty_pages(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        MmapRegion::bitmap(r).reset();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};

    use super::*;

    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(4 << 20), 1 << 20),
        ])
        .unwrap()
    }

    #[test]
    fn bitmaps_have_one_bit_per_4k_page_of_each_region() {
        let mem = two_regions();
        for r in mem.iter() {
            assert_eq!(
                MmapRegion::bitmap(r).len() as u64,
                r.len() / DIRTY_PAGE_SIZE
            );
        }
    }

    #[test]
    fn take_dirty_pages_reports_pages_per_region_and_resets() {
        let mem = two_regions();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        mem.write_obj(1u32, GuestAddress((4 << 20) + 0x41ffe))
            .unwrap();
        let pages = take_dirty_pages(&mem);
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[0][0], 1 << 3);
        assert!(pages[0][1..].iter().all(|&w| w == 0));
        // 0x41ffe..0x42002 spans pages 0x41 and 0x42 (word 1, bits 1 and 2).
        assert_eq!(pages[1][1], 0b110);
        assert!(pages[1].iter().enumerate().all(|(i, &w)| i == 1 || w == 0));
        let again = take_dirty_pages(&mem);
        assert!(again.iter().flatten().all(|&w| w == 0));
    }

    #[test]
    fn clear_dirty_pages_forgets_earlier_writes() {
        let mem = two_regions();
        mem.write_slice(&[7u8; 8192], GuestAddress(0x10000))
            .unwrap();
        clear_dirty_pages(&mem);
        assert!(take_dirty_pages(&mem).iter().flatten().all(|&w| w == 0));
    }
}
