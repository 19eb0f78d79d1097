//! Rate limits for log lines a guest can trigger at will (a driver setting
//! FAILED in a loop, a triple-fault loop, a pvpanic storm): each call site
//! of [`limited!`] may log a burst of [`BURST`] lines, then one line per
//! [`REFILL`]; the first line after a pause says how many were suppressed.
//! The guest cannot fill the operator's disk or journal, and the first
//! lines, the useful ones, are always kept.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log at once.
pub const BURST: u32 = 10;
/// One more line is allowed every this long.
pub const REFILL: Duration = Duration::from_secs(6);

#[derive(Debug)]
struct State {
    tokens: u32,
    last: Option<Instant>,
    suppressed: u64,
}

/// One call site's budget. `const`, so it can live in a `static`.
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<State>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter {
            state: Mutex::new(State {
                tokens: BURST,
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now; `Some(n)`: yes, and `n` lines were
    /// suppressed since the last one logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = crate::bus::lock(&self.state);
        let refill_ms = REFILL.as_millis().max(1);
        if let Some(last) = s.last {
            let earned = now.saturating_duration_since(last).as_millis() / refill_ms;
            if earned > 0 {
                let earned = u32::try_from(earned).unwrap_or(u32::MAX);
                s.tokens = s.tokens.saturating_add(earned).min(BURST);
                // Keep the remainder: refills are not lost to frequent calls.
                let used = REFILL.saturating_mul(earned);
                s.last = last.checked_add(used).or(Some(now));
            }
        } else {
            s.last = Some(now);
        }
        if s.tokens == 0 {
            s.suppressed = s.suppressed.saturating_add(1);
            return None;
        }
        if s.tokens == BURST {
            // A full bucket starts its refill clock now, not at the last line.
            s.last = Some(now);
        }
        s.tokens -= 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// `tracing::<level>!` through a per-call-site [`LogLimiter`]:
/// `limited!(warn, "virtio-mmio: ...")`. Lines after a suppression carry a
/// `suppressed` field with the count.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        match LIMITER.admit() {
            Some(0) => tracing::$level!($($arg)+),
            Some(suppressed) => tracing::$level!(suppressed, $($arg)+),
            None => {}
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_then_one_line_per_refill_with_the_count_suppressed() {
        let l = LogLimiter::new();
        let t = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(t), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_at(t), None);
        }
        assert_eq!(l.admit_at(t + REFILL / 2), None);
        assert_eq!(l.admit_at(t + REFILL), Some(1001));
        assert_eq!(l.admit_at(t + REFILL), None);
    }

    #[test]
    fn an_hour_of_a_storm_logs_at_most_a_burst_plus_one_line_per_refill() {
        let l = LogLimiter::new();
        let t = Instant::now();
        let mut logged = 0u64;
        // 1000 lines a second for an hour.
        for ms in 0..3_600_000u64 {
            if l.admit_at(t + Duration::from_millis(ms)).is_some() {
                logged += 1;
            }
        }
        let most = u64::from(BURST) + 3600 / REFILL.as_secs();
        assert!(logged <= most, "{logged} lines logged, at most {most}");
        assert!(
            logged >= most - 1,
            "{logged} lines logged, expected about {most}"
        );
    }

    #[test]
    fn a_quiet_call_site_gets_its_whole_burst_back() {
        let l = LogLimiter::new();
        let t = Instant::now();
        for _ in 0..BURST + 5 {
            let _ = l.admit_at(t);
        }
        let later = t + REFILL * (BURST + 1);
        assert_eq!(l.admit_at(later), Some(5));
        for _ in 1..BURST {
            assert_eq!(l.admit_at(later), Some(0));
        }
        assert_eq!(l.admit_at(later), None);
    }
}
