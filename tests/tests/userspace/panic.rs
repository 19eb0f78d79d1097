//! A kernel panic inside the guest reaches the VMM through pvpanic and the
//! configured action runs.

use std::time::Duration;

use tests::guest::{scenario, Spec, INIT_OK};

use crate::boot;

const CRASH: &str = "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger\n";

#[test]
fn a_guest_kernel_panic_raises_the_panic_event_and_resets_by_default() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini"));
        let mut sub = g.ctl();
        sub.ok(r#"{"cmd":"subscribe"}"#);
        g.vmm.send(CRASH);
        let ev = sub
            .wait_event("panic", Duration::from_secs(60))
            .expect("panic event");
        assert_eq!(ev["action"], "reset", "{ev}");
        let ev = sub
            .wait_event("reset", Duration::from_secs(30))
            .expect("reset event");
        assert_eq!(ev["cause"], "panic", "{ev}");
        g.expect("--- vmm: boot 2 (reset: panic", Duration::from_secs(60));
        assert!(g
            .vmm
            .output()
            .contains("Kernel panic - not syncing: sysrq triggered crash"));
        // And the guest comes back to user space in the same process.
        g.expect_count(INIT_OK, 2, tests::guest::BOOT);
        assert!(g.vmm.is_alive());
    });
}

#[test]
fn a_guest_kernel_panic_with_on_panic_pause_leaves_the_vm_paused() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini").args(&["--on-panic", "pause"]));
        let mut sub = g.ctl();
        sub.ok(r#"{"cmd":"subscribe"}"#);
        g.vmm.send(CRASH);
        let ev = sub
            .wait_event("panic", Duration::from_secs(60))
            .expect("panic event");
        assert_eq!(ev["action"], "pause", "{ev}");
        let s = g
            .ctl()
            .wait_status(Duration::from_secs(30), |s| s["state"] == "paused");
        assert_eq!(s["state"], "paused", "{s}");
        assert_eq!(s["boot_count"], 1, "{s}");
        // The customer can still reset it from the control socket.
        g.ctl().ok(r#"{"cmd":"reset"}"#);
        g.expect_count(INIT_OK, 2, tests::guest::BOOT);
    });
}
