//! Pseudo-terminal plumbing for tests that drive the admin shell as a
//! person would.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

fn set_cloexec(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own, with a valid command and flag.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// A pseudo-terminal pair (master, slave), both close-on-exec, 120x40.
pub fn try_open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into valid locals; name and termios are null
    // (defaults), the window size points to a valid struct.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    set_cloexec(master);
    set_cloexec(slave);
    // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

/// [`try_open_pty`] for tests: a failure fails the test.
pub fn open_pty() -> (OwnedFd, OwnedFd) {
    try_open_pty().unwrap_or_else(|e| panic!("openpty: {e}"))
}

pub fn termios(fd: RawFd) -> libc::termios {
    // SAFETY: an all-zero termios is valid storage for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid and writable; fd is our open pty.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t
}

pub fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

/// Makes `slave` the command's stdin, stdout, stderr and controlling
/// terminal (a new session), as a login shell would have it.
pub fn attach_to_pty(cmd: &mut Command, slave: &OwnedFd) {
    for (i, stdio) in [0, 1, 2]
        .iter()
        .map(|_| slave.try_clone().expect("dup pty"))
        .enumerate()
    {
        let stdio = Stdio::from(stdio);
        match i {
            0 => cmd.stdin(stdio),
            1 => cmd.stdout(stdio),
            _ => cmd.stderr(stdio),
        };
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // async-signal-safe functions (setsid, ioctl) on its own stdin.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
