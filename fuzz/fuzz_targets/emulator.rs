//! The PVM fallback instruction emulator (`vmm::emulate::emulate`) on
//! arbitrary instruction bytes (often behind the opcode of an instruction
//! it emulates), arbitrary vCPU state and a sparse fake guest memory.
//!
//! Checks the contract in `vmm/src/emulate/mod.rs`: on `Unsupported`,
//! `Fault` and fault-class `Inject` the state is unchanged, nothing is
//! flagged modified and guest memory was not written; `Fault` carries the
//! very access the memory refused; `modified` flags exactly the parts that
//! changed; an emulated instruction clears RFLAGS.RF, has a length of 1 to
//! 15 bytes within the bytes given and leaves RIP inside the code size;
//! bytes that do not decode report length 0.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vmm::emulate::{
    bitness, disassemble, emulate, vector, CpuState, GuestMemory, MemFault, Modified, Outcome,
};

const PAGE: u64 = 4096;
const RFLAGS_RF: u64 = 1 << 16;

/// Opcode bytes of the instructions the emulator implements (the fuzzer
/// supplies ModRM, SIB, displacement and the rest).
const LEADS: &[&[u8]] = &[
    &[0xcc],                   // int3
    &[0x0f, 0x01, 0xca],       // clac
    &[0x0f, 0x01, 0xcb],       // stac
    &[0x9b],                   // fwait
    &[0xeb],                   // jmp rel8
    &[0xe9],                   // jmp rel32
    &[0x66, 0xe9],             // jmp rel16
    &[0x0f, 0xae],             // ldmxcsr/stmxcsr/xsave/xrstor/xsaveopt/fences
    &[0x48, 0x0f, 0xae],       // xsave64/xrstor64
    &[0xf3, 0x0f, 0xb8],       // popcnt
    &[0x66, 0xf3, 0x0f, 0xb8], // popcnt r16
    &[0xf3, 0x48, 0x0f, 0xb8], // popcnt r64
    &[0x66, 0x0f, 0x6e],       // movd xmm, r/m32
    &[0x66, 0x48, 0x0f, 0x6e], // movq xmm, r/m64
    &[0x66, 0x0f, 0x7e],       // movd r/m32, xmm
    &[0x66, 0x48, 0x0f, 0x7e], // movq r/m64, xmm
    &[0xf3, 0x0f, 0x7e],       // movq xmm, xmm/m64
    &[0x66, 0x0f, 0xd6],       // movq xmm/m64, xmm
    &[0x66, 0x0f, 0xef],       // pxor
    &[0x66, 0x0f, 0xdb],       // pand
    &[0x66, 0x0f, 0xdf],       // pandn
    &[0x66, 0x0f, 0xeb],       // por
    &[0x66, 0x0f, 0xfc],       // paddb
    &[0x66, 0x0f, 0xfd],       // paddw
    &[0x66, 0x0f, 0xfe],       // paddd
    &[0x66, 0x0f, 0xd4],       // paddq
    &[0x66, 0x0f, 0xf8],       // psubb
    &[0x66, 0x0f, 0xf9],       // psubw
    &[0x66, 0x0f, 0xfa],       // psubd
    &[0x66, 0x0f, 0xfb],       // psubq
    &[0x66, 0x0f, 0x60],       // punpcklbw
    &[0x66, 0x0f, 0x61],       // punpcklwd
    &[0x66, 0x0f, 0x62],       // punpckldq
    &[0x66, 0x0f, 0x6c],       // punpcklqdq
    &[0x66, 0x0f, 0x68],       // punpckhbw
    &[0x66, 0x0f, 0x69],       // punpckhwd
    &[0x66, 0x0f, 0x6a],       // punpckhdq
    &[0x66, 0x0f, 0x6d],       // punpckhqdq
    &[0x0f, 0xc7],             // cmpxchg8b, xsavec, xsaves, xrstors
    &[0xf0, 0x0f, 0xc7],       // lock cmpxchg8b
    &[0xf0, 0x48, 0x0f, 0xc7], // lock cmpxchg16b
    &[0x0f, 0x01, 0xd0],       // xgetbv
    &[0x0f, 0x01, 0xd1],       // xsetbv
    &[0x0f, 0x32],             // rdmsr
    &[0x0f, 0x30],             // wrmsr
    &[0x0f, 0x00],             // verw (/5)
    &[0x0f, 0x0b],             // ud2
    &[0x0f, 0xb9],             // ud1
    &[0x0f, 0xff],             // ud0
    &[0x0f, 0x1f],             // nop r/m
    &[0xf3, 0x90],             // pause
    &[0xf3, 0x0f, 0x1e, 0xfa], // endbr64
    &[0x0f, 0x18],             // prefetch
    &[0x0f, 0x0d],             // prefetchw
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    Long,
    /// 32-bit code segment (compatibility or protected mode).
    Code32,
    Code16,
    /// RFLAGS.VM set.
    Vm86,
    /// Whatever the fuzzer put in CS.
    Raw {
        l: bool,
        db: bool,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Anchor {
    Gpr(u8),
    Rip,
    FsBase,
    GsBase,
    Abs(u64),
}

#[derive(Arbitrary, Debug)]
struct Page {
    anchor: Anchor,
    /// Pages from the anchor's page.
    delta: i8,
    writable: bool,
    fill: u8,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mode: Mode,
    lead: Option<u8>,
    code: Vec<u8>,
    gprs: [u64; 16],
    small_gprs: bool,
    rip: u64,
    rflags: u64,
    cr0: Option<u64>,
    cr4: Option<u64>,
    efer: u64,
    seg_bases: [u64; 6],
    xmm: Vec<[u8; 16]>,
    mxcsr: Option<u32>,
    fsw: u16,
    fcw: u16,
    pages: Vec<Page>,
}

/// Sparse pages; every access is all or nothing.
struct FakeMem {
    pages: BTreeMap<u64, (Box<[u8; PAGE as usize]>, bool)>,
    writes: usize,
    last_fault: Option<MemFault>,
}

impl FakeMem {
    fn check(&mut self, gva: u64, len: usize, write: bool) -> Result<(), MemFault> {
        let fault = |reason: &str| MemFault {
            gva,
            len,
            write,
            reason: reason.to_owned(),
        };
        let last = gva.checked_add(len.saturating_sub(1) as u64);
        let Some(last) = last else {
            return Err(fault("wraps"));
        };
        let mut page = gva / PAGE;
        while len > 0 && page <= last / PAGE {
            match self.pages.get(&page) {
                None => return Err(fault("not mapped")),
                Some((_, false)) if write => return Err(fault("read-only")),
                Some(_) => {}
            }
            page += 1;
        }
        Ok(())
    }

    fn record(&mut self, r: Result<(), MemFault>) -> Result<(), MemFault> {
        if let Err(f) = &r {
            self.last_fault = Some(f.clone());
        }
        r
    }
}

impl GuestMemory for FakeMem {
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let r = self.check(gva, buf.len(), false);
        self.record(r)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gva + i as u64;
            *b = self.pages[&(a / PAGE)].0[(a % PAGE) as usize];
        }
        Ok(())
    }

    fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), MemFault> {
        let r = self.check(gva, buf.len(), true);
        self.record(r)?;
        for (i, b) in buf.iter().enumerate() {
            let a = gva + i as u64;
            if let Some((p, _)) = self.pages.get_mut(&(a / PAGE)) {
                p[(a % PAGE) as usize] = *b;
            }
        }
        self.writes += 1;
        Ok(())
    }
}

