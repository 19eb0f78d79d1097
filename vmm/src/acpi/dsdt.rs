//! The DSDT: `\_S5_` and the `\_SB_` devices.
//!
//! ```text
//! Name (\_S5_, Package (4) { 5, 0, 0, 0 })       // SLP_TYPa = 5
//! Scope (\_SB_) {
//!   Device (COM1) { _HID PNP0501, _UID 0, _CRS { IO (0x3f8, 0x3f8, 1, 8), Interrupt {4} } }
//!   Device (PS2_) { _HID PNP0303, _CRS { IO (0x60..), IO (0x64..), Interrupt {1} } }
//!   Device (PEVT) { _HID "QEMU0001", _UID 0, _CRS { IO (0x505, 0x505, 1, 1) } }
//!   Device (VR00) { _HID "LNRO0005", _UID 0, _CCA 1,
//!                   _CRS { Memory32Fixed (RW, base, size), Interrupt {gsi} } }
//!   Device (GED_) { _HID "ACPI0013", _UID 0, _CRS { Interrupt {gsi} },
//!                   Method (_EVT, 1) { Notify (\_SB_.PWRB, 0x80) } }
//!   Device (PWRB) { _HID PNP0C0C, _UID 0 }
//! }
//! ```
//!
//! Every `Interrupt` is an Extended Interrupt descriptor: consumer, edge
//! triggered, active high, exclusive; its number is a GSI (IOAPIC pin).
//!
//! Who binds what in Linux: `PNP0501` and `PNP0303` are on the ACPI PnP list
//! (8250_pnp, i8042 PnP probing); every other `_HID` becomes a platform
//! device whose resources come from `_CRS`: `LNRO0005` ↔ virtio_mmio's ACPI
//! id table (`platform_get_resource(MEM, 0)`, `platform_get_irq(0)`),
//! `QEMU0001` ↔ pvpanic-mmio (`platform_get_mem_or_io(0)`: an I/O port
//! resource works), `ACPI0013` ↔ drivers/acpi/evged.c (calls `_EVT(gsi)` on
//! the interrupt), `PNP0C0C` ↔ the ACPI button driver (`KEY_POWER` on 0x80).

use super::{
    AcpiConfig, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_GSI, OEM_ID, OEM_REVISION,
    POWER_BUTTON_NOTIFY, S5_SLEEP_TYPE,
};
use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Method, Name, Notify, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

/// DSDT revision 2: AML integers are 64-bit.
const DSDT_REVISION: u8 = 2;

/// `COM1`..`COM4` for index 0..4.
pub(super) fn serial_name(index: usize) -> String {
    format!("COM{}", index + 1)
}

/// `VR00`..`VRFF` for index 0..256.
pub(super) fn virtio_name(index: usize) -> String {
    format!("VR{index:02X}")
}

/// An interrupt as every device here takes it: consumer, edge, active high,
/// exclusive.
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// The complete DSDT (header included). `cfg` must have been validated
/// (names are 4 characters only for the counts `validate` allows).
pub(super) fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();

    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    Name::new(Path::new("\\_S5_"), &s5).to_aml_bytes(&mut body);

    let mut devices = Vec::new();
    for (i, &(port, irq)) in cfg.serial.iter().enumerate() {
        serial(i, port, irq, &mut devices);
    }
    if cfg.i8042 {
        i8042(&mut devices);
    }
    if let Some(port) = cfg.pvpanic_port {
        pvpanic(port, &mut devices);
    }
    for (i, slot) in cfg.virtio_mmio.iter().enumerate() {
        // `validate` checked base + size <= 4 GiB, so both fit in u32.
        let base = u32::try_from(slot.base).unwrap_or(u32::MAX);
        let size = u32::try_from(slot.size).unwrap_or(u32::MAX);
        virtio_mmio(i, base, size, slot.gsi, &mut devices);
    }
    if let Some(gsi) = cfg.power_button_gsi {
        power_button(gsi, &mut devices);
    }
    if !devices.is_empty() {
        body.extend_from_slice(&Scope::raw(Path::new("\\_SB_"), devices));
    }

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"RUSTDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

fn serial(index: usize, port: u16, irq: u32, sink: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &(index as u64));
    let io = IO::new(port, port, 1, 8);
    let int = edge_interrupt(irq);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &int]));
    Device::new(Path::new(&serial_name(index)), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn i8042(sink: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0303"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let data = IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let command = IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let int = edge_interrupt(I8042_GSI);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&data, &command, &int]),
    );
    Device::new(Path::new("PS2_"), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn pvpanic(port: u16, sink: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let uid = Name::new(Path::new("_UID"), &0u8);
    let io = IO::new(port, port, 1, 1);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io]));
    Device::new(Path::new("PEVT"), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

fn virtio_mmio(index: usize, base: u32, size: u32, gsi: u32, sink: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &(index as u64));
    // DMA is cache coherent (x86 Linux assumes so without _CCA; say it).
    let cca = Name::new(Path::new("_CCA"), &1u8);
    let mem = Memory32Fixed::new(true, base, size);
    let int = edge_interrupt(gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&mem, &int]));
    Device::new(Path::new(&virtio_name(index)), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(sink);
}

fn power_button(gsi: u32, sink: &mut Vec<u8>) {
    let hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let uid = Name::new(Path::new("_UID"), &0u8);
    let int = edge_interrupt(gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&int]));
    // The GED has a single event source, so _EVT ignores Arg0 (the GSI).
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &POWER_BUTTON_NOTIFY);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&notify]);
    Device::new(Path::new("GED_"), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);

    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    Device::new(Path::new("PWRB"), vec![&hid, &uid]).to_aml_bytes(sink);
}
