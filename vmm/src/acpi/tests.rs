//! Table layouts are checked against offsets from the ACPI 6.5 spec, not
//! against the `acpi_tables` structs that produced them.

use super::*;
use devices::virtio::GuestMemoryMmap;

const RSDP_AT: u64 = 0xe0000;
const REGION_END: u64 = 0x10_0000;

fn config() -> AcpiConfig {
    AcpiConfig {
        vcpus: 2,
        virtio_mmio: vec![
            VirtioMmioSlot {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            },
            VirtioMmioSlot {
                base: 0xd000_1000,
                size: 0x1000,
                gsi: 6,
            },
        ],
        pvpanic_port: Some(0x505),
        serial: vec![(0x3f8, 4)],
        pm: PmRegisters {
            sleep_control_port: 0x3c0,
            sleep_status_port: 0x3c1,
            reset_port: 0x3c2,
            reset_value: 0x42,
        },
        i8042: true,
        power_button_gsi: Some(23),
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION_END as usize)])
        .expect("test guest memory")
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read guest memory");
    v
}

/// A system description table read from guest memory by its header length.
fn read_sdt(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let header = read(mem, addr, 36);
    read(mem, addr, u32_at(&header, 4) as usize)
}

/// The tables as the guest finds them: RSDP → XSDT → FADT/MADT, FADT → DSDT.
struct Found {
    rsdp: Vec<u8>,
    xsdt: (u64, Vec<u8>),
    fadt: (u64, Vec<u8>),
    madt: (u64, Vec<u8>),
    dsdt: (u64, Vec<u8>),
}

fn write_and_find(cfg: &AcpiConfig) -> Found {
    let mem = memory();
    let rsdp_addr = create_acpi_tables(&mem, GuestAddress(RSDP_AT), GuestAddress(REGION_END), cfg)
        .expect("tables fit");
    assert_eq!(rsdp_addr, GuestAddress(RSDP_AT));
    let rsdp = read(&mem, RSDP_AT, 36);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = read_sdt(&mem, xsdt_addr);
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(&xsdt, o))
        .collect();
    assert_eq!(entries.len(), 2, "XSDT lists FADT and MADT");
    let fadt = read_sdt(&mem, entries[0]);
    let madt = read_sdt(&mem, entries[1]);
    let dsdt_addr = u64_at(&fadt, 140);
    let dsdt = read_sdt(&mem, dsdt_addr);
    Found {
        rsdp,
        xsdt: (xsdt_addr, xsdt),
        fadt: (entries[0], fadt),
        madt: (entries[1], madt),
        dsdt: (dsdt_addr, dsdt),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn rsdp_has_both_checksums_and_points_at_xsdt() {
    let f = write_and_find(&config());
    assert_eq!(&f.rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&f.rsdp[0..20]), 0, "ACPI 1.0 checksum over 20 bytes");
    assert_eq!(sum(&f.rsdp), 0, "extended checksum over 36 bytes");
    assert_eq!(&f.rsdp[9..15], &OEM_ID);
    assert_eq!(f.rsdp[15], 2, "revision 2: XSDT present");
    assert_eq!(u32_at(&f.rsdp, 16), 0, "no RSDT");
    assert_eq!(u32_at(&f.rsdp, 20), 36, "length");
    assert_eq!(u64_at(&f.rsdp, 24), f.xsdt.0);
}

#[test]
fn every_table_has_signature_length_and_zero_checksum() {
    let f = write_and_find(&config());
    for (sig, rev, table) in [
        (b"XSDT", 1, &f.xsdt.1),
        (b"FACP", 6, &f.fadt.1),
        (b"APIC", 5, &f.madt.1),
        (b"DSDT", 2, &f.dsdt.1),
    ] {
        let name = String::from_utf8_lossy(sig);
        assert_eq!(&table[0..4], sig);
        assert_eq!(u32_at(table, 4) as usize, table.len(), "{name} length");
        assert_eq!(table[8], rev, "{name} revision");
        assert_eq!(sum(table), 0, "{name} checksum");
        assert_eq!(&table[10..16], &OEM_ID, "{name} OEM id");
    }
    assert_eq!(f.xsdt.1.len(), 36 + 16);
    assert_eq!(f.fadt.1.len(), 276, "ACPI 6.x FADT length");
    assert_eq!(f.fadt.1[131], 5, "FADT minor version");
}