fn segment(base: u64, l: bool, db: bool) -> kvm_bindings::kvm_segment {
    kvm_bindings::kvm_segment {
        base,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: db.into(),
        s: 1,
        l: l.into(),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn state(input: &Input) -> CpuState {
    let mut st = CpuState::default();
    let g = |i: usize| {
        let v = input.gprs[i];
        if input.small_gprs {
            v & 0xffff
        } else {
            v
        }
    };
    let r = &mut st.regs;
    (r.rax, r.rcx, r.rdx, r.rbx) = (g(0), g(1), g(2), g(3));
    (r.rsp, r.rbp, r.rsi, r.rdi) = (g(4), g(5), g(6), g(7));
    (r.r8, r.r9, r.r10, r.r11) = (g(8), g(9), g(10), g(11));
    (r.r12, r.r13, r.r14, r.r15) = (g(12), g(13), g(14), g(15));
    r.rip = input.rip;
    r.rflags = (input.rflags | 0x2) & !(1 << 17);
    let (l, db) = match input.mode {
        Mode::Long => (true, false),
        Mode::Code32 => (false, true),
        Mode::Code16 | Mode::Vm86 => (false, false),
        Mode::Raw { l, db } => (l, db),
    };
    if matches!(input.mode, Mode::Vm86) {
        r.rflags |= 1 << 17;
    }
    let b = input.seg_bases;
    let s = &mut st.sregs;
    s.cs = segment(b[0], l, db);
    s.ds = segment(b[1], false, true);
    s.es = segment(b[2], false, true);
    s.ss = segment(b[3], false, true);
    s.fs = segment(b[4], false, true);
    s.gs = segment(b[5], false, true);
    s.cr0 = input.cr0.unwrap_or(0x8005_0033);
    s.cr4 = input.cr4.unwrap_or(0x0004_0620);
    s.efer = input.efer;
    for (x, v) in st.fpu.xmm.iter_mut().zip(&input.xmm) {
        *x = *v;
    }
    st.fpu.mxcsr = input.mxcsr.unwrap_or(0x1f80);
    st.fpu.fsw = input.fsw;
    st.fpu.fcw = input.fcw;
    st
}

fn memory(input: &Input, st: &CpuState) -> FakeMem {
    let mut mem = FakeMem {
        pages: BTreeMap::new(),
        writes: 0,
        last_fault: None,
    };
    for p in input.pages.iter().take(16) {
        let anchor = match p.anchor {
            Anchor::Gpr(i) => input.gprs[usize::from(i % 16)],
            Anchor::Rip => st.regs.rip.wrapping_add(st.sregs.cs.base),
            Anchor::FsBase => st.sregs.fs.base,
            Anchor::GsBase => st.sregs.gs.base,
            Anchor::Abs(a) => a,
        };
        let page = (anchor / PAGE).wrapping_add_signed(i64::from(p.delta));
        let mut data = Box::new([p.fill; PAGE as usize]);
        let n = p.bytes.len().min(PAGE as usize);
        data[..n].copy_from_slice(&p.bytes[..n]);
        mem.pages.insert(page, (data, p.writable));
    }
    mem
}

fn snapshot(mem: &FakeMem) -> Vec<(u64, Vec<u8>)> {
    mem.pages
        .iter()
        .map(|(k, (p, _))| (*k, p.to_vec()))
        .collect()
}

fuzz_target!(|input: Input| {
    let mut code = Vec::new();
    if let Some(i) = input.lead {
        code.extend_from_slice(LEADS[usize::from(i) % LEADS.len()]);
    }
    code.extend_from_slice(&input.code[..input.code.len().min(20)]);
    let before = state(&input);
    let mut st = before;
    let mut mem = memory(&input, &st);
    let mem_before = snapshot(&mem);
    let _ = disassemble(&code, &st);

    let e = emulate(&code, &mut st, &mut mem);
    let _ = e.outcome.to_string();

    let changed = Modified {
        regs: st.regs != before.regs,
        sregs: st.sregs != before.sregs,
        fpu: st.fpu != before.fpu,
    };
    assert_eq!(e.modified, changed, "modified flags for {:?}", e.outcome);
    let untouched = |what: &str, st: &CpuState, mem: &FakeMem| {
        assert!(*st == before, "{what} changed the state");
        assert_eq!(mem.writes, 0, "{what} wrote guest memory");
        assert!(snapshot(mem) == mem_before, "{what} changed guest memory");
    };
    match &e.outcome {
        Outcome::Emulated => {
            assert_eq!(st.regs.rflags & RFLAGS_RF, 0, "RF left set");
        }
        Outcome::Inject { vector, .. } if *vector == vector::BP => {}
        Outcome::Inject { .. } => untouched("a fault-class exception", &st, &mem),
        Outcome::Unsupported { mnemonic, .. } => {
            untouched("an unsupported instruction", &st, &mem);
            if mnemonic == "invalid" {
                assert_eq!(e.len, 0);
            }
        }
        Outcome::Fault { fault, .. } => {
            untouched("a failed access", &st, &mem);
            assert_eq!(
                Some(fault),
                mem.last_fault.as_ref(),
                "fault not from memory"
            );
        }
    }
    if matches!(
        e.outcome,
        Outcome::Emulated | Outcome::Inject { vector: 3, .. }
    ) {
        assert!(
            (1..=15).contains(&e.len) && e.len <= code.len(),
            "length {}",
            e.len
        );
        let width = bitness(&before);
        if width < 64 {
            assert!(
                st.regs.rip < 1 << width,
                "rip {:#x} in {width}-bit code",
                st.regs.rip
            );
        }
    }
});
