//! The admin shell against a real VMM process (tiny guest, real KVM).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tests::tiny::{vmm_command, Asm};
use tests::{bin, TempDir, VmmProcess};

fn shell(run_dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("vmm-shell"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(args)
        .output()
        .expect("run vmm-shell");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_shot_commands_drive_a_real_vm_and_other_users_see_nothing() {
    let dir = TempDir::new("shell-real");
    let mut a = Asm::new();
    a.print("SHELL-READY\r\n").cli_hlt_forever();
    let run = dir.path().join("run");
    let sock = run.join("web1/control.sock");
    let p = VmmProcess::spawn_cmd(&mut vmm_command(dir.path(), "web1", &a, &sock));
    assert!(
        p.wait_for("SHELL-READY", Duration::from_secs(20)),
        "{}",
        p.report()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, out, err) = shell(&run, &["list"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("web1"), "{out}");

    let (code, out, err) = shell(&run, &["--json", "web1", "status"]);
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).expect("json");
    assert_eq!(v["state"], "running");
    assert_eq!(v["boot_count"], 1);

    let (code, _, err) = shell(&run, &["web1", "reset"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        p.wait_for_count("SHELL-READY", 2, Duration::from_secs(20)),
        "{}",
        p.report()
    );
    let (_, out, _) = shell(&run, &["--json", "web1", "status"]);
    let v: Value = serde_json::from_str(out.lines().next().unwrap_or("{}")).expect("json");
    assert_eq!(v["boot_count"], 2);

    let (code, out, err) = shell(&run, &["web1", "sysrq", "s"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("SysRq"), "{out}");
    let (code, _, err) = shell(&run, &["web1", "sysrq", "%"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown SysRq key"), "{err}");

    let (code, _, err) = shell(&run, &["web1", "frobnicate"]);
    assert_ne!(code, Some(0));
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Another Unix user: the run directory and socket keep it out, and
    // naming the VM directly is refused.
    let _ = Command::new("chmod")
        .args(["0755"])
        .arg(dir.path())
        .status();
    let _ = Command::new("chmod").args(["0755"]).arg(&run).status();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("vmm-shell"))
        .arg("--run-dir")
        .arg(&run)
        .args(["--json", "list"])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("web1"), "another user sees web1: {text}");
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin("vmm-shell"))
            .arg("--run-dir")
            .arg(&run)
            .args(["web1", "status"])
            .output()
            .expect("run shell as nobody");
        assert_ne!(out.status.code(), Some(0));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("running"));
    }
}
