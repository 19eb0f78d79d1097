//! The ELF64 image of a tiny guest: `PT_LOAD` segments and the PVH entry
//! note.

use super::LOAD_ADDR;

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
