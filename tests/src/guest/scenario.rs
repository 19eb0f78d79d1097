//! Running a test's body as a scenario: retries of runs lost to the test
//! host emulator's faults, the retry time budget, the logs `./test.sh`
//! prints at the end, and the wait for torn-down VMs before a guest starts.

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use super::{EMULATOR_FAULT, VMM_STDERRS};
use crate::host::{host, Host};

/// Did a VMM of this scenario run log a triple fault in the test host?
/// No user-space scenario makes its guest triple-fault, and in the test
/// host every one so far was the emulator fault's other form, at any
/// point of a run (docs/notes.md, "Left to do" (d)): the reading
/// `Guest::wedge_note` gives a timeout, here for a failure that no
/// `Guest` method diagnosed (a reboot test's boot count one too high).
/// On hardware KVM it fails the test.
fn emulator_triple_fault_in_run(h: &Host) -> bool {
    if !h.is_test_host() {
        return false;
    }
    VMM_STDERRS.with(|v| {
        v.borrow()
            .iter()
            .any(|f| !crate::testhost::wedge::triple_fault_rips(&f()).is_empty())
    })
}

/// Waits (at most 30 s) until no KVM VM of the test host belongs to a
/// process that is gone or a zombie: a VM torn down while another boots
/// is the test host emulator's fault's surest trigger measured
/// (`scripts/testhost-bootloop.sh`: a boot started at once after a SIGKILL
/// of the previous VMM wedged 4 times in 32, one started after it exited
/// none in the 31 beside them; docs/notes.md, "The test host"). Waiting
/// for the VMM's exit covers most of it; a VM whose last reference goes
/// later (or a wait that timed out) is what this catches.
pub(crate) fn settle_vms(host: &Host) {
    const SETTLE: &str = r#"n=0
while [ $n -lt 300 ]; do
    busy=
    for d in /sys/kernel/debug/kvm/*-*; do
        [ -d "$d" ] || continue
        p=${d##*/}; p=${p%%-*}
        case $(awk '{print $3}' /proc/$p/stat 2>/dev/null) in ''|Z|X) busy=$p ;; esac
    done
    [ -z "$busy" ] && { echo $n; exit 0; }
    sleep 0.1; n=$((n+1))
done
echo 300"#;
    if !host.is_test_host() {
        return;
    }
    let Ok(out) = host.try_sh(SETTLE, Duration::from_secs(60)) else {
        return;
    };
    let tenths: u32 = out.stdout.trim().parse().unwrap_or(0);
    if tenths > 0 {
        let note = format!(
            "waited {:.1} s for a VM of an exited VMM to be torn down before starting a guest",
            f64::from(tenths) / 10.0
        );
        eprintln!("NOTE: {note}");
        log_note(&note);
    }
}

