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
