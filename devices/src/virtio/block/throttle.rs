//! A disk's I/O limits: at most `iops` requests and `mib_s` MiB a second
//! (`--disk ...,iops=N,mib_s=N`, or `set-disk` while it runs), what a
//! hosting operator sells as a disk's tier and what keeps one customer's
//! disk from crowding the others' on a shared host.
//!
//! Two token buckets, one per limit, each holding one second's worth and
//! filling at its rate: a request takes one token from the first and its
//! data's bytes from the second, both or neither. A request the buckets
//! cannot take now is not taken at all: the disk's thread puts its chain
//! back on the avail ring (`go_to_previous_position`) and sleeps until the
//! buckets will have it (a timer), so nothing is lost, reordered or held
//! half-served, and a snapshot or a migration at that moment finds the
//! request still the guest's. A request larger than a whole bucket goes
//! once the bucket is full and leaves it in debt, which later requests
//! wait out, so any request size gets through at the set rate.
//!
//! The limits live in a [`ThrottleControl`] (two atomics) that the control
//! socket sets without the device's lock; the disk's thread takes them up
//! at its next wake-up. No limit (0, the default) costs one branch per
//! request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most requests a second a disk may be limited to (more is no limit
/// in practice).
pub const MAX_IOPS: u64 = 10_000_000;

/// A disk's limits; 0 is none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests a second.
    pub iops: u64,
    /// Bytes of data a second.
    pub bytes_per_s: u64,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.iops > 0 || self.bytes_per_s > 0
    }
}

/// One limit's bucket: up to a second's worth of tokens, refilled at `rate`
/// a second; it may go into debt (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate as f64;
        Bucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.last = now;
    }

    /// How long until `n` tokens can be taken (zero: now). A request larger
    /// than the bucket needs the bucket full.
    fn wait_for(&self, n: f64) -> Duration {
        let need = n.min(self.rate);
        if self.tokens >= need {
            return Duration::ZERO;
        }
        // At least a microsecond, so that a timer armed with it fires.
        Duration::from_secs_f64(((need - self.tokens) / self.rate).max(1e-6))
    }
}

