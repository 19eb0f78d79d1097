//! Unit tests of the userspace emulator on hand-assembled byte sequences.

use std::collections::{HashMap, HashSet};

use iced_x86::Mnemonic;

use super::*;

const RIP64: u64 = 0xffff_ffff_8100_0000;
const FLAGS_ALL: u64 = 0x8d5; // CF PF AF ZF SF OF
const ZF: u64 = 1 << 6;

/// Sparse guest memory: unmapped bytes fault; read-only bytes fault on
/// write.
#[derive(Default)]
struct FakeMem {
    bytes: HashMap<u64, u8>,
    read_only: HashSet<u64>,
    writes: usize,
}

impl FakeMem {
    fn new() -> Self {
        Self::default()
    }

    fn map(&mut self, gva: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.bytes.insert(gva + i as u64, *b);
        }
    }

    fn map_zero(&mut self, gva: u64, len: usize) {
        self.map(gva, &vec![0; len]);
    }

    fn protect(&mut self, gva: u64, len: usize) {
        for i in 0..len as u64 {
            self.read_only.insert(gva + i);
        }
    }

    fn get(&self, gva: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| *self.bytes.get(&(gva + i)).expect("byte is mapped"))
            .collect()
    }

    fn fault(gva: u64, len: usize, write: bool, reason: &str) -> MemFault {
        MemFault {
            gva,
            len,
            write,
            reason: reason.to_owned(),
        }
    }
}

impl GuestMemory for FakeMem {
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let len = buf.len();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = *self
                .bytes
                .get(&(gva + i as u64))
                .ok_or_else(|| Self::fault(gva, len, false, "not mapped"))?;
        }
        Ok(())
    }

    fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), MemFault> {
        for i in 0..buf.len() as u64 {
            if !self.bytes.contains_key(&(gva + i)) {
                return Err(Self::fault(gva, buf.len(), true, "not mapped"));
            }
            if self.read_only.contains(&(gva + i)) {
                return Err(Self::fault(gva, buf.len(), true, "read-only"));
            }
        }
        self.map(gva, buf);
        self.writes += 1;
        Ok(())
    }
}

fn code_segment(bits: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 11,
        present: 1,
        dpl: 0,
        db: u8::from(bits == 32),
        s: 1,
        l: u8::from(bits == 64),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A 64-bit kernel with SSE enabled.
fn state64() -> CpuState {
    let mut st = CpuState::default();
    st.sregs.cs = code_segment(64);
    st.sregs.cr0 = 0x8005_0033; // PG WP NE ET MP PE
    st.sregs.cr4 = 0x0000_0620; // OSXMMEXCPT OSFXSR PAE
    st.sregs.efer = 0xd01; // NX LMA LME SCE
    st.regs.rip = RIP64;
    st.regs.rflags = 0x2;
    st.fpu.mxcsr = 0x1f80;
    st
}

fn state32() -> CpuState {
    let mut st = state64();
    st.sregs.cs = code_segment(32);
    st.sregs.efer = 0;
    st.regs.rip = 0x0010_0000;
    st
}

fn state16() -> CpuState {
    let mut st = state64();
    st.sregs.cs = code_segment(16);
    st.sregs.cs.base = 0xf_0000;
    st.sregs.cr0 = 0x10 | 0x20 | 0x2; // ET NE MP, real mode
    st.sregs.efer = 0;
    st.regs.rip = 0x1000;
    st
}

fn injected(vector: u8, error_code: Option<u32>) -> Outcome {
    Outcome::Inject { vector, error_code }
}

fn assert_unchanged(e: &Emulation, before: &CpuState, after: &CpuState) {
    assert_eq!(e.modified, Modified::default(), "{:?}", e.outcome);
    assert_eq!(before, after);
}

fn assert_unsupported(e: &Emulation) {
    assert!(
        matches!(e.outcome, Outcome::Unsupported { .. }),
        "expected unsupported, got {:?}",
        e.outcome
    );
    assert_eq!(e.modified, Modified::default());
}

// ---- int3, clac/stac, fwait, nops ------------------------------------

#[test]
fn int3_advances_rip_then_injects_bp() {
    let mut st = state64();
    let mut mem = FakeMem::new();
    let e = emulate(&[0xcc, 0x90, 0x90], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::BP, None));
    assert_eq!(st.regs.rip, RIP64 + 1);
    assert_eq!(e.mnemonic, Mnemonic::Int3);
    assert_eq!(e.len, 1);
    assert_eq!(
        e.modified,
        Modified {
            regs: true,
            sregs: false,
            fpu: false
        }
    );
}

#[test]
fn clac_clears_ac_and_stac_sets_it() {
    let mut st = state64();
    let mut mem = FakeMem::new();
    st.regs.rflags = 0x2 | RFLAGS_AC | FLAGS_ALL;
    let e = emulate(&[0x0f, 0x01, 0xca], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rflags, 0x2 | FLAGS_ALL);
    assert_eq!(st.regs.rip, RIP64 + 3);
    assert!(e.modified.regs && !e.modified.fpu && !e.modified.sregs);

    let e = emulate(&[0x0f, 0x01, 0xcb], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Stac);
    assert_eq!(st.regs.rflags, 0x2 | RFLAGS_AC | FLAGS_ALL);
    assert_eq!(st.regs.rip, RIP64 + 6);
}

#[test]
fn emulated_instruction_clears_resume_flag() {
    let mut st = state64();
    st.regs.rflags = 0x2 | RFLAGS_RF;
    let e = emulate(&[0x0f, 0x01, 0xcb], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rflags, 0x2 | RFLAGS_AC);
}

#[test]
fn fwait_advances() {
    for code in [[0x9b], [0x90]] {
        let mut st = state64();
        let e = emulate(&code, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, Outcome::Emulated);
        assert_eq!(st.regs.rip, RIP64 + 1);
    }
}

