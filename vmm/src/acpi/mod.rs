//! ACPI tables for the x86_64 guest.
//!
//! [`create_acpi_tables`] writes, from `rsdp_addr` on (each table 8-byte
//! aligned, all inside `[rsdp_addr, region_end)`):
//!
//! ```text
//! RSDP (rev 2) ──> XSDT ──┬──> FADT ──(X_DSDT)──> DSDT
//!                         └──> MADT
//! ```
//!
//! The DSDT is reached only through the FADT's `X_DSDT`, never listed in the
//! XSDT (ACPI 6.5 §5.2.8: the XSDT lists every table *except* the DSDT).
//!
//! # Platform model: ACPI hardware-reduced
//!
//! The FADT sets `HW_REDUCED_ACPI`: there is no PM1 event/control block, no
//! PM timer, no GPE block, no SCI and no FACS. What Linux does with that
//! (arch/x86/kernel/acpi/boot.c, drivers/acpi/acpica):
//!
//! * `acpi_generic_reduced_hw_init()` sets `legacy_pic = &null_legacy_pic`
//!   and skips `x86_init.timers.timer_init` (no PIT/HPET clockevent): the
//!   8259 is never probed or used, all interrupts go through the IOAPIC.
//!   With no legacy PIC `nr_legacy_irqs()` is 0, so ISA IRQs are *not*
//!   identity-mapped: a device only gets its interrupt through its `_CRS`
//!   (that is why COM1 and the i8042 are described in the DSDT).
//! * No SCI handler is installed and no SCI interrupt override is faked.
//! * Power-off uses `acpi_hw_extended_sleep()`: it writes `WAK_STS` (0x80) to
//!   the sleep *status* register, then `(SLP_TYP << 2) | SLP_EN` to the sleep
//!   *control* register, then spins until `WAK_STS` reads back set. With
//!   `\_S5_` = 5 the control byte is [`S5_SLEEP_CONTROL_VALUE`] (0x34).
//!   Linux only offers ACPI power-off if both registers have a non-zero
//!   address, which [`create_acpi_tables`] enforces.
//! * Reboot tries `acpi_reboot()` first (FADT `RESET_REG_SUP` + `RESET_REG`
//!   in I/O space: one `outb(reset_value, reset_port)`), then the keyboard
//!   controller (0x64 ← 0xFE).
//! * FADT IA-PC boot flags: VGA not present, MSI not supported, PCIe ASPM
//!   controls off, CMOS RTC not present (Linux then registers no `rtc_cmos`
//!   platform device; wall-clock time comes from kvmclock), and "8042" only
//!   when [`AcpiConfig::i8042`] is set: without it Linux marks the i8042
//!   firmware-absent and the i8042 driver gives up at once instead of
//!   probing ports.
//!
//! # Constants chosen
//!
//! | what                        | value                                     |
//! |-----------------------------|-------------------------------------------|
//! | `\_S5_` SLP_TYPa            | [`S5_SLEEP_TYPE`] = 5                     |
//! | S5 sleep-control byte       | [`S5_SLEEP_CONTROL_VALUE`] = 0x34         |
//! | MADT flags                  | 0 (`PCAT_COMPAT` clear, see [`MADT_FLAGS`]) |
//! | Local APIC address          | [`LAPIC_ADDR`] = 0xfee0_0000              |
//! | Local APIC ids / ACPI UIDs  | 0..vcpus, all enabled                     |
//! | IOAPIC id / address / base  | [`IOAPIC_ID`] = 0, 0xfec0_0000, GSI 0     |
//! | Interrupt source override   | ISA IRQ0 → GSI 2, edge, active high       |
//! | Local APIC NMI              | all processors (UID 0xFF), LINT1          |
//! | FADT flags                  | `HW_REDUCED_ACPI`, `RESET_REG_SUP`, `PWR_BUTTON`, `SLP_BUTTON` |

mod dsdt;
#[cfg(test)]
mod tests;

use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"RUSTVM";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// Local APIC base address (MADT header).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC MMIO base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC id in the MADT: 0, the value KVM's in-kernel IOAPIC ID register
/// holds after reset (what QEMU uses too). IOAPIC ids and local APIC ids are
/// separate name spaces on xAPIC systems; 64-bit Linux takes the MADT id
/// as is and never reprograms it.
pub const IOAPIC_ID: u8 = 0;
/// Pins of KVM's in-kernel IOAPIC: GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// Highest vCPU count: xAPIC ids are 8 bits and 0xFF is the broadcast id.
pub const MAX_VCPUS: u8 = 254;
/// GSIs no device may use: 0 (8259 cascade / KVM PIT line) and 2 (the
/// target of the ISA IRQ0 override, i.e. the PIT timer).
pub const RESERVED_GSIS: [u32; 2] = [0, 2];

