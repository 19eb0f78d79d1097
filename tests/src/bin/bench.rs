//! `bench`: the VMM's own costs against QEMU on the same host, with tiny
//! guests (and optionally the `mini` Linux kernel). Not a test: it asserts
//! nothing about timings, it prints a table. Run it via `scripts/bench.sh`.

#[path = "bench/acks.rs"]
mod acks;
#[path = "bench/control.rs"]
mod control;
#[path = "bench/ctl.rs"]
mod ctl;
#[path = "bench/idle.rs"]
mod idle;
#[path = "bench/launch.rs"]
mod launch;
#[path = "bench/linux.rs"]
mod linux;
#[path = "bench/memory.rs"]
mod memory;
#[path = "bench/proc.rs"]
mod proc;
#[path = "bench/procfs.rs"]
mod procfs;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/startup.rs"]
mod startup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use acks::acks;
use control::control;
use idle::idle;
use launch::{Boot, Guests, Vmm, UP};
use memory::memory;
use proc::Proc;
use startup::{first_kvm_run, startup};

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
  --only LIST          comma-separated subset of: startup,memory,idle,control,acks,linux
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
    const SECTIONS: [&str; 6] = ["startup", "memory", "idle", "control", "acks", "linux"];
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
    section(
        "acks",
        "5. A used-buffer interrupt's acknowledgement (virtio-mmio InterruptACK)",
        &acks,
    );
    if cx.o.linux && want("linux") {
        section(
            "linux",
            &format!(
                "6. Linux `{}`: cold boot vs control-socket reset (same process)",
                cx.o.linux_opts.name
            ),
            &|cx: &Ctx| linux::bench(&cx.o.vmm, &cx.o.linux_opts, &cx.tmp.0),
        );
    } else if cx.o.only.is_empty() {
        println!(
            "\n== 6. Linux boot: skipped (--linux; one boot takes minutes under a software KVM)"
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
