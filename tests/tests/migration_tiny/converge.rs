//! Guests that write faster than their link: the downtime budget decides
//! when they stop, and `auto_converge` slows them down until they fit it.

use std::path::Path;
use std::time::Duration;

use tests::tiny::{contiguous, dirtier, letters_of};
use tests::TempDir;

use super::{free_port, migrate_with, start_guest, target, wait_listening, Ctl, Vm, T, TOKEN};

/// The dirtying guest's range: 16 MiB from 16 MiB up, well over the 1 MiB
/// the tests below let a pass leave for the last one (`budget_for`).
const DIRTY_BASE: u32 = 16 << 20;
const DIRTY_LEN: u32 = 16 << 20;

/// A guest that writes its 16 MiB range over and over (a letter a sweep).
fn start_dirtier(dir: &Path, name: &str) -> Vm {
    let vm = start_guest(dir, name, &dirtier(DIRTY_BASE, DIRTY_LEN), 64, &[]);
    assert!(vm.p.wait_for("READY", T), "{}", vm.p.report());
    vm
}

/// How fast `vm`'s dirtier writes, in MiB/s: the time its next 8 sweeps take.
fn dirty_rate_mib_s(vm: &Vm) -> f64 {
    let t0 = std::time::Instant::now();
    assert!(vm.runs_on(8), "{}", vm.p.report());
    let rate = 8.0 * f64::from(DIRTY_LEN >> 20) / t0.elapsed().as_secs_f64();
    eprintln!("the guest writes {rate:.0} MiB/s");
    rate
}

/// A link a quarter as fast as the guest writes (at least 1 MiB/s): a pass
/// over the range takes as long as the guest needs for four sweeps, so
/// every pass finds all of it written again, whatever this machine's speed.
fn a_quarter_of(rate_mib_s: f64) -> u64 {
    ((rate_mib_s / 4.0) as u64).max(1)
}

/// `,"downtime_ms":N`: the budget in which a link of `speed` MiB/s
/// carries `mib` MiB (1 ms at least), so that what a pass may leave for the
/// last one is `mib` whatever this machine's speed.
fn budget_for(mib: u64, speed: u64) -> String {
    format!(
        r#","downtime_ms":{}"#,
        (mib * 1000 / speed).clamp(1, 30_000)
    )
}

