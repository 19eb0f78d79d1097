//! A disk's I/O limits: at most `iops` requests and `mib_s` MiB a second
//! (`--disk ...,iops=N,mib_s=N`, or `set-disk` while it runs), what a
//! hosting operator sells as a disk's tier and what keeps one customer's
//! disk from crowding the others' on a shared host.
//!
//! Two token buckets, one per limit, each holding one second's worth and
//! filling at its rate. A request is let through when the request bucket
//! has a token and the byte bucket is not in debt; its data's bytes are
//! charged once it is parsed (what the disk will really move, read once
//! from guest memory: a chain's declared lengths are neither trusted nor
//! read twice), which may put the byte bucket in debt that the next
//! requests wait out, so any request size goes at the set rate on average.
//! A request the buckets hold back is not taken at all: the disk's thread
//! puts its chain back on the avail ring (`go_to_previous_position`) and
//! sleeps until the buckets will have it (a timer), so nothing is lost,
//! reordered or held half-served, and a snapshot or a migration at that
//! moment finds the request still the guest's.
//!
//! The limits live in a [`ThrottleControl`] that the control socket sets
//! without the device's lock; setting them wakes the disk's thread (an
//! eventfd), which takes them up at once. No limit (0, the default) costs
//! one branch per request.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;

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

    /// How long until the bucket holds `n` tokens (zero: now).
    fn wait_for(&self, n: f64) -> Duration {
        if self.tokens >= n {
            return Duration::ZERO;
        }
        // At least a microsecond, so that a timer armed with it fires.
        Duration::from_secs_f64(((n - self.tokens) / self.rate).max(1e-6))
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

    #[cfg(test)]
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

    /// Lets a request through (takes its token), or says how long until
    /// one could go: the request bucket needs a token, the byte bucket
    /// must be out of debt. Nothing is taken when it says wait.
    pub fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (b, need) in [(&mut self.ops, 1.0), (&mut self.bytes, 0.0)] {
            if let Some(b) = b {
                b.refill(now);
                wait = wait.max(b.wait_for(need));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.ops {
            b.tokens -= 1.0;
        }
        Ok(())
    }

    /// Charges the data of a request let through, once parsed: the byte
    /// bucket may go into debt.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.tokens -= bytes as f64;
        }
    }
}

/// A disk's limits, set from another thread (`set-disk`) without the
/// device's lock: setting them wakes the disk's thread ([`Self::wake`],
/// which its event loop watches), which takes them up at once.
#[derive(Clone, Debug)]
pub struct ThrottleControl(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    limits: Mutex<Limits>,
    /// Bumped by every `set`: the disk's thread locks `limits` only when
    /// it moved.
    generation: AtomicU64,
    wake: EventFd,
}

impl ThrottleControl {
    pub fn new(limits: Limits) -> io::Result<Self> {
        let c = ThrottleControl(Arc::new(Shared {
            limits: Mutex::new(Limits::default()),
            generation: AtomicU64::new(0),
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        }));
        c.set(limits);
        Ok(c)
    }

    /// Sets both limits (`iops` clamped to [`MAX_IOPS`]) and wakes the
    /// disk's thread.
    pub fn set(&self, limits: Limits) {
        *lock(&self.0.limits) = Limits {
            iops: limits.iops.min(MAX_IOPS),
            ..limits
        };
        self.0.generation.fetch_add(1, Ordering::Release);
        // A full counter (2^64 - 2 writes unread) still wakes the thread.
        let _ = self.0.wake.write(1);
    }

    pub fn get(&self) -> Limits {
        *lock(&self.0.limits)
    }

