//! The ib700 watchdog (Linux `ib700wdt`), at ports 0x441..=0x443.
//!
//! A write of `v` to 0x443 starts the timer, or restarts it if running
//! ("ping"), with a timeout of `30 - 2 * (v & 0xf)` seconds: the driver
//! writes an index (`15 - (timeout + 1) / 2`), not seconds, so 0 means 30 s
//! and 15 means 0 s (fire at once). Any write to 0x441 stops it. Nothing is
//! readable. This is the table QEMU's `ib700` uses too.
//!
//! Time is the guest's *running* time, supplied by the VMM: while the VM is
//! paused that clock stands still and the watchdog cannot fire. The VMM
//! turns [`Ib700Watchdog::deadline`] into a host timer (re-armed on every
//! change, cancelled while paused) and calls `check_expired` when it fires;
//! the expiry is decided on the virtual clock only.
//!
//! Snapshots ([`Ib700State`]) hold the running time *left*, not the
//! deadline: the guest clock of a restoring process has its own origin.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fill_unclaimed;
use crate::state::StateError;
use crate::{BusDevice, GuestEvent, GuestEventSink};

/// First port of the watchdog (the stop register).
pub const IB700_BASE: u64 = 0x441;
/// Ports decoded: 0x441..=0x443.
pub const IB700_LEN: u64 = 3;
/// Offset of the stop register (port 0x441).
pub const STOP_OFFSET: u64 = 0;
/// Offset of the start/ping register (port 0x443).
pub const START_OFFSET: u64 = 2;

/// The timeout, in seconds, that start value `v` selects.
pub fn timeout_secs(v: u8) -> u32 {
    30 - 2 * u32::from(v & 0xf)
}

/// Watchdog state on a virtual clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ib700Watchdog {
    deadline: Option<Duration>,
    timeout_s: Option<u32>,
    expiries: u64,
}

/// The watchdog's state, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ib700State {
    /// Guest running time left before expiry (None: stopped; zero: due
    /// but not yet noticed, so it fires as soon as it is restored).
    pub time_left: Option<Duration>,
    /// The timeout the guest last programmed, in seconds (None if never).
    pub timeout_s: Option<u32>,
    /// How many times the watchdog has fired.
    pub expiries: u64,
}

/// A snapshot for the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchdogStatus {
    /// The timer is running.
    pub armed: bool,
    /// The timeout the guest last programmed (None if it never did).
    pub timeout_s: Option<u32>,
    /// Whole seconds until expiry, rounded up (None when not armed).
    pub seconds_left: Option<u64>,
    /// How many times the watchdog has fired.
    pub expiries: u64,
}

impl Ib700Watchdog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A guest write of `value` at `port_offset` from [`IB700_BASE`], at
    /// guest time `now`. Offsets other than the stop and start registers
    /// are ignored.
    pub fn write(&mut self, port_offset: u64, value: u8, now: Duration) {
        match port_offset {
            STOP_OFFSET => self.deadline = None,
            START_OFFSET => {
                let secs = timeout_secs(value);
                self.timeout_s = Some(secs);
                // Saturating: a deadline past the end of time never fires.
                self.deadline = Some(
                    now.checked_add(Duration::from_secs(secs.into()))
                        .unwrap_or(Duration::MAX),
                );
            }
            _ => {}
        }
    }

    /// When the watchdog fires, in guest time (None: stopped).
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Fires if the deadline has been reached at `now`: returns true once,
    /// counts the expiry and disarms until the guest starts it again.
    pub fn check_expired(&mut self, now: Duration) -> bool {
        match self.deadline {
            Some(d) if now >= d => {
                self.deadline = None;
                self.expiries += 1;
                true
            }
            _ => false,
        }
    }

    /// Guest time left before expiry (zero when due; None when stopped).
    pub fn time_left(&self, now: Duration) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_sub(now))
    }

    pub fn status(&self, now: Duration) -> WatchdogStatus {
        WatchdogStatus {
            armed: self.deadline.is_some(),
            timeout_s: self.timeout_s,
            seconds_left: self
                .time_left(now)
                .map(|left| left.as_secs() + u64::from(left.subsec_nanos() > 0)),
            expiries: self.expiries,
        }
    }

    /// Stops the timer for a guest reset (the hardware comes up stopped);
    /// the expiry count is kept.
    pub fn reset(&mut self) {
        self.deadline = None;
        self.timeout_s = None;
    }

    /// The state at guest time `now`.
    pub fn save_state(&self, now: Duration) -> Ib700State {
        Ib700State {
            time_left: self.time_left(now),
            timeout_s: self.timeout_s,
            expiries: self.expiries,
        }
    }

    /// Takes `s` at guest time `now`: an armed watchdog is due at `now` plus
    /// its time left. Refuses a timeout the hardware cannot be programmed
    /// with, more time left than the timeout allows (which is also what
    /// keeps the deadline from overflowing on any sane clock), and time
    /// left on a watchdog never started. On error nothing changes.
    pub fn restore_state(&mut self, s: &Ib700State, now: Duration) -> Result<(), StateError> {
        let bad = |why: String| Err(StateError::new("ib700", why));
        if let Some(t) = s.timeout_s {
            if !(0..=0xf).any(|v| timeout_secs(v) == t) {
                return bad(format!("timeout {t} s is not one the ib700 offers"));
            }
        }
        let deadline = match (s.time_left, s.timeout_s) {
            (None, _) => None,
            (Some(_), None) => return bad("armed without a programmed timeout".into()),
            (Some(left), Some(t)) if left > Duration::from_secs(t.into()) => {
                return bad(format!("{left:?} left of a {t} s timeout"));
            }
            (Some(left), Some(_)) => match now.checked_add(left) {
                Some(d) => Some(d),
                None => return bad(format!("{left:?} left overflows the guest clock")),
            },
        };
        self.deadline = deadline;
        self.timeout_s = s.timeout_s;
        self.expiries = s.expiries;
        Ok(())
    }
}

