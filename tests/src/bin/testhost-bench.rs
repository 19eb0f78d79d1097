//! `testhost-bench`: our VMM next to QEMU (`-enable-kvm`) on the same host
//! in one run — inside the test host on a machine without hardware KVM
//! (`scripts/bench.sh --testhost`), else on this machine's KVM. Not a test:
//! it prints medians and ratios. Under the test host every figure is
//! scaled by software emulation: compare ours with QEMU's, never with
//! hardware numbers.
//!
//! Rows (the `mini` kernel and its initramfs, 1 vCPU, 256 MiB):
//! * boot: process start → `VMM-INIT-OK` (user space) on the serial
//!   console; ours vs QEMU `-M microvm` and `-M q35`;
//! * disk: the guest's busybox `dd` with O_DIRECT over a 256 MiB virtio
//!   disk (`vmm.run=blkbench`): 1 MiB sequential reads and writes, 4 KiB
//!   reads one at a time (QD1) and 32 at a time (QD32, 32 `dd`s); the
//!   image `direct=on` for us and `cache=none,aio=io_uring` for QEMU, on
//!   an ext4;
//! * net: 64 MiB each way over TCP between the guest and its TAP's host
//!   end (`vmm.run=netbench`, timed in the guest), ours vs QEMU's
//!   virtio-net, both userspace (`vhost=off`), then both with vhost-net;
//! * sshd: the customer's Debian server, process start → sshd's greeting
//!   (`testhost_bench/sshd.rs`);
//! * snapshot: save and restore of an idle guest of 256 MiB and 1 GiB, ours
//!   against QEMU's migration to a file (`testhost_bench/snapshot.rs`);
//!   only when asked (`--only snapshot`);
//! * migration: live migration of an idle guest of 256 MiB and 1 GiB over
//!   the loopback, ours against QEMU's (`testhost_bench/migration.rs`);
//!   only when asked (`--only migration`);
//! * memory: the guest's first write of 160 MiB and its rewrite
//!   (`testhost_bench/memory.rs`); only when asked (`--only memory`);
//! * converge: live migration of a guest that writes faster than its
//!   paced link, ours without and with `auto_converge` against QEMU's
//!   `auto-converge` (`testhost_bench/migration.rs`); only when asked
//!   (`--only converge`, the first `--mib` size, 256 MiB by default);
//! * devices: the host-side device harness (`devbench --only net`, no
//!   guest) where the host has `/dev/vhost-net`, so that its rows cover
//!   the kernel's datapath as well as ours; only when asked (`--only
//!   devices`).

// The benchmark's table and statistics helpers (this binary uses a part).
#[allow(dead_code)]
#[path = "bench/report.rs"]
mod report;

#[path = "testhost_bench/memory.rs"]
mod memory;
#[path = "testhost_bench/migration.rs"]
mod migration;
#[path = "testhost_bench/snapshot.rs"]
mod snapshot;
#[path = "testhost_bench/sshd.rs"]
mod sshd;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use report::{stats, Stats, Table};
use tests::guest::{entry_cmdline, kernel_dir, HostDir, NetNs};
use tests::testhost::wedge::wedged_vmms;
use tests::{bin, host, Host, VmmProcess};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const MARKER: &str = "VMM-INIT-OK";
const TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq)]
enum Peer {
    Ours,
    Microvm,
    Q35,
}

impl Peer {
    fn label(self) -> &'static str {
        match self {
            Peer::Ours => "vmm",
            Peer::Microvm => "QEMU microvm",
            Peer::Q35 => "QEMU q35",
        }
    }
}

struct Guest {
    kernel: String,
    initrd: String,
    cmdline: String,
    memory_mib: u32,
}

