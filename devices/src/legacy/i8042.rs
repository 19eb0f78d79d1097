//! An i8042 PS/2 keyboard controller with a minimal AT keyboard behind it:
//! enough for Linux's `i8042`/`atkbd` drivers (booted with `i8042.noaux
//! i8042.nomux i8042.nopnp i8042.dumbkbd`) to find a controller, for the
//! guest to reset the machine (command 0xFE) and for the VMM to send
//! Ctrl+Alt+Del.
//!
//! # Bus placement
//! Either insert the [`I8042Device`] itself at [`I8042_BASE`] (0x60) with
//! [`I8042_LEN`] (5): offset 0 is the data port 0x60, offset 4 the
//! status/command port 0x64, and offsets 1..=3 (ports 0x61..=0x63) read as
//! 0xff and ignore writes. Port 0x61 (PC speaker / PIT channel-2 gate) is
//! then swallowed by this device, which is harmless only when KVM handles it
//! in the kernel (`KVM_CREATE_PIT2` with `KVM_PIT_SPEAKER_DUMMY`, as
//! Firecracker does). Or put the device behind an `Arc<Mutex<_>>` and
//! insert [`I8042Port::data`] at 0x60 and [`I8042Port::command`] at 0x64,
//! each with length 1, leaving 0x61..=0x63 free.
//!
//! # Scancodes
//! The power-on command byte is 0x05 (keyboard interrupt enabled, system
//! flag set) with the XLATE bit (0x40) clear. Linux reads it, sees XLATE
//! clear and drives the keyboard port in "direct" mode (`SERIO_8042`), where
//! atkbd decodes raw set-2 scancodes: Ctrl+Alt+Del is sent as
//! `14 11 e0 71` (presses) then `e0 f0 71, f0 11, f0 14` (releases). If the
//! guest sets XLATE, the controller would translate to set 1, so the same
//! keys are queued as `1d 38 e0 53, e0 d3, b8, 9d` instead (decided when
//! the keys are queued).
//!
//! # Interrupts
//! IRQ 1 is an edge per byte through an [`EventFdTrigger`]: raised when a
//! keyboard byte reaches the output buffer while the command byte enables
//! the keyboard interrupt, and again after each data-port read that leaves
//! another keyboard byte waiting (the guest reads one byte per interrupt).
//! Replies to controller commands (0x20, 0xAA, ...) are polled by drivers and
//! raise no interrupt; bytes written with 0xD2 do, as they look like
//! keyboard data. Clearing the interrupt-enable bit drops the line, and
//! setting it again with data pending raises it again.
//!
//! Keyboard bytes wait in the keyboard's own buffer while the guest has the
//! keyboard interface disabled (0xAD / command-byte bit 4), and controller
//! replies always come out first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{fill_unclaimed, EventFdTrigger};
use crate::bus::lock;
use crate::{BusDevice, GuestEvent, GuestEventSink, ResetCause};
use vm_superio::Trigger;

// Snapshot save/restore, kept apart to keep this file readable.
mod state;
pub use state::I8042State;

/// First port of the block this device decodes when inserted whole.
pub const I8042_BASE: u64 = 0x60;
/// Length of that block (0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// The data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// The status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// Offset of the data port from [`I8042_BASE`].
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port from [`I8042_BASE`].
pub const COMMAND_OFFSET: u64 = 4;
/// ISA interrupt line of the keyboard.
pub const I8042_IRQ: u32 = 1;

// Status register.
const STR_OBF: u8 = 0x01;
const STR_SYS: u8 = 0x04;
const STR_CMD: u8 = 0x08;
/// Keylock switch not engaged (Linux warns "Keylock active" without it).
const STR_UNLOCKED: u8 = 0x10;

// Command byte ("CTR" in Linux).
/// Keyboard interrupt enable.
pub const CTR_KBDINT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
/// Keyboard interface disabled.
pub const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
/// Translate set-2 scancodes to set 1.
pub const CTR_XLATE: u8 = 0x40;
/// The command byte at power-on.
pub const DEFAULT_CTR: u8 = CTR_KBDINT | CTR_SYS;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_READ_TEST_INPUTS: u8 = 0xe0;
/// 0xf0..=0xff pulse output-port bits 0..=3 low for the bits that are 0;
/// bit 0 is the CPU reset line, so 0xfe (and any even value) resets.
const CMD_PULSE_BASE: u8 = 0xf0;

const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;

