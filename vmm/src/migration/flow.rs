//! How fast a migration's copy goes while the guest runs (the operator's
//! `speed_mib_s`, so the hosts' link keeps room for their other traffic)
//! and whether the operator called it off (`migrate-cancel`). Both are
//! looked at before each frame of the copy, at most [`MAX_RUN`] bytes
//! apart; the last pass, with the guest stopped, goes as fast as it can
//! and can no longer be called off (every millisecond of it is downtime).
//!
//! [`MAX_RUN`]: super::wire::MAX_RUN

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ControlError, ErrorCode};

/// The longest single sleep while the copy waits for its speed limit: a
/// cancel is noticed within it.
const NAP: Duration = Duration::from_millis(50);

/// What the operator asked of a running migration's copy.
pub struct Flow {
    cancel: Arc<AtomicBool>,
    pace: Option<Pace>,
}

/// A speed limit: bytes may go out no faster than `bytes_per_s` on
/// average since the first of them (no burst allowance beyond one frame).
struct Pace {
    bytes_per_s: u64,
    /// When the first bytes went out (the connection and the set-up
    /// before them are not the link's time).
    began: Option<Instant>,
    sent: u64,
}

/// How long to wait before sending more, `elapsed` after the start with
/// `sent` bytes out at `bytes_per_s`.
fn wait_for(bytes_per_s: u64, sent: u64, elapsed: Duration) -> Duration {
    if bytes_per_s == 0 {
        return Duration::ZERO;
    }
    // The remainder's share of a second is under 1e9 ns: it fits a u64.
    let part = u128::from(sent % bytes_per_s) * 1_000_000_000 / u128::from(bytes_per_s);
    let due = Duration::from_secs(sent / bytes_per_s)
        .saturating_add(Duration::from_nanos(u64::try_from(part).unwrap_or(0)));
    due.saturating_sub(elapsed)
}

/// The error a cancelled migration answers with.
pub fn cancelled() -> ControlError {
    ControlError::new(
        ErrorCode::Cancelled,
        "migration cancelled by the operator: the guest runs on here",
    )
}

impl Flow {
    /// `speed_mib_s` of `migrate` (0 or none: no limit), and the flag
    /// `migrate-cancel` sets.
    pub fn new(cancel: Arc<AtomicBool>, speed_mib_s: Option<u64>) -> Self {
        let pace = speed_mib_s.filter(|&s| s > 0).map(|s| Pace {
            bytes_per_s: s.saturating_mul(1 << 20),
            began: None,
            sent: 0,
        });
        Self { cancel, pace }
    }

    /// Neither limited nor to be called off: the last pass.
    pub fn unlimited() -> Self {
        Self::new(Arc::default(), None)
    }

    /// Whether the operator called the migration off.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Before `n` more bytes go out: an error once the migration was
    /// called off; otherwise waits as long as the speed limit asks.
    pub fn before_send(&mut self, n: u64) -> Result<(), ControlError> {
        loop {
            if self.is_cancelled() {
                return Err(cancelled());
            }
            let Some(p) = &mut self.pace else {
                return Ok(());
            };
            let began = *p.began.get_or_insert_with(Instant::now);
            let w = wait_for(p.bytes_per_s, p.sent, began.elapsed());
            if w.is_zero() {
                break;
            }
            std::thread::sleep(w.min(NAP));
        }
        if let Some(p) = &mut self.pace {
            p.sent = p.sent.saturating_add(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_next_bytes_wait_until_those_sent_fit_the_speed_limit() {
        // 3 MiB out at 2 MiB/s: due at 1.5 s.
        assert_eq!(
            wait_for(2 * MIB, 3 * MIB, Duration::from_millis(500)),
            Duration::from_secs(1)
        );
        assert_eq!(
            wait_for(2 * MIB, 3 * MIB, Duration::from_millis(1500)),
            Duration::ZERO
        );
        assert_eq!(wait_for(2 * MIB, 0, Duration::ZERO), Duration::ZERO);
        // Behind schedule: no wait, and no credit saved for later either
        // (the schedule is since the start, so a slow link is not punished).
        assert_eq!(wait_for(MIB, MIB, Duration::from_secs(9)), Duration::ZERO);
    }

    #[test]
    fn huge_counts_and_rates_neither_overflow_nor_panic() {
        assert_eq!(
            wait_for(u64::MAX, u64::MAX, Duration::ZERO),
            Duration::from_secs(1)
        );
        assert_eq!(wait_for(1, u64::MAX, Duration::MAX), Duration::ZERO);
        assert_eq!(wait_for(0, u64::MAX, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_cancel_stops_the_copy_at_its_next_frame_even_while_it_waits_for_the_limit() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut f = Flow::new(flag.clone(), Some(1));
        assert!(f.before_send(4 * MIB).is_ok());
        // The next frame is due in 4 s; the cancel comes after 100 ms.
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            flag.store(true, Ordering::Release);
        });
        let t = Instant::now();
        let e = f.before_send(1).unwrap_err();
        setter.join().unwrap();
        assert_eq!(e.code, Some(ErrorCode::Cancelled));
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        // Called off it stays.
        assert!(f.before_send(1).is_err());
    }

    #[test]
    fn a_speed_of_zero_is_no_limit_and_the_last_pass_cannot_be_cancelled() {
        let mut f = Flow::new(Arc::default(), Some(0));
        assert!(f.pace.is_none());
        f.before_send(u64::MAX).unwrap();
        let last = Flow::unlimited();
        assert!(last.pace.is_none() && !last.is_cancelled());
    }
}