/// The command line that boots `g` with `extra` kernel arguments and
/// `devices` (already in the peer's syntax).
fn argv(peer: Peer, g: &Guest, extra: &str, devices: &[String]) -> Vec<String> {
    let cmdline = format!("{} {extra}", g.cmdline);
    let memory = g.memory_mib.to_string();
    let mut v: Vec<String> = match peer {
        Peer::Ours => vec![
            bin("vmm").display().to_string(),
            "--kernel".into(),
            g.kernel.clone(),
            "--initrd".into(),
            g.initrd.clone(),
            "--memory".into(),
            memory.clone(),
            "--vcpus".into(),
            "1".into(),
            "--console".into(),
            "stdio".into(),
            "--cmdline".into(),
            cmdline,
        ],
        Peer::Microvm | Peer::Q35 => {
            let machine = if peer == Peer::Microvm {
                "microvm"
            } else {
                "q35"
            };
            [
                QEMU,
                "-M",
                machine,
                "-enable-kvm",
                "-cpu",
                "host",
                "-m",
                &memory,
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-kernel",
                &g.kernel,
                "-initrd",
                &g.initrd,
                "-append",
                &cmdline,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        }
    };
    v.extend(devices.iter().cloned());
    v
}

fn spawn_peer(h: &Host, prefix: &[&str], argv: &[String]) -> std::io::Result<VmmProcess> {
    let mut full: Vec<&str> = prefix.to_vec();
    full.extend(argv.iter().map(String::as_str));
    h.spawn(&full, &[]).map(VmmProcess::from_proc)
}

fn start(h: &Host, prefix: &[&str], argv: &[String]) -> VmmProcess {
    spawn_peer(h, prefix, argv).unwrap_or_else(|e| panic!("start {}: {e}", argv[0]))
}

/// [`start`] where a peer that cannot be started (the test host's agent,
/// slowed or hung by its emulator, did not answer) is a lost run, not the
/// end of the benchmark.
fn try_start(h: &Host, prefix: &[&str], argv: &[String]) -> Result<VmmProcess, Wait> {
    spawn_peer(h, prefix, argv).map_err(|e| {
        let prog = argv.first().map_or("", String::as_str);
        eprintln!("NOTE: cannot start {prog} in the test host ({e}): run lost");
        Wait::TimedOut
    })
}

enum Wait {
    Seen,
    /// The test host's emulator fault (`tests::testhost::wedge`): the
    /// run says nothing about either VMM and is done again.
    Wedged,
    TimedOut,
}

/// Waits for `needle` on `p`'s console, checking a silent guest for the
/// test host's emulator wedge (it hits QEMU's guests as well as ours), and
/// for a boot our VMM started because the guest triple-faulted: in the test
/// host that is the emulator's fault too (no benchmark guest resets
/// itself), and what was typed into the boot before never runs.
fn wait_marker(h: &Host, p: &VmmProcess, needle: &str) -> Wait {
    let deadline = Instant::now() + TIMEOUT;
    let boots = |out: &str| out.matches("--- vmm: boot ").count();
    let before = boots(&p.output());
    while Instant::now() < deadline {
        if p.wait_for(needle, Duration::from_secs(15)) {
            return Wait::Seen;
        }
        if wedged_vmms(h).contains(&p.child.id()) {
            return Wait::Wedged;
        }
        let out = p.output();
        if boots(&out) > before && out.contains("triple_fault") {
            eprintln!("NOTE: the guest triple-faulted and booted again (the emulator's fault)");
            return Wait::Wedged;
        }
        if !h.is_alive() {
            eprintln!("NOTE: the test host died or hung (its emulator's fault): run lost");
            return Wait::TimedOut;
        }
    }
    Wait::TimedOut
}

/// Runs `once` again (at most twice) when the emulator wedged it.
fn unwedged<T>(what: &str, mut once: impl FnMut() -> Result<T, Wait>) -> Option<T> {
    for attempt in 1..=3 {
        match once() {
            Ok(t) => return Some(t),
            Err(Wait::Wedged) if attempt < 3 => {
                eprintln!("NOTE: {what}: the test host's emulator wedged the guest; run again")
            }
            Err(_) => return None,
        }
    }
    None
}

/// Seconds from spawn to the user-space marker.
fn boot_once(h: &Host, peer: Peer, g: &Guest) -> Option<f64> {
    unwedged(peer.label(), || {
        let t0 = Instant::now();
        let mut p = try_start(h, &[], &argv(peer, g, "", &[]))?;
        let w = wait_marker(h, &p, MARKER);
        let t = t0.elapsed().as_secs_f64();
        let _ = p.child.kill();
        match w {
            Wait::Seen => Ok(t),
            other => {
                eprintln!("{}: no {MARKER}\n{}", peer.label(), p.report());
                Err(other)
            }
        }
    })
}

/// Runs a `vmm.run=` guest script to its power-off; returns its console.
fn run_script(
    h: &Host,
    prefix: &[&str],
    peer: Peer,
    g: &Guest,
    extra: &str,
    devices: &[String],
) -> String {
    let once = || {
        let mut p = try_start(h, prefix, &argv(peer, g, extra, devices))?;
        let w = wait_marker(h, &p, "vmm-bench: done");
        let _ = p.wait_exit(Duration::from_secs(30));
        let _ = p.child.kill();
        match w {
            Wait::Seen => Ok(p.output()),
            other => {
                eprintln!(
                    "{}: the guest script did not finish\n{}",
                    peer.label(),
                    p.report()
                );
                Err(other)
            }
        }
    };
    unwedged(peer.label(), once).unwrap_or_default()
}

/// MB/s from busybox dd's summary in a `vmm-bench: NAME ...` line.
fn dd_rate(out: &str, name: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.contains(&format!("vmm-bench: {name} ")))?;
    let (bytes, rest) = line.split_once(" bytes")?;
    let bytes: f64 = bytes.split_whitespace().last()?.parse().ok()?;
    let secs: f64 = rest
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

/// The third word of a `vmm-bench: NAME COUNT UNIT SECONDS ...` line
/// divided by its fifth: reads per second from `vmm-bench: qd1-read 8192
/// reads, 3.2 seconds`, MiB per second from `vmm-bench: net-tx 64 MiB 2.31 s`.
fn per_second(out: &str, name: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.contains(&format!("vmm-bench: {name} ")))?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let count: f64 = w.get(2)?.parse().ok()?;
    let secs: f64 = w.get(4)?.parse().ok()?;
    (secs > 0.0).then(|| count / secs)
}

