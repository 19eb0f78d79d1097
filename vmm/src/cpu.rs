//! vCPU set-up: CPUID filtering, MSRs, registers, LAPIC and FPU.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::{BootEntry, EntryMode};
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("setting up vCPU {id}: {what} failed: {source}")]
    Setup {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Which CPUID features to hide from the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// Hide features whose instructions the PVM emulator cannot run
    /// (see design.md): the guest then uses paths that work there.
    pub pvm_compat: bool,
}

mod bits {
    // Leaf 1 ECX
    pub const PCLMUL: u32 = 1 << 1;
    pub const VMX: u32 = 1 << 5;
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const PCID: u32 = 1 << 17;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const AES: u32 = 1 << 25;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const RDRAND: u32 = 1 << 30;
    pub const HYPERVISOR: u32 = 1 << 31;
    // Leaf 7 EBX
    pub const FSGSBASE: u32 = 1 << 0;
    pub const AVX2: u32 = 1 << 5;
    pub const INVPCID: u32 = 1 << 10;
    pub const RDSEED: u32 = 1 << 18;
    pub const SMAP: u32 = 1 << 20;
    pub const AVX512_MASK: u32 = (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31);
    // Leaf 0x8000_0001 ECX
    pub const ABM: u32 = 1 << 5;
    // Leaf 0x4000_0001 EAX (KVM paravirt features)
    pub const KVM_PV_UNHALT: u32 = 1 << 7;
    pub const KVM_PV_SEND_IPI: u32 = 1 << 11;
    pub const KVM_PV_SCHED_YIELD: u32 = 1 << 13;
    pub const SVM: u32 = 1 << 2;
}

/// Filters KVM's supported CPUID for one vCPU: topology, the hypervisor bit,
/// no nested virtualization, and the PVM-compatibility masks when asked.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, vcpus: u8, policy: CpuidPolicy) {
    let pvm = policy.pvm_compat;
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(vcpu_id) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= bits::HYPERVISOR;
                e.ecx &= !bits::VMX;
                if pvm {
                    e.ecx &= !(bits::CX16
                        | bits::XSAVE
                        | bits::OSXSAVE
                        | bits::AVX
                        | bits::FMA
                        | bits::F16C
                        | bits::RDRAND
                        | bits::POPCNT
                        | bits::PCID
                        | bits::MOVBE
                        | bits::AES
                        | bits::PCLMUL);
                }
            }
            7 if e.index == 0 && pvm => {
                e.ebx &= !(bits::SMAP
                    | bits::AVX2
                    | bits::AVX512_MASK
                    | bits::FSGSBASE
                    | bits::INVPCID
                    | bits::RDSEED);
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                // x2APIC topology: the APIC id of this vCPU.
                e.edx = u32::from(vcpu_id);
            }
            0xd if pvm => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // The paravirt features that work by hypercall (VMCALL): kvm_pvm
            // emulates each VMCALL and then a batch of the instructions after
            // it, so a guest using them for every IPI, lock hand-over and
            // yield crawls. Debian 6.1 sat in `kvm_kick_cpu` for minutes,
            // ~600k VMCALLs/s. Native IPIs and spinlocks do not need them.
            0x4000_0001 if pvm => {
                e.eax &= !(bits::KVM_PV_UNHALT | bits::KVM_PV_SEND_IPI | bits::KVM_PV_SCHED_YIELD);
            }
            0x8000_0001 => {
                e.ecx &= !bits::SVM;
                if pvm {
                    e.ecx &= !bits::ABM;
                }
            }
            _ => {}
        }
    }
}

/// Kernel parameters that hide, inside the guest, the features `kvm_pvm`
/// keeps showing through CPUID even when we clear them (XSAVE, AVX, POPCNT,
/// SMAP ...: its CPUID passes most host bits through). Linux's feature
/// numbers are word*32+bit: word 4 is leaf 1 ECX, word 9 is leaf 7 EBX.
/// SSE3/SSSE3/SSE4.1/4.2 (128, 137, 147, 148) too: Debian 6.1 ran a
/// `pshufb` routine kvm_pvm cannot emulate.
/// `nokaslr`: the decompressor's random placement never finished printing
/// under kvm_pvm (Debian 6.1: no output in 3 minutes; with it, at once).
/// `nopvspin`: no paravirt spinlocks even if kvm_pvm shows PV_UNHALT anyway
/// (see `filter_cpuid`).
pub const PVM_CMDLINE: &str =
    "vdso32=0 nokaslr noxsave nopvspin clearcpuid=128,129,137,140,141,147,148,150,151,153,154,156,157,158,288,293,298,304,306,308";

pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Boot-time MSR values (what firmware would leave).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ]
}