    /// How many times the limits were set (the disk's thread compares).
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Written by every `set`.
    pub fn wake(&self) -> &EventFd {
        &self.0.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits(iops: u64, bytes_per_s: u64) -> Limits {
        Limits { iops, bytes_per_s }
    }

    #[test]
    fn no_limits_let_every_request_through_at_once() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Limits::default(), t0);
        assert!(!t.limited());
        for _ in 0..100_000 {
            assert_eq!(t.admit(t0), Ok(()));
            t.charge(1 << 30);
        }
    }

    #[test]
    fn an_iops_limit_lets_a_seconds_worth_through_at_once_then_one_per_interval() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limits(100, 0), t0);
        for _ in 0..100 {
            assert_eq!(t.admit(t0), Ok(()));
        }
        let wait = t.admit(t0).unwrap_err();
        assert!(wait > 9 * MS && wait <= 10 * MS, "{wait:?}");
        // A refusal takes nothing: the wait does not grow.
        assert_eq!(t.admit(t0).unwrap_err(), wait);
        assert_eq!(t.admit(t0 + 10 * MS), Ok(()));
        assert!(t.admit(t0 + 10 * MS).is_err());
        // Long idle: a full second's worth again, and no more.
        let t1 = t0 + Duration::from_secs(5);
        for _ in 0..100 {
            assert_eq!(t.admit(t1), Ok(()));
        }
        assert!(t.admit(t1).is_err());
    }

    #[test]
    fn a_request_larger_than_the_byte_bucket_goes_and_the_next_waits_out_the_debt() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limits(0, 1 << 20), t0);
        // 4 MiB against a full 1 MiB/s bucket: through, then 3 MiB of
        // debt, which the next request waits out.
        assert_eq!(t.admit(t0), Ok(()));
        t.charge(4 << 20);
        let wait = t.admit(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(2999) && wait < Duration::from_millis(3001),
            "{wait:?}"
        );
        assert_eq!(t.admit(t0 + wait), Ok(()));
    }

    #[test]
    fn both_limits_must_let_a_request_through_and_the_longer_wait_is_given() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limits(1000, 1 << 20), t0);
        // 1 MiB of data in 256 requests, then one more byte: the byte
        // bucket is in debt before the request bucket runs dry.
        for _ in 0..256 {
            assert_eq!(t.admit(t0), Ok(()));
            t.charge(4096);
        }
        assert_eq!(t.admit(t0), Ok(()), "out of tokens is not in debt");
        t.charge(1);
        let wait = t.admit(t0).unwrap_err();
        assert!(wait < 2 * MS, "{wait:?}");
        assert_eq!(t.limits().iops, 1000);
        let mut t = Throttle::new(limits(1, 1 << 30), t0);
        assert_eq!(t.admit(t0), Ok(()));
        assert!(
            t.admit(t0).unwrap_err() > 999 * MS,
            "the request bucket's wait"
        );
    }

    #[test]
    fn a_changed_limit_starts_full_and_an_unchanged_one_keeps_its_debt() {
        let t0 = Instant::now();
        let mut t = Throttle::new(limits(10, 1 << 20), t0);
        assert_eq!(t.admit(t0), Ok(()));
        t.charge(8 << 20);
        assert!(t.admit(t0).is_err(), "in byte debt");
        // A higher iops limit: the byte debt stays.
        t.set(limits(20, 1 << 20), t0);
        assert!(t.admit(t0).is_err());
        // The byte limit lifted: requests go at once.
        t.set(limits(20, 0), t0);
        assert_eq!(t.admit(t0), Ok(()));
        t.set(Limits::default(), t0);
        assert!(!t.limited());
    }

    #[test]
    fn the_control_clamps_iops_wakes_the_disk_and_a_clone_sees_what_was_set() {
        let c = ThrottleControl::new(limits(u64::MAX, 7)).unwrap();
        let seen = c.clone();
        let g = seen.generation();
        assert_eq!(seen.get(), limits(MAX_IOPS, 7));
        // Drain what `new` wrote.
        let _ = seen.wake().read();
        c.set(Limits::default());
        assert!(!seen.get().any());
        assert!(seen.generation() > g);
        assert_eq!(seen.wake().read().unwrap(), 1, "the disk's thread is woken");
    }
}
