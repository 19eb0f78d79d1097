//! Userspace emulation of the instructions that KVM's in-kernel emulator
//! gives up on.
//!
//! Under `kvm_pvm` an unmodified Linux guest is run largely by KVM's
//! instruction emulator, which returns `KVM_EXIT_INTERNAL_ERROR` with
//! suberror 1 (emulation failure) for instructions it does not know:
//! `int3`, `clac`/`stac`, `popcnt`, `fwait`, `ldmxcsr`, `movd` to an xmm
//! register, `lock cmpxchg16b`, the XSAVE family, `rdmsr` of some MSRs, ...
//! The vCPU loop hands the instruction bytes at RIP and the vCPU state to
//! [`emulate`], which applies the instruction's effect (or picks the
//! exception it raises) so that the loop can resume the guest.
//!
//! The module is pure: it knows nothing of KVM ioctls. The caller
//!
//! 1. reads `kvm_regs`, `kvm_sregs` and `kvm_fpu` into a [`CpuState`],
//! 2. fetches up to 15 bytes at CS:RIP,
//! 3. calls [`emulate`] with a [`GuestMemory`] that translates guest-virtual
//!    addresses (`KVM_TRANSLATE` or a page-table walk),
//! 4. writes back what [`Emulation::modified`] flags, and
//! 5. acts on [`Emulation::outcome`]: resume, inject the exception
//!    (`KVM_SET_VCPU_EVENTS`), or stop the VM with the outcome's message.
//!
//! # What is and is not modelled
//!
//! * The code size comes from CS: `L` → 64-bit, else `D/B` → 32-bit, else
//!   16-bit (RFLAGS.VM forces 16-bit).
//! * Memory operands: ModRM/SIB/displacement/RIP-relative addressing with
//!   the operand's segment (override or default), honouring address size.
//!   In 64-bit mode only the FS and GS bases apply and a non-canonical
//!   address raises `#GP(0)` (`#SS(0)` for stack-segment accesses); in the
//!   other modes the segment base is added and the linear address wraps at
//!   4 GiB. Segment limits and access rights are not checked.
//! * A [`MemFault`] from [`GuestMemory`] does **not** become a `#PF`: we
//!   would have to get the error code and CR2 right for every access, so
//!   instead [`Outcome::Fault`] asks the caller to stop the VM with a clear
//!   message. Faults are detected before any register is changed, and every
//!   instruction does its memory writes last, so a fault leaves the vCPU
//!   state untouched.
//! * Privilege checks (CPL) are left out: under `kvm_pvm` the CPL reported
//!   for an unmodified kernel is not trustworthy, and none of the emulated
//!   instructions grants user mode anything it could not do already
//!   (RFLAGS.AC is user-writable with `popf`; `rdmsr`/`wrmsr` always fault).
//! * A single-step trap (RFLAGS.TF) after an emulated instruction is not
//!   delivered; RFLAGS.RF is cleared as the hardware does.
//! * `lock cmpxchg8b/16b` go through [`GuestMemory::compare_exchange_virt`],
//!   whose default implementation is *not* atomic against other vCPUs;
//!   implement it atomically where that matters.

mod ops;
mod stats;
#[cfg(test)]
mod tests;

use std::fmt;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

pub use stats::Stats;

/// Exception vectors used by the emulator.
pub mod vector {
    /// `#DB`, debug.
    pub const DB: u8 = 1;
    /// `#BP`, breakpoint (`int3`).
    pub const BP: u8 = 3;
    /// `#UD`, invalid opcode.
    pub const UD: u8 = 6;
    /// `#NM`, device not available.
    pub const NM: u8 = 7;
    /// `#SS`, stack-segment fault.
    pub const SS: u8 = 12;
    /// `#GP`, general protection.
    pub const GP: u8 = 13;
    /// `#MF`, x87 floating-point error.
    pub const MF: u8 = 16;
}