// Output port: reset line (active low) deasserted, A20 on, upper bits as
// QEMU reports them.
const OUTP_RESET: u8 = 0x01;
const DEFAULT_OUTP: u8 = 0xcf;

// Keyboard commands and replies (port 0x60).
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const KBD_CURRENT_SET: u8 = 0x02;

/// Ctrl, Alt, Del pressed then released, scancode set 2.
pub const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // presses
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // releases
];
/// The same keys as the controller emits them with translation (set 1).
/// (set 2, set 1) make codes of the keys SysRq commands use: every letter
/// (b reboot, o power off, c crash, s sync, u remount read-only, e/i
/// terminate/kill tasks, l/w/t/m/p backtraces and dumps, …) and the digits
/// (console log level).
pub fn sysrq_key_codes(key: char) -> Option<(u8, u8)> {
    Some(match key {
        'a' => (0x1c, 0x1e),
        'b' => (0x32, 0x30),
        'c' => (0x21, 0x2e),
        'd' => (0x23, 0x20),
        'e' => (0x24, 0x12),
        'f' => (0x2b, 0x21),
        'g' => (0x34, 0x22),
        'h' => (0x33, 0x23),
        'i' => (0x43, 0x17),
        'j' => (0x3b, 0x24),
        'k' => (0x42, 0x25),
        'l' => (0x4b, 0x26),
        'm' => (0x3a, 0x32),
        'n' => (0x31, 0x31),
        'o' => (0x44, 0x18),
        'p' => (0x4d, 0x19),
        'q' => (0x15, 0x10),
        'r' => (0x2d, 0x13),
        's' => (0x1b, 0x1f),
        't' => (0x2c, 0x14),
        'u' => (0x3c, 0x16),
        'v' => (0x2a, 0x2f),
        'w' => (0x1d, 0x11),
        'x' => (0x22, 0x2d),
        'y' => (0x35, 0x15),
        'z' => (0x1a, 0x2c),
        '1' => (0x16, 0x02),
        '2' => (0x1e, 0x03),
        '3' => (0x26, 0x04),
        '4' => (0x25, 0x05),
        '5' => (0x2e, 0x06),
        '6' => (0x36, 0x07),
        '7' => (0x3d, 0x08),
        '8' => (0x3e, 0x09),
        '9' => (0x46, 0x0a),
        '0' => (0x45, 0x0b),
        _ => return None,
    })
}

pub const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// How many bytes the keyboard buffers while the guest is not reading.
pub const KBD_BUFFER_SIZE: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the guest's keyboard buffer is full: the guest is not reading its keyboard")]
    BufferFull,
    #[error("the guest has disabled keyboard scanning")]
    ScanningDisabled,
    #[error("unknown SysRq key '{0}' (use a letter a-z or a digit 0-9)")]
    UnknownKey(char),
}

/// The i8042 controller and its keyboard.
pub struct I8042Device {
    irq: EventFdTrigger,
    events: Arc<dyn GuestEventSink>,
    /// Command byte.
    ctr: u8,
    /// Output port (0xD0/0xD1).
    outp: u8,
    /// Last write went to the command port (status bit 3).
    last_was_cmd: bool,
    /// Controller command waiting for its parameter on the data port.
    pending_cmd: Option<u8>,
    /// Controller reply, and whether it raises IRQ 1. One byte, as on the
    /// real chip: a newer reply replaces an unread one.
    ctrl_out: Option<(u8, bool)>,
    /// Bytes from the keyboard (scancodes and command replies).
    kbd_queue: VecDeque<u8>,
    /// Keyboard command waiting for its parameter.
    kbd_pending: Option<u8>,
    /// Keyboard scanning enabled (0xF4/0xF5).
    scanning: bool,
    /// What the data port returns when the output buffer is empty.
    last_read: u8,
    /// An edge was sent for the byte now at the front of the output.
    irq_raised: bool,
    irq_warned: bool,
}

impl I8042Device {
    /// A controller in its power-on state. `irq` is IRQ 1; `events` gets
    /// `GuestEvent::Reset(ResetCause::I8042)` when the guest pulses the
    /// reset line.
    pub fn new(irq: EventFdTrigger, events: Arc<dyn GuestEventSink>) -> Self {
        Self {
            irq,
            events,
            ctr: DEFAULT_CTR,
            outp: DEFAULT_OUTP,
            last_was_cmd: false,
            pending_cmd: None,
            ctrl_out: None,
            kbd_queue: VecDeque::with_capacity(KBD_BUFFER_SIZE),
            kbd_pending: None,
            scanning: true,
            last_read: 0,
            irq_raised: false,
            irq_warned: false,
        }
    }

