//! How fast a migration's copy goes while the guest runs (the operator's
//! `speed_mib_s`, so the hosts' link keeps room for their other traffic)
//! and whether the operator called it off (`migrate-cancel`). The copy
//! looks at both before each frame (at most [`MAX_RUN`] bytes) and each
//! piece it reads, sent or not; a cancel also shuts the connection down,
//! so a write blocked on a stalled target ends at once. The last pass,
//! with the guest stopped, goes as fast as it can and can no longer be
//! called off (every millisecond of it is downtime).
//!
//! [`MAX_RUN`]: super::wire::MAX_RUN

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use protocol::{ControlError, ErrorCode};

/// The longest single sleep while the copy waits for its speed limit: a
/// cancel is noticed within it.
const NAP: Duration = Duration::from_millis(50);

/// What `migrate-cancel` reaches of one running migration.
#[derive(Debug, Default)]
pub struct Cancel {
    set: AtomicBool,
    /// The migration's connection (a clone), once made.
    conn: Mutex<Option<TcpStream>>,
}

impl Cancel {
    /// Calls the migration off: the flag first, then the connection.
    pub fn cancel(&self) {
        self.set.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.conn).as_ref() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// The migration's connection, to be shut down by a cancel; at once if
    /// one came before it was made. (Stored, then the flag read; the
    /// cancel sets the flag, then reads the store: one of them sees the
    /// other.)
    fn watch(&self, conn: &TcpStream) {
        let mut held = lock(&self.conn);
        match conn.try_clone() {
            Ok(c) => *held = Some(c),
            Err(e) => tracing::debug!("migration: cannot keep its connection for a cancel: {e}"),
        }
        drop(held);
        if self.is_set() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

/// What the operator asked of a running migration's copy.
pub struct Flow {
    cancel: Arc<Cancel>,
    pace: Option<Pace>,
}

/// A speed limit as a schedule: `next` (since `began`) is the earliest
/// the next bytes may go, each frame pushing it on by its own time at
/// `bytes_per_s`. A frame sent late starts the schedule again from its
/// own time: a slow spell of the link is not made up for with a burst.
struct Pace {
    bytes_per_s: u64,
    began: Option<Instant>,
    next: Duration,
}

/// How long `n` bytes take at `bytes_per_s` (> 0).
fn time_of(n: u64, bytes_per_s: u64) -> Duration {
    // The remainder's share of a second is under 1e9 ns: it fits a u64.
    let part = u128::from(n % bytes_per_s) * 1_000_000_000 / u128::from(bytes_per_s);
    Duration::from_secs(n / bytes_per_s)
        .saturating_add(Duration::from_nanos(u64::try_from(part).unwrap_or(0)))
}

/// For `n` bytes about to go at `now` (since the start) on a schedule
/// whose next slot is `next`: how long to wait first, and the slot after
/// them.
fn schedule(next: Duration, now: Duration, n: u64, bytes_per_s: u64) -> (Duration, Duration) {
    if bytes_per_s == 0 {
        return (Duration::ZERO, next);
    }
    let wait = next.saturating_sub(now);
    (wait, next.max(now).saturating_add(time_of(n, bytes_per_s)))
}

/// The error a cancelled migration answers with.
pub fn cancelled() -> ControlError {
    ControlError::new(
        ErrorCode::Cancelled,
        "migration cancelled by the operator: the guest runs on here",
    )
}

impl Flow {
    /// `speed_mib_s` of `migrate` (0 or none: no limit), and what
    /// `migrate-cancel` sets.
    pub fn new(cancel: Arc<Cancel>, speed_mib_s: Option<u64>) -> Self {
        let pace = speed_mib_s.filter(|&s| s > 0).map(|s| Pace {
            bytes_per_s: s.saturating_mul(1 << 20),
            began: None,
            next: Duration::ZERO,
        });
        Self { cancel, pace }
    }

    /// Neither limited nor to be called off: the last pass.
    pub fn unlimited() -> Self {
        Self::new(Arc::default(), None)
    }

    /// Whether the operator called the migration off.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_set()
    }

    /// The migration's connection, for a cancel to shut down.
    pub fn watch(&self, conn: &TcpStream) {
        self.cancel.watch(conn);
    }

    /// An error once the migration was called off.
    pub fn check(&self) -> Result<(), ControlError> {
        if self.is_cancelled() {
            return Err(cancelled());
        }
        Ok(())
    }

    /// `e`, or [`cancelled`] if the operator called the migration off (a
    /// cancel shuts the connection down: the error that follows is its).
    pub fn or_cancelled(&self, e: ControlError) -> ControlError {
        if self.is_cancelled() {
            cancelled()
        } else {
            e
        }
    }

    /// Before `n` more bytes go out: an error once the migration was
    /// called off; otherwise waits as long as the speed limit asks.
    pub fn before_send(&mut self, n: u64) -> Result<(), ControlError> {
        self.check()?;
        let cancel = &self.cancel;
        let Some(p) = &mut self.pace else {
            return Ok(());
        };
        let began = *p.began.get_or_insert_with(Instant::now);
        let (mut wait, next) = schedule(p.next, began.elapsed(), n, p.bytes_per_s);
        while !wait.is_zero() {
            std::thread::sleep(wait.min(NAP));
            if cancel.is_set() {
                return Err(cancelled());
            }
            wait = p.next.saturating_sub(began.elapsed());
        }
        p.next = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const S: Duration = Duration::from_secs(1);

    #[test]
    fn each_frame_waits_for_the_time_the_one_before_it_takes_at_the_limit() {
        // 2 MiB/s: a 3 MiB frame at 0 s, the next may go at 1.5 s.
        let (w, next) = schedule(Duration::ZERO, Duration::ZERO, 3 * MIB, 2 * MIB);
        assert_eq!((w, next), (Duration::ZERO, S * 3 / 2));
        let (w, next) = schedule(next, S / 2, MIB, 2 * MIB);
        assert_eq!((w, next), (S, 2 * S));
    }

    #[test]
    fn a_slow_spell_of_the_link_is_not_made_up_for_with_a_burst() {
        // 1 MiB/s; the first frame was due to let the next go at 1 s, but
        // the link held it until 9 s: the next goes at once, the one after
        // waits its whole second again.
        let (w, next) = schedule(S, 9 * S, MIB, MIB);
        assert_eq!((w, next), (Duration::ZERO, 10 * S));
        let (w, _) = schedule(next, 9 * S + S / 100, MIB, MIB);
        assert_eq!(w, S - S / 100);
    }

    #[test]
    fn huge_counts_and_rates_neither_overflow_nor_panic() {
        assert_eq!(time_of(u64::MAX, u64::MAX), S);
        let (w, next) = schedule(Duration::MAX, Duration::ZERO, u64::MAX, 1);
        assert_eq!((w, next), (Duration::MAX, Duration::MAX));
        assert_eq!(
            schedule(S, Duration::ZERO, u64::MAX, 0),
            (Duration::ZERO, S)
        );
    }

    #[test]
    fn a_cancel_stops_the_copy_at_its_next_frame_even_while_it_waits_for_the_limit() {
        let cancel = Arc::new(Cancel::default());
        let mut f = Flow::new(cancel.clone(), Some(1));
        assert!(f.before_send(3600 * MIB).is_ok());
        // The next frame is due in an hour; the cancel comes meanwhile.
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            cancel.cancel();
        });
        let e = f.before_send(1).unwrap_err();
        setter.join().unwrap();
        assert_eq!(e.code, Some(ErrorCode::Cancelled));
        // Called off it stays, and any error after it reads as the cancel.
        assert!(f.before_send(1).is_err());
        let other = ControlError::new(ErrorCode::HostError, "broken pipe");
        assert_eq!(f.or_cancelled(other).code, Some(ErrorCode::Cancelled));
    }

    #[test]
    fn a_cancel_shuts_the_connection_down_before_or_after_it_is_made() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for early in [false, true] {
            let cancel = Cancel::default();
            let conn = TcpStream::connect(addr).unwrap();
            let (mut peer, _) = l.accept().unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            if early {
                cancel.cancel();
            }
            cancel.watch(&conn);
            if !early {
                cancel.cancel();
            }
            // The peer sees the end of the stream: no byte will come.
            let mut b = [0u8; 1];
            assert_eq!(std::io::Read::read(&mut peer, &mut b).unwrap(), 0);
        }
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
