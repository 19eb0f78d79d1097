//! The slow suite: Debian's own generic kernels (6.1 and 6.12) under real
//! KVM. Under this machine's kvm_pvm one boot to init takes many minutes,
//! and guest user space cannot run (see README.md), so the checks are what
//! the unmodified kernel shows and does by itself: ACPI found (tables,
//! S5), every vCPU up, the command line, reaching init, and after init
//! fails, the kernel's own panic reboot coming back in the same process.
//! `./test.sh` runs the 6.1 boot after everything else, alone (about 10
//! minutes here), `VMM_SLOW=1 ./test.sh` both (or `cargo test -p tests
//! --test debian_boot -- --ignored`).

use std::time::Duration;

use tests::{library_entry, VmmProcess};

const BOOT: Duration = Duration::from_secs(1800);

fn boot_debian(name: &str) {
    let Some(entry) = library_entry(name) else {
        return;
    };
    let release = std::fs::read_to_string(entry.join("release")).unwrap_or_default();
    let cmdline = std::fs::read_to_string(entry.join("cmdline")).unwrap_or_default();
    // cryptomgr.notests: Debian runs the crypto self-tests at boot, RSA
    // among them; emulated under kvm_pvm they added 10+ minutes (a
    // bignum loop at 0xffffffff8156f8xx, seen with perf's
    // kvm:kvm_emulate_insn). The boot itself is unchanged.
    let cmdline = format!("{} cryptomgr.notests vmm.test=debian", cmdline.trim());
    // The entry's vmlinux boots through PVH and skips the bzImage's
    // decompressor, which runs emulated (for many minutes) under kvm_pvm.
    let vmlinux = entry.join("vmlinux");
    let kernel = if vmlinux.is_file() {
        vmlinux
    } else {
        entry.join("bzImage")
    };
    let initrd = entry.join("initrd.img");
    let mut p = VmmProcess::spawn(&[
        "--kernel",
        kernel.to_str().unwrap_or_default(),
        "--initrd",
        initrd.to_str().unwrap_or_default(),
        "--vcpus",
        "2",
        "--memory",
        "512",
        "--cmdline",
        &cmdline,
    ]);
    assert!(
        p.wait_for(&format!("Linux version {}", release.trim()), BOOT),
        "{}",
        p.report()
    );
    assert!(
        p.wait_for("ACPI: PM: (supports S0 S5)", BOOT),
        "{}",
        p.report()
    );
    assert!(
        p.wait_for("Brought up 1 node, 2 CPUs", BOOT),
        "{}",
        p.report()
    );
    assert!(p.output().contains("vmm.test=debian"));
    assert!(
        p.wait_for("Run /init as init process", BOOT),
        "{}",
        p.report()
    );
    // init cannot make system calls here; the kernel panics and, with
    // panic=1 reboot=k, resets through the keyboard controller.
    assert!(
        p.wait_for("--- vmm: boot 2 (reset:", BOOT),
        "{}",
        p.report()
    );
    assert!(p.is_alive());
}

#[test]
#[ignore = "slow: ~10 minutes under a software KVM; ./test.sh runs it after the rest"]
fn debian_6_1_boots_to_init_and_reboots_in_process() {
    boot_debian("debian-6.1");
}

#[test]
#[ignore = "slow: ~15 minutes under a software KVM; VMM_SLOW=1 ./test.sh"]
fn debian_6_12_boots_to_init_and_reboots_in_process() {
    boot_debian("debian-6.12");
}
