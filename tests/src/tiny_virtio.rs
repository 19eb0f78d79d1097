//! A minimal virtio 1.x driver over virtio-mmio (version 2), as tiny guest
//! code: 32-bit protected mode, paging off, flat segments, entered at
//! [`LOAD_ADDR`] through a PVH ELF note (the same entry [`crate::tiny`]
//! uses), with data placed at fixed guest-physical addresses by extra
//! `PT_LOAD` segments.
//!
//! [`Guest`] is a tiny assembler with labels and named helpers
//! (`mmio_write32`, `mmio_read32_to_eax`, `print_eax_hex`,
//! `poll_u16_until_eq`, ...); [`Guest`]'s virtio helpers (`virtio_init`,
//! `setup_queue`, `submit`, ...) are the driver, keeping each queue's
//! avail index in a [`VirtQueue`] on the Rust side, so the generated code
//! is straight-line and easy to read in a disassembler.
//!
//! Under this machine's kvm_pvm every guest instruction of a tiny guest is
//! emulated (about 1 µs each): polls are bounded by an iteration count
//! ([`POLL_ITERATIONS`], seconds of guest time) and print `TIMEOUT` and
//! power off when it runs out, so a test fails with a message instead of
//! hanging.
//!
//! Register conventions: every helper may clobber EAX, EBX, ECX, EDX, ESI
//! and EDI (`print` too: print a label *before* loading the value to show,
//! or use `print_u32_at`/`print_u16_at`/`print_u8_at`). Only interrupt
//! delivery uses a stack: call `set_esp` before enabling interrupts. No
//! handler returns with `iretd`, which this kvm_pvm cannot run for a
//! 32-bit guest with paging off (see [`Guest::irq_handler`]).

use std::path::Path;

mod asm;
mod driver;
mod elf;
mod interrupts;
pub use elf::pvh_elf_segments;
pub use interrupts::interrupt_gate;

/// Where the code is loaded and entered (physical, 1 MiB).
pub const LOAD_ADDR: u32 = 0x10_0000;
/// First virtio-mmio window; device `i` is at `MMIO_BASE + i * MMIO_STRIDE`.
pub const MMIO_BASE: u32 = 0xd000_0000;
pub const MMIO_STRIDE: u32 = 0x1000;
/// ACPI PM1a control port: writing `0x34` (SLP_TYP 5 | SLP_EN) powers off.
pub const POWEROFF_PORT: u16 = 0x600;
pub const COM1: u16 = 0x3f8;
/// Iterations of a poll loop before it gives up (about 5 µs each here).
pub const POLL_ITERATIONS: u32 = 3_000_000;

/// The `MagicValue` register's value, "virt".
pub const VIRTIO_MAGIC: u32 = 0x7472_6976;
pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// virtio-mmio register offsets.
pub mod reg {
    pub const MAGIC: u32 = 0x000;
    pub const VERSION: u32 = 0x004;
    pub const DEVICE_ID: u32 = 0x008;
    pub const VENDOR_ID: u32 = 0x00c;
    pub const DEVICE_FEATURES: u32 = 0x010;
    pub const DEVICE_FEATURES_SEL: u32 = 0x014;
    pub const DRIVER_FEATURES: u32 = 0x020;
    pub const DRIVER_FEATURES_SEL: u32 = 0x024;
    pub const QUEUE_SEL: u32 = 0x030;
    pub const QUEUE_NUM_MAX: u32 = 0x034;
    pub const QUEUE_NUM: u32 = 0x038;
    pub const QUEUE_READY: u32 = 0x044;
    pub const QUEUE_NOTIFY: u32 = 0x050;
    pub const INTERRUPT_STATUS: u32 = 0x060;
    pub const INTERRUPT_ACK: u32 = 0x064;
    pub const STATUS: u32 = 0x070;
    pub const QUEUE_DESC_LOW: u32 = 0x080;
    pub const QUEUE_DESC_HIGH: u32 = 0x084;
    pub const QUEUE_DRIVER_LOW: u32 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u32 = 0x094;
    pub const QUEUE_DEVICE_LOW: u32 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u32 = 0x0a4;
    pub const CONFIG: u32 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 0x01;
    pub const DRIVER: u32 = 0x02;
    pub const DRIVER_OK: u32 = 0x04;
    pub const FEATURES_OK: u32 = 0x08;
}

/// Descriptor flags.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// VIRTIO_RING_F_INDIRECT_DESC (feature bit 28, in the low word).
pub const F_INDIRECT_DESC: u32 = 1 << 28;

/// virtio-blk request types and status bytes.
pub mod blk {
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
    /// VIRTIO_BLK_F_RO.
    pub const F_RO: u32 = 1 << 5;
}

