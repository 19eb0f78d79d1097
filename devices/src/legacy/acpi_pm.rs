//! Hardware-reduced ACPI power management: the FADT's sleep control, sleep
//! status and reset registers, as three one-byte I/O ports.
//!
//! For the FADT (all `SystemIO`, 8 bits wide, byte access):
//! - `SLEEP_CONTROL_REG` = [`SLEEP_CONTROL_PORT`] (0x600)
//! - `SLEEP_STATUS_REG`  = [`SLEEP_STATUS_PORT`] (0x601)
//! - `RESET_REG` = [`RESET_PORT`] (0x602), `RESET_VALUE` = [`RESET_VALUE`],
//!   with the `RESET_REG_SUP` flag set.
//!
//! The DSDT's `_S5_` package must carry [`S5_SLP_TYP`] (5). Writing the
//! sleep control register with `SLP_EN` (bit 5) and `SLP_TYP` (bits 2..=4)
//! == 5 powers the VM off. Other sleep states are not advertised; should a
//! guest request one anyway, the device acts as if it slept and woke at
//! once (sets `WAK_STS`) so the guest does not spin forever waiting for it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::fill_unclaimed;
use crate::state::StateError;
use crate::{BusDevice, GuestEvent, GuestEventSink, ResetCause};

/// First port of the block.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Ports in the block.
pub const ACPI_PM_LEN: u64 = 3;
/// Offsets from [`ACPI_PM_BASE`].
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
/// Absolute ports, for the FADT.
pub const SLEEP_CONTROL_PORT: u64 = ACPI_PM_BASE + SLEEP_CONTROL_OFFSET;
pub const SLEEP_STATUS_PORT: u64 = ACPI_PM_BASE + SLEEP_STATUS_OFFSET;
pub const RESET_PORT: u64 = ACPI_PM_BASE + RESET_OFFSET;
/// The FADT `RESET_VALUE`.
pub const RESET_VALUE: u8 = 0x01;
/// `SLP_TYP` for S5, as in the DSDT `_S5_` package.
pub const S5_SLP_TYP: u8 = 5;
/// Sleep control: sleep enable.
pub const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
/// Sleep status: wake status (write 1 to clear).
pub const WAK_STS: u8 = 1 << 7;

const _: () = assert!(RESET_OFFSET < ACPI_PM_LEN);

/// The registers' state, for snapshots. The control and reset registers
/// read as 0 and act only when written, so the sleep status register is all
/// there is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    /// The sleep status register as the guest reads it: 0 or [`WAK_STS`].
    pub sleep_status: u8,
}

pub struct AcpiPmDevice {
    events: Arc<dyn GuestEventSink>,
    wak_sts: bool,
}

impl AcpiPmDevice {
    pub fn new(events: Arc<dyn GuestEventSink>) -> Self {
        Self {
            events,
            wak_sts: false,
        }
    }

    /// Back to the power-on state (for a guest reset).
    pub fn reset(&mut self) {
        self.wak_sts = false;
    }

    pub fn save_state(&self) -> AcpiPmState {
        AcpiPmState {
            sleep_status: if self.wak_sts { WAK_STS } else { 0 },
        }
    }

