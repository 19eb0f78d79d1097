//! Every thread of a running VMM runs under its kind's seccomp filter
//! (vmm/src/seccomp.rs) with no_new_privs, and a system call outside a
//! thread's list ends the VMM at once with one line naming the thread's
//! kind and the call. The alert hook still runs its command (from the hook
//! launcher, a process forked before any filter).

use std::time::Duration;

use tests::tiny::{vmm_command, Asm};
use tests::{TempDir, VmmProcess};

/// A tiny guest with two vCPUs, a disk, a console log and an alert hook,
/// that says READY and spins.
fn start(tag: &str, env: &[(&str, &str)], extra: &[&str]) -> (TempDir, VmmProcess) {
    let mut a = Asm::new();
    a.print("READY\r\n").spin();
    start_guest(tag, a, env, extra)
}

fn start_guest(tag: &str, a: Asm, env: &[(&str, &str)], extra: &[&str]) -> (TempDir, VmmProcess) {
    let dir = TempDir::new(tag);
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let sock = dir.path().join("control.sock");
    let mut cmd = vmm_command(dir.path(), "filtered", &a, &sock);
    cmd.args(["--vcpus", "2", "--disk"])
        .arg(format!("path={}", img.display()))
        .arg("--console-log")
        .arg(dir.path().join("console.log"))
        .arg("--alert-hook")
        .arg(format!(
            "echo \"$VMM_EVENT\" > {}",
            dir.path().join("hook.out").display()
        ))
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = VmmProcess::spawn_cmd(&mut cmd);
    (dir, p)
}

/// A network namespace with a TAP `tap0` in it, deleted on drop: where
/// a VMM with a network interface runs.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("sc-{tag}-{}", std::process::id());
        let script = format!(
            "ip netns add {name} && ip -n {name} tuntap add dev tap0 mode tap && ip -n {name} link set tap0 up"
        );
        let st = std::process::Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("run sh");
        let ns = Netns(name);
        assert!(st.success(), "a namespace with a TAP ({script}): {st:?}");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// As [`start`], with a network interface on `tap0`, the VMM inside a
/// namespace of its own.
fn start_with_net(tag: &str, env: &[(&str, &str)]) -> (TempDir, Netns, VmmProcess) {
    let ns = Netns::new(tag);
    let dir = TempDir::new(tag);
    let sock = dir.path().join("control.sock");
    let mut a = Asm::new();
    a.print("READY\r\n").spin();
    let inner = vmm_command(dir.path(), "filtered", &a, &sock);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(inner.get_program())
        .args(inner.get_args())
        .args(["--net", "tap=tap0"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = VmmProcess::spawn_cmd(&mut cmd);
    (dir, ns, p)
}

/// `(thread name, Seccomp, NoNewPrivs)` of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let Ok(status) = std::fs::read_to_string(t.expect("task").path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

#[test]
fn every_thread_of_a_running_vmm_runs_under_its_filter_with_no_new_privs() {
    let (_dir, mut p) = start("seccomp-on", &[], &[]);
    assert!(
        p.wait_for("READY", Duration::from_secs(30)),
        "{}",
        p.report()
    );
    // A new thread carries its creator's name until it sets its own: wait
    // until every expected one is there (vcpu1 may still start after
    // vcpu0 printed READY).
    let want = ["vmm", "vcpu0", "vcpu1", "disk0", "spawner", "console-log"];
    let has_all =
        |all: &[(String, String, String)]| want.iter().all(|w| all.iter().any(|(n, _, _)| n == w));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut all = threads(p.child.id());
    while !has_all(&all) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        all = threads(p.child.id());
    }
    assert!(has_all(&all), "want {want:?} in {all:?}");
    for (name, seccomp, nnp) in &all {
        assert_eq!(seccomp, "2", "{name}: Seccomp (2 = filter) in {all:?}");
        assert_eq!(nnp, "1", "{name}: NoNewPrivs in {all:?}");
    }
    let _ = p.child.kill();
}

#[test]
fn a_network_interface_is_served_on_a_thread_of_its_own_under_its_filter() {
    let (_dir, _ns, mut p) = start_with_net("seccomp-net", &[]);
    assert!(
        p.wait_for("READY", Duration::from_secs(30)),
        "{}",
        p.report()
    );
    // `ip netns exec` execs the VMM: the child is the VMM itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut all = threads(p.child.id());
    while !all.iter().any(|(n, _, _)| n == "net0") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        all = threads(p.child.id());
    }
    let _ = p.child.kill();
    let net: Vec<_> = all.iter().filter(|(n, _, _)| n == "net0").collect();
    assert_eq!(
        net,
        [&("net0".to_string(), "2".to_string(), "1".to_string())],
        "one net0 thread, filtered, with no_new_privs, in {all:?}"
    );
}