/// The disk thread's buckets for the current [`Limits`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Throttle {
    limits: Limits,
    ops: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Throttle {
    /// Buckets for `limits`, full.
    pub fn new(limits: Limits, now: Instant) -> Throttle {
        Throttle {
            limits,
            ops: (limits.iops > 0).then(|| Bucket::new(limits.iops, now)),
            bytes: (limits.bytes_per_s > 0).then(|| Bucket::new(limits.bytes_per_s, now)),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether requests are counted at all.
    pub fn limited(&self) -> bool {
        self.limits.any()
    }

    /// New limits: a changed one starts again with a full bucket, an
    /// unchanged one keeps its state.
    pub fn set(&mut self, limits: Limits, now: Instant) {
        if limits.iops != self.limits.iops {
            self.ops = (limits.iops > 0).then(|| Bucket::new(limits.iops, now));
        }
        if limits.bytes_per_s != self.limits.bytes_per_s {
            self.bytes = (limits.bytes_per_s > 0).then(|| Bucket::new(limits.bytes_per_s, now));
        }
        self.limits = limits;
    }

    /// Takes a request of `bytes` of data, or says how long until it could
    /// be taken (nothing is taken then).
    pub fn admit(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (b, n) in [(&mut self.ops, 1.0), (&mut self.bytes, bytes as f64)] {
            if let Some(b) = b {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.ops {
            b.tokens -= 1.0;
        }
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
        Ok(())
    }
}

/// A disk's limits, set from another thread (`set-disk`) without the
/// device's lock; the disk's thread reads them at each wake-up.
#[derive(Clone, Debug, Default)]
pub struct ThrottleControl(Arc<[AtomicU64; 2]>);

impl ThrottleControl {
    pub fn new(limits: Limits) -> Self {
        let c = ThrottleControl::default();
        c.set(limits);
        c
    }

    /// Sets both limits (`iops` clamped to [`MAX_IOPS`]).
    pub fn set(&self, limits: Limits) {
        self.0[0].store(limits.iops.min(MAX_IOPS), Ordering::Relaxed);
        self.0[1].store(limits.bytes_per_s, Ordering::Relaxed);
    }

    pub fn get(&self) -> Limits {
        Limits {
            iops: self.0[0].load(Ordering::Relaxed),
            bytes_per_s: self.0[1].load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_limits_take_every_request_at_once() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Limits::default(), t0);
        assert!(!t.limited());
        for _ in 0..100_000 {
            assert_eq!(t.admit(1 << 30, t0), Ok(()));
        }
    }

    #[test]
    fn an_iops_limit_takes_a_seconds_worth_at_once_then_one_per_interval() {
        let t0 = Instant::now();
        let mut t = Throttle::new(
            Limits {
                iops: 100,
                bytes_per_s: 0,
            },
            t0,
        );
        for _ in 0..100 {
            assert_eq!(t.admit(4096, t0), Ok(()));
        }
        let wait = t.admit(4096, t0).unwrap_err();
        assert!(wait > 9 * MS && wait <= 10 * MS, "{wait:?}");
        // Refused requests take nothing: the wait does not grow.
        assert_eq!(t.admit(4096, t0).unwrap_err(), wait);
        assert_eq!(t.admit(4096, t0 + 10 * MS), Ok(()));
        assert!(t.admit(4096, t0 + 10 * MS).is_err());
        // One second later, a full second's worth again, and no more.
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..100 {
            assert_eq!(t.admit(4096, t1), Ok(()));
        }
        assert!(t.admit(4096, t1).is_err());
    }

    #[test]
    fn a_request_larger_than_the_byte_bucket_goes_when_it_is_full_and_the_next_waits_out_the_debt()
    {
        let t0 = Instant::now();
        let mut t = Throttle::new(
            Limits {
                iops: 0,
                bytes_per_s: 1 << 20,
            },
            t0,
        );
        // 4 MiB against a full 1 MiB/s bucket: taken, 3 MiB of debt, which
        // the next request waits out (plus its own 4 KiB).
        assert_eq!(t.admit(4 << 20, t0), Ok(()));
        let wait = t.admit(4096, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(3000) && wait < Duration::from_millis(3010),
            "{wait:?}"
        );
        assert_eq!(t.admit(4096, t0 + wait), Ok(()));
    }

    #[test]
    fn both_limits_must_have_room_and_the_longer_wait_is_given() {
        let t0 = Instant::now();
        let mut t = Throttle::new(
            Limits {
                iops: 1000,
                bytes_per_s: 1 << 20,
            },
            t0,
        );
        // 1 MiB of data in 256 requests: the byte bucket runs dry first.
        for _ in 0..256 {
            assert_eq!(t.admit(4096, t0), Ok(()));
        }
        let wait = t.admit(4096, t0).unwrap_err();
        assert!(wait > 3 * MS && wait < 5 * MS, "{wait:?}");
        assert_eq!(t.limits().iops, 1000);
    }

    #[test]
    fn a_changed_limit_starts_full_and_an_unchanged_one_keeps_its_debt() {
        let t0 = Instant::now();
        let lim = Limits {
            iops: 10,
            bytes_per_s: 1 << 20,
        };
        let mut t = Throttle::new(lim, t0);
        assert_eq!(t.admit(8 << 20, t0), Ok(()));
        assert!(t.admit(0, t0).is_err(), "in byte debt");
        // A higher iops limit: the byte debt stays.
        t.set(Limits { iops: 20, ..lim }, t0);
        assert!(t.admit(0, t0).is_err());
        // The byte limit lifted: requests go at once.
        t.set(
            Limits {
                iops: 20,
                bytes_per_s: 0,
            },
            t0,
        );
        assert_eq!(t.admit(0, t0), Ok(()));
        t.set(Limits::default(), t0);
        assert!(!t.limited());
    }

    #[test]
    fn the_control_clamps_iops_and_a_clone_sees_what_was_set() {
        let c = ThrottleControl::new(Limits {
            iops: u64::MAX,
            bytes_per_s: 7,
        });
        let seen = c.clone();
        assert_eq!(
            seen.get(),
            Limits {
                iops: MAX_IOPS,
                bytes_per_s: 7
            }
        );
        c.set(Limits::default());
        assert!(!seen.get().any());
    }
}
