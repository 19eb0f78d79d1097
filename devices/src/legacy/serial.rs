//! COM1: a 16550A-compatible 8250 UART built on `vm_superio::Serial`.
//!
//! Bus placement: [`COM1_BASE`] (0x3f8), [`COM1_LEN`] (8) ports, interrupt
//! [`COM1_IRQ`] (4) through the [`EventFdTrigger`] given at construction.
//!
//! Output: every byte the guest writes to THR goes straight to the writer
//! supplied by the VMM (the console hub). That writer is called on the vCPU
//! thread with the device lock held, so it must never block; a failed write
//! loses the byte (counted in [`SerialCounters::tx_lost`]) and the guest is
//! not stalled.
//!
//! Input: [`SerialDevice::enqueue_input`] takes at most what fits in the
//! 64-byte receive FIFO and says how much it took; the VMM keeps the rest and
//! retries when the optional `input_drained` `EventFd` fires (the guest read
//! the FIFO empty). Nothing is dropped by the device.
//!
//! Snapshots: [`SerialDevice::save_state`] / [`SerialDevice::restore_state`]
//! carry the registers, the receive FIFO and pending interrupts as a
//! [`SerialState`]; the writer, interrupt line and input-drained event stay
//! those of the restoring process.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as SerialError, SerialEvents, SerialState as UartState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{fill_unclaimed, EventFdTrigger};
use crate::state::StateError;
use crate::BusDevice;

/// First port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports COM1 decodes.
pub const COM1_LEN: u64 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// The console writer the VMM hands in.
pub type SerialOutput = Box<dyn Write + Send>;

/// Per-device counters (monotonic for the life of the device, kept across
/// [`SerialDevice::reset`] and carried by snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialCounters {
    /// Bytes the guest wrote that reached the output writer.
    pub tx_bytes: u64,
    /// Bytes the guest wrote that the writer refused (lost).
    pub tx_lost: u64,
    /// Bytes accepted by `enqueue_input`.
    pub rx_enqueued: u64,
    /// Reads of the receive buffer register by the guest.
    pub rx_reads: u64,
}

/// The receive FIFO's size: vm-superio's `FIFO_SIZE`, which it does not
/// export (a test checks that a fresh device has exactly this much room).
const RX_FIFO_SIZE: usize = 64;

// Register bits vm-superio keeps, for checking a saved state (vm-superio
// accepts any byte in `from_state`, and only ever produces these).
/// IER bits a 16550A has; vm-superio masks guest writes to them.
const IER_VALID: u8 = 0x0f;
/// IIR encodings vm-superio stores: "none pending" alone, or any mix of
/// THR-empty (0x02) and received-data (0x04). The FIFO bits (0xc0) are
/// added on read, never stored.
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
/// LSR: data ready, and the two transmitter-empty bits that are always set
/// (the virtual transmitter is never busy); no error bit is ever set.
const LSR_DR: u8 = 0x01;
const LSR_TX_IDLE: u8 = 0x60;

/// Everything guest-visible in the UART, for snapshots. The fields mirror
/// `vm_superio::serial::SerialState` (which is not serde), plus the
/// device's counters so they stay monotonic across a restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    /// IIR as stored: pending interrupts, without the FIFO bits.
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO, oldest byte first (at most 64 bytes).
    pub in_buffer: Vec<u8>,
    /// Absent in a state that lacks them: they are statistics, not state
    /// the guest depends on.
    #[serde(default)]
    pub counters: SerialCounters,
}

impl SerialState {
    /// Refuses what vm-superio could never have produced: it would hand such
    /// values to the guest as they are, and a FIFO over 64 bytes breaks its
    /// capacity arithmetic.
    fn validate(&self) -> Result<(), StateError> {
        let bad = |why: String| Err(StateError::new("serial", why));
        if self.in_buffer.len() > RX_FIFO_SIZE {
            return bad(format!(
                "receive FIFO holds {} bytes, the UART has {RX_FIFO_SIZE}",
                self.in_buffer.len()
            ));
        }
        if self.interrupt_enable & !IER_VALID != 0 {
            return bad(format!(
                "IER {:#04x} has bits a 16550A lacks",
                self.interrupt_enable
            ));
        }
        let iir = self.interrupt_identification;
        if iir != IIR_NONE && (iir == 0 || iir & !(IIR_THRE | IIR_RDA) != 0) {
            return bad(format!("IIR {iir:#04x} is not a valid interrupt set"));
        }
        let has_data = !self.in_buffer.is_empty();
        if iir & IIR_RDA != 0 && !has_data {
            return bad("received-data interrupt pending with an empty FIFO".into());
        }
        let lsr = LSR_TX_IDLE | if has_data { LSR_DR } else { 0 };
        if self.line_status != lsr {
            return bad(format!(
                "LSR {:#04x} does not match the FIFO (expected {lsr:#04x})",
                self.line_status
            ));
        }
        Ok(())
    }
}

