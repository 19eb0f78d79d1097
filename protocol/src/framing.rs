//! Newline framing with a bounded line length.

use std::collections::VecDeque;

/// A framing error; the offending line was discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line exceeded the limit. It is reported once, as soon as the limit is crossed, and the
    /// rest of it (up to and including its newline) is dropped without being buffered.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
}

impl From<FrameError> for crate::ProtocolError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::LineTooLong { max } => crate::ProtocolError::LineTooLong { max },
        }
    }
}

#[derive(Debug)]
enum Item {
    Line(Vec<u8>),
    TooLong,
}

/// Splits a byte stream into `\n`-terminated lines.
///
/// Feed it whatever `read` returned with [`push`](Self::push), then take complete lines with
/// [`next_line`](Self::next_line). Lines are returned without their `\n` and otherwise
/// untouched (a `\r` before the `\n` stays; JSON parsers treat it as whitespace).
///
/// Memory is bounded: the incomplete tail never holds more than `max_line` bytes. A line longer
/// than `max_line` yields one [`FrameError::LineTooLong`] in its place and its remaining bytes
/// are dropped up to the next newline. Complete lines are queued until taken, so a reader that
/// only reads again once [`has_line`](Self::has_line) is false holds at most one read's worth
/// of complete lines plus `max_line` bytes.
#[derive(Debug)]
pub struct LineBuffer {
    max: usize,
    items: VecDeque<Item>,
    partial: Vec<u8>,
    discarding: bool,
}

