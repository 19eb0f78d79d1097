//! Guest physical memory layout (x86_64) and the e820 map.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack top         0x0000_9000  PML4, then PDPT and 4 PDs
//! 0x0002_0000  kernel command line    0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first, reserved up to 1 MiB)
//! 0x0010_0000  kernel (bzImage protected-mode part / ELF segments)
//! ...          initrd, placed at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above the hole when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
/// Four page directories (0xb000..0xf000) identity-map the first 4 GiB.
pub const PD_START: u64 = 0xb000;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const BIOS_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (ISA IRQs below stay legacy).
pub const VIRTIO_GSI_START: u32 = 5;
/// GSIs 5..=23 of the 24-pin IOAPIC.
pub const MAX_VIRTIO_DEVICES: usize = 19;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

pub const MIN_MEMORY_MIB: u64 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// One guest RAM region: (start, size).
pub type Region = (GuestAddress, usize);

/// RAM regions for `mem_bytes` of guest memory, split around the MMIO hole.
pub fn ram_regions(mem_bytes: u64) -> Vec<Region> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(FOUR_GIB),
                (mem_bytes - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// End of RAM below 4 GiB.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The e820 map the guest sees: low RAM up to the EBDA, the BIOS area as
/// reserved (it holds the ACPI tables), RAM from 1 MiB to the hole, and RAM
/// above 4 GiB when there is more than fits below the hole.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(mem_bytes) - HIMEM_START,
            kind: E820Kind::Ram,
        },
    ];
    if mem_bytes > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: FOUR_GIB,
            size: mem_bytes - MMIO_HOLE_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

/// Address and GSI of the `index`th virtio-mmio device.
pub fn virtio_mmio_slot(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_GSI_START + index as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_no_high_ram() {
        let mem = 256 << 20;
        assert_eq!(ram_regions(mem), vec![(GuestAddress(0), 256 << 20)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the EBDA-to-1MiB window is RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_hole() {
        let mem = 16u64 << 30;
        let regions = ram_regions(mem);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].1 as u64, MMIO_HOLE_START);
        assert_eq!(regions[1].0, GuestAddress(FOUR_GIB));
        assert_eq!(regions[1].1 as u64, mem - MMIO_HOLE_START);
        let map = e820_map(mem);
        let last = map.last().copied().unwrap();
        assert_eq!(last.addr, FOUR_GIB);
        assert_eq!(last.addr + last.size, FOUR_GIB + mem - MMIO_HOLE_START);
        // No RAM entry reaches into the hole.
        for e in &map {
            if e.kind == E820Kind::Ram && e.addr < FOUR_GIB {
                assert!(e.addr + e.size <= MMIO_HOLE_START);
            }
        }
    }

    #[test]
    fn e820_entries_are_sorted_and_disjoint() {
        for mib in [64u64, 3072, 3073, 8192] {
            let map = e820_map(mib << 20);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{mib} MiB: {w:?}");
            }
        }
    }

    #[test]
    fn virtio_slots_stay_inside_the_hole_below_the_ioapic() {
        let (addr, gsi) = virtio_mmio_slot(MAX_VIRTIO_DEVICES - 1);
        assert!(addr + VIRTIO_MMIO_SIZE <= IOAPIC_START);
        assert_eq!(gsi, 23, "the IOAPIC has 24 pins");
    }
}
