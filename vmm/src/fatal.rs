//! What a bug in the VMM itself does: a panic in any thread (a vCPU, the
//! event loop, a console or hook thread) ends the whole process at once,
//! with one clear line on stderr and SIGABRT (a non-zero exit, a core
//! dump where the host keeps them), and systemd or the operator restarts
//! it. A VMM that lost a vCPU thread or its event loop and went on
//! answering `status` with `running` would lie to the customer and could
//! corrupt their disk; unwinding out of a device model half-way through a
//! request is no better. This is the `panic = "abort"` policy, set by a
//! hook so that it holds whatever profile the binary was built with
//! (docs/notes.md, "Panics").
//!
//! Guest- and client-controlled values never reach a panic by design
//! (checked arithmetic, no `unwrap` on them); this is the last line.

use std::panic::PanicHookInfo;

/// Installs the policy; call first thing in `main`. Hooks installed later
/// (the terminal restore of the stdio console) run before it.
pub fn install_panic_policy() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{}", panic_line(info));
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        }
        std::process::abort();
    }));
}

/// `vmm: internal error: thread 'vcpu0' panicked at src/x.rs:1:2: why; the VM is stopped`
fn panic_line(info: &PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    let at = info
        .location()
        .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    // One line, whatever the message holds.
    let msg = msg.replace('\n', " ");
    format!("vmm: internal error: thread '{name}' panicked{at}: {msg}; the VM is stopped (abort)")
}

/// Fault injection for the tests: `VMM_TEST_PANIC=<point>` in the VMM's
/// environment makes the named point panic (`vcpu`: each vCPU thread as it
/// starts; `control-status`: the event loop as it answers `status`), so
/// the policy above is checked end to end. Only whoever starts the VMM
/// sets its environment, so this gives no one a way in.
pub fn inject(point: &str) {
    if std::env::var_os("VMM_TEST_PANIC").is_some_and(|p| p == point) {
        panic!("injected by VMM_TEST_PANIC={point}");
    }
}

/// Fault injection for the seccomp tests: `VMM_TEST_SECCOMP=<kind>` makes
/// each thread of that kind (`vcpu`, `disk`, `net`, ...) call `socket(2)`, which no
/// filtered thread may, right after installing its filter.
pub fn inject_forbidden_syscall(kind: &str) {
    if std::env::var_os("VMM_TEST_SECCOMP").is_some_and(|k| k == kind) {
        // A packet socket: no thread may open one (the migration's thread
        // and the spawner may open TCP ones).
        // SAFETY: socket takes no pointers; the descriptor, if any, is closed.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd >= 0 {
            // SAFETY: closing the descriptor just created.
            unsafe { libc::close(fd) };
        }
    }
}