/// MADT flags: `PCAT_COMPAT` (bit 0) clear. The platform is hardware-reduced
/// and routes everything through the IOAPIC; Linux ignores the 8259 there
/// anyway, and an OS that does look at the flag probes for a PIC instead of
/// assuming one (which is right whether or not KVM's PIC was created).
pub const MADT_FLAGS: u32 = 0;
/// MPS INTI flags: polarity active high (0b01), trigger edge (0b01 << 2).
pub const MPS_INTI_EDGE_HIGH: u16 = 0b0101;

/// `SLP_TYPa` of `\_S5_`: the soft-off sleep type the guest writes into the
/// sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register: `SLP_EN` (bit 5).
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// Sleep control register: `SLP_TYP` is bits 2..=4.
pub const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
/// Sleep control register: mask of `SLP_TYP`.
pub const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0b111 << SLEEP_CONTROL_SLP_TYP_SHIFT;
/// Sleep status register: `WAK_STS` (bit 7), written by Linux before sleeping.
pub const SLEEP_STATUS_WAK_STS: u8 = 1 << 7;
/// The byte Linux writes to the sleep control register to power off (0x34).
pub const S5_SLEEP_CONTROL_VALUE: u8 =
    (S5_SLEEP_TYPE << SLEEP_CONTROL_SLP_TYP_SHIFT) | SLEEP_CONTROL_SLP_EN;

/// i8042 data port, described when [`AcpiConfig::i8042`] is set.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 keyboard interrupt (ISA IRQ 1 = GSI 1).
pub const I8042_GSI: u32 = 1;

/// Notify value the power-button GED sends to `\_SB_.PWRB` (button pressed).
pub const POWER_BUTTON_NOTIFY: u8 = 0x80;

/// At most this many virtio-mmio devices (names `VR00`..`VRFF`).
pub const MAX_VIRTIO_MMIO: usize = 256;
/// At most this many serial ports (names `COM1`..`COM4`).
pub const MAX_SERIAL: usize = 4;

/// FADT IA-PC boot architecture flags (ACPI 6.5 table 5.11).
pub const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
pub const IAPC_8042: u16 = 1 << 1;
pub const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
pub const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
pub const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
pub const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 8;
/// The XSDT lists two tables: FADT and MADT.
const XSDT_ENTRIES: usize = 2;
const XSDT_LEN: usize = 36 + 8 * XSDT_ENTRIES;

/// One virtio-mmio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// I/O ports of the hardware-reduced power-management registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmRegisters {
    /// 8-bit sleep control register: power off on `SLP_EN` with
    /// `SLP_TYP == S5_SLEEP_TYPE` (see [`is_s5_request`]).
    pub sleep_control_port: u16,
    /// 8-bit sleep status register (`WAK_STS` is bit 7).
    pub sleep_status_port: u16,
    /// 8-bit reset register.
    pub reset_port: u16,
    /// Value the guest writes to `reset_port` to reset.
    pub reset_value: u8,
}