/// Guest running time, as the VMM measures it.
pub type GuestClock = Arc<dyn Fn() -> Duration + Send + Sync>;
/// Called with the new deadline after every guest write.
pub type DeadlineHook = Box<dyn Fn(Option<Duration>) + Send>;

/// The watchdog on the PIO bus at [`IB700_BASE`], length [`IB700_LEN`].
///
/// `on_change` runs on the vCPU thread with the device lock held: it must be
/// quick and must not lock this device (write an eventfd or re-arm a timerfd
/// and return). Note that a deadline equal to "now" (timeout 0) has to be
/// armed as a tiny non-zero delay: a zero `it_value` disarms a timerfd.
pub struct Ib700Device {
    wdt: Ib700Watchdog,
    clock: GuestClock,
    on_change: DeadlineHook,
    events: Option<Arc<dyn GuestEventSink>>,
}

impl Ib700Device {
    pub fn new(clock: GuestClock, on_change: DeadlineHook) -> Self {
        Self {
            wdt: Ib700Watchdog::new(),
            clock,
            on_change,
            events: None,
        }
    }

    /// Also report `GuestEvent::WatchdogExpired` to `events` from
    /// [`Ib700Device::check_expired`].
    pub fn with_event_sink(mut self, events: Arc<dyn GuestEventSink>) -> Self {
        self.events = Some(events);
        self
    }

    /// For the VMM's timer: true (once) if the watchdog has expired by the
    /// guest clock now; the action is then the VMM's to take.
    pub fn check_expired(&mut self) -> bool {
        let fired = self.wdt.check_expired((self.clock)());
        if fired {
            if let Some(events) = &self.events {
                events.notify(GuestEvent::WatchdogExpired);
            }
        }
        fired
    }

    pub fn deadline(&self) -> Option<Duration> {
        self.wdt.deadline()
    }

    /// Guest time left before expiry, for arming a host timer.
    pub fn time_left(&self) -> Option<Duration> {
        self.wdt.time_left((self.clock)())
    }

    pub fn status(&self) -> WatchdogStatus {
        self.wdt.status((self.clock)())
    }

    /// Stops the watchdog for a guest reset and tells `on_change`.
    pub fn reset(&mut self) {
        self.wdt.reset();
        (self.on_change)(None);
    }

    pub fn watchdog(&self) -> &Ib700Watchdog {
        &self.wdt
    }

    /// The state, with the time left measured on the device's clock now.
    pub fn save_state(&self) -> Ib700State {
        self.wdt.save_state((self.clock)())
    }

