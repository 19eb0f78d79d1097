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
//!
//! The `converge` rows (`--only converge`, the first `--mib` size): a
//! guest that rewrites a 48 MiB tmpfs file with random bytes as fast as it
//! can, over a link paced to a quarter of the rate its own `dd` measured
//! first (`speed_mib_s`; QEMU's `max-bandwidth`): ours without and with
//! `auto_converge`, QEMU with its `auto-converge` capability (without it
//! QEMU's migration never ends). Random bytes, since both skip zero pages.

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

/// The fast writer: 48 MiB of random bytes made once; four copies over
/// the same file timed from `/proc/uptime` (Debian's busybox `dd` prints no
/// rate) and printed as `vmm-bench: hot BYTES bytes copied, SECONDS
/// seconds` (the word through a variable, so that the echoed command line
/// does not match); then the copy again and again without pause.
const HOT: &str = "dd if=/dev/urandom of=/tmp/src bs=1M count=48 2>/dev/null; up() { cut -d' ' -f1 /proc/uptime; }; t0=$(up); for i in 1 2 3 4; do dd if=/tmp/src of=/tmp/hot bs=1M conv=notrunc 2>/dev/null; done; t1=$(up); X=hot; echo \"vmm-bench: $X 201326592 bytes copied, $(awk \"BEGIN { print $t1 - $t0 }\") seconds\"; (while :; do dd if=/tmp/src of=/tmp/hot bs=1M conv=notrunc 2>/dev/null; done) >/dev/null 2>&1 & echo HOT-$((40+2))-ON\n";
const HOT_ON: &str = "HOT-42-ON";

/// What the guest does while it moves.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Idle,
    /// `LOAD`: 32 MiB rewritten every second.
    Writing,
    /// `HOT` over a link a quarter of its rate; `auto_converge` (QEMU's
    /// `auto-converge` capability) or not.
    Hot {
        auto: bool,
    },
}

/// One migration's figures.
struct Moved {
    total_s: f64,
    downtime_s: f64,
    /// Ours: the answer's `passes`; QEMU: `dirty-sync-count`.
    passes: Option<f64>,
    /// The most the guest was slowed down, in %.
    throttle: f64,
    /// The paced link, MiB/s (`Load::Hot`).
    link_mib_s: Option<u64>,
}

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