fn setup_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Setup { id, what, source }
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts a vCPU in the state the boot protocol expects. Only the boot vCPU
/// (id 0) gets registers; the others wait for INIT/SIPI from the guest.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    entry: Option<BootEntry>,
) -> Result<(), CpuError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(setup_err(id, "KVM_SET_CPUID2"))?;

    let msrs = boot_msrs();
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    if let Ok(m) = Msrs::from_entries(&entries) {
        // Some MSRs are refused by some hosts (PVM); what was set is enough.
        match vcpu.set_msrs(&m) {
            Ok(n) if n < entries.len() => tracing::debug!(
                vcpu = id,
                "host accepted {n} of {} boot MSRs",
                entries.len()
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(vcpu = id, "KVM_SET_MSRS: {e}"),
        }
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup_err(id, "KVM_SET_FPU"))?;

    // LAPIC: LINT0 ExtINT, LINT1 NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(setup_err(id, "KVM_GET_LAPIC"))?;
    let lvt0 = (get_lapic_reg(&lapic.regs, 0x350) & !0x700) | 0x700;
    let lvt1 = (get_lapic_reg(&lapic.regs, 0x360) & !0x700) | 0x400;
    set_lapic_reg(&mut lapic.regs, 0x350, lvt0);
    set_lapic_reg(&mut lapic.regs, 0x360, lvt1);
    vcpu.set_lapic(&lapic)
        .map_err(setup_err(id, "KVM_SET_LAPIC"))?;

    let Some(entry) = entry else {
        return Ok(());
    };
    let mut sregs = vcpu.get_sregs().map_err(setup_err(id, "KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let mut tss = segment(0x20, 11, false);
    tss.s = 0;
    tss.limit = 0xfffff;
    tss.g = 0;
    sregs.tr = tss;
    let regs = match entry.mode {
        EntryMode::Linux64 => {
            let cs = segment(0x10, 11, true);
            let ds = segment(0x18, 3, false);
            sregs.cs = cs;
            sregs.ds = ds;
            sregs.es = ds;
            sregs.fs = ds;
            sregs.gs = ds;
            sregs.ss = ds;
            sregs.cr0 = 0x8000_0031; // PG | ET | NE | PE
            sregs.cr3 = PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.efer = 0x500; // LME | LMA
            kvm_regs {
                rip: entry.entry.0,
                rsi: ZERO_PAGE_START,
                rsp: BOOT_STACK_TOP,
                rbp: BOOT_STACK_TOP,
                rflags: 2,
                ..Default::default()
            }
        }
        EntryMode::Pvh => {
            let cs = segment(0x10, 11, false);
            let ds = segment(0x18, 3, false);
            sregs.cs = cs;
            sregs.ds = ds;
            sregs.es = ds;
            sregs.fs = ds;
            sregs.gs = ds;
            sregs.ss = ds;
            sregs.cr0 = 0x11; // ET | PE
            sregs.cr4 = 0;
            sregs.efer = 0;
            kvm_regs {
                rip: entry.entry.0,
                rbx: PVH_INFO_START,
                rflags: 2,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&sregs)
        .map_err(setup_err(id, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs)
        .map_err(setup_err(id, "KVM_SET_REGS"))?;
    Ok(())
}

fn get_lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = [
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ];
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid_with(entries: &[(u32, u32, u32, u32, u32, u32)]) -> CpuId {
        let v: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|&(function, index, eax, ebx, ecx, edx)| kvm_cpuid_entry2 {
                function,
                index,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&v).unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_and_hypervisor_bit_are_set_per_vcpu() {
        let mut c = cpuid_with(&[(1, 0, 0, 0xffff_ffff, bits::VMX, 0), (0xb, 0, 0, 0, 0, 7)]);
        filter_cpuid(&mut c, 3, 4, CpuidPolicy::default());
        let l1 = leaf(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & bits::HYPERVISOR, 0);
        assert_eq!(l1.ecx & bits::VMX, 0, "no nested VMX");
        assert_eq!(leaf(&c, 0xb, 0).edx, 3);
    }

    #[test]
    fn pvm_policy_hides_unemulated_features_and_keeps_the_rest() {
        let all = 0xffff_ffff;
        let mut c = cpuid_with(&[
            (1, 0, 0, 0, all, all),
            (7, 0, 0, all, all, all),
            (0xd, 0, 7, 1, 2, 3),
            (0x4000_0001, 0, all, 0, 0, 0),
        ]);
        filter_cpuid(&mut c, 0, 1, CpuidPolicy { pvm_compat: true });
        let kvm = leaf(&c, 0x4000_0001, 0).eax;
        assert_eq!(
            kvm & (bits::KVM_PV_UNHALT | bits::KVM_PV_SEND_IPI | bits::KVM_PV_SCHED_YIELD),
            0
        );
        assert_ne!(kvm & 1, 0, "kvm-clock stays");
        let l1 = leaf(&c, 1, 0);
        for b in [
            bits::POPCNT,
            bits::CX16,
            bits::XSAVE,
            bits::OSXSAVE,
            bits::AVX,
            bits::RDRAND,
        ] {
            assert_eq!(l1.ecx & b, 0, "bit {b:#x} still set");
        }
        assert_eq!(
            l1.edx, all,
            "leaf 1 EDX untouched (FPU, SSE, SSE2, APIC ...)"
        );
        let l7 = leaf(&c, 7, 0);
        assert_eq!(l7.ebx & bits::SMAP, 0);
        assert_eq!(l7.ebx & bits::AVX2, 0);
        assert_ne!(l7.ebx & (1 << 7), 0, "SMEP stays");
        assert_eq!(leaf(&c, 0xd, 0).eax, 0, "no XSAVE state components");
    }

    #[test]
    fn default_policy_keeps_host_features() {
        let all = 0xffff_ffff;
        let mut c = cpuid_with(&[
            (1, 0, 0, 0, all & !bits::VMX, all),
            (7, 0, 0, all, all, all),
        ]);
        filter_cpuid(&mut c, 0, 1, CpuidPolicy::default());
        assert_ne!(leaf(&c, 1, 0).ecx & bits::POPCNT, 0);
        assert_eq!(leaf(&c, 7, 0).ebx, all);
    }

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let m = boot_msrs();
        let def = m.iter().find(|(i, _)| *i == MSR_MTRR_DEF_TYPE).unwrap().1;
        assert_eq!(def & 0xff, 6);
        assert_ne!(def & (1 << 11), 0);
    }
}
