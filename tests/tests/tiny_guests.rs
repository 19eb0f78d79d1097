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
