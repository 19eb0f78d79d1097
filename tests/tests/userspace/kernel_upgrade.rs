//! A kernel upgrade as on a co-located Debian machine: the customer's
//! server, booted with a library kernel, installs Debian's own kernel
//! package from a local file (`dpkg -i`: its initrd is made in the guest
//! by initramfs-tools), chooses its disk's kernel and reboots into it, with
//! Debian's own initrd finding its root on virtio-mmio; then the customer
//! rescues it with a library kernel from the control socket.

use tests::guest::{entry_release, kernel_dir, NetNs, BOOT, GUEST_IP, INIT_OK};

use crate::server::{assert_systemd_running, server, ssh_to, LOGIN};

/// The library entry's Debian package, as `resources/build-kernels.sh`
/// downloaded it (`<entry>/package` names it).
fn entry_package(entry: &str) -> String {
    let pin = std::fs::read_to_string(kernel_dir().join(entry).join("package"))
        .unwrap_or_else(|e| panic!("{entry}/package: {e}"));
    let (name, version) = pin
        .trim()
        .split_once('=')
        .unwrap_or_else(|| panic!("{entry}/package: {pin:?} is not NAME=VERSION"));
    let cache = std::env::var("VMM_CACHE").unwrap_or_else(|_| "/var/cache/vmm-guest".into());
    let deb = format!(
        "{cache}/debian/dl/{name}_{}_amd64.deb",
        version.replace(':', "%3a")
    );
    assert!(
        std::path::Path::new(&deb).is_file(),
        "{deb} is missing: resources/build-kernels.sh {entry} downloads it \
         (remove build/kernels/{entry} to make it run again)"
    );
    deb
}

// In the test host, the boot of the disk's Debian kernel once took the
// test host's QEMU down in five of six runs (docs/notes.md, "Kernels from
// the customer's disk"); since the library's Debian entries boot with
// loglevel=4 (fewer traps, shorter boots) it passed three runs of three.
#[test]
fn a_debian_kernel_package_installed_in_the_server_boots_at_its_reboot_and_a_library_kernel_rescues_it(
) {
    tests::guest::scenario(|h| {
        let deb = entry_package("debian-6.1");
        let release = entry_release("debian-6.1");
        let library = entry_release("debian-6.12");
        let ns = NetNs::new(h, "upgrade");
        let g = server(h, &ns, "debian-6.12");
        assert_eq!(ssh_to(&ns, GUEST_IP, "uname -r").trim(), library);

        // The package reaches the guest as a file (it has no mirror), and
        // installs the customer's way.
        let key = tests::repo_root().join("build/keys/test_ed25519");
        ns.sh(&format!(
            "scp -q -i {} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             {deb} root@{GUEST_IP}:/root/linux-image.deb",
            key.display()
        ))
        .ok("copy the kernel package into the guest");
        let out = ssh_to(
            &ns,
            GUEST_IP,
            "dpkg -i /root/linux-image.deb >/root/dpkg.log 2>&1 || { tail -20 /root/dpkg.log; exit 1; }; ls /boot",
        );
        for f in [
            format!("vmlinuz-{release}"),
            format!("initrd.img-{release}"),
        ] {
            assert!(out.lines().any(|l| l == f), "no /boot/{f}:\n{out}");
        }

        // Its disk's kernel for the next boot, and a reboot through systemd.
        let mut ctl = g.ctl();
        ctl.ok(r#"{"cmd":"set-kernel","name":"disk"}"#);
        let from = g.vmm.len();
        let r = g.graceful(&mut ctl, r#"{"cmd":"reboot","timeout_s":300}"#);
        assert_eq!(r["result"], "graceful", "{r}\n{}", g.report());
        g.expect_from(from, &format!("kernel disk:{release}"), BOOT);
        g.expect_from(from, LOGIN, BOOT);
        assert_eq!(ssh_to(&ns, GUEST_IP, "uname -r").trim(), release);
        // Debian's own initrd (initramfs-tools) found the root, not the
        // library's.
        let boot = g.vmm.output_from(from);
        assert!(
            boot.contains("Begin: Mounting root file system") && !boot.contains("vmm-init:"),
            "not booted through Debian's initrd:\n{boot}"
        );
        assert_systemd_running(&ns);
        // Its modules are its own now, on its disk: modprobe works.
        let m = ssh_to(
            &ns,
            GUEST_IP,
            "findmnt -n /lib/modules/$(uname -r) || echo on-root; \
             modprobe nf_tables && lsmod | grep -c '^nf_tables '",
        );
        assert_eq!(m.lines().next(), Some("on-root"), "{m}");
        assert_eq!(m.lines().last().map(str::trim), Some("1"), "{m}");
        assert_eq!(ctl.status()["kernel"], format!("disk:{release}"));

        // Rescue: back to a library kernel from the control socket.
        // (The library's mini: a rescue kernel's own initramfs shell; a
        // third boot of Debian would only add to the test host's odds of
        // its emulator fault.)
        ctl.ok(r#"{"cmd":"set-kernel","name":"mini"}"#);
        let from = g.vmm.len();
        let r = g.graceful(&mut ctl, r#"{"cmd":"reboot","timeout_s":300}"#);
        assert_eq!(r["result"], "graceful", "{r}\n{}", g.report());
        g.expect_from(from, "kernel mini", BOOT);
        g.expect_from(
            from,
            &format!("{INIT_OK} release={}", entry_release("mini")),
            BOOT,
        );
        let s = ctl.status();
        assert_eq!(
            (s["kernel"].as_str(), s["boot_count"].as_u64()),
            (Some("mini"), Some(3)),
            "{s}"
        );
    });
}
