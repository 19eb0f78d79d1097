//! The guest's running-time clock and the host timer behind the ib700
//! watchdog: the device decides expiry on guest time; a timerfd on the
//! event loop wakes us when that time may have come.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::Ib700Device;
use devices::GuestEventSink;
use vmm_sys_util::timerfd::TimerFd;

/// Time the guest has been running: wall time minus paused intervals.
#[derive(Debug)]
pub struct GuestClock {
    state: Mutex<ClockState>,
}

#[derive(Debug)]
struct ClockState {
    origin: Instant,
    paused_total: Duration,
    paused_since: Option<Instant>,
}

impl GuestClock {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(ClockState {
                origin: Instant::now(),
                paused_total: Duration::ZERO,
                paused_since: None,
            }),
        }
    }

    pub fn now(&self) -> Duration {
        let s = lock(&self.state);
        let end = s.paused_since.unwrap_or_else(Instant::now);
        end.saturating_duration_since(s.origin)
            .saturating_sub(s.paused_total)
    }

    pub fn pause(&self) {
        let mut s = lock(&self.state);
        if s.paused_since.is_none() {
            s.paused_since = Some(Instant::now());
        }
    }

    pub fn resume(&self) {
        let mut s = lock(&self.state);
        if let Some(t) = s.paused_since.take() {
            s.paused_total += t.elapsed();
        }
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).paused_since.is_some()
    }
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The ib700 device (kept across boots, so its expiry count survives
/// resets) plus the host timer that follows its deadline.
pub struct Watchdog {
    pub device: Arc<Mutex<Ib700Device>>,
    timer: Arc<Mutex<TimerFd>>,
    clock: Arc<GuestClock>,
    timer_fd: RawFd,
}

fn arm(timer: &Mutex<TimerFd>, clock: &GuestClock, deadline: Option<Duration>) {
    let mut t = lock(timer);
    let res = match deadline {
        Some(d) if !clock.is_paused() => {
            // A zero delay would disarm a timerfd: fire "now" as 1 ns.
            let delay = d.saturating_sub(clock.now()).max(Duration::from_nanos(1));
            t.reset(delay, None)
        }
        _ => t.clear(),
    };
    if let Err(e) = res {
        tracing::warn!("watchdog: cannot set host timer: {e}");
    }
}

impl Watchdog {
    pub fn new(clock: Arc<GuestClock>, events: Arc<dyn GuestEventSink>) -> std::io::Result<Self> {
        let timer = Arc::new(Mutex::new(crate::timer::nonblocking_timer()?));
        let timer_fd = lock(&timer).as_raw_fd();
        let (t, c) = (timer.clone(), clock.clone());
        let c2 = clock.clone();
        let device = Ib700Device::new(
            Arc::new(move || c2.now()),
            Box::new(move |deadline| arm(&t, &c, deadline)),
        )
        .with_event_sink(events);
        Ok(Self {
            device: Arc::new(Mutex::new(device)),
            timer,
            clock,
            timer_fd,
        })
    }

    pub fn timer_fd(&self) -> RawFd {
        self.timer_fd
    }

    /// The timer fired: consume it and let the device decide on guest time.
    /// The device sends `WatchdogExpired` itself; returns whether it fired.
    pub fn on_timer(&self) -> bool {
        // No expiry (the guest re-armed it since epoll saw it) is fine:
        // the device decides on guest time either way.
        crate::timer::take_expiry(&mut lock(&self.timer));
        let mut dev = lock(&self.device);
        let fired = dev.check_expired();
        if !fired {
            // Woken early (the guest pinged, or a pause shifted time): re-arm.
            let d = dev.deadline();
            drop(dev);
            arm(&self.timer, &self.clock, d);
        }
        fired
    }

    /// The VM paused: guest time stops, so does the host timer.
    pub fn pause(&self) {
        self.clock.pause();
        arm(&self.timer, &self.clock, None);
    }

    pub fn resume(&self) {
        self.clock.resume();
        let d = lock(&self.device).deadline();
        arm(&self.timer, &self.clock, d);
    }

    pub fn status(&self) -> devices::legacy::WatchdogStatus {
        lock(&self.device).status()
    }

    /// A new boot: the watchdog is disarmed (expiry count kept).
    pub fn reset(&self) {
        lock(&self.device).reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_stands_still_while_paused() {
        let c = GuestClock::new();
        std::thread::sleep(Duration::from_millis(20));
        c.pause();
        let a = c.now();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.now(), a);
        c.resume();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now();
        assert!(b >= a + Duration::from_millis(15));
        assert!(
            b < a + Duration::from_millis(45),
            "the pause was not counted: {b:?}"
        );
    }
}