impl LineBuffer {
    /// A buffer refusing lines longer than `max_line` bytes (newline excluded).
    pub fn new(max_line: usize) -> Self {
        LineBuffer {
            max: max_line,
            items: VecDeque::new(),
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// The line length limit.
    pub fn max_line(&self) -> usize {
        self.max
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let (chunk, rest, complete) = match newline {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if self.discarding {
                // Still inside an overlong line: drop until its newline.
                if complete {
                    self.discarding = false;
                }
                continue;
            }
            if self.partial.len() + chunk.len() > self.max {
                self.partial = Vec::new();
                self.items.push_back(Item::TooLong);
                self.discarding = !complete;
                continue;
            }
            self.partial.extend_from_slice(chunk);
            if complete {
                let line = std::mem::take(&mut self.partial);
                self.items.push_back(Item::Line(line));
            }
        }
    }

    /// The next complete line (without `\n`), an error standing for a discarded overlong line,
    /// or `None` when no complete line is buffered.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        self.items.pop_front().map(|item| match item {
            Item::Line(line) => Ok(line),
            Item::TooLong => Err(FrameError::LineTooLong { max: self.max }),
        })
    }

    /// Whether [`next_line`](Self::next_line) has something to return.
    pub fn has_line(&self) -> bool {
        !self.items.is_empty()
    }

    /// Bytes held (complete lines and the incomplete tail).
    pub fn buffered_len(&self) -> usize {
        self.partial.len()
            + self
                .items
                .iter()
                .map(|i| match i {
                    Item::Line(l) => l.len() + 1,
                    Item::TooLong => 0,
                })
                .sum::<usize>()
    }

    /// Whether an overlong line is being discarded (its newline has not arrived yet).
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Takes every buffered byte back out, complete lines with their `\n`, for a connection
    /// that stops speaking lines (the raw console after its reply). Discarded overlong lines
    /// are not returned.
    pub fn take_remaining(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buffered_len());
        for item in self.items.drain(..) {
            if let Item::Line(line) = item {
                out.extend_from_slice(&line);
                out.push(b'\n');
            }
        }
        out.append(&mut self.partial);
        self.discarding = false;
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn lines(buf: &mut LineBuffer) -> Vec<Result<String, FrameError>> {
        std::iter::from_fn(|| buf.next_line())
            .map(|r| r.map(|l| String::from_utf8(l).unwrap()))
            .collect()
    }

    #[test]
    fn splits_complete_lines() {
        let mut b = LineBuffer::new(100);
        b.push(b"a\nbc\n\nd");
        assert_eq!(
            lines(&mut b),
            vec![Ok("a".into()), Ok("bc".into()), Ok(String::new())]
        );
        assert!(!b.has_line());
        b.push(b"e\n");
        assert_eq!(lines(&mut b), vec![Ok("de".into())]);
        assert_eq!(b.buffered_len(), 0);
    }

    #[test]
    fn reassembles_lines_across_every_split_point() {
        let stream = b"{\"cmd\":\"status\"}\n{\"cmd\":\"log\",\"bytes\":5}\r\nxyz\n";
        for split in 0..=stream.len() {
            for split2 in split..=stream.len() {
                let mut b = LineBuffer::new(64);
                let mut got = Vec::new();
                for part in [&stream[..split], &stream[split..split2], &stream[split2..]] {
                    b.push(part);
                    got.extend(lines(&mut b));
                }
                assert_eq!(
                    got,
                    vec![
                        Ok("{\"cmd\":\"status\"}".into()),
                        Ok("{\"cmd\":\"log\",\"bytes\":5}\r".into()),
                        Ok("xyz".into())
                    ]
                );
            }
        }
    }

    #[test]
    fn byte_by_byte_feeding_works() {
        let mut b = LineBuffer::new(10);
        let mut got = Vec::new();
        for &byte in b"hello\nworld\n" {
            b.push(&[byte]);
            got.extend(lines(&mut b));
        }
        assert_eq!(got, vec![Ok("hello".into()), Ok("world".into())]);
    }

    #[test]
    fn line_of_exactly_max_is_accepted_and_max_plus_one_refused() {
        let mut b = LineBuffer::new(4);
        b.push(b"abcd\nabcde\nok\n");
        assert_eq!(
            lines(&mut b),
            vec![
                Ok("abcd".into()),
                Err(FrameError::LineTooLong { max: 4 }),
                Ok("ok".into())
            ]
        );
    }

    #[test]
    fn overlong_line_is_reported_once_as_soon_as_it_crosses_the_limit() {
        let mut b = LineBuffer::new(8);
        b.push(b"first\n0123456");
        assert_eq!(lines(&mut b), vec![Ok("first".into())]);
        b.push(b"78");
        assert_eq!(lines(&mut b), vec![Err(FrameError::LineTooLong { max: 8 })]);
        assert!(b.is_discarding());
        for _ in 0..1000 {
            b.push(b"xxxxxxxxxxxxxxxxxxxxxxxx");
            assert!(lines(&mut b).is_empty());
            assert_eq!(b.buffered_len(), 0);
        }
        b.push(b"tail\nnext\n");
        assert!(!b.is_discarding());
        assert_eq!(lines(&mut b), vec![Ok("next".into())]);
    }

    #[test]
    fn huge_line_in_one_push_keeps_memory_bounded() {
        let mut b = LineBuffer::new(1024);
        let mut huge = vec![b'a'; 10 * 1024 * 1024];
        huge.extend_from_slice(b"\n{\"cmd\":\"status\"}\n");
        b.push(&huge);
        assert!(b.buffered_len() < 100);
        assert_eq!(
            lines(&mut b),
            vec![
                Err(FrameError::LineTooLong { max: 1024 }),
                Ok("{\"cmd\":\"status\"}".into())
            ]
        );
    }

    #[test]
    fn two_overlong_lines_give_two_errors_in_order() {
        let mut b = LineBuffer::new(2);
        b.push(b"aaaa\nb\ncccc\nd");
        b.push(b"\n");
        assert_eq!(
            lines(&mut b),
            vec![
                Err(FrameError::LineTooLong { max: 2 }),
                Ok("b".into()),
                Err(FrameError::LineTooLong { max: 2 }),
                Ok("d".into())
            ]
        );
    }

    #[test]
    fn take_remaining_returns_unconsumed_bytes_verbatim() {
        let mut b = LineBuffer::new(100);
        b.push(b"{\"ok\":true}\nraw\r\nbytes\n\x01\x02 partial");
        assert_eq!(b.next_line().unwrap().unwrap(), b"{\"ok\":true}");
        assert_eq!(b.take_remaining(), b"raw\r\nbytes\n\x01\x02 partial");
        assert_eq!(b.buffered_len(), 0);
        assert!(b.next_line().is_none());
    }

    #[test]
    fn frame_error_converts_to_protocol_error_message() {
        let e: crate::ProtocolError = FrameError::LineTooLong { max: 65536 }.into();
        assert_eq!(e.to_string(), "request line longer than 65536 bytes");
    }
}
