//! The i8042 controller: arbitrary port accesses through its `BusDevice`
//! (and the two-port `I8042Port` split), Ctrl+Alt+Del and SysRq from the
//! host, resets.
//!
//! Checks: accesses that are not one byte at the data or command port read
//! as all ones; the status register always reports the keylock switch off;
//! a data-port read with the output buffer empty returns the byte read last;
//! the keyboard buffer never holds more than `KBD_BUFFER_SIZE` bytes; a
//! host key press that fails queues nothing; the only events are i8042
//! resets, and only right after a guest write to the command port (0xF0..
//! 0xFF with bit 0 clear) or to the data port (output port write).
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::legacy::i8042::{COMMAND_OFFSET, DATA_OFFSET, KBD_BUFFER_SIZE};
use devices::legacy::{I8042Device, I8042Port};
use devices::{BusDevice, GuestEvent, ResetCause};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{fired, irq, RecordingSink};

const STR_OBF: u8 = 0x01;
const STR_UNLOCKED: u8 = 0x10;

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u8,
        len: u8,
    },
    Write {
        offset: u8,
        data: Vec<u8>,
    },
    /// Through the one-port wrappers (offset 0 of each).
    PortRead {
        command: bool,
        offset: u8,
    },
    PortWrite {
        command: bool,
        offset: u8,
        value: u8,
    },
    CtrlAltDel,
    SysRq(char),
    Reset,
}

fuzz_target!(|ops: Vec<Op>| {
    let sink = Arc::new(RecordingSink::default());
    let t = irq();
    let dev = Arc::new(Mutex::new(I8042Device::new(t.clone(), sink.clone())));
    let mut data_port = I8042Port::data(dev.clone());
    let mut cmd_port = I8042Port::command(dev.clone());
    let mut last_read = 0u8;
    for op in ops {
        let status = {
            let mut b = [0u8];
            dev.lock().unwrap().read(COMMAND_OFFSET, &mut b);
            b[0]
        };
        assert_ne!(status & STR_UNLOCKED, 0, "keylock reported");
        let mut may_reset = false;
        match op {
            Op::Read { offset, len } => {
                let offset = u64::from(offset % 6);
                let mut buf = vec![0u8; usize::from(len % 5)];
                dev.lock().unwrap().read(offset, &mut buf);
                match (offset, buf.len()) {
                    (DATA_OFFSET, 1) => {
                        if status & STR_OBF == 0 {
                            assert_eq!(buf[0], last_read, "empty output buffer read");
                        }
                        last_read = buf[0];
                    }
                    (COMMAND_OFFSET, 1) => {}
                    _ => assert!(buf.iter().all(|&b| b == 0xff), "unclaimed read {buf:?}"),
                }
            }
            Op::Write { offset, data } => {
                let offset = u64::from(offset % 6);
                let data = &data[..data.len().min(4)];
                may_reset = data.len() == 1
                    && (offset == DATA_OFFSET
                        || (offset == COMMAND_OFFSET && data[0] >= 0xf0 && data[0] & 1 == 0));
                dev.lock().unwrap().write(offset, data);
            }
            Op::PortRead { command, offset } => {
                let mut b = [0u8];
                let p = if command {
                    &mut cmd_port
                } else {
                    &mut data_port
                };
                p.read(u64::from(offset % 2), &mut b);
                if offset % 2 != 0 {
                    assert_eq!(b[0], 0xff);
                } else if !command {
                    if status & STR_OBF == 0 {
                        assert_eq!(b[0], last_read, "empty output buffer read");
                    }
                    last_read = b[0];
                }
            }
            Op::PortWrite {
                command,
                offset,
                value,
            } => {
                let p = if command {
                    &mut cmd_port
                } else {
                    &mut data_port
                };
                p.write(u64::from(offset % 2), &[value]);
                may_reset = offset % 2 == 0 && (!command || (value >= 0xf0 && value & 1 == 0));
            }
            Op::CtrlAltDel => {
                let mut d = dev.lock().unwrap();
                let before = d.pending_keyboard_bytes();
                if d.trigger_ctrl_alt_del().is_err() {
                    assert_eq!(
                        d.pending_keyboard_bytes(),
                        before,
                        "a failed press queued keys"
                    );
                }
            }
            Op::SysRq(key) => {
                let mut d = dev.lock().unwrap();
                let before = d.pending_keyboard_bytes();
                if d.trigger_sysrq(key).is_err() {
                    assert_eq!(
                        d.pending_keyboard_bytes(),
                        before,
                        "a failed press queued keys"
                    );
                }
            }
            Op::Reset => {
                dev.lock().unwrap().reset();
                last_read = 0;
            }
        }
        assert!(dev.lock().unwrap().pending_keyboard_bytes() <= KBD_BUFFER_SIZE);
        let events = sink.take();
        assert!(events.len() <= usize::from(may_reset), "events {events:?}");
        assert!(events
            .iter()
            .all(|e| *e == GuestEvent::Reset(ResetCause::I8042)));
    }
    fired(&t);
});
