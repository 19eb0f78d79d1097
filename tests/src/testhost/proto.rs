//! The test-host agent's wire format, shared by the agent (inside the test
//! host) and its client (the tests, outside).
//!
//! A connection starts with one JSON request line from the client and one
//! JSON reply line from the agent. After the reply of an `exec`, both sides
//! exchange frames: a kind byte, a little-endian `u32` length, the data.
//! After the reply of a `connect`, the connection is a raw byte stream to
//! the Unix socket.

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

/// The port the agent listens on inside the test host (QEMU forwards a
/// loopback port of the outer machine to it).
pub const AGENT_PORT: u16 = 7000;

/// Client → agent: bytes for the process's standard input; an empty frame
/// closes it.
pub const STDIN: u8 = 0;
/// Agent → client: bytes the process wrote to its standard output (or to
/// its terminal, with `pty`).
pub const STDOUT: u8 = 1;
/// Agent → client: bytes the process wrote to its standard error.
pub const STDERR: u8 = 2;
/// Agent → client: the process ended; data is its raw wait status (`i32`).
/// The last frame of the connection.
pub const EXIT: u8 = 3;
/// Client → agent: send this signal (`i32`) to the process.
pub const SIGNAL: u8 = 4;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up? The reply's `info` says where it runs.
    Ping,
    /// Run `argv` in a session of its own. Dropping the connection kills
    /// its whole process group.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        cwd: Option<String>,
        /// Give it a pseudo-terminal (stdin, stdout and stderr, and its
        /// controlling terminal) instead of pipes.
        #[serde(default)]
        pty: bool,
    },
    /// Relay bytes to and from the Unix socket at `path`.
    Connect { path: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn error(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            ..Reply::default()
        }
    }
}

pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut data = vec![0u8; len];
    r.read_exact(&mut data)?;
    Ok(Some((head[0], data)))
}

/// Reads the request or reply line that opens a connection (at most 64 KiB).
pub fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    r.take(64 * 1024).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection ended before a full line",
        ));
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

pub fn write_json(w: &mut impl Write, v: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"hello").unwrap();
        write_frame(&mut buf, EXIT, &0i32.to_le_bytes()).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((STDOUT, b"hello".to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), Some((EXIT, vec![0; 4])));
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn an_oversized_or_cut_frame_is_an_error_not_a_huge_allocation() {
        let mut r: &[u8] = &[STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut r).is_err());
        let mut r: &[u8] = &[STDOUT, 3, 0, 0, 0, b'a'];
        assert!(read_frame(&mut r).is_err());
    }

    #[test]
    fn requests_are_one_json_line_each() {
        let r = Request::Exec {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec![],
            cwd: None,
            pty: false,
        };
        let mut line = Vec::new();
        write_json(&mut line, &r).unwrap();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Request = serde_json::from_str(&read_line(&mut &line[..]).unwrap()).unwrap();
        assert_eq!(back, r);
        let bad = serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#);
        assert!(bad.is_err());
    }
}