#[test]
fn fwait_with_ts_and_mp_raises_nm() {
    let mut st = state64();
    st.sregs.cr0 |= CR0_TS;
    let before = st;
    let e = emulate(&[0x9b], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::NM, None));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn fwait_with_pending_x87_exception_raises_mf() {
    let mut st = state64();
    st.fpu.fsw = 0x80 | 0x4; // ES, ZE
    let before = st;
    let e = emulate(&[0x9b], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::MF, None));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn fences_pause_and_endbr_advance() {
    let cases: [&[u8]; 5] = [
        &[0x0f, 0xae, 0xe8],       // lfence
        &[0x0f, 0xae, 0xf0],       // mfence
        &[0x0f, 0xae, 0xf8],       // sfence
        &[0xf3, 0x90],             // pause
        &[0xf3, 0x0f, 0x1e, 0xfa], // endbr64
    ];
    for code in cases {
        let mut st = state64();
        let e = emulate(code, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, Outcome::Emulated, "{code:02x?}");
        assert_eq!(st.regs.rip, RIP64 + code.len() as u64);
    }
}

// ---- ldmxcsr / stmxcsr -------------------------------------------------

#[test]
fn ldmxcsr_loads_mxcsr_from_memory() {
    let mut st = state64();
    st.regs.rsp = 0xffff_c900_0000_1000;
    let mut mem = FakeMem::new();
    mem.map(st.regs.rsp + 8, &0x9fc0u32.to_le_bytes());
    let e = emulate(&[0x0f, 0xae, 0x54, 0x24, 0x08], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.fpu.mxcsr, 0x9fc0);
    assert_eq!(st.regs.rip, RIP64 + 5);
    assert_eq!(
        e.modified,
        Modified {
            regs: true,
            sregs: false,
            fpu: true
        }
    );
}

#[test]
fn ldmxcsr_with_reserved_bits_raises_gp0() {
    let mut st = state64();
    st.regs.rsp = 0x7000;
    let mut mem = FakeMem::new();
    mem.map(0x7008, &0x0001_1f80u32.to_le_bytes());
    let before = st;
    let e = emulate(&[0x0f, 0xae, 0x54, 0x24, 0x08], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::GP, Some(0)));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn ldmxcsr_without_osfxsr_raises_ud_and_with_ts_raises_nm() {
    let mut mem = FakeMem::new();
    mem.map(0x7008, &0x1f80u32.to_le_bytes());

    let mut st = state64();
    st.regs.rsp = 0x7000;
    st.sregs.cr4 &= !CR4_OSFXSR;
    let e = emulate(&[0x0f, 0xae, 0x54, 0x24, 0x08], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::UD, None));

    let mut st = state64();
    st.regs.rsp = 0x7000;
    st.sregs.cr0 |= CR0_TS;
    let e = emulate(&[0x0f, 0xae, 0x54, 0x24, 0x08], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::NM, None));
}

