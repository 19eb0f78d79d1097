//! ib700 watchdog: port writes and reads through its `BusDevice`, the guest
//! clock moving (forwards, by any amount), expiry checks and resets.
//!
//! Checks against a model of the documented behaviour: a one-byte write of
//! `v` to 0x443 arms the timer for `30 - 2 * (v & 0xf)` seconds from now
//! (saturating), any one-byte write to 0x441 stops it, nothing else changes
//! it; the deadline hook sees every change; `check_expired` fires exactly
//! once per deadline reached, with one `WatchdogExpired` event; the status
//! snapshot agrees (armed, timeout, seconds left rounded up, expiries);
//! reads are all ones.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use devices::legacy::ib700::{timeout_secs, START_OFFSET, STOP_OFFSET};
use devices::legacy::Ib700Device;
use devices::{BusDevice, GuestEvent};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::RecordingSink;

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        offset: u8,
        data: Vec<u8>,
    },
    Read {
        offset: u8,
        len: u8,
    },
    /// Guest time passes: nanoseconds, or whole seconds.
    Advance {
        nanos: u32,
        secs: u16,
    },
    /// Far into the future (saturating deadlines).
    Jump(u64),
    Check,
    Reset,
    Status,
}

fuzz_target!(|ops: Vec<Op>| {
    // Guest time as seconds and nanoseconds.
    let clock = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let now = {
        let c = clock.clone();
        move || {
            Duration::new(
                c.0.load(Ordering::SeqCst),
                c.1.load(Ordering::SeqCst) as u32,
            )
        }
    };
    let hook_seen: Arc<Mutex<Vec<Option<Duration>>>> = Arc::default();
    let sink = Arc::new(RecordingSink::default());
    let mut dev = {
        let now = now.clone();
        let seen = hook_seen.clone();
        Ib700Device::new(
            Arc::new(now),
            Box::new(move |d| seen.lock().unwrap().push(d)),
        )
        .with_event_sink(sink.clone())
    };
    let mut deadline: Option<Duration> = None;
    let mut timeout: Option<u32> = None;
    let mut expiries = 0u64;
    for op in ops {
        match op {
            Op::Write { offset, data } => {
                let offset = u64::from(offset % 4);
                let data = &data[..data.len().min(4)];
                dev.write(offset, data);
                let hooked = std::mem::take(&mut *hook_seen.lock().unwrap());
                match (offset, data) {
                    (STOP_OFFSET, &[_]) => deadline = None,
                    (START_OFFSET, &[v]) => {
                        let secs = timeout_secs(v);
                        assert!(secs <= 30 && secs & 1 == 0);
                        timeout = Some(secs);
                        deadline = Some(
                            now()
                                .checked_add(Duration::from_secs(secs.into()))
                                .unwrap_or(Duration::MAX),
                        );
                    }
                    _ => {
                        assert!(hooked.is_empty(), "ignored write told the timer");
                        assert_eq!(dev.deadline(), deadline);
                        continue;
                    }
                }
                assert_eq!(hooked, vec![deadline], "hook after a write");
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; usize::from(len % 9)];
                dev.read(u64::from(offset % 4), &mut buf);
                assert!(buf.iter().all(|&b| b == 0xff));
            }
            Op::Advance { nanos, secs } => {
                // Carry nanoseconds into seconds, never past the end of time.
                let t = now()
                    .checked_add(Duration::new(u64::from(secs), nanos % 1_000_000_000))
                    .unwrap_or(Duration::MAX);
                clock.0.store(t.as_secs(), Ordering::SeqCst);
                clock.1.store(u64::from(t.subsec_nanos()), Ordering::SeqCst);
            }
            Op::Jump(s) => {
                let s = s.max(clock.0.load(Ordering::SeqCst));
                clock.0.store(s, Ordering::SeqCst);
            }
            Op::Check => {
                let due = deadline.is_some_and(|d| now() >= d);
                assert_eq!(dev.check_expired(), due, "expiry at {:?}", now());
                if due {
                    deadline = None;
                    expiries += 1;
                    assert_eq!(sink.take(), vec![GuestEvent::WatchdogExpired]);
                }
            }
            Op::Reset => {
                dev.reset();
                deadline = None;
                timeout = None;
                let hooked = std::mem::take(&mut *hook_seen.lock().unwrap());
                assert_eq!(hooked, vec![None]);
            }
            Op::Status => {
                let s = dev.status();
                assert_eq!(s.armed, deadline.is_some());
                assert_eq!(s.timeout_s, timeout);
                assert_eq!(s.expiries, expiries);
                let left = deadline.map(|d| d.saturating_sub(now()));
                assert_eq!(dev.time_left(), left);
                assert_eq!(
                    s.seconds_left,
                    left.map(|l| l.as_secs() + u64::from(l.subsec_nanos() > 0))
                );
            }
        }
        assert_eq!(dev.deadline(), deadline);
        assert!(sink.take().is_empty(), "an event without an expiry");
    }
});
