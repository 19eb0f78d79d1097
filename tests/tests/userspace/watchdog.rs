//! The ib700 watchdog as the guest's user space uses it, through the stock
//! `ib700wdt` driver and `/dev/watchdog`: fed, it leaves the guest alone;
//! abandoned, it resets the guest within its timeout plus 2 s and says so;
//! the magic close disarms it; a paused VM never fires.

use std::time::{Duration, Instant};

use tests::guest::{scenario, Spec};

use crate::boot;

/// Feeds /dev/watchdog (4 s timeout) every second from a background job.
const FEED: &str = "watchdog -T 4 -t 1 -F /dev/watchdog & echo feeder=$!";
const TIMEOUT: Duration = Duration::from_secs(4);

fn feeder_pid(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("feeder="))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_abandoned_watchdog_resets_the_guest_within_its_timeout_plus_two_seconds() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini"));
        let mut sub = g.ctl();
        sub.ok(r#"{"cmd":"subscribe"}"#);
        let pid = feeder_pid(&g.run(FEED));
        // Fed for three timeouts: no reset.
        std::thread::sleep(3 * TIMEOUT);
        let s = g.ctl().status();
        assert_eq!(s["boot_count"], 1, "{s}");
        assert_eq!(s["watchdog"]["armed"], true, "{s}");
        // SIGKILL: the feeder dies without the magic close.
        g.run(&format!("kill -9 {pid}"));
        let killed = Instant::now();
        let ev = sub
            .wait_event("watchdog", TIMEOUT + Duration::from_secs(30))
            .expect("watchdog event");
        let fired = killed.elapsed();
        assert_eq!(ev["action"], "reset", "{ev}");
        let ev = sub
            .wait_event("reset", Duration::from_secs(10))
            .expect("reset event");
        assert_eq!(ev["cause"], "watchdog", "{ev}");
        g.expect("--- vmm: boot 2 (reset: watchdog", Duration::from_secs(30));
        assert!(
            fired <= TIMEOUT + Duration::from_secs(2) + Duration::from_millis(500),
            "fired {fired:?} after the last feed could have been (timeout {TIMEOUT:?})"
        );
        eprintln!("watchdog fired {fired:?} after its feeder was killed (timeout {TIMEOUT:?})");
    });
}

#[test]
fn the_magic_close_disarms_the_watchdog() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini"));
        // SIGTERM: busybox watchdog writes 'V' before it closes the device.
        let pid = feeder_pid(&g.run(FEED));
        std::thread::sleep(Duration::from_secs(2));
        g.run(&format!("kill -TERM {pid}; wait {pid} 2>/dev/null; true"));
        // And by hand: open, feed, 'V', close.
        g.run("exec 3>/dev/watchdog; echo 1 >&3; echo V >&3; exec 3>&-");
        std::thread::sleep(TIMEOUT + Duration::from_secs(4));
        let s = g.ctl().status();
        assert_eq!(s["boot_count"], 1, "the guest was reset: {s}");
        assert_eq!(s["watchdog"]["armed"], false, "{s}");
        assert_eq!(s["watchdog"]["expiries"], 0, "{s}");
    });
}

#[test]
fn a_paused_vm_does_not_fire_its_watchdog_and_fires_after_resume() {
    scenario(|h| {
        let mut g = boot(h, Spec::new("mini"));
        let pid = feeder_pid(&g.run(FEED));
        g.run(&format!("kill -9 {pid}"));
        let mut ctl = g.ctl();
        ctl.ok(r#"{"cmd":"pause"}"#);
        std::thread::sleep(TIMEOUT + Duration::from_secs(4));
        let s = ctl.status();
        assert_eq!(s["state"], "paused", "{s}");
        assert_eq!(s["boot_count"], 1, "fired while paused: {s}");
        assert_eq!(s["watchdog"]["expiries"], 0, "{s}");
        ctl.ok(r#"{"cmd":"resume"}"#);
        let s = ctl.wait_status(TIMEOUT + Duration::from_secs(30), |s| s["boot_count"] == 2);
        assert_eq!(s["boot_count"], 2, "no reset after resume: {s}");
        assert_eq!(s["last_reset"], "watchdog", "{s}");
    });
}
