//! The `memory` rows: how fast the guest's own memory is, ours against
//! QEMU `-M microvm` with the same guest. `mini` (256 MiB, 1 vCPU) at its
//! shell writes 160 MiB of zeros into a new tmpfs file (every page touched
//! for the first time: each costs the host a page fault and KVM a mapping),
//! then over the same file again (memory already mapped). Timed in the
//! guest from `/proc/uptime`. QEMU maps guest RAM on 2 MiB boundaries with
//! `MADV_HUGEPAGE`, as we do since 2026-12-07; before, ours were 4 KiB
//! pages to KVM and the first write ran at ~0.4 of QEMU's.

use std::time::Duration;

use tests::host;

use super::report::{self, Table};
use super::{argv, median, try_start, unwedged, wait_marker, Guest, Peer, Wait, MARKER};

const MIB: f64 = 160.0;

/// Typed at the shell; prints `vmm-bench: touch T0 T1 T2` (the word through
/// a variable, so that the echoed command line does not match).
const SCRIPT: &str = "up() { cut -d' ' -f1 /proc/uptime; }; t0=$(up); dd if=/dev/zero of=/tmp/m bs=1M count=160 2>/dev/null; t1=$(up); dd if=/dev/zero of=/tmp/m bs=1M count=160 conv=notrunc 2>/dev/null; t2=$(up); X=touch; echo \"vmm-bench: $X $t0 $t1 $t2\"\n";

/// (first write MiB/s, rewrite MiB/s) of one guest of `peer`.
fn once(peer: Peer, g: &Guest) -> Option<(f64, f64)> {
    let h = host();
    unwedged(peer.label(), || {
        let mut p = try_start(h, &[], &argv(peer, g, "", &[]))?;
        let w = wait_marker(h, &p, MARKER);
        let from = p.len();
        if matches!(w, Wait::Seen) {
            p.send(SCRIPT);
        }
        let w = match w {
            Wait::Seen => wait_marker(h, &p, "vmm-bench: touch "),
            other => other,
        };
        // The whole line, up to its newline.
        let line = p
            .wait_until(from, Duration::from_secs(30), |out: &str| {
                out.split_inclusive('\n')
                    .find(|l| l.starts_with("vmm-bench: touch ") && l.ends_with('\n'))
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let _ = p.child.kill();
        let _ = p.wait_exit(Duration::from_secs(10));
        let t: Vec<f64> = line
            .split_whitespace()
            .skip(2)
            .filter_map(|w| w.parse().ok())
            .collect();
        match (w, t.as_slice()) {
            (Wait::Seen, [t0, t1, t2]) if t1 > t0 && t2 > t1 => {
                Ok((MIB / (t1 - t0), MIB / (t2 - t1)))
            }
            (Wait::Seen, _) => {
                eprintln!("{}: no timing\n{}", peer.label(), p.output_from(from));
                Err(Wait::TimedOut)
            }
            (other, _) => {
                eprintln!("{}: no {MARKER} or no timing\n{}", peer.label(), p.report());
                Err(other)
            }
        }
    })
}

pub fn rows(runs: usize, g: &Guest) {
    let peers = [Peer::Ours, Peer::Microvm];
    let mut got: Vec<Vec<(f64, f64)>> = vec![Vec::new(); peers.len()];
    for r in 0..runs {
        for (i, p) in peers.iter().enumerate() {
            if let Some(t) = once(*p, g) {
                eprintln!(
                    "{}: first write {:.1} MiB/s, rewrite {:.1} MiB/s",
                    p.label(),
                    t.0,
                    t.1
                );
                got[i].push(t);
            }
        }
        eprintln!("memory run {}/{runs} done", r + 1);
    }
    let med = |i: usize, f: fn(&(f64, f64)) -> f64| {
        median(&got[i].iter().map(f).collect::<Vec<_>>()).map(|s| s.median)
    };
    let mut tab = Table::new(&[
        "mini 256 MiB, 160 MiB dd into tmpfs",
        "runs",
        "first write MiB/s",
        "rewrite MiB/s",
        "vmm / QEMU first",
        "vmm / QEMU rewrite",
    ]);
    for (i, p) in peers.iter().enumerate() {
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        tab.row(vec![
            p.label().into(),
            got[i].len().to_string(),
            fmt(med(i, |t| t.0)),
            fmt(med(i, |t| t.1)),
            if i == 0 {
                report::ratio(med(0, |t| t.0), med(1, |t| t.0))
            } else {
                String::new()
            },
            if i == 0 {
                report::ratio(med(0, |t| t.1), med(1, |t| t.1))
            } else {
                String::new()
            },
        ]);
    }
    tab.print();
}