pub(crate) const RFLAGS_RF: u64 = 1 << 16;
pub(crate) const RFLAGS_VM: u64 = 1 << 17;
pub(crate) const RFLAGS_AC: u64 = 1 << 18;
pub(crate) const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_EM: u64 = 1 << 2;
pub(crate) const CR0_TS: u64 = 1 << 3;
pub(crate) const CR0_NE: u64 = 1 << 5;
pub(crate) const CR4_LA57: u64 = 1 << 12;
pub(crate) const CR4_OSFXSR: u64 = 1 << 9;
pub(crate) const CR4_OSXSAVE: u64 = 1 << 18;

/// The vCPU state the emulator reads and changes, as `KVM_GET_REGS`,
/// `KVM_GET_SREGS` and `KVM_GET_FPU` return it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state: `xmm[0..16]` (little-endian bytes) and `mxcsr`.
    pub fpu: kvm_fpu,
}

/// Which parts of [`CpuState`] [`emulate`] changed, i.e. which of
/// `KVM_SET_REGS`, `KVM_SET_SREGS` and `KVM_SET_FPU` the caller must issue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Modified {
    /// `regs` changed.
    pub regs: bool,
    /// `sregs` changed.
    pub sregs: bool,
    /// `fpu` changed.
    pub fpu: bool,
}

impl Modified {
    /// True when any part changed.
    pub fn any(&self) -> bool {
        self.regs || self.sregs || self.fpu
    }

    fn between(before: &CpuState, after: &CpuState) -> Self {
        Modified {
            regs: before.regs != after.regs,
            sregs: before.sregs != after.sregs,
            fpu: before.fpu != after.fpu,
        }
    }
}

/// A guest-virtual memory access that could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("guest {} of {len} bytes at {gva:#x} failed: {reason}", if *.write { "write" } else { "read" })]
pub struct MemFault {
    /// First guest-virtual address of the access.
    pub gva: u64,
    /// Length of the access in bytes.
    pub len: usize,
    /// Whether the access was a write.
    pub write: bool,
    /// Why it failed (not mapped, read-only, outside guest RAM, ...).
    pub reason: String,
}

/// Guest memory as the emulated instruction sees it: linear
/// (guest-virtual) addresses, translated by the caller with the guest's
/// page tables. An access may cross a page boundary.
pub trait GuestMemory {
    /// Reads `buf.len()` bytes at `gva`.
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault>;

    /// Writes `buf` at `gva`.
    fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), MemFault>;

    /// Compare-and-exchange for `cmpxchg8b`/`cmpxchg16b`: reads the
    /// `expected.len()` bytes at `gva` into `actual`; if they equal
    /// `expected`, stores `new` there and returns `true`, else returns
    /// `false` without storing.
    ///
    /// The default implementation is a plain read followed by a write and
    /// is therefore not atomic with respect to other running vCPUs;
    /// override it with a host atomic where that matters.
    fn compare_exchange_virt(
        &mut self,
        gva: u64,
        expected: &[u8],
        new: &[u8],
        actual: &mut [u8],
    ) -> Result<bool, MemFault> {
        self.read_virt(gva, actual)?;
        if actual == expected {
            self.write_virt(gva, new)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

/// What the caller must do after [`emulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction was executed and RIP advanced: write back the
    /// modified state and resume.
    Emulated,
    /// Inject this exception (`KVM_SET_VCPU_EVENTS`, `exception.injected`)
    /// and resume. RIP is already what the exception expects: past the
    /// instruction for traps (`int3`), at the instruction for faults
    /// (`#GP`, `#UD`, `#NM`, ...), in which case the state is unchanged.
    Inject {
        /// Exception vector, see [`vector`].
        vector: u8,
        /// Error code to push, for the vectors that have one.
        error_code: Option<u32>,
    },
    /// The instruction is not emulated (or the bytes do not decode): stop
    /// the VM. The state is unchanged.
    Unsupported {
        /// Lower-case mnemonic, `"invalid"` when the bytes do not decode.
        mnemonic: String,
        /// The instruction in Intel syntax, or a note on why it did not
        /// decode.
        text: String,
        /// The instruction's bytes (all bytes given when it did not decode).
        bytes: Vec<u8>,
        /// Why it is not emulated.
        reason: &'static str,
    },
    /// A memory access of the instruction failed (the address is not
    /// mapped, not writable, not RAM): stop the VM. No `#PF` is injected,
    /// see the module documentation. The state is unchanged.
    Fault {
        /// Lower-case mnemonic.
        mnemonic: String,
        /// The instruction in Intel syntax.
        text: String,
        /// The instruction's bytes.
        bytes: Vec<u8>,
        /// The failed access.
        fault: MemFault,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Emulated => write!(f, "emulated"),
            Outcome::Inject { vector, error_code } => match error_code {
                Some(code) => write!(f, "inject exception {vector} (error code {code:#x})"),
                None => write!(f, "inject exception {vector}"),
            },
            Outcome::Unsupported {
                text,
                bytes,
                reason,
                ..
            } => write!(
                f,
                "cannot emulate `{text}` [{}]: {reason}",
                hex_bytes(bytes)
            ),
            Outcome::Fault {
                text, bytes, fault, ..
            } => write!(f, "emulating `{text}` [{}]: {fault}", hex_bytes(bytes)),
        }
    }
}

