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

    // ---- registers and memory ----

    /// mov eax, imm32
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0xb8]).emit32(v)
    }
    /// cmp eax, imm32
    pub fn cmp_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x3d]).emit32(v)
    }
    /// and eax, imm32
    pub fn and_eax(&mut self, v: u32) -> &mut Self {
        self.emit(&[0x25]).emit32(v)
    }
    /// mov dword [addr], imm32 (RAM or a virtio-mmio register).
    pub fn mmio_write32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.emit(&[0xc7, 0x05]).emit32(addr).emit32(v)
    }
    /// mov eax, dword [addr] (RAM or a virtio-mmio register).
    pub fn mmio_read32_to_eax(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0xa1]).emit32(addr)
    }
    /// mov dword [addr], eax
    pub fn store_eax(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0xa3]).emit32(addr)
    }
    pub fn mem_write32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.mmio_write32(addr, v)
    }
    /// mov word [addr], imm16
    pub fn mem_write16(&mut self, addr: u32, v: u16) -> &mut Self {
        self.emit(&[0x66, 0xc7, 0x05])
            .emit32(addr)
            .emit(&v.to_le_bytes())
    }
    /// mov byte [addr], imm8
    pub fn mem_write8(&mut self, addr: u32, v: u8) -> &mut Self {
        self.emit(&[0xc6, 0x05]).emit32(addr).emit(&[v])
    }
    /// movzx eax, word [addr]
    pub fn load_u16_to_eax(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0x0f, 0xb7, 0x05]).emit32(addr)
    }
    /// movzx eax, byte [addr]
    pub fn load_u8_to_eax(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0x0f, 0xb6, 0x05]).emit32(addr)
    }
    /// Fills `len` bytes at `addr` with `v` (rep stosb).
    pub fn mem_fill(&mut self, addr: u32, v: u8, len: u32) -> &mut Self {
        self.emit(&[0xbf])
            .emit32(addr)
            .emit(&[0xb9])
            .emit32(len)
            .emit(&[0xb0, v, 0xfc, 0xf3, 0xaa])
    }
    /// Compares `len` bytes at `a` and `b` (repe cmpsb); ZF set when equal.
    /// Use `je`/`jne` right after.
    pub fn mem_compare(&mut self, a: u32, b: u32, len: u32) -> &mut Self {
        assert!(len > 0);
        self.emit(&[0xbe])
            .emit32(a)
            .emit(&[0xbf])
            .emit32(b)
            .emit(&[0xb9])
            .emit32(len)
            .emit(&[0xfc, 0xf3, 0xa6])
    }

    /// Guest-physical address of the next instruction.
    pub fn here_addr(&self) -> u32 {
        LOAD_ADDR + self.code.len() as u32
    }
    /// mov esp, v
    pub fn set_esp(&mut self, v: u32) -> &mut Self {
        self.emit(&[0xbc]).emit32(v)
    }
    /// inc dword [addr]
    pub fn inc_mem32(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0xff, 0x05]).emit32(addr)
    }
    /// lidt [addr] (a 6-byte limit/base pair in memory)
    pub fn lidt(&mut self, addr: u32) -> &mut Self {
        self.emit(&[0x0f, 0x01, 0x1d]).emit32(addr)
    }
    pub fn cli(&mut self) -> &mut Self {
        self.emit(&[0xfa])
    }

    // ---- console and power ----

    /// mov dx, port; mov al, v; out dx, al
    pub fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.emit(&[0x66, 0xba])
            .emit(&port.to_le_bytes())
            .emit(&[0xb0, v, 0xee])
    }
    /// Writes `s` to COM1.
    pub fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.outb(COM1, b);
        }
        self
    }
    /// Writes `len` bytes of guest memory at `addr` to COM1 (rep outsb).
    pub fn print_mem(&mut self, addr: u32, len: u32) -> &mut Self {
        self.emit(&[0xbe])
            .emit32(addr)
            .emit(&[0xb9])
            .emit32(len)
            .emit(&[0x66, 0xba])
            .emit(&COM1.to_le_bytes())
            .emit(&[0xfc, 0xf3, 0x6e])
    }
    /// Prints the low `digits` hex digits of EAX (upper case, no prefix).
    pub fn print_eax_hex_digits(&mut self, digits: u8) -> &mut Self {
        assert!((1..=8).contains(&digits));
        self.emit(&[0x89, 0xc3]); // mov ebx, eax
        if digits < 8 {
            self.emit(&[0xc1, 0xe3, (8 - digits) * 4]); // shl ebx, n
        }
        self.emit(&[0xb9]).emit32(u32::from(digits)); // mov ecx, digits
        let top = self.code.len();
        self.emit(&[
            0xc1, 0xc3, 0x04, // rol ebx, 4
            0x89, 0xd8, // mov eax, ebx
            0x83, 0xe0, 0x0f, // and eax, 0xf
            0x3c, 0x0a, // cmp al, 10
            0x72, 0x02, // jb +2
            0x04, 0x07, // add al, 7
            0x04, 0x30, // add al, '0'
            0x66, 0xba,
        ]);
        self.emit(&COM1.to_le_bytes());
        self.emit(&[0xee, 0x49, 0x75]); // out dx, al; dec ecx; jnz top
        let rel = top as i64 - (self.code.len() as i64 + 1);
        self.emit(&[rel as i8 as u8])
    }
    /// Prints EAX as 8 hex digits.
    pub fn print_eax_hex(&mut self) -> &mut Self {
        self.print_eax_hex_digits(8)
    }
    /// Prints `label=XXXXXXXX ` with the dword at `addr`.
    pub fn print_u32_at(&mut self, label: &str, addr: u32) -> &mut Self {
        self.print(label)
            .print("=")
            .mmio_read32_to_eax(addr)
            .print_eax_hex()
            .print(" ")
    }
    /// Prints `label=XXXX ` with the u16 at `addr`.
    pub fn print_u16_at(&mut self, label: &str, addr: u32) -> &mut Self {
        self.print(label)
            .print("=")
            .load_u16_to_eax(addr)
            .print_eax_hex_digits(4)
            .print(" ")
    }
    /// Prints `label=XX ` with the byte at `addr`.
    pub fn print_u8_at(&mut self, label: &str, addr: u32) -> &mut Self {
        self.print(label)
            .print("=")
            .load_u8_to_eax(addr)
            .print_eax_hex_digits(2)
            .print(" ")
    }
    /// Powers off through ACPI S5 (then halts, should that not happen).
    pub fn poweroff(&mut self) -> &mut Self {
        self.outb(POWEROFF_PORT, 0x34)
            .emit(&[0xfa, 0xf4, 0xeb, 0xfd])
    }
    /// Prints `FAIL <why>` and powers off.
    pub fn fail(&mut self, why: &str) -> &mut Self {
        self.print("FAIL ").print(why).print("\r\n").poweroff()
    }
    /// If EAX != `v`, prints `FAIL <why> (got XXXXXXXX)` and powers off.
    pub fn expect_eax(&mut self, v: u32, why: &str) -> &mut Self {
        let ok = self.label();
        self.cmp_eax(v).je(ok);
        // `print` clobbers EAX: keep the value aside.
        self.store_eax(SCRATCH + 8)
            .print("FAIL ")
            .print(why)
            .print(" (got ")
            .mmio_read32_to_eax(SCRATCH + 8)
            .print_eax_hex()
            .print(")\r\n")
            .poweroff();
        self.bind(ok)
    }

    /// Polls the u16 at `addr` until it equals `v`; after
    /// [`POLL_ITERATIONS`] prints `TIMEOUT <what>` and powers off.
    pub fn poll_u16_until_eq(&mut self, addr: u32, v: u16, what: &str) -> &mut Self {
        let (top, done) = (self.label(), self.label());
        self.emit(&[0xb9]).emit32(POLL_ITERATIONS); // mov ecx, n
        self.bind(top);
        self.load_u16_to_eax(addr).cmp_eax(u32::from(v)).je(done);
        self.emit(&[0x49]); // dec ecx
        self.jne(top);
        self.print("TIMEOUT ")
            .print(what)
            .print(" value=")
            .load_u16_to_eax(addr)
            .print_eax_hex_digits(4)
            .print("\r\n")
            .poweroff();
        self.bind(done)
    }
    /// Polls the u16 at `addr` until it differs from `from` (the value the
    /// caller knows it held before the event it waits for); after
    /// [`POLL_ITERATIONS`] prints `TIMEOUT <what>` and powers off.
    pub fn poll_u16_until_changes(&mut self, addr: u32, from: u16, what: &str) -> &mut Self {
        let (top, done) = (self.label(), self.label());
        self.emit(&[0xb9]).emit32(POLL_ITERATIONS); // mov ecx, n
        self.bind(top);
        self.load_u16_to_eax(addr)
            .cmp_eax(u32::from(from))
            .jne(done);
        self.emit(&[0x49]); // dec ecx
        self.jne(top);
        self.print("TIMEOUT ").print(what).print("\r\n").poweroff();
        self.bind(done)
    }

    /// Waits for a byte on COM1 (LSR bit 0) and reads it into AL; after
    /// [`POLL_ITERATIONS`] prints `TIMEOUT <what>` and powers off. Tests
    /// type a byte into the console to tell the guest to go on.
    pub fn wait_serial_byte(&mut self, what: &str) -> &mut Self {
        let (top, done) = (self.label(), self.label());
        self.emit(&[0xb9]).emit32(POLL_ITERATIONS);
        self.bind(top);
        self.emit(&[0x66, 0xba])
            .emit(&(COM1 + 5).to_le_bytes())
            .emit(&[0xec, 0xa8, 0x01]); // in al, dx; test al, 1
        self.jne(done);
        self.emit(&[0x49]);
        self.jne(top);
        self.print("TIMEOUT ").print(what).print("\r\n").poweroff();
        self.bind(done);
        self.emit(&[0x66, 0xba])
            .emit(&COM1.to_le_bytes())
            .emit(&[0xec])
    }

    // ---- interrupts ----

    /// mov dword [addr], <guest-physical address of `l`>
    pub fn store_label_addr(&mut self, addr: u32, l: Label) -> &mut Self {
        self.emit(&[0xc7, 0x05]).emit32(addr);
        self.fixups.push((self.code.len(), l, false));
        self.emit32(0)
    }

    /// An interrupt handler that does not return with `iret` (this
    /// machine's kvm_pvm cannot run `iretd` for a 32-bit guest with paging
    /// off, and neither can the VMM's emulator): it runs `body`, sends the
    /// LAPIC an EOI, drops the interrupt frame and jumps to the address
    /// stored at [`IRQ_RESUME`], with interrupts off (an interrupt gate
    /// clears IF). [`Guest::wait_irq_count`] sets that address. Emits a
    /// jump over the handler; returns the handler's address for the IDT.
    pub fn irq_handler(&mut self, body: impl FnOnce(&mut Guest)) -> u32 {
        let over = self.label();
        self.jmp(over);
        let at = self.here_addr();
        body(self);
        self.mmio_write32(LAPIC + 0xb0, 0) // EOI
            .emit(&[0x83, 0xc4, 0x0c]) // add esp, 12
            .emit(&[0xff, 0x25])
            .emit32(IRQ_RESUME); // jmp [IRQ_RESUME]
        self.bind(over);
        at
    }

    /// Masks both 8259 PICs and the LAPIC's LINT0 (ExtINT), and
    /// software-enables the LAPIC, so only IOAPIC-routed interrupts arrive.
    pub fn interrupts_via_ioapic_only(&mut self) -> &mut Self {
        self.outb(0x21, 0xff)
            .outb(0xa1, 0xff)
            .mmio_write32(LAPIC + 0x350, 0x1_0000) // LVT LINT0 masked
            .mmio_write32(LAPIC + 0x80, 0) // TPR
            .mmio_write32(LAPIC + 0xf0, 0x1ff) // SVR: enabled, spurious 0xff
    }
    /// Routes `gsi` to `vector` on CPU 0: fixed delivery, edge, active high.
    pub fn ioapic_route(&mut self, gsi: u32, vector: u8) -> &mut Self {
        self.mmio_write32(IOAPIC, 0x10 + 2 * gsi)
            .mmio_write32(IOAPIC + 0x10, u32::from(vector))
            .mmio_write32(IOAPIC, 0x11 + 2 * gsi)
            .mmio_write32(IOAPIC + 0x10, 0)
    }
    /// Masks `gsi` in the IOAPIC.
    pub fn ioapic_mask(&mut self, gsi: u32) -> &mut Self {
        self.mmio_write32(IOAPIC, 0x10 + 2 * gsi)
            .mmio_write32(IOAPIC + 0x10, 0x1_0000)
    }
    /// With interrupts off, waits (`sti; hlt` until an interrupt) until the
    /// dword at `counter` is at least `n`; the handler comes back to the
    /// check through [`IRQ_RESUME`]. Unbounded: an interrupt that never
    /// comes leaves the guest halted, for the test's timeout.
    pub fn wait_irq_count(&mut self, counter: u32, n: u32) -> &mut Self {
        let (top, done) = (self.label(), self.label());
        self.store_label_addr(IRQ_RESUME, top);
        self.bind(top);
        self.mmio_read32_to_eax(counter).cmp_eax(n);
        self.emit(&[0x0f, 0x83]).rel32_to(done); // jae done
        self.emit(&[0xfb, 0xf4, 0xfa]); // sti; hlt; cli
        self.jmp(top);
        self.bind(done)
    }

    // ---- the virtio-mmio driver ----

    /// Prints `SLOT<i> MAGIC=.. VERSION=.. DEVICE=.. VENDOR=..`.
    pub fn virtio_probe(&mut self, slot: u32) -> &mut Self {
        let b = slot_base(slot);
        self.print(&format!("SLOT{slot} "))
            .print_u32_at("MAGIC", b + reg::MAGIC)
            .print_u32_at("VERSION", b + reg::VERSION)
            .print_u32_at("DEVICE", b + reg::DEVICE_ID)
            .print_u32_at("VENDOR", b + reg::VENDOR_ID)
            .print("\r\n")
    }

    /// Reset, ACKNOWLEDGE, DRIVER; checks the device offers VERSION_1
    /// (feature bit 32) and accepts `VERSION_1 | features_low`; sets
    /// FEATURES_OK and checks that it stuck. Prints the device's low and
    /// high feature words (`FEATURES=hi:lo`).
    pub fn virtio_init(&mut self, base: u32, features_low: u32) -> &mut Self {
        use status::*;
        self.mmio_write32(base + reg::STATUS, 0)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(0, "status after reset")
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE)
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.mmio_write32(base + reg::DEVICE_FEATURES_SEL, 1)
            .mmio_read32_to_eax(base + reg::DEVICE_FEATURES)
            .store_eax(SCRATCH)
            .and_eax(1)
            .expect_eax(1, "VERSION_1 not offered");
        self.mmio_write32(base + reg::DEVICE_FEATURES_SEL, 0)
            .mmio_read32_to_eax(base + reg::DEVICE_FEATURES)
            .store_eax(SCRATCH + 4);
        self.print("FEATURES=")
            .mmio_read32_to_eax(SCRATCH)
            .print_eax_hex()
            .print(":")
            .mmio_read32_to_eax(SCRATCH + 4)
            .print_eax_hex()
            .print("\r\n");
        self.mmio_write32(base + reg::DRIVER_FEATURES_SEL, 1)
            .mmio_write32(base + reg::DRIVER_FEATURES, 1)
            .mmio_write32(base + reg::DRIVER_FEATURES_SEL, 0)
            .mmio_write32(base + reg::DRIVER_FEATURES, features_low)
            .mmio_write32(base + reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(
                ACKNOWLEDGE | DRIVER | FEATURES_OK,
                "FEATURES_OK did not stick",
            )
            .print("FEATURES_OK\r\n")
    }

    /// Selects queue `q.index`, checks QueueNumMax >= `q.size` and that the
    /// queue is not ready yet, zeroes its rings, sets size and addresses,
    /// then QueueReady = 1 (checked).
    pub fn setup_queue(&mut self, q: &VirtQueue) -> &mut Self {
        let b = q.base;
        self.mem_fill(q.desc, 0, 0x300);
        self.mmio_write32(b + reg::QUEUE_SEL, q.index)
            .mmio_read32_to_eax(b + reg::QUEUE_READY)
            .expect_eax(0, "queue ready before setup")
            .print(&format!("QUEUE{}_MAX=", q.index))
            .mmio_read32_to_eax(b + reg::QUEUE_NUM_MAX)
            .print_eax_hex()
            .print("\r\n")
            .mmio_read32_to_eax(b + reg::QUEUE_NUM_MAX)
            .emit(&[0x3d])
            .emit32(u32::from(q.size)); // cmp eax, size
        let ok = self.label();
        self.emit(&[0x0f, 0x83]).rel32_to(ok); // jae ok
        self.fail("QueueNumMax below our queue size");
        self.bind(ok);
        self.mmio_write32(b + reg::QUEUE_NUM, u32::from(q.size))
            .mmio_write32(b + reg::QUEUE_DESC_LOW, q.desc)
            .mmio_write32(b + reg::QUEUE_DESC_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_DRIVER_LOW, q.avail)
            .mmio_write32(b + reg::QUEUE_DRIVER_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_DEVICE_LOW, q.used)
            .mmio_write32(b + reg::QUEUE_DEVICE_HIGH, 0)
            .mmio_write32(b + reg::QUEUE_READY, 1)
            .mmio_read32_to_eax(b + reg::QUEUE_READY)
            .expect_eax(1, "QueueReady did not stick")
    }

    /// Sets DRIVER_OK and checks the status reads back as a running device.
    pub fn driver_ok(&mut self, base: u32) -> &mut Self {
        use status::*;
        let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        self.mmio_write32(base + reg::STATUS, all)
            .mmio_read32_to_eax(base + reg::STATUS)
            .expect_eax(all, "DRIVER_OK did not stick")
            .print("DRIVER_OK\r\n")
    }

    /// Writes descriptor `i` of `q`.
    pub fn write_desc(
        &mut self,
        q: &VirtQueue,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.write_desc_at(q.desc_addr(i), addr, len, flags, next)
    }

    /// Writes a descriptor at `d` (in a queue's table or an indirect one).
    pub fn write_desc_at(
        &mut self,
        d: u32,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.mem_write32(d, addr as u32)
            .mem_write32(d + 4, (addr >> 32) as u32)
            .mem_write32(d + 8, len)
            .mem_write32(d + 12, u32::from(flags) | (u32::from(next) << 16))
    }

    /// Makes `head` available and notifies: avail.ring[idx % size] = head,
    /// avail.idx += 1, QueueNotify = queue index. Returns (through `q`) the
    /// new avail index, which is also the used index to wait for when
    /// requests complete in order.
    pub fn submit(&mut self, q: &mut VirtQueue, head: u16) -> &mut Self {
        let slot = q.next_avail % q.size;
        q.next_avail = q.next_avail.wrapping_add(1);
        self.mem_write16(q.avail + 4 + 2 * u32::from(slot), head)
            .mem_write16(q.avail + 2, q.next_avail)
            .mmio_write32(q.base + reg::QUEUE_NOTIFY, q.index)
    }

    /// Makes several heads available at once with one notification.
    pub fn submit_many(&mut self, q: &mut VirtQueue, heads: &[u16]) -> &mut Self {
        for &head in heads {
            let slot = q.next_avail % q.size;
            q.next_avail = q.next_avail.wrapping_add(1);
            self.mem_write16(q.avail + 4 + 2 * u32::from(slot), head);
        }
        self.mem_write16(q.avail + 2, q.next_avail)
            .mmio_write32(q.base + reg::QUEUE_NOTIFY, q.index)
    }

    /// Waits until the used index reaches `q.next_avail` (every submitted
    /// chain returned).
    pub fn wait_used(&mut self, q: &VirtQueue, what: &str) -> &mut Self {
        self.poll_u16_until_eq(q.used_idx_addr(), q.next_avail, what)
    }

    /// Writes a virtio-blk request header (`type, reserved, sector`) at `at`.
    pub fn blk_header(&mut self, at: u32, req_type: u32, sector: u64) -> &mut Self {
        self.mem_write32(at, req_type)
            .mem_write32(at + 4, 0)
            .mem_write32(at + 8, sector as u32)
            .mem_write32(at + 12, (sector >> 32) as u32)
    }

    /// Builds a three-descriptor block request in descriptors
    /// `first..first+3` (or two when `data` is `None`): header (readable),
    /// data (readable for OUT, writable otherwise), status byte (writable,
    /// preset to 0xff), submits it and waits for completion.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_request(
        &mut self,
        q: &mut VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_request_submit(q, first, hdr, req_type, sector, data, status_at);
        let what = format!("block request type {req_type} sector {sector}");
        self.wait_used(q, &what)
    }

    /// [`Guest::blk_request`] without the wait.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_request_submit(
        &mut self,
        q: &mut VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_chain(q, first, hdr, req_type, sector, data, status_at)
            .submit(q, first)
    }

    /// Writes the header and descriptors of a block request (see
    /// [`Guest::blk_request`]) without making it available.
    #[allow(clippy::too_many_arguments)]
    pub fn blk_chain(
        &mut self,
        q: &VirtQueue,
        first: u16,
        hdr: u32,
        req_type: u32,
        sector: u64,
        data: Option<(u64, u32)>,
        status_at: u32,
    ) -> &mut Self {
        self.blk_header(hdr, req_type, sector)
            .mem_write8(status_at, 0xff);
        self.write_desc(q, first, u64::from(hdr), 16, VIRTQ_DESC_F_NEXT, first + 1);
        let mut st = first + 1;
        if let Some((addr, len)) = data {
            let dir = if req_type == blk::T_OUT {
                0
            } else {
                VIRTQ_DESC_F_WRITE
            };
            self.write_desc(q, first + 1, addr, len, dir | VIRTQ_DESC_F_NEXT, first + 2);
            st = first + 2;
        }
        self.write_desc(q, st, u64::from(status_at), 1, VIRTQ_DESC_F_WRITE, 0)
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

/// An interrupt gate for a 32-bit handler at `handler` (code selector
/// 0x10, the VMM's flat 32-bit PVH code segment).
pub fn interrupt_gate(handler: u32) -> [u8; 8] {
    let mut g = [0u8; 8];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x8e; // present, DPL 0, 32-bit interrupt gate
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g
}

/// The LAPIC and IOAPIC MMIO bases.
pub const LAPIC: u32 = 0xfee0_0000;
pub const IOAPIC: u32 = 0xfec0_0000;

/// Where [`Guest::irq_handler`] finds the address to resume at.
pub const IRQ_RESUME: u32 = 0x1f_f100;

/// Scratch dwords the driver helpers use.
pub const SCRATCH: u32 = 0x1f_f000;

/// An ELF64 with one `PT_LOAD` per `(address, bytes)` and a PT_NOTE with
/// `XEN_ELFNOTE_PHYS32_ENTRY` = the first segment's address.
pub fn pvh_elf_segments(segs: &[(u32, Vec<u8>)]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let entry = segs.first().map_or(LOAD_ADDR, |s| s.0);
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    let phnum = segs.len() + 1;
    let note_off = EHDR + phnum * PHDR;
    let mut f = vec![0u8; note_off];
    f.extend_from_slice(&note);
    let put = |f: &mut Vec<u8>, o: usize, b: &[u8]| f[o..o + b.len()].copy_from_slice(b);
    put(&mut f, 0, b"\x7fELF\x02\x01\x01");
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &u64::from(entry).to_le_bytes());
    put(&mut f, 32, &(EHDR as u64).to_le_bytes());
    put(&mut f, 52, &(EHDR as u16).to_le_bytes());
    put(&mut f, 54, &(PHDR as u16).to_le_bytes());
    put(&mut f, 56, &(phnum as u16).to_le_bytes());
    let phdr = |f: &mut Vec<u8>, i: usize, kind: u32, off: usize, addr: u64, len: usize| {
        let p = EHDR + i * PHDR;
        put(f, p, &kind.to_le_bytes());
        put(f, p + 4, &7u32.to_le_bytes()); // RWX
        put(f, p + 8, &(off as u64).to_le_bytes());
        put(f, p + 16, &addr.to_le_bytes());
        put(f, p + 24, &addr.to_le_bytes());
        put(f, p + 32, &(len as u64).to_le_bytes());
        put(f, p + 40, &(len as u64).to_le_bytes());
        put(
            f,
            p + 48,
            &(if kind == 1 { 0x1000u64 } else { 4 }).to_le_bytes(),
        );
    };
    phdr(&mut f, 0, 4, note_off, 0, note.len());
    for (i, (addr, bytes)) in segs.iter().enumerate() {
        // Keep file offset and address congruent modulo the page size.
        let pad = (*addr as usize).wrapping_sub(f.len()) & 0xfff;
        f.resize(f.len() + pad, 0);
        let off = f.len();
        f.extend_from_slice(bytes);
        phdr(&mut f, i + 1, 1, off, u64::from(*addr), bytes.len());
    }
    f
}
