//! Adaptive polling of a disk's queues and io_uring completions (the disk's
//! `poll_us=N`), as QEMU's I/O threads do with `poll-max-ns`.
//!
//! Going to sleep in `epoll_wait` and being woken costs a few microseconds
//! each way, and far more where the host's CPU itself sleeps when idle (a
//! nested or oversubscribed host). At queue depth 1 a request pays it twice:
//! once when the guest kicks, once when the disk completes. With polling,
//! the disk's thread keeps looking at the guest's avail index and at
//! io_uring's completion queue for a while after its last work before it
//! sleeps, so a request or completion that comes soon is served at once.
//!
//! The window adapts to the guest, so a quiet disk does not burn CPU:
//! - the next work came while polling: the window stays;
//! - it came after the window but within `poll_us`: the window doubles
//!   (from [`GROW_FROM`]), so next time polling would have caught it;
//! - it came later than `poll_us`: polling could not have caught it, and the
//!   window halves (to nothing below [`GROW_FROM`]).
//!
//! The cost is CPU: an idle disk spins up to the window after its last
//! request, and a guest doing I/O steadily at QD1 keeps its disk's thread
//! busy. Off unless the operator asks (`poll_us=0`, the default).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The first window after polling was off or shrank to nothing.
pub const GROW_FROM: Duration = Duration::from_micros(4);

/// The most an operator may ask for (`poll_us`): a millisecond of spinning
/// after every request is already a core per busy disk.
pub const MAX_POLL: Duration = Duration::from_millis(1);

/// The polling window of one disk thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
}

impl PollWindow {
    /// Polling up to `max` (clamped to [`MAX_POLL`]); zero turns it off.
    /// Starts at nothing and grows once the guest shows it would pay off.
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max: max.min(MAX_POLL),
            current: Duration::ZERO,
        }
    }

    /// The operator asked for polling (`poll_us` above zero).
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to keep polling after the last work.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The next request or completion came `waited` after the last work.
    pub fn observe(&mut self, waited: Duration) {
        if self.max.is_zero() || waited <= self.current {
            return;
        }
        if waited > self.max {
            self.current /= 2;
            if self.current < GROW_FROM {
                self.current = Duration::ZERO;
            }
        } else {
            // Not `clamp`: `max` may be below GROW_FROM (poll_us=1..3).
            self.current = (self.current * 2).max(GROW_FROM).min(self.max);
        }
    }

    /// The operator's limit (`poll_us`).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// A new limit while the disk runs (clamped to [`MAX_POLL`]; zero
    /// turns polling off): a window above it shrinks to it at once, one
    /// below it grows as the guest shows it would pay off.
    pub fn set_max(&mut self, max: Duration) {
        self.max = max.min(MAX_POLL);
        self.current = self.current.min(self.max);
    }

    /// Sets the window (tests, fuzzing).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn force(&mut self, current: Duration) {
        self.current = current;
    }
}

/// A disk's `poll_us`, which the operator may change while it runs
/// (`set-disk`): the disk's thread reads it at each wake-up (one relaxed
/// load) and follows it ([`PollWindow::set_max`]), so no lock is shared
/// with the thread that sets it.
#[derive(Clone, Debug, Default)]
pub struct PollControl(Arc<AtomicU32>);

impl PollControl {
    /// Starting at `max` (clamped to [`MAX_POLL`]).
    pub fn new(max: Duration) -> Self {
        let c = PollControl::default();
        c.set_duration(max);
        c
    }

    /// Sets the limit to `us` µs, clamped to [`MAX_POLL`]; returns what
    /// was set.
    pub fn set(&self, us: u32) -> u32 {
        let most = u32::try_from(MAX_POLL.as_micros()).unwrap_or(u32::MAX);
        let us = us.min(most);
        self.0.store(us, Ordering::Relaxed);
        us
    }

    /// Sets the limit to `max`, clamped to [`MAX_POLL`].
    pub fn set_duration(&self, max: Duration) {
        self.set(u32::try_from(max.as_micros()).unwrap_or(u32::MAX));
    }

    /// The limit, µs (0: off).
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn max(&self) -> Duration {
        Duration::from_micros(u64::from(self.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_limit_set_while_the_disk_runs_shrinks_the_window_at_once() {
        let mut w = PollWindow::new(50 * US);
        w.force(32 * US);
        w.set_max(10 * US);
        assert_eq!((w.max(), w.current()), (10 * US, 10 * US));
        w.set_max(Duration::ZERO);
        assert!(!w.enabled());
        assert_eq!(w.current(), Duration::ZERO, "off stops polling at once");
        w.observe(US);
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_higher_limit_set_while_the_disk_runs_lets_the_window_grow_to_it() {
        let mut w = PollWindow::new(Duration::ZERO);
        w.set_max(100 * US);
        assert_eq!(
            w.current(),
            Duration::ZERO,
            "nothing until the guest shows it pays"
        );
        for _ in 0..6 {
            w.observe(90 * US);
        }
        assert_eq!(w.current(), 100 * US);
    }

    #[test]
    fn the_operators_setting_is_clamped_to_a_millisecond() {
        let c = PollControl::new(Duration::from_secs(1));
        assert_eq!(c.get(), 1000);
        assert_eq!(c.set(u32::MAX), 1000);
        assert_eq!(c.set(7), 7);
        let seen = c.clone();
        assert_eq!(seen.max(), 7 * US, "a clone sees the same setting");
        c.set(0);
        assert_eq!(seen.get(), 0);
    }

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn polling_that_is_off_never_opens_a_window() {
        let mut w = PollWindow::new(Duration::ZERO);
        for waited in [US, 10 * US, 1000 * US] {
            w.observe(waited);
            assert_eq!(w.current(), Duration::ZERO);
        }
    }

    #[test]
    fn work_that_comes_soon_after_the_window_grows_it_up_to_the_limit() {
        let mut w = PollWindow::new(50 * US);
        w.observe(20 * US);
        assert_eq!(w.current(), GROW_FROM);
        w.observe(20 * US);
        assert_eq!(w.current(), 8 * US);
        w.observe(20 * US);
        w.observe(20 * US);
        assert_eq!(w.current(), 32 * US);
        // Caught while polling: the window stays.
        w.observe(20 * US);
        assert_eq!(w.current(), 32 * US);
        w.observe(40 * US);
        assert_eq!(w.current(), 50 * US, "never past the limit");
    }

    #[test]
    fn work_that_comes_later_than_the_limit_shrinks_the_window_to_nothing() {
        let mut w = PollWindow::new(50 * US);
        w.force(32 * US);
        w.observe(10_000 * US);
        assert_eq!(w.current(), 16 * US);
        w.observe(10_000 * US);
        w.observe(10_000 * US);
        assert_eq!(w.current(), GROW_FROM);
        w.observe(10_000 * US);
        assert_eq!(w.current(), Duration::ZERO, "an idle disk stops spinning");
    }

    #[test]
    fn a_limit_below_the_first_window_is_the_window() {
        for max in 1..4 {
            let mut w = PollWindow::new(max * US);
            w.observe(US / 2);
            w.observe(US);
            assert_eq!(w.current(), max * US);
        }
    }

    #[test]
    fn an_operator_cannot_ask_for_more_than_a_millisecond() {
        let mut w = PollWindow::new(Duration::from_secs(5));
        for _ in 0..20 {
            w.observe(MAX_POLL);
        }
        assert_eq!(w.current(), MAX_POLL);
    }
}
