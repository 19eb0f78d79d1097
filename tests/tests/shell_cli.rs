//! `vmm-shell` against fake control servers: no VMM, no KVM.
//!
//! Each fake VM is a directory under a temporary run directory holding a `control.sock` that a
//! thread serves with canned protocol lines (status, kernels, set-kernel, errors, events, a
//! console session with raw bytes, and one VM whose "VMM" dies mid-console). The shell runs
//! as a child process, one-shot over pipes or interactive on a pseudo-terminal.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tests::pty::{attach_to_pty, open_pty, same_termios, termios};

use serde_json::{json, Value};
use tests::{bin, TempDir};

const TIMEOUT: Duration = Duration::from_secs(20);
/// Console bytes the fake VMM replays on attach: escape sequences and bytes that are not
/// UTF-8 must reach the terminal untouched.
const REPLAY: &[u8] = b"replay: \x1b[1mboot\x1b[0m \xff\xfe\x01 login: ";
const LOG_DATA: &str = "[    0.000000] Linux version 6.1\r\nWelcome\r\n";

// ---------------------------------------------------------------------------------------
// The binary

/// The built `vmm-shell`, built on demand when a `cargo test -p tests` did not build it.
fn shell_bin() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let path = bin("vmm-shell");
        if !path.exists() {
            let profile_dir = path
                .parent()
                .and_then(Path::file_name)
                .and_then(OsStr::to_str)
                .unwrap_or("debug")
                .to_string();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "shell", "--bin", "vmm-shell"]);
            if profile_dir == "release" {
                cmd.arg("--release");
            } else if profile_dir != "debug" {
                cmd.args(["--profile", &profile_dir]);
            }
            let status = cmd.status().expect("run cargo build for vmm-shell");
            assert!(status.success(), "cargo build -p shell failed");
        }
        assert!(
            path.exists(),
            "{} missing: cargo build -p shell",
            path.display()
        );
        path
    })
    .clone()
}

/// A command for the shell with a clean environment: the run directory only from
/// `--run-dir` (tests pass it), no colour unless a test asks, HOME in the temp dir.
fn shell_cmd(home: &Path) -> Command {
    let mut cmd = Command::new(shell_bin());
    cmd.env_remove("SSH_ORIGINAL_COMMAND")
        .env_remove("VMM_RUN_DIR")
        .env_remove("NO_COLOR")
        .env("HOME", home)
        .env("TERM", "xterm");
    cmd
}

