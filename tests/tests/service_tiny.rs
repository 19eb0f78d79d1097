//! Running the VMM as a service: `vmm check` (the operator's dry run)
//! checks a config without starting anything, and under systemd's
//! `Type=notify` the VMM reports READY=1 only once its control socket
//! answers, and STOPPING=1 when it ends.

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::Duration;

use tests::tiny::{vmm_command, write_guest, Asm};
use tests::{bin, TempDir, VmmProcess};

fn check(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("vmm"))
        .arg("check")
        .args(args)
        .output()
        .expect("run vmm check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn vmm_check_passes_a_good_config_and_names_the_first_problem_of_a_bad_one_starting_nothing() {
    let d = TempDir::new("check");
    let kernel = d.path().join("tiny.elf");
    let mut a = Asm::new();
    a.cli_hlt_forever();
    write_guest(&kernel, &a).expect("guest");
    let img = d.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let sock = d.path().join("control.sock");
    let cfg = d.path().join("web1.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"web1\"\nkernel = \"{}\"\nmemory = 64\nvcpus = 2\ncontrol = \"{}\"\ndisk = [\"path={},id=root\"]\n",
            kernel.display(),
            sock.display(),
            img.display()
        ),
    )
    .expect("config");
    let cfg_s = cfg.display().to_string();
    let (code, out, err) = check(&["--config", &cfg_s]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("web1: ok: kernel "), "{out}");
    assert!(out.contains("2 vCPU(s), 64 MiB"), "{out}");
    assert!(out.contains(&img.display().to_string()), "{out}");
    assert!(!sock.exists(), "a dry run created the control socket");
    assert!(
        out.contains("sandbox: own user (uid 0), no capabilities"),
        "{out}"
    );

    // With --user, whether that user could still read the kernel and
    // write the console log's directory once the VMM drops to it (this
    // one is root's, 0755), and what the sandbox costs: the state file is
    // not written beside the config file, where other VMs' configs are.
    let (code, out, err) = check(&["--config", &cfg_s, "--user", "nobody"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!(
            "warning: the sandbox keeps the VMM out of {}: set-kernel cannot save",
            d.path().display()
        )),
        "{out}"
    );
    let log = d.path().join("console.log").display().to_string();
    let (code, out, err) = check(&[
        "--config",
        &cfg_s,
        "--user",
        "nobody",
        "--console-log",
        &log,
    ]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "vmm: user nobody could not write to {} after start-up (its owner, group or mode)",
            d.path().display()
        )
    );
    let state = d.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(65534), None).expect("chown");
    let state_s = state.display().to_string();
    let user = [
        "--config",
        &cfg_s,
        "--user",
        "nobody",
        "--state-dir",
        &state_s,
    ];
    let (code, out, err) = check(&user);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("sandbox: user nobody (uid 65534"), "{out}");
    assert!(!out.contains("warning"), "{out}");
    // vhost-net for nobody: the start opens it as root, before it becomes
    // nobody (Debian's node is root's alone, 0600), so nobody's own access
    // does not decide the datapath; only whether the node opens does.
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-net")
        .is_ok();
    let (code, out, err) = check(&[&user[..], &["--net", "tap=tap9,vhost=auto"]].concat());
    assert_eq!(code, Some(0), "{out}{err}");
    let datapath = if opens { "vhost-net" } else { "userspace" };
    assert!(out.contains(&format!("nets: tap9 ({datapath})")), "{out}");
    // A state directory still to be made is made for the user at start.
    let later = d.path().join("later").display().to_string();
    let (code, out, err) = check(&[
        "--config",
        &cfg_s,
        "--user",
        "nobody",
        "--state-dir",
        &later,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");

    // The first problem, in one line, exit 2.
    let missing = d.path().join("gone.img");
    let bad_disk = format!("path={}", missing.display());
    let cases: [(Vec<&str>, String); 3] = [
        (
            vec!["--config", &cfg_s, "--disk", &bad_disk],
            format!("vmm: disk {}: No such file or directory", missing.display()),
        ),
        (
            vec!["--config", &cfg_s, "--control", "/nonexistent-dir/c.sock"],
            "vmm: control socket /nonexistent-dir/c.sock: its directory /nonexistent-dir does not exist"
                .to_string(),
        ),
        (
            vec!["--config", &cfg_s, "--memory", "0"],
            "vmm: ".to_string(),
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = check(&args);
        assert_eq!(code, Some(2), "{args:?}: {out}{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with(&want), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
}

#[test]
fn under_type_notify_ready_comes_once_the_control_socket_answers_and_stopping_at_the_end() {
    let d = TempDir::new("notify");
    let notify = d.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&notify).expect("notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut a = Asm::new();
    a.print("READY\r\n").spin();
    let sock = d.path().join("control.sock");
    let mut p = VmmProcess::spawn_cmd(
        vmm_command(d.path(), "web1", &a, &sock).env("NOTIFY_SOCKET", &notify),
    );
    let mut buf = [0u8; 512];
    let n = systemd
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1: {e}\n{}", p.report()));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(msg.contains("STATUS=web1: running"), "{msg}");
    // Ready means the socket answers now, not soon.
    let mut c = tests::control::Ctl::connect(&sock);
    assert_eq!(c.status()["state"], "running");
    drop(c);
    let _ = UnixStream::connect(&sock).expect("still listening");
    // SIGTERM: the VMM says it is stopping, then exits 0.
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let n = systemd
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no STOPPING=1: {e}\n{}", p.report()));
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let st = p.wait_exit(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", p.report());
}
