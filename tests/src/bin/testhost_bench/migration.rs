//! The `migration` rows: an idle `mini` guest (at its user-space marker) of
//! 256 MiB and 1 GiB migrated live between two processes on this host over
//! TCP on the loopback.
//!
//! * ours: `{"cmd":"migrate",..}` to a `vmm --incoming`; total time and
//!   downtime as the answer reports them (request to the target's
//!   go-ahead; pause to go-ahead);
//! * QEMU `-M microvm`: QMP `migrate` to a QEMU started with `-incoming
//!   tcp:...`, its `total-time` and `downtime` from `query-migrate`.
//!
//! Both self-reported, the same guest and command line. Each size is
//! measured idle and under a memory-writing load: a shell loop in the
//! guest rewrites a 32 MiB tmpfs file every second (through its console,
//! once it is at its marker), so every pass finds pages written since.
//! Sizes: `--mib` (256, 1024 and 4096 MiB by default).

use std::time::{Duration, Instant};

use tests::guest::HostDir;
use tests::{host, Host};

use super::report::{self, stats, Table};
use super::snapshot::{qmp, qmp_until};
use super::{argv, start, wait_marker, Guest, Peer, Wait, MARKER};

/// The guest's memory-writing load, typed on its console; the marker it
/// prints once started is computed, so the echoed command line does not
/// contain it.
const LOAD: &str = "(while :; do dd if=/dev/zero of=/tmp/load bs=1M count=32 conv=notrunc 2>/dev/null; sleep 1; done) >/dev/null 2>&1 & echo LOAD-$((40+2))-ON\n";
const LOAD_ON: &str = "LOAD-42-ON";
const TOKEN: &str = "bench-token-0123456789abcdef";

