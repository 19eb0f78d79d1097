//! Tiny purpose-built guests: a few instructions of 32-bit code wrapped in
//! an ELF64 file with a PVH entry note, so the real `vmm` binary boots them
//! through its normal kernel path in milliseconds.

use std::path::Path;

/// Where the code is loaded and entered (physical, 1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Builds an ELF64 image with one PT_LOAD segment holding `code` at
/// `LOAD_ADDR` and a PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY = LOAD_ADDR.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note = {
        let mut n = Vec::new();
        n.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
        n.extend_from_slice(&4u32.to_le_bytes()); // descsz
        n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        n.extend_from_slice(b"Xen\0");
        n.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
        n
    };
    let note_off = EHDR + 2 * PHDR;
    let code_off = (note_off + note.len() + 15) & !15;
    let mut f = vec![0u8; code_off];
    // ELF header
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // version
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 62); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD_ADDR); // e_entry
    put64(&mut f, 32, EHDR as u64); // e_phoff
    put16(&mut f, 52, EHDR as u16);
    put16(&mut f, 54, PHDR as u16);
    put16(&mut f, 56, 2); // e_phnum
                          // PT_LOAD
    let p = EHDR;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 7); // RWX
    put64(&mut f, p + 8, code_off as u64);
    put64(&mut f, p + 16, LOAD_ADDR);
    put64(&mut f, p + 24, LOAD_ADDR);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE
    let p = EHDR + PHDR;
    put32(&mut f, p, 4);
    put32(&mut f, p + 4, 4);
    put64(&mut f, p + 8, note_off as u64);
    put64(&mut f, p + 32, note.len() as u64);
    put64(&mut f, p + 40, note.len() as u64);
    put64(&mut f, p + 48, 4);
    f[note_off..note_off + note.len()].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}

fn put16(f: &mut [u8], o: usize, v: u16) {
    f[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(f: &mut [u8], o: usize, v: u32) {
    f[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(f: &mut [u8], o: usize, v: u64) {
    f[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// A small 32-bit assembler for the instructions tiny guests use.
#[derive(Default)]
pub struct Asm {
    pub code: Vec<u8>,
}

impl Asm {
    pub fn new() -> Asm {
        Asm::default()
    }
    /// mov dx, port; mov al, v; out dx, al
    pub fn outb(&mut self, port: u16, v: u8) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self.code.extend_from_slice(&[0xb0, v, 0xee]);
        self
    }
    /// mov dx, port; in al, dx
    pub fn inb(&mut self, port: u16) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self.code.push(0xec);
        self
    }
    /// Writes a string to COM1.
    pub fn print(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.outb(0x3f8, b);
        }
        self
    }
    /// mov dword [addr], v (a write to guest memory or MMIO)
    pub fn mov_mem32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.code.extend_from_slice(&[0xc7, 0x05]);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self.code.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// mov eax, dword [addr]
    pub fn load_eax(&mut self, addr: u32) -> &mut Self {
        self.code.push(0xa1);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// cli; hlt; jmp back to hlt
    pub fn cli_hlt_forever(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
        self
    }
    /// jmp $ (spin forever with interrupts as they are)
    pub fn spin(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
    /// Triple fault: load an empty IDT and raise an exception.
    pub fn triple_fault(&mut self) -> &mut Self {
        // lidt [zero descriptor placed right after the instruction stream]
        // Simpler: int3 with the IDT limit 0 set by the VMM (idt.limit = 0).
        self.code.push(0xcc);
        self
    }
    /// Prints `text` with one `rep outsb` (one exit per chunk, not per
    /// byte), forever. The text is placed right after the code.
    pub fn flood_forever(&mut self, text: &str) -> &mut Self {
        // top: mov esi, imm32 ; mov ecx, len ; mov dx, 0x3f8 ; rep outsb ; jmp top
        let top = self.here();
        let esi_at = self.code.len() + 1;
        self.code.push(0xbe);
        self.code.extend_from_slice(&0u32.to_le_bytes());
        self.code.push(0xb9);
        self.code
            .extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.code
            .extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xf3, 0x6e]);
        self.jmp_back(top);
        let data = LOAD_ADDR as u32 + self.code.len() as u32;
        self.code[esi_at..esi_at + 4].copy_from_slice(&data.to_le_bytes());
        self.code.extend_from_slice(text.as_bytes());
        self
    }
    /// The current position, for a later backward jump.
    pub fn here(&self) -> usize {
        self.code.len()
    }
    /// jmp to an earlier position (near, rel32).
    pub fn jmp_back(&mut self, target: usize) -> &mut Self {
        let rel = target as i64 - (self.code.len() as i64 + 5);
        self.code.push(0xe9);
        self.code.extend_from_slice(&(rel as i32).to_le_bytes());
        self
    }
    /// `jb target` (a backward jump taken when below).
    pub fn jb_back(&mut self, target: usize) -> &mut Self {
        self.jcc_back(0x82, target)
    }
    /// A near conditional jump (`0f cc rel32`) to an earlier position.
    fn jcc_back(&mut self, cc: u8, target: usize) -> &mut Self {
        self.code.extend_from_slice(&[0x0f, cc]);
        let rel = target as i64 - (self.code.len() as i64 + 4);
        self.code.extend_from_slice(&(rel as i32).to_le_bytes());
        self
    }
    /// Prints the letter in AL on COM1 and moves AL to the next one, z
    /// wrapping to a (clobbers DX).
    pub fn print_next_letter(&mut self) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]); // mov dx, 0x3f8; out dx, al
        self.code.extend_from_slice(&[0xfe, 0xc0]); // inc al
        self.code.extend_from_slice(&[0x3c, b'z' + 1, 0x75, 0x02]); // cmp al, 'z'+1; jne +2
        self.code.extend_from_slice(&[0xb0, b'a']); // mov al, 'a'
        self
    }
    /// Writes `v` to the dword at `addr` `n` times (`n` > 0): one MMIO
    /// exit each where `addr` is a device's register.
    pub fn mov_mem32_times(&mut self, addr: u32, v: u32, n: u32) -> &mut Self {
        self.code.push(0xb9); // mov ecx, n
        self.code.extend_from_slice(&n.to_le_bytes());
        let top = self.here();
        self.mov_mem32(addr, v);
        self.code.push(0x49); // dec ecx
        self.jcc_back(0x85, top) // jnz top
    }
    /// Busy-waits about `n` iterations (mov ecx, n; loop $).
    pub fn delay(&mut self, n: u32) -> &mut Self {
        self.code.push(0xb9);
        self.code.extend_from_slice(&n.to_le_bytes());
        self.code.extend_from_slice(&[0xe2, 0xfe]);
        self
    }
    /// Waits until the i8042 has a byte (status bit 0), then reads it.
    pub fn wait_i8042_byte(&mut self) -> &mut Self {
        let top = self.here();
        self.inb(0x64);
        // test al, 1 ; jz top
        self.code.extend_from_slice(&[0xa8, 0x01]);
        self.jcc_back(0x84, top);
        self.inb(0x60)
    }
    pub fn bytes(&self) -> &[u8] {
        &self.code
    }
}

