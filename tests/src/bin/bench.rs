//! `bench`: the VMM's own costs against QEMU on the same host, with tiny
//! guests (and optionally the `mini` Linux kernel). Not a test: it asserts
//! nothing about timings, it prints a table. Run it via `scripts/bench.sh`.

#[path = "bench/ctl.rs"]
mod ctl;
#[path = "bench/launch.rs"]
mod launch;
#[path = "bench/linux.rs"]
mod linux;
#[path = "bench/proc.rs"]
mod proc;
#[path = "bench/procfs.rs"]
mod procfs;
#[path = "bench/report.rs"]
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, UNIX_EPOCH};

use ctl::LineClient;
use launch::{Boot, Guests, Vmm, UP};
use proc::{strip_ansi, Proc};
use report::{dur, mib, ratio, stats, Stats, Table};

const USAGE: &str = "\
usage: bench [options]
  --runs N             runs per start-up and memory figure (default 10)
  --memory MIB         guest memory for the tiny guests (default 256)
  --idle-secs S        idle-CPU window (default 10)
  --idle-runs N        idle-CPU windows (default 1)
  --requests N         status requests for the 1-client figure (default 2000)
  --clients N          concurrent clients (default 50)
  --per-client N       requests per concurrent client (default 200)
  --pc-runs N          runs of QEMU -M pc (SeaBIOS, slow here; default 3, 0 = skip)
  --only LIST          comma-separated subset of: startup,memory,idle,control,linux
  --vmm PATH           our vmm binary (default: next to this binary; env VMM_BIN)
  --qemu PATH          qemu-system-x86_64 (default: from PATH)
  --no-qemu            skip the QEMU reference figures
  --linux              also boot a real kernel from the library (minutes here)
  --linux-runs N       Linux cold boot + reset runs (default 1)
  --linux-timeout S    per-run limit (default 1200)
  --linux-memory MIB   (default 256)
  --linux-initrd32     boot the entry's initrd32.img (i386 user space) with vdso32=0
  --linux-kernel FILE  kernel file of the entry (default: what --kernel-name boots, vmlinux when present)
  --kernel-dir DIR     kernel library (default: build/kernels)
  --kernel-name NAME   library entry (default: mini)";

struct Opts {
    runs: usize,
    memory: u64,
    idle_secs: u64,
    idle_runs: usize,
    requests: usize,
    clients: usize,
    per_client: usize,
    pc_runs: usize,
    only: Vec<String>,
    vmm: PathBuf,
    qemu: Option<PathBuf>,
    no_qemu: bool,
    linux: bool,
    linux_opts: linux::LinuxOpts,
}

fn default_vmm() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("vmm")
}

