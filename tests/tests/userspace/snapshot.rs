//! The operator's `snapshot` and `vmm --restore`: a guest saved while it
//! counts and holds a TCP connection open, its VMM killed, and a new VMM
//! process continuing it from the files: no reboot, the counter goes on,
//! the connection still carries data.

use std::time::Duration;

use tests::guest::{scenario, Guest, HostDir, NetNs, Spec, INIT_OK};

use crate::connection::{counter, counter_after, echo_of, echo_server, guest_with_a_connection};

/// The restored VMM's `status`, or its report if it is gone.
fn restored_status(g: &Guest) -> serde_json::Value {
    assert!(
        g.vmm
            .wait_for("restored from snapshot", Duration::from_secs(120)),
        "no restore marker on the console\n{}",
        g.report()
    );
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.ctl().status()))
        .unwrap_or_else(|_| panic!("the restored VMM does not answer\n{}", g.report()))
}

fn a_restored_vm_runs_on(vhost: &str) {
    scenario(|h| {
        let ns = NetNs::new(h, "snap");
        let dir = HostDir::new(h, "snapshot");
        let snaps = dir.join("snapshots");
        h.sh(&format!("mkdir {snaps}")).ok("mkdir");
        let spec = Spec::new("mini").netns(&ns).args(&[
            "--net",
            &format!("tap=tap0,mac=52:54:00:12:34:60,vhost={vhost}"),
            "--snapshot-dir",
            &snaps,
        ]);
        let mut g = Guest::start_in(h, spec, dir);
        // The host's side of the connection: an echo server.
        let mut echo = echo_server(&ns);
        guest_with_a_connection(&mut g);
        let counted = counter(&mut g);
        let boot_count = g.ctl().status()["boot_count"].clone();

        let r = g.ctl().ok(r#"{"cmd":"snapshot","dir":"s1"}"#);
        eprintln!("snapshot of a 256 MiB mini guest (test host, vhost={vhost}): {r}");
        assert_eq!(r["stopped"], false, "{r}");
        assert_eq!(r["memory_bytes"], 256u64 << 20, "{r}");
        // The source runs on after it.
        let after_snapshot = counter(&mut g);
        assert!(after_snapshot >= counted, "{after_snapshot} < {counted}");

        // A new process continues it; the old one is killed.
        let snapshot = format!("{snaps}/s1");
        let mut g = g.restart_with(&["--restore", &snapshot]);
        let s = restored_status(&g);
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(
            s["boot_count"], boot_count,
            "the same boot, not a new one: {s}"
        );
        let first = counter(&mut g);
        let later = counter_after(&mut g, 3);
        assert!(
            first >= counted && later > first,
            "the counter goes on from {counted}: {first}, then {later}\n{}",
            g.report()
        );
        assert!(
            echo_of(&mut g, "after").contains("after"),
            "the TCP connection survives the restore\n{}",
            g.report()
        );
        assert!(
            !g.vmm.output().contains("Linux version"),
            "the restored guest did not boot again\n{}",
            g.report()
        );
        let _ = echo.kill();
    });
}

#[test]
fn a_vm_restored_from_a_snapshot_in_a_new_process_keeps_counting_and_keeps_its_tcp_connection() {
    a_restored_vm_runs_on("off");
}

#[test]
fn a_vm_on_vhost_net_restored_from_a_snapshot_keeps_its_tcp_connection() {
    a_restored_vm_runs_on("on");
}

#[test]
fn a_snapshot_with_stop_powers_the_vm_off_and_a_corrupt_snapshot_is_refused_with_a_clear_error() {
    scenario(|h| {
        let dir = HostDir::new(h, "snapstop");
        let snaps = dir.join("snapshots");
        h.sh(&format!("mkdir {snaps}")).ok("mkdir");
        let spec = Spec::new("mini").args(&["--snapshot-dir", &snaps]);
        let mut g = Guest::start_in(h, spec, dir);
        g.wait_shell(INIT_OK);
        g.run("echo kept >/tmp/mark");
        let r = g.ctl().ok(r#"{"cmd":"snapshot","dir":"s1","stop":true}"#);
        assert_eq!(r["stopped"], true, "{r}");
        let s = g.ctl().status();
        assert_eq!(s["state"], "stopped", "{s}");
        // Taken once: a second snapshot of that name is refused.
        let again = g.ctl().call(r#"{"cmd":"snapshot","dir":"s1"}"#);
        assert_eq!(again["ok"], false, "{again}");

        // A copy with one byte of its state changed: refused, said why.
        h.sh(&format!(
            "cp -r {snaps}/s1 {snaps}/bad && \
             printf 'X' | dd of={snaps}/bad/state bs=1 seek=200 conv=notrunc 2>/dev/null"
        ))
        .ok("a damaged copy");
        let mut bad = g.restart_with(&["--restore", &format!("{snaps}/bad")]);
        let st = bad.vmm.wait_exit(Duration::from_secs(60));
        assert!(st.is_some_and(|s| !s.success()), "{st:?}");
        let err = bad.vmm.stderr();
        assert!(
            err.contains("corrupt"),
            "the VMM says the snapshot is corrupt: {err}"
        );
        // The good one continues where it stopped.
        let mut g = bad.restart_with(&["--restore", &format!("{snaps}/s1")]);
        assert_eq!(g.run("cat /tmp/mark").trim(), "kept", "{}", g.report());
    });
}
