//! KVM's part of a snapshot: each vCPU's architectural state and the VM's
//! in-kernel devices (PIC, IOAPIC, PIT, kvmclock), read and written in the
//! orders KVM needs (as Firecracker does, for the same reasons, noted at
//! each step).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM call that failed while saving or restoring state.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct KvmStateError {
    pub what: String,
    pub source: kvm_ioctls::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    let what = what.into();
    move |source| KvmStateError { what, source }
}

/// One vCPU as KVM keeps it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// The TSC frequency the guest calibrated against (None: KVM did not say).
    pub tsc_khz: Option<u32>,
    /// Every MSR KVM lists that this vCPU let us read, in index order (so
    /// the TSC comes before the TSC deadline that is relative to it).
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// Reads a paused vCPU's state. `msr_index` is KVM's MSR list
/// (`KVM_GET_MSR_INDEX_LIST`); `cpuid` what the VMM gave the vCPU (not
/// KVM_GET_CPUID2's answer, which kvm_pvm fills in with more).
pub fn save_vcpu(
    fd: &VcpuFd,
    msr_index: &[u32],
    cpuid: Vec<kvm_cpuid_entry2>,
) -> Result<VcpuState, KvmStateError> {
    // KVM_GET_MP_STATE first: it lets the LAPIC accept pending INIT/SIPI
    // events, which changes the state the other calls return.
    let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
    let msrs = read_msrs(fd, msr_index)?;
    // Last: the other reads may still settle a pending event.
    let events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
    tracing::debug!(
        "vCPU saved at rip {:#x} (rax {:#x}, mp_state {})",
        regs.rip,
        regs.rax,
        mp_state.mp_state
    );
    Ok(VcpuState {
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        msrs,
        events,
        cpuid,
    })
}

/// KVM_GET_MSRS stops at the first MSR it cannot read and says how many it
/// did: keep those, skip that one, go on from the next.
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| KvmStateError {
            what: format!("MSR list: {e:?}"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // Skip the one that failed (if any) and go on.
        let used = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[used.min(rest.len())..];
    }
    Ok(out)
}

/// Writes a saved state into a fresh vCPU (created, not yet run).
pub fn restore_vcpu(fd: &VcpuFd, id: u8, s: &VcpuState) -> Result<(), KvmStateError> {
    let at = |what: &str| format!("vCPU {id}: {what}");
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| KvmStateError {
        what: at(&format!("CPUID: {e:?}")),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    // CPUID first: it decides which of the later state KVM accepts.
    fd.set_cpuid2(&cpuid).map_err(err(at("KVM_SET_CPUID2")))?;
    if let Some(khz) = s.tsc_khz {
        // The guest calibrated its clocks against this frequency; a host
        // whose TSC runs otherwise scales it (where the CPU can).
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!("vCPU {id}: cannot set the guest's TSC to {khz} kHz: {e}");
            }
        }
    }
    fd.set_mp_state(s.mp_state)
        .map_err(err(at("KVM_SET_MP_STATE")))?;
    fd.set_regs(&s.regs).map_err(err(at("KVM_SET_REGS")))?;
    // SREGS before the MSRs (EFER) and the LAPIC (its base).
    fd.set_sregs(&s.sregs).map_err(err(at("KVM_SET_SREGS")))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (4 KiB region), the size
    // KVM_SET_XSAVE reads; it came from KVM_GET_XSAVE on a vCPU of the same
    // CPUID (checked before restore), and KVM validates its contents.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(err(at("KVM_SET_XSAVE")))?;
    fd.set_xcrs(&s.xcrs).map_err(err(at("KVM_SET_XCRS")))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(err(at("KVM_SET_DEBUGREGS")))?;
    fd.set_lapic(&s.lapic).map_err(err(at("KVM_SET_LAPIC")))?;
    write_msrs(fd, id, &s.msrs)?;
    // Last: a pending exception or interrupt goes in on top of the rest.
    fd.set_vcpu_events(&s.events)
        .map_err(err(at("KVM_SET_VCPU_EVENTS")))?;
    Ok(())
}

