//! The operator's alert hook: a command run on `watchdog` and `panic`
//! events. A guest decides how often those happen (a panic loop, a pvpanic
//! storm, a watchdog set to expire at once), so the hook is gated: at most
//! one runs at a time per VM, and an event repeated within [`HOOK_HOLDOFF`]
//! of its last run is coalesced into a count the next run reports
//! (`VMM_COALESCED`). Each run has its own thread and is killed if it
//! outlives its timeout.
//!
//! The command itself runs in the **hook launcher**, a helper process the
//! VMM forks at start-up, before it has any thread, filter or guest
//! ([`start_launcher`]): seccomp filters are inherited by every process a
//! thread starts, and an operator's command (mail, curl, a pager gateway)
//! needs whatever it needs. The launcher reads one line per run from a
//! socket, `EVENT TAB TIME TAB COUNT`, checks it (a known event, a time
//! made of timestamp characters, a number), runs the command it was given
//! at fork time with those in its environment, and answers `done`. What a
//! compromised VMM could send it is therefore only which of two events
//! happened and when; it cannot choose what runs. Unit tests, which have
//! threads already, run the command in-process instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::bus::lock;

pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// The same event again within this long of its last hook run does not run
/// the hook again; it is counted instead.
pub const HOOK_HOLDOFF: Duration = Duration::from_secs(60);

/// The events the hook runs for (what the launcher accepts).
pub const EVENTS: [&str; 2] = ["watchdog", "panic"];

/// The VMM's end of the hook launcher's socket, once it was forked.
static LAUNCHER: OnceLock<Mutex<UnixStream>> = OnceLock::new();

/// Forks the hook launcher for `command`; call while the process has one
/// thread (first thing in `runtime::run`). Without a launcher (never
/// started, or this fails) hooks run in-process.
pub fn start_launcher(
    command: &str,
    vm: &str,
    sandbox: &crate::sandbox::Plan,
) -> std::io::Result<()> {
    let threads = crate::sandbox::thread_count();
    if threads != 1 {
        return Err(std::io::Error::other(format!(
            "{threads} threads already: not forking the hook launcher"
        )));
    }
    let (ours, theirs) = UnixStream::pair()?;
    // SAFETY: the process has a single thread (checked above), so the child
    // may run ordinary Rust code; it never returns from `launcher_main`.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(ours);
            // Hooks run as the VM's user, with no capabilities; the
            // launcher is not confined further (a hook may need to mail,
            // log or call out).
            let dropped = match sandbox.mode {
                // Without no_new_privs: a hook may mail through a set-gid
                // helper (postdrop); the locked secure bits and the empty
                // bounding set keep capabilities away all the same.
                crate::sandbox::Mode::On => {
                    crate::sandbox::drop_privileges(sandbox.identity.as_ref(), false)
                }
                crate::sandbox::Mode::Off => Ok(()),
            };
            if let Err(e) = dropped {
                eprintln!("vmm: hook launcher: {e}");
                // SAFETY: ending the child without running the parent's destructors.
                unsafe { libc::_exit(1) };
            }
            launcher_main(theirs, command, vm, HOOK_TIMEOUT)
        }
        _ => {
            drop(theirs);
            ours.set_read_timeout(Some(HOOK_TIMEOUT + Duration::from_secs(10)))?;
            LAUNCHER
                .set(Mutex::new(ours))
                .map_err(|_| std::io::Error::other("the hook launcher was started twice"))
        }
    }
}

/// The launcher's loop (in the forked child).
fn launcher_main(sock: UnixStream, command: &str, vm: &str, timeout: Duration) -> ! {
    // Its own process group (a Ctrl-C on the VMM's terminal is not for
    // it), its own name, no terminal input.
    // SAFETY: plain system calls on this process; the name is NUL-terminated.
    unsafe {
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_NAME, c"vmm-hooks".as_ptr());
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
    let mut w = match sock.try_clone() {
        Ok(w) => w,
        // SAFETY: ending the child without running the parent's destructors.
        Err(_) => unsafe { libc::_exit(1) },
    };
    let mut reader = BufReader::new(sock);
    let mut line = String::new();
    loop {
        line.clear();
        // The VMM's end closed (it exited): so does the launcher.
        match (&mut reader).take(256).read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match parse_launch(&line) {
            Some(run) => run_once(command, vm, &run, timeout),
            None => tracing::warn!(vm, "hook launcher: refused a malformed request"),
        }
        if w.write_all(b"done\n").is_err() {
            break;
        }
    }
    // SAFETY: ending the child without running the parent's destructors.
    unsafe { libc::_exit(0) }
}