/// Writes a tiny guest ELF to `path`.
pub fn write_guest(path: &Path, asm: &Asm) -> std::io::Result<()> {
    std::fs::write(path, pvh_elf(asm.bytes()))
}

/// The command line of a VMM running `asm` as its guest (written to
/// `dir/tiny.elf`): named `name`, 64 MiB, control socket `sock`, console on
/// stdio. Callers add arguments or environment, then
/// [`crate::VmmProcess::spawn_cmd`].
pub fn vmm_command(dir: &Path, name: &str, asm: &Asm, sock: &Path) -> std::process::Command {
    vmm_command_sized(dir, name, asm, sock, 64)
}

/// [`vmm_command`] with `mib` MiB of guest memory.
pub fn vmm_command_sized(
    dir: &Path,
    name: &str,
    asm: &Asm,
    sock: &Path,
    mib: u32,
) -> std::process::Command {
    let k = dir.join("tiny.elf");
    write_guest(&k, asm).expect("write the tiny guest");
    let mut cmd = std::process::Command::new(crate::bin("vmm"));
    cmd.args([
        "--name",
        name,
        "--memory",
        &mib.to_string(),
        "--console",
        "stdio",
    ])
    .arg("--kernel")
    .arg(&k)
    .arg("--control")
    .arg(sock);
    cmd
}

/// READY on COM1, then a..z over and over, the letter kept in AL only: a
/// guest that is snapshotted or migrated must go on at exactly the next
/// letter, from its registers, or it shows.
pub fn alphabet() -> Asm {
    let mut a = Asm::new();
    a.print("READY\r\n");
    a.code.extend_from_slice(&[0xb0, b'a']); // mov al, 'a'
    let top = a.here();
    a.print_next_letter();
    a.delay(200_000);
    a.jmp_back(top);
    a
}

/// READY, then writes one dword to each 4 KiB page of guest memory from
/// `base` to `base + len`, over and over, as fast as it can, and prints
/// the next letter of the alphabet after each sweep (as [`alphabet`]:
/// `letters_of` and `contiguous` read it): a guest that dirties memory at
/// a steady rate, `len` bytes per letter. (No delay loop between pages:
/// under kvm_pvm `loop` costs ~500 ns an iteration; measure the rate.)
pub fn dirtier(base: u32, len: u32) -> Asm {
    let end = base.checked_add(len).expect("the range ends below 4 GiB");
    let mut a = Asm::new();
    a.print("READY\r\n");
    a.code.extend_from_slice(&[0xb0, b'a']); // mov al, 'a'
    let sweep = a.here();
    a.code.push(0xbf); // mov edi, base
    a.code.extend_from_slice(&base.to_le_bytes());
    let page = a.here();
    a.code.extend_from_slice(&[0x89, 0x07]); // mov [edi], eax
    a.code
        .extend_from_slice(&[0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add edi, 4096
    a.code.extend_from_slice(&[0x81, 0xff]); // cmp edi, end
    a.code.extend_from_slice(&end.to_le_bytes());
    a.jb_back(page);
    a.print_next_letter();
    a.jmp_back(sweep);
    a
}

/// The letters of [`alphabet`]'s console output after READY (the VMM's own
/// marker lines, `--- vmm: boot 1 (restored ...) ---`, left out).
pub fn letters_of(out: &str) -> String {
    let tail = out.split("READY\r\n").last().unwrap_or_default();
    tail.lines()
        .filter(|l| !l.contains("--- vmm:"))
        .flat_map(|l| l.chars())
        .filter(|c| c.is_ascii_lowercase())
        .collect()
}

/// Whether `s` goes a, b, ... z, a without a letter lost or doubled.
pub fn contiguous(s: &str) -> bool {
    s.as_bytes()
        .windows(2)
        .all(|w| w[1] == if w[0] == b'z' { b'a' } else { w[0] + 1 })
}