#[test]
fn a_forbidden_call_on_a_network_interfaces_thread_ends_the_vmm_naming_the_call() {
    let (_dir, _ns, mut p) = start_with_net("seccomp-net-kill", &[("VMM_TEST_SECCOMP", "net")]);
    assert_stopped_naming_socket(&mut p, "net");
}

#[test]
fn the_alert_hook_runs_its_command_from_the_unfiltered_launcher() {
    // A guest that panics once (pvpanic) and spins.
    let mut a = Asm::new();
    a.print("READY\r\n").outb(0x505, 1).spin();
    let (dir, mut p) = start_guest("seccomp-hook", a, &[], &["--on-panic", "none"]);
    assert!(
        p.wait_for("READY", Duration::from_secs(30)),
        "{}",
        p.report()
    );
    // The launcher: a child process of the VMM, named vmm-hooks.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.child.id()))
        .unwrap_or_default();
    let launcher: Vec<String> = children
        .split_whitespace()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    assert_eq!(launcher, ["vmm-hooks"], "{}", p.report());
    // The guest's panic ran the hook; its `echo` needs calls no VMM thread
    // may make (execve), so it ran in the launcher.
    let out = dir.path().join("hook.out");
    let read = || std::fs::read_to_string(&out).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while read().trim() != "panic" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = read();
    let _ = p.child.kill();
    assert_eq!(got.trim(), "panic", "the hook's output\n{}", p.report());
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let (_dir, mut p) = start("seccomp-off", &[], &["--seccomp", "off"]);
    assert!(
        p.wait_for("READY", Duration::from_secs(30)),
        "{}",
        p.report()
    );
    let all = threads(p.child.id());
    assert!(all.iter().any(|(n, _, _)| n == "vcpu0"), "{all:?}");
    assert!(all.iter().all(|(_, s, _)| s == "0"), "{all:?}");
    let _ = p.child.kill();
}

/// The VMM ended with 159 (128 + SIGSYS) and the one line naming `kind`
/// and socket(2), before the guest ran (for a vCPU) or right away.
fn assert_stopped_naming_socket(p: &mut VmmProcess, kind: &str) {
    let status = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the VMM still runs after a forbidden call\n{}", p.report()));
    assert_eq!(status.code(), Some(159), "{status:?}\n{}", p.report());
    // Its stderr may still be on its way through the pipe.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.stderr().contains("seccomp:") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = p.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(
        lines,
        [format!(
            "vmm: seccomp: a {kind} thread made the forbidden system call socket ({}); the VM is stopped",
            libc::SYS_socket
        )],
        "{err}"
    );
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_the_vmm_naming_the_call_before_the_guest_runs() {
    let (_dir, mut p) = start("seccomp-vcpu", &[("VMM_TEST_SECCOMP", "vcpu")], &[]);
    assert_stopped_naming_socket(&mut p, "vcpu");
    assert!(!p.output().contains("READY"), "the guest ran");
}

#[test]
fn a_forbidden_call_on_any_other_thread_ends_the_vmm_naming_the_call() {
    for kind in ["disk", "event-loop", "spawner", "console-log"] {
        let (_dir, mut p) = start(
            &format!("seccomp-{kind}"),
            &[("VMM_TEST_SECCOMP", kind)],
            &[],
        );
        assert_stopped_naming_socket(&mut p, kind);
    }
}

#[test]
fn with_seccomp_log_a_forbidden_call_is_let_through() {
    let (_dir, mut p) = start(
        "seccomp-log",
        &[("VMM_TEST_SECCOMP", "vcpu")],
        &["--seccomp", "log"],
    );
    assert!(
        p.wait_for("READY", Duration::from_secs(30)),
        "{}",
        p.report()
    );
    assert!(!p.stderr().contains("seccomp"), "{}", p.report());
    let _ = p.child.kill();
}
