//! Instruction semantics.
//!
//! Each handler checks everything that can fail (exceptions, memory reads)
//! before it changes anything, and does its memory write, if any, last:
//! a failed handler leaves guest memory untouched, and [`super::emulate`]
//! discards its register changes.

use iced_x86::{Code, OpKind};

use super::{
    vector, Ctx, Done, Fail, CR0_EM, CR0_MP, CR0_NE, CR0_TS, CR4_OSFXSR, CR4_OSXSAVE, RFLAGS_AC,
};

/// MXCSR bits that `ldmxcsr` may set (MXCSR_MASK of current CPUs); setting
/// any other bit raises `#GP(0)`.
pub(crate) const MXCSR_MASK: u32 = 0xffff;

/// x87 status word: exception summary (an unmasked exception is pending).
const FSW_ES: u16 = 1 << 7;

const FLAG_CF: u64 = 1 << 0;
const FLAG_PF: u64 = 1 << 2;
const FLAG_AF: u64 = 1 << 4;
const FLAG_ZF: u64 = 1 << 6;
const FLAG_SF: u64 = 1 << 7;
const FLAG_OF: u64 = 1 << 11;

/// Executes the decoded instruction on the context's working state.
pub(crate) fn execute(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    match ctx.instr.code() {
        Code::Int3 => Ok(Done::Trap(vector::BP)),
        Code::Clac => {
            ctx.st.regs.rflags &= !RFLAGS_AC;
            Ok(Done::Next)
        }
        Code::Stac => {
            ctx.st.regs.rflags |= RFLAGS_AC;
            Ok(Done::Next)
        }
        Code::Wait => fwait(ctx),
        // Seen under kvm_pvm while another vCPU patched nearby kernel text
        // (jump labels): a near jump's only effect is the new RIP.
        Code::Jmp_rel8_16
        | Code::Jmp_rel8_32
        | Code::Jmp_rel8_64
        | Code::Jmp_rel16
        | Code::Jmp_rel32_32
        | Code::Jmp_rel32_64 => Ok(Done::Jump(ctx.instr.near_branch_target())),
        Code::Ldmxcsr_m32 => ldmxcsr(ctx),
        Code::Stmxcsr_m32 => stmxcsr(ctx),
        Code::Popcnt_r16_rm16 => popcnt(ctx, 2),
        Code::Popcnt_r32_rm32 => popcnt(ctx, 4),
        Code::Popcnt_r64_rm64 => popcnt(ctx, 8),
        Code::Movd_xmm_rm32 => mov_gpr_to_xmm(ctx, 4),
        Code::Movq_xmm_rm64 => mov_gpr_to_xmm(ctx, 8),
        Code::Movd_rm32_xmm => mov_xmm_to_gpr(ctx, 4),
        Code::Movq_rm64_xmm => mov_xmm_to_gpr(ctx, 8),
        Code::Movq_xmm_xmmm64 => movq_load(ctx),
        Code::Movq_xmmm64_xmm => movq_store(ctx),
        Code::Pxor_xmm_xmmm128 => packed(ctx, |a, b| a ^ b),
        // SSE2 packed-integer arithmetic and logic: kvm_pvm gave up on
        // `paddq xmm14, xmm15` while Debian 6.1 booted.
        Code::Pand_xmm_xmmm128 => packed(ctx, |a, b| a & b),
        Code::Pandn_xmm_xmmm128 => packed(ctx, |a, b| !a & b),
        Code::Por_xmm_xmmm128 => packed(ctx, |a, b| a | b),
        Code::Paddb_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 8, u64::wrapping_add)),
        Code::Paddw_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 16, u64::wrapping_add)),
        Code::Paddd_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 32, u64::wrapping_add)),
        Code::Paddq_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 64, u64::wrapping_add)),
        Code::Psubb_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 8, u64::wrapping_sub)),
        Code::Psubw_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 16, u64::wrapping_sub)),
        Code::Psubd_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 32, u64::wrapping_sub)),
        Code::Psubq_xmm_xmmm128 => packed(ctx, |a, b| lanes(a, b, 64, u64::wrapping_sub)),
        Code::Punpcklbw_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 8, false)),
        Code::Punpcklwd_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 16, false)),
        Code::Punpckldq_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 32, false)),
        Code::Punpcklqdq_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 64, false)),
        Code::Punpckhbw_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 8, true)),
        Code::Punpckhwd_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 16, true)),
        Code::Punpckhdq_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 32, true)),
        Code::Punpckhqdq_xmm_xmmm128 => packed(ctx, |a, b| unpack(a, b, 64, true)),
        Code::Cmpxchg8b_m64 => cmpxchg_double(ctx, 4),
        Code::Cmpxchg16b_m128 => cmpxchg_double(ctx, 8),
        Code::Xsave_mem
        | Code::Xsave64_mem
        | Code::Xsavec_mem
        | Code::Xsavec64_mem
        | Code::Xsaveopt_mem
        | Code::Xsaveopt64_mem
        | Code::Xsaves_mem
        | Code::Xsaves64_mem
        | Code::Xrstor_mem
        | Code::Xrstor64_mem
        | Code::Xrstors_mem
        | Code::Xrstors64_mem
        | Code::Xgetbv
        | Code::Xsetbv => xsave_family(ctx),
        // The kernel reads and writes MSRs it is unsure of with the `_safe`
        // variants, which have exception fixups; KVM already handled every
        // MSR it knows before giving up.
        Code::Rdmsr | Code::Wrmsr => Err(Fail::gp0()),
        // Linux's MDS/TSA mitigation (`x86_clear_cpu_buffers`: `verw` of
        // __KERNEL_DS on every return to user space); Debian 6.12 stopped on
        // it under kvm_pvm.
        Code::Verw_rm16 | Code::Verw_r32m16 | Code::Verw_r64m16 => verw(ctx),
        Code::Ud2
        | Code::Ud0
        | Code::Ud0_r16_rm16
        | Code::Ud0_r32_rm32
        | Code::Ud0_r64_rm64
        | Code::Ud1_r16_rm16
        | Code::Ud1_r32_rm32
        | Code::Ud1_r64_rm64 => Err(Fail::ud()),
        // No architectural effect an emulator can observe.
        Code::Nopw
        | Code::Nopd
        | Code::Nopq
        | Code::Nop_rm16
        | Code::Nop_rm32
        | Code::Nop_rm64
        | Code::Pause
        | Code::Endbr32
        | Code::Endbr64
        | Code::Lfence
        | Code::Mfence
        | Code::Sfence
        | Code::Prefetch_m8
        | Code::Prefetchw_m8
        | Code::Prefetchnta_m8
        | Code::Prefetcht0_m8
        | Code::Prefetcht1_m8
        | Code::Prefetcht2_m8 => Ok(Done::Next),
        _ => Err(Fail::Unsupported(
            "instruction not implemented by the userspace emulator",
        )),
    }
}

