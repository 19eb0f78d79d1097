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

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{fill_unclaimed, EventFdTrigger};
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
/// [`SerialDevice::reset`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}