fn run_shell(run_dir: &Path, args: &[&str]) -> Output {
    shell_cmd(run_dir)
        .arg("--run-dir")
        .arg(run_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vmm-shell")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code, with the output in the message when it is not the expected one.
fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// A failure is reported as exactly one line on stderr.
fn one_line_error(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(err.starts_with("vmm-shell: "), "stderr: {err:?}");
    err.trim_end().to_string()
}

// ---------------------------------------------------------------------------------------
// Fake VMMs

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behavior {
    /// Answers everything; the console echoes input back.
    Normal,
    /// Refuses the peer like a VMM whose SO_PEERCRED check failed: one error line, close.
    Refuse,
    /// Like Normal, but the console connection closes shortly after attaching.
    DieOnConsole,
}

#[derive(Default)]
struct Record {
    /// Request lines received, parsed.
    requests: Vec<Value>,
    /// Raw bytes typed into consoles.
    console_in: Vec<u8>,
}

#[derive(Clone)]
struct FakeVm {
    record: Arc<(Mutex<Record>, Condvar)>,
}

impl FakeVm {
    fn start(run_dir: &Path, name: &str, behavior: Behavior) -> FakeVm {
        let dir = run_dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("control.sock")).unwrap();
        let vm = FakeVm {
            record: Arc::new((Mutex::new(Record::default()), Condvar::new())),
        };
        let name = name.to_string();
        let shared = vm.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let name = name.clone();
                let vm = shared.clone();
                std::thread::spawn(move || {
                    let _ = vm.serve(stream, &name, behavior);
                });
            }
        });
        vm
    }

    fn commands(&self) -> Vec<String> {
        let g = self.record.0.lock().unwrap();
        g.requests
            .iter()
            .filter_map(|r| r["cmd"].as_str().map(String::from))
            .collect()
    }

    fn requests(&self) -> Vec<Value> {
        self.record.0.lock().unwrap().requests.clone()
    }

    /// Waits until the console input received contains `needle`.
    fn wait_console_in(&self, needle: &[u8]) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        let (m, cv) = &*self.record;
        let mut g = m.lock().unwrap();
        loop {
            if g.console_in.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn serve(&self, stream: UnixStream, name: &str, behavior: Behavior) -> std::io::Result<()> {
        let mut w = stream.try_clone()?;
        if behavior == Behavior::Refuse {
            w.write_all(
                b"{\"ok\":false,\"error\":\"permission denied: uid 0 may not control this VM\"}\n",
            )?;
            return Ok(());
        }
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let req: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => {
                    writeln!(
                        w,
                        "{}",
                        json!({"ok": false, "error": format!("malformed JSON: {e}")})
                    )?;
                    continue;
                }
            };
            {
                let mut g = self.record.0.lock().unwrap();
                g.requests.push(req.clone());
                self.record.1.notify_all();
            }
            let cmd = req["cmd"].as_str().unwrap_or("").to_string();
            let reply = match cmd.as_str() {
                "status" => json!({
                    "ok": true, "name": name, "state": "running", "kernel": "mini",
                    "vcpus": 1, "memory_mib": 128, "uptime_ms": 3_723_000u64, "boot_count": 1,
                    "last_reset": null,
                    "watchdog": {"armed": true, "timeout_s": 30, "seconds_left": 12,
                                 "action": "reset", "expiries": 0},
                }),
                "kernels" => json!({
                    "ok": true,
                    "kernels": [
                        {"name": "mini", "version": "6.1.0", "description": "tiny test kernel"},
                        {"name": "debian", "description": "Debian generic"},
                    ],
                    "current": "mini", "next": "mini",
                }),
                "set-kernel" => match req["name"].as_str() {
                    Some(k @ ("mini" | "debian")) => {
                        json!({"ok": true, "next": k, "current": "mini"})
                    }
                    Some(other) => {
                        json!({"ok": false, "error": format!("unknown kernel '{other}'")})
                    }
                    None => json!({"ok": false, "error": "missing argument 'name' for set-kernel"}),
                },
                "pause" | "resume" | "reset" | "poweroff" | "start" => json!({"ok": true}),
                "shutdown" | "reboot" => {
                    json!({"ok": true, "result": "graceful", "elapsed_ms": 1234})
                }
                "watchdog" => json!({"ok": true, "armed": false, "timeout_s": null,
                                     "seconds_left": null, "action": "reset", "expiries": 0}),
                "set-watchdog" => json!({"ok": true, "armed": false, "timeout_s": null,
                                         "seconds_left": null, "action": req["action"],
                                         "expiries": 0}),
                "log" => json!({"ok": true, "data": LOG_DATA, "bytes": LOG_DATA.len(),
                                "total_bytes": LOG_DATA.len()}),
                "subscribe" => {
                    writeln!(w, "{}", json!({"ok": true}))?;
                    std::thread::sleep(Duration::from_millis(100));
                    writeln!(
                        w,
                        "{}",
                        json!({"event": "state_changed", "state": "paused",
                        "previous": "running", "vm": name, "time": "2026-01-01T00:00:00.000Z"})
                    )?;
                    writeln!(
                        w,
                        "{}",
                        json!({"event": "reset", "cause": "watchdog",
                        "vm": name, "time": "2026-01-01T00:00:01.000Z"})
                    )?;
                    continue;
                }
                "console" => {
                    // The reply and the first console bytes in one write: the client must
                    // not lose bytes it read along with the reply line.
                    let mut first =
                        format!("{}\n", json!({"ok": true, "replay_bytes": REPLAY.len()}))
                            .into_bytes();
                    first.extend_from_slice(REPLAY);
                    w.write_all(&first)?;
                    if behavior == Behavior::DieOnConsole {
                        std::thread::sleep(Duration::from_millis(300));
                        w.write_all(b"\r\nKernel panic - dying\r\n")?;
                        std::thread::sleep(Duration::from_millis(50));
                        return Ok(());
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = reader.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        {
                            let mut g = self.record.0.lock().unwrap();
                            g.console_in.extend_from_slice(&buf[..n]);
                            self.record.1.notify_all();
                        }
                        w.write_all(&buf[..n])?;
                    }
                }
                other => json!({"ok": false, "error": format!("unknown command '{other}'")}),
            };
            writeln!(w, "{reply}")?;
        }
    }
}

