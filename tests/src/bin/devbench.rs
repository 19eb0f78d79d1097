//! `devbench`: the virtio device path against the host doing the same I/O.
//!
//! Guests run slowly under this machine's software KVM, so this measures
//! what the VMM adds: a host-side driver harness plays the guest (descriptor
//! chains in guest memory, queue kicks through the device's ioeventfd, waits
//! on its irqfd) against the real virtio-mmio transport, device models and
//! `event-manager` loop, the real image file and a real TAP. Each figure is
//! printed next to the host doing the same I/O directly, measured in the
//! same run (alternating, median of the rounds), and their ratio.
//! Not a test: it asserts nothing about speed. Run via `scripts/bench.sh
//! --devices`.

#[path = "devbench/block.rs"]
mod block;
#[path = "devbench/block_qd.rs"]
mod block_qd;
#[path = "devbench/driver.rs"]
mod driver;
#[path = "devbench/guest.rs"]
mod guest;
#[path = "devbench/net.rs"]
mod net;
#[allow(dead_code)]
#[path = "bench/report.rs"]
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use block::{Op, Wait};
use driver::Pass;
use report::{stats, Table};

const USAGE: &str = "\
usage: devbench [options]
  --rounds N        alternating host/device rounds per figure (default 5)
  --file PATH       scratch image for the block figures (default: target/devbench.img)
  --file-mib N      its size (default 256)
  --rand-ios N      4 KiB random reads per round (default 5000)
  --frames N        frames per network round (default 50000)
  --poll-us N       also the random-read rows with the disk's adaptive
                    polling up to N µs (`--disk ...,poll_us=N`; default 50,
                    0: no such rows)
  --only LIST       block,net (default both)
  --no-vhost        no vhost-net rows (by default they follow the userspace
                    ones where /dev/vhost-net exists; the VMM's default
                    datapath there)
  --guest           also boot `mini` with the image as /dev/vda and run dd
                    with O_DIRECT inside (needs guest user space: hardware KVM)
  --guest-timeout S limit for that boot (default 900)
  --kernel-dir DIR  kernel library (default build/kernels)
  --vmm PATH        vmm binary (default: next to this one)";

