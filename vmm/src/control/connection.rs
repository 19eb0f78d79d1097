//! One client connection: framing in, buffered output out, its mode and flow control.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use event_manager::EventSet;
use protocol::LineBuffer;

use super::access::PeerIdentity;
use crate::console::ConsoleReader;

/// Bytes read from a socket at a time.
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// No further request is processed while this much output is unsent (backpressure: a client
/// that does not read its answers stops being served instead of growing our memory).
pub(crate) const OUT_HIGH_WATER: usize = 64 * 1024;
/// Console output is pulled from the reader's capped backlog in chunks of this size.
pub(crate) const CONSOLE_CHUNK: usize = 64 * 1024;

pub(crate) enum Mode {
    /// Request lines in, response (and, when subscribed, event) lines out.
    Command,
    /// Raw console bytes both ways.
    Console(ConsoleReader),
}

pub(crate) enum ReadOutcome {
    Data(usize),
    WouldBlock,
    Eof,
}

pub(crate) struct Connection {
    pub stream: UnixStream,
    pub token: u32,
    pub peer: Arc<PeerIdentity>,
    pub lines: LineBuffer,
    pub mode: Mode,
    pub subscribed: bool,
    /// Server-wide sequence number of the request being answered (never reused, so a late
    /// answer for a closed connection cannot match a new one that got the same token).
    pub awaiting: Option<u64>,
    out: Vec<u8>,
    out_pos: usize,
    /// The client shut down its sending side (or we saw EOF).
    pub read_closed: bool,
    /// The client is gone entirely (hang-up): nothing can be delivered any more.
    pub hung_up: bool,
    /// A socket error or a write failure: close now.
    pub broken: bool,
    /// Console input that did not fit into the hub's input queue yet.
    pub pending_input: Vec<u8>,
    /// Interest currently registered with epoll.
    pub registered: EventSet,
}

impl Connection {
    pub(crate) fn new(
        stream: UnixStream,
        token: u32,
        peer: Arc<PeerIdentity>,
        max_line: usize,
    ) -> Self {
        Connection {
            stream,
            token,
            peer,
            lines: LineBuffer::new(max_line),
            mode: Mode::Command,
            subscribed: false,
            awaiting: None,
            out: Vec::new(),
            out_pos: 0,
            read_closed: false,
            hung_up: false,
            broken: false,
            pending_input: Vec::new(),
            registered: EventSet::IN,
        }
    }

    pub(crate) fn is_console(&self) -> bool {
        matches!(self.mode, Mode::Console(_))
    }

    pub(crate) fn out_len(&self) -> usize {
        self.out.len() - self.out_pos
    }

    pub(crate) fn queue(&mut self, bytes: &[u8]) {
        if self.out_pos > 0 && self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
    }

    /// Appends up to `max` pending console bytes to the output buffer.
    pub(crate) fn pull_console(&mut self, max: usize) -> usize {
        let Mode::Console(reader) = &self.mode else {
            return 0;
        };
        let before = self.out.len();
        reader.take_into(max, &mut self.out);
        self.out.len() - before
    }

    /// Writes as much buffered output as the socket takes; returns the bytes written.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while self.out_pos < self.out.len() {
            let buf = &self.out[self.out_pos..];
            // SAFETY: sending from a live buffer of the given length; MSG_NOSIGNAL keeps a
            // vanished peer from raising SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => return Err(e),
                }
            }
            self.out_pos += n as usize;
            written += n as usize;
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > 4 * OUT_HIGH_WATER {
                // A big answer (log) went out: give the memory back.
                self.out.shrink_to(OUT_HIGH_WATER);
            }
        } else if self.out_pos > OUT_HIGH_WATER && self.out_pos * 2 > self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(written)
    }

    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<ReadOutcome> {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => Ok(ReadOutcome::Eof),
                Ok(n) => Ok(ReadOutcome::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadOutcome::WouldBlock),
                Err(e) => Err(e),
            };
        }
    }

    /// Whether a command connection may take its next request line now.
    pub(crate) fn ready_for_request(&self) -> bool {
        matches!(self.mode, Mode::Command)
            && self.awaiting.is_none()
            && self.out_len() < OUT_HIGH_WATER
            && !self.broken
    }

    /// The epoll interest this connection needs now.
    pub(crate) fn desired_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let want_read = match self.mode {
            Mode::Command => self.ready_for_request() && !self.lines.has_line(),
            Mode::Console(_) => self.pending_input.is_empty(),
        };
        if want_read && !self.read_closed {
            set |= EventSet::IN;
        }
        let console_pending = match &self.mode {
            Mode::Console(reader) => !reader.is_empty(),
            Mode::Command => false,
        };
        if self.out_len() > 0 || console_pending {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the connection is done and should be closed.
    pub(crate) fn should_close(&self) -> bool {
        if self.broken {
            return true;
        }
        match self.mode {
            // Output keeps flowing to a console whose client only closed its sending side.
            Mode::Console(_) => self.hung_up,
            Mode::Command => {
                let idle = self.awaiting.is_none() && !self.lines.has_line();
                // A vanished peer cannot receive a deferred answer; don't wait for it.
                (self.hung_up && (self.awaiting.is_some() || idle))
                    || (self.read_closed && idle && self.out_len() == 0 && !self.subscribed)
            }
        }
    }
}
