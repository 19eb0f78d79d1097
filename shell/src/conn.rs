//! One control connection to a VM's VMM: requests out, response and event lines in.
//!
//! Like `protocol::Client`, but every wait is a `poll` that also watches Ctrl-C and can have
//! a deadline, so a slow `shutdown` or a VMM that stopped answering never traps the user.
//! Keeps each line as received for `--json`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use protocol::{encode_request, parse_response_line, LineBuffer, Request, Response, ServerLine};

use crate::discovery;
use crate::error::ShellError;
use crate::term::{self, Wait};

/// How long to wait for the answer to a quick request.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(15);

/// A successful response.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The line as received (without its newline).
    pub raw: String,
    /// The fields after `"ok":true`.
    pub fields: Map<String, Value>,
}

impl Answer {
    /// Decodes the fields into a typed body.
    pub fn decode<T: DeserializeOwned>(&self, vm: &str) -> Result<T, ShellError> {
        serde_json::from_value(Value::Object(self.fields.clone()))
            .map_err(|e| ShellError::failed(format!("{vm}: unexpected response from the VMM: {e}")))
    }
}

/// A connection to one VM.
#[derive(Debug)]
pub struct Conn {
    vm: String,
    stream: UnixStream,
    lines: LineBuffer,
    /// Lines (events) that arrived while waiting for a response.
    queued: VecDeque<(String, ServerLine)>,
}

impl Conn {
    /// Connects to the control socket of `vm` under `run_dir`. The operating system (socket
    /// and directory permissions) and then the VMM (peer credentials) decide whether we may.
    pub fn connect(run_dir: &Path, vm: &str) -> Result<Conn, ShellError> {
        let path = discovery::socket_path(run_dir, vm)?;
        let stream =
            UnixStream::connect(&path).map_err(|e| discovery::connect_error(run_dir, vm, &e))?;
        // A VMM that stops reading must not hang us in write().
        let _ = stream.set_write_timeout(Some(QUICK_TIMEOUT));
        Ok(Conn {
            vm: vm.to_string(),
            stream,
            lines: LineBuffer::new(protocol::MAX_RESPONSE_LINE),
            queued: VecDeque::new(),
        })
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    fn gone(&self, what: impl Into<String>) -> ShellError {
        ShellError::VmmGone {
            vm: self.vm.clone(),
            what: what.into(),
        }
    }

    fn io_error(&self, e: io::Error) -> ShellError {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => {
                self.gone("the VMM closed the connection (did it exit?)")
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                self.gone("the VMM is not responding")
            }
            _ => ShellError::failed(format!("{}: {e}", self.vm)),
        }
    }

    /// Sends a request.
    pub fn send(&mut self, request: &Request) -> Result<(), ShellError> {
        let line = encode_request(request);
        let result = self
            .stream
            .write_all(line.as_bytes())
            .and_then(|()| self.stream.flush());
        let Err(e) = result else {
            return Ok(());
        };
        // A VMM that refuses a peer sends one error line and closes, possibly before our
        // request got there: show its reason rather than a broken pipe.
        if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            let soon = Instant::now() + Duration::from_millis(500);
            if let Ok(Some((raw, ServerLine::Response(Response::Error(e))))) =
                self.read_line(Some(soon))
            {
                return Err(ShellError::Remote {
                    vm: self.vm.clone(),
                    message: e.message,
                    raw,
                });
            }
        }
        Err(self.io_error(e))
    }

    /// Sends a request and waits for its response; `{"ok":false}` becomes
    /// [`ShellError::Remote`]. Events that arrive first are kept for [`next_line`].
    ///
    /// [`next_line`]: Self::next_line
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Answer, ShellError> {
        self.send(request)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let Some((raw, line)) = self.read_line(deadline)? else {
                let secs = timeout.map(|t| t.as_secs()).unwrap_or(0);
                return Err(self.gone(format!(
                    "the VMM did not answer '{}' within {secs} s",
                    request.name()
                )));
            };
            match line {
                ServerLine::Response(Response::Ok(fields)) => return Ok(Answer { raw, fields }),
                ServerLine::Response(Response::Error(e)) => {
                    return Err(ShellError::Remote {
                        vm: self.vm.clone(),
                        message: e.message,
                        raw,
                    })
                }
                event => self.queued.push_back((raw, event)),
            }
        }
    }

    /// The next line that is not an answer being waited for: queued events first. `None`
    /// when the deadline passes.
    pub fn next_line(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(String, ServerLine)>, ShellError> {
        if let Some(item) = self.queued.pop_front() {
            return Ok(Some(item));
        }
        self.read_line(deadline)
    }

    fn read_line(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(String, ServerLine)>, ShellError> {
        loop {
            if let Some(line) = self.lines.next_line() {
                let line = line.map_err(|e| {
                    ShellError::failed(format!("{}: bad line from the VMM: {e}", self.vm))
                })?;
                let text = String::from_utf8_lossy(&line).into_owned();
                if text.trim().is_empty() {
                    continue;
                }
                let parsed = parse_response_line(&text)
                    .map_err(|e| ShellError::failed(format!("{}: {e}", self.vm)))?;
                return Ok(Some((text.trim_end().to_string(), parsed)));
            }
            if term::wait_readable(self.stream.as_raw_fd(), deadline)? == Wait::TimedOut {
                return Ok(None);
            }
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(self.gone("the VMM closed the connection (did it exit?)")),
                Ok(n) => self.lines.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
    }

    /// The socket and the bytes read past the last line: after a `console` reply these are
    /// the first console bytes.
    pub fn into_raw(mut self) -> (UnixStream, Vec<u8>) {
        let rest = self.lines.take_remaining();
        (self.stream, rest)
    }
}
