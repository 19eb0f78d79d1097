//! After start-up the VMM confines itself (vmm/src/sandbox.rs): with
//! `--user` it runs as that user, every thread with empty capability sets
//! and no_new_privs, and with Landlock it opens nothing outside what the
//! VM needs; what it does need later (the kernel at a reset, the console
//! log, the state file at `set-kernel`) still works. `--sandbox off` keeps
//! root's everything and says so.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tests::control::Ctl;
use tests::tiny::{vmm_command, Asm};
use tests::{TempDir, VmmProcess};

const T: Duration = Duration::from_secs(30);

/// A tiny guest that says READY and spins, with a disk, a console log, a
/// state directory, and the whole directory given to `nobody` (the user
/// the VMM becomes reads the kernel again at each reset and writes the
/// log and the state file).
fn start(tag: &str, env: &[(&str, &str)], extra: &[&str]) -> (TempDir, VmmProcess) {
    let (dir, mut cmd) = command(tag, env, extra);
    let p = VmmProcess::spawn_cmd(&mut cmd);
    (dir, p)
}

fn command(tag: &str, env: &[(&str, &str)], extra: &[&str]) -> (TempDir, std::process::Command) {
    let dir = TempDir::new(tag);
    let mut a = Asm::new();
    a.print("READY\r\n").spin();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    // `--control PATH` in `extra` replaces the default socket.
    let at = extra.iter().position(|a| *a == "--control");
    let sock = at
        .and_then(|i| extra.get(i + 1))
        .map_or_else(|| dir.path().join("control.sock"), std::path::PathBuf::from);
    let extra: Vec<&str> = extra
        .iter()
        .enumerate()
        .filter(|(i, _)| at.is_none_or(|a| *i != a && *i != a + 1))
        .map(|(_, a)| *a)
        .collect();
    let mut cmd = vmm_command(dir.path(), "boxed", &a, &sock);
    cmd.args(["--vcpus", "2", "--disk"])
        .arg(format!("path={}", img.display()))
        .arg("--console-log")
        .arg(dir.path().join("console.log"))
        .args(&extra);
    if !extra.contains(&"--state-dir") {
        cmd.arg("--state-dir").arg(&state);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let nobody = nobody();
    for p in [dir.path(), &state] {
        std::os::unix::fs::chown(p, Some(nobody.0), Some(nobody.1)).expect("chown");
    }
    (dir, cmd)
}

/// `nobody`'s uid and gid, from the user database.
fn nobody() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let f: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("a user nobody")
        .split(':')
        .collect();
    (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
}

/// The named fields of `/proc/PID/task/*/status`, one map per thread.
fn threads(pid: u32) -> Vec<std::collections::HashMap<String, String>> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let Ok(status) = std::fs::read_to_string(t.expect("task").path().join("status")) else {
            continue;
        };
        out.push(
            status
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect(),
        );
    }
    out
}

fn wait_for_stderr(p: &VmmProcess, needle: &str) -> String {
    let deadline = std::time::Instant::now() + T;
    while !p.stderr().contains(needle) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    p.stderr()
}

#[test]
fn with_a_user_every_thread_runs_as_that_user_with_no_capabilities_and_no_new_privs() {
    let (dir, mut p) = start("sandbox-user", &[], &["--user", "nobody"]);
    assert!(p.wait_for("READY", T), "{}", p.report());
    let (uid, gid) = nobody();
    let want = ["vmm", "vcpu0", "vcpu1", "disk0", "spawner", "console-log"];
    let deadline = std::time::Instant::now() + T;
    let mut all = threads(p.child.id());
    let names = |all: &[std::collections::HashMap<String, String>]| -> Vec<String> {
        all.iter().map(|t| t["Name"].clone()).collect()
    };
    while !want.iter().all(|w| names(&all).iter().any(|n| n == w))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        all = threads(p.child.id());
    }
    assert!(
        want.iter().all(|w| names(&all).iter().any(|n| n == w)),
        "want {want:?} in {:?}",
        names(&all)
    );
    let ids = |v: u32| [v; 4].map(|x| x.to_string()).join("\t");
    for t in &all {
        let name = &t["Name"];
        assert_eq!(t["Uid"], ids(uid), "{name}: real, effective, saved, fs uid");
        assert_eq!(t["Gid"], ids(gid), "{name}: gids");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(t[set], "0000000000000000", "{name}: {set}");
        }
        assert_eq!(t["NoNewPrivs"], "1", "{name}");
        assert_eq!(t["Seccomp"], "2", "{name}");
    }
    // The control socket answers; a reset reads the kernel again as nobody.
    let mut c = Ctl::connect(&dir.path().join("control.sock"));
    assert_eq!(c.status()["state"], "running");
    c.ok(r#"{"cmd":"reset"}"#);
    assert!(p.wait_for_count("READY", 2, T), "{}", p.report());
    assert_eq!(c.status()["boot_count"], 2);
    // The console log is written by the (deferred) log thread.
    let log = dir.path().join("console.log");
    let deadline = std::time::Instant::now() + T;
    while std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches("READY")
        .count()
        < 2
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(text.matches("READY").count(), 2, "console log: {text:?}");
    let _ = p.child.kill();
}

