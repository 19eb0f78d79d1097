//! Saving and restoring an [`I8042Device`] for snapshots.
//!
//! The state is the controller's and keyboard's registers and buffers as
//! the guest can observe them. The interrupt line and the event sink belong
//! to the restoring process and are kept.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{
    I8042Device, CMD_WRITE_AUX, CMD_WRITE_AUX_OBUF, CMD_WRITE_CTR, CMD_WRITE_KBD_OBUF,
    CMD_WRITE_OUTP, CTR_KBDINT, KBD_BUFFER_SIZE, KBD_SCANCODE_SET, KBD_SET_LEDS, KBD_SET_TYPEMATIC,
};
use crate::state::StateError;

const DEVICE: &str = "i8042";

/// The controller and its keyboard, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The command byte ("CTR").
    pub command_byte: u8,
    /// The output port (0xD0/0xD1).
    pub output_port: u8,
    /// The last write went to the command port (status bit 3).
    pub last_write_was_command: bool,
    /// A controller command still waiting for its data-port parameter.
    pub pending_command: Option<u8>,
    /// An unread controller reply, and whether it raises IRQ 1 (bytes
    /// written with 0xD2 do, replies to commands do not).
    pub controller_output: Option<(u8, bool)>,
    /// The keyboard's buffer, oldest first (at most 32 bytes).
    pub keyboard_queue: Vec<u8>,
    /// A keyboard command still waiting for its parameter.
    pub keyboard_pending: Option<u8>,
    /// Keyboard scanning enabled (0xF4/0xF5).
    pub scanning: bool,
    /// What the data port returns while the output buffer is empty.
    pub last_read: u8,
    /// IRQ 1 was raised for the byte at the front of the output and the
    /// guest has not read it yet. Restored as is, so the guest does not get
    /// a second interrupt for a byte whose first one the restored irqchip
    /// state still holds.
    pub irq_raised: bool,
}

impl I8042State {
    /// Refuses what the state machine never holds: a parameter-taking
    /// command that takes none would misroute the guest's next data byte,
    /// and a keyboard queue over its size breaks the buffer's accounting.
    fn validate(&self) -> Result<(), StateError> {
        let bad = |why: String| Err(StateError::new(DEVICE, why));
        if let Some(c) = self.pending_command {
            let takes_parameter = matches!(
                c,
                CMD_WRITE_CTR
                    ..=0x7f
                        | CMD_WRITE_OUTP
                        | CMD_WRITE_KBD_OBUF
                        | CMD_WRITE_AUX_OBUF
                        | CMD_WRITE_AUX
            );
            if !takes_parameter {
                return bad(format!("controller command {c:#04x} takes no parameter"));
            }
        }
        if let Some(c) = self.keyboard_pending {
            if !matches!(c, KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC) {
                return bad(format!("keyboard command {c:#04x} takes no parameter"));
            }
        }
        if self.keyboard_queue.len() > KBD_BUFFER_SIZE {
            return bad(format!(
                "keyboard buffer holds {} bytes, it has room for {KBD_BUFFER_SIZE}",
                self.keyboard_queue.len()
            ));
        }
        if self.irq_raised && self.command_byte & CTR_KBDINT == 0 {
            return bad("IRQ 1 raised while the command byte masks it".into());
        }
        Ok(())
    }
}

impl I8042Device {
    pub fn save_state(&self) -> I8042State {
        I8042State {
            command_byte: self.ctr,
            output_port: self.outp,
            last_write_was_command: self.last_was_cmd,
            pending_command: self.pending_cmd,
            controller_output: self.ctrl_out,
            keyboard_queue: self.kbd_queue.iter().copied().collect(),
            keyboard_pending: self.kbd_pending,
            scanning: self.scanning,
            last_read: self.last_read,
            irq_raised: self.irq_raised,
        }
    }