/// The result of [`emulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulation {
    /// What the caller must do next.
    pub outcome: Outcome,
    /// Which parts of the state were changed and must be written back.
    pub modified: Modified,
    /// The decoded mnemonic (`Mnemonic::INVALID` when the bytes did not
    /// decode), for [`Stats`].
    pub mnemonic: Mnemonic,
    /// The instruction's length in bytes (0 when it did not decode).
    pub len: usize,
}

/// How an instruction's semantics ended, before RIP handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Done {
    /// Completed: advance RIP.
    Next,
    /// Completed, then a trap-class exception: advance RIP and inject.
    Trap(u8),
    /// A taken branch: RIP becomes this (un-masked) target.
    Jump(u64),
}

/// Why an instruction's semantics did not complete. Nothing has been
/// written to the state when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fail {
    /// A fault-class exception: RIP stays at the instruction.
    Exception { vector: u8, error_code: Option<u32> },
    /// Guest memory access failed.
    Mem(MemFault),
    /// Not emulated.
    Unsupported(&'static str),
}

impl Fail {
    pub(crate) fn gp0() -> Self {
        Fail::Exception {
            vector: vector::GP,
            error_code: Some(0),
        }
    }

    pub(crate) fn ud() -> Self {
        Fail::Exception {
            vector: vector::UD,
            error_code: None,
        }
    }

    pub(crate) fn exception(vector: u8) -> Self {
        Fail::Exception {
            vector,
            error_code: None,
        }
    }
}

/// The code size the CPU decodes with in this state: 64, 32 or 16.
pub fn bitness(state: &CpuState) -> u32 {
    let cs = &state.sregs.cs;
    if state.regs.rflags & RFLAGS_VM != 0 {
        16
    } else if cs.l != 0 {
        64
    } else if cs.db != 0 {
        32
    } else {
        16
    }
}

/// Disassembles the instruction at RIP (Intel syntax), for log messages.
pub fn disassemble(code: &[u8], state: &CpuState) -> String {
    match decode(code, state) {
        Ok(instr) => instr.to_string(),
        Err(e) => e.to_owned(),
    }
}

/// The lower-case name of a mnemonic, e.g. `"popcnt"`.
pub fn mnemonic_name(mnemonic: Mnemonic) -> String {
    format!("{mnemonic:?}").to_lowercase()
}