/// A number field of a JSON text (`"name":123`).
fn field(text: &str, name: &str) -> Option<f64> {
    let at = text.find(&format!("\"{name}\":"))? + name.len() + 3;
    // QMP puts a space after the colon; ours does not.
    let digits: String = text[at..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// (total s, downtime s) of one migration of `peer`.
fn once(
    h: &Host,
    peer: Peer,
    g: &Guest,
    dir: &HostDir,
    port: u16,
    load: bool,
) -> Option<(f64, f64)> {
    let src_sock = dir.join("src.sock");
    let dst_sock = dir.join("dst.sock");
    let tok = dir.join("token");
    h.sh(&format!("echo {TOKEN} > {tok}")).ok("token");
    let (src_extra, dst_extra): (Vec<String>, Vec<String>) = match peer {
        Peer::Ours => (
            vec![
                "--control".into(),
                src_sock.clone(),
                "--name".into(),
                "src".into(),
            ],
            vec![
                "--control".into(),
                dst_sock.clone(),
                "--name".into(),
                "dst".into(),
                "--incoming".into(),
                format!("127.0.0.1:{port}"),
                "--incoming-token-file".into(),
                tok.clone(),
            ],
        ),
        _ => (
            vec!["-qmp".into(), format!("unix:{src_sock},server,nowait")],
            vec![
                "-qmp".into(),
                format!("unix:{dst_sock},server,nowait"),
                "-incoming".into(),
                format!("tcp:127.0.0.1:{port}"),
            ],
        ),
    };
    let mut src = start(h, &[], &argv(peer, g, "", &src_extra));
    if !matches!(wait_marker(h, &src, MARKER), Wait::Seen) {
        eprintln!("{}: no {MARKER}\n{}", peer.label(), src.report());
        let _ = src.child.kill();
        return None;
    }
    if load {
        src.send(LOAD);
        if !matches!(wait_marker(h, &src, LOAD_ON), Wait::Seen) {
            eprintln!("{}: the load did not start\n{}", peer.label(), src.report());
            let _ = src.child.kill();
            return None;
        }
    }
    let mut dst = start(h, &[], &argv(peer, g, "", &dst_extra));
    h.sh(&format!(
        "for i in $(seq 1 300); do ss -ltn | grep -q :{port} && exit 0; sleep 0.1; done; exit 1"
    ))
    .ok("the target listens");
    let t0 = Instant::now();
    let r = match peer {
        Peer::Ours => {
            let out = h
                .sh(&format!(
                    "echo '{{\"cmd\":\"migrate\",\"to\":\"127.0.0.1:{port}\",\"token\":\"{TOKEN}\"}}' | socat -t 900 - UNIX-CONNECT:{src_sock}"
                ))
                .stdout;
            match (field(&out, "total_ms"), field(&out, "downtime_ms")) {
                (Some(t), Some(d)) if out.contains("\"ok\":true") => Ok((t / 1e3, d / 1e3)),
                _ => Err(out),
            }
        }
        _ => {
            qmp(
                h,
                &src_sock,
                &[&format!(
                    "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"tcp:127.0.0.1:{port}\"}}}}"
                )],
            );
            match qmp_until(
                h,
                &src_sock,
                "{\"execute\":\"query-migrate\"}",
                "\"completed\"",
                "\"failed\"",
            ) {
                Ok(()) => {
                    let out = qmp(h, &src_sock, &["{\"execute\":\"query-migrate\"}"]);
                    match (field(&out, "total-time"), field(&out, "downtime")) {
                        (Some(t), Some(d)) => Ok((t / 1e3, d / 1e3)),
                        _ => Err(out),
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    let wall = t0.elapsed();
    let _ = src.child.kill();
    let _ = dst.child.kill();
    let _ = src.wait_exit(Duration::from_secs(30));
    let _ = dst.wait_exit(Duration::from_secs(30));
    match r {
        Ok(v) => {
            eprintln!(
                "{} {} MiB{}: total {:.2} s, downtime {:.3} s (wall {:.2} s)",
                peer.label(),
                g.memory_mib,
                if load { " writing" } else { "" },
                v.0,
                v.1,
                wall.as_secs_f64()
            );
            Some(v)
        }
        Err(e) => {
            eprintln!(
                "{}: the migration failed: {e}\n{}",
                peer.label(),
                dst.report()
            );
            None
        }
    }
}

pub fn rows(runs: usize, g: &Guest, sizes: &[u32]) {
    let h = host();
    let dir = HostDir::new(h, "bench-migration");
    let peers = [Peer::Ours, Peer::Microvm];
    let mut tab = Table::new(&[
        "mini guest, loopback",
        "total median",
        "downtime median",
        "QEMU / vmm total",
        "QEMU / vmm downtime",
    ]);
    let mut port = 45000u16;
    for (mib, load) in sizes.iter().flat_map(|&m| [(m, false), (m, true)]) {
        let g = Guest {
            memory_mib: mib,
            kernel: g.kernel.clone(),
            initrd: g.initrd.clone(),
            cmdline: g.cmdline.clone(),
        };
        let mut got: Vec<Vec<(f64, f64)>> = vec![Vec::new(); peers.len()];
        for _ in 0..runs {
            for (i, p) in peers.iter().enumerate() {
                port += 1;
                if let Some(t) = once(h, *p, &g, &dir, port, load) {
                    got[i].push(t);
                }
            }
        }
        let med = |i: usize, f: fn(&(f64, f64)) -> f64| {
            stats(&got[i].iter().map(f).collect::<Vec<_>>()).map(|s| s.median)
        };
        for (i, p) in peers.iter().enumerate() {
            tab.row(vec![
                format!(
                    "{} {mib} MiB {} ({} runs)",
                    p.label(),
                    if load { "writing 32 MiB/s" } else { "idle" },
                    got[i].len()
                ),
                med(i, |t| t.0).map_or("-".into(), report::dur),
                med(i, |t| t.1).map_or("-".into(), report::dur),
                if i == 0 {
                    String::new()
                } else {
                    report::ratio(med(i, |t| t.0), med(0, |t| t.0))
                },
                if i == 0 {
                    String::new()
                } else {
                    report::ratio(med(i, |t| t.1), med(0, |t| t.1))
                },
            ]);
        }
    }
    tab.print();
}