#[test]
fn xsdt_lists_fadt_and_madt_and_fadt_points_at_dsdt() {
    let f = write_and_find(&config());
    assert_eq!(u64_at(&f.xsdt.1, 36), f.fadt.0);
    assert_eq!(u64_at(&f.xsdt.1, 44), f.madt.0);
    // The DSDT is reached through X_DSDT only.
    assert_eq!(u32_at(&f.fadt.1, 40), 0, "32-bit DSDT unused");
    assert_eq!(u64_at(&f.fadt.1, 140), f.dsdt.0, "X_DSDT");
    // Hardware-reduced: no FACS.
    assert_eq!(u32_at(&f.fadt.1, 36), 0, "FIRMWARE_CTRL");
    assert_eq!(u64_at(&f.fadt.1, 132), 0, "X_FIRMWARE_CTRL");
}

#[test]
fn fadt_is_hardware_reduced_with_io_pm_registers() {
    let cfg = config();
    let f = write_and_find(&cfg);
    let fadt = &f.fadt.1;
    let flags = u32_at(fadt, 112);
    assert_eq!(
        flags,
        (1 << 20) | (1 << 10) | (1 << 5) | (1 << 4),
        "HW_REDUCED_ACPI | RESET_REG_SUP | SLP_BUTTON | PWR_BUTTON"
    );
    assert_eq!(
        u16_at(fadt, 109),
        (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5),
        "8042, VGA not present, MSI not supported, ASPM off, CMOS RTC not present"
    );
    // Nothing of the fixed hardware model: SCI, SMI, PM1, PM timer, GPE.
    assert_eq!(u16_at(fadt, 46), 0, "SCI_INT");
    assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD");
    assert!(fadt[56..96].iter().all(|&b| b == 0), "legacy PM blocks");
    assert!(fadt[148..244].iter().all(|&b| b == 0), "X_ PM/GPE blocks");

    let io_byte = |port: u16| {
        let mut g = vec![1u8, 8, 0, 1];
        g.extend_from_slice(&u64::from(port).to_le_bytes());
        g
    };
    assert_eq!(&fadt[116..128], io_byte(cfg.pm.reset_port), "RESET_REG");
    assert_eq!(fadt[128], cfg.pm.reset_value, "RESET_VALUE");
    assert_eq!(
        &fadt[244..256],
        io_byte(cfg.pm.sleep_control_port),
        "SLEEP_CONTROL_REG"
    );
    assert_eq!(
        &fadt[256..268],
        io_byte(cfg.pm.sleep_status_port),
        "SLEEP_STATUS_REG"
    );
    assert_eq!(u64_at(fadt, 268), 0, "hypervisor vendor identity");
}

#[test]
fn fadt_8042_flag_follows_config() {
    let cfg = AcpiConfig {
        i8042: false,
        ..config()
    };
    let f = write_and_find(&cfg);
    assert_eq!(u16_at(&f.fadt.1, 109) & IAPC_8042, 0);
    assert!(find(&f.dsdt.1, b"PS2_").is_empty());
}

#[test]
fn madt_has_enabled_lapic_per_vcpu_ioapic_override_and_nmi() {
    for vcpus in [1u8, 2, 8] {
        let cfg = AcpiConfig { vcpus, ..config() };
        let madt = write_and_find(&cfg).madt.1;
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(&madt, 40), 0, "flags: PCAT_COMPAT clear");

        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        let mut nmis = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            let s = &madt[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    lapics.push((s[2], s[3], u32_at(s, 4)));
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(s[3], 0, "reserved");
                    ioapics.push((s[2], u32_at(s, 4), u32_at(s, 8)));
                }
                2 => {
                    assert_eq!(len, 10);
                    overrides.push((s[2], s[3], u32_at(s, 4), u16_at(s, 8)));
                }
                4 => {
                    assert_eq!(len, 6);
                    nmis.push((s[2], u16_at(s, 3), s[5]));
                }
                other => panic!("unexpected MADT structure type {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len(), "structures fill the table exactly");
        let expected: Vec<_> = (0..vcpus).map(|i| (i, i, 1)).collect();
        assert_eq!(lapics, expected, "(uid, apic id, enabled) per vCPU");
        assert_eq!(ioapics, vec![(IOAPIC_ID, 0xfec0_0000, 0)]);
        assert_eq!(
            overrides,
            vec![(0, 0, 2, 0b0101)],
            "ISA IRQ0 -> GSI2 edge/high"
        );
        assert_eq!(nmis, vec![(0xff, 0, 1)], "all processors, LINT1");
    }
}

