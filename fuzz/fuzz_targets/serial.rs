//! The 8250 UART (COM1): arbitrary register accesses through its
//! `BusDevice`, host input, writer failures and resets.
//!
//! Checks: accesses that are not one byte inside the 8 ports read as all
//! ones and change nothing; every byte that reaches the writer is counted
//! in `tx_bytes` and every refused one in `tx_lost` (the writer is never
//! called without one of them); `enqueue_input` takes at most what it said
//! fits; counters never go backwards (a reset keeps them); the receive FIFO
//! never holds more than 64 bytes.
#![no_main]

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::legacy::SerialDevice;
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::irq;

/// The console writer: records what it accepted, refuses while `broken`.
#[derive(Clone, Default)]
struct Out {
    bytes: Arc<Mutex<Vec<u8>>>,
    refused: Arc<AtomicU64>,
    broken: Arc<AtomicBool>,
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.broken.load(Ordering::SeqCst) {
            self.refused.fetch_add(b.len() as u64, Ordering::SeqCst);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.bytes.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u8, len: u8 },
    Write { offset: u8, data: Vec<u8> },
    Input(Vec<u8>),
    Broken(bool),
    Reset,
}

fuzz_target!(|ops: Vec<Op>| {
    let out = Out::default();
    let drained = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = irq();
    let mut dev = SerialDevice::new(t.clone(), Box::new(out.clone()), Some(drained));
    let mut last = dev.counters();
    let mut enqueued = 0u64;
    for op in ops {
        match op {
            Op::Read { offset, len } => {
                let offset = u64::from(offset % 10);
                let mut buf = vec![0u8; usize::from(len % 5)];
                dev.read(offset, &mut buf);
                if offset >= 8 || buf.len() != 1 {
                    assert!(buf.iter().all(|&b| b == 0xff), "unclaimed read {buf:?}");
                }
            }
            Op::Write { offset, data } => {
                let data = &data[..data.len().min(4)];
                let before = dev.counters();
                dev.write(u64::from(offset % 10), data);
                if offset % 10 >= 8 || data.len() != 1 {
                    assert_eq!(dev.counters(), before, "an ignored write did something");
                }
            }
            Op::Input(bytes) => {
                let room = dev.fifo_capacity();
                let took = dev.enqueue_input(&bytes);
                assert!(
                    took <= bytes.len() && took <= room,
                    "took {took} of {} with room {room}",
                    bytes.len()
                );
                enqueued += took as u64;
            }
            Op::Broken(b) => out.broken.store(b, Ordering::SeqCst),
            Op::Reset => dev.reset(),
        }
        assert!(dev.fifo_capacity() <= 64);
        let c = dev.counters();
        assert!(
            c.tx_bytes >= last.tx_bytes
                && c.tx_lost >= last.tx_lost
                && c.rx_reads >= last.rx_reads
                && c.rx_enqueued >= last.rx_enqueued,
            "counters went back: {last:?} -> {c:?}"
        );
        assert_eq!(c.rx_enqueued, enqueued);
        assert_eq!(c.tx_bytes, out.bytes.lock().unwrap().len() as u64);
        assert_eq!(c.tx_lost, out.refused.load(Ordering::SeqCst));
        last = c;
    }
    vmm_fuzz::fired(&t);
});