/// Callbacks from vm-superio: counters plus the "input FIFO drained" wakeup.
#[derive(Default)]
struct Hooks {
    tx_bytes: AtomicU64,
    tx_lost: AtomicU64,
    rx_reads: AtomicU64,
    input_drained: Option<EventFd>,
    drained_warned: AtomicBool,
}

#[derive(Clone)]
struct SharedHooks(Arc<Hooks>);

impl SerialEvents for SharedHooks {
    fn buffer_read(&self) {
        self.0.rx_reads.fetch_add(1, Ordering::Relaxed);
    }

    fn out_byte(&self) {
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.0.tx_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.0.input_drained {
            if let Err(e) = evt.write(1) {
                if !self.0.drained_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!("serial: cannot signal input-drained event: {e}");
                }
            }
        }
    }
}

/// The COM1 UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, SharedHooks, SerialOutput>,
    irq: EventFdTrigger,
    hooks: SharedHooks,
    rx_enqueued: u64,
    irq_warned: bool,
}

impl SerialDevice {
    /// A UART in its power-on state.
    ///
    /// * `irq` - raised for THR-empty and received-data interrupts.
    /// * `out` - receives every byte the guest transmits; must not block.
    /// * `input_drained` - if given, written (+1) each time the guest reads
    ///   the receive FIFO empty, so the VMM can feed held-back input.
    pub fn new(irq: EventFdTrigger, out: SerialOutput, input_drained: Option<EventFd>) -> Self {
        let hooks = SharedHooks(Arc::new(Hooks {
            input_drained,
            ..Hooks::default()
        }));
        Self {
            serial: Serial::with_events(irq.clone(), hooks.clone(), out),
            irq,
            hooks,
            rx_enqueued: 0,
            irq_warned: false,
        }
    }

    /// Back to the power-on register state (for a guest reset): the receive
    /// FIFO is emptied, the writer, interrupt line and counters are kept.
    pub fn reset(&mut self) {
        let out: SerialOutput = std::mem::replace(self.serial.writer_mut(), Box::new(io::sink()));
        self.serial = Serial::with_events(self.irq.clone(), self.hooks.clone(), out);
    }