/// `EVENT TAB TIME TAB COUNT NEWLINE`, checked: the launcher's whole
/// input, from a VMM process a guest may have taken over (fuzzed:
/// `fuzz/fuzz_targets/hook_launch.rs`).
pub fn parse_launch(line: &str) -> Option<HookRun> {
    let mut f = line.strip_suffix('\n')?.split('\t');
    let (event, time, count) = (f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    let event = EVENTS.into_iter().find(|e| *e == event)?;
    let time_ok = !time.is_empty()
        && time.len() <= 40
        && time
            .bytes()
            .all(|b| b.is_ascii_digit() || b"-:.+TZ".contains(&b));
    Some(HookRun {
        event,
        time: time_ok.then(|| time.to_string())?,
        coalesced: count.parse().ok()?,
    })
}

/// The request [`parse_launch`] reads.
pub fn format_launch(run: &HookRun) -> String {
    format!("{}\t{}\t{}\n", run.event, run.time, run.coalesced)
}

/// Hands `run` to the launcher and waits for it to finish.
fn run_in_launcher(sock: &Mutex<UnixStream>, vm: &str, run: &HookRun) {
    let mut s = lock(sock);
    let line = format_launch(run);
    let mut answer = [0u8; 5];
    let r = s
        .write_all(line.as_bytes())
        .and_then(|()| s.read_exact(&mut answer));
    match r {
        Ok(()) if &answer == b"done\n" => {}
        Ok(()) => tracing::warn!(vm, "hook launcher: unexpected answer"),
        Err(e) => tracing::warn!(vm, event = run.event, "hook launcher: {e}"),
    }
}

/// One hook run the gate admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    pub event: &'static str,
    /// When the event happened (RFC 3339), not when the hook starts.
    pub time: String,
    /// Events of this kind coalesced since the previous run.
    pub coalesced: u64,
}

#[derive(Debug, Default)]
struct KindState {
    last_run: Option<Instant>,
    coalesced: u64,
    /// Admitted while another kind's hook ran: runs when it ends (the time).
    pending: Option<String>,
}

/// The policy, pure: which events run the hook and when.
#[derive(Debug)]
pub struct HookGate {
    holdoff: Duration,
    running: bool,
    kinds: Vec<(&'static str, KindState)>,
}

/// What [`HookGate::offer`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Start a run now.
    Run(HookRun),
    /// Another kind's hook is running: this one runs when that ends.
    Queued,
    /// Counted into the next run of this kind; `first` is true for the first
    /// event coalesced since the last run (the one worth a log line).
    Coalesced { first: bool },
}

impl HookGate {
    pub fn new(holdoff: Duration) -> Self {
        HookGate {
            holdoff,
            running: false,
            kinds: Vec::new(),
        }
    }

    fn kind(&mut self, event: &'static str) -> &mut KindState {
        let i = match self.kinds.iter().position(|(k, _)| *k == event) {
            Some(i) => i,
            None => {
                self.kinds.push((event, KindState::default()));
                self.kinds.len() - 1
            }
        };
        &mut self.kinds[i].1
    }

    /// An event happened at `now` (`time` is its RFC 3339 form).
    pub fn offer(&mut self, event: &'static str, time: String, now: Instant) -> Offer {
        let holdoff = self.holdoff;
        let running = self.running;
        let k = self.kind(event);
        let recent = k
            .last_run
            .is_some_and(|t| now.saturating_duration_since(t) < holdoff);
        if k.pending.is_some() || recent {
            k.coalesced = k.coalesced.saturating_add(1);
            return Offer::Coalesced {
                first: k.coalesced == 1,
            };
        }
        if running {
            k.pending = Some(time);
            return Offer::Queued;
        }
        k.last_run = Some(now);
        let coalesced = std::mem::take(&mut k.coalesced);
        self.running = true;
        Offer::Run(HookRun {
            event,
            time,
            coalesced,
        })
    }

    /// The running hook ended at `now`: the next queued run, if any.
    pub fn finished(&mut self, now: Instant) -> Option<HookRun> {
        for (event, k) in &mut self.kinds {
            if let Some(time) = k.pending.take() {
                k.last_run = Some(now);
                return Some(HookRun {
                    event,
                    time,
                    coalesced: std::mem::take(&mut k.coalesced),
                });
            }
        }
        self.running = false;
        None
    }
}

