//! The VMM's own terminal: raw mode, and its restore from signal handlers, atexit and the
//! panic hook.

use super::*;

// ----- terminal state, restorable from signal handlers, atexit and the panic hook -----

pub(super) struct SavedTermios(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::termios>>);
// SAFETY: written once by `enter_raw_mode` before `TERMIOS_SAVED` is set (Release), read only
// after observing it set (Acquire); never written concurrently.
unsafe impl Sync for SavedTermios {}

pub(super) static SAVED_TERMIOS: SavedTermios =
    SavedTermios(std::cell::UnsafeCell::new(std::mem::MaybeUninit::uninit()));
pub(super) static TERMIOS_SAVED: AtomicBool = AtomicBool::new(false);
pub(super) static TERMIOS_FD: AtomicI32 = AtomicI32::new(-1);
pub(super) static RESTORE_HOOKS: Once = Once::new();

/// Restores the terminal settings saved when the stdio console entered raw mode. Idempotent
/// and async-signal-safe (only `tcsetattr`): call it from your own signal handlers. It is
/// already called on drop of [`StdioConsole`], at `exit`, from the panic hook and on
/// SIGTERM/SIGHUP/SIGQUIT/SIGINT when those had their default disposition.
pub fn restore_terminal() {
    if TERMIOS_SAVED.swap(false, Ordering::AcqRel) {
        let fd = TERMIOS_FD.load(Ordering::Acquire);
        // SAFETY: `TERMIOS_SAVED` was set after `SAVED_TERMIOS` was fully written; tcsetattr
        // only reads the struct.
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, (*SAVED_TERMIOS.0.get()).as_ptr());
        }
    }
}

extern "C" fn restore_terminal_at_exit() {
    restore_terminal();
}

extern "C" fn restore_terminal_on_signal(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: signal() and raise() are async-signal-safe; re-raising with the default action
    // terminates the process as the signal would have without our handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

pub(super) fn install_restore_hooks() {
    RESTORE_HOOKS.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(restore_terminal_at_exit);
        }
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT] {
            // SAFETY: query-then-set of a handler; the handler only calls async-signal-safe
            // functions. Handlers the VMM installed earlier are left alone.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_DFL
                {
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction =
                        restore_terminal_on_signal as *const () as libc::sighandler_t;
                    libc::sigemptyset(&mut new.sa_mask);
                    libc::sigaction(sig, &new, std::ptr::null_mut());
                }
            }
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

pub(super) fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts `fd` in raw input mode (no echo, no line editing, no signals from keys, output
/// post-processing kept so the VMM's own log lines stay readable) and arranges for restore.
pub(super) fn enter_raw_mode(fd: RawFd) -> io::Result<()> {
    if TERMIOS_SAVED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut original: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios.
    if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = original;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: single writer before the flag is published (see `SavedTermios`).
    unsafe {
        (*SAVED_TERMIOS.0.get()).write(original);
    }
    TERMIOS_FD.store(fd, Ordering::Release);
    TERMIOS_SAVED.store(true, Ordering::Release);
    install_restore_hooks();
    // SAFETY: valid pointer to a termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        let e = io::Error::last_os_error();
        TERMIOS_SAVED.store(false, Ordering::Release);
        return Err(e);
    }
    Ok(())
}