/// One migration of `peer`.
fn once(h: &Host, peer: Peer, g: &Guest, dir: &HostDir, port: u16, load: Load) -> Option<Moved> {
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
    let (typed, on) = match load {
        Load::Idle => ("", ""),
        Load::Writing => (LOAD, LOAD_ON),
        Load::Hot { .. } => (HOT, HOT_ON),
    };
    if !typed.is_empty() {
        src.send(typed);
        if !matches!(wait_marker(h, &src, on), Wait::Seen) {
            eprintln!("{}: the load did not start\n{}", peer.label(), src.report());
            let _ = src.child.kill();
            return None;
        }
    }
    // A quarter of what the guest's own copy measured, at least 1 MiB/s.
    let link_mib_s = match load {
        Load::Hot { .. } => match super::dd_rate(&src.output(), "hot") {
            Some(mb_s) => Some(((mb_s * 1e6 / 1048576.0 / 4.0) as u64).max(1)),
            None => {
                eprintln!("{}: no write rate\n{}", peer.label(), src.report());
                let _ = src.child.kill();
                return None;
            }
        },
        _ => None,
    };
    let mut dst = start(h, &[], &argv(peer, g, "", &dst_extra));
    h.sh(&format!(
        "for i in $(seq 1 300); do ss -ltn | grep -q :{port} && exit 0; sleep 0.1; done; exit 1"
    ))
    .ok("the target listens");
    let t0 = Instant::now();
    let r = match peer {
        Peer::Ours => {
            let extra = match (load, link_mib_s) {
                (Load::Hot { auto }, Some(mib)) => {
                    format!(",\"speed_mib_s\":{mib},\"auto_converge\":{auto}")
                }
                _ => String::new(),
            };
            let out = h
                .sh(&format!(
                    "echo '{{\"cmd\":\"migrate\",\"to\":\"127.0.0.1:{port}\",\"token\":\"{TOKEN}\"{extra}}}' | socat -t 900 - UNIX-CONNECT:{src_sock}"
                ))
                .stdout;
            match (field(&out, "total_ms"), field(&out, "downtime_ms")) {
                (Some(t), Some(d)) if out.contains("\"ok\":true") => Ok(Moved {
                    total_s: t / 1e3,
                    downtime_s: d / 1e3,
                    passes: field(&out, "passes"),
                    throttle: field(&out, "throttle_pct").unwrap_or(0.0),
                    link_mib_s,
                }),
                _ => Err(out),
            }
        }
        _ => {
            let mut cmds = Vec::new();
            if let (Load::Hot { auto }, Some(mib)) = (load, link_mib_s) {
                cmds.push(format!(
                    "{{\"execute\":\"migrate-set-capabilities\",\"arguments\":{{\"capabilities\":[{{\"capability\":\"auto-converge\",\"state\":{auto}}}]}}}}"
                ));
                cmds.push(format!(
                    "{{\"execute\":\"migrate-set-parameters\",\"arguments\":{{\"max-bandwidth\":{}}}}}",
                    mib * 1048576
                ));
            }
            cmds.push(format!(
                "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"tcp:127.0.0.1:{port}\"}}}}"
            ));
            let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qmp(h, &src_sock, &cmds);
            // The most `cpu-throttle-percentage` shown on the way: a
            // completed migration shows none.
            let mut throttle = 0f64;
            qmp_until(
                h,
                &src_sock,
                "{\"execute\":\"query-migrate\"}",
                "\"completed\"",
                "\"failed\"",
                |out| {
                    if let Some(t) = field(out, "cpu-throttle-percentage") {
                        throttle = throttle.max(t);
                    }
                },
            )
            .map(|out| Moved {
                total_s: field(&out, "total-time").unwrap_or(f64::NAN) / 1e3,
                downtime_s: field(&out, "downtime").unwrap_or(f64::NAN) / 1e3,
                passes: field(&out, "dirty-sync-count"),
                throttle,
                link_mib_s,
            })
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
                "{} {} MiB {}: total {:.2} s, downtime {:.3} s, passes {}, throttle {} %{} (wall {:.2} s)",
                peer.label(),
                g.memory_mib,
                match load {
                    Load::Idle => "idle".to_string(),
                    Load::Writing => "writing".to_string(),
                    Load::Hot { auto } => format!("hot writer, auto-converge {auto}"),
                },
                v.total_s,
                v.downtime_s,
                v.passes.map_or("-".into(), |p| p.to_string()),
                v.throttle,
                v.link_mib_s
                    .map_or(String::new(), |l| format!(", link {l} MiB/s")),
                wall.as_secs_f64()
            );
            Some(v)
        }
        Err(e) => {
            eprintln!(
                "{}: the migration failed: {e}\nsource:\n{}\ntarget:\n{}",
                peer.label(),
                src.report(),
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
    for (mib, load) in sizes
        .iter()
        .flat_map(|&m| [(m, Load::Idle), (m, Load::Writing)])
    {
        let g = sized(g, mib);
        let mut got: Vec<Vec<Moved>> = peers.iter().map(|_| Vec::new()).collect();
        for _ in 0..runs {
            for (i, p) in peers.iter().enumerate() {
                port += 1;
                if let Some(t) = once(h, *p, &g, &dir, port, load) {
                    got[i].push(t);
                }
            }
        }
        let med = |i: usize, f: fn(&Moved) -> f64| median(&got[i], f);
        for (i, p) in peers.iter().enumerate() {
            tab.row(vec![
                format!(
                    "{} {mib} MiB {} ({} runs)",
                    p.label(),
                    if load == Load::Writing {
                        "writing 32 MiB/s"
                    } else {
                        "idle"
                    },
                    got[i].len()
                ),
                med(i, |t| t.total_s).map_or("-".into(), report::dur),
                med(i, |t| t.downtime_s).map_or("-".into(), report::dur),
                if i == 0 {
                    String::new()
                } else {
                    report::ratio(med(i, |t| t.total_s), med(0, |t| t.total_s))
                },
                if i == 0 {
                    String::new()
                } else {
                    report::ratio(med(i, |t| t.downtime_s), med(0, |t| t.downtime_s))
                },
            ]);
        }
    }
    tab.print();
}

/// The `converge` rows: the fast writer over a paced link (see the top).
pub fn converge_rows(runs: usize, g: &Guest, mib: u32) {
    let h = host();
    let dir = HostDir::new(h, "bench-converge");
    let cases = [
        (Peer::Ours, false),
        (Peer::Ours, true),
        (Peer::Microvm, true),
    ];
    let g = sized(g, mib);
    let mut got: Vec<Vec<Moved>> = cases.iter().map(|_| Vec::new()).collect();
    let mut port = 46000u16;
    for _ in 0..runs {
        for (i, (p, auto)) in cases.iter().enumerate() {
            port += 1;
            if let Some(t) = once(h, *p, &g, &dir, port, Load::Hot { auto: *auto }) {
                got[i].push(t);
            }
        }
    }
    let mut tab = Table::new(&[
        &format!("mini {mib} MiB, hot writer, link 1/4 of its rate"),
        "total median",
        "downtime median",
        "passes median",
        "most throttle median",
        "downtime / vmm's (auto-converge)",
    ]);
    for (i, (p, auto)) in cases.iter().enumerate() {
        let med = |f: fn(&Moved) -> f64| median(&got[i], f);
        tab.row(vec![
            format!(
                "{}, auto-converge {} ({} runs)",
                p.label(),
                if *auto { "on" } else { "off" },
                got[i].len()
            ),
            med(|t| t.total_s).map_or("-".into(), report::dur),
            med(|t| t.downtime_s).map_or("-".into(), report::dur),
            med(|t| t.passes.unwrap_or(f64::NAN)).map_or("-".into(), |p| format!("{p:.0}")),
            med(|t| t.throttle).map_or("-".into(), |p| format!("{p:.0} %")),
            if i == 1 {
                String::new()
            } else {
                report::ratio(med(|t| t.downtime_s), median(&got[1], |t| t.downtime_s))
            },
        ]);
    }
    tab.print();
}

/// `g` with `mib` of memory.
fn sized(g: &Guest, mib: u32) -> Guest {
    Guest {
        memory_mib: mib,
        kernel: g.kernel.clone(),
        initrd: g.initrd.clone(),
        cmdline: g.cmdline.clone(),
    }
}

/// The median of `f` over the runs that have it.
fn median(runs: &[Moved], f: fn(&Moved) -> f64) -> Option<f64> {
    let v: Vec<f64> = runs.iter().map(f).filter(|x| x.is_finite()).collect();
    stats(&v).map(|s| s.median)
}