#[test]
fn stmxcsr_stores_mxcsr() {
    let mut st = state64();
    st.regs.rax = 0x5000;
    st.fpu.mxcsr = 0x1fa0;
    let mut mem = FakeMem::new();
    mem.map_zero(0x5000, 8);
    // stmxcsr [rax]
    let e = emulate(&[0x0f, 0xae, 0x18], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(mem.get(0x5000, 8), [0xa0, 0x1f, 0, 0, 0, 0, 0, 0]);
    assert_eq!(st.regs.rip, RIP64 + 3);
    assert!(!e.modified.fpu);
}

#[test]
fn stmxcsr_to_read_only_memory_is_a_fault() {
    let mut st = state64();
    st.regs.rax = 0x5000;
    let mut mem = FakeMem::new();
    mem.map_zero(0x5000, 4);
    mem.protect(0x5000, 4);
    let before = st;
    let e = emulate(&[0x0f, 0xae, 0x18], &mut st, &mut mem);
    match &e.outcome {
        Outcome::Fault {
            mnemonic,
            fault,
            bytes,
            ..
        } => {
            assert_eq!(mnemonic, "stmxcsr");
            assert_eq!(bytes, &[0x0f, 0xae, 0x18]);
            assert_eq!(fault.gva, 0x5000);
            assert!(fault.write);
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    assert_unchanged(&e, &before, &st);
    assert!(e.outcome.to_string().contains("stmxcsr"));
}

// ---- popcnt --------------------------------------------------------------

#[test]
fn popcnt_r64_counts_bits_and_clears_flags() {
    let mut st = state64();
    st.regs.rbx = 0xf000_0000_0000_0101;
    st.regs.rax = 0xdead;
    st.regs.rflags = 0x2 | FLAGS_ALL;
    let e = emulate(
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Popcnt);
    assert_eq!(st.regs.rax, 6);
    assert_eq!(st.regs.rflags, 0x2);
    assert_eq!(st.regs.rip, RIP64 + 5);
}

#[test]
fn popcnt_of_zero_sets_only_zf() {
    let mut st = state64();
    st.regs.rbx = 0;
    st.regs.rax = 77;
    st.regs.rflags = 0x2 | FLAGS_ALL;
    let e = emulate(
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 0);
    assert_eq!(st.regs.rflags, 0x2 | ZF);
}

#[test]
fn popcnt_r32_zero_extends_and_r16_preserves_upper_bits() {
    let mut st = state64();
    st.regs.rbx = 0xffff_ffff_0000_00ff;
    st.regs.rax = 0xffff_ffff_ffff_ffff;
    // popcnt eax, ebx
    let e = emulate(&[0xf3, 0x0f, 0xb8, 0xc3], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 8);

    st.regs.rax = 0x1234_5678_9abc_def0;
    st.regs.rbx = 0xffff_0000_0000_0f0f;
    // popcnt ax, bx
    let e = emulate(
        &[0x66, 0xf3, 0x0f, 0xb8, 0xc3],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 0x1234_5678_9abc_0008);
}

#[test]
fn popcnt_r64_from_extended_registers() {
    let mut st = state64();
    st.regs.r9 = 0xff;
    // popcnt r10, r9 = F3 4D 0F B8 D1
    let e = emulate(
        &[0xf3, 0x4d, 0x0f, 0xb8, 0xd1],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.r10, 8);
}

#[test]
fn popcnt_from_rip_relative_memory() {
    let mut st = state64();
    let mut mem = FakeMem::new();
    // popcnt rcx, [rip+0x10]: 9 bytes, so the operand is at RIP + 9 + 0x10.
    mem.map(RIP64 + 9 + 0x10, &0x0f0f_u64.to_le_bytes());
    let code = [0xf3, 0x48, 0x0f, 0xb8, 0x0d, 0x10, 0x00, 0x00, 0x00];
    let e = emulate(&code, &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rcx, 8);
    assert_eq!(st.regs.rip, RIP64 + 9);
}

#[test]
fn popcnt_from_sib_memory_operand() {
    let mut st = state64();
    st.regs.rbx = 0x10_0000;
    st.regs.rsi = 3;
    let mut mem = FakeMem::new();
    mem.map(0x10_0000 + 3 * 4 + 0x10, &u64::MAX.to_le_bytes());
    // popcnt rax, [rbx+rsi*4+0x10]
    let e = emulate(
        &[0xf3, 0x48, 0x0f, 0xb8, 0x44, 0xb3, 0x10],
        &mut st,
        &mut mem,
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 64);
}

#[test]
fn popcnt_uses_gs_base_but_ignores_ds_base_in_64_bit_mode() {
    let mut st = state64();
    st.sregs.gs.base = 0xffff_8880_0000_0000;
    st.sregs.ds.base = 0x1234_0000;
    let mut mem = FakeMem::new();
    mem.map(0xffff_8880_0000_0100, &7u64.to_le_bytes());
    mem.map(0x100, &1u64.to_le_bytes());
    // popcnt rax, gs:[0x100]
    let code = [
        0x65, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x01, 0x00, 0x00,
    ];
    let e = emulate(&code, &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 3);

    // popcnt rax, ds:[0x100]: DS base is ignored in 64-bit mode.
    let e = emulate(&code[1..], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 1);
}

#[test]
fn popcnt_with_32_bit_address_size_truncates_the_address() {
    let mut st = state64();
    st.regs.rbx = 0xffff_ffff_0000_2000;
    let mut mem = FakeMem::new();
    mem.map(0x2000, &3u32.to_le_bytes());
    // popcnt eax, [ebx] (67 prefix)
    let e = emulate(&[0x67, 0xf3, 0x0f, 0xb8, 0x03], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 2);
}

#[test]
fn non_canonical_address_raises_gp0_or_ss0_for_the_stack() {
    let mut st = state64();
    st.regs.rbx = 0x8000_0000_0000_0000;
    let before = st;
    // popcnt rax, [rbx]
    let e = emulate(
        &[0xf3, 0x48, 0x0f, 0xb8, 0x03],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, injected(vector::GP, Some(0)));
    assert_unchanged(&e, &before, &st);

    st.regs.rsp = 0x0000_8000_0000_0000;
    // ldmxcsr [rsp+8]
    let e = emulate(
        &[0x0f, 0xae, 0x54, 0x24, 0x08],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, injected(vector::SS, Some(0)));
}

#[test]
fn five_level_paging_widens_canonical_addresses() {
    let mut st = state64();
    st.sregs.cr4 |= CR4_LA57;
    st.regs.rbx = 0x00ff_0000_0000_0000;
    let mut mem = FakeMem::new();
    mem.map(st.regs.rbx, &1u64.to_le_bytes());
    let e = emulate(&[0xf3, 0x48, 0x0f, 0xb8, 0x03], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 1);
}

#[test]
fn unmapped_memory_is_a_fault_and_changes_nothing() {
    let mut st = state64();
    st.regs.rbx = 0x9000;
    let before = st;
    let e = emulate(
        &[0xf3, 0x48, 0x0f, 0xb8, 0x03],
        &mut st,
        &mut FakeMem::new(),
    );
    match &e.outcome {
        Outcome::Fault { fault, text, .. } => {
            assert_eq!(fault.gva, 0x9000);
            assert!(!fault.write);
            assert!(text.starts_with("popcnt"), "{text}");
        }
        other => panic!("expected a fault, got {other:?}"),
    }
    assert_unchanged(&e, &before, &st);
}

// ---- 32-bit and 16-bit code --------------------------------------------

#[test]
fn popcnt_in_32_bit_mode_adds_the_segment_base() {
    let mut st = state32();
    st.sregs.ds.base = 0x1000;
    st.regs.rbx = 0x2000;
    st.regs.rax = 0xffff_ffff_ffff_ffff;
    let mut mem = FakeMem::new();
    mem.map(0x3000, &0x7fu32.to_le_bytes());
    // popcnt eax, [ebx]
    let e = emulate(&[0xf3, 0x0f, 0xb8, 0x03], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 7);
    assert_eq!(st.regs.rip, 0x0010_0004);
}

#[test]
fn linear_address_wraps_at_4g_in_32_bit_mode() {
    let mut st = state32();
    st.sregs.ds.base = 0xffff_f000;
    st.regs.rbx = 0x2000;
    let mut mem = FakeMem::new();
    mem.map(0x1000, &1u32.to_le_bytes());
    let e = emulate(&[0xf3, 0x0f, 0xb8, 0x03], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 1);
}

#[test]
fn rex_byte_is_dec_in_32_bit_mode() {
    // In 32-bit mode 0x48 is `dec eax`, not REX.W: not emulated.
    let mut st = state32();
    let e = emulate(&[0x48, 0x0f, 0xb8, 0xc3], &mut st, &mut FakeMem::new());
    assert_unsupported(&e);
    assert_eq!(e.mnemonic, Mnemonic::Dec);
}

#[test]
fn popcnt_in_16_bit_mode_uses_16_bit_operands_and_addressing() {
    let mut st = state16();
    st.sregs.ds.base = 0x1_0000;
    st.regs.rbx = 0xffff;
    st.regs.rsi = 2; // bx+si wraps to 0x0001
    st.regs.rax = 0xaaaa_0000;
    let mut mem = FakeMem::new();
    mem.map(0x1_0001, &0x0303u16.to_le_bytes());
    // popcnt ax, [bx+si]
    let e = emulate(&[0xf3, 0x0f, 0xb8, 0x00], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 0xaaaa_0004);
    assert_eq!(st.regs.rip, 0x1004);

    // With an operand-size prefix: popcnt eax, [bx+si]
    mem.map(0x1_0001, &0x8000_0303u32.to_le_bytes());
    let e = emulate(&[0x66, 0xf3, 0x0f, 0xb8, 0x00], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 5);
}

#[test]
fn popcnt_in_32_bit_mode_with_16_bit_addressing() {
    let mut st = state32();
    st.regs.rbx = 0x1_0010; // only BX = 0x0010 counts
    let mut mem = FakeMem::new();
    mem.map(0x10, &0xffu32.to_le_bytes());
    // popcnt eax, [bx] (67 prefix; ModRM rm=111 is [bx])
    let e = emulate(&[0x67, 0xf3, 0x0f, 0xb8, 0x07], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 8);
}

#[test]
fn ip_wraps_at_64k_in_16_bit_mode() {
    let mut st = state16();
    st.regs.rip = 0xfffe;
    let e = emulate(&[0x0f, 0x01, 0xca], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rip, 0x0001);
}

#[test]
fn vm86_mode_decodes_as_16_bit() {
    let mut st = state32();
    st.regs.rflags |= RFLAGS_VM;
    assert_eq!(bitness(&st), 16);
    assert_eq!(bitness(&state32()), 32);
    assert_eq!(bitness(&state64()), 64);
    assert_eq!(bitness(&state16()), 16);
}

#[test]
fn int3_in_32_bit_mode() {
    let mut st = state32();
    st.regs.rip = 0xffff_ffff;
    let e = emulate(&[0xcc], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::BP, None));
    assert_eq!(st.regs.rip, 0);
}

// ---- movd / movq / pxor ------------------------------------------------

fn xmm(st: &CpuState, i: usize) -> u128 {
    u128::from_le_bytes(st.fpu.xmm[i])
}

fn set_xmm(st: &mut CpuState, i: usize, v: u128) {
    st.fpu.xmm[i] = v.to_le_bytes();
}

#[test]
fn movd_and_movq_gpr_to_xmm_zero_extend() {
    let mut st = state64();
    st.regs.rax = 0x1122_3344_5566_7788;
    set_xmm(&mut st, 0, u128::MAX);
    set_xmm(&mut st, 1, u128::MAX);
    set_xmm(&mut st, 8, u128::MAX);
    let mut mem = FakeMem::new();
    // movd xmm0, eax
    let e = emulate(&[0x66, 0x0f, 0x6e, 0xc0], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Movd);
    assert!(e.modified.fpu && e.modified.regs);
    assert_eq!(xmm(&st, 0), 0x5566_7788);
    // movq xmm1, rax
    let e = emulate(&[0x66, 0x48, 0x0f, 0x6e, 0xc8], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 1), 0x1122_3344_5566_7788);
    // movd xmm8, eax
    let e = emulate(&[0x66, 0x44, 0x0f, 0x6e, 0xc0], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 8), 0x5566_7788);
}