    /// Takes `s`, re-basing its time left on the device's clock now, and
    /// tells `on_change` the new deadline (None too) so the VMM arms or
    /// cancels its host timer. On error nothing changes and the hook is not
    /// called.
    pub fn restore_state(&mut self, s: &Ib700State) -> Result<(), StateError> {
        self.wdt.restore_state(s, (self.clock)())?;
        (self.on_change)(self.wdt.deadline());
        Ok(())
    }
}

impl BusDevice for Ib700Device {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        fill_unclaimed(data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            tracing::trace!("ib700: ignored {}-byte write at +{offset:#x}", data.len());
            return;
        };
        if offset != STOP_OFFSET && offset != START_OFFSET {
            return;
        }
        self.wdt.write(offset, value, (self.clock)());
        (self.on_change)(self.wdt.deadline());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::legacy::test_util::RecordingSink;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn timeout_table_matches_linux_ib700wdt() {
        let expected = [30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0];
        for (v, &secs) in expected.iter().enumerate() {
            assert_eq!(timeout_secs(v as u8), secs, "value {v}");
            // High bits are ignored.
            assert_eq!(timeout_secs(v as u8 | 0xf0), secs);
            let mut w = Ib700Watchdog::new();
            w.write(START_OFFSET, v as u8, s(100));
            assert_eq!(w.deadline(), Some(s(100 + u64::from(secs))));
        }
        // What the driver writes for a requested timeout t: 15 - (t + 1) / 2,
        // so the guest gets t rounded up to an even number of seconds.
        for t in 0u32..=30 {
            let idx = (15 - t.div_ceil(2)) as u8;
            let got = timeout_secs(idx);
            assert!(got >= t && got <= t + 1, "timeout={t} gives {got}");
        }
    }

    #[test]
    fn start_ping_stop() {
        let mut w = Ib700Watchdog::new();
        assert_eq!(w.deadline(), None);
        w.write(START_OFFSET, 10, s(0)); // 10 s
        assert_eq!(w.deadline(), Some(s(10)));
        w.write(START_OFFSET, 10, s(8)); // ping
        assert_eq!(w.deadline(), Some(s(18)));
        assert!(!w.check_expired(s(17)));
        w.write(STOP_OFFSET, 0x5a, s(17));
        assert_eq!(w.deadline(), None);
        assert!(!w.check_expired(s(1000)));
        // Port 0x442 does nothing.
        w.write(1, 0, s(1000));
        assert_eq!(w.deadline(), None);
        assert_eq!(w.status(s(1000)).expiries, 0);
    }

    #[test]
    fn expires_on_the_virtual_clock_once() {
        let mut w = Ib700Watchdog::new();
        w.write(START_OFFSET, 13, s(50)); // 4 s
        assert!(!w.check_expired(s(53)));
        assert!(w.check_expired(s(54)));
        assert!(!w.check_expired(s(55)), "fires once");
        assert_eq!(w.deadline(), None);
        let st = w.status(s(60));
        assert!(!st.armed);
        assert_eq!(st.expiries, 1);
        assert_eq!(st.timeout_s, Some(4));
        // The guest starts it again: it can fire again.
        w.write(START_OFFSET, 15, s(60)); // 0 s
        assert!(w.check_expired(s(60)));
        assert_eq!(w.status(s(60)).expiries, 2);
    }

    #[test]
    fn status_reports_time_left() {
        let mut w = Ib700Watchdog::new();
        assert_eq!(
            w.status(s(0)),
            WatchdogStatus {
                armed: false,
                timeout_s: None,
                seconds_left: None,
                expiries: 0
            }
        );
        w.write(START_OFFSET, 0, s(0));
        let st = w.status(Duration::from_millis(500));
        assert!(st.armed);
        assert_eq!(st.timeout_s, Some(30));
        assert_eq!(st.seconds_left, Some(30), "29.5 s rounds up");
        assert_eq!(w.status(s(40)).seconds_left, Some(0));
    }

    #[test]
    fn deadline_saturates_instead_of_overflowing() {
        let mut w = Ib700Watchdog::new();
        w.write(START_OFFSET, 0, Duration::MAX);
        assert_eq!(w.deadline(), Some(Duration::MAX));
    }

    #[test]
    fn reset_stops_and_keeps_count() {
        let mut w = Ib700Watchdog::new();
        w.write(START_OFFSET, 15, s(0));
        assert!(w.check_expired(s(0)));
        w.write(START_OFFSET, 0, s(0));
        w.reset();
        assert_eq!(w.deadline(), None);
        assert_eq!(w.status(s(0)).expiries, 1);
    }