/// MB/s from a `vmm-bench: net-tx 64 MiB 2.31 s` line.
fn net_rate(out: &str, name: &str) -> Option<f64> {
    per_second(out, name).map(|mib| mib * 1048576.0 / 1e6)
}

fn median(v: &[f64]) -> Option<Stats> {
    stats(v)
}

/// Prints each peer's times (runs, median, min, max) and QEMU's median
/// over ours; `peers[0]` is ours.
fn times_table(title: &str, peers: &[Peer], t: &[Vec<f64>]) {
    let ours = t.first().and_then(|v| median(v)).map(|s| s.median);
    let mut tab = Table::new(&[title, "runs", "median", "min", "max", "QEMU / vmm"]);
    for (i, (p, v)) in peers.iter().zip(t).enumerate() {
        let s = median(v);
        tab.row(vec![
            p.label().into(),
            v.len().to_string(),
            s.map_or("-".into(), |s| report::dur(s.median)),
            s.map_or("-".into(), |s| report::dur(s.min)),
            s.map_or("-".into(), |s| report::dur(s.max)),
            if i == 0 {
                "".into()
            } else {
                report::ratio(s.map(|s| s.median), ours)
            },
        ]);
    }
    tab.print();
}

/// The device harness's network rows where this host has vhost-net: its
/// own table (device vs a raw TAP), printed as it comes.
fn devices_rows(h: &Host, runs: usize) {
    // Emulated CPUs move some 50-100 k frames a second: 5,000 a round.
    let cmd = format!(
        "{} --only net --rounds {runs} --frames 5000",
        bin("devbench").display()
    );
    eprintln!("devices: {cmd}");
    let out = h.sh_timeout(&cmd, Duration::from_secs(1800));
    println!("\ndevice harness (devbench) on this host:\n{}", out.stdout);
    if !out.status.success() {
        println!("devbench failed ({}): {}", out.status, out.stderr.trim());
    }
}

