//! The control protocol's request parser on arbitrary bytes.
//!
//! Checks: parsing never panics; an unknown command is named in at most 64
//! bytes (plus "..."); whatever parses encodes with `encode_request` into
//! one line (a single trailing newline) that parses back to the same
//! request, and encodes the same again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{encode_request, parse_request, parse_request_bytes, ProtocolError, Request};

fuzz_target!(|data: &[u8]| {
    match parse_request_bytes(data) {
        Ok(req) => {
            assert!(Request::NAMES.contains(&req.name()));
            let line = encode_request(&req);
            let body = line.strip_suffix('\n').expect("a trailing newline");
            assert!(!body.contains('\n'), "a request spans lines: {line:?}");
            let again = parse_request(body).expect("an encoded request parses");
            assert_eq!(again, req, "round trip of {line:?}");
            assert_eq!(encode_request(&again), line);
        }
        Err(e) => {
            if let ProtocolError::UnknownCommand(name) = &e {
                assert!(name.len() <= 64 + 3, "unknown command echoed in full");
            }
            let _ = e.to_string();
        }
    }
});