/// Runs a test's body on the current host. If the body fails *and* the
/// failure is the test host emulator's (a guest diagnosed as wedged by it,
/// or the test host itself died or hung: see `testhost::wedge`), the body
/// runs again, on a test host that is alive (until the run's retry time is
/// spent, [`retry_budget`], at most 16 runs),
/// and the output says so. In the test host an undiagnosed failure also
/// gets one more run; on hardware KVM it fails the test. Every retry is
/// also appended to `target/testhost-retries.log`, which `./test.sh`
/// prints at the end (a passing retry's output is otherwise swallowed by
/// the test harness).
///
/// In the test host, scenarios run one at a time whatever the test harness'
/// thread count: two busy guests at once made its emulator's fault kill the
/// test host itself every minute or two (docs/notes.md).
pub fn scenario(body: impl Fn(&'static Host)) {
    /// Runs of one scenario at most. A boot in the test host meets the
    /// emulator's fault now and then (Debian's early boot more often than
    /// mini's), a scenario boots up to four times, and the faults come in
    /// clusters: a CI run and a run here each lost four runs in a row of
    /// one Debian scenario to test hosts that died, later CI runs all six
    /// of one (stop 20) and all eight of three (stop 21), in stretches
    /// where test hosts died every minute or two. So a scenario may run
    /// until the run's whole retry time ([`retry_budget`]) is spent,
    /// which keeps `./test.sh` inside CI's time on a bad day.
    const MAX_RUNS: u32 = 16;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = host()
        .is_test_host()
        .then(|| ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()));
    let mut undiagnosed_retried = false;
    let first_started = Instant::now();
    for attempt in 1..=MAX_RUNS {
        EMULATOR_FAULT.with(|f| f.set(false));
        VMM_STDERRS.with(|v| v.borrow_mut().clear());
        let started = Instant::now();
        let h = host();
        let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| body(h))) else {
            log_time(first_started.elapsed(), started.elapsed(), attempt);
            return;
        };
        let last = attempt == MAX_RUNS;
        let fault =
            EMULATOR_FAULT.with(|f| f.get()) || !h.is_alive() || emulator_triple_fault_in_run(h);
        let spent = if fault {
            spend_retry_time(started.elapsed())
        } else {
            Duration::ZERO
        };
        if fault && !last && spent > retry_budget() {
            log_retry("emulator fault (diagnosed), retry time spent", &*panic);
            eprintln!(
                "NOTE: the failure above is the test host emulator's, but this run of the \
                 suite has spent its {} minutes of retries (VMM_TESTHOST_RETRY_MINUTES)",
                retry_budget().as_secs() / 60
            );
            std::panic::resume_unwind(panic);
        }
        if fault && !last {
            log_retry("emulator fault (diagnosed)", &*panic);
            eprintln!(
                "NOTE: the failure above is the test host emulator's (docs/notes.md, \
                 \"The test host\"), not the VMM's: running the test again"
            );
            continue;
        }
        // In software emulation a rare failure is not diagnosed as the
        // emulator's yet still goes away (docs/notes.md, "Left to do"):
        // once, said loudly, with the first failure's report above. A
        // failure that repeats fails.
        if h.is_test_host() && !undiagnosed_retried && !last {
            undiagnosed_retried = true;
            log_retry("UNDIAGNOSED failure", &*panic);
            eprintln!(
                "NOTE: UNDIAGNOSED failure in the test host (report above, whole \
                 console saved): running the test once more; a second failure fails it"
            );
            continue;
        }
        std::panic::resume_unwind(panic);
    }
}

/// How long this test process may spend in scenario runs lost to the
/// emulator's fault, all scenarios together (a test host's replacement
/// included): 30 minutes (`VMM_TESTHOST_RETRY_MINUTES`). CI's cold
/// `./test.sh` takes 40-50 minutes without lost runs (kernel library and
/// build ~15, the suite with its in-run restarts), so even a run that
/// spends it all (and one run more, the one that crosses it) stays inside
/// CI's 90.
pub fn retry_budget() -> Duration {
    let minutes = std::env::var("VMM_TESTHOST_RETRY_MINUTES")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(30);
    Duration::from_secs(minutes.saturating_mul(60))
}

/// Adds a lost run's time to this process' total; the total so far.
fn spend_retry_time(d: Duration) -> Duration {
    static SPENT: std::sync::Mutex<Duration> = std::sync::Mutex::new(Duration::ZERO);
    let mut spent = SPENT.lock().unwrap_or_else(|e| e.into_inner());
    *spent = spent.saturating_add(d);
    *spent
}

/// The name of the running test (its thread's), for the logs below.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Appends `line` to `target/<log>`, for `./test.sh` to print at the end.
fn append_to_log(log: &str, line: &str) {
    let path = crate::repo_root().join("target").join(log);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Appends a line to `target/testhost-retries.log` (what `./test.sh`
/// prints at the end).
pub fn log_note(line: &str) {
    append_to_log("testhost-retries.log", &format!("{}: {line}", test_name()));
}

/// Appends a passed scenario's time to `target/testhost-times.log`, which
/// `./test.sh` prints slowest first: where the suite's time goes, and
/// what the emulator's faults cost (`total` against `last`).
fn log_time(total: Duration, last: Duration, runs: u32) {
    append_to_log(
        "testhost-times.log",
        &format!(
            "{:6.0} s  {} (passing run {:.0} s, runs {runs})",
            total.as_secs_f64(),
            test_name(),
            last.as_secs_f64()
        ),
    );
}

/// Appends a retried failure to `target/testhost-retries.log`.
fn log_retry(kind: &str, panic: &(dyn std::any::Any + Send)) {
    let msg = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    // A passing rerun swallows the failure's output: an undiagnosed one
    // keeps its whole message here (a stalled transfer's `status`, with
    // the rings, is in it), which `./test.sh` prints at the end.
    let shown = if kind.starts_with("UNDIAGNOSED") {
        msg
    } else {
        msg.lines().next().unwrap_or_default()
    };
    log_note(&format!("{kind}, ran again: {shown}"));
}
