//! pvpanic: arbitrary port accesses through its `BusDevice`.
//!
//! Checks: a one-byte read of the port returns the supported events, any
//! other read all ones; every non-zero one-byte write to the port is one
//! `GuestEvent::Panic` with the bits written, and nothing else is.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use devices::legacy::pvpanic::PVPANIC_SUPPORTED;
use devices::legacy::PvPanicDevice;
use devices::{BusDevice, GuestEvent};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::RecordingSink;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, len: u8 },
    Write { offset: u8, data: Vec<u8> },
}

fuzz_target!(|ops: Vec<Op>| {
    let sink = Arc::new(RecordingSink::default());
    let mut dev = PvPanicDevice::new(sink.clone());
    let mut expected = Vec::new();
    for op in ops {
        match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                dev.read(u64::from(offset % 4), &mut buf);
                if offset % 4 == 0 && buf.len() == 1 {
                    assert_eq!(buf[0], PVPANIC_SUPPORTED);
                } else {
                    assert!(buf.iter().all(|&b| b == 0xff), "unclaimed read {buf:?}");
                }
            }
            Op::Write { offset, data } => {
                let data = &data[..data.len().min(8)];
                dev.write(u64::from(offset % 4), data);
                if let (0, &[v]) = (offset % 4, data) {
                    if v != 0 {
                        expected.push(GuestEvent::Panic(v));
                    }
                }
            }
        }
        assert_eq!(sink.take(), std::mem::take(&mut expected));
    }
});
