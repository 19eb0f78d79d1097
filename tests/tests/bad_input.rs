//! Bad input to the `vmm` binary: a clear one-line error, a non-zero exit,
//! never a panic.

use std::process::Command;

use tests::tiny::{write_guest, Asm};
use tests::{bin, TempDir};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin("vmm"))
        .args(args)
        .args(["--console", "none"])
        .output()
        .expect("run vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_error(args: &[&str], needle: &str) {
    let (code, err) = run(args);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?}: exit {code:?}, stderr {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got: {err}");
    assert!(lines[0].contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_kernels_and_sizes_are_one_line_errors() {
    let d = TempDir::new("bad");
    let good = d.path().join("tiny.elf");
    let mut a = Asm::new();
    a.cli_hlt_forever();
    write_guest(&good, &a).expect("guest");
    let good = good.to_str().unwrap_or_default();
    let junk = d.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 64 * 1024]).expect("junk");
    let big = d.path().join("big.img");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(100 << 20))
        .expect("big initrd");
    let unreadable = d.path().join("dir-not-file");
    std::fs::create_dir_all(&unreadable).expect("dir");

    assert_clean_error(&["--kernel", "/nonexistent/bzImage"], "not found");
    assert_clean_error(
        &["--kernel", unreadable.to_str().unwrap_or_default()],
        "not found",
    );
    assert_clean_error(
        &["--kernel", junk.to_str().unwrap_or_default()],
        "not a bootable kernel",
    );
    assert_clean_error(
        &[
            "--kernel",
            good,
            "--initrd",
            big.to_str().unwrap_or_default(),
            "--memory",
            "64",
        ],
        "does not fit",
    );
    assert_clean_error(&["--kernel", good, "--memory", "0"], "--memory 0");
    assert_clean_error(&["--kernel", good, "--memory", "99999999"], "--memory");
    assert_clean_error(&["--kernel", good, "--memory", "lots"], "invalid value");
    assert_clean_error(&["--kernel", good, "--vcpus", "0"], "--vcpus 0");
    assert_clean_error(&["--kernel", good, "--vcpus", "9"], "--vcpus 9");
    assert_clean_error(&["--kernel", good, "--disk", "ro=on"], "path= is required");
    assert_clean_error(
        &["--kernel", good, "--disk", "path=/nonexistent/disk.img"],
        "/nonexistent/disk.img",
    );
    assert_clean_error(&["--kernel", good, "--net", "tap=x,mac=nope"], "mac=nope");
    assert_clean_error(
        &["--kernel", good, "--watchdog", "action=boom"],
        "--watchdog",
    );
    assert_clean_error(&["--kernel-name", "mini"], "--kernel-dir");
    assert_clean_error(&[], "no kernel given");
    let cfg = d.path().join("vm.toml");
    std::fs::write(&cfg, "memory = [1, 2]\n").expect("cfg");
    assert_clean_error(&["--config", cfg.to_str().unwrap_or_default()], "vm.toml");
}

#[test]
fn a_locked_disk_image_is_refused_at_start() {
    let d = TempDir::new("locked");
    let k = d.path().join("tiny.elf");
    let mut a = Asm::new();
    a.print("UP\r\n").cli_hlt_forever();
    write_guest(&k, &a).expect("guest");
    let img = d.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("img");
    let spec = format!("path={}", img.display());
    let first = tests::VmmProcess::spawn(&[
        "--kernel",
        k.to_str().unwrap_or_default(),
        "--memory",
        "64",
        "--disk",
        &spec,
    ]);
    assert!(
        first.wait_for("UP", std::time::Duration::from_secs(20)),
        "{}",
        first.report()
    );
    assert_clean_error(
        &[
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--memory",
            "64",
            "--disk",
            &spec,
        ],
        "locked",
    );
}

#[test]
fn no_permission_on_dev_kvm_is_a_clear_error() {
    let d = TempDir::new("nokvm");
    let k = d.path().join("tiny.elf");
    write_guest(&k, &Asm::new()).expect("guest");
    let _ = Command::new("chmod").args(["0755"]).arg(d.path()).status();
    let _ = Command::new("chmod").args(["0644"]).arg(&k).status();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("vmm"))
        .args([
            "--kernel",
            k.to_str().unwrap_or_default(),
            "--console",
            "none",
        ])
        .output();
    let Ok(out) = out else {
        eprintln!("SKIP: setpriv not available");
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && err.contains("vmm") && !err.contains("/dev/kvm") {
        eprintln!("SKIP: the vmm binary is not executable by nobody here: {err}");
        return;
    }
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("/dev/kvm"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
