//! A hostile guest against a real VMM process: guest code aimed at the
//! VMM's own timers, and power actions racing a pending graceful stop.

use std::time::{Duration, Instant};

use tests::control::Ctl;
use tests::tiny::{vmm_command, Asm};
use tests::{TempDir, VmmProcess};

struct Vm {
    dir: TempDir,
    p: VmmProcess,
}

impl Vm {
    fn ctl(&self) -> Ctl {
        Ctl::connect(&self.dir.path().join("control.sock"))
    }
}

fn start(tag: &str, asm: &Asm) -> Vm {
    let dir = TempDir::new(tag);
    let sock = dir.path().join("control.sock");
    let p = VmmProcess::spawn_cmd(&mut vmm_command(dir.path(), "hostile", asm, &sock));
    Vm { dir, p }
}

const T: Duration = Duration::from_secs(20);

/// Says GOT-KEY when the first keyboard byte (Ctrl-Alt-Del's scancodes)
/// arrives, so the test knows its request is in, then ignores everything.
fn deaf_guest() -> Asm {
    let mut a = Asm::new();
    a.print("READY\r\n");
    a.wait_i8042_byte().print("GOT-KEY\r\n");
    a.code.push(0xfa);
    a.spin();
    a
}

#[test]
fn a_guest_arming_and_stopping_a_zero_second_watchdog_in_a_loop_cannot_wedge_the_vmm() {
    // mov al,15; out 0x443,al (arm, 0 s); out 0x441,al (stop); jmp back.
    // The host timer fires and is cleared again before the event loop
    // reads it: a blocking read there would wait forever.
    let mut a = Asm::new();
    a.print("READY\r\n");
    let top = a.here();
    a.outb(0x443, 15).outb(0x441, 15).jmp_back(top);
    let mut vm = start("wdt-hammer", &a);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut c = vm.ctl();
    let t0 = Instant::now();
    let mut answers = 0;
    let mut slowest = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        assert_eq!(c.status()["state"], "running");
        slowest = slowest.max(t.elapsed());
        answers += 1;
    }
    eprintln!("{answers} status answers in 5 s, slowest {slowest:?}");
    vm.p.child.signal(libc::SIGTERM).expect("SIGTERM");
    let status = vm.p.wait_exit(T);
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM did not end the VMM: {status:?}\n{}",
        vm.p.report()
    );
}

