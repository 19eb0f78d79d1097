//! Real Linux (the `mini` kernel from the kernel library) on this machine's
//! own /dev/kvm, up to the start of its user space: what the kernel shows of
//! the machine in its log. Where /dev/kvm is kvm_pvm this keeps the VMM's PVM
//! compatibility layer tested with a real kernel (user space cannot make
//! system calls there, see README.md); everything past `Run /init` is tested
//! in `tests/userspace`, with real user space.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use tests::control::Ctl;
use tests::{library_entry, TempDir, VmmProcess};

/// One boot of `mini` to init takes minutes under a software KVM.
const BOOT: Duration = Duration::from_secs(600);

fn mini_cmdline(entry: &std::path::Path) -> String {
    let c = std::fs::read_to_string(entry.join("cmdline")).unwrap_or_default();
    // The keyboard must be found through ACPI (PNP0303) so that its IRQ is
    // routed on a hardware-reduced platform (older libraries had nopnp).
    c.split_whitespace()
        .filter(|w| *w != "i8042.nopnp")
        .collect::<Vec<_>>()
        .join(" ")
}

fn log_line<'a>(out: &'a str, needle: &str) -> Option<&'a str> {
    out.lines().find(|l| l.contains(needle))
}

/// The kernel's own view of the machine, from its log, up to the start of
/// user space. Under kvm_pvm (the PVM compatibility layer: CPUID masks,
/// command-line additions, the fallback emulator) nothing past that can
/// run; on hardware KVM it runs the same. User space is tested in
/// `tests/userspace` (in the test host where /dev/kvm is kvm_pvm).
#[test]
fn mini_reaches_init_and_its_kernel_sees_the_machine_it_was_given() {
    let Some(entry) = library_entry("mini") else {
        return;
    };
    let dir = TempDir::new("mini");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).expect("disk image");
    // A second disk of another size, opened O_DIRECT where the file system
    // allows it (tmpfs before Linux 6.6 does not: then the usual way).
    let disk2 = dir.path().join("disk2.img");
    std::fs::write(&disk2, vec![0u8; 24 << 20]).expect("disk image");
    let direct = if std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk2)
        .is_ok()
    {
        ",direct=on"
    } else {
        ""
    };
    let sock = dir.path().join("run/mini/control.sock");
    let cmdline = format!("{} vmm.test=marker-42", mini_cmdline(&entry));
    let p = VmmProcess::spawn(&[
        "--name",
        "mini",
        "--kernel-dir",
        entry.parent().and_then(|p| p.to_str()).unwrap_or_default(),
        "--kernel-name",
        "mini",
        "--vcpus",
        "2",
        "--memory",
        "256",
        "--cmdline",
        &cmdline,
        "--disk",
        &format!("path={},id=testdisk", disk.display()),
        "--disk",
        &format!("path={},id=second{direct}", disk2.display()),
        "--control",
        sock.to_str().unwrap_or_default(),
    ]);
    assert!(
        p.wait_for("Run /init as init process", BOOT),
        "{}",
        p.report()
    );
    let out = p.output();
    let release = std::fs::read_to_string(entry.join("release")).unwrap_or_default();
    assert!(
        out.contains(&format!("Linux version {}", release.trim())),
        "{}",
        p.report()
    );
    assert!(
        out.contains("smp: Brought up 1 node, 2 CPUs"),
        "{}",
        p.report()
    );
    let mem = log_line(&out, "Memory: ").unwrap_or_default();
    assert!(mem.contains("K/261"), "256 MiB less the BIOS holes: {mem}");
    assert!(log_line(&out, "Command line:")
        .unwrap_or_default()
        .contains("vmm.test=marker-42"));
    assert!(out.contains("ACPI: PM: (supports S0 S5)"), "{}", p.report());
    // Both disks, found through the ACPI DSDT, in --disk order: 8 MiB =
    // 16384 sectors, 24 MiB = 49152.
    assert!(
        out.contains("[vda] 16384 512-byte logical blocks"),
        "{}",
        p.report()
    );
    // (With direct=on the block size is the host's O_DIRECT alignment.)
    assert!(
        out.contains("[vdb] 49152 512-byte logical blocks")
            || out.contains("[vdb] 6144 4096-byte logical blocks"),
        "{}",
        p.report()
    );
    // The control socket answers while the guest runs.
    let s = Ctl::connect(&sock).status();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["boot_count"], 1, "{s}");
}

#[test]
fn mini_with_one_vcpu_sees_one_cpu() {
    let Some(entry) = library_entry("mini") else {
        return;
    };
    let p = VmmProcess::spawn(&[
        "--kernel-dir",
        entry.parent().and_then(|p| p.to_str()).unwrap_or_default(),
        "--kernel-name",
        "mini",
        "--vcpus",
        "1",
        "--memory",
        "128",
        "--cmdline",
        &mini_cmdline(&entry),
    ]);
    assert!(
        p.wait_for("smp: Brought up 1 node, 1 CPU", BOOT),
        "{}",
        p.report()
    );
    let mem = log_line(&p.output(), "Memory: ")
        .unwrap_or_default()
        .to_string();
    assert!(mem.contains("K/130"), "128 MiB less the BIOS holes: {mem}");
}