/// Finds `Name(_HID, "<hid>")` and returns the device body that follows
/// (up to the next `_HID` or the end).
fn device_bodies<'a>(dsdt: &'a [u8], hid: &[u8]) -> Vec<&'a [u8]> {
    let mut string = vec![0x0d]; // StringPrefix
    string.extend_from_slice(hid);
    string.push(0);
    let starts = find(dsdt, &string);
    starts
        .iter()
        .map(|&s| {
            let rest = &dsdt[s + string.len()..];
            let end = find(rest, b"_HID").first().copied().unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// Extended Interrupt descriptor: consumer, edge, active high, exclusive.
fn ext_irq(gsi: u32) -> Vec<u8> {
    let mut v = vec![0x89, 6, 0, 0b0011, 1];
    v.extend_from_slice(&gsi.to_le_bytes());
    v
}

fn io_port(min: u16, max: u16, align: u8, len: u8) -> Vec<u8> {
    let mut v = vec![0x47, 1];
    v.extend_from_slice(&min.to_le_bytes());
    v.extend_from_slice(&max.to_le_bytes());
    v.extend_from_slice(&[align, len]);
    v
}

#[test]
fn dsdt_describes_virtio_mmio_as_lnro0005() {
    let cfg = config();
    let dsdt = write_and_find(&cfg).dsdt.1;
    let bodies = device_bodies(&dsdt, b"LNRO0005");
    assert_eq!(bodies.len(), cfg.virtio_mmio.len());
    for (i, (body, slot)) in bodies.iter().zip(&cfg.virtio_mmio).enumerate() {
        let mut mem32 = vec![0x86, 9, 0, 1];
        mem32.extend_from_slice(&(slot.base as u32).to_le_bytes());
        mem32.extend_from_slice(&(slot.size as u32).to_le_bytes());
        let at = find(body, &mem32);
        assert_eq!(
            at.len(),
            1,
            "Memory32Fixed(ReadWrite, {:#x}, {:#x})",
            slot.base,
            slot.size
        );
        // The interrupt follows the memory window, then EndTag.
        let after = &body[at[0] + mem32.len()..];
        assert!(
            after.starts_with(&ext_irq(slot.gsi)),
            "Interrupt {{{}}}",
            slot.gsi
        );
        assert_eq!(after[9..11], [0x79, 0], "EndTag");
        // _UID i: ZeroOp, OneOp or BytePrefix i.
        let uid = match i {
            0 => vec![0x00],
            1 => vec![0x01],
            _ => vec![0x0a, i as u8],
        };
        let mut name_uid = b"_UID".to_vec();
        name_uid.extend_from_slice(&uid);
        assert_eq!(find(body, &name_uid).len(), 1, "_UID {i}");
        assert_eq!(find(body, b"_CCA\x01").len(), 1, "_CCA 1");
    }
    // Device(VR00), Device(VR01): ExtOpPrefix DeviceOp PkgLength name, and
    // the devices follow one another inside the scope.
    let vr00 = find(&dsdt, b"VR00");
    let vr01 = find(&dsdt, b"VR01");
    assert_eq!((vr00.len(), vr01.len()), (1, 1));
    let (start0, end0) = named_object(&dsdt, vr00[0], &[0x5b, 0x82]);
    let (start1, _) = named_object(&dsdt, vr01[0], &[0x5b, 0x82]);
    assert!(start0 < end0 && end0 <= start1);
    // Scope(\_SB_) is the last object and its PkgLength runs to the end.
    let sb = find(&dsdt, b"\\_SB_");
    assert_eq!(sb.len(), 1, "one Scope(\\_SB_)");
    let (_, end) = named_object(&dsdt, sb[0], &[0x10]);
    assert_eq!(end, dsdt.len(), "Scope PkgLength");
}

/// For an object `op PkgLength name...` whose name starts at `name_at`,
/// checks the opcode and returns (start of op, end of the object).
fn named_object(aml: &[u8], name_at: usize, op: &[u8]) -> (usize, usize) {
    let n = (1..=4)
        .find(|&n| {
            name_at >= n + op.len()
                && aml[name_at - n - op.len()..name_at - n] == *op
                && (aml[name_at - n] >> 6) as usize + 1 == n
        })
        .expect("opcode and PkgLength before the name");
    let pkg = &aml[name_at - n..name_at];
    let len = if n == 1 {
        pkg[0] as usize
    } else {
        pkg[1..]
            .iter()
            .enumerate()
            .fold((pkg[0] & 0x0f) as usize, |acc, (i, &b)| {
                acc | (b as usize) << (4 + 8 * i)
            })
    };
    (name_at - n - op.len(), name_at - n + len)
}

#[test]
fn dsdt_describes_pvpanic_serial_i8042_and_power_button() {
    let cfg = config();
    let dsdt = write_and_find(&cfg).dsdt.1;

    let pvpanic = device_bodies(&dsdt, b"QEMU0001");
    assert_eq!(pvpanic.len(), 1);
    assert_eq!(find(pvpanic[0], &io_port(0x505, 0x505, 1, 1)).len(), 1);

    // EISAID("PNP0501") = 0x0105d041 as a DWord constant.
    let com1 = find(&dsdt, b"_HID\x0c\x41\xd0\x05\x01");
    assert_eq!(com1.len(), 1, "PNP0501");
    let body = &dsdt[com1[0]..];
    let mut crs = io_port(0x3f8, 0x3f8, 1, 8);
    crs.extend_from_slice(&ext_irq(4));
    assert_eq!(find(body, &crs).len(), 1, "IO(0x3f8, 8) + Interrupt {{4}}");
    assert_eq!(find(&dsdt, b"COM1").len(), 1);

    // EISAID("PNP0303") = 0x0303d041.
    let kbd = find(&dsdt, b"_HID\x0c\x41\xd0\x03\x03");
    assert_eq!(kbd.len(), 1, "PNP0303");
    let mut crs = io_port(0x60, 0x60, 1, 1);
    crs.extend_from_slice(&io_port(0x64, 0x64, 1, 1));
    crs.extend_from_slice(&ext_irq(1));
    assert_eq!(find(&dsdt[kbd[0]..], &crs).len(), 1);

    let ged = device_bodies(&dsdt, b"ACPI0013");
    assert_eq!(ged.len(), 1);
    assert_eq!(find(ged[0], &ext_irq(23)).len(), 1);
    // Method(_EVT, 1, Serialized) { Notify(\_SB_.PWRB, 0x80) }
    let notify = b"\x86\\\x2e_SB_PWRB\x0a\x80";
    assert_eq!(
        find(ged[0], b"_EVT\x09").len(),
        1,
        "_EVT, 1 arg, serialized"
    );
    assert_eq!(find(ged[0], notify).len(), 1);
    // EISAID("PNP0C0C") = 0x0c0cd041.
    assert_eq!(find(&dsdt, b"_HID\x0c\x41\xd0\x0c\x0c").len(), 1);
}

#[test]
fn dsdt_declares_s5_with_sleep_type_5() {
    let dsdt = write_and_find(&config()).dsdt.1;
    // Name(\_S5_, Package(4) { 5, 0, 0, 0 })
    let s5 = b"\x08\\_S5_\x12\x07\x04\x0a\x05\x00\x00\x00";
    assert_eq!(find(&dsdt, s5).len(), 1);
    assert_eq!(S5_SLEEP_CONTROL_VALUE, 0x34);
    assert!(is_s5_request(0x34));
    assert!(!is_s5_request(0x14), "SLP_EN clear");
    assert!(!is_s5_request(0x20), "SLP_TYP 0");
    assert!(is_s5_request(0x34 | 0x80 | 0x01), "other bits ignored");
}

#[test]
fn minimal_config_has_empty_device_scope() {
    let cfg = AcpiConfig {
        vcpus: 1,
        virtio_mmio: vec![],
        pvpanic_port: None,
        serial: vec![],
        i8042: false,
        power_button_gsi: None,
        ..config()
    };
    let dsdt = write_and_find(&cfg).dsdt.1;
    assert!(find(&dsdt, b"_SB_").is_empty());
    assert_eq!(find(&dsdt, b"_S5_").len(), 1);
}

#[test]
fn tables_are_aligned_disjoint_and_inside_the_region() {
    let mut cfg = config();
    cfg.vcpus = 8;
    cfg.virtio_mmio = (0..18)
        .map(|i| VirtioMmioSlot {
            base: 0xd000_0000 + i * 0x1000,
            size: 0x1000,
            gsi: 5 + i as u32,
        })
        .collect();
    cfg.power_button_gsi = None;
    let tables = build_tables(RSDP_AT, REGION_END, &cfg).expect("fits");
    let names: Vec<_> = tables.iter().map(|t| t.name).collect();
    assert_eq!(names, ["RSDP", "XSDT", "FACP", "APIC", "DSDT"]);
    assert_eq!(tables[0].addr, RSDP_AT);
    for pair in tables.windows(2) {
        let end = pair[0].addr + pair[0].bytes.len() as u64;
        assert!(
            end <= pair[1].addr,
            "{} overlaps {}",
            pair[0].name,
            pair[1].name
        );
    }
    for t in &tables {
        assert_eq!(t.addr % 8, 0, "{} aligned", t.name);
        assert!(t.addr + t.bytes.len() as u64 <= REGION_END);
    }

    // Exactly the needed size still fits; one byte less does not.
    let last = tables.last().expect("tables");
    let end = last.addr + last.bytes.len() as u64;
    assert!(build_tables(RSDP_AT, end, &cfg).is_ok());
    let err = build_tables(RSDP_AT, end - 1, &cfg).expect_err("one byte short");
    assert!(
        matches!(err, AcpiError::RegionTooSmall { needed, .. } if needed == end - RSDP_AT),
        "{err}"
    );
}

#[test]
fn region_too_small_is_an_error_not_a_panic() {
    let mem = memory();
    let err = create_acpi_tables(
        &mem,
        GuestAddress(RSDP_AT),
        GuestAddress(RSDP_AT + 0x100),
        &config(),
    )
    .expect_err("0x100 bytes are not enough");
    assert!(matches!(err, AcpiError::RegionTooSmall { .. }));
    assert!(err.to_string().contains("bytes"), "{err}");
    // An end below the start is "too small" too.
    let err = build_tables(RSDP_AT, 0, &config()).expect_err("end < start");
    assert!(matches!(
        err,
        AcpiError::RegionTooSmall { available: 0, .. }
    ));
    // Nothing was written.
    assert_eq!(read(&mem, RSDP_AT, 8), vec![0; 8]);
}

#[test]
fn thousand_virtio_devices_in_a_tiny_region_is_a_clear_error() {
    let mut cfg = config();
    cfg.virtio_mmio = (0..1000)
        .map(|i| VirtioMmioSlot {
            base: 0xd000_0000 + i * 0x1000,
            size: 0x1000,
            gsi: 5,
        })
        .collect();
    let err = build_tables(RSDP_AT, RSDP_AT + 0x40, &cfg).expect_err("too many");
    assert!(
        matches!(err, AcpiError::TooManyVirtioDevices(1000)),
        "{err}"
    );
    assert!(err.to_string().contains("1000"));
}

#[test]
fn invalid_configs_are_rejected() {
    let check = |cfg: AcpiConfig, what: &str| {
        let err = build_tables(RSDP_AT, REGION_END, &cfg).expect_err(what);
        eprintln!("{what}: {err}");
        err
    };
    let base = config();

    let err = check(
        AcpiConfig {
            vcpus: 0,
            ..base.clone()
        },
        "no vCPU",
    );
    assert!(matches!(err, AcpiError::InvalidVcpuCount(0)));
    let err = check(
        AcpiConfig {
            vcpus: 255,
            ..base.clone()
        },
        "255 vCPUs",
    );
    assert!(matches!(err, AcpiError::InvalidVcpuCount(255)));

    let mut cfg = base.clone();
    cfg.serial = vec![
        (0x3f8, 4),
        (0x2f8, 3),
        (0x3e8, 10),
        (0x2e8, 11),
        (0x100, 12),
    ];
    assert!(matches!(
        check(cfg, "5 UARTs"),
        AcpiError::TooManySerialPorts(5)
    ));

    for (b, s) in [
        (0xffff_f000, 0x2000),
        (0x1_0000_0000, 0x1000),
        (0xd000_0000, 0),
    ] {
        let mut cfg = base.clone();
        cfg.virtio_mmio[1].base = b;
        cfg.virtio_mmio[1].size = s;
        let err = check(cfg, "bad window");
        assert!(matches!(err, AcpiError::InvalidMmioWindow { index: 1, .. }));
    }

    let mut cfg = base.clone();
    cfg.virtio_mmio[0].gsi = 24;
    assert!(matches!(
        check(cfg, "GSI 24"),
        AcpiError::GsiOutOfRange { gsi: 24, .. }
    ));
    let mut cfg = base.clone();
    cfg.power_button_gsi = Some(2);
    assert!(matches!(
        check(cfg, "GSI 2"),
        AcpiError::GsiReserved { gsi: 2, .. }
    ));
    let mut cfg = base.clone();
    cfg.virtio_mmio[1].gsi = 4;
    let err = check(cfg, "shared GSI");
    assert!(matches!(err, AcpiError::GsiConflict { gsi: 4, .. }));
    assert!(err.to_string().contains("COM1"), "{err}");
    let mut cfg = base.clone();
    cfg.virtio_mmio[0].gsi = 1;
    assert!(matches!(
        check(cfg, "i8042 GSI"),
        AcpiError::GsiConflict { gsi: 1, .. }
    ));

    let mut cfg = base.clone();
    cfg.pm.sleep_status_port = 0;
    assert!(matches!(
        check(cfg, "port 0"),
        AcpiError::ZeroPmPort("sleep status")
    ));

    let err = build_tables(RSDP_AT + 8, REGION_END, &base).expect_err("misaligned");
    assert!(matches!(err, AcpiError::MisalignedRsdp(_)));
}

#[test]
fn unbacked_region_is_a_guest_memory_error() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
    let err = create_acpi_tables(
        &mem,
        GuestAddress(RSDP_AT),
        GuestAddress(REGION_END),
        &config(),
    )
    .expect_err("0xe0000 is not backed");
    assert!(
        matches!(err, AcpiError::GuestMemory { addr: RSDP_AT, .. }),
        "{err}"
    );
}

/// Disassembles every table with ACPICA's `iasl -d` (package acpica-tools),
/// which verifies checksums, table fields and the AML, then recompiles the
/// DSDT source. Skipped when `iasl` is not installed.
#[test]
fn iasl_disassembles_and_recompiles_the_tables() {
    use std::process::Command;

    if Command::new("iasl").arg("-v").output().is_err() {
        eprintln!("SKIPPED: iasl not found (apt-get install acpica-tools)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-acpi-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let f = write_and_find(&config());
    for (name, bytes) in [
        ("facp", &f.fadt.1),
        ("apic", &f.madt.1),
        ("xsdt", &f.xsdt.1),
        ("dsdt", &f.dsdt.1),
    ] {
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, bytes).expect("write table");
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(&dir)
            .output()
            .expect("run iasl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {name}:\n{text}");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).expect("dsl");
        assert!(!dsl.contains("**** "), "iasl flagged {name}:\n{dsl}");
        assert!(!text.to_lowercase().contains("error"), "{name}:\n{text}");
    }
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).expect("dsdt.dsl");
    for needle in [
        "LNRO0005", "QEMU0001", "PNP0501", "PNP0303", "ACPI0013", "PNP0C0C", "_S5_",
    ] {
        assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
    }
    // Recompile the disassembly: catches AML that only looks right.
    let out = Command::new("iasl")
        .args(["-p", "recompiled"])
        .arg(dir.join("dsdt.dsl"))
        .current_dir(&dir)
        .output()
        .expect("run iasl");
    assert!(
        out.status.success(),
        "iasl dsdt.dsl:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loads the tables into ACPICA's `acpiexec` (package acpica-tools; the
/// interpreter Linux uses) and evaluates `\_S5_` and the power-button
/// `_EVT`. Skipped when `acpiexec` is not installed.
#[test]
fn acpiexec_evaluates_s5_and_power_button_event() {
    use std::process::Command;

    if Command::new("acpiexec").arg("-v").output().is_err() {
        eprintln!("SKIPPED: acpiexec not found (apt-get install acpica-tools)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-acpi-acpiexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let f = write_and_find(&config());
    let mut paths = Vec::new();
    for (name, bytes) in [
        ("facp", &f.fadt.1),
        ("dsdt", &f.dsdt.1),
        ("apic", &f.madt.1),
    ] {
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, bytes).expect("write table");
        paths.push(path);
    }
    let out = Command::new("acpiexec")
        .arg("-b")
        .arg("evaluate \\_S5_; evaluate \\_SB.GED._EVT 23; evaluate \\_SB.VR00._CRS")
        .args(&paths)
        .output()
        .expect("run acpiexec");
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "acpiexec:\n{text}");
    assert!(!text.contains("AE_"), "ACPICA exception:\n{text}");
    assert!(
        text.contains("[Integer] = 0000000000000005"),
        "\\_S5_ SLP_TYPa = 5:\n{text}"
    );
    assert!(
        text.contains("Notify on [PWRB]") && text.contains("Value 0x80"),
        "_EVT notifies the power button:\n{text}"
    );
    assert!(
        text.contains("86 09 00 01 00 00 00 D0 00 10 00 00 89 06 00 03"),
        "VR00 _CRS:\n{text}"
    );
}