#[test]
fn a_guest_writing_faster_than_the_link_is_throttled_until_it_converges_where_without_it_stops_with_its_range_dirty(
) {
    let d = TempDir::new("migr-tiny-converge");
    let (plain_dir, auto_dir) = (d.path().join("plain"), d.path().join("auto"));
    std::fs::create_dir_all(&plain_dir).unwrap();
    std::fs::create_dir_all(&auto_dir).unwrap();

    // Without auto-converge: every pass leaves the range dirty, so the
    // copy runs its 30 passes and stops the guest with most of it left.
    let src = start_dirtier(&plain_dir, "src");
    let speed = a_quarter_of(dirty_rate_mib_s(&src));
    let port = free_port();
    let dst = target(&plain_dir, port);
    // A budget for 1 MiB left: never met by a range of 16.
    let tight = budget_for(1, speed);
    let r = migrate_with(
        &src,
        port,
        TOKEN,
        &format!(r#","speed_mib_s":{speed}{tight}"#),
    );
    assert_eq!(r["ok"], true, "{r}\n{}", dst.p.report());
    let plain = r.clone();
    eprintln!("unthrottled, {speed} MiB/s: {plain}");
    assert_eq!(plain["passes"], 30, "{plain}");
    assert_eq!(plain["throttle_pct"], serde_json::Value::Null, "{plain}");
    let plain_last = plain["last_pass_bytes"].as_u64().unwrap_or(0);
    assert!(plain_last >= 8 << 20, "most of the range was left: {plain}");
    assert!(dst.runs_on(2), "{}", dst.p.report());

    // With it, the same guest over the same link: throttled pass by pass
    // until a pass leaves little enough.
    let mut src = start_dirtier(&auto_dir, "src");
    let speed = a_quarter_of(dirty_rate_mib_s(&src));
    let port = free_port();
    let dst = target(&auto_dir, port);
    let mut sub = src.ctl();
    sub.ok(r#"{"cmd":"subscribe"}"#);
    let tight = budget_for(1, speed);
    let more = format!(r#","speed_mib_s":{speed},"auto_converge":true{tight}"#);
    let r = migrate_with(&src, port, TOKEN, &more);
    assert_eq!(r["ok"], true, "{r}\n{}", dst.p.report());
    let auto = r.clone();
    eprintln!("auto-converge, {speed} MiB/s: {auto}");
    let passes = auto["passes"].as_u64().unwrap_or(99);
    assert!(
        passes < 30,
        "it converged before the passes ran out: {auto}"
    );
    let peak = auto["throttle_pct"].as_u64().unwrap_or(0);
    assert!(peak >= 20, "the vCPUs were throttled: {auto}");
    let auto_last = auto["last_pass_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        auto_last * 2 < plain_last,
        "the guest stopped with far less left: {auto_last} vs {plain_last}"
    );
    // The passes' events say how: none throttled until two fell behind,
    // then one step per pass that did.
    let mut steps = Vec::new();
    while let Some(ev) = sub.wait_event("migration", Duration::from_millis(100)) {
        steps.push(ev["throttle_pct"].as_u64().unwrap_or(0));
    }
    eprintln!("throttle after each pass: {steps:?}");
    assert_eq!(steps.first(), Some(&0), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[1] >= w[0]), "{steps:?}");
    assert_eq!(steps.iter().max().copied(), Some(peak), "{steps:?}");
    // The target runs the guest on, at the next letter and at full speed.
    assert!(
        src.p.wait_exit(T).is_some_and(|s| s.success()),
        "{}",
        src.p.report()
    );
    assert!(dst.runs_on(3), "{}", dst.p.report());
    let all = format!("{}{}", src.letters(), letters_of(&dst.p.output()));
    assert!(contiguous(&all), "{all}");
    let s = Ctl::connect(&dst.sock).status();
    assert_eq!(s["throttle_pct"], serde_json::Value::Null, "{s}");
}

#[test]
fn a_roomy_downtime_budget_stops_a_guest_that_outwrites_its_link_early_with_its_writes_left_for_the_last_pass(
) {
    let d = TempDir::new("migr-tiny-budget");
    // The link of the test above, where a 1 MiB budget ran every pass;
    // now a budget in which it carries all 64 MiB of memory: the 16 MiB the
    // guest writes over and over fit, so it stops as soon as the copy has
    // measured the link (over 100 ms of passes: the first one, slowed by
    // the zero memory it skips, says too little).
    let mut src = start_dirtier(d.path(), "src");
    let speed = a_quarter_of(dirty_rate_mib_s(&src));
    let port = free_port();
    let dst = target(d.path(), port);
    let roomy = budget_for(64, speed);
    let r = migrate_with(
        &src,
        port,
        TOKEN,
        &format!(r#","speed_mib_s":{speed}{roomy}"#),
    );
    assert_eq!(r["ok"], true, "{r}\n{}", dst.p.report());
    eprintln!("{speed} MiB/s, {roomy}: {r}");
    let passes = r["passes"].as_u64().unwrap_or(99);
    assert!(passes < 30, "it stopped before the passes ran out: {r}");
    let last = r["last_pass_bytes"].as_u64().unwrap_or(0);
    assert!(
        last >= 4 << 20,
        "the guest stopped with its range written again, not clean: {r}"
    );
    assert!(
        src.p.wait_exit(T).is_some_and(|s| s.success()),
        "{}",
        src.p.report()
    );
    assert!(dst.runs_on(3), "{}", dst.p.report());
    let all = format!("{}{}", src.letters(), letters_of(&dst.p.output()));
    assert!(contiguous(&all), "{all}");
}

#[test]
fn a_cancelled_migration_gives_a_throttled_guest_all_of_its_time_back() {
    let d = TempDir::new("migr-tiny-throttle-cancel");
    let src = start_dirtier(d.path(), "src");
    let speed = a_quarter_of(dirty_rate_mib_s(&src));
    let port = free_port();
    let _dst = target(d.path(), port);
    wait_listening(port);
    let tight = budget_for(1, speed);
    let line = format!(
        r#"{{"cmd":"migrate","to":"127.0.0.1:{port}","token":"{TOKEN}","speed_mib_s":{speed},"auto_converge":true{tight}}}"#
    );
    let mut ctl = src.ctl();
    let sock = src.sock.clone();
    let (answer, throttled) = std::thread::scope(|s| {
        let asked = s.spawn(|| Ctl::connect(&sock).call(&line));
        // Cancelled once the throttle has risen past its first steps.
        let deadline = std::time::Instant::now() + T;
        let mut seen = 0;
        while seen < 40 && !asked.is_finished() && std::time::Instant::now() < deadline {
            seen = ctl.status()["throttle_pct"].as_u64().unwrap_or(0);
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = ctl.call(r#"{"cmd":"migrate-cancel"}"#);
        assert_eq!(r["ok"], true, "{r}");
        (asked.join().expect("the migrate call"), seen)
    });
    assert!(throttled >= 40, "throttled to {throttled} % only: {answer}");
    assert_eq!(answer["code"], "cancelled", "{answer}");
    let s = ctl.status();
    assert_eq!(s["throttle_pct"], serde_json::Value::Null, "{s}");
    // The thread that kicked the vCPUs into their naps ends.
    let tasks = format!("/proc/{}/task", src.p.child.id());
    let kicker = || {
        std::fs::read_dir(&tasks).is_ok_and(|d| {
            d.flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "throttle")
            })
        })
    };
    let deadline = std::time::Instant::now() + T;
    while kicker() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!kicker(), "the kicker thread still runs");
    assert!(src.runs_on(3), "{}", src.p.report());
    assert!(contiguous(&src.letters()), "{}", src.letters());
}