struct Opts {
    rounds: usize,
    file: PathBuf,
    file_mib: u64,
    rand_ios: usize,
    poll_us: u64,
    frames: usize,
    only: Vec<String>,
    vhost: bool,
    guest: bool,
    guest_timeout: u64,
    kernel_dir: PathBuf,
    vmm: Option<PathBuf>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        rounds: 5,
        file: PathBuf::from("target/devbench.img"),
        file_mib: 256,
        rand_ios: 5000,
        poll_us: 50,
        frames: 50_000,
        only: vec!["block".into(), "net".into()],
        vhost: true,
        guest: false,
        guest_timeout: 900,
        kernel_dir: PathBuf::from("build/kernels"),
        vmm: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{a}: not a number: {v}"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = num(val()?)?.max(1),
            "--file" => o.file = PathBuf::from(val()?),
            "--file-mib" => o.file_mib = num(val()?)?.max(8) as u64,
            "--rand-ios" => o.rand_ios = num(val()?)?.max(100),
            "--poll-us" => o.poll_us = num(val()?)?.min(1000) as u64,
            "--frames" => o.frames = num(val()?)?.clamp(1000, net::MAX_FRAMES),
            "--only" => o.only = val()?.split(',').map(str::to_owned).collect(),
            "--no-vhost" => o.vhost = false,
            "--guest" => o.guest = true,
            "--guest-timeout" => o.guest_timeout = num(val()?)? as u64,
            "--kernel-dir" => o.kernel_dir = PathBuf::from(val()?),
            "--vmm" => o.vmm = Some(PathBuf::from(val()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown option {a}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// One figure: host and device samples of the same work (`units` per
/// round) → medians and the ratio device/host.
struct Figure {
    label: String,
    unit: &'static str,
    scale: f64,
    host: Vec<f64>,
    device: Vec<f64>,
    /// CPU µs per unit of work.
    host_cpu: Vec<f64>,
    device_cpu: Vec<f64>,
}

impl Figure {
    fn new(label: &str, unit: &'static str, scale: f64) -> Figure {
        Figure {
            label: label.into(),
            unit,
            scale,
            host: Vec::new(),
            device: Vec::new(),
            host_cpu: Vec::new(),
            device_cpu: Vec::new(),
        }
    }

    /// Records a round in which each side did `units` of work (`ops`
    /// requests or frames).
    fn add(&mut self, units: f64, ops: f64, host: Pass, device: Pass) {
        self.host.push(units / host.secs / self.scale);
        self.device.push(units / device.secs / self.scale);
        self.host_cpu.push(host.cpu_secs / ops * 1e6);
        self.device_cpu.push(device.cpu_secs / ops * 1e6);
    }

    fn row(&self, t: &mut Table, baseline: &str) {
        let h = stats(&self.host).map(|s| s.median);
        let d = stats(&self.device).map(|s| s.median);
        let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} {}", self.unit));
        let cpu = |v: &[f64]| stats(v).map_or("-".into(), |s| format!("{:.2} µs", s.median));
        let spread =
            |v: &[f64]| stats(v).map_or("-".into(), |s| format!("{:.1}–{:.1}", s.min, s.max));
        t.row(vec![
            self.label.clone(),
            fmt(d),
            fmt(h),
            match (d, h) {
                (Some(d), Some(h)) if h > 0.0 => format!("{:.2}", d / h),
                _ => "-".into(),
            },
            spread(&self.device),
            spread(&self.host),
            cpu(&self.device_cpu),
            cpu(&self.host_cpu),
            baseline.into(),
        ]);
    }
}

fn run_block(o: &Opts, t: &mut Table, notes: &mut Vec<String>) -> Result<(), String> {
    let size = o.file_mib << 20;
    if let Some(dir) = o.file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    eprintln!(
        "devbench: block: {} MiB scratch image {}",
        o.file_mib,
        o.file.display()
    );
    block::prepare_file(&o.file, size).map_err(|e| format!("{}: {e}", o.file.display()))?;
    let poll = Duration::from_micros(o.poll_us);
    let polled = format!("poll_us={}", o.poll_us);
    let halt = ", driver halt-polls";
    let mut cases = Vec::new();
    for (op, what, unit, scale) in [
        (Op::SeqRead, "blk seq read 1 MiB", "MB/s", 1e6),
        (Op::SeqWrite, "blk seq write 1 MiB", "MB/s", 1e6),
        (Op::RandRead, "blk rand read 4 KiB", "kIOPS", 1e3),
    ] {
        cases.push((
            op,
            what.to_string(),
            unit,
            scale,
            Duration::ZERO,
            Wait::Interrupt,
        ));
        // The driver waits for the interrupt as a vCPU on a KVM host does
        // (halt polling, KVM's default).
        cases.push((
            op,
            format!("{what}{halt}"),
            unit,
            scale,
            Duration::ZERO,
            Wait::HaltPolls,
        ));
    }
    if !poll.is_zero() {
        cases.push((
            Op::RandRead,
            format!("blk rand read 4 KiB, {polled}"),
            "kIOPS",
            1e3,
            poll,
            Wait::Interrupt,
        ));
        cases.push((
            Op::RandRead,
            format!("blk rand read 4 KiB, {polled}{halt}"),
            "kIOPS",
            1e3,
            poll,
            Wait::HaltPolls,
        ));
        // Neither side sleeps: what the device path costs when the guest
        // polls its queue too (Linux's virtio-blk poll queues).
        cases.push((
            Op::RandRead,
            format!("blk rand read 4 KiB, {polled}, driver polls"),
            "kIOPS",
            1e3,
            poll,
            Wait::Polls,
        ));
    }
    for (op, label, unit, scale, poll, wait) in cases {
        let offs = block::offsets(op, size, o.rand_ios);
        let units = match op {
            Op::RandRead => offs.len() as f64,
            _ => (offs.len() * op.block()) as f64,
        };
        let mut fig = Figure::new(&label, unit, scale);
        for _ in 0..o.rounds {
            let h =
                block::host_pass(&o.file, op, &offs).map_err(|e| format!("{label}: host: {e}"))?;
            let d = block::device_pass(&o.file, op, &offs, poll, wait)
                .map_err(|e| format!("{label}: device: {e}"))?;
            fig.add(units, offs.len() as f64, h, d);
        }
        fig.row(t, "host pread/pwrite O_DIRECT, QD1");
    }
    // Deep queues: io_uring on both sides, on one request queue and on
    // four (a guest with a queue per CPU).
    let offs = block::offsets(Op::RandRead, size, o.rand_ios * 4);
    let mut deep = vec![
        (
            1u16,
            "blk rand read 4 KiB, QD32".to_string(),
            Duration::ZERO,
            Wait::Interrupt,
        ),
        (
            1,
            format!("blk rand read 4 KiB, QD32{halt}"),
            Duration::ZERO,
            Wait::HaltPolls,
        ),
        (
            4,
            "blk rand read 4 KiB, QD32, 4 queues".into(),
            Duration::ZERO,
            Wait::Interrupt,
        ),
        (
            4,
            format!("blk rand read 4 KiB, QD32, 4 queues{halt}"),
            Duration::ZERO,
            Wait::HaltPolls,
        ),
    ];
    if !poll.is_zero() {
        deep.push((
            1,
            format!("blk rand read 4 KiB, QD32, {polled}"),
            poll,
            Wait::Interrupt,
        ));
        deep.push((
            1,
            format!("blk rand read 4 KiB, QD32, {polled}{halt}"),
            poll,
            Wait::HaltPolls,
        ));
        deep.push((
            1,
            format!("blk rand read 4 KiB, QD32, {polled}, driver polls"),
            poll,
            Wait::Polls,
        ));
    }
    for (queues, label, poll, wait) in deep {
        let mut fig = Figure::new(&label, "kIOPS", 1e3);
        for _ in 0..o.rounds {
            let h = block_qd::host_pass(&o.file, &offs, 32)
                .map_err(|e| format!("{label}: host: {e}"))?;
            let d = block_qd::device_pass(&o.file, &offs, 32, queues, poll, wait)
                .map_err(|e| format!("{label}: device: {e}"))?;
            fig.add(offs.len() as f64, offs.len() as f64, h, d);
        }
        fig.row(t, "host io_uring O_DIRECT, QD32");
    }
    let n = o.rand_ios;
    let mut lat = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..o.rounds {
        let p = block::device_round_trips(&o.file, n).map_err(|e| format!("GET_ID: {e}"))?;
        lat.push(p.secs / n as f64 * 1e6);
        cpu.push(p.cpu_secs / n as f64 * 1e6);
    }
    let (mut floor, mut floor_cpu) = (Vec::new(), Vec::new());
    for _ in 0..o.rounds {
        let (rtt, cpu) = driver::eventfd_ping_pong(n).map_err(|e| format!("ping-pong: {e}"))?;
        floor.push(rtt);
        floor_cpu.push(cpu);
    }
    let med = |v: &[f64]| stats(v).map_or(0.0, |s| s.median);
    notes.push(format!(
        "virtio-blk request with no disk I/O (GET_ID), one at a time: {:.1} µs per round trip \
         (kick → event loop → device → interrupt → driver), {:.2} µs of event-loop CPU each.\n\
         This machine's floor for that: two bare threads ping-ponging through two eventfds, \
         {:.1} µs per round trip, {:.2} µs of CPU for the responder. At QD1 every request pays \
         the round trip on top of the disk's own latency.",
        med(&lat),
        med(&cpu),
        med(&floor),
        med(&floor_cpu)
    ));
    Ok(())
}

fn run_net(o: &Opts, t: &mut Table) -> Result<(), String> {
    net::enter_private_netns().map_err(|e| format!("network namespace (needs root): {e}"))?;
    let dev_tap = "dbench-virtio";
    let raw_tap = "dbench-raw";
    let raw = net::RawTap::open(raw_tap).map_err(|e| format!("TAP {raw_tap}: {e}"))?;
    net::bring_up(raw_tap, o.frames).map_err(|e| e.to_string())?;
    // The userspace datapath everywhere; vhost-net's (the VMM's default
    // where the host has it) too when this host has /dev/vhost-net.
    let mut datapaths = vec![(false, "")];
    if o.vhost && net::vhost_available() {
        datapaths.push((true, ", vhost-net"));
    } else if o.vhost {
        eprintln!("devbench: no /dev/vhost-net here: no vhost-net rows");
    }
    for (vhost, path) in datapaths {
        run_net_path(o, t, &raw, raw_tap, dev_tap, vhost, path)?;
    }
    Ok(())
}

/// The network rows of one datapath (`vhost`: the kernel's).
fn run_net_path(
    o: &Opts,
    t: &mut Table,
    raw: &net::RawTap,
    raw_tap: &str,
    dev_tap: &str,
    vhost: bool,
    path: &str,
) -> Result<(), String> {
    // The driver sleeping on the interrupt, then waiting for it as a vCPU
    // on KVM does (halt polling, KVM's default).
    for (halt_poll, waits) in [
        (None, ""),
        (Some(driver::HaltPoll::default()), ", driver halt-polls"),
    ] {
        let path = format!("{path}{waits}");
        let device = || {
            net::DeviceSide::new(dev_tap, vhost, o.frames, halt_poll)
                .map_err(|e| format!("virtio-net: {e}"))
        };
        for (len, what) in [(60usize, "60 B"), (1514, "1514 B")] {
            let frame = net::frame(len);
            let n = o.frames;
            let mut tx_pps = Figure::new(&format!("net TX {what} frames{path}"), "kpps", 1e3);
            let mut rx_pps = Figure::new(&format!("net RX {what} frames{path}"), "kpps", 1e3);
            let mut tx_mb = Figure::new(&format!("net TX {what} frames{path}"), "MB/s", 1e6);
            let mut rx_mb = Figure::new(&format!("net RX {what} frames{path}"), "MB/s", 1e6);
            for _ in 0..o.rounds {
                let h = net::raw_tx(raw, &frame, n).map_err(|e| format!("raw TX: {e}"))?;
                let d = device()?
                    .tx(&frame, n)
                    .map_err(|e| format!("virtio TX: {e}"))?;
                tx_pps.add(n as f64, n as f64, h, d);
                tx_mb.add((n * len) as f64, n as f64, h, d);

                net::inject(raw_tap, &frame, n).map_err(|e| format!("inject: {e}"))?;
                let h = net::raw_rx(raw, n).map_err(|e| format!("raw RX: {e}"))?;
                let mut dev = device()?;
                net::inject(dev_tap, &frame, n).map_err(|e| format!("inject: {e}"))?;
                let d = dev.rx(n, len).map_err(|e| format!("virtio RX: {e}"))?;
                rx_pps.add(n as f64, n as f64, h, d);
                rx_mb.add((n * len) as f64, n as f64, h, d);
            }
            let fig = if len == 60 {
                [&tx_pps, &rx_pps]
            } else {
                [&tx_mb, &rx_mb]
            };
            for f in fig {
                f.row(
                    t,
                    if f.label.contains("TX") {
                        "write() to a TAP"
                    } else {
                        "read() from a TAP"
                    },
                );
            }
        }
    }
    Ok(())
}

/// The guest run's line for the report (figures, or why there are none).
fn run_guest(o: &Opts) -> String {
    let vmm = o.vmm.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|p| p.with_file_name("vmm"))
            .unwrap_or_else(|_| PathBuf::from("vmm"))
    });
    if let Err(e) = block::prepare_file(&o.file, o.file_mib << 20) {
        return format!("guest run: {}: {e}", o.file.display());
    }
    eprintln!("devbench: guest run: booting mini with dd inside (minutes under a software KVM)...");
    let timeout = std::time::Duration::from_secs(o.guest_timeout);
    match guest::run(&vmm, &o.kernel_dir, &o.file, timeout) {
        Ok(g) => {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} MB/s"));
            format!(
                "guest run (mini, busybox dd 1 MiB O_DIRECT over /dev/vda, direct=on): \
                 seq read {}, seq write {}",
                f(g.seq_read_mbs),
                f(g.seq_write_mbs)
            )
        }
        Err(e) => format!("guest run: no figures: {e}"),
    }
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("devbench: {e}");
            return ExitCode::from(2);
        }
    };
    let mut t = Table::new(&[
        "figure (median)",
        "virtio device",
        "host alone",
        "ratio",
        "device min–max",
        "host min–max",
        "device CPU/op",
        "host CPU/op",
        "baseline",
    ]);
    let mut failed = false;
    let mut notes = Vec::new();
    if o.only.iter().any(|s| s == "block") {
        if let Err(e) = run_block(&o, &mut t, &mut notes) {
            eprintln!("devbench: block: {e}");
            failed = true;
        }
    }
    if o.only.iter().any(|s| s == "net") {
        if let Err(e) = run_net(&o, &mut t) {
            eprintln!("devbench: net: {e}");
            failed = true;
        }
    }
    if o.guest {
        notes.push(run_guest(&o));
    }
    println!(
        "virtio device path vs the host doing the same I/O ({} rounds each, alternating)",
        o.rounds
    );
    t.print();
    for n in notes {
        println!("{n}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
