//! Interrupt delivery for tiny guests: [`Guest`]'s handler, LAPIC and
//! IOAPIC helpers, and the IDT's interrupt gates.

use super::{Guest, Label, IOAPIC, IRQ_RESUME, LAPIC};

impl Guest {
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