/// A socket file nobody listens on (a VMM that died without cleaning up).
fn stale_socket(run_dir: &Path, name: &str) {
    let dir = run_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    drop(UnixListener::bind(dir.join("control.sock")).unwrap());
}

// ---------------------------------------------------------------------------------------
// One-shot mode over pipes

#[test]
fn list_shows_only_vms_whose_sockets_let_us_in() {
    let tmp = TempDir::new("shell-list");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "db", Behavior::Normal);
    FakeVm::start(rd, "refused", Behavior::Refuse);
    stale_socket(rd, "stale");
    std::fs::create_dir_all(rd.join("nosock")).unwrap();
    std::fs::write(rd.join("file"), b"x").unwrap();

    let o = run_shell(rd, &["list"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("web1") && out.contains("db"), "{out}");
    for hidden in ["refused", "stale", "nosock", "file"] {
        assert!(!out.contains(hidden), "{hidden} listed:\n{out}");
    }
    assert!(
        out.contains("running") && out.contains("1h 02m 03s"),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "colour on a pipe: {out:?}");

    let o = run_shell(rd, &["--json", "list"]);
    assert_code(&o, 0);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vm"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db", "web1"]);
    assert_eq!(v[1]["status"]["ok"], true);
    assert_eq!(v[1]["status"]["name"], "web1");

    // An empty run directory, and one that does not exist: nothing, not an error.
    let empty = TempDir::new("shell-list-empty");
    let o = run_shell(empty.path(), &["list"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("No VMs available"), "{}", stdout(&o));
    let o = run_shell(&empty.path().join("missing"), &["--json", "list"]);
    assert_code(&o, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap(),
        json!([])
    );
}