/// The checks of legacy SSE instructions: `#UD` unless SSE is enabled
/// (CR0.EM clear, CR4.OSFXSR set), `#NM` while CR0.TS is set.
fn check_sse(ctx: &Ctx<'_>) -> Result<(), Fail> {
    let sregs = &ctx.st.sregs;
    if sregs.cr0 & CR0_EM != 0 || sregs.cr4 & CR4_OSFXSR == 0 {
        return Err(Fail::ud());
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Err(Fail::exception(vector::NM));
    }
    Ok(())
}

/// `fwait`: `#NM` when CR0.MP and CR0.TS are set; `#MF` when an unmasked
/// x87 exception is pending and CR0.NE selects native error reporting;
/// otherwise nothing.
fn fwait(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    let cr0 = ctx.st.sregs.cr0;
    if cr0 & CR0_MP != 0 && cr0 & CR0_TS != 0 {
        return Err(Fail::exception(vector::NM));
    }
    if ctx.st.fpu.fsw & FSW_ES != 0 && cr0 & CR0_NE != 0 {
        return Err(Fail::exception(vector::MF));
    }
    Ok(Done::Next)
}

fn ldmxcsr(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = ctx.read_mem_operand(0, 4)? as u32;
    if value & !MXCSR_MASK != 0 {
        return Err(Fail::gp0());
    }
    ctx.st.fpu.mxcsr = value;
    Ok(Done::Next)
}

fn stmxcsr(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = u64::from(ctx.st.fpu.mxcsr);
    ctx.write_rm(0, 4, value)?;
    Ok(Done::Next)
}

/// `popcnt r, r/m` of `size` bytes: ZF iff the source is zero; CF, PF, AF,
/// SF and OF cleared.
fn popcnt(ctx: &mut Ctx<'_>, size: usize) -> Result<Done, Fail> {
    let source = ctx.read_rm(1, size)?;
    ctx.set_gpr(ctx.instr.op0_register(), u64::from(source.count_ones()))?;
    let rflags = &mut ctx.st.regs.rflags;
    *rflags &= !(FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF);
    if source == 0 {
        *rflags |= FLAG_ZF;
    }
    Ok(Done::Next)
}

