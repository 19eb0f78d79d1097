//! Client side: telling responses from events, and a small blocking client.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::event::{Event, EventMessage};
use crate::framing::{FrameError, LineBuffer};
use crate::request::{encode_request, Request};
use crate::response::Response;
use crate::MAX_RESPONSE_LINE;

/// Errors seen by a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket I/O failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The VMM closed the connection (it exited, or refused this peer).
    #[error("the VMM closed the connection")]
    Closed,
    /// A line from the VMM is not a JSON object with `ok` or `event`.
    #[error("malformed line from the VMM: {0}")]
    Malformed(String),
    /// A line from the VMM exceeded [`MAX_RESPONSE_LINE`].
    #[error("line from the VMM longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
    /// A response did not have the expected fields.
    #[error("unexpected response from the VMM: {0}")]
    UnexpectedResponse(String),
    /// The VMM answered `{"ok":false,"error":"...","code":"..."}`: its
    /// message verbatim, and its code.
    #[error("{0}")]
    Remote(crate::ControlError),
}

/// One line received from the VMM.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerLine {
    /// A response (`ok` member).
    Response(Response),
    /// A known event (`event` member).
    Event(EventMessage),
    /// An event this client version does not know; shown or ignored, never an error.
    UnknownEvent {
        /// The `event` member.
        name: String,
        /// The other members.
        fields: Map<String, Value>,
    },
}

/// Classifies and parses one line from the VMM (newline optional).
pub fn parse_response_line(line: &str) -> Result<ServerLine, ClientError> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| ClientError::Malformed(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(ClientError::Malformed("not a JSON object".into()));
    };
    if let Some(name) = map.get("event") {
        let Some(name) = name.as_str() else {
            return Err(ClientError::Malformed("'event' must be a string".into()));
        };
        if Event::NAMES.contains(&name) {
            return serde_json::from_value(Value::Object(map))
                .map(ServerLine::Event)
                .map_err(|e| ClientError::Malformed(format!("event: {e}")));
        }
        let name = name.to_string();
        map.remove("event");
        return Ok(ServerLine::UnknownEvent { name, fields: map });
    }
    if map.contains_key("ok") {
        return Response::from_object(map).map(ServerLine::Response);
    }
    Err(ClientError::Malformed(
        "neither a response ('ok') nor an event ('event')".into(),
    ))
}

/// A blocking client for one control connection. Events that arrive while waiting for a
/// response are queued and returned by [`next_event`](Self::next_event).
#[derive(Debug)]
pub struct Client<S> {
    stream: S,
    lines: LineBuffer,
    events: VecDeque<ServerLine>,
}

impl Client<UnixStream> {
    /// Connects to a control socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Ok(Client::new(UnixStream::connect(path)?))
    }
}