fn decode(code: &[u8], state: &CpuState) -> Result<Instruction, &'static str> {
    let mut decoder =
        Decoder::try_with_ip(bitness(state), code, state.regs.rip, DecoderOptions::NONE)
            .map_err(|_| "decoder rejected the code size")?;
    let instr = decoder.decode();
    match decoder.last_error() {
        DecoderError::None if !instr.is_invalid() => Ok(instr),
        DecoderError::NoMoreBytes => Err("truncated instruction"),
        _ => Err("invalid instruction encoding"),
    }
}

/// Emulates the instruction at `state.regs.rip`, whose bytes (up to 15,
/// fetched at CS:RIP) are `code`.
///
/// On [`Outcome::Emulated`] and trap-class [`Outcome::Inject`] the state
/// holds the result; on every other outcome it is left as it was, and
/// guest memory was not written.
pub fn emulate(code: &[u8], state: &mut CpuState, mem: &mut dyn GuestMemory) -> Emulation {
    let instr = match decode(code, state) {
        Ok(instr) => instr,
        Err(reason) => {
            let len = code.len().min(15);
            return Emulation {
                outcome: Outcome::Unsupported {
                    mnemonic: "invalid".to_owned(),
                    text: reason.to_owned(),
                    bytes: code[..len].to_vec(),
                    reason,
                },
                modified: Modified::default(),
                mnemonic: Mnemonic::INVALID,
                len: 0,
            };
        }
    };
    let len = instr.len();
    let bytes = || code[..len.min(code.len())].to_vec();

    let mut work = *state;
    let bitness = bitness(state);
    let result = {
        let mut ctx = Ctx {
            instr: &instr,
            st: &mut work,
            mem,
            bitness,
        };
        ops::execute(&mut ctx)
    };

    let outcome = match result {
        Ok(done) => {
            let next = match done {
                Done::Jump(target) => target,
                _ => work.regs.rip.wrapping_add(len as u64),
            };
            work.regs.rip = mask_ip(next, bitness);
            work.regs.rflags &= !RFLAGS_RF;
            match done {
                Done::Next | Done::Jump(_) => Outcome::Emulated,
                Done::Trap(vector) => Outcome::Inject {
                    vector,
                    error_code: None,
                },
            }
        }
        Err(Fail::Exception { vector, error_code }) => {
            work = *state;
            Outcome::Inject { vector, error_code }
        }
        Err(Fail::Mem(fault)) => {
            work = *state;
            Outcome::Fault {
                mnemonic: mnemonic_name(instr.mnemonic()),
                text: instr.to_string(),
                bytes: bytes(),
                fault,
            }
        }
        Err(Fail::Unsupported(reason)) => {
            work = *state;
            Outcome::Unsupported {
                mnemonic: mnemonic_name(instr.mnemonic()),
                text: instr.to_string(),
                bytes: bytes(),
                reason,
            }
        }
    };
    let modified = Modified::between(state, &work);
    *state = work;
    Emulation {
        outcome,
        modified,
        mnemonic: instr.mnemonic(),
        len,
    }
}

fn mask_ip(ip: u64, bitness: u32) -> u64 {
    match bitness {
        64 => ip,
        32 => ip & 0xffff_ffff,
        _ => ip & 0xffff,
    }
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One instruction being emulated: operand access helpers over the working
/// copy of the state.
pub(crate) struct Ctx<'a> {
    pub(crate) instr: &'a Instruction,
    pub(crate) st: &'a mut CpuState,
    pub(crate) mem: &'a mut dyn GuestMemory,
    pub(crate) bitness: u32,
}

