//! What the guest and its watchdog make the VM do: a reset or power-off
//! it asked for, a kernel panic (pvpanic) and a watchdog expiry, each
//! carried out as the customer's policy says.

use devices::GuestEvent;
use protocol::{Event, PanicAction, ResetCause, VmState, WatchdogAction};

use super::{dev_cause, Flow, Input, StopKind, Vm};
use crate::events::VmEvent;

impl Vm {
    fn alert(&self, event: &'static str) {
        if let Some(hook) = &self.alert_hook {
            hook.fire(event);
        }
    }

    fn guest_panic(&mut self, bits: u8) -> Flow {
        // Bit 1 alone: a crash kernel is loaded and takes over; no action.
        if bits & 1 == 0 {
            devices::limited!(
                info,
                "guest reported a crash with kdump loaded (pvpanic {bits:#x})"
            );
            return Flow::Continue;
        }
        let action = self.panic_action;
        devices::limited!(
            warn,
            vm = self.config.name,
            "guest kernel panicked; action: {action}"
        );
        (self.hooks.publish)(Event::Panic { action });
        self.alert("panic");
        match action {
            PanicAction::Reset => {
                let r = self.apply(Input::Reset(ResetCause::Panic));
                self.flow_after(r)
            }
            PanicAction::Pause => {
                if let Err(e) = self.pause() {
                    tracing::warn!("cannot pause after panic: {e}");
                }
                Flow::Continue
            }
            PanicAction::Poweroff => self.poweroff_flow(),
            PanicAction::None => Flow::Continue,
        }
    }

    fn watchdog_expired(&mut self) -> Flow {
        let action = self.watchdog_action;
        let expiries = self.watchdog.status().expiries;
        devices::limited!(
            warn,
            vm = self.config.name,
            "watchdog expired; action: {action}"
        );
        (self.hooks.publish)(Event::Watchdog { action, expiries });
        self.alert("watchdog");
        match action {
            WatchdogAction::Reset => {
                let r = self.apply(Input::Reset(ResetCause::Watchdog));
                self.flow_after(r)
            }
            WatchdogAction::Poweroff => self.poweroff_flow(),
            WatchdogAction::Pause => {
                let _ = self.pause();
                Flow::Continue
            }
            WatchdogAction::Shutdown => {
                let timeout = self.stop_timeout;
                self.graceful_stop(StopKind::Shutdown, timeout, Box::new(|_| {}));
                Flow::Continue
            }
            WatchdogAction::None => Flow::Continue,
        }
    }

    /// Handles queued events from vCPUs and devices.
    pub fn handle_events(&mut self) -> Flow {
        if self.lifecycle.is_held() {
            // A snapshot is being written (the vCPUs are paused, so this is
            // rare): what is queued waits for its end, which wakes the loop
            // again. The wake-up is taken so the loop does not spin.
            let _ = self.events.wake_fd().read();
            return Flow::Continue;
        }
        let boot = self.boot_count;
        for ev in self.events.drain() {
            tracing::debug!("vm event: {ev:?}");
            if self.boot_count != boot || self.state == VmState::Stopped {
                // Raised by a machine that is gone (a guest often pokes
                // several reset mechanisms in a row): stale.
                tracing::debug!("dropping stale event {ev:?}");
                continue;
            }
            let flow = match ev {
                VmEvent::Guest(GuestEvent::Reset(cause)) => {
                    self.guest_power(Input::GuestReset(dev_cause(cause)))
                }
                VmEvent::Guest(GuestEvent::PowerOff) => self.guest_power(Input::GuestPoweroff),
                VmEvent::Guest(GuestEvent::Panic(bits)) => self.guest_panic(bits),
                VmEvent::Guest(GuestEvent::WatchdogExpired) => self.watchdog_expired(),
                VmEvent::VcpuFailed { vcpu, reason } => {
                    eprintln!("vmm: vCPU {vcpu}: {reason}");
                    tracing::error!("vCPU {vcpu}: {reason}");
                    self.poweroff();
                    if self.exit_on_poweroff {
                        Flow::Exit(1)
                    } else {
                        Flow::Continue
                    }
                }
                VmEvent::Timer => Flow::Continue,
            };
            if let Flow::Exit(_) = flow {
                return flow;
            }
        }
        Flow::Continue
    }

    /// The watchdog's host timer fired.
    pub fn on_watchdog_timer(&mut self) -> Flow {
        // The device pushes WatchdogExpired on the event queue if it fired.
        self.watchdog.on_timer();
        self.handle_events()
    }
}
