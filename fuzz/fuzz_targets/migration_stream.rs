//! The target of a live migration (`vmm --incoming`) reading a hostile
//! stream: any bytes after a valid greeting and hello (the harness sends
//! those, so that the fuzzer spends its time on the frames: page runs at
//! any offset and length, disk runs into a 1 MiB image of any disk at any
//! offset, states, frames out of order, cut short), or, when the input
//! starts with the magic, the whole stream as a stray client would send
//! it.
//!
//! Checks: nothing panics, memory is never allocated for a hello the
//! target refuses (it answers before), and an accepted stream is one whose
//! state parsed.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use vmm::migration::target::{serve_stream, Expect, TargetDisk};
use vmm::migration::wire::{self, Hello, HelloDisk, Kind, MAGIC};

/// The target's disk image (emptied by each accepted hello).
const IMAGE_SIZE: u64 = 1 << 20;

fn image() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-fuzz-migration-{}.img", std::process::id()));
    if std::fs::metadata(&p).ok().map(|m| m.len()) != Some(IMAGE_SIZE) {
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(IMAGE_SIZE).unwrap();
    }
    p
}

const TOKEN: &str = "fuzz-token-0123456789";

struct Conn {
    input: Cursor<Vec<u8>>,
    sent: Vec<u8>,
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.sent.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let input = if data.starts_with(MAGIC) {
        data.to_vec()
    } else {
        let mut s = Vec::new();
        wire::write_greeting(&mut s).unwrap();
        let hello = Hello {
            token: TOKEN.into(),
            name: "fuzz".into(),
            mem_mib: 2,
            vcpus: 1,
            virtio: 0,
            disks: Some(vec![HelloDisk {
                size: IMAGE_SIZE,
                copied: true,
            }]),
        };
        let json = serde_json::to_vec(&hello).unwrap();
        wire::write_frame(&mut s, Kind::Hello, &[&json]).unwrap();
        s.extend_from_slice(data);
        s
    };
    let mut c = Conn {
        input: Cursor::new(input),
        sent: Vec::new(),
    };
    let expect = Expect {
        token: TOKEN,
        mem_mib: 2,
        vcpus: 1,
        virtio: 0,
        disks: vec![TargetDisk {
            path: image(),
            read_only: false,
            size: IMAGE_SIZE,
            lock: None,
        }],
    };
    let _ = serve_stream(&mut c, "fuzz", &expect, |_| {});
});
