//! Boot, user space, and what the guest sees of its machine.

use tests::guest::{entry_release, scenario, NetNs, Spec};

use crate::boot;

#[test]
fn mini_runs_user_space_and_sees_its_cpus_memory_and_command_line() {
    scenario(|h| {
        let mut g = boot(
            h,
            Spec::new("mini")
                .vcpus(2)
                .memory(256)
                .cmdline("vmm.test=marker-42"),
        );
        let out = g.run("uname -r; nproc; grep MemTotal /proc/meminfo; cat /proc/cmdline");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.first().copied(),
            Some(entry_release("mini").as_str()),
            "{out}"
        );
        assert_eq!(lines.get(1).copied(), Some("2"), "{out}");
        let kib: u64 = lines
            .get(2)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            (200_000..=262_144).contains(&kib),
            "MemTotal of a 256 MiB guest: {out}"
        );
        assert!(out.contains("vmm.test=marker-42"), "{out}");
    });
}

/// A Debian kernel (generic, with `VIRTIO_MMIO=m` and no command-line
/// devices) finds the virtio disk and NIC through the ACPI DSDT, with its
/// own modules loaded by the initramfs.
fn debian_finds_vda_and_eth0(kernel: &str) {
    scenario(|h| {
        let ns = NetNs::new(h, "deb");
        let dir = tests::guest::HostDir::new(h, kernel);
        let disk = dir.join("scratch.img");
        h.sh(&format!("truncate -s 16M {disk}")).ok("scratch disk");
        let spec = Spec::new(kernel)
            .name(&format!("g-{kernel}"))
            .vcpus(2)
            .memory(512)
            .netns(&ns)
            .args(&[
                "--disk",
                &format!("path={disk},id=scratch-1"),
                "--net",
                "tap=tap0",
            ]);
        let mut g = tests::guest::Guest::start_in(h, spec, dir);
        g.wait_shell(tests::guest::INIT_OK);
        let out = g.run(
            "uname -r; ls -1 /sys/block; ls -1 /sys/class/net; cat /sys/block/vda/serial; echo; \
                         cat /sys/block/vdb/serial; echo; \
                         ls -l /sys/bus/virtio/devices/ | grep -c LNRO0005",
        );
        assert!(out.contains(&entry_release(kernel)), "{out}");
        assert!(out.lines().any(|l| l.trim() == "vda"), "no vda: {out}");
        assert!(out.lines().any(|l| l.trim() == "eth0"), "no eth0: {out}");
        assert!(out.contains("scratch-1"), "the disk's serial: {out}");
        // After the customer's disk, the library's modules disk.
        assert!(out.contains("vmm-modules"), "no modules disk: {out}");
        // The three virtio devices (scratch disk, modules disk, NIC) hang
        // off ACPI LNRO0005 nodes (the DSDT).
        assert!(out.lines().last().map(str::trim) == Some("3"), "{out}");
        let log = g.vmm.output();
        let loaded = log
            .lines()
            .find(|l| l.contains("vmm-init: modules loaded:"))
            .unwrap_or_default();
        for m in ["virtio_mmio", "virtio_blk", "virtio_net"] {
            assert!(loaded.contains(m), "{m} not loaded: {loaded}");
        }
        assert!(!log.contains("vmm-init: modules failed"), "{}", g.report());
    });
}

#[test]
fn debian_6_1_finds_vda_and_eth0_through_acpi_with_its_own_modules() {
    debian_finds_vda_and_eth0("debian-6.1");
}

#[test]
fn debian_6_12_finds_vda_and_eth0_through_acpi_with_its_own_modules() {
    debian_finds_vda_and_eth0("debian-6.12");
}