    /// Takes `s` if its sleep status is one the device can show (0 or
    /// `WAK_STS`); on error nothing changes.
    pub fn restore_state(&mut self, s: &AcpiPmState) -> Result<(), StateError> {
        self.wak_sts = match s.sleep_status {
            0 => false,
            WAK_STS => true,
            v => {
                return Err(StateError::new(
                    "acpi-pm",
                    format!("sleep status {v:#04x} has bits other than WAK_STS"),
                ))
            }
        };
        Ok(())
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        match (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK {
            S5_SLP_TYP => {
                tracing::debug!("acpi: guest entered S5");
                self.events.notify(GuestEvent::PowerOff);
            }
            typ => {
                tracing::debug!("acpi: unsupported sleep type {typ}, waking at once");
                self.wak_sts = true;
            }
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (SLEEP_CONTROL_OFFSET, 1) | (RESET_OFFSET, 1) => 0,
            (SLEEP_STATUS_OFFSET, 1) => {
                if self.wak_sts {
                    WAK_STS
                } else {
                    0
                }
            }
            _ => return fill_unclaimed(data),
        };
        data[0] = value;
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (SLEEP_CONTROL_OFFSET, &[v]) => self.write_sleep_control(v),
            (SLEEP_STATUS_OFFSET, &[v]) if v & WAK_STS != 0 => self.wak_sts = false,
            (RESET_OFFSET, &[RESET_VALUE]) => {
                tracing::debug!("acpi: guest wrote the reset register");
                self.events.notify(GuestEvent::Reset(ResetCause::AcpiReset));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::legacy::test_util::RecordingSink;

    fn dev() -> (AcpiPmDevice, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (AcpiPmDevice::new(sink.clone()), sink)
    }

    fn rd(d: &mut AcpiPmDevice, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn ports_are_one_block() {
        assert_eq!(SLEEP_CONTROL_PORT, 0x600);
        assert_eq!(SLEEP_STATUS_PORT, 0x601);
        assert_eq!(RESET_PORT, 0x602);
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut d, sink) = dev();
        // What Linux writes: (SLP_TYP << 2) | SLP_EN.
        d.write(SLEEP_CONTROL_OFFSET, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(sink.take(), vec![GuestEvent::PowerOff]);
        assert_eq!(0x34, (S5_SLP_TYP << 2) | SLP_EN);
        // Reserved bits do not matter.
        d.write(SLEEP_CONTROL_OFFSET, &[0x34 | 0xc3]);
        assert_eq!(sink.take(), vec![GuestEvent::PowerOff]);
    }

    #[test]
    fn s5_without_slp_en_does_nothing() {
        let (mut d, sink) = dev();
        d.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << 2]);
        d.write(SLEEP_CONTROL_OFFSET, &[0]);
        assert!(sink.take().is_empty());
    }

    #[test]
    fn other_sleep_states_wake_at_once() {
        let (mut d, sink) = dev();
        assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), 0);
        d.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        assert!(sink.take().is_empty());
        assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), WAK_STS);
        d.write(SLEEP_STATUS_OFFSET, &[0]);
        assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), WAK_STS, "write 0 keeps it");
        d.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), 0);
        d.write(SLEEP_CONTROL_OFFSET, &[(1 << 2) | SLP_EN]);
        d.reset();
        assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn reset_register_resets_only_on_reset_value() {
        let (mut d, sink) = dev();
        for v in [0x00, 0x02, 0x06, 0xff] {
            d.write(RESET_OFFSET, &[v]);
        }
        assert!(sink.take().is_empty());
        d.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(sink.take(), vec![GuestEvent::Reset(ResetCause::AcpiReset)]);
        // The reset value elsewhere is not a reset.
        d.write(SLEEP_CONTROL_OFFSET, &[RESET_VALUE]);
        d.write(SLEEP_STATUS_OFFSET, &[RESET_VALUE]);
        assert!(sink.take().is_empty());
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut d, sink) = dev();
        d.write(RESET_OFFSET, &[RESET_VALUE, 0]);
        d.write(SLEEP_CONTROL_OFFSET, &[0x34, 0x34]);
        d.write(SLEEP_CONTROL_OFFSET, &[]);
        d.write(3, &[0x34]);
        d.write(u64::MAX, &[RESET_VALUE]);
        assert!(sink.take().is_empty());
        let mut two = [0u8; 2];
        d.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        assert_eq!(rd(&mut d, 9), 0xff);
        assert_eq!(rd(&mut d, RESET_OFFSET), 0);
        d.read(0, &mut []);
    }

    #[test]
    fn restored_wake_status_reads_the_same_and_clears_the_same() {
        let (mut a, _) = dev();
        a.write(SLEEP_CONTROL_OFFSET, &[(3 << 2) | SLP_EN]);
        let saved = a.save_state();
        assert_eq!(
            saved,
            AcpiPmState {
                sleep_status: WAK_STS
            }
        );
        let (mut b, sink) = dev();
        b.restore_state(&saved).unwrap();
        assert_eq!(rd(&mut b, SLEEP_STATUS_OFFSET), WAK_STS);
        b.write(SLEEP_STATUS_OFFSET, &[0]);
        assert_eq!(rd(&mut b, SLEEP_STATUS_OFFSET), WAK_STS);
        b.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        assert_eq!(rd(&mut b, SLEEP_STATUS_OFFSET), 0);
        // Restoring is not a guest write: no event.
        assert!(sink.take().is_empty());
        b.restore_state(&AcpiPmState { sleep_status: 0 }).unwrap();
        assert_eq!(rd(&mut b, SLEEP_STATUS_OFFSET), 0);
    }

    #[test]
    fn corrupt_acpi_pm_state_is_refused_and_changes_nothing() {
        let (mut d, _) = dev();
        d.write(SLEEP_CONTROL_OFFSET, &[(1 << 2) | SLP_EN]);
        for v in [0x01, WAK_STS | 0x01, 0x40, 0xff] {
            let err = d.restore_state(&AcpiPmState { sleep_status: v });
            assert_eq!(err.map_err(|e| e.device), Err("acpi-pm"), "{v:#x}");
            assert_eq!(rd(&mut d, SLEEP_STATUS_OFFSET), WAK_STS);
        }
    }

    #[test]
    fn acpi_pm_state_survives_a_json_round_trip() {
        let s = AcpiPmState {
            sleep_status: WAK_STS,
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(serde_json::from_str::<AcpiPmState>(&json).ok(), Some(s));
    }
}
