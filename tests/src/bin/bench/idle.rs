//! Section 3, idle: the host CPU time of a guest that never wakes.

use std::time::{Duration, Instant};

use crate::launch::Vmm;
use crate::procfs;
use crate::report::{ratio, stats, Table};
use crate::{boot_idle, Ctx};

pub(super) fn idle(cx: &Ctx) -> Result<(), String> {
    let hz = procfs::clock_ticks_per_sec() as f64;
    let mut all: Vec<&Vmm> = vec![&cx.ours];
    if let Some(v) = &cx.qemu {
        all.push(v);
    }
    let secs = cx.o.idle_secs as f64;
    // per VMM: (tick ms, schedstat ms)
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); all.len()];
    for _ in 0..cx.o.idle_runs {
        let procs = all
            .iter()
            .map(|v| boot_idle(cx, v, None))
            .collect::<Result<Vec<_>, _>>()?;
        std::thread::sleep(Duration::from_secs(1));
        let before = procs
            .iter()
            .map(|p| Ok((procfs::cpu_ticks(p.pid)?, procfs::sched_ns(p.pid)?)))
            .collect::<Result<Vec<_>, String>>()?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(cx.o.idle_secs));
        for (i, p) in procs.iter().enumerate() {
            let (t1, s1) = (procfs::cpu_ticks(p.pid)?, procfs::sched_ns(p.pid)?);
            let w = t0.elapsed().as_secs_f64();
            let scale = secs / w; // normalise to exactly idle_secs
            res[i].0.push((t1 - before[i].0) as f64 / hz * 1e3 * scale);
            res[i]
                .1
                .push(s1.saturating_sub(before[i].1) as f64 / 1e6 * scale);
            if !p.alive() {
                return Err(format!("{} ended during the idle window", all[i].label()));
            }
        }
        for p in &procs {
            p.kill();
        }
    }
    let mut t = Table::new(&[
        format!("CPU time over {} s (median)", cx.o.idle_secs).as_str(),
        "n",
        "utime+stime",
        "on-CPU (schedstat)",
        "% of one CPU",
        "vs vmm",
    ]);
    let base = stats(&res[0].1).map(|s| s.median);
    for (i, v) in all.iter().enumerate() {
        let ticks = stats(&res[i].0).map(|s| s.median);
        let sched = stats(&res[i].1).map(|s| s.median);
        t.row(vec![
            v.label(),
            res[i].0.len().to_string(),
            ticks
                .map(|x| format!("{x:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            sched
                .map(|x| format!("{x:.2} ms"))
                .unwrap_or_else(|| "-".into()),
            sched
                .map(|x| format!("{:.3} %", x / 10.0 / secs))
                .unwrap_or_else(|| "-".into()),
            match (i, base) {
                (0, _) => "1.00x".into(),
                (_, Some(b)) if b < 0.005 => "vmm ~ 0".into(),
                _ => ratio(sched, base),
            },
        ]);
    }
    t.print();
    println!(
        "  utime+stime has {:.0} ms resolution; schedstat sums the threads' run time in ns. Both VMMs idle at the same time; target: vmm ~ 0.",
        1e3 / hz
    );
    Ok(())
}
