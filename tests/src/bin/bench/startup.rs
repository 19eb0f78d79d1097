//! Section 1, start-up: a tiny guest that powers off at once, timed from
//! spawn to exit, and the vmm's own log lines that time its phases.

use std::time::{Duration, UNIX_EPOCH};

use crate::launch::{Boot, Vmm};
use crate::proc::{strip_ansi, Proc};
use crate::report::{ratio, stats, Stats, Table};
use crate::Ctx;

/// Parses the vmm's "first KVM_RUN <dur> after process start" log line:
/// (that duration, the line's UTC timestamp in seconds since the epoch).
pub fn first_kvm_run(stderr: &str) -> Option<(f64, Option<f64>)> {
    let text = strip_ansi(stderr);
    let line = text.lines().find(|l| l.contains("first KVM_RUN "))?;
    let d = line
        .split("first KVM_RUN ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let ts = line.split_whitespace().next().and_then(parse_rfc3339);
    Some((parse_debug_duration(d)?, ts))
}

/// The timestamp of the first log line containing `needle`.
fn log_time(stderr: &str, needle: &str) -> Option<f64> {
    let text = strip_ansi(stderr);
    let line = text.lines().find(|l| l.contains(needle))?;
    parse_rfc3339(line.split_whitespace().next()?)
}

/// `Duration`'s Debug form: 9.45ms, 850.2µs, 1.2s, 120ns.
fn parse_debug_duration(s: &str) -> Option<f64> {
    for (suf, mul) in [
        ("ns", 1e-9),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
    ] {
        if let Some(v) = s.strip_suffix(suf) {
            return v.parse::<f64>().ok().map(|v| v * mul);
        }
    }
    None
}

/// `2026-11-25T02:39:23.708485Z` -> seconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // days from civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

#[derive(Default)]
struct StartSamples {
    exit: Vec<f64>,
    first_internal: Vec<f64>,
    first_spawn: Vec<f64>,
    run_to_stop: Vec<f64>,
    stop_to_exit: Vec<f64>,
}

fn start_once(cx: &Ctx, v: &Vmm, s: &mut StartSamples) -> Result<(), String> {
    let mut c = v.command(&Boot {
        kernel: &cx.guests.exit_now,
        memory_mib: cx.o.memory,
        serial: false,
        control: None,
        log_info: true,
    });
    let p = Proc::spawn(&mut c, &v.label())?;
    let (st, t) = p
        .wait_exit(Duration::from_secs(60))
        .ok_or_else(|| format!("{}: the guest did not power off in 60 s", v.label()))?;
    if st.code() != Some(v.poweroff_status()) {
        return Err(format!(
            "{}: expected exit status {}, {}",
            v.label(),
            v.poweroff_status(),
            p.describe()
        ));
    }
    s.exit.push(t.duration_since(p.spawned).as_secs_f64());
    if let Vmm::Ours(_) = v {
        // stderr is complete once the process has ended and the pipe closed
        p.err.wait_closed(Duration::from_secs(2));
        let (d, ts) = first_kvm_run(&p.err.text()).ok_or_else(|| {
            format!(
                "vmm printed no \"first KVM_RUN\" line with VMM_LOG=info: {}",
                p.describe()
            )
        })?;
        s.first_internal.push(d);
        let spawned = p
            .spawned_wall
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let exited = spawned + t.duration_since(p.spawned).as_secs_f64();
        if let Some(ts) = ts {
            s.first_spawn.push(ts - spawned);
            if let Some(stop) = log_time(&p.err.text(), "\"state\":\"stopped\"") {
                s.run_to_stop.push(stop - ts);
                s.stop_to_exit.push(exited - stop);
            }
        }
    }
    Ok(())
}

pub(super) fn startup(cx: &Ctx) -> Result<(), String> {
    let n = cx.o.runs;
    let mut ours = StartSamples::default();
    let mut q = StartSamples::default();
    let mut pc = StartSamples::default();
    // One warm-up each (page cache, first exec), then interleaved runs.
    start_once(cx, &cx.ours, &mut StartSamples::default())?;
    if let Some(v) = &cx.qemu {
        start_once(cx, v, &mut StartSamples::default())?;
    }
    for _ in 0..n {
        start_once(cx, &cx.ours, &mut ours)?;
        if let Some(v) = &cx.qemu {
            start_once(cx, v, &mut q)?;
        }
    }
    if let Some(v) = &cx.qemu_pc {
        for _ in 0..cx.o.pc_runs {
            start_once(cx, v, &mut pc)?;
        }
    }
    let med = |v: &[f64]| stats(v).map(|s| s.median);
    let target = |s: Option<Stats>, lim: f64| match s {
        Some(s) if s.median < lim => "met".to_string(),
        Some(_) => "missed".to_string(),
        None => "-".to_string(),
    };
    let mut t = Table::new(&[
        "measurement",
        "n",
        "median",
        "p90",
        "min",
        "max",
        "vs vmm",
        "target",
    ]);
    let fi = stats(&ours.first_internal);
    t.dur_row(
        "vmm: process start -> first KVM_RUN (vmm's own log)",
        fi,
        &["".into(), format!("< 5 ms: {}", target(fi, 5e-3))],
    );
    let fs = stats(&ours.first_spawn);
    t.dur_row(
        "vmm: spawn -> first KVM_RUN (log timestamp)",
        fs,
        &["".into(), format!("< 5 ms: {}", target(fs, 5e-3))],
    );
    t.dur_row(
        "vmm: first KVM_RUN -> \"stopped\" event (log)",
        stats(&ours.run_to_stop),
        &[],
    );
    t.dur_row(
        "vmm: \"stopped\" event -> process exit",
        stats(&ours.stop_to_exit),
        &[],
    );
    t.dur_row(
        "vmm: spawn -> exit (guest powers off at once)",
        stats(&ours.exit),
        &["1.00x".into()],
    );
    if let Some(v) = &cx.qemu {
        t.dur_row(
            &format!("{}: spawn -> exit", v.label()),
            stats(&q.exit),
            &[ratio(med(&q.exit), med(&ours.exit))],
        );
    }
    if let Some(v) = &cx.qemu_pc {
        t.dur_row(
            &format!("{}: spawn -> exit (SeaBIOS)", v.label()),
            stats(&pc.exit),
            &[ratio(med(&pc.exit), med(&ours.exit))],
        );
    }
    t.print();
    println!("  \"process start\" in the vmm's log is when it opens /dev/kvm (after exec, dynamic loading and argument parsing); \"spawn\" is fork+exec in this benchmark.");
    println!("  Runs interleaved vmm/QEMU after one warm-up each; VMM_LOG=info for the vmm (for its log lines).");
    println!("  \"vs vmm\" = this row's median / the vmm's spawn -> exit median.");
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_the_first_kvm_run_log_line() {
        let l = "\x1b[2m2026-11-25T02:39:23.708485Z\x1b[0m \x1b[32m INFO\x1b[0m vmm::vm: first KVM_RUN 9.455501ms after process start\n";
        let (d, ts) = first_kvm_run(l).expect("parsed");
        assert!((d - 9.455501e-3).abs() < 1e-12);
        let ts = ts.expect("timestamp");
        assert!((ts - 1_795_574_363.708_485).abs() < 1e-5, "{ts}");
        let us = parse_debug_duration("850.5µs").expect("µs");
        assert!((us - 850.5e-6).abs() < 1e-15);
        assert_eq!(parse_debug_duration("2s"), Some(2.0));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1.5));
    }
}
