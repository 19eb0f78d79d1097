//! Terminal and descriptor helpers: `isatty`, a raw-mode guard, an interruptible `poll`.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::error::ShellError;
use crate::signals;

/// Whether `fd` is a terminal.
pub fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number; any value is acceptable.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal settings of `fd`.
pub fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

fn set_termios(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` is a valid termios obtained from tcgetattr (possibly modified by cfmakeraw).
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raw mode on a terminal for as long as the guard lives: every byte typed (Ctrl-C, Ctrl-Z,
/// Ctrl-] included) reaches the shell, and output is passed through untouched. Dropping the
/// guard restores the settings it found, on every path out of the console code (errors and
/// panics included); a terminating signal restores them through [`signals`].
#[derive(Debug)]
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Switches `fd` to raw mode.
    pub fn enter(fd: RawFd) -> io::Result<RawMode> {
        let saved = get_termios(fd)?;
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only modifies its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Read returns as soon as one byte is there.
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        signals::set_terminal_changed(true);
        if let Err(e) = set_termios(fd, &raw) {
            signals::set_terminal_changed(false);
            return Err(e);
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing useful to do if the terminal is gone.
        let _ = set_termios(self.fd, &self.saved);
        signals::set_terminal_changed(false);
    }
}

/// What [`wait_readable`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `fd` is readable (or at end of file, or in error: a read will tell).
    Ready,
    /// The deadline passed.
    TimedOut,
}

/// `poll(2)` on the given descriptors plus the Ctrl-C pipe. Returns `Err(Interrupted)` on
/// Ctrl-C; otherwise the number of ready descriptors (0 after the timeout or a stray signal).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> Result<usize, ShellError> {
    let mut all: Vec<libc::pollfd> = fds.to_vec();
    let sig = signals::interrupt_fd();
    if let Some(fd) = sig {
        all.push(libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_millis().min(i32::MAX as u128) as i32,
    };
    // SAFETY: `all` is a valid, writable array of `all.len()` pollfd structures.
    let n = unsafe { libc::poll(all.as_mut_ptr(), all.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            // Ctrl-C is seen through the pipe on the next round; other signals are no news.
            return if signals::take_interrupt() {
                Err(ShellError::Interrupted)
            } else {
                Ok(0)
            };
        }
        return Err(ShellError::failed(format!("poll failed: {e}")));
    }
    if sig.is_some() && all.last().is_some_and(|p| p.revents != 0) && signals::take_interrupt() {
        return Err(ShellError::Interrupted);
    }
    for (dst, src) in fds.iter_mut().zip(&all) {
        dst.revents = src.revents;
    }
    Ok(fds.iter().filter(|p| p.revents != 0).count())
}

/// Waits until `fd` is readable, the deadline passes, or Ctrl-C.
pub fn wait_readable(fd: RawFd, deadline: Option<Instant>) -> Result<Wait, ShellError> {
    loop {
        let timeout = match deadline {
            None => None,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Ok(Wait::TimedOut);
                }
                Some(d - now)
            }
        };
        let mut fds = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if poll(&mut fds, timeout)? > 0 {
            return Ok(Wait::Ready);
        }
    }
}

/// `read(2)` on a raw descriptor.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads one line typed on stdin (a terminal in its normal, line-buffered mode), waiting
/// interruptibly. `None` at end of input.
pub fn read_stdin_line() -> Result<Option<String>, ShellError> {
    let mut line = Vec::new();
    loop {
        wait_readable(libc::STDIN_FILENO, None)?;
        let mut byte = [0u8; 1];
        match read_fd(libc::STDIN_FILENO, &mut byte) {
            Ok(0) => return Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).into())),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into())),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ShellError::failed(format!("cannot read the answer: {e}"))),
        }
    }
}
