//! Auto-converge: slowing a migrating guest's vCPUs down until the copy
//! catches up with what the guest writes (`migrate`'s `auto_converge`).
//!
//! A guest that dirties memory faster than the link carries it never gets
//! under the last pass's threshold: after the passes run out it is stopped
//! for whatever is left, and a long downtime follows (or the final phase's
//! deadline fails the migration). Taking a share of its vCPUs' time slows
//! the rate at which it writes, as QEMU's auto-converge does.
//!
//! - [`Converge`] is the policy, pure: after each pass, the throttle for the
//!   next one.
//! - [`Throttle`] applies it to one machine: every vCPU, once kicked out of
//!   the guest, naps for its share ([`nap`]) before it enters again; a
//!   kicker thread (`throttle`, under a seccomp filter of what every
//!   thread needs: it sleeps and signals), alive only while the throttle
//!   is above 0, kicks each
//!   vCPU once per slice and nap ([`period`]), so a vCPU runs about one
//!   [`SLICE`] between naps. A nap waits on the vCPU's own control, so a
//!   pause or an exit ends it at once.
//!
//! Throttling slows a rate of writes. A guest that rewrites the same range
//! within every pass finds it all dirty whatever its speed; no throttle
//! helps it, and its migration ends as one without.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use devices::bus::lock;

/// How long a throttled vCPU runs between naps.
pub const SLICE: Duration = Duration::from_millis(10);
/// The first throttle, after two passes running that fell behind.
pub const INITIAL_PCT: u8 = 20;
/// Added after each further pass that fell behind.
pub const STEP_PCT: u8 = 10;
/// The most taken: the guest keeps 1 % of its time.
pub const MAX_PCT: u8 = 99;

/// How long a vCPU naps after each [`SLICE`] at `pct` percent.
pub fn nap(pct: u8) -> Duration {
    let pct = u32::from(pct.min(MAX_PCT));
    SLICE * pct / (100 - pct)
}

/// How often each vCPU is kicked at `pct`: one slice and one nap.
pub fn period(pct: u8) -> Duration {
    SLICE + nap(pct)
}

/// The policy: a pass "falls behind" when what the guest wrote meanwhile
/// (`left`, what the next pass must send) is more than half of what it
/// sent, and more than the stop threshold. Two such passes running start
/// the throttle at [`INITIAL_PCT`]; each further one adds [`STEP_PCT`], up
/// to [`MAX_PCT`]. A pass that keeps up leaves the throttle as it is (the
/// rate it holds down would come back without it).
#[derive(Debug, Default, Clone)]
pub struct Converge {
    pct: u8,
    behind: u32,
    peak: u8,
}

impl Converge {
    /// After a pass that sent `sent` bytes and left `left`, where `small`
    /// or less stops the guest for the last pass: the throttle from now on.
    pub fn after_pass(&mut self, sent: u64, left: u64, small: u64) -> u8 {
        if left <= small || left <= sent / 2 {
            self.behind = 0;
            return self.pct;
        }
        self.behind = self.behind.saturating_add(1);
        if self.pct > 0 {
            self.pct = self.pct.saturating_add(STEP_PCT).min(MAX_PCT);
        } else if self.behind >= 2 {
            self.pct = INITIAL_PCT;
        }
        self.peak = self.peak.max(self.pct);
        self.pct
    }

    /// The most the policy has asked for.
    pub fn peak(&self) -> u8 {
        self.peak
    }
}

/// One machine's throttle, shared by its vCPU threads and whoever sets it.
#[derive(Default)]
pub struct Throttle {
    pct: AtomicU8,
    /// The vCPU threads' ids (the kicker's `tgkill` targets).
    tids: Mutex<Vec<libc::pid_t>>,
    /// Whether a kicker thread runs.
    kicking: Mutex<bool>,
}

/// A vCPU thread's place among a [`Throttle`]'s kick targets; dropping it
/// (the thread ends) removes it.
pub struct Registered {
    throttle: Arc<Throttle>,
    tid: libc::pid_t,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.throttle.tids).retain(|t| *t != self.tid);
    }
}

