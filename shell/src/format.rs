//! Human-readable output: status, kernels, watchdog, the VM list, events. Pure functions from
//! protocol types to text, unit-tested; colour only when the [`Style`] says so.

use protocol::{
    Event, KernelList, ResetCause, ServerLine, StatusInfo, StopOutcome, StopResult, VmState,
    WatchdogAction, WatchdogInfo,
};

/// Whether to colour, decided once per output stream: only on a terminal, never with
/// `NO_COLOR` set (<https://no-color.org>), `TERM=dumb` or `--no-color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Style {
    /// Emit ANSI colour sequences.
    pub color: bool,
}

impl Style {
    /// No colour.
    pub const PLAIN: Style = Style { color: false };

    /// The style for a stream that is (or is not) a terminal, given the environment.
    pub fn detect(is_tty: bool, no_color_env: Option<&str>, term: Option<&str>) -> Style {
        let no_color = no_color_env.is_some_and(|v| !v.is_empty());
        Style {
            color: is_tty && !no_color && term != Some("dumb"),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Bold.
    pub fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    /// Dim (secondary information).
    pub fn dim(&self, text: &str) -> String {
        self.paint("2", text)
    }

    /// Red (errors).
    pub fn red(&self, text: &str) -> String {
        self.paint("31", text)
    }

    /// Green (success).
    pub fn green(&self, text: &str) -> String {
        self.paint("32", text)
    }

    /// Yellow (warnings).
    pub fn yellow(&self, text: &str) -> String {
        self.paint("33", text)
    }

    /// A VM state, coloured by meaning: running green, paused yellow, stopped red.
    pub fn state(&self, state: VmState) -> String {
        let code = match state {
            VmState::Running => "1;32",
            VmState::Paused => "1;33",
            VmState::Stopped => "1;31",
        };
        self.paint(code, state.as_str())
    }
}

/// An uptime: `42s`, `3m 05s`, `1h 02m 03s`, `2d 03h 04m`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m")
    } else if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// A short elapsed time: `0.4 s`, `5.2 s`, `61 s`.
pub fn seconds(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{} s", ms / 1000, ms % 1000 / 100)
    } else {
        format!("{} s", ms / 1000)
    }
}

/// Why the guest was last reset, in words.
pub fn reset_cause(cause: ResetCause) -> &'static str {
    match cause {
        ResetCause::Command => "reset command",
        ResetCause::Reboot => "reboot command",
        ResetCause::RebootTimeout => "reboot command (timed out, reset)",
        ResetCause::Guest => "the guest rebooted",
        ResetCause::TripleFault => "triple fault",
        ResetCause::Watchdog => "watchdog expired",
        ResetCause::Panic => "guest panic",
    }
}