/// A VM's alert hook: the command and its gate.
pub struct AlertHook {
    command: String,
    vm: String,
    timeout: Duration,
    gate: Arc<Mutex<HookGate>>,
}

impl AlertHook {
    pub fn new(command: &str, vm: &str) -> Self {
        Self::with_timing(command, vm, HOOK_TIMEOUT, HOOK_HOLDOFF)
    }

    pub fn with_timing(command: &str, vm: &str, timeout: Duration, holdoff: Duration) -> Self {
        AlertHook {
            command: command.to_string(),
            vm: vm.to_string(),
            timeout,
            gate: Arc::new(Mutex::new(HookGate::new(holdoff))),
        }
    }

    /// `event` happened now. Never blocks the caller.
    pub fn fire(&self, event: &'static str) {
        let offer = lock(&self.gate).offer(event, protocol::time::now_rfc3339(), Instant::now());
        match offer {
            Offer::Run(run) => self.start(run),
            Offer::Queued => {
                tracing::info!(vm = self.vm, event, "alert hook busy; this one runs next")
            }
            Offer::Coalesced { first: true } => tracing::info!(
                vm = self.vm,
                event,
                "alert hook ran for this event less than {:?} ago; repeats are counted (VMM_COALESCED)",
                HOOK_HOLDOFF
            ),
            Offer::Coalesced { first: false } => {}
        }
    }

