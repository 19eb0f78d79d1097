//! The fixed parts of the guest platform that are not devices: ACPI tables
//! and the host checks (PVM detection).

use std::path::Path;

use devices::legacy::acpi_pm::{RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT};
use devices::legacy::pvpanic::PVPANIC_PORT;
use devices::legacy::serial::{COM1_BASE, COM1_IRQ};
use devices::virtio::GuestMemoryMmap;
use vm_memory::GuestAddress;

use crate::acpi::{self, AcpiConfig, PmRegisters, VirtioMmioSlot};
use crate::layout;
use crate::machine::MachineError;

/// GSI of the ACPI power button (GED); ISA IRQ 3 is free without COM2.
pub const POWER_BUTTON_GSI: u32 = 3;

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

/// Writes the ACPI tables for this boot (RSDP at `rsdp`, the rest after it
/// inside the BIOS area).
pub fn write_acpi(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[VirtioMmioSlot],
    rsdp: GuestAddress,
) -> Result<(), MachineError> {
    let cfg = AcpiConfig {
        vcpus,
        virtio_mmio: virtio.to_vec(),
        pvpanic_port: Some(PVPANIC_PORT as u16),
        serial: vec![(COM1_BASE as u16, COM1_IRQ)],
        pm: PmRegisters {
            sleep_control_port: SLEEP_CONTROL_PORT as u16,
            sleep_status_port: SLEEP_STATUS_PORT as u16,
            reset_port: RESET_PORT as u16,
            reset_value: RESET_VALUE,
        },
        i8042: true,
        power_button_gsi: Some(POWER_BUTTON_GSI),
    };
    acpi::create_acpi_tables(mem, rsdp, GuestAddress(layout::BIOS_END), &cfg)
        .map(|_| ())
        .map_err(|e| MachineError::Device(format!("ACPI tables: {e}")))
}
