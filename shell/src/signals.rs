//! Signals, turned into something the shell's poll loops can wait on.
//!
//! * SIGINT (Ctrl-C while a command runs; the terminal is in its normal mode then) writes a
//!   byte to a self-pipe: a command waiting on the VMM, `events` or `log --follow` sees it in
//!   its `poll` and stops, and the interactive shell returns to its prompt instead of dying.
//! * SIGTERM, SIGHUP and SIGQUIT end the process as usual, but first put the terminal back
//!   the way the shell found it if the shell had changed it (console raw mode, line editor):
//!   `tcsetattr` is async-signal-safe, and a `Drop` guard does not run when a signal kills
//!   the process.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

static PIPE_READ: AtomicI32 = AtomicI32::new(-1);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// Terminal settings of stdin when the shell started (only when stdin is a terminal).
static ORIGINAL_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
/// Whether the terminal may currently differ from [`ORIGINAL_TERMIOS`].
static TERMINAL_CHANGED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is one valid byte on the stack.
        // A full pipe (EAGAIN, non-blocking) already holds a pending wake-up: ignore.
        unsafe { libc::write(fd, std::ptr::addr_of!(byte).cast(), 1) };
    }
}

extern "C" fn on_terminate(sig: libc::c_int) {
    if TERMINAL_CHANGED.load(Ordering::Relaxed) {
        if let Some(t) = ORIGINAL_TERMIOS.get() {
            // SAFETY: tcsetattr(3) is async-signal-safe; `t` points to a termios initialised
            // before the handler was installed and never written again.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe. With the default action restored,
    // the re-raised signal (delivered once this handler returns) ends the process as if the
    // handler had never been there.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn set_handler(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that we then fill.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as usize;
    // No SA_RESTART: a blocking call interrupted by Ctrl-C should return EINTR.
    action.sa_flags = 0;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler only calls async-signal-safe
    // functions; the old action is not needed (null).
    if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs the handlers; call once at start-up, before anything changes the terminal.
pub fn install() -> io::Result<()> {
    if crate::term::isatty(libc::STDIN_FILENO) {
        if let Ok(t) = crate::term::get_termios(libc::STDIN_FILENO) {
            let _ = ORIGINAL_TERMIOS.set(t);
        }
    }
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    PIPE_READ.store(fds[0], Ordering::Relaxed);
    PIPE_WRITE.store(fds[1], Ordering::Relaxed);
    set_handler(libc::SIGINT, on_interrupt)?;
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        set_handler(sig, on_terminate)?;
    }
    Ok(())
}

/// The descriptor that becomes readable on Ctrl-C (`None` before [`install`]).
pub fn interrupt_fd() -> Option<RawFd> {
    let fd = PIPE_READ.load(Ordering::Relaxed);
    (fd >= 0).then_some(fd)
}

/// Consumes pending interrupts; true if there was one.
pub fn take_interrupt() -> bool {
    let Some(fd) = interrupt_fd() else {
        return false;
    };
    let mut any = false;
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a valid local buffer of the given length from our own
        // non-blocking pipe.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return any;
        }
        any = true;
    }
}

/// Marks that the terminal may now differ from how the shell found it (or no longer does):
/// a terminating signal restores it while this is set.
pub fn set_terminal_changed(changed: bool) {
    TERMINAL_CHANGED.store(changed, Ordering::Relaxed);
}
