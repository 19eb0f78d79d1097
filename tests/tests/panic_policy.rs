//! A bug in the VMM (a panic in any of its threads) ends the process with
//! one clear line and SIGABRT, instead of leaving a VMM that lost a vCPU
//! or its event loop and still says `running` (vmm/src/fatal.rs).

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tests::control::Ctl;
use tests::tiny::{vmm_command, Asm};
use tests::{TempDir, VmmProcess};

/// A tiny guest that says READY and spins, in a VMM whose `point`
/// panics (`VMM_TEST_PANIC`).
fn start(tag: &str, point: &str) -> (TempDir, VmmProcess) {
    let dir = TempDir::new(tag);
    let mut a = Asm::new();
    a.print("READY\r\n").spin();
    let sock = dir.path().join("control.sock");
    let p = VmmProcess::spawn_cmd(
        vmm_command(dir.path(), "panicky", &a, &sock)
            .env("VMM_TEST_PANIC", point)
            .env_remove("RUST_BACKTRACE"),
    );
    (dir, p)
}

/// The process ended on SIGABRT with exactly one line about the panic.
fn assert_aborted_with_one_line(p: &mut VmmProcess, thread: &str, point: &str) {
    let status = p
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the VMM is still running after the panic\n{}", p.report()));
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{status:?}\n{}",
        p.report()
    );
    let err = p.stderr();
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("internal error"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    let line = lines[0];
    assert!(
        line.starts_with(&format!(
            "vmm: internal error: thread '{thread}' panicked at "
        )),
        "{line}"
    );
    assert!(line.contains(&format!("VMM_TEST_PANIC={point}")), "{line}");
    assert!(line.ends_with("the VM is stopped (abort)"), "{line}");
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vmm_with_one_clear_line_and_sigabrt() {
    let (_dir, mut p) = start("panic-vcpu", "vcpu");
    assert_aborted_with_one_line(&mut p, "vcpu0", "vcpu");
    assert!(
        !p.output().contains("READY"),
        "the guest ran on a VMM that had lost its vCPU thread"
    );
}

#[test]
fn a_panic_while_answering_a_client_ends_the_vmm_and_the_client_sees_the_socket_close() {
    let (dir, mut p) = start("panic-ctl", "control-status");
    assert!(
        p.wait_for("READY", Duration::from_secs(20)),
        "{}",
        p.report()
    );
    let mut ctl = Ctl::connect(&dir.path().join("control.sock"));
    ctl.send_line(r#"{"cmd":"status"}"#);
    let mut line = String::new();
    use std::io::BufRead;
    let n = ctl.reader().read_line(&mut line).unwrap_or(0);
    assert_eq!(n, 0, "expected the connection to close, got {line:?}");
    assert_aborted_with_one_line(&mut p, "main", "control-status");
}