#[test]
fn another_unix_user_sees_only_what_the_os_lets_it_reach() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: needs root to run the shell as another uid");
        return;
    }
    let tmp = TempDir::new("shell-uid");
    let rd = tmp.path();
    std::fs::set_permissions(rd, std::fs::Permissions::from_mode(0o755)).unwrap();
    FakeVm::start(rd, "theirs", Behavior::Normal);
    FakeVm::start(rd, "shared", Behavior::Normal);
    // "theirs": a directory only root may enter (like root:customer-a 0750).
    std::fs::set_permissions(rd.join("theirs"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(rd.join("shared"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        rd.join("shared/control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let as_nobody = |args: &[&str]| {
        shell_cmd(rd)
            .uid(65534)
            .gid(65534)
            .env("HOME", "/nonexistent")
            .arg("--run-dir")
            .arg(rd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vmm-shell as nobody")
    };
    let o = as_nobody(&["--json", "list"]);
    if o.status.code() == Some(126) || stderr(&o).contains("Permission denied") {
        eprintln!("SKIP: the shell binary is not executable by uid 65534");
        return;
    }
    assert_code(&o, 0);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vm"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shared"]);
    // Naming the other customer's VM, or its socket path, is refused by the OS.
    for target in [
        "theirs".to_string(),
        rd.join("theirs/control.sock").display().to_string(),
    ] {
        let o = as_nobody(&[&target, "status"]);
        assert_code(&o, 1);
        let err = one_line_error(&o);
        assert!(err.contains("not available to you"), "{err}");
    }
    // The same user can use the shared one.
    let o = as_nobody(&["shared", "status"]);
    assert_code(&o, 0);
}

#[test]
fn status_one_shot_human_and_json() {
    let tmp = TempDir::new("shell-status");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);

    // The only VM may be left out.
    let o = run_shell(rd, &["status"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("state       running"), "{out}");
    assert!(out.contains("uptime      1h 02m 03s"), "{out}");
    assert!(out.contains("armed, 12 s left of 30 s"), "{out}");
    assert!(!out.contains('\x1b'));

    for args in [&["--json", "status"][..], &["web1", "status", "--json"]] {
        let o = run_shell(rd, args);
        assert_code(&o, 0);
        let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["name"], "web1");
        assert_eq!(v["uptime_ms"], 3_723_000);
    }
    // The VM given as its directory path under the run directory.
    let path = rd.join("web1").display().to_string();
    assert_code(&run_shell(rd, &[&path, "status"]), 0);

    for (args, cmd) in [
        (&["pause"][..], "pause"),
        (&["resume"], "resume"),
        (&["start"], "start"),
        (&["reset"], "reset"),
        (&["web1", "shutdown", "--timeout", "5"], "shutdown"),
        (&["reboot"], "reboot"),
        (&["watchdog", "action", "pause"], "set-watchdog"),
        (&["watchdog", "show"], "watchdog"),
    ] {
        let o = run_shell(rd, args);
        assert_code(&o, 0);
        assert_eq!(
            vm.commands().last().map(String::as_str),
            Some(cmd),
            "{args:?}"
        );
    }
    let shutdown = vm
        .requests()
        .into_iter()
        .find(|r| r["cmd"] == "shutdown")
        .unwrap();
    assert_eq!(shutdown["timeout_s"], 5);
    let o = run_shell(rd, &["reboot"]);
    assert!(
        stdout(&o).contains("rebooted cleanly (1.2 s)"),
        "{}",
        stdout(&o)
    );
    let o = run_shell(rd, &["--json", "pause"]);
    assert_eq!(stdout(&o).trim(), "{\"ok\":true}");
}

#[test]
fn several_vms_need_a_name() {
    let tmp = TempDir::new("shell-several");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "web2", Behavior::Normal);
    let o = run_shell(rd, &["status"]);
    assert_code(&o, 2);
    let err = one_line_error(&o);
    assert!(err.contains("web1, web2"), "{err}");
    assert_code(&run_shell(rd, &["web2", "status"]), 0);
}

#[test]
fn unknown_vm_and_unknown_command_fail_with_one_line() {
    let tmp = TempDir::new("shell-unknown");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "refused", Behavior::Refuse);
    stale_socket(rd, "stale");

    let o = run_shell(rd, &["nosuch", "status"]);
    assert_code(&o, 1);
    assert!(one_line_error(&o).contains("no VM named 'nosuch'"));

    let o = run_shell(rd, &["stale", "status"]);
    assert_code(&o, 1);
    assert!(one_line_error(&o).contains("not running"));

    // The VMM's own refusal is shown as it said it.
    let o = run_shell(rd, &["refused", "status"]);
    assert_code(&o, 1);
    assert!(one_line_error(&o).contains("refused: permission denied"));

    let o = run_shell(rd, &["web1", "frobnicate"]);
    assert_code(&o, 2);
    assert!(one_line_error(&o).contains("unknown command 'frobnicate'"));

    let o = run_shell(rd, &["frobnicate"]);
    assert_code(&o, 2);
    assert!(one_line_error(&o).contains("unknown command 'frobnicate'"));

    let o = run_shell(rd, &["web1", "log", "--tail"]);
    assert_code(&o, 2);
    one_line_error(&o);

    // Paths outside the run directory are not VMs.
    let o = run_shell(rd, &["/tmp/elsewhere/control.sock", "status"]);
    assert_code(&o, 2);
    one_line_error(&o);

    // --json failures also print an error object on stdout.
    let o = run_shell(rd, &["--json", "nosuch", "status"]);
    assert_code(&o, 1);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("nosuch"));
}