/// `verw r/m16`: ZF = whether the selector names a writable data segment
/// the current privilege level may use (descriptor read from the GDT or
/// LDT); other flags are kept. `#UD` outside protected mode. The
/// micro-architectural buffer clearing that kernels use it for has no
/// meaning here: it happens on the host's own transitions.
fn verw(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    const CR0_PE: u64 = 1;
    if ctx.st.sregs.cr0 & CR0_PE == 0 || ctx.st.regs.rflags & super::RFLAGS_VM != 0 {
        return Err(Fail::ud());
    }
    let selector = ctx.read_rm(0, 2)? as u16;
    let writable = writable_data_segment(ctx, selector)?;
    let rflags = &mut ctx.st.regs.rflags;
    if writable {
        *rflags |= FLAG_ZF;
    } else {
        *rflags &= !FLAG_ZF;
    }
    Ok(Done::Next)
}

/// The `verw` checks for one selector: not null, inside its descriptor
/// table's limit, a data segment (S=1, not code) with the writable bit, and
/// DPL ≥ max(CPL, RPL).
fn writable_data_segment(ctx: &mut Ctx<'_>, selector: u16) -> Result<bool, Fail> {
    if selector & !3 == 0 {
        return Ok(false);
    }
    let sregs = &ctx.st.sregs;
    let (base, limit) = if selector & 4 != 0 {
        if sregs.ldt.unusable != 0 || sregs.ldt.present == 0 {
            return Ok(false);
        }
        (sregs.ldt.base, u64::from(sregs.ldt.limit))
    } else {
        (sregs.gdt.base, u64::from(sregs.gdt.limit))
    };
    let offset = u64::from(selector & !7);
    if offset + 7 > limit {
        return Ok(false);
    }
    let cpl = sregs.cs.selector & 3;
    let mut descriptor = [0u8; 8];
    ctx.read_mem(base.wrapping_add(offset), &mut descriptor)?;
    let access = descriptor[5];
    let (s, code, write) = (access & 0x10 != 0, access & 0x08 != 0, access & 0x02 != 0);
    let dpl = u16::from((access >> 5) & 3);
    Ok(s && !code && write && dpl >= cpl && dpl >= (selector & 3))
}

/// `movd xmm, r/m32` / `movq xmm, r/m64`: zero-extends into the xmm
/// register.
fn mov_gpr_to_xmm(ctx: &mut Ctx<'_>, size: usize) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = ctx.read_rm(1, size)?;
    ctx.set_xmm(ctx.instr.op0_register(), u128::from(value))?;
    Ok(Done::Next)
}

/// `movd r/m32, xmm` / `movq r/m64, xmm`: the low dword/qword of the xmm
/// register (a 32-bit GPR destination zero-extends).
fn mov_xmm_to_gpr(ctx: &mut Ctx<'_>, size: usize) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = ctx.xmm(ctx.instr.op1_register())? as u64;
    ctx.write_rm(0, size, value)?;
    Ok(Done::Next)
}

/// `movq xmm1, xmm2/m64` (F3 0F 7E): the low qword, upper qword zeroed.
fn movq_load(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = match ctx.instr.op1_kind() {
        OpKind::Register => ctx.xmm(ctx.instr.op1_register())? as u64,
        _ => ctx.read_mem_operand(1, 8)?,
    };
    ctx.set_xmm(ctx.instr.op0_register(), u128::from(value))?;
    Ok(Done::Next)
}

/// `movq xmm2/m64, xmm1` (66 0F D6): stores the low qword; an xmm
/// destination gets its upper qword zeroed.
fn movq_store(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let value = ctx.xmm(ctx.instr.op1_register())? as u64;
    match ctx.instr.op0_kind() {
        OpKind::Register => ctx.set_xmm(ctx.instr.op0_register(), u128::from(value))?,
        _ => {
            let address = ctx.linear_address(0, 8)?;
            ctx.write_mem(address, &value.to_le_bytes())?;
        }
    }
    Ok(Done::Next)
}

/// The low `bits` (8 to 64) bits of a u128.
fn lane_mask(bits: u32) -> u128 {
    u128::from(u64::MAX >> (64 - bits))
}

/// Applies `f` lane by lane: lanes of `bits` bits, each computed in a u64
/// and truncated back to its width.
fn lanes(a: u128, b: u128, bits: u32, f: fn(u64, u64) -> u64) -> u128 {
    let mask = lane_mask(bits);
    let mut out = 0u128;
    let mut shift = 0;
    while shift < 128 {
        let x = ((a >> shift) & mask) as u64;
        let y = ((b >> shift) & mask) as u64;
        out |= (u128::from(f(x, y)) & mask) << shift;
        shift += bits;
    }
    out
}

