//! Real Linux (the `mini` kernel from the kernel library) under real KVM.
//!
//! Under this machine's kvm_pvm, guest user space cannot make system calls
//! (see README.md), so these tests check what the kernel itself shows and
//! does: its log (CPUs, memory, command line, release, virtio disk), a
//! panic reported through pvpanic, SysRq from the i8042 keyboard, a
//! keyboard-controller reboot and an ACPI S5 power-off — every one of them
//! driven by the real, unmodified kernel code paths.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use tests::control::Ctl;
use tests::{library_entry, TempDir, VmmProcess};

/// One boot of `mini` to init takes minutes under a software KVM.
const BOOT: Duration = Duration::from_secs(600);

/// The kernel's keyboard driver is bound: SysRq keys work from here on.
const KEYBOARD_UP: &str = "input: AT Raw Set 2 keyboard";

fn mini_cmdline(entry: &std::path::Path) -> String {
    let c = std::fs::read_to_string(entry.join("cmdline")).unwrap_or_default();
    // The keyboard must be found through ACPI (PNP0303) so that its IRQ is
    // routed on a hardware-reduced platform (older libraries had nopnp).
    c.split_whitespace()
        .filter(|w| *w != "i8042.nopnp")
        .collect::<Vec<_>>()
        .join(" ")
}

/// Presses Alt+SysRq+`key` once a second until `done` (at most 2 min).
/// Each press is its own connection, and errors are ignored: the VMM may
/// be gone (power-off) or the guest keyboard not ready (press again).
fn press_sysrq_until(sock: &std::path::Path, key: &str, done: impl Fn() -> bool) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !done() && std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(format!("{{\"cmd\":\"sysrq\",\"key\":\"{key}\"}}\n").as_bytes());
            let mut answer = [0u8; 256];
            let _ = s.read(&mut answer);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(done(), "SysRq {key} had no effect in 2 minutes");
}

fn log_line<'a>(out: &'a str, needle: &str) -> Option<&'a str> {
    out.lines().find(|l| l.contains(needle))
}

#[test]
fn mini_boots_panics_reboots_and_powers_off_in_one_process() {
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
    let log = dir.path().join("console.log");
    let cmdline = format!("{} vmm.test=marker-42", mini_cmdline(&entry));
    let mut p = VmmProcess::spawn(&[
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
        "--console-log",
        log.to_str().unwrap_or_default(),
        "--exit-on-poweroff",
    ]);
    let mut sub = Ctl::connect(&sock);
    sub.ok(r#"{"cmd":"subscribe"}"#);

    // Boot 1: the kernel's own view of the machine.
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

    // The init cannot run here (no system calls under kvm_pvm): the kernel
    // panics, pvpanic tells us, and the default panic action resets.
    let ev = sub.wait_event("panic", BOOT).expect("panic event");
    assert_eq!(ev["action"], "reset");
    let ev = sub
        .wait_event("reset", Duration::from_secs(30))
        .expect("reset event");
    assert_eq!(ev["cause"], "panic");
    assert!(
        p.wait_for("--- vmm: boot 2 (reset: panic", BOOT),
        "{}",
        p.report()
    );
    assert!(p.is_alive());

    // Boot 2: once the keyboard is up, Alt+SysRq+B reboots through the
    // keyboard controller (reboot=k).
    assert!(p.wait_for_count(KEYBOARD_UP, 2, BOOT), "{}", p.report());
    let mut c = Ctl::connect(&sock);
    // Keys that arrive while the keyboard driver is still starting are
    // lost (as on hardware): press again until the guest acts.
    press_sysrq_until(&sock, "b", || p.output().contains("--- vmm: boot 3 "));
    assert!(
        p.wait_for("--- vmm: boot 3 (reset: guest", BOOT),
        "{}",
        p.report()
    );
    let s = c.status();
    assert_eq!(s["boot_count"], 3);
    assert_eq!(s["last_reset"], "guest");

    // Boot 3: Alt+SysRq+O powers off through ACPI S5: the process ends with 0.
    assert!(p.wait_for_count(KEYBOARD_UP, 3, BOOT), "{}", p.report());
    // The VMM removes its socket when it exits (--exit-on-poweroff).
    press_sysrq_until(&sock, "o", || !sock.exists());
    let st = p.wait_exit(Duration::from_secs(300));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", p.report());

    // The console log holds every boot, marked.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    for n in 1..=3 {
        assert!(
            text.contains(&format!("--- vmm: boot {n} ")),
            "boot {n} missing from the log"
        );
    }
    assert!(
        text.contains("Run /init as init process"),
        "boot 1 reached init"
    );
    // (The kernel's own "sysrq: ..." lines may not reach the console before
    // it resets or powers off, so they are not asserted.)
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

fn dumpe2fs(image: &std::path::Path) -> String {
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(image)
        .output()
        .expect("dumpe2fs (e2fsprogs) is needed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn field<'a>(dump: &'a str, name: &str) -> &'a str {
    dump.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim_start_matches(':').trim())
        .unwrap_or("")
}

fn sha(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Boots mini with no initramfs and `root=/dev/vda`: the kernel itself
/// mounts the ext4 image through virtio-blk and tries its init; the panic
/// that follows powers the VM off (--on-panic poweroff).
fn boot_root_disk(entry: &std::path::Path, image: &std::path::Path, ro: bool) -> VmmProcess {
    let cmdline = format!("{} root=/dev/vda rootfstype=ext4 rw", mini_cmdline(entry));
    let disk = format!("path={}{}", image.display(), if ro { ",ro=on" } else { "" });
    let mut p = VmmProcess::spawn(&[
        "--kernel",
        entry.join("bzImage").to_str().unwrap_or_default(),
        "--memory",
        "128",
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
        "--on-panic",
        "poweroff",
    ]);
    let st = p.wait_exit(BOOT);
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", p.report());
    p
}

#[test]
fn mini_mounts_an_ext4_root_over_virtio_blk_and_writes_reach_the_image() {
    let Some(entry) = library_entry("mini") else {
        return;
    };
    let src = tests::repo_root().join("build/disks/rootfs.ext4");
    assert!(
        src.is_file(),
        "build/disks/rootfs.ext4 missing: run resources/build-kernels.sh disk"
    );
    let dir = TempDir::new("mini-root");

    // Writable: the guest kernel mounts it read-write, which updates the
    // superblock (mount count, mount time) on the host's image file.
    let img = dir.path().join("root.ext4");
    std::fs::copy(&src, &img).expect("copy image");
    let before = dumpe2fs(&img);
    let p = boot_root_disk(&entry, &img, false);
    assert!(
        p.output()
            .contains("VFS: Mounted root (ext4 filesystem) on device"),
        "{}",
        p.report()
    );
    let after = dumpe2fs(&img);
    let count = |d: &str| field(d, "Mount count").parse::<u32>().unwrap_or(0);
    assert_eq!(count(&after), count(&before) + 1, "{after}");
    assert_ne!(field(&after, "Last mount time"), "n/a", "{after}");

    // Read-only (ro=on): the kernel sees a read-only disk, mounts it
    // read-only, and the image does not change by a single byte.
    let ro_img = dir.path().join("ro.ext4");
    std::fs::copy(&src, &ro_img).expect("copy image");
    let hash = sha(&ro_img);
    let p = boot_root_disk(&entry, &ro_img, true);
    assert!(
        p.output()
            .contains("VFS: Mounted root (ext4 filesystem) readonly"),
        "{}",
        p.report()
    );
    assert_eq!(sha(&ro_img), hash, "a read-only disk changed");
}
