//! Power actions reach a real guest's init, and a reboot — from the guest,
//! from the control socket, from the keyboard, onto another kernel — comes
//! back in the same process.

use std::time::Duration;

use tests::guest::{entry_release, scenario, Spec, BOOT, INIT_OK};

use crate::boot;

#[test]
fn shutdown_reaches_the_guests_init_and_the_vm_stops_cleanly() {
    scenario(|h| {
        // busybox init maps Ctrl-Alt-Del to poweroff (resources/README.md).
        let mut g = boot(h, Spec::new("mini").cmdline("vmm.init=busybox"));
        g.run("echo ready");
        let mut ctl = g.ctl();
        let r = g.graceful(&mut ctl, r#"{"cmd":"shutdown","timeout_s":60}"#);
        assert_eq!(r["result"], "graceful", "{r}");
        assert!(
            g.vmm.output().contains("vmm-init: shutting down"),
            "{}",
            g.report()
        );
        let s = ctl.status();
        assert_eq!(s["state"], "stopped", "{s}");
        assert!(g.vmm.is_alive(), "the VMM exited on a guest poweroff");
        // The customer starts it again.
        ctl.ok(r#"{"cmd":"start"}"#);
        g.expect_count(INIT_OK, 2, BOOT);
    });
}

// Reboots are split over two tests of three boots each: in the test host
// every boot risks the emulator's fault (docs/notes.md), and a short test
// that met it is cheaper to run again.

#[test]
fn a_reboot_from_the_guest_and_one_from_the_socket_stay_in_one_process() {
    scenario(|h| {
        let mut g = boot(
            h,
            Spec::new("mini").cmdline("vmm.init=busybox vmm.cad=reboot"),
        );
        let pid = g.vmm.child.id();
        // 1. The guest reboots itself.
        g.vmm.send("reboot -f\n");
        g.expect("--- vmm: boot 2 (reset: guest", BOOT);
        g.expect_count(INIT_OK, 2, BOOT);
        // 2. A graceful reboot from the control socket (Ctrl-Alt-Del → init).
        let mut ctl = g.ctl();
        let r = g.graceful(&mut ctl, r#"{"cmd":"reboot","timeout_s":120}"#);
        assert_eq!(r["result"], "graceful", "{r}");
        g.expect_count(INIT_OK, 3, BOOT);
        let s = ctl.status();
        assert_eq!(s["boot_count"], 3, "{s}\n{}", g.report());
        assert_eq!(s["last_reset"], "reboot", "{s}\n{}", g.report());
        assert_eq!(g.vmm.child.id(), pid);
        assert!(g.vmm.is_alive());
    });
}

#[test]
fn a_reset_from_the_socket_and_sysrq_b_on_the_keyboard_stay_in_one_process() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini").cmdline("vmm.init=busybox"));
        let pid = g.vmm.child.id();
        // 1. A hard reset from the control socket.
        let mut ctl = g.ctl();
        ctl.ok(r#"{"cmd":"reset"}"#);
        g.expect_count(INIT_OK, 2, BOOT);
        // 2. Alt+SysRq+B on the emulated keyboard: the kernel reboots at
        // once. The shell is up, so its keyboard driver is bound: one
        // press must do. (Pressing again while the reboot is on its way
        // would land in the next boot and reboot that one too.)
        g.run("echo keyboard-ready");
        let from = g.vmm.len();
        ctl.ok(r#"{"cmd":"sysrq","key":"b"}"#);
        g.expect_from(from, "--- vmm: boot 3 ", Duration::from_secs(60));
        g.expect_count(INIT_OK, 3, BOOT);
        let s = ctl.status();
        assert_eq!(s["boot_count"], 3, "{s}\n{}", g.report());
        assert_eq!(s["last_reset"], "guest", "{s}\n{}", g.report());
        assert_eq!(g.vmm.child.id(), pid);
        assert!(g.vmm.is_alive());
    });
}

// In the test host its reboots into Debian kernels once met the
// emulator's fault in every run (docs/notes.md); since the library's
// Debian entries boot with loglevel=4 it passed three runs of three.
#[test]
fn set_kernel_switches_mini_to_debian_6_1_to_debian_6_12_across_reboots() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini").vcpus(2).memory(512).entry_cmdline());
        assert_eq!(g.run("uname -r").trim(), entry_release("mini"));
        let mut ctl = g.ctl();
        for (n, next) in ["debian-6.1", "debian-6.12"].into_iter().enumerate() {
            let r = ctl.ok(&format!(r#"{{"cmd":"set-kernel","name":"{next}"}}"#));
            assert_eq!(r["next"], next, "{r}");
            let from = g.vmm.len();
            g.vmm.send("reboot -f\n");
            g.expect_from(from, &format!("kernel {next}"), BOOT);
            g.expect_count(INIT_OK, n + 2, BOOT);
            g.wait_shell(INIT_OK);
            assert_eq!(g.run("uname -r").trim(), entry_release(next));
            assert_eq!(ctl.status()["kernel"], next);
        }
    });
}