/// What a watchdog action does, in words.
pub fn watchdog_action(action: WatchdogAction) -> &'static str {
    match action {
        WatchdogAction::Reset => "reset the VM",
        WatchdogAction::Poweroff => "power the VM off",
        WatchdogAction::Pause => "pause the VM",
        WatchdogAction::Shutdown => "shut the VM down gracefully",
        WatchdogAction::None => "only report it",
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The watchdog in one line: `armed, 12 s left of 30 s; on expiry: reset (1 expiry so far)`.
pub fn watchdog_summary(w: &WatchdogInfo) -> String {
    let timer = match (w.armed, w.seconds_left, w.timeout_s) {
        (true, Some(left), Some(total)) => format!("armed, {left} s left of {total} s"),
        (true, Some(left), None) => format!("armed, {left} s left"),
        (true, None, Some(total)) => format!("armed, {total} s timeout"),
        (true, None, None) => "armed".to_string(),
        (false, _, _) => "not armed".to_string(),
    };
    let mut line = format!("{timer}; on expiry: {}", w.action);
    if w.expiries > 0 {
        line.push_str(&format!(
            " ({} so far)",
            plural(w.expiries, "expiry", "expiries")
        ));
    }
    line
}

fn row(out: &mut String, style: Style, key: &str, value: &str) {
    // Pad before colouring so escape sequences do not upset the alignment.
    out.push_str(&format!("{}  {value}\n", style.bold(&format!("{key:<10}"))));
}

/// `status`, as a table.
pub fn status(s: &StatusInfo, style: Style) -> String {
    let mut out = String::new();
    row(&mut out, style, "name", &s.name);
    row(&mut out, style, "state", &style.state(s.state));
    let uptime = if s.state == VmState::Stopped {
        style.dim("-")
    } else {
        duration(s.uptime_ms)
    };
    row(&mut out, style, "uptime", &uptime);
    let kernel = match &s.next_kernel {
        Some(next) if *next != s.kernel => {
            format!(
                "{}  {}",
                s.kernel,
                style.yellow(&format!("(next boot: {next})"))
            )
        }
        _ => s.kernel.clone(),
    };
    row(&mut out, style, "kernel", &kernel);
    row(&mut out, style, "vcpus", &s.vcpus.to_string());
    row(&mut out, style, "memory", &format!("{} MiB", s.memory_mib));
    row(&mut out, style, "boots", &s.boot_count.to_string());
    let last_reset = match s.last_reset {
        Some(cause) => reset_cause(cause).to_string(),
        None => style.dim("never"),
    };
    row(&mut out, style, "last reset", &last_reset);
    let watchdog = match &s.watchdog {
        Some(w) => watchdog_summary(w),
        None => style.dim("none"),
    };
    row(&mut out, style, "watchdog", &watchdog);
    if let Some(action) = s.on_panic {
        row(&mut out, style, "on panic", action.as_str());
    }
    // The host's operator moves the VM live; a customer who finds the
    // machine slow sees why.
    if s.migrating {
        let how = match s.throttle_pct {
            0 => "to another host, live".to_string(),
            p => format!("to another host, live; slowed down {p} % until the copy catches up"),
        };
        row(&mut out, style, "moving", &style.yellow(&how));
    }
    // The operator's snapshot pauses the guest and holds power requests
    // back for its few seconds: the customer sees why.
    if s.snapshotting {
        row(
            &mut out,
            style,
            "saving",
            &style.yellow("a snapshot by the host; paused until it is written"),
        );
    }
    out
}

/// `watchdog show`.
pub fn watchdog(w: &WatchdogInfo, style: Style) -> String {
    let mut out = String::new();
    let state = if w.armed {
        style.green("armed")
    } else {
        style.dim("not armed")
    };
    row(&mut out, style, "state", &state);
    let timeout = match w.timeout_s {
        Some(t) => format!("{t} s"),
        None => style.dim("not set by the guest"),
    };
    row(&mut out, style, "timeout", &timeout);
    if let Some(left) = w.seconds_left {
        row(&mut out, style, "left", &format!("{left} s"));
    }
    row(
        &mut out,
        style,
        "action",
        &format!("{} ({})", w.action, watchdog_action(w.action)),
    );
    row(&mut out, style, "expiries", &w.expiries.to_string());
    out
}

/// `kernel list`: one kernel a line, the current and next ones marked.
pub fn kernels(k: &KernelList, style: Style) -> String {
    if k.kernels.is_empty() {
        return "The kernel library is empty.\n".to_string();
    }
    let name_w = k
        .kernels
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(0)
        .max("KERNEL".len());
    let ver_w = k
        .kernels
        .iter()
        .map(|e| e.version.as_deref().unwrap_or("-").len())
        .max()
        .unwrap_or(0)
        .max("VERSION".len());
    let mut out = style.bold(&format!(
        "  {:<name_w$}  {:<ver_w$}  DESCRIPTION",
        "KERNEL", "VERSION"
    ));
    out.push('\n');
    for e in &k.kernels {
        let current = k.current.as_deref() == Some(e.name.as_str());
        let next = k.next.as_deref() == Some(e.name.as_str());
        let mark = if current { "*" } else { " " };
        let mut tags = Vec::new();
        if current {
            tags.push("running");
        }
        if next {
            tags.push("next boot");
        }
        let mut line = format!(
            "{mark} {:<name_w$}  {:<ver_w$}  {}",
            e.name,
            e.version.as_deref().unwrap_or("-"),
            e.description.as_deref().unwrap_or("")
        );
        let line_len = line.trim_end().len();
        line.truncate(line_len);
        if !tags.is_empty() {
            line.push_str(&format!(
                "  {}",
                style.green(&format!("[{}]", tags.join(", ")))
            ));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `kernel show`.
pub fn kernel_show(k: &KernelList, style: Style) -> String {
    let mut out = String::new();
    let none = style.dim("unknown");
    let current = k.current.clone().unwrap_or_else(|| none.clone());
    row(&mut out, style, "running", &current);
    let next = match (&k.next, &k.current) {
        (Some(n), Some(c)) if n != c => style.yellow(n),
        (Some(n), _) => n.clone(),
        (None, _) => none,
    };
    row(&mut out, style, "next boot", &next);
    out
}

/// One row of `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRow {
    /// The VM's name (its directory).
    pub name: String,
    /// Its status, if the VMM answered with one that decodes.
    pub status: Option<StatusInfo>,
}

/// `list`: a table of the VMs, the selected one marked.
pub fn list(rows: &[ListRow], selected: Option<&str>, style: Style) -> String {
    let name_w = rows
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max("VM".len());
    let mut out = style.bold(&format!(
        "  {:<name_w$}  {:<8}  {:<11}  KERNEL",
        "VM", "STATE", "UPTIME"
    ));
    out.push('\n');
    for r in rows {
        let mark = if selected == Some(r.name.as_str()) {
            "*"
        } else {
            " "
        };
        let (state, uptime, kernel) = match &r.status {
            Some(s) => {
                let uptime = if s.state == VmState::Stopped {
                    "-".to_string()
                } else {
                    duration(s.uptime_ms)
                };
                // Pad the plain word, then colour it, so columns line up.
                let pad = " ".repeat(8usize.saturating_sub(s.state.as_str().len()));
                (
                    format!("{}{pad}", style.state(s.state)),
                    uptime,
                    s.kernel.clone(),
                )
            }
            None => ("?       ".to_string(), "?".to_string(), "?".to_string()),
        };
        out.push_str(&format!(
            "{mark} {:<name_w$}  {state}  {uptime:<11}  {kernel}\n",
            r.name
        ));
    }
    out
}

/// A `shutdown` or `reboot` result.
pub fn stop_outcome(vm: &str, reboot: bool, o: &StopOutcome, style: Style) -> String {
    let took = seconds(o.elapsed_ms);
    match (reboot, o.result) {
        (false, StopResult::Graceful) => {
            format!(
                "{vm} shut down cleanly ({took}); it is {}.",
                style.state(VmState::Stopped)
            )
        }
        (false, StopResult::Forced) => format!(
            "{vm} did not shut down in time: {} after {took}.",
            style.yellow("powered off")
        ),
        (true, StopResult::Graceful) => format!("{vm} rebooted cleanly ({took})."),
        (true, StopResult::Forced) => format!(
            "{vm} did not reboot in time: {} after {took}.",
            style.yellow("reset")
        ),
        (false, StopResult::Superseded) => {
            format!("{vm}: the shutdown was overtaken by another power action ({took}).")
        }
        (true, StopResult::Superseded) => {
            format!("{vm}: the reboot was overtaken by another power action ({took}).")
        }
    }
}

/// One event line: `2026-11-25T02:10:00.123Z web1 state: running -> paused`.
pub fn event(line: &ServerLine, style: Style) -> Option<String> {
    match line {
        ServerLine::Event(msg) => {
            let what = match &msg.event {
                Event::StateChanged { state, previous } => format!(
                    "state: {} -> {}",
                    style.state(*previous),
                    style.state(*state)
                ),
                Event::Reset { cause } => {
                    format!("{}: {}", style.yellow("reset"), reset_cause(*cause))
                }
                Event::Boot { boot_count, kernel } => {
                    format!("boot #{boot_count} with kernel {kernel}")
                }
                Event::Panic { action } => {
                    format!("{} (action: {action})", style.red("guest panic"))
                }
                Event::Watchdog { action, expiries } => format!(
                    "{} (action: {action}, {} so far)",
                    style.red("watchdog expired"),
                    plural(*expiries, "expiry", "expiries")
                ),
                Event::KernelSelected { kernel } => format!("next boot will use kernel {kernel}"),
                Event::BootFailed { error } => format!(
                    "{}: {} (the VM is stopped: `kernel set` another, then `start`)",
                    style.red("boot failed"),
                    error.escape_default()
                ),
                // The operator's: shown, since it touches the customer's disk.
                Event::BackupStarted { disk } => {
                    format!("the host is backing up {}", disk.escape_default())
                }
                Event::Restored { boot_count } => {
                    format!("restored from a snapshot by the host: boot #{boot_count} runs on")
                }
                Event::Migration { pass, .. } => {
                    format!("the host is moving this VM (copy pass {pass})")
                }
            };
            Some(format!("{} {} {what}", style.dim(&msg.time), msg.vm))
        }
        ServerLine::UnknownEvent { name, fields } => {
            let time = fields.get("time").and_then(|t| t.as_str()).unwrap_or("-");
            let vm = fields.get("vm").and_then(|t| t.as_str()).unwrap_or("-");
            let rest: Vec<String> = fields
                .iter()
                .filter(|(k, _)| *k != "time" && *k != "vm")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            Some(format!(
                "{} {vm} {name} {}",
                style.dim(time),
                rest.join(" ")
            ))
        }
        ServerLine::Response(_) => None,
    }
}

/// Removes ANSI escape sequences (for tests).
#[cfg(test)]
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{parse_response_line, KernelEntry, PanicAction};

    const COLOR: Style = Style { color: true };

    fn status_info() -> StatusInfo {
        StatusInfo {
            name: "web1".into(),
            state: VmState::Running,
            kernel: "mini".into(),
            next_kernel: Some("debian".into()),
            vcpus: 2,
            memory_mib: 512,
            uptime_ms: 3_723_000,
            boot_count: 2,
            last_reset: Some(ResetCause::Watchdog),
            migrating: false,
            snapshotting: false,
            throttle_pct: 0,
            watchdog: Some(WatchdogInfo {
                armed: true,
                timeout_s: Some(30),
                seconds_left: Some(12),
                action: WatchdogAction::Reset,
                expiries: 1,
            }),
            on_panic: Some(PanicAction::Pause),
            disks: vec![],
            nets: vec![],
        }
    }

    #[test]
    fn style_detection_follows_tty_no_color_and_term() {
        assert!(Style::detect(true, None, Some("xterm")).color);
        assert!(!Style::detect(false, None, Some("xterm")).color);
        assert!(!Style::detect(true, Some("1"), Some("xterm")).color);
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(Style::detect(true, Some(""), None).color);
        assert!(!Style::detect(true, None, Some("dumb")).color);
    }

    #[test]
    fn durations_pick_sensible_units() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(999), "0s");
        assert_eq!(duration(42_000), "42s");
        assert_eq!(duration(185_000), "3m 05s");
        assert_eq!(duration(3_723_000), "1h 02m 03s");
        assert_eq!(
            duration(2 * 86_400_000 + 3 * 3_600_000 + 4 * 60_000 + 5),
            "2d 03h 04m"
        );
        assert_eq!(seconds(400), "0.4 s");
        assert_eq!(seconds(5_250), "5.2 s");
        assert_eq!(seconds(61_000), "61 s");
    }

    #[test]
    fn status_table_is_readable_and_plain_without_colour() {
        let text = status(&status_info(), Style::PLAIN);
        assert!(!text.contains('\x1b'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "name        web1");
        assert_eq!(lines[1], "state       running");
        assert_eq!(lines[2], "uptime      1h 02m 03s");
        assert_eq!(lines[3], "kernel      mini  (next boot: debian)");
        assert!(text.contains("memory      512 MiB\n"));
        assert!(text.contains("last reset  watchdog expired\n"));
        assert!(text.contains(
            "watchdog    armed, 12 s left of 30 s; on expiry: reset (1 expiry so far)\n"
        ));
        assert!(text.contains("on panic    pause\n"));
        assert!(!text.contains("moving"));
    }

    #[test]
    fn status_says_when_the_vm_is_being_moved_and_slowed_down_for_it() {
        let mut s = status_info();
        s.migrating = true;
        let text = status(&s, Style::PLAIN);
        assert!(
            text.contains("moving      to another host, live\n"),
            "{text}"
        );
        s.throttle_pct = 40;
        let text = status(&s, Style::PLAIN);
        assert!(
            text.contains(
                "moving      to another host, live; slowed down 40 % until the copy catches up\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_says_when_the_host_is_saving_a_snapshot_of_the_vm() {
        let mut s = status_info();
        assert!(!status(&s, Style::PLAIN).contains("saving"));
        s.snapshotting = true;
        let text = status(&s, Style::PLAIN);
        assert!(
            text.contains("saving      a snapshot by the host; paused until it is written\n"),
            "{text}"
        );
    }

    #[test]
    fn status_colours_the_state_on_a_terminal() {
        let text = status(&status_info(), COLOR);
        assert!(text.contains("\x1b[1;32mrunning\x1b[0m"));
        assert_eq!(strip_ansi(&text), status(&status_info(), Style::PLAIN));
        let mut stopped = status_info();
        stopped.state = VmState::Stopped;
        stopped.watchdog = None;
        stopped.last_reset = None;
        stopped.next_kernel = Some("mini".into());
        let text = status(&stopped, COLOR);
        assert!(text.contains("\x1b[1;31mstopped\x1b[0m"));
        let plain = strip_ansi(&text);
        assert!(plain.contains("uptime      -\n"));
        assert!(plain.contains("kernel      mini\n"), "{plain}");
        assert!(plain.contains("last reset  never\n"));
        assert!(plain.contains("watchdog    none\n"));
        assert_eq!(Style::PLAIN.state(VmState::Paused), "paused");
        assert_eq!(COLOR.state(VmState::Paused), "\x1b[1;33mpaused\x1b[0m");
    }

    #[test]
    fn watchdog_summaries() {
        let mut w = WatchdogInfo {
            armed: false,
            timeout_s: None,
            seconds_left: None,
            action: WatchdogAction::Pause,
            expiries: 0,
        };
        assert_eq!(watchdog_summary(&w), "not armed; on expiry: pause");
        w.armed = true;
        w.timeout_s = Some(20);
        w.expiries = 3;
        assert_eq!(
            watchdog_summary(&w),
            "armed, 20 s timeout; on expiry: pause (3 expiries so far)"
        );
        let text = watchdog(&w, Style::PLAIN);
        assert!(text.contains("state       armed\n"));
        assert!(text.contains("timeout     20 s\n"));
        assert!(text.contains("action      pause (pause the VM)\n"));
        assert!(text.contains("expiries    3\n"));
        assert!(!text.contains("left"));
    }

    #[test]
    fn kernel_list_marks_current_and_next() {
        let k = KernelList {
            kernels: vec![
                KernelEntry {
                    name: "mini".into(),
                    version: Some("6.1.0".into()),
                    description: Some("tiny test kernel".into()),
                },
                KernelEntry {
                    name: "debian-generic".into(),
                    version: None,
                    description: None,
                },
            ],
            current: Some("mini".into()),
            next: Some("debian-generic".into()),
        };
        let text = kernels(&k, Style::PLAIN);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "  KERNEL          VERSION  DESCRIPTION");
        assert_eq!(
            lines[1],
            "* mini            6.1.0    tiny test kernel  [running]"
        );
        assert_eq!(lines[2], "  debian-generic  -  [next boot]");
        let show = kernel_show(&k, Style::PLAIN);
        assert_eq!(show, "running     mini\nnext boot   debian-generic\n");
        let empty = KernelList {
            kernels: vec![],
            current: None,
            next: None,
        };
        assert_eq!(
            kernels(&empty, Style::PLAIN),
            "The kernel library is empty.\n"
        );
        assert_eq!(
            kernel_show(&empty, Style::PLAIN),
            "running     unknown\nnext boot   unknown\n"
        );
    }

    #[test]
    fn list_table_aligns_and_marks_the_selection() {
        let rows = vec![
            ListRow {
                name: "web1".into(),
                status: Some(status_info()),
            },
            ListRow {
                name: "database".into(),
                status: Some(StatusInfo {
                    state: VmState::Stopped,
                    ..status_info()
                }),
            },
            ListRow {
                name: "odd".into(),
                status: None,
            },
        ];
        let text = list(&rows, Some("web1"), COLOR);
        let plain = strip_ansi(&text);
        let lines: Vec<&str> = plain.lines().collect();
        assert_eq!(lines[0], "  VM        STATE     UPTIME       KERNEL");
        assert_eq!(lines[1], "* web1      running   1h 02m 03s   mini");
        assert_eq!(lines[2], "  database  stopped   -            mini");
        assert_eq!(lines[3], "  odd       ?         ?            ?");
    }

    #[test]
    fn stop_outcomes_say_what_happened() {
        let graceful = StopOutcome {
            result: StopResult::Graceful,
            elapsed_ms: 5_210,
        };
        let forced = StopOutcome {
            result: StopResult::Forced,
            elapsed_ms: 60_000,
        };
        assert_eq!(
            stop_outcome("web1", false, &graceful, Style::PLAIN),
            "web1 shut down cleanly (5.2 s); it is stopped."
        );
        assert_eq!(
            stop_outcome("web1", false, &forced, Style::PLAIN),
            "web1 did not shut down in time: powered off after 60 s."
        );
        assert_eq!(
            stop_outcome("web1", true, &graceful, Style::PLAIN),
            "web1 rebooted cleanly (5.2 s)."
        );
        assert_eq!(
            stop_outcome("web1", true, &forced, Style::PLAIN),
            "web1 did not reboot in time: reset after 60 s."
        );
    }

    #[test]
    fn events_are_one_readable_line() {
        let cases = [
            (
                r#"{"event":"state_changed","state":"paused","previous":"running","vm":"web1","time":"T"}"#,
                "T web1 state: running -> paused",
            ),
            (
                r#"{"event":"reset","cause":"watchdog","vm":"web1","time":"T"}"#,
                "T web1 reset: watchdog expired",
            ),
            (
                r#"{"event":"boot","boot_count":3,"kernel":"mini","vm":"web1","time":"T"}"#,
                "T web1 boot #3 with kernel mini",
            ),
            (
                r#"{"event":"panic","action":"reset","vm":"web1","time":"T"}"#,
                "T web1 guest panic (action: reset)",
            ),
            (
                r#"{"event":"watchdog","action":"none","expiries":2,"vm":"web1","time":"T"}"#,
                "T web1 watchdog expired (action: none, 2 expiries so far)",
            ),
            (
                r#"{"event":"kernel_selected","kernel":"deb","vm":"web1","time":"T"}"#,
                "T web1 next boot will use kernel deb",
            ),
            (
                r#"{"event":"future","x":1,"vm":"web1","time":"T"}"#,
                "T web1 future x=1",
            ),
        ];
        for (line, want) in cases {
            let parsed = parse_response_line(line).unwrap();
            assert_eq!(event(&parsed, Style::PLAIN).unwrap(), want);
            let coloured = event(&parsed, COLOR).unwrap();
            assert_eq!(strip_ansi(&coloured), want);
        }
        let response = parse_response_line(r#"{"ok":true}"#).unwrap();
        assert_eq!(event(&response, Style::PLAIN), None);
    }
}