impl Ctx<'_> {
    /// The 64-bit register slot for a GPR number in x86 encoding order
    /// (0 = RAX, 1 = RCX, ..., 15 = R15).
    fn gpr_slot(regs: &mut kvm_regs, number: usize) -> Option<&mut u64> {
        Some(match number {
            0 => &mut regs.rax,
            1 => &mut regs.rcx,
            2 => &mut regs.rdx,
            3 => &mut regs.rbx,
            4 => &mut regs.rsp,
            5 => &mut regs.rbp,
            6 => &mut regs.rsi,
            7 => &mut regs.rdi,
            8 => &mut regs.r8,
            9 => &mut regs.r9,
            10 => &mut regs.r10,
            11 => &mut regs.r11,
            12 => &mut regs.r12,
            13 => &mut regs.r13,
            14 => &mut regs.r14,
            15 => &mut regs.r15,
            _ => return None,
        })
    }

    /// Where a GPR of any size lives: (x86 number of its 64-bit register,
    /// size in bytes, whether it is a high-byte register AH/CH/DH/BH).
    fn gpr_location(reg: Register) -> Option<(usize, usize, bool)> {
        if !reg.is_gpr() {
            return None;
        }
        let high = matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        );
        let full = reg.full_register();
        let number = (full as usize).checked_sub(Register::RAX as usize)?;
        if number > 15 {
            return None;
        }
        Some((number, reg.size(), high))
    }

    /// Reads a GPR of any size, zero-extended.
    pub(crate) fn gpr(&self, reg: Register) -> Result<u64, Fail> {
        let (number, size, high) =
            Self::gpr_location(reg).ok_or(Fail::Unsupported("unexpected register operand"))?;
        let mut regs = self.st.regs;
        let value = *Self::gpr_slot(&mut regs, number)
            .ok_or(Fail::Unsupported("unexpected register operand"))?;
        Ok(match (size, high) {
            (1, true) => (value >> 8) & 0xff,
            (size, _) => value & size_mask(size),
        })
    }

    /// Writes a GPR of any size with the architectural rules: 32-bit writes
    /// zero the upper half, 8/16-bit writes keep the other bits.
    pub(crate) fn set_gpr(&mut self, reg: Register, value: u64) -> Result<(), Fail> {
        let (number, size, high) =
            Self::gpr_location(reg).ok_or(Fail::Unsupported("unexpected register operand"))?;
        let slot = Self::gpr_slot(&mut self.st.regs, number)
            .ok_or(Fail::Unsupported("unexpected register operand"))?;
        *slot = match (size, high) {
            (8, _) => value,
            (4, _) => value & 0xffff_ffff,
            (1, true) => (*slot & !0xff00) | ((value & 0xff) << 8),
            (size, _) => (*slot & !size_mask(size)) | (value & size_mask(size)),
        };
        Ok(())
    }

    fn xmm_index(reg: Register) -> Result<usize, Fail> {
        if !reg.is_xmm() {
            return Err(Fail::Unsupported("unexpected register operand"));
        }
        let index = (reg as usize).wrapping_sub(Register::XMM0 as usize);
        if index < 16 {
            Ok(index)
        } else {
            Err(Fail::Unsupported("xmm16-31 are not available"))
        }
    }

    /// Reads an xmm register as a little-endian 128-bit value.
    pub(crate) fn xmm(&self, reg: Register) -> Result<u128, Fail> {
        let index = Self::xmm_index(reg)?;
        Ok(u128::from_le_bytes(self.st.fpu.xmm[index]))
    }

    /// Writes an xmm register.
    pub(crate) fn set_xmm(&mut self, reg: Register, value: u128) -> Result<(), Fail> {
        let index = Self::xmm_index(reg)?;
        self.st.fpu.xmm[index] = value.to_le_bytes();
        Ok(())
    }

    fn segment(&self, reg: Register) -> Option<&kvm_segment> {
        let s = &self.st.sregs;
        Some(match reg {
            Register::ES => &s.es,
            Register::CS => &s.cs,
            Register::SS => &s.ss,
            Register::DS => &s.ds,
            Register::FS => &s.fs,
            Register::GS => &s.gs,
            _ => return None,
        })
    }

    /// The base the CPU adds for a segment in the current mode.
    fn segment_base(&self, reg: Register) -> Option<u64> {
        let base = self.segment(reg)?.base;
        if self.bitness == 64 && !matches!(reg, Register::FS | Register::GS) {
            Some(0)
        } else {
            Some(base)
        }
    }

    /// The linear address of memory operand `op` for an access of `len`
    /// bytes, with the canonical check of 64-bit mode.
    pub(crate) fn linear_address(&mut self, op: u32, len: usize) -> Result<u64, Fail> {
        if self.instr.op_kind(op) != OpKind::Memory {
            return Err(Fail::Unsupported("expected a memory operand"));
        }
        let instr = self.instr;
        let address = instr
            .virtual_address(op, 0, |reg, _, _| {
                if reg.is_segment_register() {
                    self.segment_base(reg)
                } else {
                    self.gpr(reg).ok()
                }
            })
            .ok_or(Fail::Unsupported(
                "cannot compute the memory operand's address",
            ))?;
        if self.bitness != 64 {
            return Ok(address & 0xffff_ffff);
        }
        let last = address.wrapping_add(len.saturating_sub(1) as u64);
        if self.is_canonical(address) && self.is_canonical(last) {
            Ok(address)
        } else if instr.memory_segment() == Register::SS {
            Err(Fail::Exception {
                vector: vector::SS,
                error_code: Some(0),
            })
        } else {
            Err(Fail::gp0())
        }
    }

    fn is_canonical(&self, address: u64) -> bool {
        let bits = if self.st.sregs.cr4 & CR4_LA57 != 0 {
            57
        } else {
            48
        };
        let shift = 64 - bits;
        (((address << shift) as i64) >> shift) as u64 == address
    }

    pub(crate) fn read_mem(&mut self, address: u64, buf: &mut [u8]) -> Result<(), Fail> {
        self.mem.read_virt(address, buf).map_err(Fail::Mem)
    }

    pub(crate) fn write_mem(&mut self, address: u64, buf: &[u8]) -> Result<(), Fail> {
        self.mem.write_virt(address, buf).map_err(Fail::Mem)
    }

    /// Reads `size` (1, 2, 4 or 8) bytes of memory operand `op`.
    pub(crate) fn read_mem_operand(&mut self, op: u32, size: usize) -> Result<u64, Fail> {
        let address = self.linear_address(op, size)?;
        let mut buf = [0u8; 8];
        let dst = buf
            .get_mut(..size)
            .ok_or(Fail::Unsupported("unexpected operand size"))?;
        self.read_mem(address, dst)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Reads a GPR or memory operand of `size` bytes, zero-extended.
    pub(crate) fn read_rm(&mut self, op: u32, size: usize) -> Result<u64, Fail> {
        match self.instr.op_kind(op) {
            OpKind::Register => Ok(self.gpr(self.instr.op_register(op))? & size_mask(size)),
            OpKind::Memory => self.read_mem_operand(op, size),
            _ => Err(Fail::Unsupported("unexpected operand kind")),
        }
    }

    /// Writes the low `size` bytes of `value` to a GPR or memory operand.
    pub(crate) fn write_rm(&mut self, op: u32, size: usize, value: u64) -> Result<(), Fail> {
        match self.instr.op_kind(op) {
            OpKind::Register => self.set_gpr(self.instr.op_register(op), value),
            OpKind::Memory => {
                let address = self.linear_address(op, size)?;
                let bytes = value.to_le_bytes();
                let src = bytes
                    .get(..size)
                    .ok_or(Fail::Unsupported("unexpected operand size"))?;
                self.write_mem(address, src)
            }
            _ => Err(Fail::Unsupported("unexpected operand kind")),
        }
    }
}

/// Mask of the low `size` bytes.
pub(crate) fn size_mask(size: usize) -> u64 {
    match size {
        0 => 0,
        1..=7 => (1u64 << (size * 8)) - 1,
        _ => u64::MAX,
    }
}