#[test]
fn movd_memory_to_xmm() {
    let mut st = state64();
    st.regs.rdi = 0x4000;
    set_xmm(&mut st, 3, u128::MAX);
    let mut mem = FakeMem::new();
    mem.map(0x4000, &[1, 2, 3, 4, 5, 6, 7, 8]);
    // movd xmm3, [rdi]
    let e = emulate(&[0x66, 0x0f, 0x6e, 0x1f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 3), 0x0403_0201);
}

#[test]
fn movd_and_movq_xmm_to_gpr_and_memory() {
    let mut st = state64();
    set_xmm(&mut st, 1, 0xaaaa_bbbb_cccc_dddd_1111_2222_3333_4444);
    st.regs.rax = u64::MAX;
    // movd eax, xmm1 (zero-extends into RAX)
    let e = emulate(&[0x66, 0x0f, 0x7e, 0xc8], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 0x3333_4444);
    assert!(!e.modified.fpu);
    // movq rax, xmm1
    let e = emulate(
        &[0x66, 0x48, 0x0f, 0x7e, 0xc8],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rax, 0x1111_2222_3333_4444);

    // movd [rdi], xmm1
    st.regs.rdi = 0x6000;
    let mut mem = FakeMem::new();
    mem.map(0x6000, &[0xee; 8]);
    let e = emulate(&[0x66, 0x0f, 0x7e, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(
        mem.get(0x6000, 8),
        [0x44, 0x44, 0x33, 0x33, 0xee, 0xee, 0xee, 0xee]
    );
}

#[test]
fn movq_xmm_from_xmm_or_memory_zeroes_the_upper_half() {
    let mut st = state64();
    set_xmm(&mut st, 1, u128::MAX);
    set_xmm(&mut st, 2, (5u128 << 64) | 6);
    // movq xmm1, xmm2
    let e = emulate(&[0xf3, 0x0f, 0x7e, 0xca], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Movq);
    assert_eq!(xmm(&st, 1), 6);

    st.regs.rdi = 0x4000;
    let mut mem = FakeMem::new();
    mem.map(0x4000, &0x0102_0304_0506_0708u64.to_le_bytes());
    // movq xmm1, [rdi]
    let e = emulate(&[0xf3, 0x0f, 0x7e, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 1), 0x0102_0304_0506_0708);
}

#[test]
fn movq_store_form_to_memory_and_register() {
    let mut st = state64();
    set_xmm(&mut st, 1, (9u128 << 64) | 0x0a0b);
    set_xmm(&mut st, 2, u128::MAX);
    st.regs.rdi = 0x4000;
    let mut mem = FakeMem::new();
    mem.map_zero(0x4000, 16);
    // movq [rdi], xmm1
    let e = emulate(&[0x66, 0x0f, 0xd6, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(mem.get(0x4000, 8), 0x0a0bu64.to_le_bytes());
    // movq xmm2, xmm1 (66 0F D6 /r, register form)
    let e = emulate(&[0x66, 0x0f, 0xd6, 0xca], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 2), 0x0a0b);
}

#[test]
fn pxor_registers_and_aligned_memory() {
    let mut st = state64();
    set_xmm(&mut st, 0, 0x1234);
    // pxor xmm0, xmm0
    let e = emulate(&[0x66, 0x0f, 0xef, 0xc0], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Pxor);
    assert_eq!(xmm(&st, 0), 0);

    set_xmm(&mut st, 1, 0xff00);
    st.regs.rdi = 0x4000;
    let mut mem = FakeMem::new();
    mem.map(0x4000, &0x0ff0u128.to_le_bytes());
    mem.map(0x4008, &[0; 16]);
    // pxor xmm1, [rdi]
    let e = emulate(&[0x66, 0x0f, 0xef, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 1), 0xf0f0);

    // Misaligned: #GP(0)
    st.regs.rdi = 0x4008;
    let before = st;
    let e = emulate(&[0x66, 0x0f, 0xef, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::GP, Some(0)));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn sse_moves_without_osfxsr_raise_ud() {
    let mut st = state64();
    st.sregs.cr4 &= !CR4_OSFXSR;
    let before = st;
    let e = emulate(&[0x66, 0x0f, 0x6e, 0xc0], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::UD, None));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn mmx_movd_is_unsupported() {
    let mut st = state64();
    // movd mm0, eax
    let e = emulate(&[0x0f, 0x6e, 0xc0], &mut st, &mut FakeMem::new());
    assert_unsupported(&e);
}

// ---- cmpxchg8b / cmpxchg16b ------------------------------------------

#[test]
fn cmpxchg16b_equal_stores_rcx_rbx_and_sets_zf() {
    let mut st = state64();
    st.regs.rdi = 0xffff_8880_0000_1000;
    st.regs.rax = 0x1111;
    st.regs.rdx = 0x2222;
    st.regs.rbx = 0x3333;
    st.regs.rcx = 0x4444;
    st.regs.rflags = 0x2 | 1; // CF stays
    let mut mem = FakeMem::new();
    let mut old = 0x1111u64.to_le_bytes().to_vec();
    old.extend_from_slice(&0x2222u64.to_le_bytes());
    mem.map(st.regs.rdi, &old);
    // lock cmpxchg16b [rdi]
    let e = emulate(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Cmpxchg16b);
    assert_eq!(st.regs.rflags, 0x2 | 1 | ZF);
    assert_eq!(st.regs.rax, 0x1111);
    assert_eq!(st.regs.rdx, 0x2222);
    let mut new = 0x3333u64.to_le_bytes().to_vec();
    new.extend_from_slice(&0x4444u64.to_le_bytes());
    assert_eq!(mem.get(st.regs.rdi, 16), new);
    assert_eq!(st.regs.rip, RIP64 + 5);
}

#[test]
fn cmpxchg16b_different_loads_memory_and_clears_zf() {
    let mut st = state64();
    st.regs.rdi = 0x8000;
    st.regs.rax = 1;
    st.regs.rdx = 2;
    st.regs.rbx = 3;
    st.regs.rcx = 4;
    st.regs.rflags = 0x2 | ZF;
    let mut mem = FakeMem::new();
    let mut old = 0xaaaa_aaaa_aaaa_aaaau64.to_le_bytes().to_vec();
    old.extend_from_slice(&0xbbbb_bbbb_bbbb_bbbbu64.to_le_bytes());
    mem.map(0x8000, &old);
    // cmpxchg16b [rdi] without lock
    let e = emulate(&[0x48, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rflags, 0x2);
    assert_eq!(st.regs.rax, 0xaaaa_aaaa_aaaa_aaaa);
    assert_eq!(st.regs.rdx, 0xbbbb_bbbb_bbbb_bbbb);
    assert_eq!(mem.get(0x8000, 16), old);
    assert_eq!(mem.writes, 0);
}

#[test]
fn cmpxchg16b_misaligned_raises_gp0() {
    let mut st = state64();
    st.regs.rdi = 0x8008;
    let mut mem = FakeMem::new();
    mem.map_zero(0x8000, 32);
    let before = st;
    let e = emulate(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, injected(vector::GP, Some(0)));
    assert_unchanged(&e, &before, &st);
    assert_eq!(mem.writes, 0);
}

#[test]
fn cmpxchg8b_equal_and_different() {
    let mut st = state64();
    st.regs.rdi = 0x8004; // 8-byte operand: no alignment requirement
    st.regs.rax = 0xffff_ffff_0000_0001;
    st.regs.rdx = 0xffff_ffff_0000_0002;
    st.regs.rbx = 0x0000_0003;
    st.regs.rcx = 0x0000_0004;
    let mut mem = FakeMem::new();
    mem.map(0x8004, &[1, 0, 0, 0, 2, 0, 0, 0]);
    // lock cmpxchg8b [rdi]
    let e = emulate(&[0xf0, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(e.mnemonic, Mnemonic::Cmpxchg8b);
    assert_eq!(mem.get(0x8004, 8), [3, 0, 0, 0, 4, 0, 0, 0]);
    assert_eq!(st.regs.rflags & ZF, ZF);
    assert_eq!(st.regs.rax, 0xffff_ffff_0000_0001);

    // Now memory holds 3:4, which differs from EDX:EAX = 2:1.
    let e = emulate(&[0xf0, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rflags & ZF, 0);
    assert_eq!(st.regs.rax, 3);
    assert_eq!(st.regs.rdx, 4);
}

#[test]
fn cmpxchg8b_in_32_bit_mode() {
    let mut st = state32();
    st.regs.rsi = 0x100;
    st.regs.rax = 7;
    st.regs.rdx = 0;
    st.regs.rbx = 9;
    st.regs.rcx = 10;
    let mut mem = FakeMem::new();
    mem.map(0x100, &[7, 0, 0, 0, 0, 0, 0, 0]);
    // cmpxchg8b [esi]
    let e = emulate(&[0x0f, 0xc7, 0x0e], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(mem.get(0x100, 8), [9, 0, 0, 0, 10, 0, 0, 0]);
}

#[test]
fn cmpxchg16b_on_unmapped_memory_is_a_fault() {
    let mut st = state64();
    st.regs.rdi = 0x8000;
    let before = st;
    let e = emulate(
        &[0xf0, 0x48, 0x0f, 0xc7, 0x0f],
        &mut st,
        &mut FakeMem::new(),
    );
    assert!(
        matches!(e.outcome, Outcome::Fault { .. }),
        "{:?}",
        e.outcome
    );
    assert_unchanged(&e, &before, &st);
}

/// Memory whose compare-exchange is overridden, as an atomic
/// implementation would be.
struct AtomicMem {
    inner: FakeMem,
    cmpxchg_calls: usize,
}

impl GuestMemory for AtomicMem {
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        self.inner.read_virt(gva, buf)
    }

    fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), MemFault> {
        self.inner.write_virt(gva, buf)
    }

    fn compare_exchange_virt(
        &mut self,
        gva: u64,
        expected: &[u8],
        new: &[u8],
        actual: &mut [u8],
    ) -> Result<bool, MemFault> {
        self.cmpxchg_calls += 1;
        assert_eq!(expected.len(), 16);
        assert_eq!(new.len(), 16);
        self.inner.read_virt(gva, actual)?;
        Ok(false)
    }
}

#[test]
fn cmpxchg16b_goes_through_compare_exchange_virt() {
    let mut st = state64();
    st.regs.rdi = 0x8000;
    let mut mem = AtomicMem {
        inner: FakeMem::new(),
        cmpxchg_calls: 0,
    };
    mem.inner.map(0x8000, &[0x11; 16]);
    let e = emulate(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(mem.cmpxchg_calls, 1);
    assert_eq!(st.regs.rax, 0x1111_1111_1111_1111);
    assert_eq!(st.regs.rflags & ZF, 0);
}

// ---- exceptions ------------------------------------------------------

#[test]
fn xsave_family_raises_ud_without_osxsave() {
    let cases: [&[u8]; 9] = [
        &[0x0f, 0xae, 0x27],       // xsave [rdi]
        &[0x48, 0x0f, 0xae, 0x2f], // xrstor64 [rdi]
        &[0x0f, 0xae, 0x2f],       // xrstor [rdi]
        &[0x0f, 0xc7, 0x1f],       // xrstors [rdi]
        &[0x0f, 0xc7, 0x2f],       // xsaves [rdi]
        &[0x0f, 0xc7, 0x27],       // xsavec [rdi]
        &[0x0f, 0xae, 0x37],       // xsaveopt [rdi]
        &[0x0f, 0x01, 0xd0],       // xgetbv
        &[0x0f, 0x01, 0xd1],       // xsetbv
    ];
    for code in cases {
        let mut st = state64();
        let before = st;
        let e = emulate(code, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, injected(vector::UD, None), "{code:02x?}");
        assert_unchanged(&e, &before, &st);
    }
}

#[test]
fn xsave_family_with_osxsave_is_unsupported() {
    let mut st = state64();
    st.sregs.cr4 |= CR4_OSXSAVE;
    let e = emulate(&[0x0f, 0xae, 0x2f], &mut st, &mut FakeMem::new());
    assert_unsupported(&e);
    assert_eq!(e.mnemonic, Mnemonic::Xrstor);
}

#[test]
fn rdmsr_and_wrmsr_raise_gp0_at_the_instruction() {
    for code in [[0x0f, 0x32], [0x0f, 0x30]] {
        let mut st = state64();
        st.regs.rcx = 0xc001_1029;
        let before = st;
        let e = emulate(&code, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, injected(vector::GP, Some(0)));
        assert_unchanged(&e, &before, &st);
        assert_eq!(st.regs.rip, RIP64);
    }
}

#[test]
fn ud2_raises_ud() {
    let mut st = state64();
    let before = st;
    let e = emulate(&[0x0f, 0x0b], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::UD, None));
    assert_eq!(e.mnemonic, Mnemonic::Ud2);
    assert_unchanged(&e, &before, &st);
}

// ---- unsupported and malformed input -----------------------------------

#[test]
fn other_instructions_are_unsupported_with_their_bytes() {
    let mut st = state64();
    let before = st;
    // mov rax, rbx
    let e = emulate(&[0x48, 0x89, 0xd8, 0x90], &mut st, &mut FakeMem::new());
    match &e.outcome {
        Outcome::Unsupported {
            mnemonic,
            text,
            bytes,
            ..
        } => {
            assert_eq!(mnemonic, "mov");
            assert_eq!(text, "mov rax,rbx");
            assert_eq!(bytes, &[0x48, 0x89, 0xd8]);
        }
        other => panic!("expected unsupported, got {other:?}"),
    }
    assert_unchanged(&e, &before, &st);
    assert_eq!(e.len, 3);
    assert!(e.outcome.to_string().contains("48 89 d8"));
}

#[test]
fn truncated_and_empty_input_is_unsupported() {
    for code in [
        &[][..],
        &[0xf3, 0x48, 0x0f][..],
        &[0x0f, 0xae][..],
        &[0x0f][..],
    ] {
        let mut st = state64();
        let e = emulate(code, &mut st, &mut FakeMem::new());
        assert_unsupported(&e);
        assert_eq!(e.mnemonic, Mnemonic::INVALID);
        assert_eq!(e.len, 0);
        match &e.outcome {
            Outcome::Unsupported { bytes, reason, .. } => {
                assert_eq!(bytes.as_slice(), code);
                assert_eq!(*reason, "truncated instruction");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn garbage_is_unsupported() {
    let cases: [&[u8]; 4] = [
        &[0xf0, 0x0f, 0x01, 0xca], // lock clac
        &[0x0f, 0xc7, 0xc8],       // cmpxchg8b with a register operand
        &[0x06],                   // push es: invalid in 64-bit mode
        &[0xf0; 16],               // prefixes only, too long
    ];
    for code in cases {
        let mut st = state64();
        let e = emulate(code, &mut st, &mut FakeMem::new());
        assert_unsupported(&e);
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut mem = FakeMem::new();
    mem.map_zero(0, 0x100);
    for i in 0..20_000 {
        let mut code = [0u8; 15];
        for b in code.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // Bias towards the opcodes we handle.
        if i % 3 == 0 {
            code[0] = 0x0f;
        }
        let mut st = match i % 3 {
            0 => state64(),
            1 => state32(),
            _ => state16(),
        };
        st.regs.rax = seed;
        st.regs.rsp = seed.rotate_left(7);
        let len = (seed as usize >> 8) % 16;
        let _ = emulate(&code[..len], &mut st, &mut mem);
    }
}

// ---- helpers and stats -----------------------------------------------

#[test]
fn disassemble_and_mnemonic_name() {
    let st = state64();
    assert_eq!(
        disassemble(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], &st),
        "popcnt rax,rbx"
    );
    assert_eq!(disassemble(&[0xf3], &st), "truncated instruction");
    assert_eq!(mnemonic_name(Mnemonic::Cmpxchg16b), "cmpxchg16b");
}

#[test]
fn stats_report_first_sighting_once() {
    let mut stats = Stats::new();
    assert!(stats.record(Mnemonic::Clac));
    assert!(!stats.record(Mnemonic::Clac));
    assert!(stats.record(Mnemonic::Popcnt));
    assert!(!stats.record(Mnemonic::Clac));
    assert_eq!(stats.count(Mnemonic::Clac), 3);
    assert_eq!(stats.count(Mnemonic::Popcnt), 1);
    assert_eq!(stats.count(Mnemonic::Int3), 0);
    assert_eq!(stats.total(), 4);
    assert_eq!(
        stats.summary(),
        vec![("clac".to_owned(), 3), ("popcnt".to_owned(), 1)]
    );
}

#[test]
fn memfault_message_reads_well() {
    let f = FakeMem::fault(0x1000, 8, true, "not mapped");
    assert_eq!(
        f.to_string(),
        "guest write of 8 bytes at 0x1000 failed: not mapped"
    );
}

// ---- near jumps (seen during kernel text patching under kvm_pvm) --------

#[test]
fn near_jumps_set_rip_to_the_target_in_every_mode() {
    // jmp short +0x38 (the bytes kvm_pvm gave up on: eb 38)
    let mut st = state64();
    let e = emulate(&[0xeb, 0x38], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rip, RIP64 + 2 + 0x38);
    // jmp short backwards (-2: to itself)
    let mut st = state64();
    emulate(&[0xeb, 0xfe], &mut st, &mut FakeMem::new());
    assert_eq!(st.regs.rip, RIP64);
    // jmp rel32
    let mut st = state64();
    let e = emulate(
        &[0xe9, 0x00, 0x10, 0x00, 0x00],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(st.regs.rip, RIP64 + 5 + 0x1000);
    // 32-bit mode wraps at 4 GiB
    let mut st = state32();
    st.regs.rip = 0xffff_fff0;
    emulate(&[0xeb, 0x20], &mut st, &mut FakeMem::new());
    assert_eq!(st.regs.rip, 0x12);
    // 16-bit mode wraps at 64 KiB
    let mut st = state16();
    st.regs.rip = 0xfff0;
    emulate(&[0xeb, 0x20], &mut st, &mut FakeMem::new());
    assert_eq!(st.regs.rip, 0x12);
}

// ---- SSE2 packed-integer arithmetic (Debian 6.1 under kvm_pvm) ------------

#[test]
fn paddq_xmm14_xmm15_adds_both_quadwords_with_wraparound() {
    // The bytes kvm_pvm gave up on: paddq xmm14, xmm15 = 66 45 0f d4 f7
    let mut st = state64();
    set_xmm(&mut st, 14, (5u128 << 64) | u128::from(u64::MAX));
    set_xmm(&mut st, 15, (7u128 << 64) | 2);
    let e = emulate(
        &[0x66, 0x45, 0x0f, 0xd4, 0xf7],
        &mut st,
        &mut FakeMem::new(),
    );
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_eq!(xmm(&st, 14), (12u128 << 64) | 1, "low lane wraps, no carry");
    assert_eq!(xmm(&st, 15), (7u128 << 64) | 2, "source untouched");
    assert_eq!(st.regs.rip, RIP64 + 5);
    assert!(e.modified.fpu);
}

#[test]
fn packed_byte_word_dword_add_sub_and_logic() {
    let a: u128 = 0x00ff_00ff_ffff_ffff_0000_0001_8000_0000;
    let b: u128 = 0x0001_0001_0000_0001_ffff_ffff_8000_0000;
    let run = |bytes: &[u8]| {
        let mut st = state64();
        set_xmm(&mut st, 1, a);
        set_xmm(&mut st, 2, b);
        let e = emulate(bytes, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, Outcome::Emulated, "{bytes:02x?}");
        xmm(&st, 1)
    };
    // paddd xmm1, xmm2 (66 0f fe ca): per 32-bit lane, no carries across.
    assert_eq!(
        run(&[0x66, 0x0f, 0xfe, 0xca]),
        0x0100_0100_0000_0000_0000_0000_0000_0000
    );
    // psubb xmm1, xmm2 (66 0f f8 ca)
    assert_eq!(
        run(&[0x66, 0x0f, 0xf8, 0xca]),
        0x00fe_00fe_ffff_fffe_0101_0102_0000_0000
    );
    // pand / por / pandn
    assert_eq!(run(&[0x66, 0x0f, 0xdb, 0xca]), a & b);
    assert_eq!(run(&[0x66, 0x0f, 0xeb, 0xca]), a | b);
    assert_eq!(run(&[0x66, 0x0f, 0xdf, 0xca]), !a & b);
}

#[test]
fn packed_add_with_an_unaligned_memory_source_is_gp0() {
    let mut st = state64();
    st.regs.rax = 0x1001; // paddq xmm0, [rax]
    let before = st;
    let e = emulate(&[0x66, 0x0f, 0xd4, 0x00], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::GP, Some(0)));
    assert_unchanged(&e, &before, &st);
}

#[test]
fn punpck_interleaves_low_and_high_lanes() {
    // a = dwords [a0..a3] = 0x10,0x11,0x12,0x13 ; b = 0x20..0x23
    let a: u128 = 0x13 << 96 | 0x12 << 64 | 0x11 << 32 | 0x10;
    let b: u128 = 0x23 << 96 | 0x22 << 64 | 0x21 << 32 | 0x20;
    let run = |bytes: &[u8]| {
        let mut st = state64();
        set_xmm(&mut st, 4, a);
        set_xmm(&mut st, 5, b);
        let e = emulate(bytes, &mut st, &mut FakeMem::new());
        assert_eq!(e.outcome, Outcome::Emulated, "{bytes:02x?}");
        xmm(&st, 4)
    };
    // punpckldq xmm4, xmm5 (66 0f 62 e5), the bytes Debian 6.1 stopped on
    assert_eq!(
        run(&[0x66, 0x0f, 0x62, 0xe5]),
        0x21 << 96 | 0x11 << 64 | 0x20 << 32 | 0x10
    );
    // punpckhdq xmm4, xmm5 (66 0f 6a e5)
    assert_eq!(
        run(&[0x66, 0x0f, 0x6a, 0xe5]),
        0x23 << 96 | 0x13 << 64 | 0x22 << 32 | 0x12
    );
    // punpcklqdq (66 0f 6c e5) and punpckhqdq (66 0f 6d e5)
    assert_eq!(
        run(&[0x66, 0x0f, 0x6c, 0xe5]),
        (b & u128::from(u64::MAX)) << 64 | (a & u128::from(u64::MAX))
    );
    assert_eq!(run(&[0x66, 0x0f, 0x6d, 0xe5]), (b >> 64) << 64 | (a >> 64));
}

// ---- verw ----------------------------------------------------------------

/// A GDT at `GDT` with: 1 = 64-bit code, 2 = writable data (DPL 0),
/// 3 = read-only data, 4 = writable data DPL 3.
const GDT: u64 = 0xffff_ffff_8200_0000;

fn with_gdt(st: &mut CpuState) -> FakeMem {
    let mut mem = FakeMem::new();
    let mut gdt = vec![0u8; 5 * 8];
    let access = [(1, 0x9b), (2, 0x93), (3, 0x91), (4, 0xf3)];
    for (i, a) in access {
        gdt[i * 8 + 5] = a;
        gdt[i * 8] = 0xff;
        gdt[i * 8 + 1] = 0xff;
    }
    mem.map(GDT, &gdt);
    st.sregs.gdt.base = GDT;
    st.sregs.gdt.limit = (gdt.len() - 1) as u16;
    st.sregs.ldt.unusable = 1;
    mem
}

#[test]
fn verw_sets_zf_only_for_writable_data_segments_it_may_use() {
    // verw [rip+0] reads the selector from the 2 bytes after the instruction;
    // verw ax (0f 00 e8) takes it from a register.
    for (sel, zf) in [
        (0x10u64, true), // writable data, DPL 0
        (0x08, false),   // code
        (0x18, false),   // read-only data
        (0x00, false),   // null
        (0x30, false),   // beyond the GDT limit
        (0x23, true),    // DPL 3, RPL 3
        (0x13, false),   // DPL 0 < RPL 3
        (0x14, false),   // LDT, unusable
    ] {
        let mut st = state64();
        let mut mem = with_gdt(&mut st);
        st.regs.rax = 0xdead_0000 | sel;
        st.regs.rflags = 0x2 | FLAGS_ALL & !ZF | if zf { 0 } else { ZF };
        let e = emulate(&[0x0f, 0x00, 0xe8], &mut st, &mut mem);
        assert_eq!(e.outcome, Outcome::Emulated, "selector {sel:#x}");
        assert_eq!(e.mnemonic, Mnemonic::Verw);
        assert_eq!(st.regs.rflags & ZF != 0, zf, "selector {sel:#x}");
        assert_eq!(
            st.regs.rflags & (FLAGS_ALL & !ZF),
            FLAGS_ALL & !ZF,
            "other flags kept"
        );
        assert_eq!(st.regs.rip, RIP64 + 3);
    }
}

#[test]
fn verw_of_a_memory_operand_and_outside_protected_mode() {
    let mut st = state64();
    let mut mem = with_gdt(&mut st);
    // verw [rip+0]; the selector 0x10 right after the instruction.
    mem.map(RIP64, &[0x0f, 0x00, 0x2d, 0, 0, 0, 0, 0x10, 0x00]);
    let code = mem.get(RIP64, 7);
    let e = emulate(&code, &mut st, &mut mem);
    assert_eq!(e.outcome, Outcome::Emulated);
    assert_ne!(st.regs.rflags & ZF, 0);
    assert_eq!(st.regs.rip, RIP64 + 7);

    let mut st = state16();
    let before = st;
    let e = emulate(&[0x0f, 0x00, 0xe8], &mut st, &mut FakeMem::new());
    assert_eq!(e.outcome, injected(vector::UD, None));
    assert_unchanged(&e, &before, &st);
}
