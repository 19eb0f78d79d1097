//! The `snapshot` rows: an idle `mini` guest (at its user-space marker) of
//! each size (`--mib`: 256 MiB, 1 GiB and 4 GiB by default) saved to a
//! file and continued by a new process.
//!
//! * ours: `{"cmd":"snapshot","dir":..,"stop":true}` timed from the
//!   request to its answer (the guest paused throughout, `paused_us`),
//!   then `vmm --restore` timed from spawn to the console's
//!   "restored from snapshot" line (written when the machine is back,
//!   just before its vCPUs run);
//! * QEMU `-M microvm`: QMP `stop` then `migrate` to `exec:cat > FILE`,
//!   timed from the request to `query-migrate` saying `completed`, then a
//!   new QEMU with `-incoming "exec:cat FILE"` timed from spawn to
//!   `query-status` saying `running`. QMP is polled every 50 ms, so QEMU's
//!   figures may be up to that much long.
//!
//! The same guest, kernel and command line for both; the files on the same
//! disk. For guests over 1 GiB the bench gives the test host more memory
//! (`VMM_TESTHOST_MEMORY`, unless set): twice the largest guest and 4 GiB.

use std::time::{Duration, Instant};

use tests::guest::HostDir;
use tests::{bin, host, Host};

use super::report::{self, stats, Table};
use super::{argv, start, wait_marker, Guest, Peer, Wait, MARKER};

/// One QMP session: capabilities, then `cmds`; the whole reply text.
pub fn qmp(h: &Host, sock: &str, cmds: &[&str]) -> String {
    let mut lines = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for c in cmds {
        lines.push_str(c);
        lines.push('\n');
    }
    h.sh(&format!(
        "printf '%s' '{lines}' | socat -t 2 - UNIX-CONNECT:{sock}"
    ))
    .stdout
}

/// Polls `cmd` over QMP until its reply contains `want` (or `fail`), and
/// returns that reply; `each` sees every reply on the way.
pub fn qmp_until(
    h: &Host,
    sock: &str,
    cmd: &str,
    want: &str,
    fail: &str,
    mut each: impl FnMut(&str),
) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(900);
    while Instant::now() < deadline {
        let out = qmp(h, sock, &[cmd]);
        each(&out);
        if out.contains(want) {
            return Ok(out);
        }
        if out.contains(fail) {
            return Err(out);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("no {want} in 900 s"))
}