    /// Takes `s`, keeping this device's interrupt line and event sink. The
    /// output port is taken as saved even with the reset line low: that
    /// reset was requested before the snapshot and is not requested again.
    /// If `s` owes the guest an interrupt (a byte waiting, unmasked, none
    /// raised) it is raised now, as the device would have. On error nothing
    /// changes.
    pub fn restore_state(&mut self, s: &I8042State) -> Result<(), StateError> {
        s.validate()?;
        let mut kbd_queue = VecDeque::with_capacity(KBD_BUFFER_SIZE);
        kbd_queue.extend(&s.keyboard_queue);
        self.ctr = s.command_byte;
        self.outp = s.output_port;
        self.last_was_cmd = s.last_write_was_command;
        self.pending_cmd = s.pending_command;
        self.ctrl_out = s.controller_output;
        self.kbd_queue = kbd_queue;
        self.kbd_pending = s.keyboard_pending;
        self.scanning = s.scanning;
        self.last_read = s.last_read;
        self.irq_raised = s.irq_raised;
        self.kick();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{
        CMD_KBD_DISABLE, CMD_KBD_ENABLE, CMD_READ_CTR, CMD_READ_OUTP, CMD_SELF_TEST,
        COMMAND_OFFSET, CTRL_ALT_DEL_SET1, CTR_SYS, CTR_XLATE, DATA_OFFSET, DEFAULT_CTR, KBD_ACK,
        STR_CMD, STR_OBF,
    };
    use super::*;
    use crate::legacy::test_util::fired;
    use crate::legacy::EventFdTrigger;
    use crate::BusDevice;

    use super::super::tests::{data, dev, status};

    /// Translation on, Ctrl+Alt+Del queued (set 1) with the first byte's
    /// interrupt raised and read once, a keyboard LED command waiting for
    /// its parameter and a controller command waiting for its own.
    fn busy() -> (I8042Device, EventFdTrigger) {
        let (mut d, t, _) = dev();
        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        d.write(DATA_OFFSET, &[DEFAULT_CTR | CTR_XLATE]);
        d.trigger_ctrl_alt_del().unwrap();
        assert_eq!(fired(&t), 1);
        assert_eq!(data(&mut d), CTRL_ALT_DEL_SET1[0]);
        assert_eq!(fired(&t), 1);
        d.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        d.write(COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        (d, t)
    }

    /// Everything the guest reads, one byte per interrupt, after finishing
    /// both pending commands and asking for the command byte.
    fn guest_view(d: &mut I8042Device, t: &EventFdTrigger) -> Vec<u8> {
        let mut seen = vec![status(d)];
        d.write(DATA_OFFSET, &[0xdf]); // parameter of 0xD1
        d.write(DATA_OFFSET, &[0x07]); // parameter of the LED command
        seen.push(status(d));
        while status(d) & STR_OBF != 0 {
            seen.push(data(d));
            seen.push(u8::from(fired(t) == 1));
        }
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        seen.extend([status(d), data(d), data(d)]);
        d.write(COMMAND_OFFSET, &[CMD_READ_OUTP]);
        seen.push(data(d));
        seen
    }

    #[test]
    fn restored_i8042_gives_the_guest_the_same_bytes_and_interrupts() {
        let (mut a, a_irq) = busy();
        let saved = a.save_state();
        assert_eq!(saved.command_byte, DEFAULT_CTR | CTR_XLATE);
        assert_eq!(
            saved.keyboard_queue,
            [&CTRL_ALT_DEL_SET1[1..], &[KBD_ACK]].concat()
        );
        assert_eq!(saved.pending_command, Some(CMD_WRITE_OUTP));
        assert_eq!(saved.keyboard_pending, Some(KBD_SET_LEDS));
        assert!(saved.irq_raised);

        let (mut b, b_irq, sink) = dev();
        b.restore_state(&saved).unwrap();
        assert_eq!(fired(&b_irq), 0, "the outstanding edge is not repeated");
        assert_eq!(b.save_state(), saved);
        assert_eq!(b.command_byte(), DEFAULT_CTR | CTR_XLATE);
        assert_eq!(b.pending_keyboard_bytes(), saved.keyboard_queue.len());

        let view = guest_view(&mut a, &a_irq);
        assert_eq!(guest_view(&mut b, &b_irq), view);
        assert_ne!(view[0] & STR_CMD, 0);
        assert_eq!(view[2], CTRL_ALT_DEL_SET1[1]);
        assert_eq!(
            view[view.len() - 1],
            0xdf,
            "output port written after restore"
        );
        assert!(sink.take().is_empty());
        // Ctrl+Alt+Del from the restoring VMM still uses set 1.
        b.trigger_ctrl_alt_del().unwrap();
        assert_eq!(fired(&b_irq), 1);
        assert_eq!(data(&mut b), CTRL_ALT_DEL_SET1[0]);
    }

    #[test]
    fn restored_i8042_keeps_keys_waiting_behind_a_disabled_interface() {
        let (mut a, _, _) = dev();
        a.write(COMMAND_OFFSET, &[CMD_KBD_DISABLE]);
        a.trigger_ctrl_alt_del().unwrap();
        a.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let (mut b, t, _) = dev();
        b.restore_state(&a.save_state()).unwrap();
        assert_eq!(fired(&t), 0);
        assert_eq!(data(&mut b), 0x55);
        assert_eq!(status(&mut b) & STR_OBF, 0, "keys wait");
        b.write(COMMAND_OFFSET, &[CMD_KBD_ENABLE]);
        assert_eq!(fired(&t), 1);
        assert_eq!(data(&mut b), 0x14);
    }

    #[test]
    fn restoring_a_state_that_owes_an_interrupt_raises_it() {
        let (a, _) = busy();
        let mut owed = a.save_state();
        owed.irq_raised = false;
        let (mut b, t, _) = dev();
        b.restore_state(&owed).unwrap();
        assert_eq!(fired(&t), 1);
        assert!(b.save_state().irq_raised);
    }

    #[test]
    fn corrupt_i8042_states_are_refused_and_change_nothing() {
        let (mut d, _) = busy();
        let good = d.save_state();
        let corrupt: [fn(&mut I8042State); 6] = [
            |s| s.pending_command = Some(CMD_READ_CTR),
            |s| s.pending_command = Some(0xfe),
            |s| s.keyboard_pending = Some(KBD_ACK),
            |s| s.keyboard_queue = vec![0x1c; KBD_BUFFER_SIZE + 1],
            |s| s.keyboard_queue = vec![0; 1 << 20],
            |s| s.command_byte = CTR_SYS,
        ];
        for (i, break_it) in corrupt.iter().enumerate() {
            let mut bad = good.clone();
            break_it(&mut bad);
            let err = d.restore_state(&bad).unwrap_err();
            assert_eq!(err.device, "i8042", "case {i}");
            assert_eq!(d.save_state(), good, "case {i}: unchanged");
        }
        // Every parameter-taking command is accepted; a full buffer too.
        for c in [CMD_WRITE_CTR, 0x7f, CMD_WRITE_OUTP, CMD_WRITE_AUX] {
            let mut s = good.clone();
            s.pending_command = Some(c);
            s.keyboard_queue = vec![0; KBD_BUFFER_SIZE];
            d.restore_state(&s).unwrap();
        }
    }

    #[test]
    fn i8042_state_survives_a_json_round_trip() {
        let (d, _) = busy();
        let saved = d.save_state();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<I8042State>(&json).unwrap(), saved);
    }
}
