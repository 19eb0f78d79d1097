//! The control connection's line framing (`LineBuffer`): a byte stream cut
//! into arbitrary reads, with a small line limit.
//!
//! Checks against a plain model (split at '\n'; a line longer than the
//! limit becomes one `LineTooLong` in its place): the same lines and errors
//! in the same order, however the stream is cut; the incomplete tail never
//! holds more than the limit; `take_remaining` returns the complete lines
//! not taken yet (with their newlines) and then the tail.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use protocol::{FrameError, LineBuffer};

#[derive(Arbitrary, Debug)]
struct Input {
    max: u8,
    /// Read sizes; the stream is cut at these lengths (cycled).
    cuts: Vec<u8>,
    /// Take lines after every read (else only at the end).
    eager: bool,
    /// Stop with `take_remaining` after this many taken lines.
    take_remaining_after: Option<u8>,
    stream: Vec<u8>,
}

#[derive(Debug, PartialEq)]
enum Item {
    Line(Vec<u8>),
    TooLong,
}

fn model(stream: &[u8], max: usize) -> (Vec<Item>, Vec<u8>) {
    let mut items = Vec::new();
    let mut parts = stream.split(|&b| b == b'\n').peekable();
    let mut tail = Vec::new();
    while let Some(p) = parts.next() {
        let complete = parts.peek().is_some();
        if !complete {
            tail = p.to_vec();
        }
        if p.len() > max {
            items.push(Item::TooLong);
        } else if complete {
            items.push(Item::Line(p.to_vec()));
        }
    }
    (items, tail)
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max % 32);
    let mut lb = LineBuffer::new(max);
    let mut got = Vec::new();
    let take = |lb: &mut LineBuffer, got: &mut Vec<Item>| {
        while let Some(item) = lb.next_line() {
            got.push(match item {
                Ok(line) => Item::Line(line),
                Err(FrameError::LineTooLong { max: m }) => {
                    assert_eq!(m, max);
                    Item::TooLong
                }
            });
        }
    };
    let mut rest = &input.stream[..];
    let mut cuts = input.cuts.iter().cycle();
    while !rest.is_empty() {
        let n = cuts
            .next()
            .map_or(rest.len(), |&c| usize::from(c).max(1))
            .min(rest.len());
        lb.push(&rest[..n]);
        rest = &rest[n..];
        if input.eager {
            take(&mut lb, &mut got);
        }
    }
    let (want, tail) = model(&input.stream, max);
    if let Some(k) = input.take_remaining_after {
        // Take some lines, then switch the connection to raw bytes.
        let k = usize::from(k);
        let mut taken = std::mem::take(&mut got);
        while taken.len() < k {
            match lb.next_line() {
                Some(Ok(l)) => taken.push(Item::Line(l)),
                Some(Err(_)) => taken.push(Item::TooLong),
                None => break,
            }
        }
        assert_eq!(taken[..], want[..taken.len()]);
        let mut expect_raw = Vec::new();
        for item in &want[taken.len()..] {
            if let Item::Line(l) = item {
                expect_raw.extend_from_slice(l);
                expect_raw.push(b'\n');
            }
        }
        if tail.len() <= max {
            expect_raw.extend_from_slice(&tail);
        }
        assert_eq!(lb.take_remaining(), expect_raw);
        assert!(!lb.has_line() && lb.buffered_len() == 0);
        return;
    }
    take(&mut lb, &mut got);
    assert_eq!(got, want);
    let tail_held = if tail.len() <= max { tail.len() } else { 0 };
    assert_eq!(lb.buffered_len(), tail_held, "incomplete tail");
    assert_eq!(lb.is_discarding(), tail.len() > max);
});