    /// Queues host input for the guest. Takes as many bytes as fit in the
    /// receive FIFO (possibly 0: FIFO full, or the guest put the UART in
    /// loopback mode) and returns that count; the caller keeps the rest.
    /// Raises the receive interrupt if the guest enabled it.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let take = bytes.len().min(self.serial.fifo_capacity());
        if take == 0 {
            return 0;
        }
        let taken = match self.serial.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            // The bytes are in the FIFO; only the interrupt failed.
            Err(SerialError::Trigger(e)) => {
                self.warn_irq(&e);
                take
            }
            Err(SerialError::FullFifo) | Err(SerialError::IOError(_)) => 0,
        };
        self.rx_enqueued += taken as u64;
        taken
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The interrupt line (for irqfd registration).
    pub fn irq(&self) -> &EventFdTrigger {
        &self.irq
    }

    pub fn counters(&self) -> SerialCounters {
        let h = &self.hooks.0;
        SerialCounters {
            tx_bytes: h.tx_bytes.load(Ordering::Relaxed),
            tx_lost: h.tx_lost.load(Ordering::Relaxed),
            rx_enqueued: self.rx_enqueued,
            rx_reads: h.rx_reads.load(Ordering::Relaxed),
        }
    }

    /// The UART's guest-visible state and the counters, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let u = self.serial.state();
        SerialState {
            baud_divisor_low: u.baud_divisor_low,
            baud_divisor_high: u.baud_divisor_high,
            interrupt_enable: u.interrupt_enable,
            interrupt_identification: u.interrupt_identification,
            line_control: u.line_control,
            line_status: u.line_status,
            modem_control: u.modem_control,
            modem_status: u.modem_status,
            scratch: u.scratch,
            in_buffer: u.in_buffer,
            counters: self.counters(),
        }
    }

    /// Replaces the UART's state with `s`, keeping this device's writer,
    /// interrupt line and input-drained event (as [`SerialDevice::reset`]
    /// does). An interrupt pending and enabled in `s` is raised again, as
    /// the UART's level output would be. On error nothing changes.
    pub fn restore_state(&mut self, s: &SerialState) -> Result<(), StateError> {
        s.validate()?;
        let uart = UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        // Built around a placeholder writer: `from_state` drops the writer
        // it is given when it fails, and ours must survive a failure.
        let placeholder: SerialOutput = Box::new(io::sink());
        let mut serial =
            match Serial::from_state(&uart, self.irq.clone(), self.hooks.clone(), placeholder) {
                Ok(serial) => serial,
                Err(SerialError::Trigger(e)) => {
                    return Err(StateError::new(
                        "serial",
                        format!("cannot raise the restored interrupt: {e}"),
                    ))
                }
                Err(e) => return Err(StateError::new("serial", e.to_string())),
            };
        std::mem::swap(serial.writer_mut(), self.serial.writer_mut());
        self.serial = serial;
        let (h, c) = (&self.hooks.0, &s.counters);
        h.tx_bytes.store(c.tx_bytes, Ordering::Relaxed);
        h.tx_lost.store(c.tx_lost, Ordering::Relaxed);
        h.rx_reads.store(c.rx_reads, Ordering::Relaxed);
        self.rx_enqueued = c.rx_enqueued;
        Ok(())
    }

    fn warn_irq(&mut self, e: &io::Error) {
        if !self.irq_warned {
            self.irq_warned = true;
            tracing::warn!("serial: cannot raise interrupt: {e}");
        }
    }

    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= COM1_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (Self::register(offset, data.len()), data.first_mut()) {
            (Some(reg), Some(byte)) => *byte = self.serial.read(reg),
            _ => fill_unclaimed(data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(reg), Some(&value)) = (Self::register(offset, data.len()), data.first()) else {
            tracing::trace!("serial: ignored {}-byte write at +{offset:#x}", data.len());
            return;
        };
        match self.serial.write(reg, value) {
            Ok(()) => {}
            Err(SerialError::Trigger(e)) => self.warn_irq(&e),
            // Already counted as a lost byte through the hooks.
            Err(SerialError::IOError(e)) => tracing::trace!("serial: output lost a byte: {e}"),
            Err(SerialError::FullFifo) => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::legacy::test_util::{fired, irq};

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn dev() -> (SerialDevice, SharedBuf, EventFdTrigger) {
        let buf = SharedBuf::default();
        let t = irq();
        (
            SerialDevice::new(t.clone(), Box::new(buf.clone()), None),
            buf,
            t,
        )
    }

    fn rd(d: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn guest_thr_writes_reach_the_writer() {
        let (mut d, buf, _) = dev();
        for &c in b"ok\n" {
            d.write(DATA, &[c]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"ok\n");
        assert_ne!(rd(&mut d, LSR) & LSR_THRE, 0);
        assert_eq!(d.counters().tx_bytes, 3);
    }

    #[test]
    fn input_shows_up_in_rbr_with_data_ready() {
        let (mut d, _, _) = dev();
        assert_eq!(rd(&mut d, LSR) & LSR_DR, 0);
        assert_eq!(d.enqueue_input(b"hi"), 2);
        assert_ne!(rd(&mut d, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut d, DATA), b'h');
        assert_ne!(rd(&mut d, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut d, DATA), b'i');
        assert_eq!(rd(&mut d, LSR) & LSR_DR, 0);
        assert_eq!(d.counters().rx_enqueued, 2);
        assert_eq!(d.counters().rx_reads, 2);
    }

    #[test]
    fn receive_interrupt_fires_only_when_ier_enables_it() {
        let (mut d, _, t) = dev();
        d.enqueue_input(b"a");
        assert_eq!(fired(&t), 0, "IER is 0: no interrupt");
        // Enabling RDA with data pending asserts the interrupt at once.
        d.write(IER, &[0x01]);
        assert_eq!(fired(&t), 1);
        assert_eq!(rd(&mut d, IIR) & 0x0f, 0x04, "IIR reports received data");
        assert_eq!(rd(&mut d, DATA), b'a');
        d.enqueue_input(b"b");
        assert_eq!(fired(&t), 1);
    }

    #[test]
    fn enqueue_respects_fifo_capacity() {
        let (mut d, _, _) = dev();
        let cap = d.fifo_capacity();
        assert_eq!(cap, 64);
        let input = vec![b'x'; 100];
        assert_eq!(d.enqueue_input(&input), cap);
        assert_eq!(d.fifo_capacity(), 0);
        assert_eq!(d.enqueue_input(&input), 0);
        rd(&mut d, DATA);
        assert_eq!(d.enqueue_input(&input), 1);
        assert_eq!(d.enqueue_input(&[]), 0);
    }

    #[test]
    fn loopback_mode_takes_no_input() {
        let (mut d, _, _) = dev();
        d.write(MCR, &[0x10]);
        assert_eq!(d.enqueue_input(b"abc"), 0);
    }

    #[test]
    fn input_drained_event_fires_when_guest_empties_fifo() {
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let mut d = SerialDevice::new(irq(), Box::new(io::sink()), Some(evt.try_clone().unwrap()));
        d.enqueue_input(b"ab");
        rd(&mut d, DATA);
        assert!(evt.read().is_err(), "not drained yet");
        rd(&mut d, DATA);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn odd_sizes_and_offsets_are_ignored() {
        let (mut d, buf, _) = dev();
        d.write(DATA, b"ab");
        d.write(DATA, &[]);
        d.write(8, b"c");
        d.write(u64::MAX, b"c");
        assert!(buf.0.lock().unwrap().is_empty());
        let mut two = [0u8; 2];
        d.read(LSR, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut one = [0u8];
        d.read(u64::MAX, &mut one);
        assert_eq!(one, [0xff]);
        d.read(0, &mut []);
    }

    #[test]
    fn failing_writer_loses_bytes_without_stalling() {
        let mut d = SerialDevice::new(irq(), Box::new(Broken), None);
        d.write(DATA, b"a");
        assert_eq!(d.counters().tx_lost, 1);
        assert_ne!(rd(&mut d, LSR) & LSR_THRE, 0);
    }

    #[test]
    fn reset_restores_power_on_state_and_keeps_writer() {
        let (mut d, buf, _) = dev();
        d.write(LCR, &[0x80]);
        d.enqueue_input(b"zz");
        d.reset();
        assert_eq!(rd(&mut d, LCR), 0x03);
        assert_eq!(rd(&mut d, LSR) & LSR_DR, 0);
        assert_eq!(d.fifo_capacity(), 64);
        d.write(DATA, b"!");
        assert_eq!(&*buf.0.lock().unwrap(), b"!");
        assert_eq!(d.counters().rx_enqueued, 2);
    }

    const SCR: u64 = 7;

    /// A UART the guest has programmed (115200 8N1 + parity, RX interrupt
    /// on, loopback off) with three bytes waiting and their interrupt
    /// pending.
    fn programmed() -> (SerialDevice, SharedBuf, EventFdTrigger) {
        let (mut d, buf, t) = dev();
        d.write(LCR, &[0x80]);
        d.write(DATA, &[0x01]);
        d.write(IER, &[0x00]);
        d.write(LCR, &[0x1b]);
        d.write(MCR, &[0x0b]);
        d.write(SCR, &[0x5a]);
        d.write(DATA, b"x");
        d.write(IER, &[0x01]);
        assert_eq!(d.enqueue_input(b"abc"), 3);
        assert_eq!(fired(&t), 1);
        (d, buf, t)
    }

    /// What the guest sees over a run of accesses, reads and writes mixed.
    fn guest_view(d: &mut SerialDevice) -> Vec<u8> {
        let mut seen = vec![];
        for reg in [IER, LCR, MCR, LSR, 6, SCR, IIR, IIR, DATA, LSR] {
            seen.push(rd(d, reg));
        }
        d.write(LCR, &[0x9b]);
        seen.extend([rd(d, DATA), rd(d, IER)]);
        d.write(LCR, &[0x1b]);
        seen.extend([rd(d, DATA), rd(d, DATA), rd(d, LSR), rd(d, DATA)]);
        seen
    }

    #[test]
    fn restored_uart_shows_the_guest_the_same_registers_fifo_and_interrupt() {
        let (mut a, a_out, _) = programmed();
        let saved = a.save_state();
        assert_eq!(saved.in_buffer, b"abc");
        assert_eq!(saved.interrupt_identification, 0x04);

        let (mut b, b_out, b_irq) = dev();
        b.restore_state(&saved).unwrap();
        assert_eq!(fired(&b_irq), 1, "the pending RX interrupt is raised again");
        assert_eq!(b.save_state(), saved);
        assert_eq!(b.counters(), a.counters());
        assert_eq!(b.fifo_capacity(), RX_FIFO_SIZE - 3);

        let view = guest_view(&mut a);
        assert_eq!(guest_view(&mut b), view);
        assert_eq!(&view[..6], &[0x01, 0x1b, 0x0b, 0x60 | LSR_DR, 0xb0, 0x5a]);
        assert_eq!(view[6], 0xc4, "RX interrupt pending");
        assert_eq!(
            &view[8..12],
            &[b'a', 0x61, 0x01, 0x00],
            "data, LSR, divisor"
        );
        assert_eq!(&view[12..], &[b'b', b'c', 0x60, 0]);

        // Output goes to the restoring process's writer only.
        b.write(DATA, b"y");
        assert_eq!(&*b_out.0.lock().unwrap(), b"y");
        assert_eq!(&*a_out.0.lock().unwrap(), b"x");
        assert_eq!(b.counters().tx_bytes, 2);
    }

    #[test]
    fn restored_uart_takes_input_and_interrupts_like_the_original() {
        let (mut a, _, _) = programmed();
        let (mut b, _, b_irq) = dev();
        b.restore_state(&a.save_state()).unwrap();
        fired(&b_irq);
        for d in [&mut a, &mut b] {
            while rd(d, LSR) & LSR_DR != 0 {
                rd(d, DATA);
            }
        }
        assert_eq!(b.enqueue_input(b"z"), 1);
        assert_eq!(fired(&b_irq), 1);
        assert_eq!(rd(&mut b, DATA), b'z');
        assert_eq!(b.fifo_capacity(), a.fifo_capacity());
    }

    #[test]
    fn corrupt_serial_states_are_refused_and_change_nothing() {
        let (mut d, _, _) = programmed();
        let good = d.save_state();
        let corrupt: [fn(&mut SerialState); 7] = [
            |s| s.in_buffer = vec![0; RX_FIFO_SIZE + 1],
            |s| s.interrupt_enable = 0x10,
            |s| s.interrupt_identification = 0x00,
            |s| s.interrupt_identification = 0x05,
            |s| s.interrupt_identification = 0x08,
            |s| s.line_status = 0x61 | 0x02,
            |s| {
                s.in_buffer.clear();
                s.line_status = 0x60;
            },
        ];
        for (i, break_it) in corrupt.iter().enumerate() {
            let mut bad = good.clone();
            break_it(&mut bad);
            let err = d.restore_state(&bad).unwrap_err();
            assert_eq!(err.device, "serial", "case {i}");
            assert!(!err.to_string().contains('\n'), "case {i}: one line");
            assert_eq!(d.save_state(), good, "case {i}: unchanged");
        }
        // A full FIFO is fine; so is an empty one with nothing pending.
        let mut full = good.clone();
        full.in_buffer = vec![7; RX_FIFO_SIZE];
        d.restore_state(&full).unwrap();
        assert_eq!(d.fifo_capacity(), 0);
        let mut empty = good;
        empty.in_buffer.clear();
        empty.line_status = 0x60;
        empty.interrupt_identification = IIR_THRE;
        d.restore_state(&empty).unwrap();
        assert_eq!(rd(&mut d, LSR), 0x60);
    }

    #[test]
    fn serial_state_survives_a_json_round_trip() {
        let (d, _, _) = programmed();
        let saved = d.save_state();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<SerialState>(&json).unwrap(), saved);
        // Counters are optional in the file.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("counters");
        let no_counters: SerialState = serde_json::from_value(v).unwrap();
        assert_eq!(no_counters.counters, SerialCounters::default());
        assert_eq!(no_counters.in_buffer, saved.in_buffer);
    }
}
