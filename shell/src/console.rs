//! The serial console, attached: VMM → stdout and (for `console`) stdin → VMM, until Ctrl-]
//! or the VMM goes away. On a terminal, stdin is in raw mode for the duration; the
//! [`RawMode`] guard lives only inside [`attach`], so the terminal is restored before the
//! caller prints anything, whichever way the session ended.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::ShellError;
use crate::term::{self, RawMode};

/// The detach key: Ctrl-] (as in telnet and virsh console).
pub const DETACH: u8 = 0x1d;
/// Keys that stop `log --follow` on a terminal: Ctrl-], Ctrl-C, Ctrl-D, q.
const FOLLOW_STOP: &[u8] = &[DETACH, 0x03, 0x04, b'q'];
/// Most bytes typed ahead of a VMM that is not reading before we stop reading stdin.
const MAX_PENDING: usize = 64 * 1024;

/// How the session ended (without error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Ctrl-] (or a stop key of `log --follow`).
    Detached,
    /// Stdin reached its end (input from a pipe or file).
    InputClosed,
    /// Ctrl-C, when stdin is not in raw mode.
    Interrupted,
}

/// What to do with stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Forward it to the guest (`console`).
    Forward,
    /// Only watch for stop keys (`log --follow`).
    StopKeysOnly,
}

/// Splits typed bytes at the first detach key: (bytes for the guest, detach seen).
pub fn split_at_detach(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == DETACH) {
        Some(i) => (&input[..i], true),
        None => (input, false),
    }
}

/// Runs an attached console session on `stream`, whose first bytes (read along with the
/// `console` reply) are `first`. Skips the first `skip` console bytes (for `log --bytes`).
///
/// Returns when the user detaches, stdin ends, or Ctrl-C (not in raw mode); an error when
/// the VMM closes the connection or output cannot be written. The terminal is back in its
/// previous mode when this returns.
pub fn attach(
    stream: UnixStream,
    first: &[u8],
    skip: u64,
    input: Input,
    vm: &str,
    out: &mut dyn Write,
) -> Result<End, ShellError> {
    let stdin_fd = libc::STDIN_FILENO;
    let stdin_tty = term::isatty(stdin_fd);
    let gone = || ShellError::VmmGone {
        vm: vm.to_string(),
        what: "the VMM closed the console connection (did it exit?)".to_string(),
    };
    // Only a terminal is put in raw mode; input from a pipe is forwarded as it is.
    let _raw =
        if stdin_tty {
            Some(RawMode::enter(stdin_fd).map_err(|e| {
                ShellError::failed(format!("cannot put the terminal in raw mode: {e}"))
            })?)
        } else {
            None
        };
    let read_stdin = match input {
        Input::Forward => true,
        Input::StopKeysOnly => stdin_tty,
    };
    let mut skip = skip;
    let mut emit = |out: &mut dyn Write, mut data: &[u8]| -> Result<(), ShellError> {
        if skip > 0 {
            let n = (skip.min(data.len() as u64)) as usize;
            skip -= n as u64;
            data = &data[n..];
        }
        if !data.is_empty() {
            out.write_all(data)?;
            out.flush()?;
        }
        Ok(())
    };
    emit(out, first)?;

    stream
        .set_nonblocking(true)
        .map_err(|e| ShellError::failed(format!("{vm}: {e}")))?;
    let mut stream = stream;
    let sock_fd = stream.as_raw_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_open = read_stdin;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds = vec![libc::pollfd {
            fd: sock_fd,
            events: libc::POLLIN | if pending.is_empty() { 0 } else { libc::POLLOUT },
            revents: 0,
        }];
        let watch_stdin = stdin_open && pending.len() < MAX_PENDING;
        if watch_stdin {
            fds.push(libc::pollfd {
                fd: stdin_fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        match term::poll(&mut fds, None) {
            Ok(_) => {}
            Err(ShellError::Interrupted) => return Ok(End::Interrupted),
            Err(e) => return Err(e),
        }
        let sock_ev = fds[0].revents;
        if sock_ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // Drain what is there; the stream is non-blocking.
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return Err(gone()),
                    Ok(n) => emit(out, &buf[..n])?,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(gone()),
                }
            }
        }
        if sock_ev & libc::POLLOUT != 0 && !pending.is_empty() {
            match stream.write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(gone()),
            }
        }
        if watch_stdin && fds[1].revents != 0 {
            let n = match term::read_fd(stdin_fd, &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A vanished terminal reads as an error: same as end of input.
                Err(_) => 0,
            };
            if n == 0 {
                stdin_open = false;
                if input == Input::Forward {
                    flush_pending(&mut stream, &pending);
                    return Ok(End::InputClosed);
                }
                continue;
            }
            let typed = &buf[..n];
            match input {
                Input::Forward => {
                    let (to_guest, detach) = split_at_detach(typed);
                    pending.extend_from_slice(to_guest);
                    if detach {
                        flush_pending(&mut stream, &pending);
                        return Ok(End::Detached);
                    }
                    if !pending.is_empty() {
                        // Try at once; what does not fit waits for POLLOUT.
                        match stream.write(&pending) {
                            Ok(w) => {
                                pending.drain(..w);
                            }
                            Err(e)
                                if e.kind() == io::ErrorKind::WouldBlock
                                    || e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Err(gone()),
                        }
                    }
                }
                Input::StopKeysOnly => {
                    if typed.iter().any(|b| FOLLOW_STOP.contains(b)) {
                        return Ok(End::Detached);
                    }
                }
            }
        }
    }
}

/// Best effort: hands the last typed bytes to the VMM before detaching.
fn flush_pending(stream: &mut UnixStream, pending: &[u8]) {
    if pending.is_empty() {
        return;
    }
    if stream.set_nonblocking(false).is_ok() {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = stream.write_all(pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_key_splits_input() {
        assert_eq!(split_at_detach(b"abc"), (&b"abc"[..], false));
        assert_eq!(split_at_detach(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_at_detach(b"\x1d"), (&b""[..], true));
        assert_eq!(split_at_detach(b""), (&b""[..], false));
    }

    #[test]
    fn pipe_input_is_forwarded_until_detach_and_output_copied() {
        // A socket pair stands in for the VMM; stdin is whatever the test runner gave us,
        // so only exercise the output path: the peer sends bytes and closes.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(b"\x00\xffraw\r\n").unwrap();
        drop(theirs);
        let mut out = Vec::new();
        // StopKeysOnly does not read a non-terminal stdin.
        if term::isatty(libc::STDIN_FILENO) {
            return;
        }
        let err = attach(ours, b"replay:", 2, Input::StopKeysOnly, "vm", &mut out).unwrap_err();
        assert!(matches!(err, ShellError::VmmGone { .. }), "{err}");
        assert_eq!(out, b"play:\x00\xffraw\r\n");
    }
}