#[test]
fn a_confined_vmm_cannot_read_or_create_files_outside_what_its_vm_needs() {
    // Root-owned, world-readable: only Landlock can refuse it to nobody.
    let (dir, mut p) = start(
        "sandbox-read",
        &[("VMM_TEST_OPEN", "r:/etc/os-release")],
        &["--user", "nobody"],
    );
    let err = wait_for_stderr(&p, "vmm: test: open");
    assert!(
        err.contains("vmm: test: open r:/etc/os-release: denied (Permission denied"),
        "{err}"
    );
    assert!(p.wait_for("READY", T), "{}", p.report());
    let _ = p.child.kill();
    drop(dir);

    // As root with no --user: root's uid, still no capabilities, and
    // Landlock still confines it: the directory it may write to (its
    // own, for the console log) takes a file; /tmp does not.
    let outside = std::env::temp_dir().join(format!("vmm-sandbox-{}", std::process::id()));
    let spec = format!("w:{}", outside.display());
    let (_dir, mut p) = start("sandbox-root", &[("VMM_TEST_OPEN", &spec)], &[]);
    let err = wait_for_stderr(&p, "vmm: test: open");
    assert!(
        err.contains(&format!(
            "vmm: test: open {spec}: denied (Permission denied"
        )),
        "{err}"
    );
    assert!(!outside.exists());
    assert!(p.wait_for("READY", T), "{}", p.report());
    for t in threads(p.child.id()) {
        assert_eq!(t["Uid"], "0\t0\t0\t0");
        assert_eq!(t["CapEff"], "0000000000000000", "{}", t["Name"]);
        assert_eq!(t["CapBnd"], "0000000000000000", "{}", t["Name"]);
    }
    let _ = p.child.kill();
}

#[test]
fn the_confined_vmm_still_creates_files_in_its_console_logs_directory() {
    let (dir, mut cmd) = command("sandbox-own", &[], &["--user", "nobody"]);
    let target = dir.path().join("rotated.log");
    let spec = format!("w:{}", target.display());
    let mut p = VmmProcess::spawn_cmd(cmd.env("VMM_TEST_OPEN", &spec));
    let nobody = nobody();
    let err = wait_for_stderr(&p, "vmm: test: open");
    assert!(
        err.contains(&format!("vmm: test: open {spec}: allowed")),
        "{err}"
    );
    assert_eq!(owner(&target), nobody.0, "created by the VMM as nobody");
    assert!(p.wait_for("READY", T), "{}", p.report());
    let _ = p.child.kill();
}

#[test]
fn a_missing_state_directory_is_made_for_the_user_the_vmm_becomes() {
    let root = TempDir::new("sandbox-state-root");
    let made = root.path().join("var-lib-vmm").join("boxed");
    let made_s = made.display().to_string();
    let probe = format!("w:{}", made.join("state.json.tmp").display());
    let (_dir, mut p) = start(
        "sandbox-state",
        &[("VMM_TEST_OPEN", &probe)],
        &["--user", "nobody", "--state-dir", &made_s],
    );
    let err = wait_for_stderr(&p, "vmm: test: open");
    assert!(
        err.contains(&format!("vmm: test: open {probe}: allowed")),
        "{err}"
    );
    assert!(p.wait_for("READY", T), "{}", p.report());
    let meta = std::fs::metadata(&made).expect("the state directory");
    assert!(meta.is_dir());
    assert_eq!(meta.uid(), nobody().0);
    assert_eq!(meta.mode() & 0o777, 0o750);
    let _ = p.child.kill();
}