#[test]
fn kernel_commands_and_vmm_errors() {
    let tmp = TempDir::new("shell-kernel");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);

    let o = run_shell(rd, &["kernel", "list"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("* mini"), "{out}");
    assert!(
        out.contains("debian") && out.contains("Debian generic"),
        "{out}"
    );

    let o = run_shell(rd, &["kernel", "show"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("next boot   mini"), "{}", stdout(&o));

    let o = run_shell(rd, &["web1", "kernel", "set", "debian"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("takes effect at the next boot"), "{out}");
    let set = vm
        .requests()
        .into_iter()
        .find(|r| r["cmd"] == "set-kernel")
        .unwrap();
    assert_eq!(set["name"], "debian");
    // One-shot never reboots on its own.
    assert!(!vm.commands().contains(&"reboot".to_string()));

    // An error from the VMM: non-zero, its message, and the raw object with --json.
    let o = run_shell(rd, &["kernel", "set", "nope"]);
    assert_code(&o, 1);
    assert_eq!(one_line_error(&o), "vmm-shell: web1: unknown kernel 'nope'");
    let o = run_shell(rd, &["--json", "kernel", "set", "nope"]);
    assert_code(&o, 1);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v, json!({"ok": false, "error": "unknown kernel 'nope'"}));
}

#[test]
fn halt_without_a_terminal_needs_yes() {
    let tmp = TempDir::new("shell-halt");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);
    let o = run_shell(rd, &["web1", "halt"]);
    assert_code(&o, 2);
    let err = one_line_error(&o);
    assert!(
        err.contains("-y") && err.contains("not a terminal"),
        "{err}"
    );
    assert!(!vm.commands().contains(&"poweroff".to_string()));

    let o = run_shell(rd, &["web1", "halt", "-y"]);
    assert_code(&o, 0);
    assert_eq!(vm.commands().last().map(String::as_str), Some("poweroff"));
}

#[test]
fn dash_c_ssh_original_command_and_env_run_dir() {
    let tmp = TempDir::new("shell-ssh");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);

    // Login shell: sshd runs `vmm-shell -c "COMMAND"`.
    let o = run_shell(rd, &["-c", "web1 status --json"]);
    assert_code(&o, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()["name"],
        "web1"
    );

    // ForceCommand: the user's command arrives in SSH_ORIGINAL_COMMAND.
    let o = shell_cmd(rd)
        .env("SSH_ORIGINAL_COMMAND", "web1 kernel show")
        .env("VMM_RUN_DIR", rd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert!(stdout(&o).contains("running     mini"), "{}", stdout(&o));

    // ForceCommand naming the shell, run through a login shell that is this shell.
    let force = format!("/usr/local/bin/vmm-shell --run-dir {}", rd.display());
    let o = shell_cmd(rd)
        .args(["-c", &force])
        .env("SSH_ORIGINAL_COMMAND", "--json status")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()["ok"],
        true
    );

    // A remote user cannot move the shell to another run directory.
    let o = shell_cmd(rd)
        .env("SSH_ORIGINAL_COMMAND", "--run-dir /tmp list")
        .env("VMM_RUN_DIR", rd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_code(&o, 2);
    one_line_error(&o);

    // `help` works without any VM.
    let o = run_shell(rd, &["--help"]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("Usage: vmm-shell"));
}