    /// A clock the test moves by hand; "paused" simply means not moving it.
    struct Fixture {
        now: Arc<AtomicU64>,
        deadlines: Arc<Mutex<Vec<Option<Duration>>>>,
        dev: Ib700Device,
    }

    fn fixture() -> Fixture {
        let now = Arc::new(AtomicU64::new(0));
        let deadlines = Arc::new(Mutex::new(vec![]));
        let n = now.clone();
        let d = deadlines.clone();
        let dev = Ib700Device::new(
            Arc::new(move || Duration::from_millis(n.load(Ordering::SeqCst))),
            Box::new(move |dl| d.lock().unwrap().push(dl)),
        );
        Fixture {
            now,
            deadlines,
            dev,
        }
    }

    impl Fixture {
        fn advance(&self, ms: u64) {
            self.now.fetch_add(ms, Ordering::SeqCst);
        }
        fn hooks(&self) -> Vec<Option<Duration>> {
            std::mem::take(&mut *self.deadlines.lock().unwrap())
        }
    }

    #[test]
    fn device_reports_deadline_changes_and_expires_once() {
        let mut f = fixture();
        let sink = Arc::new(RecordingSink::default());
        f.dev = f.dev.with_event_sink(sink.clone());
        f.advance(1000);
        f.dev.write(START_OFFSET, &[14]); // 2 s
        assert_eq!(f.hooks(), vec![Some(s(3))]);
        assert_eq!(f.dev.time_left(), Some(s(2)));
        f.advance(1000);
        f.dev.write(START_OFFSET, &[14]); // ping
        assert_eq!(f.hooks(), vec![Some(s(4))]);
        f.advance(1999);
        assert!(!f.dev.check_expired());
        f.advance(1);
        assert!(f.dev.check_expired());
        assert!(!f.dev.check_expired());
        assert_eq!(sink.take(), vec![GuestEvent::WatchdogExpired]);
        assert_eq!(f.dev.status().expiries, 1);
        f.dev.write(STOP_OFFSET, &[0]);
        assert_eq!(f.hooks(), vec![None]);
    }

    #[test]
    fn frozen_clock_never_expires() {
        let mut f = fixture();
        f.dev.write(START_OFFSET, &[15]); // 0 s: due now, fires
        assert!(f.dev.check_expired());
        f.dev.write(START_OFFSET, &[14]); // 2 s
        f.advance(1500);
        // Paused: the VMM stops advancing guest time; any number of timer
        // wakeups meanwhile find nothing.
        for _ in 0..100 {
            assert!(!f.dev.check_expired());
        }
        assert_eq!(f.dev.status().seconds_left, Some(1));
        f.advance(500);
        assert!(f.dev.check_expired());
        assert_eq!(f.dev.status().expiries, 2);
    }

    #[test]
    fn device_ignores_bad_accesses_and_reads_ones() {
        let mut f = fixture();
        f.dev.write(START_OFFSET, &[0, 0]);
        f.dev.write(START_OFFSET, &[]);
        f.dev.write(1, &[0]);
        f.dev.write(u64::MAX, &[0]);
        assert!(f.hooks().is_empty());
        assert_eq!(f.dev.deadline(), None);
        let mut b = [0u8; 4];
        f.dev.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
        f.dev.write(START_OFFSET, &[0]);
        f.dev.reset();
        assert_eq!(f.hooks(), vec![Some(s(30)), None]);
        assert_eq!(f.dev.deadline(), None);
        assert_eq!(f.dev.watchdog().deadline(), None);
    }

    /// A watchdog that fired once, was started again for 30 s at 100 s and
    /// has 20 s left at 110 s.
    fn armed_with_20_s_left() -> Fixture {
        let mut f = fixture();
        f.dev.write(START_OFFSET, &[15]);
        assert!(f.dev.check_expired());
        f.advance(100_000);
        f.dev.write(START_OFFSET, &[0]);
        f.advance(10_000);
        f.hooks();
        f
    }