#[test]
fn a_vm_powered_off_while_a_reboot_was_pending_stays_off() {
    let vm = start("halt-stays", &deaf_guest());
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut waiter = vm.ctl();
    waiter.send_line(r#"{"cmd":"reboot","timeout_s":2}"#);
    let mut sub = vm.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    // The reboot is pending once the guest got its Ctrl-Alt-Del; the
    // poweroff that follows overtakes it.
    assert!(vm.p.wait_for("GOT-KEY", T), "{}", vm.p.report());
    let mut c = vm.ctl();
    c.ok(r#"{"cmd":"poweroff"}"#);
    let r = waiter.read_value();
    assert_eq!(r["result"], "superseded", "{r}");
    // Past the reboot's deadline: no boot, no state change.
    let ev = sub.wait_event("boot", Duration::from_secs(4));
    assert!(ev.is_none(), "the VM booted again by itself: {ev:?}");
    let s = c.status();
    assert_eq!(s["state"], "stopped", "{s}");
    assert_eq!(s["boot_count"], 1, "{s}");
}

#[test]
fn a_vm_started_again_after_a_pending_shutdown_keeps_running() {
    let vm = start("start-stays", &deaf_guest());
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut waiter = vm.ctl();
    waiter.send_line(r#"{"cmd":"shutdown","timeout_s":2}"#);
    assert!(vm.p.wait_for("GOT-KEY", T), "{}", vm.p.report());
    let mut c = vm.ctl();
    c.ok(r#"{"cmd":"poweroff"}"#);
    c.ok(r#"{"cmd":"start"}"#);
    assert!(vm.p.wait_for_count("READY", 2, T), "{}", vm.p.report());
    let r = waiter.read_value();
    assert_eq!(r["result"], "superseded", "{r}");
    let mut sub = vm.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let ev = sub.wait_event("state_changed", Duration::from_secs(4));
    assert!(ev.is_none(), "the shutdown's deadline still acted: {ev:?}");
    let s = c.status();
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["boot_count"], 2, "{s}");
}

#[test]
fn a_second_graceful_request_replaces_the_first_and_both_are_answered() {
    let vm = start("replace", &deaf_guest());
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut first = vm.ctl();
    first.send_line(r#"{"cmd":"reboot","timeout_s":30}"#);
    assert!(vm.p.wait_for("GOT-KEY", T), "{}", vm.p.report());
    let mut second = vm.ctl();
    let mut c = vm.ctl();
    let t0 = Instant::now();
    let r2 = second.ok(r#"{"cmd":"shutdown","timeout_s":1}"#);
    assert_eq!(r2["result"], "forced", "{r2}");
    let r1 = first.read_value();
    assert_eq!(r1["result"], "superseded", "{r1}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(c.status()["state"], "stopped");
}

#[test]
fn a_pvpanic_storm_runs_the_alert_hook_once_logs_a_bounded_number_of_lines_and_leaks_no_descriptor()
{
    // 100 000 panics as fast as the guest can write the port, then an ACPI
    // poweroff: events are handled in order, so `stopped` means every panic
    // before it was handled too.
    const PANICS: u32 = 100_000;
    let mut a = Asm::new();
    a.print("READY\r\n");
    a.code.push(0xb9); // mov ecx, PANICS
    a.code.extend_from_slice(&PANICS.to_le_bytes());
    let top = a.here();
    a.outb(0x505, 1);
    let rel = top as i64 - (a.here() as i64 + 2);
    a.code.extend_from_slice(&[0xe2, rel as i8 as u8]); // loop top
    a.print("STORM-DONE\r\n").outb(0x600, 0x34).spin();

    let dir = TempDir::new("panic-storm");
    let sock = dir.path().join("control.sock");
    let (out, fds) = (dir.path().join("hook.txt"), dir.path().join("fds.txt"));
    // The hook lists its own shell's descriptors: whatever the VMM leaked to
    // it (eventfds, KVM, the control socket) shows up there.
    let hook = format!(
        "ls -l /proc/$$/fd/ > {}; echo \"$VMM_EVENT $VMM_COALESCED\" >> {}",
        fds.display(),
        out.display()
    );
    let mut cmd = vmm_command(dir.path(), "storm", &a, &sock);
    cmd.args(["--on-panic", "none", "--alert-hook", &hook]);
    let mut p = VmmProcess::spawn_cmd(&mut cmd);
    assert!(p.wait_for("READY", T), "{}", p.report());
    let mut c = Ctl::connect(&sock);
    let s = c.wait_status(Duration::from_secs(120), |s| s["state"] == "stopped");
    assert_eq!(s["state"], "stopped", "{s}\n{}", p.report());
    // The console's last line may reach us after the state changed.
    assert!(p.wait_for("STORM-DONE", T), "{}", p.report());
    let deadline = Instant::now() + T;
    let hook_lines = || std::fs::read_to_string(&out).unwrap_or_default();
    while hook_lines().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.status()["state"], "stopped", "the control socket answers");
    p.child.signal(libc::SIGTERM).expect("SIGTERM");
    assert!(
        p.wait_exit(T).is_some_and(|s| s.success()),
        "{}",
        p.report()
    );

    let lines = hook_lines();
    assert_eq!(
        lines.trim(),
        "panic 0",
        "the hook ran more than once:\n{lines}"
    );
    let listing = std::fs::read_to_string(&fds).unwrap_or_default();
    for leak in [
        "anon_inode",
        "socket:",
        "/dev/kvm",
        "/dev/net/tun",
        "control.sock",
    ] {
        assert!(
            !listing.contains(leak),
            "the alert hook inherited a VMM descriptor ({leak}):\n{listing}"
        );
    }
    let logged = p.stderr().matches("guest kernel panicked").count();
    eprintln!("{PANICS} guest panics: {logged} log lines");
    assert!(
        (1..=devices::ratelimit::BURST as usize + 5).contains(&logged),
        "{logged} log lines for {PANICS} guest panics"
    );
}