/// Base address of virtio-mmio slot `i`.
pub fn slot_base(i: u32) -> u32 {
    MMIO_BASE + i * MMIO_STRIDE
}

/// One split virtqueue at fixed guest-physical addresses: the descriptor
/// table at `area`, the avail ring at `area + 0x100`, the used ring at
/// `area + 0x200` (room for up to 16 entries each).
#[derive(Clone, Copy, Debug)]
pub struct VirtQueue {
    /// Queue index within its device.
    pub index: u32,
    /// MMIO base of the device.
    pub base: u32,
    pub size: u16,
    pub desc: u32,
    pub avail: u32,
    pub used: u32,
    /// The driver's next avail index (the value `avail.idx` holds).
    pub next_avail: u16,
}

impl VirtQueue {
    pub fn new(base: u32, index: u32, area: u32, size: u16) -> VirtQueue {
        assert!(size <= 16 && size.is_power_of_two());
        VirtQueue {
            index,
            base,
            size,
            desc: area,
            avail: area + 0x100,
            used: area + 0x200,
            next_avail: 0,
        }
    }
    /// Address of descriptor `i`.
    pub fn desc_addr(&self, i: u16) -> u32 {
        self.desc + 16 * u32::from(i)
    }
    /// Address of the used ring's `idx`.
    pub fn used_idx_addr(&self) -> u32 {
        self.used + 2
    }
    /// Address of used ring element `slot` (`id: u32, len: u32`).
    pub fn used_elem_addr(&self, slot: u16) -> u32 {
        self.used + 4 + 8 * u32::from(slot % self.size)
    }
}

/// A jump target; bind it with [`Guest::bind`].
#[derive(Clone, Copy, Debug)]
pub struct Label(usize);

/// Tiny guest code under construction, plus data segments.
#[derive(Default)]
pub struct Guest {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (offset of a 32-bit field, label, whether it is relative)
    fixups: Vec<(usize, Label, bool)>,
    blobs: Vec<(u32, Vec<u8>)>,
}

impl Guest {
    pub fn new() -> Guest {
        Guest::default()
    }

    fn emit(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn emit32(&mut self, v: u32) -> &mut Self {
        self.emit(&v.to_le_bytes())
    }

    /// Data loaded at guest-physical `addr` before the guest starts.
    pub fn place(&mut self, addr: u32, bytes: &[u8]) -> &mut Self {
        assert!(addr >= 0x20_0000, "data below 2 MiB would overlap the code");
        self.blobs.push((addr, bytes.to_vec()));
        self
    }

    // ---- labels and jumps ----

    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    pub fn bind(&mut self, l: Label) -> &mut Self {
        assert!(self.labels[l.0].is_none(), "label bound twice");
        self.labels[l.0] = Some(self.code.len());
        self
    }
    fn rel32_to(&mut self, l: Label) -> &mut Self {
        self.fixups.push((self.code.len(), l, true));
        self.emit32(0)
    }
    pub fn jmp(&mut self, l: Label) -> &mut Self {
        self.emit(&[0xe9]).rel32_to(l)
    }
    pub fn je(&mut self, l: Label) -> &mut Self {
        self.emit(&[0x0f, 0x84]).rel32_to(l)
    }
    pub fn jne(&mut self, l: Label) -> &mut Self {
        self.emit(&[0x0f, 0x85]).rel32_to(l)
    }

    // ---- output ----

    /// The bytes of the code alone.
    pub fn code(&self) -> Vec<u8> {
        let mut code = self.code.clone();
        for &(at, l, relative) in &self.fixups {
            let target = self.labels[l.0].expect("jump to an unbound label");
            let v = if relative {
                (target as i64 - (at as i64 + 4)) as i32 as u32
            } else {
                LOAD_ADDR + target as u32
            };
            code[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        code
    }

    /// The ELF64 image: one `PT_LOAD` for the code at [`LOAD_ADDR`], one
    /// per placed blob, and the PVH entry note.
    pub fn elf(&self) -> Vec<u8> {
        let mut segs = vec![(LOAD_ADDR, self.code())];
        segs.extend(self.blobs.iter().cloned());
        pvh_elf_segments(&segs)
    }

    /// Writes the ELF to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.elf())
    }
}

/// The LAPIC and IOAPIC MMIO bases.
pub const LAPIC: u32 = 0xfee0_0000;
pub const IOAPIC: u32 = 0xfec0_0000;

/// Where [`Guest::irq_handler`] finds the address to resume at.
pub const IRQ_RESUME: u32 = 0x1f_f100;

/// Scratch dwords the driver helpers use.
pub const SCRATCH: u32 = 0x1f_f000;