fn main() -> ExitCode {
    let mut runs = 5usize;
    let mut only: Vec<String> = vec!["boot".into(), "sshd".into(), "disk".into(), "net".into()];
    // The guests' sizes of the snapshot and migration rows.
    let mut sizes: Vec<u32> = vec![256, 1024, 4096];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).unwrap_or(runs),
            "--only" => {
                only = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_string)
                    .collect()
            }
            "--mib" => {
                let given: Option<Vec<u32>> = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|m| m.parse().ok())
                    .collect();
                match given {
                    Some(v) if !v.is_empty() => sizes = v,
                    _ => {
                        eprintln!("testhost-bench: error: --mib takes sizes in MiB, e.g. 256,1024");
                        return ExitCode::from(2);
                    }
                }
            }
            "--help" | "-h" => {
                println!("testhost-bench [--runs N] [--only boot,disk,net,sshd,memory,snapshot,migration,converge,devices] [--mib 256,1024,4096 (snapshot, migration; converge: the first)]   (scripts/bench.sh --testhost)");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("testhost-bench: error: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    // Two guests of the largest size side by side (a migration's source
    // and target) need a test host with room for them; untouched guest
    // memory is never allocated, but each VMM maps all of its own.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let two_sized = only
        .iter()
        .any(|o| o == "snapshot" || o == "migration" || o == "converge");
    if two_sized && largest > 1024 && std::env::var_os("VMM_TESTHOST_MEMORY").is_none() {
        let mib = (2 * largest + 4096).to_string();
        println!("testhost-bench: a test host of {mib} MiB for {largest} MiB guests");
        std::env::set_var("VMM_TESTHOST_MEMORY", mib);
    }
    let h = host();
    let entry = kernel_dir().join("mini");
    let g = Guest {
        kernel: entry.join("vmlinux").display().to_string(),
        initrd: entry.join("initrd.img").display().to_string(),
        cmdline: entry_cmdline("mini"),
        memory_mib: 256,
    };
    let place = if h.is_test_host() {
        "inside the test host (QEMU TCG, AMD SVM): every figure is scaled by software emulation, compare the ratios"
    } else {
        "on this machine's hardware KVM"
    };
    println!("testhost-bench: {runs} runs, alternating, medians; {place}");

    if only.iter().any(|o| o == "boot") {
        let peers = [Peer::Ours, Peer::Microvm, Peer::Q35];
        let mut t: Vec<Vec<f64>> = vec![Vec::new(); peers.len()];
        for r in 0..runs {
            for (i, p) in peers.iter().enumerate() {
                if let Some(s) = boot_once(h, *p, &g) {
                    t[i].push(s);
                }
            }
            eprintln!("boot run {}/{runs} done", r + 1);
        }
        times_table("boot → user space", &peers, &t);
    }

    if only.iter().any(|o| o == "sshd") {
        sshd::row(runs);
    }

    if only.iter().any(|o| o == "snapshot") {
        snapshot::rows(runs, &g, &sizes);
    }

    if only.iter().any(|o| o == "migration") {
        migration::rows(runs, &g, &sizes);
    }

    if only.iter().any(|o| o == "memory") {
        memory::rows(runs, &g);
    }

    if only.iter().any(|o| o == "converge") {
        migration::converge_rows(runs, &g, sizes.first().copied().unwrap_or(256));
    }

    if only.iter().any(|o| o == "devices") {
        devices_rows(h, runs);
    }

    if only.iter().any(|o| o == "disk") {
        let dir = HostDir::new(h, "bench-disk");
        let fs = dir.join("fs.img");
        let mnt = dir.join("mnt");
        // The image is written through once before any run: a sparse one
        // gave the first peer of the first round reads of holes (no I/O)
        // and writes that allocate (ext4's work), and the other peer
        // neither (ours read 271 MB/s against QEMU's 125 in such a round).
        h.sh(&format!(
            "set -e; truncate -s 1G {fs}; mkfs.ext4 -q {fs}; mkdir {mnt}; mount -o loop {fs} {mnt}; \
             dd if=/dev/zero of={mnt}/disk.img bs=1M count=256 conv=fsync status=none"
        ))
        .ok("an ext4 for the disk image");
        let img = format!("{mnt}/disk.img");
        let cases: [(Peer, Vec<String>); 2] = [
            (
                Peer::Ours,
                vec!["--disk".into(), format!("path={img},direct=on")],
            ),
            (
                Peer::Microvm,
                vec![
                    "-drive".into(),
                    format!("file={img},if=none,id=d0,format=raw,cache=none,aio=io_uring"),
                    "-device".into(),
                    "virtio-blk-device,drive=d0".into(),
                ],
            ),
        ];
        let mut rd: Vec<Vec<f64>> = vec![Vec::new(); 2];
        let mut wr: Vec<Vec<f64>> = vec![Vec::new(); 2];
        let mut qd1: Vec<Vec<f64>> = vec![Vec::new(); 2];
        let mut qd32: Vec<Vec<f64>> = vec![Vec::new(); 2];
        for r in 0..runs {
            // Each round the other peer goes first: whatever one run
            // leaves behind in the test host (its page cache of the loop
            // file, ext4's state) favours neither.
            let mut order: Vec<usize> = (0..cases.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (p, dev) = &cases[i];
                let out = run_script(h, &[], *p, &g, "vmm.run=blkbench", dev);
                match (dd_rate(&out, "seq-read"), dd_rate(&out, "seq-write")) {
                    (Some(a), Some(b)) => {
                        eprintln!(
                            "disk run {}: {}: read {a:.1} MB/s, write {b:.1} MB/s",
                            r + 1,
                            p.label()
                        );
                        rd[i].push(a);
                        wr[i].push(b);
                        if let (Some(q1), Some(q32)) =
                            (per_second(&out, "qd1-read"), per_second(&out, "qd32-read"))
                        {
                            eprintln!("  4 KiB reads: QD1 {q1:.0} IOPS, QD32 {q32:.0} IOPS");
                            qd1[i].push(q1);
                            qd32[i].push(q32);
                        }
                    }
                    _ => eprintln!(
                        "{}: no dd figures:\n{}",
                        p.label(),
                        out.lines().rev().take(15).collect::<Vec<_>>().join("\n")
                    ),
                }
            }
            eprintln!("disk run {}/{runs} done", r + 1);
        }
        let _ = h.sh(&format!("umount {mnt}"));
        let mut tab = Table::new(&[
            "guest dd, O_DIRECT",
            "vmm",
            "QEMU microvm (aio=io_uring)",
            "vmm / QEMU",
        ]);
        for (label, v) in [
            ("sequential read 1 MiB, MB/s", &rd),
            ("sequential write 1 MiB, MB/s", &wr),
            ("random read 4 KiB QD1, IOPS", &qd1),
            ("random read 4 KiB QD32, IOPS", &qd32),
        ] {
            let (a, b) = (
                median(&v[0]).map(|s| s.median),
                median(&v[1]).map(|s| s.median),
            );
            tab.row(vec![
                label.into(),
                a.map_or("-".into(), |x| format!("{x:.1}")),
                b.map_or("-".into(), |x| format!("{x:.1}")),
                report::ratio(a, b),
            ]);
        }
        tab.print();
    }

    if only.iter().any(|o| o == "net") {
        let netdev = |vhost: &str| {
            vec![
                "-netdev".to_string(),
                format!("tap,id=n0,ifname=tap0,script=no,downscript=no,vhost={vhost}"),
                "-device".to_string(),
                "virtio-net-device,netdev=n0".to_string(),
            ]
        };
        let ours = |vhost: &str| vec!["--net".to_string(), format!("tap=tap0,vhost={vhost}")];
        let cases: [(&str, Peer, Vec<String>); 4] = [
            ("vmm", Peer::Ours, ours("off")),
            ("QEMU", Peer::Microvm, netdev("off")),
            ("vmm vhost-net", Peer::Ours, ours("on")),
            ("QEMU vhost-net", Peer::Microvm, netdev("on")),
        ];
        let mut tx: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        let mut rx: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
        for r in 0..runs {
            // A test host that the emulator's fault killed is replaced
            // (host() boots another), with a namespace of its own.
            let h = host();
            // Single-queue: QEMU's one pair cannot open a multi-queue TAP.
            let ns = NetNs::single_queue(h, "bench");
            let prefix = ["ip", "netns", "exec", ns.name.as_str()];
            for (i, (label, p, dev)) in cases.iter().enumerate() {
                // The host end: a sink on 5001, a 64 MiB source on 5002;
                // `fork`, so that a guest run again after the emulator
                // wedged it (or one that retries a refused connection)
                // finds them still listening. The source sends one way
                // only (`-U`): a two-way socat ends the connection 0.5 s
                // (its `-t`) after the client shuts its sending half, which
                // busybox `nc </dev/null` does at once on this machine,
                // cutting the 64 MiB short for a client that has not
                // drained it by then. (Two of QEMU's runs "failed" at
                // ~6.4 MB on 2026-12-06; that is the likely cause.)
                let sink = h.spawn(
                    &[
                        &prefix[..],
                        &[
                            "socat",
                            "-u",
                            "TCP-LISTEN:5001,reuseaddr,fork",
                            "OPEN:/dev/null",
                        ],
                    ]
                    .concat(),
                    &[],
                );
                let source = h.spawn(
                    &[
                        &prefix[..],
                        &[
                            "socat",
                            "-U",
                            "TCP-LISTEN:5002,reuseaddr,fork",
                            "SYSTEM:head -c 67108864 /dev/zero",
                        ],
                    ]
                    .concat(),
                    &[],
                );
                let (mut sink, mut source) = match (sink, source) {
                    (Ok(a), Ok(b)) => (a, b),
                    (Err(e), _) | (_, Err(e)) => {
                        eprintln!("{label}: cannot start the host end ({e}): run skipped");
                        continue;
                    }
                };
                let out = run_script(h, &prefix, *p, &g, "vmm.run=netbench vmm.net_mib=64", dev);
                let _ = sink.kill();
                let _ = source.kill();
                match (net_rate(&out, "net-tx"), net_rate(&out, "net-rx")) {
                    (Some(a), Some(b)) => {
                        // Each run's figures as they come: a run that the
                        // emulator kills later loses nothing printed here.
                        eprintln!("net run {}: {label}: tx {a:.1} MB/s, rx {b:.1} MB/s", r + 1);
                        tx[i].push(a);
                        rx[i].push(b);
                    }
                    _ => eprintln!(
                        "{label}: no network figures:\n{}",
                        out.lines().rev().take(15).collect::<Vec<_>>().join("\n")
                    ),
                }
            }
            eprintln!("net run {}/{runs} done", r + 1);
        }
        // Userspace datapaths side by side, then vhost-net ones.
        let mut tab = Table::new(&[
            "TCP, 64 MiB",
            "vmm MB/s",
            "QEMU MB/s",
            "vmm / QEMU",
            "vmm vhost MB/s",
            "QEMU vhost MB/s",
            "vmm / QEMU (vhost)",
        ]);
        for (label, v) in [("guest → host", &tx), ("host → guest", &rx)] {
            let m = |i: usize| median(&v[i]).map(|s| s.median);
            let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
            tab.row(vec![
                label.into(),
                f(m(0)),
                f(m(1)),
                report::ratio(m(0), m(1)),
                f(m(2)),
                f(m(3)),
                report::ratio(m(2), m(3)),
            ]);
        }
        tab.print();
    }
    ExitCode::SUCCESS
}
