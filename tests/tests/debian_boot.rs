//! The slow suite: Debian's own generic kernels (6.1 and 6.12) on this
//! machine's own /dev/kvm, up to the start of their user space. Where that
//! is kvm_pvm this exercises the PVM compatibility layer with distribution
//! kernels (its emulated instructions, its hidden CPU features): one boot
//! to init takes 10-20 minutes there, so only `VMM_SLOW=1 ./test.sh` runs
//! them (or `cargo test -p tests --test debian_boot -- --ignored`). The
//! checks are what the kernel shows by itself: ACPI found (tables, S5),
//! every vCPU up, the command line, reaching init. These kernels with
//! their user space are tested in `tests/userspace` (the test host).

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
    // loglevel=7: the lines waited for below are notice and info; the
    // entry's own loglevel=4 hides them (the last loglevel= wins).
    let cmdline = format!(
        "{} cryptomgr.notests vmm.test=debian loglevel=7",
        cmdline.trim()
    );
    // The entry's vmlinux boots through PVH and skips the bzImage's
    // decompressor, which runs emulated (for many minutes) under kvm_pvm.
    let vmlinux = entry.join("vmlinux");
    let kernel = if vmlinux.is_file() {
        vmlinux
    } else {
        entry.join("bzImage")
    };
    let initrd = entry.join("initrd.img");
    let p = VmmProcess::spawn(&[
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
}

#[test]
#[ignore = "slow: ~10 minutes under kvm_pvm; VMM_SLOW=1 ./test.sh"]
fn debian_6_1_boots_to_init() {
    boot_debian("debian-6.1");
}

#[test]
#[ignore = "slow: ~20 minutes under kvm_pvm; VMM_SLOW=1 ./test.sh"]
fn debian_6_12_boots_to_init() {
    boot_debian("debian-6.12");
}
