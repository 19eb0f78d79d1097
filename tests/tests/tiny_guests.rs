//! The vCPU loop, port I/O dispatch, reset and halt paths, driven by tiny
//! guests booted by the real `vmm` binary under real KVM.

use std::time::Duration;

use tests::tiny::{write_guest, Asm};
use tests::{TempDir, VmmProcess};

fn boot_tiny(tag: &str, asm: &Asm, extra: &[&str]) -> (TempDir, VmmProcess) {
    let dir = TempDir::new(tag);
    let k = dir.path().join("tiny.elf");
    write_guest(&k, asm).expect("write tiny guest");
    let mut args = vec!["--kernel", k.to_str().unwrap_or_default(), "--memory", "64"];
    args.extend_from_slice(extra);
    let p = VmmProcess::spawn(&args);
    (dir, p)
}

#[test]
fn serial_output_from_guest_port_writes_reaches_the_console() {
    let mut a = Asm::new();
    a.print("hello from a tiny guest\r\n").cli_hlt_forever();
    let (_d, p) = boot_tiny("serial", &a, &[]);
    assert!(
        p.wait_for("hello from a tiny guest", Duration::from_secs(20)),
        "{}",
        p.report()
    );
}

#[test]
fn triple_fault_restarts_the_guest_in_the_same_process() {
    let mut a = Asm::new();
    a.print("BOOT\r\n").triple_fault();
    let (_d, mut p) = boot_tiny("triple", &a, &[]);
    assert!(
        p.wait_for_count("BOOT", 3, Duration::from_secs(30)),
        "{}",
        p.report()
    );
    assert!(p.is_alive(), "the VMM must survive guest resets");
}

#[test]
fn i8042_reset_restarts_the_guest_in_the_same_process() {
    let mut a = Asm::new();
    a.print("KBDBOOT\r\n").outb(0x64, 0xfe).cli_hlt_forever();
    let (_d, mut p) = boot_tiny("i8042", &a, &[]);
    assert!(
        p.wait_for_count("KBDBOOT", 3, Duration::from_secs(30)),
        "{}",
        p.report()
    );
    assert!(p.is_alive());
}

#[test]
fn acpi_s5_powers_off_and_the_process_exits_zero() {
    let mut a = Asm::new();
    a.print("BYE\r\n").outb(0x600, 0x34).cli_hlt_forever();
    let (_d, mut p) = boot_tiny("s5", &a, &[]);
    let st = p.wait_exit(Duration::from_secs(20));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", p.report());
    assert!(p.output().contains("BYE"));
}

#[test]
fn acpi_reset_register_restarts_the_guest() {
    let mut a = Asm::new();
    a.print("ACPIBOOT\r\n").outb(0x602, 0x01).cli_hlt_forever();
    let (_d, mut p) = boot_tiny("acpireset", &a, &[]);
    assert!(
        p.wait_for_count("ACPIBOOT", 2, Duration::from_secs(30)),
        "{}",
        p.report()
    );
    assert!(p.is_alive());
}

#[test]
fn reads_of_unclaimed_ports_return_all_ones_and_the_guest_goes_on() {
    // in al, 0x2f8 (nothing there) ; cmp al, 0xff ; jne fail ; print OK
    let mut a = Asm::new();
    a.inb(0x2f8);
    a.code.extend_from_slice(&[0x3c, 0xff, 0x75, 0x00]); // cmp al,0xff; jne +N (patched below)
    let jne_at = a.code.len() - 1;
    a.print("UNCLAIMED-OK\r\n").outb(0x600, 0x34);
    let fail_at = a.code.len();
    a.code[jne_at] = (fail_at - (jne_at + 1)) as u8;
    a.print("UNCLAIMED-BAD\r\n").outb(0x600, 0x34);
    let (_d, mut p) = boot_tiny("unclaimed", &a, &[]);
    assert_eq!(
        p.wait_exit(Duration::from_secs(20)).and_then(|s| s.code()),
        Some(0)
    );
    assert!(p.output().contains("UNCLAIMED-OK"), "{}", p.report());
}