impl Throttle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The share of the vCPUs' time taken now, in percent.
    pub fn pct(&self) -> u8 {
        self.pct.load(Ordering::SeqCst)
    }

    /// Takes `pct` percent (0: none, at most [`MAX_PCT`]) of the vCPUs' time
    /// from now on; starts the kicker if it does not run. A kicker that
    /// cannot be started leaves the vCPUs unthrottled (the reason comes
    /// back): the migration goes on as one without.
    pub fn set(self: &Arc<Self>, pct: u8) -> std::io::Result<()> {
        self.pct.store(pct.min(MAX_PCT), Ordering::SeqCst);
        if pct == 0 {
            return Ok(());
        }
        let mut kicking = lock(&self.kicking);
        if *kicking {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        let started = crate::spawner::spawn("throttle".into(), move || {
            crate::seccomp::install(crate::seccomp::Kind::Throttle);
            kick_while_throttled(&weak);
        });
        match started {
            Ok(_) => {
                *kicking = true;
                Ok(())
            }
            Err(e) => {
                self.pct.store(0, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Adds the calling vCPU thread to the kick targets.
    pub fn register(self: &Arc<Self>) -> Registered {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        lock(&self.tids).push(tid);
        Registered {
            throttle: self.clone(),
            tid,
        }
    }

    /// For a vCPU kicked out of the guest: how long to stay out.
    pub fn nap(&self) -> Option<Duration> {
        match self.pct() {
            0 => None,
            p => Some(nap(p)),
        }
    }
}

/// The kicker thread: kicks every registered vCPU once per [`period`]
/// while the throttle is above 0 and its machine lives, then ends.
fn kick_while_throttled(weak: &Weak<Throttle>) {
    loop {
        let Some(t) = weak.upgrade() else {
            return;
        };
        let pct = {
            // Read under `kicking`, which `set` takes after it stores a new
            // percentage: a `set` that found this thread running is seen.
            let mut kicking = lock(&t.kicking);
            let pct = t.pct();
            if pct == 0 {
                *kicking = false;
                return;
            }
            pct
        };
        {
            // Under the lock: a vCPU thread takes itself off the list
            // before it ends, so every tid here is still its thread's.
            let tids = lock(&t.tids);
            for &tid in tids.iter() {
                crate::vcpu::kick_thread(tid);
            }
        }
        drop(t);
        std::thread::sleep(period(pct));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const SMALL: u64 = 4 * MIB;

    #[test]
    fn a_nap_leaves_the_vcpu_one_slice_in_every_period_at_each_percentage() {
        assert_eq!(nap(0), Duration::ZERO);
        assert_eq!(nap(20), Duration::from_micros(2500));
        assert_eq!(nap(50), SLICE);
        assert_eq!(nap(90), SLICE * 9);
        assert_eq!(nap(99), SLICE * 99);
        // Beyond the maximum is the maximum, never a division by zero.
        assert_eq!(nap(100), nap(MAX_PCT));
        assert_eq!(nap(255), nap(MAX_PCT));
        for p in [20u8, 50, 90] {
            let run = SLICE.as_secs_f64() / period(p).as_secs_f64();
            assert!(
                (run - f64::from(100 - p) / 100.0).abs() < 1e-9,
                "{p}: {run}"
            );
        }
    }

    #[test]
    fn two_passes_behind_start_the_throttle_and_each_further_one_raises_it() {
        let mut c = Converge::default();
        // The first pass sends everything; a little is dirty after it.
        assert_eq!(c.after_pass(64 * MIB, 16 * MIB, SMALL), 0);
        assert_eq!(c.after_pass(16 * MIB, 16 * MIB, SMALL), 0);
        assert_eq!(c.after_pass(16 * MIB, 16 * MIB, SMALL), INITIAL_PCT);
        assert_eq!(c.after_pass(16 * MIB, 12 * MIB, SMALL), 30);
        assert_eq!(c.after_pass(12 * MIB, 10 * MIB, SMALL), 40);
        // Keeping up (under half of what went) holds it.
        assert_eq!(c.after_pass(10 * MIB, 5 * MIB, SMALL), 40);
        assert_eq!(c.after_pass(5 * MIB, 2 * MIB, SMALL), 40);
        assert_eq!(c.peak(), 40);
    }

    #[test]
    fn a_pass_that_keeps_up_between_two_behind_starts_the_count_again() {
        let mut c = Converge::default();
        assert_eq!(c.after_pass(16 * MIB, 16 * MIB, SMALL), 0);
        assert_eq!(c.after_pass(16 * MIB, 6 * MIB, SMALL), 0);
        assert_eq!(c.after_pass(6 * MIB, 6 * MIB, SMALL), 0);
        assert_eq!(c.after_pass(6 * MIB, 6 * MIB, SMALL), INITIAL_PCT);
    }

    #[test]
    fn a_small_enough_remainder_is_never_behind_whatever_the_ratio() {
        let mut c = Converge::default();
        for _ in 0..5 {
            assert_eq!(c.after_pass(MIB, 3 * MIB, SMALL), 0);
        }
        assert_eq!(c.peak(), 0);
    }

    #[test]
    fn the_throttle_stops_at_its_maximum() {
        let mut c = Converge::default();
        let mut last = 0;
        for _ in 0..100 {
            last = c.after_pass(MIB * 8, MIB * 8, SMALL);
        }
        assert_eq!(last, MAX_PCT);
        assert_eq!(c.peak(), MAX_PCT);
    }

    #[test]
    fn a_registered_thread_is_a_kick_target_until_its_guard_goes() {
        let t = Throttle::new();
        let r = t.register();
        assert_eq!(lock(&t.tids).len(), 1);
        assert_eq!(t.nap(), None);
        drop(r);
        assert!(lock(&t.tids).is_empty());
    }

    #[test]
    fn the_kicker_ends_once_the_throttle_is_back_at_zero() {
        let t = Throttle::new();
        t.set(50).unwrap();
        assert_eq!(t.nap(), Some(SLICE));
        assert!(*lock(&t.kicking));
        t.set(0).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while *lock(&t.kicking) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!*lock(&t.kicking), "the kicker still runs");
        assert_eq!(t.nap(), None);
        // And starts again when asked.
        t.set(20).unwrap();
        assert!(*lock(&t.kicking));
        t.set(0).unwrap();
    }
}