/// (save seconds, restore seconds, file bytes) of one run of `peer`.
fn once(h: &Host, peer: Peer, g: &Guest, dir: &HostDir) -> Option<(f64, f64, u64)> {
    let snaps = dir.join("snaps");
    h.sh(&format!("rm -rf {snaps}; mkdir -p {snaps}"))
        .ok("snapshot directory");
    let sock = dir.join("ctl.sock");
    let file = format!("{snaps}/qemu.state");
    let extra: Vec<String> = match peer {
        Peer::Ours => vec![
            "--control".into(),
            sock.clone(),
            "--snapshot-dir".into(),
            snaps.clone(),
            "--name".into(),
            "bench".into(),
        ],
        _ => vec!["-qmp".into(), format!("unix:{sock},server,nowait")],
    };
    let mut p = start(h, &[], &argv(peer, g, "", &extra));
    if !matches!(wait_marker(h, &p, MARKER), Wait::Seen) {
        eprintln!("{}: no {MARKER}\n{}", peer.label(), p.report());
        let _ = p.child.kill();
        return None;
    }
    let t0 = Instant::now();
    let saved = match peer {
        Peer::Ours => {
            let out = h
                .sh(&format!(
                    "echo '{{\"cmd\":\"snapshot\",\"dir\":\"s\",\"stop\":true}}' | socat -t 900 - UNIX-CONNECT:{sock}"
                ))
                .stdout;
            out.contains("\"ok\":true").then_some(()).ok_or(out)
        }
        _ => {
            qmp(
                h,
                &sock,
                &[
                    "{\"execute\":\"stop\"}",
                    &format!(
                        "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"exec:cat > {file}\"}}}}"
                    ),
                ],
            );
            qmp_until(
                h,
                &sock,
                "{\"execute\":\"query-migrate\"}",
                "\"completed\"",
                "\"failed\"",
                |_| {},
            )
            .map(drop)
        }
    };
    let save_s = t0.elapsed().as_secs_f64();
    let _ = p.child.kill();
    let _ = p.wait_exit(Duration::from_secs(30));
    if let Err(e) = saved {
        eprintln!("{}: the save failed: {e}", peer.label());
        return None;
    }
    let bytes: u64 = h
        .sh(&format!("du -B1 -s {snaps} | cut -f1"))
        .stdout
        .trim()
        .parse()
        .unwrap_or(0);

    let t1 = Instant::now();
    let restored = match peer {
        Peer::Ours => {
            let mut args = argv(peer, g, "", &extra);
            args.extend(["--restore".to_string(), format!("{snaps}/s")]);
            let mut q = start(h, &[], &args);
            let ok = q.wait_for("restored from snapshot", Duration::from_secs(900));
            let t = t1.elapsed().as_secs_f64();
            if !ok {
                eprintln!("vmm: no restore\n{}", q.report());
            }
            let _ = q.child.kill();
            ok.then_some(t)
        }
        _ => {
            let mut args = argv(peer, g, "", &extra);
            args.extend(["-incoming".to_string(), format!("exec:cat {file}")]);
            let mut q = start(h, &[], &args);
            let r = qmp_until(
                h,
                &sock,
                "{\"execute\":\"query-status\"}",
                "\"running\"",
                "\"shutdown\"",
                |_| {},
            );
            let t = t1.elapsed().as_secs_f64();
            if let Err(e) = &r {
                eprintln!("{}: no restore: {e}\n{}", peer.label(), q.report());
            }
            let _ = q.child.kill();
            r.ok().map(|_| t)
        }
    };
    restored.map(|r| (save_s, r, bytes))
}

pub fn rows(runs: usize, g: &Guest, sizes: &[u32]) {
    let h = host();
    let dir = HostDir::new(h, "bench-snapshot");
    let peers = [Peer::Ours, Peer::Microvm];
    let _ = bin("vmm");
    let mut tab = Table::new(&[
        "idle mini guest",
        "save median",
        "restore median",
        "on disk",
        "QEMU / vmm save",
        "QEMU / vmm restore",
    ]);
    for &mib in sizes {
        let g = Guest {
            memory_mib: mib,
            kernel: g.kernel.clone(),
            initrd: g.initrd.clone(),
            cmdline: g.cmdline.clone(),
        };
        let mut got: Vec<Vec<(f64, f64, u64)>> = vec![Vec::new(); peers.len()];
        for r in 0..runs {
            for (i, p) in peers.iter().enumerate() {
                if let Some(t) = once(h, *p, &g, &dir) {
                    eprintln!(
                        "{} {mib} MiB run {}: save {:.2} s, restore {:.2} s, {} MiB on disk",
                        p.label(),
                        r + 1,
                        t.0,
                        t.1,
                        t.2 >> 20
                    );
                    got[i].push(t);
                }
            }
        }
        let med = |i: usize, f: fn(&(f64, f64, u64)) -> f64| {
            stats(&got[i].iter().map(f).collect::<Vec<_>>()).map(|s| s.median)
        };
        for (i, p) in peers.iter().enumerate() {
            tab.row(vec![
                format!("{} {mib} MiB ({} runs)", p.label(), got[i].len()),
                med(i, |t| t.0).map_or("-".into(), report::dur),
                med(i, |t| t.1).map_or("-".into(), report::dur),
                med(i, |t| t.2 as f64 / 1048576.0).map_or("-".into(), |m| format!("{m:.0} MiB")),
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
