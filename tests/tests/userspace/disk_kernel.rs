//! Kernels from the customer's own disk (`--kernel-name disk`): the VMM
//! boots the newest `/boot/vmlinuz-*` of the guest's root file system
//! with its initrd, so a kernel the customer installs is booted at their
//! next reboot, and a `/boot` they broke is rescued with a library kernel.
//! The disk here is an ext4 image whose `/boot` holds the library's mini
//! kernel under Debian's file names (`mkfs.ext4 -d`, as the server image).

use std::time::Duration;

use tests::guest::{entry_release, scenario, Guest, HostDir, Spec, BOOT, INIT_OK};

#[test]
fn a_kernel_installed_in_the_guests_boot_is_booted_at_its_next_reboot_and_a_broken_boot_is_rescued_with_a_library_kernel(
) {
    scenario(|h| {
        let dir = HostDir::new(h, "diskk");
        let release = entry_release("mini");
        let lib = tests::kernel_dir().join("mini");
        let img = dir.join("root.img");
        let root = dir.join("root");
        h.sh(&format!(
            "set -e; mkdir -p {root}/boot; \
             cp {lib}/bzImage {root}/boot/vmlinuz-{release}; \
             cp {lib}/initrd.img {root}/boot/initrd.img-{release}; \
             mkfs.ext4 -q -F -d {root} {img} 64M",
            lib = lib.display()
        ))
        .ok("the guest's disk");
        let spec = Spec::new("mini")
            .kernel_name("disk")
            .args(&["--disk", &format!("path={img}")]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(INIT_OK);
        assert_eq!(g.run("uname -r").trim(), release);
        let mut ctl = g.ctl();
        assert_eq!(ctl.status()["kernel"], format!("disk:{release}"));
        let list = ctl.ok(r#"{"cmd":"kernels"}"#);
        let names: Vec<&str> = list["kernels"]
            .as_array()
            .map(|a| a.iter().filter_map(|k| k["name"].as_str()).collect())
            .unwrap_or_default();
        for want in ["mini", "disk", &format!("disk:{release}")] {
            assert!(names.contains(&want), "{want} not in {list}");
        }

        // The customer installs a newer kernel (here: the same one under a
        // newer version) and reboots: the newest in /boot boots.
        let newer = release.replacen("6.1.", "6.1.9", 1);
        assert_ne!(newer, release);
        g.run(&format!(
            "mkdir -p /mnt && mount /dev/vda /mnt && \
             cp /mnt/boot/vmlinuz-{release} /mnt/boot/vmlinuz-{newer} && \
             cp /mnt/boot/initrd.img-{release} /mnt/boot/initrd.img-{newer} && \
             umount /mnt && sync"
        ));
        let from = g.vmm.len();
        g.vmm.send("reboot -f\n");
        g.expect_from(from, &format!("kernel disk:{newer}"), BOOT);
        g.expect_count(INIT_OK, 2, BOOT);
        g.wait_shell(INIT_OK);
        assert_eq!(ctl.status()["kernel"], format!("disk:{newer}"));

        // They break /boot: the next boot fails with a clear event and
        // the VM stops (not a dead VMM); a library kernel rescues it.
        g.run("mount /dev/vda /mnt && rm /mnt/boot/vmlinuz-* && umount /mnt && sync");
        let mut events = g.ctl();
        events.ok(r#"{"cmd":"subscribe"}"#);
        g.vmm.send("reboot -f\n");
        let e = events
            .wait_event("boot_failed", BOOT)
            .unwrap_or_else(|| panic!("no boot_failed event\n{}", g.report()));
        assert!(
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("no ext4 file system with kernels in /boot")),
            "{e}"
        );
        let s = ctl.wait_status(Duration::from_secs(10), |s| s["state"] == "stopped");
        assert_eq!(s["state"], "stopped", "{s}");
        assert!(g.vmm.is_alive(), "the VMM exited on a failed boot");
        ctl.ok(r#"{"cmd":"set-kernel","name":"mini"}"#);
        ctl.ok(r#"{"cmd":"start"}"#);
        g.expect_count(INIT_OK, 3, BOOT);
        assert_eq!(ctl.status()["kernel"], "mini");
    });
}
