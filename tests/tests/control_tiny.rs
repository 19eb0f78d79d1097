//! The control socket against a real VMM process running tiny guests:
//! every command, graceful and forced stops, the watchdog, pvpanic, kernel
//! switching, access control, console and concurrency.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::control::Ctl;
use tests::tiny::{vmm_command, write_guest, Asm};
use tests::{TempDir, VmmProcess};

struct Vm {
    dir: TempDir,
    p: VmmProcess,
}

impl Vm {
    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("run/vm1/control.sock")
    }
    fn ctl(&self) -> Ctl {
        Ctl::connect(&self.sock())
    }
}

fn start(tag: &str, asm: &Asm, extra: &[&str]) -> Vm {
    let dir = TempDir::new(tag);
    let sock = dir.path().join("run/vm1/control.sock");
    let p = VmmProcess::spawn_cmd(vmm_command(dir.path(), "vm1", asm, &sock).args(extra));
    Vm { dir, p }
}

fn ready_then(asm_tail: impl FnOnce(&mut Asm)) -> Asm {
    let mut a = Asm::new();
    a.print("READY\r\n");
    asm_tail(&mut a);
    a
}

const T: Duration = Duration::from_secs(20);

#[test]
fn status_pause_resume_reset_poweroff_start_on_a_wedged_guest() {
    // cli; jmp $: the guest can do nothing for itself any more.
    let vm = start(
        "lifecycle",
        &ready_then(|a| {
            a.code.push(0xfa);
            a.spin();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let mut c = vm.ctl();
    let s = c.status();
    assert_eq!(s["state"], "running");
    assert_eq!(s["name"], "vm1");
    assert_eq!(s["vcpus"], 1);
    assert_eq!(s["memory_mib"], 64);
    assert_eq!(s["boot_count"], 1);

    c.ok(r#"{"cmd":"pause"}"#);
    assert_eq!(c.status()["state"], "paused");
    let e = c.call(r#"{"cmd":"pause"}"#);
    assert_eq!(e["ok"], false, "pausing twice is an error: {e}");
    assert_eq!(e["code"], "invalid_state", "{e}");
    c.ok(r#"{"cmd":"resume"}"#);
    assert_eq!(c.status()["state"], "running");

    c.ok(r#"{"cmd":"reset"}"#);
    assert!(vm.p.wait_for_count("READY", 2, T), "{}", vm.p.report());
    let s = c.status();
    assert_eq!(s["boot_count"], 2);
    assert_eq!(s["last_reset"], "command");

    c.ok(r#"{"cmd":"poweroff"}"#);
    let s = c.status();
    assert_eq!(s["state"], "stopped");
    assert_eq!(s["uptime_ms"], 0);
    c.ok(r#"{"cmd":"start"}"#);
    assert!(vm.p.wait_for_count("READY", 3, T), "{}", vm.p.report());
    assert_eq!(c.status()["boot_count"], 3);
    let e = c.call(r#"{"cmd":"start"}"#);
    assert_eq!(e["ok"], false, "start while running: {e}");
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays_usable() {
    let mut vm = start(
        "malformed",
        &ready_then(|a| {
            a.cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    for bad in [
        "{not json",
        "[]",
        r#"{"cmd":"fly"}"#,
        r#"{"cmd":"set-kernel"}"#,
        r#"{"cmd":"shutdown","timeout_s":"soon"}"#,
        r#"{"cmd":"set-watchdog","action":"explode"}"#,
        r#"{"cmd":"sysrq","key":"zz"}"#,
    ] {
        let v = c.call(bad);
        assert_eq!(v["ok"], false, "{bad} -> {v}");
        let msg = v["error"].as_str().unwrap_or_default();
        assert!(!msg.is_empty() && !msg.contains('\n'), "{bad} -> {v}");
        assert_eq!(v["code"], "bad_request", "{bad} -> {v}");
    }
    // A line far over the limit is refused without killing the VMM.
    let huge = format!(r#"{{"cmd":"status","x":"{}"}}"#, "a".repeat(200_000));
    let v = c.call(&huge);
    assert_eq!(v["ok"], false);
    assert_eq!(c.status()["state"], "running");
    assert!(vm.p.is_alive());
}

#[test]
fn graceful_shutdown_reaches_a_listening_guest() {
    // The guest waits for a key (Ctrl-Alt-Del arrives as scancodes), then
    // powers itself off through ACPI S5.
    let vm = start(
        "shutdown",
        &ready_then(|a| {
            a.wait_i8042_byte()
                .print("GOT-KEY\r\n")
                .outb(0x600, 0x34)
                .cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    let v = c.ok(r#"{"cmd":"shutdown","timeout_s":30}"#);
    assert_eq!(v["result"], "graceful", "{v}");
    assert!(vm.p.output().contains("GOT-KEY"));
    assert_eq!(c.status()["state"], "stopped");
}

#[test]
fn shutdown_of_a_deaf_guest_takes_the_hard_action_at_the_timeout() {
    let vm = start(
        "deaf",
        &ready_then(|a| {
            a.code.push(0xfa);
            a.spin();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    let t0 = Instant::now();
    let v = c.ok(r#"{"cmd":"shutdown","timeout_s":1}"#);
    assert_eq!(v["result"], "forced", "{v}");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(c.status()["state"], "stopped");
    c.ok(r#"{"cmd":"start"}"#);
    let v = c.ok(r#"{"cmd":"reboot","timeout_s":1}"#);
    assert_eq!(v["result"], "forced");
    let s = c.status();
    assert_eq!(s["state"], "running");
    assert_eq!(s["last_reset"], "reboot_timeout");
}

/// Arms the ib700 with a 2 s timeout (value 14) and never pings it.
fn arm_watchdog_2s(a: &mut Asm) {
    a.outb(0x443, 14);
}

#[test]
fn watchdog_expiry_resets_the_guest_and_tells_subscribers() {
    let vm = start(
        "wdt",
        &ready_then(|a| {
            arm_watchdog_2s(a);
            a.spin();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut sub = vm.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let mut c = vm.ctl();
    let w = c.ok(r#"{"cmd":"watchdog"}"#);
    assert_eq!(w["armed"], true, "{w}");
    assert_eq!(w["timeout_s"], 2);
    assert_eq!(w["action"], "reset");
    let t0 = Instant::now();
    let ev = sub
        .wait_event("watchdog", Duration::from_secs(10))
        .expect("watchdog event");
    assert_eq!(ev["vm"], "vm1");
    assert_eq!(ev["action"], "reset");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "fired after {:?}",
        t0.elapsed()
    );
    let ev = sub
        .wait_event("reset", Duration::from_secs(5))
        .expect("reset event");
    assert_eq!(ev["cause"], "watchdog");
    let s = c.wait_status(T, |s| s["boot_count"].as_u64() >= Some(2));
    assert_eq!(s["last_reset"], "watchdog");
    assert!(s["watchdog"]["expiries"].as_u64() >= Some(1));
}

#[test]
fn a_stopped_watchdog_and_action_none_do_not_reset() {
    // Arm, then stop (a write to 0x441, what the driver's close does).
    let vm = start(
        "wdt-stop",
        &ready_then(|a| {
            arm_watchdog_2s(a);
            a.outb(0x441, 0).spin();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    std::thread::sleep(Duration::from_secs(4));
    let s = c.status();
    assert_eq!(s["boot_count"], 1, "{s}");
    assert_eq!(s["watchdog"]["armed"], false);

    let vm2 = start(
        "wdt-none",
        &ready_then(|a| {
            arm_watchdog_2s(a);
            a.spin();
        }),
        &["--watchdog", "action=none"],
    );
    assert!(vm2.p.wait_for("READY", T));
    let mut sub = vm2.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let ev = sub
        .wait_event("watchdog", Duration::from_secs(10))
        .expect("event");
    assert_eq!(ev["action"], "none");
    let mut c2 = vm2.ctl();
    let s = c2.status();
    assert_eq!(s["boot_count"], 1);
    assert_eq!(s["state"], "running");
}

#[test]
fn a_paused_vm_never_fires_its_watchdog() {
    let vm = start(
        "wdt-pause",
        &ready_then(|a| {
            arm_watchdog_2s(a);
            a.print("ARMED\r\n").spin();
        }),
        &[],
    );
    // Paused only once the guest has armed it (READY comes before that).
    assert!(vm.p.wait_for("ARMED", T));
    let mut c = vm.ctl();
    c.ok(r#"{"cmd":"pause"}"#);
    std::thread::sleep(Duration::from_secs(4));
    let s = c.status();
    assert_eq!(s["boot_count"], 1, "fired while paused: {s}");
    assert_eq!(s["state"], "paused");
    assert_eq!(s["watchdog"]["armed"], true);
    c.ok(r#"{"cmd":"set-watchdog","action":"poweroff"}"#);
    c.ok(r#"{"cmd":"resume"}"#);
    // Resumed, the remaining guest time runs out: the new action applies.
    let s = c.wait_status(T, |s| s["state"] == "stopped");
    assert_eq!(s["state"], "stopped", "{s}");
}

#[test]
fn guest_panic_runs_the_panic_action_and_the_alert_hook() {
    let panic_guest = ready_then(|a| {
        a.inb(0x505).outb(0x505, 1).spin();
    });
    let vm = start("panic", &panic_guest, &[]);
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    let s = c.wait_status(T, |s| s["boot_count"].as_u64() >= Some(2));
    assert_eq!(s["last_reset"], "panic", "{s}");

    let hook_out = TempDir::new("hook");
    let out = hook_out.path().join("hook.txt");
    let hook = format!("echo \"$VMM_EVENT $VMM_NAME\" >> {}", out.display());
    let vm2 = start(
        "panic-pause",
        &panic_guest,
        &["--on-panic", "pause", "--alert-hook", &hook],
    );
    assert!(vm2.p.wait_for("READY", T));
    let mut c2 = vm2.ctl();
    let s = c2.wait_status(T, |s| s["state"] == "paused");
    assert_eq!(s["state"], "paused");
    assert_eq!(s["boot_count"], 1);
    let deadline = Instant::now() + T;
    while !out.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap_or_default().trim(),
        "panic vm1"
    );
}

fn library_entry(dir: &Path, name: &str, banner: &str) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    let mut a = Asm::new();
    a.print(banner).cli_hlt_forever();
    // The library names its kernel bzImage; an ELF with a PVH note works too.
    write_guest(&d.join("bzImage"), &a).expect("write");
    std::fs::write(d.join("release"), format!("{name}-release\n")).expect("write");
}

#[test]
fn set_kernel_takes_effect_at_the_next_boot_and_survives_a_vmm_restart() {
    let dir = TempDir::new("kernels");
    let lib = dir.path().join("lib");
    library_entry(&lib, "alpha", "KERNEL-ALPHA\r\n");
    library_entry(&lib, "beta", "KERNEL-BETA\r\n");
    let sock = dir.path().join("run/vm1/control.sock");
    let args = [
        "--name",
        "vm1",
        "--kernel-dir",
        lib.to_str().unwrap_or_default(),
        "--kernel-name",
        "alpha",
        "--memory",
        "64",
        "--control",
        sock.to_str().unwrap_or_default(),
    ];
    let p = VmmProcess::spawn(&args);
    assert!(p.wait_for("KERNEL-ALPHA", T), "{}", p.report());
    let mut c = Ctl::connect(&sock);
    let k = c.ok(r#"{"cmd":"kernels"}"#);
    let names: Vec<&str> = k["kernels"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["alpha", "beta"]);
    assert_eq!(k["current"], "alpha");
    let e = c.call(r#"{"cmd":"set-kernel","name":"gamma"}"#);
    assert_eq!(e["ok"], false);
    assert_eq!(e["code"], "not_found", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap_or_default()
            .contains("alpha, beta"),
        "{e}"
    );
    let e = c.call(r#"{"cmd":"set-kernel","name":"../lib/alpha"}"#);
    assert_eq!(e["ok"], false, "path traversal refused: {e}");
    let v = c.ok(r#"{"cmd":"set-kernel","name":"beta"}"#);
    assert_eq!(v["next"], "beta");
    assert_eq!(c.status()["kernel"], "alpha", "not before the next boot");
    c.ok(r#"{"cmd":"reset"}"#);
    assert!(p.wait_for("KERNEL-BETA", T), "{}", p.report());
    assert_eq!(c.status()["kernel"], "beta");
    drop(c);
    drop(p);
    // A new VMM process for the same VM boots the customer's choice.
    let p2 = VmmProcess::spawn(&args);
    assert!(p2.wait_for("KERNEL-BETA", T), "{}", p2.report());
    assert!(!p2.output().contains("KERNEL-ALPHA"));
}

#[test]
fn console_replays_scrollback_and_log_keeps_both_boots() {
    let vm = start(
        "console",
        &ready_then(|a| {
            a.cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    c.ok(r#"{"cmd":"reset"}"#);
    assert!(vm.p.wait_for_count("READY", 2, T));
    let log = c.ok(r#"{"cmd":"log"}"#);
    let data = log["data"].as_str().unwrap_or_default();
    assert_eq!(data.matches("READY").count(), 2, "{data}");
    assert!(data.contains("boot 2"), "boot marker: {data}");

    let mut con = vm.ctl();
    let v = con.ok(r#"{"cmd":"console","replay":true}"#);
    assert!(v["replay_bytes"].as_u64() > Some(0));
    let mut buf = Vec::new();
    let deadline = Instant::now() + T;
    use std::io::Read;
    let _ = con
        .stream()
        .set_read_timeout(Some(Duration::from_millis(200)));
    while Instant::now() < deadline && String::from_utf8_lossy(&buf).matches("READY").count() < 2 {
        let mut chunk = [0u8; 4096];
        match con.reader().read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&buf).matches("READY").count(), 2);
}

#[test]
fn fifty_clients_are_answered_while_the_guest_floods_a_stuck_console() {
    // The guest prints forever.
    let mut a = Asm::new();
    a.flood_forever(&"flood ".repeat(600));
    let vm = start("flood", &a, &[]);
    let mut stuck = vm.ctl();
    stuck.ok(r#"{"cmd":"console"}"#); // and never read again
    let sock = vm.sock();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Ctl::connect(&sock);
                let mut worst = Duration::ZERO;
                for _ in 0..20 {
                    let t = Instant::now();
                    let s = c.status();
                    worst = worst.max(t.elapsed());
                    assert_eq!(s["state"], "running");
                }
                worst
            })
        })
        .collect();
    for h in handles {
        let worst = h.join().expect("client thread");
        assert!(worst < Duration::from_secs(10), "a status took {worst:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
    // The stuck reader's backlog is capped (256 KiB): the guest must go on
    // printing well past it.
    let mut c = vm.ctl();
    let total = |c: &mut Ctl| {
        c.ok(r#"{"cmd":"log","bytes":16}"#)["total_bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while total(&mut c) < 1 << 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        total(&mut c) >= 1 << 20,
        "the guest stalled behind a stuck console reader"
    );
}

#[test]
fn sysrq_and_ctrl_alt_del_reach_the_keyboard() {
    let vm = start(
        "sysrq",
        &ready_then(|a| {
            a.wait_i8042_byte().print("KEY\r\n").cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let mut c = vm.ctl();
    c.ok(r#"{"cmd":"sysrq","key":"s"}"#);
    assert!(vm.p.wait_for("KEY", T));
    let v = c.call(r#"{"cmd":"sysrq","key":"?"}"#);
    assert_eq!(v["ok"], false);
}

#[test]
fn a_user_not_allowed_is_refused_with_one_line() {
    let vm = start(
        "access",
        &ready_then(|a| {
            a.cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T));
    let (first, text) = as_nobody(&vm, None);
    assert_eq!(first["ok"], false, "{text}");
    assert!(first["error"]
        .as_str()
        .unwrap_or_default()
        .contains("permission denied"));
    assert_eq!(first["code"], "forbidden", "{first}");
    assert!(!text.contains("running"), "no status leaked: {text}");
    let mut c = vm.ctl();
    assert_eq!(c.status()["state"], "running", "root still gets in");
}

/// Connects as uid/gid 65534 (no groups) and sends `line` (if any): the
/// first line back, and all that came back (`send_as_nobody`).
fn as_nobody(vm: &Vm, line: Option<&str>) -> (Value, String) {
    let (text, err) = tests::control::send_as_nobody(&vm.sock(), line);
    let first = serde_json::from_str(text.lines().next().unwrap_or("{}")).unwrap_or(Value::Null);
    (first, format!("stdout: {text} stderr: {err}"))
}

/// A guest that says READY and halts, with `img` as its disk `id=root`,
/// uid 65534 allowed in as a customer, and `extra`; once it is READY.
fn start_with_root_disk(dir: TempDir, img: &Path, extra: &[String]) -> Vm {
    let sock = dir.path().join("run/vm1/control.sock");
    let asm = ready_then(|a| {
        a.cli_hlt_forever();
    });
    let mut cmd = vmm_command(dir.path(), "vm1", &asm, &sock);
    cmd.arg("--disk")
        .arg(format!("path={},id=root", img.display()))
        .args(["--allow-user", "65534"])
        .args(extra);
    let vm = Vm {
        p: VmmProcess::spawn_cmd(&mut cmd),
        dir,
    };
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    vm
}

#[test]
fn a_backup_is_the_operators_and_copies_the_disk_whole_into_the_backup_directory() {
    let dir = TempDir::new("backup-tiny");
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    // 8 MiB: data, a hole, data; the copy must match it byte for byte.
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, 0).unwrap();
    f.write_all_at(&data, 6 << 20).unwrap();
    drop(f);
    let backup_dir = ["--backup-dir".to_string(), backups.display().to_string()];
    let vm = start_with_root_disk(dir, &img, &backup_dir);

    // A customer may run the VM, not copy its disk.
    let (status, text) = as_nobody(&vm, Some(r#"{"cmd":"status"}"#));
    assert_eq!(status["state"], "running", "{text}");
    let (r, text) = as_nobody(&vm, Some(r#"{"cmd":"backup","disk":"root","to":"x.img"}"#));
    assert_eq!(r["code"], "forbidden", "{text}");
    assert!(!backups.join("x.img").exists() && !backups.join("x.img.part").exists());

    let mut c = vm.ctl();
    let mut sub = vm.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let r = c.call(r#"{"cmd":"backup","disk":"root","to":"root.img"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", vm.p.report());
    assert_eq!(r["disk"], "disk0", "{r}");
    assert_eq!(r["size"], 8 << 20, "{r}");
    assert_eq!(r["data_bytes"], 2 << 20, "the hole stays a hole: {r}");
    let copy = backups.join("root.img");
    assert_eq!(r["path"], copy.display().to_string());
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&img).unwrap(),
        "the copy is the disk"
    );
    assert!(!backups.join("root.img.part").exists());
    let ev = sub.wait_event("backup_started", T).expect("backup_started");
    assert_eq!(ev["disk"], "disk0", "{ev}");

    // Refused with the reason, nothing written: an existing file, a path
    // outside the directory, a disk it does not have.
    for (line, code) in [
        (
            r#"{"cmd":"backup","disk":"disk0","to":"root.img"}"#,
            "bad_request",
        ),
        (
            r#"{"cmd":"backup","disk":"disk0","to":"../escape.img"}"#,
            "bad_request",
        ),
        (
            r#"{"cmd":"backup","disk":"disk7","to":"other.img"}"#,
            "not_found",
        ),
        (r#"{"cmd":"backup","disk":"disk0"}"#, "bad_request"),
    ] {
        let e = c.call(line);
        assert_eq!(e["ok"], false, "{line}: {e}");
        assert_eq!(e["code"], code, "{line}: {e}");
    }
    assert_eq!(std::fs::read_dir(&backups).unwrap().count(), 1);
    assert!(!vm.dir.path().join("escape.img").exists());
    assert_eq!(c.status()["state"], "running");
}

#[test]
fn the_operator_changes_a_disks_polling_and_limits_while_it_runs_and_a_customer_cannot() {
    let dir = TempDir::new("set-disk");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let vm = start_with_root_disk(dir, &img, &[]);
    let mut c = vm.ctl();
    let poll_us = |c: &mut Ctl| c.status()["disks"][0]["poll_us"].clone();
    assert_eq!(poll_us(&mut c), 0, "off unless asked");

    // Polling is paid in host CPU: the customer may not turn it on.
    let (r, text) = as_nobody(
        &vm,
        Some(r#"{"cmd":"set-disk","disk":"root","poll_us":1000}"#),
    );
    assert_eq!(r["code"], "forbidden", "{text}");
    assert_eq!(poll_us(&mut c), 0);

    // The operator: by `id=` or by `diskN`; the answer is the disk as
    // `status` shows it.
    let r = c.call(r#"{"cmd":"set-disk","disk":"root","poll_us":50}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", vm.p.report());
    assert_eq!(
        (&r["id"], &r["poll_us"]),
        (&"disk0".into(), &50.into()),
        "{r}"
    );
    assert_eq!(poll_us(&mut c), 50);
    let r = c.call(r#"{"cmd":"set-disk","disk":"disk0","poll_us":0}"#);
    assert_eq!(r["poll_us"], 0, "{r}");
    assert_eq!(poll_us(&mut c), 0);

    // Limits: each setting given changes, the others stay.
    let r = c.call(r#"{"cmd":"set-disk","disk":"root","iops":500,"mib_s":100}"#);
    assert_eq!((&r["iops"], &r["mib_s"]), (&500.into(), &100.into()), "{r}");
    assert_eq!(r["poll_us"], 0, "{r}");
    let r = c.call(r#"{"cmd":"set-disk","disk":"root","iops":0}"#);
    assert_eq!((&r["iops"], &r["mib_s"]), (&0.into(), &100.into()), "{r}");
    let s = c.status();
    assert_eq!(s["disks"][0]["mib_s"], 100, "{s}");
    let (r, text) = as_nobody(&vm, Some(r#"{"cmd":"set-disk","disk":"root","mib_s":0}"#));
    assert_eq!(r["code"], "forbidden", "{text}");

    // Refused with the reason, the setting kept.
    for (line, code) in [
        (
            r#"{"cmd":"set-disk","disk":"disk3","poll_us":5}"#,
            "not_found",
        ),
        (
            r#"{"cmd":"set-disk","disk":"disk0","poll_us":1001}"#,
            "bad_request",
        ),
        (r#"{"cmd":"set-disk","disk":"disk0"}"#, "bad_request"),
        (
            r#"{"cmd":"set-disk","disk":"disk0","iops":"fast"}"#,
            "bad_request",
        ),
    ] {
        let e = c.call(line);
        assert_eq!(e["ok"], false, "{line}: {e}");
        assert_eq!(e["code"], code, "{line}: {e}");
    }
    assert_eq!(poll_us(&mut c), 0);
    assert_eq!(c.status()["state"], "running");
}

#[test]
fn without_a_backup_directory_backup_is_refused_as_unsupported() {
    let vm = start(
        "backup-none",
        &ready_then(|a| {
            a.cli_hlt_forever();
        }),
        &[],
    );
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    let e = vm
        .ctl()
        .call(r#"{"cmd":"backup","disk":"disk0","to":"a.img"}"#);
    assert_eq!(e["code"], "unsupported", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap_or_default()
            .contains("--backup-dir"),
        "{e}"
    );
}
