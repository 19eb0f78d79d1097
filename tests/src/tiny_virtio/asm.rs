//! [`Guest`]'s instruction helpers: registers and memory, console output
//! and power-off, checks, and polls bounded by [`POLL_ITERATIONS`].

use super::{Guest, COM1, LOAD_ADDR, POLL_ITERATIONS, POWEROFF_PORT, SCRATCH};

impl Guest {
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
    /// Polls the u32 at `addr` until every bit of `mask` is set; after
    /// [`POLL_ITERATIONS`] prints `TIMEOUT <what>` and powers off.
    pub fn poll_u32_until_bits(&mut self, addr: u32, mask: u32, what: &str) -> &mut Self {
        let (top, done) = (self.label(), self.label());
        self.emit(&[0xb9]).emit32(POLL_ITERATIONS); // mov ecx, n
        self.bind(top);
        self.mmio_read32_to_eax(addr)
            .and_eax(mask)
            .cmp_eax(mask)
            .je(done);
        self.emit(&[0x49]); // dec ecx
        self.jne(top);
        self.print("TIMEOUT ").print(what).print("\r\n").poweroff();
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
}