#[test]
fn log_and_commands_from_a_script() {
    let tmp = TempDir::new("shell-log");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);
    let o = run_shell(rd, &["log"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), LOG_DATA);
    let o = run_shell(rd, &["log", "--bytes", "10"]);
    assert_code(&o, 0);
    let log = vm
        .requests()
        .into_iter()
        .rfind(|r| r["cmd"] == "log")
        .unwrap();
    assert_eq!(log["bytes"], 10);

    // Commands piped into the shell, one per line; a failure makes the exit status non-zero.
    let mut child = shell_cmd(rd)
        .arg("--run-dir")
        .arg(rd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"# a comment\nuse web1\nstatus\nkernel set nope\npause\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 1);
    assert!(stdout(&o).contains("state       running"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("unknown kernel 'nope'"),
        "{}",
        stderr(&o)
    );
    assert_eq!(vm.commands().last().map(String::as_str), Some("pause"));
}

/// Bytes read so far and whether the stream ended, with a condition variable.
type Collected = Arc<(Mutex<(Vec<u8>, bool)>, Condvar)>;

/// Reads a child's stdout on a thread, so a test can wait for text with a timeout.
struct Collector {
    buf: Collected,
}

impl Collector {
    fn new(mut r: impl Read + Send + 'static) -> Collector {
        let buf: Collected = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let shared = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = r.read(&mut chunk).unwrap_or(0);
                let mut g = shared.0.lock().unwrap();
                if n == 0 {
                    g.1 = true;
                    shared.1.notify_all();
                    return;
                }
                g.0.extend_from_slice(&chunk[..n]);
                shared.1.notify_all();
            }
        });
        Collector { buf }
    }

    /// Waits for `needle` at or after byte `from`; returns the offset just past it.
    fn wait_for(&self, needle: &[u8], from: usize) -> Option<usize> {
        let deadline = Instant::now() + TIMEOUT;
        let (m, cv) = &*self.buf;
        let mut g = m.lock().unwrap();
        loop {
            let hay = g.0.get(from..).unwrap_or_default();
            if let Some(i) = hay.windows(needle.len()).position(|w| w == needle) {
                return Some(from + i + needle.len());
            }
            let now = Instant::now();
            if now >= deadline || g.1 {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.0.lock().unwrap().0).into_owned()
    }

    fn bytes(&self) -> Vec<u8> {
        self.buf.0.lock().unwrap().0.clone()
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("vmm-shell did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn events_print_until_ctrl_c() {
    let tmp = TempDir::new("shell-events");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);
    let mut child = shell_cmd(rd)
        .arg("--run-dir")
        .arg(rd)
        .args(["web1", "events", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Collector::new(child.stdout.take().unwrap());
    assert!(out.wait_for(b"\"watchdog\"", 0).is_some(), "{}", out.text());
    // SAFETY: kill with a valid pid of our child and a valid signal number.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0));
    let lines: Vec<Value> = out
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["event"], "state_changed");
    assert_eq!(lines[1]["cause"], "watchdog");

    // Human-readable form.
    let mut child = shell_cmd(rd)
        .arg("--run-dir")
        .arg(rd)
        .args(["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = Collector::new(child.stdout.take().unwrap());
    assert!(
        out.wait_for(b"reset: watchdog expired", 0).is_some(),
        "{}",
        out.text()
    );
    assert!(
        out.text().contains("web1 state: running -> paused"),
        "{}",
        out.text()
    );
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn console_over_pipes_forwards_input_and_keeps_raw_bytes() {
    let tmp = TempDir::new("shell-console-pipe");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "flaky", Behavior::DieOnConsole);

    let mut child = shell_cmd(rd)
        .arg("--run-dir")
        .arg(rd)
        .args(["web1", "console"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Collector::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    assert!(out.wait_for(REPLAY, 0).is_some(), "{:?}", out.text());
    stdin.write_all(b"hello\r").unwrap();
    assert!(vm.wait_console_in(b"hello\r"));
    let at = out.wait_for(b"hello\r", 0).expect("echo");
    // Ctrl-] detaches; what precedes it on the same write still reaches the guest.
    stdin.write_all(b"bye\x1d").unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0));
    assert!(vm.wait_console_in(b"hello\rbye"));
    assert!(out.bytes().starts_with(REPLAY), "{:?}", out.text());
    assert!(at > REPLAY.len());

    // The VMM dies while attached: non-zero, one line saying so.
    let mut child = shell_cmd(rd)
        .arg("--run-dir")
        .arg(rd)
        .args(["flaky", "console"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let out = Collector::new(child.stdout.take().unwrap());
    let err = Collector::new(child.stderr.take().unwrap());
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(1));
    assert!(out.wait_for(b"dying", 0).is_some());
    assert!(
        err.wait_for(b"flaky: the VMM closed the console connection", 0)
            .is_some(),
        "{}",
        err.text()
    );
}

// ---------------------------------------------------------------------------------------
// On a pseudo-terminal

struct Pty {
    child: Child,
    /// Our copy of the terminal side, to read its settings.
    slave: OwnedFd,
    master: File,
    out: Collector,
    pos: usize,
    initial: libc::termios,
}

impl Pty {
    fn spawn(mut cmd: Command) -> Pty {
        let (master, slave) = open_pty();
        // Read before the shell can touch the terminal (line editing
        // switches it to its own mode right away).
        let initial = termios(slave.as_raw_fd());
        attach_to_pty(&mut cmd, &slave);
        let child = cmd.spawn().expect("spawn vmm-shell on a pty");
        let master = File::from(master);
        let out = Collector::new(master.try_clone().unwrap());
        Pty {
            child,
            slave,
            master,
            out,
            pos: 0,
            initial,
        }
    }

    /// The terminal settings from before the shell started.
    fn initial_termios(&self) -> libc::termios {
        self.initial
    }

    fn expect(&mut self, needle: &str) {
        match self.out.wait_for(needle.as_bytes(), self.pos) {
            Some(end) => self.pos = end,
            None => panic!(
                "expected {needle:?} after byte {}; terminal output:\n{:?}",
                self.pos,
                self.out.text().get(self.pos..).unwrap_or_default()
            ),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
        self.master.flush().unwrap();
    }

    fn termios(&self) -> libc::termios {
        termios(self.slave.as_raw_fd())
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn interactive_completion_status_console_and_a_dying_vmm() {
    let tmp = TempDir::new("shell-pty");
    let rd = tmp.path();
    let web1 = FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "db", Behavior::Normal);
    FakeVm::start(rd, "flaky", Behavior::DieOnConsole);
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = shell_cmd(&home);
    cmd.env("NO_COLOR", "1").arg("--run-dir").arg(rd);
    let mut pty = Pty::spawn(cmd);
    let original = pty.initial_termios();

    pty.expect("Your VMs: db, flaky, web1");
    pty.expect("vmm> ");
    // Complete a VM name.
    pty.send(b"use we\t");
    pty.expect("web1 ");
    pty.send(b"\r");
    pty.expect("Selected web1");
    pty.expect("web1> ");
    let at_prompt = pty.termios();

    // Complete a command.
    pty.send(b"stat\t");
    pty.expect("status ");
    pty.send(b"\r");
    pty.expect("uptime      1h 02m 03s");
    pty.expect("web1> ");
    assert_eq!(web1.commands().last().map(String::as_str), Some("status"));

    pty.send(b"help kernel\r");
    pty.expect("kernel list | show | set NAME");
    pty.expect("web1> ");

    // Attach, type, detach with Ctrl-].
    pty.send(b"console\r");
    pty.expect("Connected to the console of web1");
    pty.expect("replay: ");
    let raw = pty.termios();
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "not raw"
    );
    pty.send(b"ping");
    assert!(web1.wait_console_in(b"ping"));
    pty.expect("ping");
    pty.send(b"\x1d");
    pty.expect("Detached from web1");
    pty.expect("web1> ");
    assert!(
        same_termios(&pty.termios(), &at_prompt),
        "terminal settings not restored"
    );

    // Events until Ctrl-C, then back to the prompt.
    pty.send(b"events\r");
    pty.expect("reset: watchdog expired");
    pty.send(b"\x03");
    pty.expect("web1> ");

    // A VMM that dies while attached: the shell says so and prompts again.
    pty.send(b"flaky console\r");
    pty.expect("Kernel panic - dying");
    pty.expect("flaky: the VMM closed the console connection");
    pty.expect("web1> ");
    assert!(
        same_termios(&pty.termios(), &at_prompt),
        "terminal settings not restored"
    );

    // Kernel set offers a reboot; decline.
    pty.send(b"kernel set debian\r");
    pty.expect("takes effect at the next boot");
    pty.expect("Reboot web1 now to boot debian? [y/N] ");
    pty.send(b"n\r");
    pty.expect("Not rebooting");
    pty.expect("web1> ");
    assert!(!web1.commands().contains(&"reboot".to_string()));

    // Halt asks; decline, nothing happens.
    pty.send(b"halt\r");
    pty.expect("[y/N] ");
    pty.send(b"\r");
    pty.expect("halt cancelled");
    pty.expect("web1> ");
    assert!(!web1.commands().contains(&"poweroff".to_string()));

    pty.send(b"exit\r");
    let status = wait_exit(&mut pty.child);
    assert_eq!(status.code(), Some(0));
    assert!(
        same_termios(&pty.termios(), &original),
        "terminal left changed"
    );
    let history = std::fs::read_to_string(home.join(".vmm_shell_history")).unwrap();
    assert!(
        history.contains("status") && history.contains("use web1"),
        "{history}"
    );
}

#[test]
fn one_shot_console_restores_the_terminal_on_detach_sigterm_and_vmm_death() {
    let tmp = TempDir::new("shell-pty-console");
    let rd = tmp.path();
    FakeVm::start(rd, "web1", Behavior::Normal);
    FakeVm::start(rd, "flaky", Behavior::DieOnConsole);

    let mut cmd = shell_cmd(rd);
    cmd.arg("--run-dir").arg(rd).args(["web1", "console"]);
    let mut pty = Pty::spawn(cmd);
    let original = pty.initial_termios();
    pty.expect("replay: ");
    assert!(
        !same_termios(&pty.termios(), &original),
        "console not in raw mode"
    );
    pty.send(b"\x1d");
    let status = wait_exit(&mut pty.child);
    assert_eq!(status.code(), Some(0));
    assert!(same_termios(&pty.termios(), &original));

    // Killed with SIGTERM while attached: the terminal is restored before it dies.
    let mut cmd = shell_cmd(rd);
    cmd.arg("--run-dir").arg(rd).args(["web1", "console"]);
    let mut pty = Pty::spawn(cmd);
    let original = pty.initial_termios();
    pty.expect("replay: ");
    assert!(!same_termios(&pty.termios(), &original));
    // SAFETY: kill with our child's pid and a valid signal number.
    unsafe { libc::kill(pty.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = wait_exit(&mut pty.child);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
    assert!(same_termios(&pty.termios(), &original));

    let mut cmd = shell_cmd(rd);
    cmd.arg("--run-dir").arg(rd).args(["flaky", "console"]);
    let mut pty = Pty::spawn(cmd);
    let original = pty.initial_termios();
    pty.expect("dying");
    pty.expect("the VMM closed the console connection");
    let status = wait_exit(&mut pty.child);
    assert_eq!(status.code(), Some(1));
    assert!(same_termios(&pty.termios(), &original));
}

#[test]
fn terminal_gets_colour_and_confirmation_prompts() {
    let tmp = TempDir::new("shell-pty-colour");
    let rd = tmp.path();
    let vm = FakeVm::start(rd, "web1", Behavior::Normal);

    let mut cmd = shell_cmd(rd);
    cmd.arg("--run-dir").arg(rd).arg("status");
    let mut pty = Pty::spawn(cmd);
    pty.expect("\x1b[1;32mrunning\x1b[0m");
    assert_eq!(wait_exit(&mut pty.child).code(), Some(0));

    let mut cmd = shell_cmd(rd);
    cmd.env("NO_COLOR", "1")
        .arg("--run-dir")
        .arg(rd)
        .arg("status");
    let mut pty = Pty::spawn(cmd);
    pty.expect("running");
    assert_eq!(wait_exit(&mut pty.child).code(), Some(0));
    assert!(!pty.out.text().contains('\x1b'), "{:?}", pty.out.text());

    // One-shot halt on a terminal asks.
    let mut cmd = shell_cmd(rd);
    cmd.arg("--run-dir").arg(rd).arg("halt");
    let mut pty = Pty::spawn(cmd);
    pty.expect("[y/N] ");
    pty.send(b"y\n");
    assert_eq!(wait_exit(&mut pty.child).code(), Some(0));
    assert_eq!(vm.commands().last().map(String::as_str), Some("poweroff"));
}