    #[test]
    fn restored_watchdog_fires_after_the_time_left_on_the_new_clock() {
        let a = armed_with_20_s_left();
        let saved = a.dev.save_state();
        assert_eq!(
            saved,
            Ib700State {
                time_left: Some(s(20)),
                timeout_s: Some(30),
                expiries: 1
            }
        );
        // The new process's guest clock has another origin.
        let mut b = fixture();
        b.advance(5_000);
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.hooks(), vec![Some(s(25))], "the VMM re-arms its timer");
        assert_eq!(b.dev.status(), a.dev.status());
        b.advance(19_999);
        assert!(!b.dev.check_expired());
        b.advance(1);
        assert!(b.dev.check_expired());
        assert_eq!(b.dev.status().expiries, 2);
        // The guest goes on programming it as before.
        b.dev.write(START_OFFSET, &[14]);
        assert_eq!(b.hooks(), vec![Some(s(27))]);
        assert_eq!(b.dev.status().timeout_s, Some(2));
    }

    #[test]
    fn restored_pings_and_stops_act_like_the_original() {
        let mut a = armed_with_20_s_left();
        let mut b = fixture();
        b.dev.restore_state(&a.dev.save_state()).unwrap();
        b.hooks();
        for f in [&mut a, &mut b] {
            f.advance(15_000);
            assert!(!f.dev.check_expired());
            f.dev.write(START_OFFSET, &[13]); // ping, 4 s
            f.advance(3_000);
        }
        assert_eq!(b.dev.save_state(), a.dev.save_state());
        assert_eq!(b.dev.time_left(), Some(s(1)));
        b.dev.write(STOP_OFFSET, &[0]);
        assert_eq!(b.hooks(), vec![Some(s(19)), None]);
    }

    #[test]
    fn stopped_watchdog_restores_stopped_and_cancels_the_timer() {
        let mut a = fixture();
        a.dev.write(START_OFFSET, &[3]);
        a.dev.write(STOP_OFFSET, &[0]);
        let mut b = armed_with_20_s_left();
        b.dev.restore_state(&a.dev.save_state()).unwrap();
        assert_eq!(b.hooks(), vec![None]);
        assert_eq!(b.dev.deadline(), None);
        assert_eq!(b.dev.status().timeout_s, Some(24));
        assert_eq!(b.dev.status().expiries, 0);
    }

    #[test]
    fn overdue_watchdog_fires_as_soon_as_it_is_restored() {
        let a = armed_with_20_s_left();
        a.advance(25_000);
        let saved = a.dev.save_state();
        assert_eq!(saved.time_left, Some(Duration::ZERO));
        let mut b = fixture();
        b.advance(7_000);
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.hooks(), vec![Some(s(7))]);
        assert!(b.dev.check_expired());
    }

    #[test]
    fn corrupt_watchdog_states_are_refused_and_change_nothing() {
        let mut f = armed_with_20_s_left();
        let good = f.dev.save_state();
        let st = |time_left, timeout_s| Ib700State {
            time_left,
            timeout_s,
            expiries: 7,
        };
        for bad in [
            st(None, Some(31)),
            st(None, Some(3)),
            st(None, Some(u32::MAX)),
            st(Some(s(1)), None),
            st(Some(s(31)), Some(30)),
            st(Some(s(1) + Duration::from_nanos(1)), Some(0)),
            st(Some(Duration::MAX), Some(30)),
        ] {
            let err = f.dev.restore_state(&bad).unwrap_err();
            assert_eq!(err.device, "ib700", "{bad:?}");
            assert_eq!(f.dev.save_state(), good, "{bad:?}: unchanged");
            assert!(f.hooks().is_empty(), "{bad:?}: no re-arm");
        }
        // A deadline past the end of the guest clock is refused too.
        let mut w = Ib700Watchdog::new();
        let err = w.restore_state(&st(Some(s(2)), Some(2)), Duration::MAX);
        assert_eq!(err.map_err(|e| e.device), Err("ib700"));
        assert_eq!(w, Ib700Watchdog::new());
    }

    #[test]
    fn watchdog_state_survives_a_json_round_trip() {
        let saved = Ib700State {
            time_left: Some(Duration::new(19, 999_999_999)),
            timeout_s: Some(20),
            expiries: 3,
        };
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<Ib700State>(&json).unwrap(), saved);
        // A duration that overflows is a decoding error, not a panic.
        let hostile = format!(
            r#"{{"time_left":{{"secs":{},"nanos":1000000000}},"timeout_s":30,"expiries":0}}"#,
            u64::MAX
        );
        assert!(serde_json::from_str::<Ib700State>(&hostile).is_err());
    }
}