impl<S: Read + Write> Client<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Client {
            stream,
            lines: LineBuffer::new(MAX_RESPONSE_LINE),
            events: VecDeque::new(),
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, mutably (e.g. to set timeouts).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Sends a request without waiting for its response.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.stream.write_all(encode_request(request).as_bytes())?;
        self.stream.flush()?;
        Ok(())
    }

    /// Sends a request and waits for its response (queuing events that come first).
    ///
    /// When the VMM already closed the connection (it refused this peer, or has too many
    /// connections), the write fails; the line it sent before closing is returned then.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        match self.send(request) {
            Ok(()) => self.read_response(),
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                self.read_response().map_err(|_| ClientError::Io(e))
            }
            Err(e) => Err(e),
        }
    }

    /// [`call`](Self::call) and decode the successful response into `T`; an error response
    /// becomes [`ClientError::Remote`].
    pub fn request<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        self.call(request)?.decode()
    }

    /// Waits for the next response, queuing events.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        loop {
            match self.read_line()? {
                ServerLine::Response(r) => return Ok(r),
                event => self.events.push_back(event),
            }
        }
    }

    /// The next event: a queued one, or the next line read (a response here is returned as
    /// is, since it answers nothing the caller waits for).
    pub fn next_event(&mut self) -> Result<ServerLine, ClientError> {
        match self.events.pop_front() {
            Some(e) => Ok(e),
            None => self.read_line(),
        }
    }

    /// Reads and parses the next line.
    pub fn read_line(&mut self) -> Result<ServerLine, ClientError> {
        loop {
            if let Some(line) = self.lines.next_line() {
                let line = line
                    .map_err(|FrameError::LineTooLong { max }| ClientError::LineTooLong { max })?;
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return parse_response_line(&text);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.lines.push(&buf[..n]);
        }
    }

    /// Gives the stream back with the bytes already read past the last line taken: after a
    /// `console` reply these are the first raw console bytes.
    pub fn into_raw(mut self) -> (S, Vec<u8>) {
        let rest = self.lines.take_remaining();
        (self.stream, rest)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::response::{Reply, StatusInfo};
    use crate::types::{ResetCause, VmState};
    use crate::ConsoleAttached;
    use std::io::Cursor;

    /// A stream whose reads come from a script (one chunk per read) and whose writes are kept.
    struct Scripted {
        reads: VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                None => Ok(0),
                Some(mut chunk) => {
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        self.reads.push_front(chunk.split_off(n));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn scripted(chunks: &[&[u8]]) -> Scripted {
        Scripted {
            reads: chunks.iter().map(|c| c.to_vec()).collect(),
            written: Vec::new(),
        }
    }

    #[test]
    fn distinguishes_responses_from_events() {
        assert!(matches!(
            parse_response_line("{\"ok\":true}\n").unwrap(),
            ServerLine::Response(Response::Ok(_))
        ));
        assert!(matches!(
            parse_response_line(r#"{"event":"reset","cause":"guest","vm":"a","time":"t"}"#)
                .unwrap(),
            ServerLine::Event(EventMessage {
                event: Event::Reset {
                    cause: ResetCause::Guest
                },
                ..
            })
        ));
    }

    #[test]
    fn unknown_events_are_kept_not_errors() {
        match parse_response_line(r#"{"event":"future_thing","x":1,"vm":"a"}"#).unwrap() {
            ServerLine::UnknownEvent { name, fields } => {
                assert_eq!(name, "future_thing");
                assert_eq!(fields.get("x"), Some(&Value::from(1)));
                assert!(!fields.contains_key("event"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_server_lines_are_errors() {
        for line in [
            "",
            "nope",
            "[]",
            "{}",
            r#"{"ok":"yes"}"#,
            r#"{"ok":false}"#,
            r#"{"ok":false,"error":3}"#,
            r#"{"event":5}"#,
            r#"{"event":"reset","cause":"gremlins","vm":"a","time":"t"}"#,
        ] {
            assert!(parse_response_line(line).is_err(), "{line}");
        }
    }

    #[test]
    fn call_queues_events_and_returns_the_response_split_across_reads() {
        let status = Reply::Status(StatusInfo {
            name: "a".into(),
            state: VmState::Running,
            kernel: "k".into(),
            next_kernel: None,
            vcpus: 1,
            memory_mib: 64,
            uptime_ms: 5,
            boot_count: 1,
            last_reset: None,
            migrating: false,
            snapshotting: false,
            throttle_pct: 0,
            watchdog: None,
            on_panic: None,
            disks: vec![],
            nets: vec![],
        })
        .to_line();
        let event = EventMessage::now(
            "a",
            Event::Reset {
                cause: ResetCause::Command,
            },
        )
        .to_line();
        let all = format!("{event}\n{status}");
        let (a, b) = all.as_bytes().split_at(all.len() / 2);
        let mut client = Client::new(scripted(&[a, b]));
        let info: StatusInfo = client.request(&Request::Status).unwrap();
        assert_eq!(info.name, "a");
        assert_eq!(client.get_ref().written, b"{\"cmd\":\"status\"}\n");
        assert!(matches!(client.next_event().unwrap(), ServerLine::Event(_)));
        assert!(matches!(client.next_event(), Err(ClientError::Closed)));
    }

    #[test]
    fn error_response_is_a_remote_error() {
        let mut client = Client::new(scripted(&[
            b"{\"ok\":false,\"error\":\"permission denied\",\"code\":\"forbidden\"}\n",
        ]));
        let err = client.request::<StatusInfo>(&Request::Status).unwrap_err();
        assert!(matches!(&err, ClientError::Remote(m)
            if m.message == "permission denied" && m.code == Some(crate::ErrorCode::Forbidden)));
    }

    #[test]
    fn into_raw_returns_console_bytes_read_with_the_reply() {
        let reply = Reply::Console(ConsoleAttached { replay_bytes: 3 }).to_line();
        let chunk = format!("{reply}abc\nlive\r\n\x1b[0m");
        let mut client = Client::new(scripted(&[chunk.as_bytes()]));
        let attached: ConsoleAttached = client.request(&Request::Console { replay: true }).unwrap();
        assert_eq!(attached.replay_bytes, 3);
        let (_, rest) = client.into_raw();
        assert_eq!(rest, b"abc\nlive\r\n\x1b[0m");
    }

    #[test]
    fn a_refusal_sent_before_the_request_is_reported() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(
            b"{\"ok\":false,\"error\":\"permission denied: uid 1 may not control this VM\"}\n",
        )
        .unwrap();
        drop(b);
        let mut c = Client::new(a);
        let err = c.request::<StatusInfo>(&Request::Status).unwrap_err();
        assert!(
            matches!(&err, ClientError::Remote(m) if m.message.starts_with("permission denied")),
            "{err}"
        );
    }

    #[test]
    fn eof_before_response_is_closed() {
        let mut client = Client::new(Cursor::new(Vec::new()));
        assert!(matches!(client.read_response(), Err(ClientError::Closed)));
    }
}