    /// Back to the power-on state (for a guest reset); queued keys are lost.
    pub fn reset(&mut self) {
        let irq = self.irq.clone();
        let events = Arc::clone(&self.events);
        let irq_warned = self.irq_warned;
        *self = Self::new(irq, events);
        self.irq_warned = irq_warned;
    }

    /// The interrupt line (for irqfd registration).
    pub fn irq(&self) -> &EventFdTrigger {
        &self.irq
    }

    /// Queues Ctrl+Alt+Del press and release (see the module docs for the
    /// bytes) and raises IRQ 1 if the guest can take them now; otherwise
    /// they wait until it enables the keyboard interface or interrupt.
    /// Nothing is queued on error.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if !self.scanning {
            return Err(I8042Error::ScanningDisabled);
        }
        let keys: &[u8] = if self.ctr & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if !self.kbd_push(keys) {
            return Err(I8042Error::BufferFull);
        }
        self.kick();
        Ok(())
    }

    /// Queues Alt+SysRq+`key` (press and release) so the guest kernel runs
    /// that magic SysRq command without help from its user space: `b`
    /// reboot, `o` power off, `c` crash, `s` sync, `u` remount read-only.
    pub fn trigger_sysrq(&mut self, key: char) -> Result<(), I8042Error> {
        if !self.scanning {
            return Err(I8042Error::ScanningDisabled);
        }
        let (set2, set1) = sysrq_key_codes(key).ok_or(I8042Error::UnknownKey(key))?;
        let keys: Vec<u8> = if self.ctr & CTR_XLATE != 0 {
            // Alt, SysRq (Alt+PrtSc), key, then the releases.
            vec![0x38, 0x54, set1, set1 | 0x80, 0xd4, 0xb8]
        } else {
            vec![0x11, 0x84, set2, 0xf0, set2, 0xf0, 0x84, 0xf0, 0x11]
        };
        if !self.kbd_push(&keys) {
            return Err(I8042Error::BufferFull);
        }
        self.kick();
        Ok(())
    }

    /// Bytes waiting in the keyboard buffer.
    pub fn pending_keyboard_bytes(&self) -> usize {
        self.kbd_queue.len()
    }

    /// The current command byte.
    pub fn command_byte(&self) -> u8 {
        self.ctr
    }

    fn kbd_enabled(&self) -> bool {
        self.ctr & CTR_KBDDIS == 0
    }

    /// The byte a data-port read would return, and whether it interrupts.
    fn front(&self) -> Option<(u8, bool)> {
        self.ctrl_out.or_else(|| {
            self.kbd_enabled()
                .then(|| self.kbd_queue.front().map(|&b| (b, true)))
                .flatten()
        })
    }

    fn status(&self) -> u8 {
        let mut s = STR_UNLOCKED;
        if self.front().is_some() {
            s |= STR_OBF;
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STR_SYS;
        }
        if self.last_was_cmd {
            s |= STR_CMD;
        }
        s
    }

    /// Appends all of `bytes` to the keyboard buffer, or nothing.
    fn kbd_push(&mut self, bytes: &[u8]) -> bool {
        if self.kbd_queue.len() + bytes.len() > KBD_BUFFER_SIZE {
            tracing::debug!("i8042: keyboard buffer full, dropped {:02x?}", bytes);
            return false;
        }
        self.kbd_queue.extend(bytes);
        true
    }

    fn reply(&mut self, byte: u8) {
        self.ctrl_out = Some((byte, false));
    }

    /// Brings the interrupt line in line with the state: drops it when the
    /// guest masked it, sends one edge when an interrupting byte is at the
    /// front of the output and none was sent for it yet.
    fn kick(&mut self) {
        if self.ctr & CTR_KBDINT == 0 {
            self.irq_raised = false;
            return;
        }
        if self.irq_raised || !matches!(self.front(), Some((_, true))) {
            return;
        }
        self.irq_raised = true;
        if let Err(e) = self.irq.trigger() {
            if !self.irq_warned {
                self.irq_warned = true;
                tracing::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = if let Some(out) = self.ctrl_out.take() {
            Some(out)
        } else if self.kbd_enabled() {
            self.kbd_queue.pop_front().map(|b| (b, true))
        } else {
            None
        };
        if let Some((b, interrupting)) = byte {
            self.last_read = b;
            // The edge sent belonged to this byte; a polled controller reply
            // read ahead of a keyboard byte leaves that byte's edge standing.
            if interrupting {
                self.irq_raised = false;
            }
            self.kick();
        }
        self.last_read
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_was_cmd = true;
        // A new command abandons one still waiting for its parameter.
        self.pending_cmd = None;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            // Other controller RAM bytes: nothing stored there.
            0x21..=0x3f => self.reply(0),
            CMD_WRITE_CTR..=0x7f => self.pending_cmd = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_KBD_TEST => self.reply(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_WRITE_OUTP | CMD_WRITE_KBD_OBUF | CMD_WRITE_AUX_OBUF | CMD_WRITE_AUX => {
                self.pending_cmd = Some(cmd)
            }
            CMD_READ_TEST_INPUTS => self.reply(0),
            CMD_PULSE_BASE..=0xff => {
                // Linux sends 0xff as a no-op; only a pulse of bit 0 resets.
                if cmd & OUTP_RESET == 0 {
                    self.request_reset();
                }
            }
            // Anything else (aux tests, password, vendor commands): no reply.
            _ => tracing::trace!("i8042: ignored command {cmd:#04x}"),
        }
        self.kick();
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_cmd = false;
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTP) => {
                self.outp = value;
                if value & OUTP_RESET == 0 {
                    self.request_reset();
                }
            }
            Some(CMD_WRITE_KBD_OBUF) => self.ctrl_out = Some((value, true)),
            // No aux device: the byte is swallowed. Other RAM writes too.
            Some(_) => {}
            None => {
                // Sending to the keyboard re-enables its interface.
                self.ctr &= !CTR_KBDDIS;
                self.keyboard_command(value);
            }
        }
        self.kick();
    }

    fn keyboard_command(&mut self, value: u8) {
        if let Some(cmd) = self.kbd_pending.take() {
            if cmd == KBD_SCANCODE_SET && value == 0 {
                self.kbd_push(&[KBD_ACK, KBD_CURRENT_SET]);
            } else {
                self.kbd_push(&[KBD_ACK]);
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC => {
                self.kbd_pending = Some(value);
                self.kbd_push(&[KBD_ACK]);
            }
            KBD_ECHO => {
                self.kbd_push(&[KBD_ECHO]);
            }
            KBD_IDENTIFY => {
                self.kbd_push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]);
            }
            KBD_ENABLE => {
                self.scanning = true;
                self.kbd_push(&[KBD_ACK]);
            }
            KBD_DISABLE => {
                self.scanning = false;
                self.kbd_push(&[KBD_ACK]);
            }
            KBD_RESET => {
                self.kbd_queue.clear();
                self.scanning = true;
                self.kbd_push(&[KBD_ACK, KBD_BAT_OK]);
            }
            _ => {
                self.kbd_push(&[KBD_ACK]);
            }
        }
    }

    fn request_reset(&mut self) {
        tracing::debug!("i8042: guest pulsed the reset line");
        self.events.notify(GuestEvent::Reset(ResetCause::I8042));
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (COMMAND_OFFSET, 1) => self.status(),
            _ => return fill_unclaimed(data),
        };
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, &[v]) => self.write_data(v),
            (COMMAND_OFFSET, &[v]) => self.write_command(v),
            _ => tracing::trace!("i8042: ignored {}-byte write at +{offset:#x}", data.len()),
        }
    }
}

/// One port of a shared [`I8042Device`], for putting the data and command
/// ports on the bus as two one-byte ranges (0x60 and 0x64).
pub struct I8042Port {
    dev: Arc<Mutex<I8042Device>>,
    offset: u64,
}

impl I8042Port {
    /// The data port; insert at [`I8042_DATA_PORT`], length 1.
    pub fn data(dev: Arc<Mutex<I8042Device>>) -> Self {
        Self {
            dev,
            offset: DATA_OFFSET,
        }
    }

    /// The status/command port; insert at [`I8042_COMMAND_PORT`], length 1.
    pub fn command(dev: Arc<Mutex<I8042Device>>) -> Self {
        Self {
            dev,
            offset: COMMAND_OFFSET,
        }
    }
}

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            return fill_unclaimed(data);
        }
        lock(&self.dev).read(self.offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            lock(&self.dev).write(self.offset, data);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