#[test]
fn sandbox_off_keeps_root_and_says_so() {
    let (_dir, mut p) = start("sandbox-off", &[("VMM_LOG", "warn")], &["--sandbox", "off"]);
    assert!(p.wait_for("READY", T), "{}", p.report());
    let err = wait_for_stderr(&p, "without confinement");
    assert!(
        err.contains("running as root without confinement (--sandbox off)"),
        "{err}"
    );
    let vmm = threads(p.child.id())
        .into_iter()
        .find(|t| t["Name"] == "vmm")
        .expect("the main thread");
    assert_ne!(vmm["CapEff"], "0000000000000000");
    let _ = p.child.kill();
}

#[test]
fn a_user_that_does_not_exist_or_a_user_without_the_sandbox_is_refused_in_one_line() {
    for (extra, want) in [
        (
            &["--user", "no-such-user-here"][..],
            "vmm: sandbox: unknown user 'no-such-user-here' in --user",
        ),
        (
            &["--user", "nobody", "--sandbox", "off"][..],
            "vmm: sandbox: --sandbox off and --user together: becoming another user is part of the sandbox",
        ),
    ] {
        let (_dir, mut p) = start("sandbox-bad", &[], extra);
        let status = p.wait_exit(T).expect("the VMM exits");
        assert_eq!(status.code(), Some(1), "{}", p.report());
        let err = wait_for_stderr(&p, want);
        assert_eq!(err.trim_end(), want, "{}", p.report());
    }
}

fn owner(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// Connects to `sock` as uid/gid 65534 holding the supplementary groups
/// `groups`, sends `{"cmd":"status"}` and returns the first line answered.
/// A forked child does it (the test process keeps its root): between fork
/// and `_exit` it makes only system calls on memory prepared before.
fn status_as_nobody_with_groups(sock: &std::path::Path, groups: &[libc::gid_t]) -> String {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeros is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = sock.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let request = b"{\"cmd\":\"status\"}\n";
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child makes only async-signal-safe system calls on
    // memory prepared above and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::close(pipe[0]);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                libc::_exit(2);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(3);
            }
            libc::write(fd, request.as_ptr().cast(), request.len());
            let mut buf = [0u8; 4096];
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(pipe[1], buf.as_ptr().cast(), n as usize);
                if buf[..n as usize].contains(&b'\n') {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: our end of the pipe; the child holds the other.
    unsafe { libc::close(pipe[1]) };
    // SAFETY: the read end is ours alone from here.
    let mut r = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    let mut out = String::new();
    let _ = std::io::Read::read_to_string(&mut r, &mut out);
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(libc::WEXITSTATUS(status), 0, "the client as nobody failed");
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_customer_admitted_by_a_supplementary_group_reaches_the_confined_vmm() {
    // The group need not exist: the socket and its directory get its id,
    // and the VMM reads the peer's groups from the socket (SO_PEERGROUPS),
    // not from /etc/group, which Landlock keeps it out of.
    // The socket in a run directory of its own, which the VMM makes
    // (0750, with the group), under a directory anyone may pass.
    let run = TempDir::new("sandbox-group-run");
    let sock = run.path().join("boxed").join("control.sock");
    let sock_s = sock.display().to_string();
    let (_dir, mut p) = start(
        "sandbox-group",
        &[],
        &[
            "--user",
            "nobody",
            "--allow-group",
            "4242",
            "--control",
            &sock_s,
        ],
    );
    assert!(p.wait_for("READY", T), "{}", p.report());
    let answer = status_as_nobody_with_groups(&sock, &[4242]);
    assert!(answer.contains("\"state\":\"running\""), "{answer}");
    // Without the group the file system already refuses; open it up so
    // that only the VMM's own check is left to refuse.
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open(sock.parent().expect("run dir"), 0o755);
    open(&sock, 0o666);
    let answer = status_as_nobody_with_groups(&sock, &[4243]);
    assert!(answer.contains("\"code\":\"forbidden\""), "{answer}");
    let _ = p.child.kill();
}
