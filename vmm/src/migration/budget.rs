//! When the guest stops for the last pass: once what is left would go over
//! within `migrate`'s downtime budget (`downtime_ms`) at the rate the copy
//! has been measured to go. It is QEMU's rule (its `downtime-limit`, 300 ms
//! unless set), and for the same reason: a fixed size left, whatever the
//! link, stops a guest too late on a slow link and too early on a fast
//! one, where a few more passes cost nothing but a longer stop would.
//!
//! The estimate is what the copy sent while the guest ran over the wall
//! time it took, paced or not (a paced copy's rate is the pace), from one
//! look at the dirty log to the next, over the last
//! stretch of passes that took [`MEASURED_OVER`] or more (QEMU measures
//! every 100 ms the same way). The first pass sets it however short, and
//! it is low there where much memory is zero: those pages are read and
//! skipped, which takes time and sends nothing (a few hundred ms for 48
//! MiB never touched, on a nested host). Low is the safe side: a pass
//! more, not a longer stop; the next stretch corrects it. The last pass
//! itself is never paced, so on a link faster than the pace it takes less
//! than the budget. What comes after it, the machine's state and the
//! target's rebuild, is not in the budget: tens of milliseconds, more on
//! the answer's `downtime_ms`.

use std::time::Duration;

/// Passes shorter than this say little about the link: a few pages sent
/// within microseconds would make the estimate the speed of memory. They
/// are measured together with the next ones until they add up to it.
pub const MEASURED_OVER: Duration = Duration::from_millis(100);

/// The budget and the rate measured so far.
#[derive(Debug, Clone)]
pub struct Budget {
    downtime: Duration,
    /// Bytes per second; none before the first pass.
    rate: Option<f64>,
    /// The passes since the estimate was last set: bytes and time.
    stretch: (u64, Duration),
}

impl Budget {
    pub fn new(downtime: Duration) -> Self {
        Budget {
            downtime,
            rate: None,
            stretch: (0, Duration::ZERO),
        }
    }

    /// After a pass that sent `bytes` in `took` while the guest ran.
    pub fn measured(&mut self, bytes: u64, took: Duration) {
        let (b, t) = &mut self.stretch;
        *b = b.saturating_add(bytes);
        *t = t.saturating_add(took);
        if self.rate.is_some() && *t < MEASURED_OVER {
            return;
        }
        // A zero-length first pass (nothing to send, a clock that did not
        // move) counts as a microsecond, not a division by zero.
        let secs = t.as_secs_f64().max(1e-6);
        self.rate = Some(*b as f64 / secs);
        self.stretch = (0, Duration::ZERO);
    }

    /// The most that may be left for the guest to stop: what goes over in
    /// the budget at the measured rate (nothing before any measurement).
    pub fn stop_at(&self) -> u64 {
        // `as` saturates: an absurd rate gives u64::MAX, not a wrap.
        self.rate
            .map_or(0, |r| (r * self.downtime.as_secs_f64()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn what_may_be_left_is_what_the_measured_rate_sends_within_the_budget() {
        let mut b = Budget::new(Duration::from_millis(300));
        assert_eq!(b.stop_at(), 0, "nothing is known before the first pass");
        // 256 MiB in 8 s: 32 MiB/s, so 9.6 MiB in 300 ms.
        b.measured(256 * MIB, Duration::from_secs(8));
        assert_eq!(b.stop_at(), 32 * MIB * 3 / 10);
        // A budget ten times longer lets ten times as much be left.
        let mut long = Budget::new(Duration::from_secs(3));
        long.measured(256 * MIB, Duration::from_secs(8));
        assert_eq!(long.stop_at(), 96 * MIB);
    }

    #[test]
    fn each_pass_long_enough_to_measure_replaces_the_estimate() {
        let mut b = Budget::new(Duration::from_secs(1));
        b.measured(100 * MIB, Duration::from_secs(1));
        // The link got slower (other traffic, a pace): the next pass says so.
        b.measured(10 * MIB, Duration::from_secs(1));
        assert_eq!(b.stop_at(), 10 * MIB);
    }

    #[test]
    fn passes_too_short_to_measure_are_measured_together_but_a_short_first_pass_sets_it() {
        let mut b = Budget::new(Duration::from_secs(1));
        // A first pass slowed by skipping zero memory: 18 MiB in 400 ms.
        b.measured(18 * MIB, Duration::from_millis(400));
        assert_eq!(b.stop_at(), 45 * MIB);
        // Then 16 MiB every 40 ms: each alone too short to say anything...
        b.measured(16 * MIB, Duration::from_millis(40));
        b.measured(16 * MIB, Duration::from_millis(40));
        assert_eq!(b.stop_at(), 45 * MIB);
        // ...three of them together 120 ms: the link's 400 MiB/s.
        b.measured(16 * MIB, Duration::from_millis(40));
        assert_eq!(b.stop_at(), 400 * MIB);
        // A small guest over a fast link: its whole first pass in 50 ms.
        let mut small = Budget::new(Duration::from_secs(1));
        small.measured(64 * MIB, Duration::from_millis(50));
        assert_eq!(small.stop_at(), 64 * MIB * 20);
    }

    #[test]
    fn an_instant_first_pass_or_an_absurd_rate_saturates_instead_of_dividing_by_zero() {
        let mut b = Budget::new(Duration::from_secs(60));
        b.measured(u64::MAX, Duration::ZERO);
        assert_eq!(b.stop_at(), u64::MAX);
        let mut empty = Budget::new(Duration::from_millis(300));
        empty.measured(0, Duration::ZERO);
        assert_eq!(empty.stop_at(), 0);
    }
}