    fn start(&self, first: HookRun) {
        let (command, vm, timeout) = (self.command.clone(), self.vm.clone(), self.timeout);
        let gate = self.gate.clone();
        let spawned = crate::spawner::spawn("alert-hook".into(), move || {
            let mut run = Some(first);
            crate::seccomp::install(crate::seccomp::Kind::Hook);
            while let Some(r) = run {
                match LAUNCHER.get() {
                    Some(sock) => run_in_launcher(sock, &vm, &r),
                    None => run_once(&command, &vm, &r, timeout),
                }
                run = lock(&gate).finished(Instant::now());
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start alert hook thread: {e}");
            // Nothing runs: let the next event try again.
            while lock(&self.gate).finished(Instant::now()).is_some() {}
        }
    }
}

/// Runs the command (through `/bin/sh -c`) with VMM_EVENT, VMM_NAME,
/// VMM_TIME and VMM_COALESCED in its environment, and waits for it (at most
/// `timeout`). Its output is logged (64 KiB of each stream at most).
fn run_once(command: &str, vm: &str, run: &HookRun, timeout: Duration) {
    let event = run.event;
    let mut child = match Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("VMM_EVENT", event)
        .env("VMM_NAME", vm)
        .env("VMM_TIME", &run.time)
        .env("VMM_COALESCED", run.coalesced.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(vm, event, "alert hook could not start: {e}");
            return;
        }
    };
    // Collect output without blocking the wait loop.
    let collect = |s: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        if let Some(s) = s {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = s.take(64 * 1024).read_to_end(&mut v);
                let _ = tx.send(v);
            });
        }
        rx
    };
    let out = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => {
                if let Ok(pgid) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) on the process group we created for the hook; no
                    // memory is involved.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(vm, event, "alert hook killed after {timeout:?}");
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                tracing::warn!(vm, event, "alert hook: {e}");
                break None;
            }
        }
    };
    // Something the hook left running in the background may hold its output open: wait
    // for that only briefly, the next hook must not wait on it.
    let text = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(1))
            .map(|v| String::from_utf8_lossy(&v).trim().to_string())
            .unwrap_or_default()
    };
    let (o, e) = (text(out), text(err));
    if let Some(s) = status {
        tracing::info!(
            vm,
            event,
            "alert hook exited with {s}; stdout: {o:?}; stderr: {e:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_file(path: &std::path::Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn the_launcher_takes_only_a_known_event_a_timestamp_and_a_count() {
        assert_eq!(
            parse_launch("panic\t2026-12-05T01:02:03.456Z\t7\n"),
            Some(HookRun {
                event: "panic",
                time: "2026-12-05T01:02:03.456Z".into(),
                coalesced: 7,
            })
        );
        for bad in [
            "panic\t2026-12-05T01:02:03Z\t7",          // no newline
            "reboot\t2026-12-05T01:02:03Z\t0\n",       // unknown event
            "panic\t$(rm -rf /)\t0\n",                 // not a timestamp
            "panic\t\t0\n",                            // empty time
            "panic\t2026-12-05T01:02:03Z\t-1\n",       // not a count
            "panic\t2026-12-05T01:02:03Z\t0\textra\n", // a fourth field
            "panic 2026-12-05T01:02:03Z 0\n",          // no tabs
            "",
        ] {
            assert_eq!(parse_launch(bad), None, "{bad:?}");
        }
        let long = format!("panic\t{}\t0\n", "1".repeat(41));
        assert_eq!(parse_launch(&long), None, "a time over 40 bytes");
    }

    #[test]
    fn hook_gets_the_event_in_its_environment() {
        let dir = std::env::temp_dir().join(format!("vmm-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let cmd = format!(
            "echo \"$VMM_EVENT $VMM_NAME $VMM_COALESCED\" > {}",
            out.display()
        );
        AlertHook::new(&cmd, "web1").fire("watchdog");
        assert_eq!(wait_for_file(&out).trim(), "watchdog web1 0");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_hanging_hook_is_killed_and_does_not_block_the_caller() {
        let hook =
            AlertHook::with_timing("sleep 30", "vm", Duration::from_millis(200), HOOK_HOLDOFF);
        let start = Instant::now();
        hook.fire("panic");
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "caller was blocked"
        );
        // Killed at its timeout, the gate is free for the other event.
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&hook.gate).running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !lock(&hook.gate).running,
            "the killed hook still holds the gate"
        );
    }

    #[test]
    fn a_hook_that_leaves_a_process_holding_its_output_frees_the_gate() {
        let hook = AlertHook::new("sleep 30 & echo started", "vm");
        hook.fire("panic");
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&hook.gate).running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !lock(&hook.gate).running,
            "the gate waits on the background process"
        );
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn a_storm_of_one_event_runs_the_hook_once() {
        let mut g = HookGate::new(HOOK_HOLDOFF);
        let now = t0();
        assert!(matches!(g.offer("panic", "t".into(), now), Offer::Run(_)));
        assert_eq!(
            g.offer("panic", "t".into(), now),
            Offer::Coalesced { first: true }
        );
        for i in 0..10_000u64 {
            let at = now + Duration::from_millis(i);
            assert_eq!(
                g.offer("panic", "t".into(), at),
                Offer::Coalesced { first: false }
            );
        }
        assert_eq!(g.finished(now + Duration::from_secs(11)), None);
        // Still within the hold-off after the run ended: counted.
        assert!(matches!(
            g.offer("panic", "t".into(), now + Duration::from_secs(30)),
            Offer::Coalesced { .. }
        ));
    }

    #[test]
    fn the_first_run_after_the_holdoff_reports_how_many_were_coalesced() {
        let mut g = HookGate::new(HOOK_HOLDOFF);
        let now = t0();
        let _ = g.offer("panic", "a".into(), now);
        for _ in 0..5 {
            let _ = g.offer("panic", "b".into(), now + Duration::from_secs(1));
        }
        assert_eq!(g.finished(now + Duration::from_secs(2)), None);
        let later = now + HOOK_HOLDOFF + Duration::from_secs(1);
        assert_eq!(
            g.offer("panic", "c".into(), later),
            Offer::Run(HookRun {
                event: "panic",
                time: "c".into(),
                coalesced: 5
            })
        );
    }

    #[test]
    fn another_event_while_the_hook_runs_runs_right_after_it() {
        let mut g = HookGate::new(HOOK_HOLDOFF);
        let now = t0();
        assert!(matches!(g.offer("panic", "p".into(), now), Offer::Run(_)));
        assert_eq!(g.offer("watchdog", "w".into(), now), Offer::Queued);
        // Its repeats while it waits are counted, not queued twice.
        assert_eq!(
            g.offer("watchdog", "w2".into(), now),
            Offer::Coalesced { first: true }
        );
        assert_eq!(
            g.finished(now + Duration::from_secs(1)),
            Some(HookRun {
                event: "watchdog",
                time: "w".into(),
                coalesced: 1
            })
        );
        assert_eq!(g.finished(now + Duration::from_secs(2)), None);
        assert!(!g.running);
    }

    #[test]
    fn a_crash_loop_runs_the_hook_at_most_once_per_holdoff() {
        let mut g = HookGate::new(HOOK_HOLDOFF);
        let now = t0();
        let mut runs = 0;
        // A guest that panics every 5 s for an hour, each hook taking 1 s.
        for i in 0..720u64 {
            let at = now + Duration::from_secs(5 * i);
            if let Offer::Run(_) = g.offer("panic", "t".into(), at) {
                runs += 1;
                assert_eq!(g.finished(at + Duration::from_secs(1)), None);
            }
        }
        assert_eq!(runs, 60);
    }
}