fn parse_args() -> Result<Opts, String> {
    let root = tests::repo_root();
    let mut o = Opts {
        runs: 10,
        memory: 256,
        idle_secs: 10,
        idle_runs: 1,
        requests: 2000,
        clients: 50,
        per_client: 200,
        pc_runs: 3,
        only: Vec::new(),
        vmm: default_vmm(),
        qemu: None,
        no_qemu: false,
        linux: false,
        linux_opts: linux::LinuxOpts {
            kernel_dir: root.join("build/kernels"),
            name: "mini".into(),
            runs: 1,
            timeout: Duration::from_secs(1200),
            memory_mib: 256,
            initrd32: false,
            kernel_file: String::new(),
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("{a}: not a number: {v:?}"))
        };
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--runs" => o.runs = num(val()?)?.max(1) as usize,
            "--memory" => o.memory = num(val()?)?.max(1),
            "--idle-secs" => o.idle_secs = num(val()?)?.max(1),
            "--idle-runs" => o.idle_runs = num(val()?)?.max(1) as usize,
            "--requests" => o.requests = num(val()?)?.max(1) as usize,
            "--clients" => o.clients = num(val()?)?.max(1) as usize,
            "--per-client" => o.per_client = num(val()?)?.max(1) as usize,
            "--pc-runs" => o.pc_runs = num(val()?)? as usize,
            "--only" => o.only = val()?.split(',').map(|s| s.trim().to_string()).collect(),
            "--vmm" => o.vmm = PathBuf::from(val()?),
            "--qemu" => o.qemu = Some(PathBuf::from(val()?)),
            "--no-qemu" => o.no_qemu = true,
            "--linux" => o.linux = true,
            "--linux-runs" => o.linux_opts.runs = num(val()?)?.max(1) as usize,
            "--linux-timeout" => o.linux_opts.timeout = Duration::from_secs(num(val()?)?.max(1)),
            "--linux-memory" => o.linux_opts.memory_mib = num(val()?)?.max(1),
            "--linux-initrd32" => o.linux_opts.initrd32 = true,
            "--linux-kernel" => o.linux_opts.kernel_file = val()?,
            "--kernel-dir" => o.linux_opts.kernel_dir = PathBuf::from(val()?),
            "--kernel-name" => o.linux_opts.name = val()?,
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    const SECTIONS: [&str; 5] = ["startup", "memory", "idle", "control", "linux"];
    if let Some(bad) = o.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        return Err(format!(
            "--only: unknown section {bad:?} (one of {})",
            SECTIONS.join(",")
        ));
    }
    if o.only.iter().any(|s| s == "linux") {
        o.linux = true;
    }
    Ok(o)
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let p = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ctx {
    o: Opts,
    tmp: Scratch,
    guests: Guests,
    ours: Vmm,
    /// QEMU -M microvm (the fair reference), when QEMU is there.
    qemu: Option<Vmm>,
    qemu_pc: Option<Vmm>,
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(o: Opts) -> Result<bool, String> {
    if !o.vmm.is_file() {
        return Err(format!(
            "vmm binary {} not found: cargo build --release -p vmm (or --vmm PATH)",
            o.vmm.display()
        ));
    }
    let tmp = Scratch::new()?;
    let guests = launch::write_guests(&tmp.0)?;
    let qemu_bin = if o.no_qemu {
        None
    } else {
        match o
            .qemu
            .clone()
            .or_else(|| launch::which("qemu-system-x86_64"))
        {
            Some(q) => Some(q),
            None => {
                eprintln!("bench: qemu-system-x86_64 not found: QEMU figures skipped (apt-get install qemu-system-x86)");
                None
            }
        }
    };
    let h = procfs::host();
    println!("VMM benchmark (figures are medians unless stated; no pass/fail)");
    println!("  host kernel : {}", h.kernel);
    println!("  /dev/kvm    : {}", h.kvm);
    println!("  CPU         : {} ({} CPUs online)", h.cpu, h.cpus);
    println!(
        "  load average: {} (other work on this host skews the figures)",
        loadavg()
    );
    println!("  vmm         : {}", o.vmm.display());
    let qemu = qemu_bin.as_ref().map(|b| Vmm::Qemu {
        bin: b.clone(),
        machine: "microvm,x-option-roms=off,rtc=off".into(),
    });
    let qemu_pc = qemu_bin
        .as_ref()
        .filter(|_| o.pc_runs > 0)
        .map(|b| Vmm::Qemu {
            bin: b.clone(),
            machine: "pc".into(),
        });
    if let (Some(b), Some(Vmm::Qemu { machine, .. })) = (&qemu_bin, &qemu) {
        let v = launch::qemu_version(b).unwrap_or_else(|e| e);
        println!("  QEMU        : {} ({v}), -accel kvm -M {machine} (default CPU model; -cpu host fails on this KVM if MSR 0x10a is refused)", b.display());
    }
    println!(
        "  guests      : tiny PVH ELF guests (a few instructions), 1 vCPU, {} MiB",
        o.memory
    );
    let ours = Vmm::Ours(o.vmm.clone());
    let cx = Ctx {
        o,
        tmp,
        guests,
        ours,
        qemu,
        qemu_pc,
    };
    let want = |s: &str| cx.o.only.is_empty() || cx.o.only.iter().any(|x| x == s);
    let mut ok = true;
    let mut section = |name: &str, title: &str, f: &dyn Fn(&Ctx) -> Result<(), String>| {
        if !want(name) {
            return;
        }
        println!("\n== {title}");
        eprintln!("bench: {name}...");
        if let Err(e) = f(&cx) {
            println!("  error: {e}");
            ok = false;
        }
    };
    section(
        "startup",
        "1. Start-up: tiny guest that powers off at once",
        &startup,
    );
    section(
        "memory",
        "2. Memory: tiny guest idle after printing one line",
        &memory,
    );
    section(
        "idle",
        "3. Host CPU of an idle guest (`cli; hlt`, never woken)",
        &idle,
    );
    section(
        "control",
        "4. Control socket: `status` round trip (guest idle)",
        &control,
    );
    if cx.o.linux && want("linux") {
        section(
            "linux",
            &format!(
                "5. Linux `{}`: cold boot vs control-socket reset (same process)",
                cx.o.linux_opts.name
            ),
            &|cx: &Ctx| linux::bench(&cx.o.vmm, &cx.o.linux_opts, &cx.tmp.0),
        );
    } else if cx.o.only.is_empty() {
        println!(
            "\n== 5. Linux boot: skipped (--linux; one boot takes minutes under a software KVM)"
        );
    }
    println!("\nload average at the end: {}", loadavg());
    Ok(ok)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

// ---------------------------------------------------------------- start-up

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

fn startup(cx: &Ctx) -> Result<(), String> {
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

// ------------------------------------------------------------------ memory

/// Selects one series of the memory samples.
type MemField = fn(&MemSamples) -> &Vec<f64>;

#[derive(Default)]
struct MemSamples {
    hwm: Vec<f64>,
    rss: Vec<f64>,
    anon: Vec<f64>,
    guest: Vec<f64>,
    overhead: Vec<f64>,
    private: Vec<f64>,
}

/// Boots the idle guest and waits for its line on the serial console.
fn boot_idle(cx: &Ctx, v: &Vmm, control: Option<&Path>) -> Result<Proc, String> {
    let mut c = v.command(&Boot {
        kernel: &cx.guests.idle,
        memory_mib: cx.o.memory,
        serial: true,
        control,
        log_info: false,
    });
    let p = Proc::spawn(&mut c, &v.label())?;
    if p.out.wait_any(&[UP], 0, Duration::from_secs(60)).is_none() {
        return Err(format!(
            "{}: the idle guest printed nothing in 60 s: {}",
            v.label(),
            p.describe()
        ));
    }
    Ok(p)
}

fn mem_once(cx: &Ctx, v: &Vmm, s: &mut MemSamples) -> Result<(), String> {
    let p = boot_idle(cx, v, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let hwm = procfs::status_kib(p.pid, "VmHWM")? as f64;
    let guest = procfs::guest_ram_rss_kib(p.pid, cx.o.memory)? as f64;
    s.hwm.push(hwm);
    s.rss.push(procfs::status_kib(p.pid, "VmRSS")? as f64);
    let anon = procfs::status_kib(p.pid, "RssAnon")? as f64;
    s.anon.push(anon);
    s.private.push(anon - guest);
    s.guest.push(guest);
    s.overhead.push(hwm - guest);
    p.kill();
    Ok(())
}

fn memory(cx: &Ctx) -> Result<(), String> {
    let mut ours = MemSamples::default();
    let mut q = MemSamples::default();
    for _ in 0..cx.o.runs {
        mem_once(cx, &cx.ours, &mut ours)?;
        if let Some(v) = &cx.qemu {
            mem_once(cx, v, &mut q)?;
        }
    }
    let qlabel = cx.qemu.as_ref().map(Vmm::label).unwrap_or_default();
    let mut t = Table::new(&[
        "measurement (median)",
        "n",
        "vmm",
        qlabel.as_str(),
        "QEMU/vmm",
        "target",
    ]);
    let med = |v: &[f64]| stats(v).map(|s| s.median);
    let rows: [(&str, MemField); 6] = [
        ("peak RSS (VmHWM)", |s| &s.hwm),
        ("RSS now (VmRSS)", |s| &s.rss),
        ("anonymous RSS (RssAnon)", |s| &s.anon),
        ("guest RAM resident (smaps of the guest mapping)", |s| {
            &s.guest
        }),
        ("overhead = peak RSS - guest RAM resident", |s| &s.overhead),
        ("private overhead = RssAnon - guest RAM resident", |s| {
            &s.private
        }),
    ];
    for (label, f) in rows {
        let (a, b) = (med(f(&ours)), med(f(&q)));
        let fmt = |x: Option<f64>| x.map(mib).unwrap_or_else(|| "-".into());
        let target = if label.starts_with("overhead") {
            match a {
                Some(a) if a < 3.0 * 1024.0 => "< 3 MiB: met",
                Some(_) => "< 3 MiB: missed",
                None => "-",
            }
        } else {
            ""
        };
        t.row(vec![
            label.into(),
            f(&ours).len().to_string(),
            fmt(a),
            fmt(b),
            ratio(b, a),
            target.into(),
        ]);
    }
    t.print();
    println!("  The guest touches a few pages (ELF, boot tables); QEMU's guest RAM may be backed by a 2 MiB transparent huge page.");
    println!("  RSS includes file-backed pages of the binary and shared libraries (shared between processes); RssAnon is private memory.");
    Ok(())
}

// -------------------------------------------------------------------- idle

fn idle(cx: &Ctx) -> Result<(), String> {
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

// ----------------------------------------------------------------- control

fn control(cx: &Ctx) -> Result<(), String> {
    let sock = cx.tmp.0.join("run/bench/control.sock");
    let p = boot_idle(cx, &cx.ours, Some(&sock))?;
    let mut c = LineClient::connect(&sock, Duration::from_secs(20))?;
    let (st, _) = c.ours(r#"{"cmd":"status"}"#)?;
    if st["state"] != "running" {
        return Err(format!("status says {st} (expected running)"));
    }
    let mut t = Table::new(&[
        "request", "clients", "requests", "p50", "p90", "p99", "max", "req/s", "target",
    ]);
    let push = |t: &mut Table, label: &str, clients: usize, lat: &[f64], wall: f64| {
        let s = stats(lat);
        let f = |g: fn(&Stats) -> f64| s.as_ref().map(|s| dur(g(s))).unwrap_or_default();
        let rate = lat.len() as f64 / wall;
        let target = match s {
            _ if !label.starts_with("vmm") => String::new(),
            // Back-to-back clients queue behind each other: by Little's
            // law each waits about clients / throughput.
            Some(_) if clients > 1 => format!(
                "(queueing: {clients}/rate = {})",
                dur(clients as f64 / rate)
            ),
            Some(s) if s.p99 < 1e-3 => "p99 < 1 ms idle: met".into(),
            Some(_) => "p99 < 1 ms idle: missed".into(),
            None => String::new(),
        };
        t.row(vec![
            label.into(),
            clients.to_string(),
            lat.len().to_string(),
            f(|s| s.median),
            f(|s| s.p90),
            f(|s| s.p99),
            f(|s| s.max),
            format!("{rate:.0}"),
            target,
        ]);
    };

    // 1 client
    for _ in 0..100 {
        c.ours(r#"{"cmd":"status"}"#)?;
    }
    let mut lat = Vec::with_capacity(cx.o.requests);
    let t0 = Instant::now();
    for _ in 0..cx.o.requests {
        lat.push(c.ours(r#"{"cmd":"status"}"#)?.1.as_secs_f64());
    }
    push(&mut t, "vmm status", 1, &lat, t0.elapsed().as_secs_f64());

    // N concurrent clients
    let n = cx.o.clients;
    let per = cx.o.per_client;
    let barrier = Arc::new(Barrier::new(n + 1));
    let (lat, wall) = std::thread::scope(|s| -> Result<(Vec<f64>, f64), String> {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                let sock = sock.clone();
                s.spawn(move || -> Result<Vec<f64>, String> {
                    let c = LineClient::connect(&sock, Duration::from_secs(20));
                    b.wait();
                    let mut c = c?;
                    let mut v = Vec::with_capacity(per);
                    for _ in 0..per {
                        v.push(c.ours(r#"{"cmd":"status"}"#)?.1.as_secs_f64());
                    }
                    Ok(v)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut all = Vec::with_capacity(n * per);
        let mut err = None;
        for h in hs {
            match h.join() {
                Ok(Ok(v)) => all.extend(v),
                Ok(Err(e)) => err = Some(e),
                Err(_) => err = Some("a client thread panicked".into()),
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        match err {
            Some(e) => Err(format!("concurrent clients: {e}")),
            None => Ok((all, wall)),
        }
    })?;
    push(&mut t, "vmm status", n, &lat, wall);
    drop(c);
    p.kill();

    // QMP reference
    if let Some(v) = &cx.qemu {
        let qsock = cx.tmp.0.join("qmp.sock");
        let q = boot_idle(cx, v, Some(&qsock))?;
        let mut c = LineClient::connect(&qsock, Duration::from_secs(20))?;
        c.qmp_handshake()?;
        for _ in 0..100 {
            c.qmp(r#"{"execute":"query-status"}"#)?;
        }
        let mut lat = Vec::with_capacity(cx.o.requests);
        let t0 = Instant::now();
        for _ in 0..cx.o.requests {
            lat.push(c.qmp(r#"{"execute":"query-status"}"#)?.as_secs_f64());
        }
        push(
            &mut t,
            &format!("{} QMP query-status", v.label()),
            1,
            &lat,
            t0.elapsed().as_secs_f64(),
        );
        q.kill();
    }
    t.print();
    println!("  Round trip = write of the request line to the read of the response line, per request; {n} clients each send {per} requests back to back, all at once.");
    println!("  QMP serves one client per monitor socket, so it has a 1-client figure only.");
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