/// What the guest's ACPI tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs 1..=[`MAX_VCPUS`]; APIC ids and ACPI processor UIDs 0..vcpus.
    pub vcpus: u8,
    /// `\_SB_.VRxx`, `_HID "LNRO0005"`, `_UID` = index.
    pub virtio_mmio: Vec<VirtioMmioSlot>,
    /// `\_SB_.PEVT`, `_HID "QEMU0001"`, one I/O port (0x505 by convention).
    pub pvpanic_port: Option<u16>,
    /// `(port, irq)` of 8250 UARTs: `\_SB_.COMn`, `_HID PNP0501`, 8 ports.
    pub serial: Vec<(u16, u32)>,
    pub pm: PmRegisters,
    /// Describe the i8042 (`\_SB_.PS2_`, `PNP0303`, ports 0x60/0x64, IRQ 1)
    /// and set the FADT "8042" boot flag. Needed for Ctrl-Alt-Del (the guest
    /// only binds its keyboard driver when it finds the controller).
    pub i8042: bool,
    /// GSI of an ACPI power button: a Generic Event Device (`\_SB_.GED_`,
    /// `ACPI0013`) whose `_EVT` does `Notify(\_SB_.PWRB, 0x80)` on a
    /// `PNP0C0C` button. The VMM presses the button with one edge on this
    /// GSI; the guest's button driver reports `KEY_POWER` (systemd-logind
    /// then powers off). `None`: no power button.
    pub power_button_gsi: Option<u32>,
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI: vCPU count {0} is out of range 1..={MAX_VCPUS}")]
    InvalidVcpuCount(u8),
    #[error("ACPI: {0} virtio-mmio devices requested, at most {MAX_VIRTIO_MMIO} can be described")]
    TooManyVirtioDevices(usize),
    #[error("ACPI: {0} serial ports requested, at most {MAX_SERIAL} can be described")]
    TooManySerialPorts(usize),
    #[error(
        "ACPI: virtio-mmio device {index}: window {base:#x} + {size:#x} is empty or does not fit below 4 GiB"
    )]
    InvalidMmioWindow { index: usize, base: u64, size: u64 },
    #[error("ACPI: {device}: GSI {gsi} is beyond the IOAPIC's {IOAPIC_PINS} pins")]
    GsiOutOfRange { device: String, gsi: u32 },
    #[error(
        "ACPI: {device}: GSI {gsi} is reserved (0: PIC cascade, 2: PIT timer via IRQ0 override)"
    )]
    GsiReserved { device: String, gsi: u32 },
    #[error("ACPI: {device} and {other} both use GSI {gsi}")]
    GsiConflict {
        device: String,
        other: String,
        gsi: u32,
    },
    #[error("ACPI: the {0} register must not be at I/O port 0 (Linux would ignore it)")]
    ZeroPmPort(&'static str),
    #[error(
        "ACPI: RSDP address {0:#x} is not 16-byte aligned (the guest scans on 16-byte boundaries)"
    )]
    MisalignedRsdp(u64),
    #[error(
        "ACPI: tables need {needed} bytes from {start:#x} but the region ends at {end:#x} ({available} bytes)"
    )]
    RegionTooSmall {
        start: u64,
        end: u64,
        needed: u64,
        available: u64,
    },
    #[error("ACPI: writing {len} bytes of tables at {addr:#x} to guest memory: {source}")]
    GuestMemory {
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// Whether a byte written to the sleep control register asks for S5
/// (power off): `SLP_EN` set and `SLP_TYP == S5_SLEEP_TYPE`.
pub fn is_s5_request(value: u8) -> bool {
    value & SLEEP_CONTROL_SLP_EN != 0
        && (value & SLEEP_CONTROL_SLP_TYP_MASK) >> SLEEP_CONTROL_SLP_TYP_SHIFT == S5_SLEEP_TYPE
}

/// Writes the RSDP at `rsdp_addr` and the other tables right after it, all
/// inside `[rsdp_addr, region_end)` (e.g. 0xe0000..0x100000, which the e820
/// map must mark reserved). Returns the RSDP address, for
/// `boot_params.acpi_rsdp_addr` or `hvm_start_info.rsdp_paddr`; a guest
/// that scans 0xe0000..0x100000 finds it there too.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    rsdp_addr: GuestAddress,
    region_end: GuestAddress,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(rsdp_addr.0, region_end.0, cfg)?;
    for table in &tables {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::GuestMemory {
                addr: table.addr,
                len: table.bytes.len(),
                source,
            })?;
    }
    tracing::debug!(
        tables = ?tables.iter().map(|t| (t.name, t.addr, t.bytes.len())).collect::<Vec<_>>(),
        "ACPI tables written"
    );
    Ok(rsdp_addr)
}

/// One table, ready to be copied to guest memory.
#[derive(Debug)]
struct PlacedTable {
    name: &'static str,
    addr: u64,
    bytes: Vec<u8>,
}

/// Builds every table and places it; nothing touches guest memory.
fn build_tables(
    rsdp_addr: u64,
    region_end: u64,
    cfg: &AcpiConfig,
) -> Result<Vec<PlacedTable>, AcpiError> {
    validate(cfg)?;
    if rsdp_addr & 0xf != 0 {
        return Err(AcpiError::MisalignedRsdp(rsdp_addr));
    }

    let dsdt = dsdt::build_dsdt(cfg);
    let madt = build_madt(cfg);

    // Offsets from the RSDP; the sizes of FADT and XSDT are fixed.
    let mut next = 0u64;
    let mut place = |len: usize| -> u64 {
        let at = next.next_multiple_of(TABLE_ALIGN);
        next = at.saturating_add(len as u64);
        at
    };
    let rsdp_off = place(Rsdp::len());
    let xsdt_off = place(XSDT_LEN);
    let fadt_off = place(FADT::len());
    let madt_off = place(madt.len());
    let dsdt_off = place(dsdt.len());
    let needed = next;

    let available = region_end.saturating_sub(rsdp_addr);
    if needed > available {
        return Err(AcpiError::RegionTooSmall {
            start: rsdp_addr,
            end: region_end,
            needed,
            available,
        });
    }
    // In range: rsdp_addr + needed <= region_end, so these cannot overflow.
    let at = |off: u64| rsdp_addr + off;

    let fadt = build_fadt(cfg, at(dsdt_off));

    let mut xsdt = XSDT::new(OEM_ID, *b"RUSTXSDT", OEM_REVISION);
    xsdt.add_entry(at(fadt_off));
    xsdt.add_entry(at(madt_off));

    let rsdp = Rsdp::new(OEM_ID, at(xsdt_off));

    Ok(vec![
        PlacedTable {
            name: "RSDP",
            addr: at(rsdp_off),
            bytes: aml_bytes(&rsdp),
        },
        PlacedTable {
            name: "XSDT",
            addr: at(xsdt_off),
            bytes: aml_bytes(&xsdt),
        },
        PlacedTable {
            name: "FACP",
            addr: at(fadt_off),
            bytes: aml_bytes(&fadt),
        },
        PlacedTable {
            name: "APIC",
            addr: at(madt_off),
            bytes: madt,
        },
        PlacedTable {
            name: "DSDT",
            addr: at(dsdt_off),
            bytes: dsdt,
        },
    ])
}

fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(AcpiError::InvalidVcpuCount(cfg.vcpus));
    }
    if cfg.virtio_mmio.len() > MAX_VIRTIO_MMIO {
        return Err(AcpiError::TooManyVirtioDevices(cfg.virtio_mmio.len()));
    }
    if cfg.serial.len() > MAX_SERIAL {
        return Err(AcpiError::TooManySerialPorts(cfg.serial.len()));
    }
    for (index, slot) in cfg.virtio_mmio.iter().enumerate() {
        let fits = slot.size != 0
            && slot
                .base
                .checked_add(slot.size)
                .is_some_and(|end| end <= 1 << 32);
        if !fits {
            return Err(AcpiError::InvalidMmioWindow {
                index,
                base: slot.base,
                size: slot.size,
            });
        }
    }
    for (name, port) in [
        ("sleep control", cfg.pm.sleep_control_port),
        ("sleep status", cfg.pm.sleep_status_port),
        ("reset", cfg.pm.reset_port),
    ] {
        if port == 0 {
            return Err(AcpiError::ZeroPmPort(name));
        }
    }

    let mut users: Vec<(String, u32)> = Vec::new();
    for (i, &(_, irq)) in cfg.serial.iter().enumerate() {
        users.push((dsdt::serial_name(i), irq));
    }
    if cfg.i8042 {
        users.push(("i8042".to_string(), I8042_GSI));
    }
    for (i, slot) in cfg.virtio_mmio.iter().enumerate() {
        users.push((format!("virtio-mmio {}", dsdt::virtio_name(i)), slot.gsi));
    }
    if let Some(gsi) = cfg.power_button_gsi {
        users.push(("power button".to_string(), gsi));
    }
    for (i, (device, gsi)) in users.iter().enumerate() {
        let gsi = *gsi;
        if gsi >= IOAPIC_PINS {
            return Err(AcpiError::GsiOutOfRange {
                device: device.clone(),
                gsi,
            });
        }
        if RESERVED_GSIS.contains(&gsi) {
            return Err(AcpiError::GsiReserved {
                device: device.clone(),
                gsi,
            });
        }
        if let Some((other, _)) = users[..i].iter().find(|(_, g)| *g == gsi) {
            return Err(AcpiError::GsiConflict {
                device: device.clone(),
                other: other.clone(),
                gsi,
            });
        }
    }
    Ok(())
}

/// An 8-bit I/O-port register as a Generic Address Structure.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> FADT {
    let mut iapc = IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT;
    if cfg.i8042 {
        iapc |= IAPC_8042;
    }
    let mut fadt = FADTBuilder::new(OEM_ID, *b"RUSTFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: a power button, if any, is the
        // control-method device behind the GED.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = iapc.into();
    fadt.reset_reg = io_byte_register(cfg.pm.reset_port);
    fadt.reset_value = cfg.pm.reset_value;
    fadt.sleep_control_reg = io_byte_register(cfg.pm.sleep_control_port);
    fadt.sleep_status_reg = io_byte_register(cfg.pm.sleep_status_port);
    fadt.finalize()
}

/// MADT structure type 2: Interrupt Source Override (10 bytes).
fn interrupt_source_override(source_irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![2, 10, 0 /* bus: ISA */, source_irq];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// MADT structure type 4: Local APIC NMI (6 bytes).
fn local_apic_nmi(processor_uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut v = vec![4, 6, processor_uid];
    v.extend_from_slice(&flags.to_le_bytes());
    v.push(lint);
    v
}

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    // Revision 5 (ACPI 6.2+): Linux then honours the "online capable" bit,
    // which we leave clear: every listed processor is enabled.
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"RUSTAPIC", OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_FLAGS);
    for id in 0..cfg.vcpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0)));
    madt.append_slice(&interrupt_source_override(0, 2, MPS_INTI_EDGE_HIGH));
    // All processors, flags 0 (conforms to the bus: NMI is edge/high), LINT1.
    madt.append_slice(&local_apic_nmi(0xff, 0, 1));
    madt.as_slice().to_vec()
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}