/// KVM_SET_MSRS stops at the first MSR it refuses: note it, go on.
fn write_msrs(fd: &VcpuFd, id: u8, all: &[kvm_msr_entry]) -> Result<(), KvmStateError> {
    let mut rest = all;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk).map_err(|e| KvmStateError {
            what: format!("vCPU {id}: MSR list: {e:?}"),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd
            .set_msrs(&msrs)
            .map_err(err(format!("vCPU {id}: KVM_SET_MSRS")))?;
        if let Some(refused) = chunk.get(n) {
            tracing::warn!(
                "vCPU {id}: this host refused MSR {:#x} (left at its reset value)",
                refused.index
            );
        }
        let used = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[used.min(rest.len())..];
    }
    Ok(())
}

/// The VM's in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(err(format!("KVM_GET_IRQCHIP {chip_id}")))?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, KvmStateError> {
    let mut clock = vm.get_clock().map_err(err("KVM_GET_CLOCK"))?;
    // Only the clock's value is kept (see `restore_vm`).
    clock.flags = 0;
    Ok(VmKvmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Into a VM whose irqchip and PIT exist (before its vCPUs run).
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), KvmStateError> {
    for (want, chip) in [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic_slave),
        (KVM_IRQCHIP_IOAPIC, &s.ioapic),
    ] {
        if chip.chip_id != want {
            return Err(KvmStateError {
                what: format!("irqchip {want}: saved as chip {}", chip.chip_id),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        vm.set_irqchip(chip)
            .map_err(err(format!("KVM_SET_IRQCHIP {want}")))?;
    }
    vm.set_pit2(&s.pit).map_err(err("KVM_SET_PIT2"))?;
    // The value alone: KVM_CLOCK_TSC_STABLE is KVM's to decide, and with
    // KVM_CLOCK_REALTIME a newer kernel would move the clock on by the
    // wall time since the snapshot while the TSC MSRs go back to theirs
    // (an older one refuses the flag). So, as for a pause, the guest's
    // clocks stand still while it was saved; its NTP puts the wall clock
    // right.
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    Ok(())
}

/// CPUID bits the guest saw that this host's KVM does not offer: one line
/// per leaf register, empty when the guest can run here.
pub fn missing_cpu_features(saw: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    // The feature leaves: what software tests before it uses an
    // instruction. Other leaves (topology, cache sizes, brand) may differ.
    const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];
    let mut missing = Vec::new();
    for &(function, index) in FEATURE_LEAVES {
        // A leaf without KVM_CPUID_FLAG_SIGNIFCANT_INDEX has one entry,
        // whatever its index field says.
        let is = |e: &&kvm_cpuid_entry2| {
            e.function == function
                && (e.index == index || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        };
        let Some(s) = saw.iter().find(is) else {
            continue;
        };
        let h = host.iter().find(is);
        let hregs = h.map_or([0; 4], |h| [h.eax, h.ebx, h.ecx, h.edx]);
        let sregs = [s.eax, s.ebx, s.ecx, s.edx];
        for (i, name) in ["eax", "ebx", "ecx", "edx"].iter().enumerate() {
            // Leaf 1's EBX is APIC ids and counts, and EAX of 1 and 7.0
            // the family/model and the max subleaf: not feature bits.
            if (function == 1 && i != 2 && i != 3) || (function == 7 && index == 0 && i == 0) {
                continue;
            }
            let lacking = sregs[i] & !hregs[i];
            if lacking != 0 {
                missing.push(format!(
                    "leaf {function:#x}.{index} {name} bits {lacking:#x}"
                ));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            // As KVM marks them: leaves 7 and 0xd have subleaves.
            flags: if matches!(function, 7 | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn a_host_offering_every_feature_the_guest_saw_is_compatible() {
        let saw = [leaf(1, 0, [0x806f8, 0x0001_0800, 0b1010, 0b1])];
        let host = [leaf(1, 0, [0x906a0, 0x0203_0800, 0b1110, 0b11])];
        assert!(missing_cpu_features(&saw, &host).is_empty());
    }

    #[test]
    fn a_host_lacking_a_feature_the_guest_saw_is_named() {
        let saw = [leaf(7, 0, [0, 1 << 5, 0, 0])];
        let host = [leaf(7, 0, [0, 0, 0, 0])];
        assert_eq!(
            missing_cpu_features(&saw, &host),
            vec!["leaf 0x7.0 ebx bits 0x20".to_string()]
        );
        assert_eq!(missing_cpu_features(&saw, &[]).len(), 1);
    }
}