/// `punpckl*`/`punpckh*`: interleaves the low (or high) half's lanes of
/// `a` (destination) and `b` (source): a0 b0 a1 b1 ...
fn unpack(a: u128, b: u128, bits: u32, high: bool) -> u128 {
    let mask = lane_mask(bits);
    let base = if high { 64 } else { 0 };
    let mut out = 0u128;
    for i in 0..(64 / bits) {
        let from = base + i * bits;
        out |= ((a >> from) & mask) << (2 * i * bits);
        out |= ((b >> from) & mask) << ((2 * i + 1) * bits);
    }
    out
}

/// A two-operand SSE2 packed-integer instruction `xmm, xmm/m128`:
/// dest = f(dest, source); a memory source must be 16-byte aligned.
fn packed(ctx: &mut Ctx<'_>, f: impl Fn(u128, u128) -> u128) -> Result<Done, Fail> {
    check_sse(ctx)?;
    let source = match ctx.instr.op1_kind() {
        OpKind::Register => ctx.xmm(ctx.instr.op1_register())?,
        _ => {
            let address = ctx.linear_address(1, 16)?;
            if address % 16 != 0 {
                return Err(Fail::gp0());
            }
            let mut buf = [0u8; 16];
            ctx.read_mem(address, &mut buf)?;
            u128::from_le_bytes(buf)
        }
    };
    let dest = ctx.instr.op0_register();
    let value = f(ctx.xmm(dest)?, source);
    ctx.set_xmm(dest, value)?;
    Ok(Done::Next)
}

/// `cmpxchg8b m64` (`half` = 4) and `cmpxchg16b m128` (`half` = 8):
/// compares rDX:rAX with the memory operand; if equal, stores rCX:rBX
/// there and sets ZF, else loads it into rDX:rAX and clears ZF. Other
/// flags are unchanged. `cmpxchg16b` needs a 16-byte aligned operand.
fn cmpxchg_double(ctx: &mut Ctx<'_>, half: usize) -> Result<Done, Fail> {
    let len = half * 2;
    let address = ctx.linear_address(0, len)?;
    if half == 8 && address % 16 != 0 {
        return Err(Fail::gp0());
    }
    let (rax, rdx, rbx, rcx) = {
        let r = &ctx.st.regs;
        (r.rax, r.rdx, r.rbx, r.rcx)
    };
    let mut expected = [0u8; 16];
    let mut new = [0u8; 16];
    expected[..half].copy_from_slice(&rax.to_le_bytes()[..half]);
    expected[half..len].copy_from_slice(&rdx.to_le_bytes()[..half]);
    new[..half].copy_from_slice(&rbx.to_le_bytes()[..half]);
    new[half..len].copy_from_slice(&rcx.to_le_bytes()[..half]);
    let mut actual = [0u8; 16];
    let equal = ctx
        .mem
        .compare_exchange_virt(address, &expected[..len], &new[..len], &mut actual[..len])
        .map_err(Fail::Mem)?;
    if equal {
        ctx.st.regs.rflags |= FLAG_ZF;
    } else {
        ctx.st.regs.rflags &= !FLAG_ZF;
        let mut low = [0u8; 8];
        let mut high = [0u8; 8];
        low[..half].copy_from_slice(&actual[..half]);
        high[..half].copy_from_slice(&actual[half..len]);
        // A 32-bit result (cmpxchg8b) zero-extends into RAX/RDX.
        ctx.st.regs.rax = u64::from_le_bytes(low);
        ctx.st.regs.rdx = u64::from_le_bytes(high);
    }
    Ok(Done::Next)
}

/// XSAVE family and `xgetbv`/`xsetbv`. With CR4.OSXSAVE clear (we hide
/// XSAVE in CPUID, so a guest never sets it) the CPU raises `#UD`, which
/// is what we inject. With CR4.OSXSAVE set the guest expects the real
/// instruction, whose XCR0 and extended state this emulator cannot reach;
/// faking `#UD` there would leave the kernel in FPU-restore fixup loops, so
/// we report it as unsupported.
fn xsave_family(ctx: &mut Ctx<'_>) -> Result<Done, Fail> {
    if ctx.st.sregs.cr4 & CR4_OSXSAVE == 0 {
        Err(Fail::ud())
    } else {
        Err(Fail::Unsupported(
            "XSAVE is enabled in the guest (CR4.OSXSAVE) but not emulated; hide XSAVE in CPUID",
        ))
    }
}
