//! Real Linux (`mini` from the kernel library): cold boot to init, then a
//! control-socket `reset` to init again in the same process, and the PVM
//! fallback exits each boot needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::ctl::LineClient;
use crate::proc::{strip_ansi, Proc};
use crate::report::{ratio, stats, Table};

pub const RUN_INIT: &str = "Run /init as init process";
pub const INIT_OK: &str = "VMM-INIT-OK";
/// The console marker of a boot started by a control-socket `reset`.
pub const RESET_MARKER: &str = "(reset: command";

pub struct LinuxOpts {
    pub kernel_dir: PathBuf,
    pub name: String,
    pub runs: usize,
    pub timeout: Duration,
    pub memory_mib: u64,
    /// Boot the entry's initrd32.img (i386 busybox) with `vdso32=0`.
    pub initrd32: bool,
    /// The entry's kernel file (bzImage, or vmlinux for a PVH boot); empty:
    /// what `--kernel-name` boots (vmlinux when the entry has one).
    pub kernel_file: String,
}

/// Reads one figure of a run.
type Field = fn(&Run) -> Option<f64>;

#[derive(Default)]
struct Run {
    first_kvm_run: Option<f64>,
    cold_run_init: Option<f64>,
    cold_run_init_guest: Option<f64>,
    cold_init_ok: Option<f64>,
    reset_rtt: Option<f64>,
    reset_marker: Option<f64>,
    reset_run_init: Option<f64>,
    reset_run_init_guest: Option<f64>,
    reset_init_ok: Option<f64>,
    /// (boot number, the vmm's "PVM fallback this boot" summary)
    fallback: Vec<(u64, String)>,
    /// The boot number our `reset` started.
    reset_boot: Option<u64>,
    notes: Vec<String>,
}

pub fn bench(vmm: &Path, o: &LinuxOpts, tmp: &Path) -> Result<(), String> {
    let entry = o.kernel_dir.join(&o.name);
    let kernel_file = if o.kernel_file.is_empty() {
        ["vmlinux", "bzImage"]
            .into_iter()
            .find(|f| entry.join(f).is_file())
            .unwrap_or("bzImage")
    } else {
        o.kernel_file.as_str()
    };
    if !entry.join(kernel_file).is_file() {
        return Err(format!(
            "kernel library entry {} missing: run resources/build-kernels.sh {}",
            entry.display(),
            o.name
        ));
    }
    println!(
        "  boot: {}/{} with {}, {} MiB, 1 vCPU, control socket; VMM_LOG=info",
        entry.display(),
        kernel_file,
        if o.initrd32 {
            "initrd32.img (i386 user space) and vdso32=0"
        } else {
            "the entry's initrd.img and cmdline"
        },
        o.memory_mib
    );
    let mut runs = Vec::new();
    for i in 0..o.runs {
        eprintln!(
            "bench: linux run {}/{} ({} boots to init; minutes under a software KVM)...",
            i + 1,
            o.runs,
            o.name
        );
        runs.push(one_run(vmm, o, &entry, &tmp.join(format!("linux{i}")))?);
    }
    let col = |f: fn(&Run) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    let med = |f: fn(&Run) -> Option<f64>| stats(&col(f)).map(|s| s.median);
    let mut t = Table::new(&["measurement", "n", "median", "p90", "min", "max", "vs cold"]);
    let rows: [(&str, Field); 9] = [
        ("cold: Vm::new -> first KVM_RUN (vmm log)", |r| {
            r.first_kvm_run
        }),
        ("cold: spawn -> \"Run /init\" (host clock)", |r| {
            r.cold_run_init
        }),
        ("cold: guest printk time at \"Run /init\"", |r| {
            r.cold_run_init_guest
        }),
        ("cold: spawn -> VMM-INIT-OK", |r| r.cold_init_ok),
        ("reset: `reset` request round trip", |r| r.reset_rtt),
        ("reset: request -> boot marker (console)", |r| {
            r.reset_marker
        }),
        ("reset: request -> \"Run /init\"", |r| r.reset_run_init),
        ("reset: guest printk time at \"Run /init\"", |r| {
            r.reset_run_init_guest
        }),
        ("reset: request -> VMM-INIT-OK", |r| r.reset_init_ok),
    ];
    for (label, f) in rows {
        if label.contains("printk") && col(f).is_empty() {
            continue; // the kernel prints no timestamps (CONFIG_PRINTK_TIME off)
        }
        let vs = if label.ends_with("-> \"Run /init\"") && label.starts_with("reset") {
            ratio(med(f), med(|r| r.cold_run_init))
        } else if label == "reset: request -> VMM-INIT-OK" {
            ratio(med(f), med(|r| r.cold_init_ok))
        } else {
            String::new()
        };
        t.dur_row(label, stats(&col(f)), &[vs]);
    }
    t.print();
    for (i, r) in runs.iter().enumerate() {
        for (b, f) in &r.fallback {
            let which = match *b {
                1 => " (cold)",
                b if Some(b) == r.reset_boot => " (after our reset)",
                _ => "",
            };
            println!("  run {}: PVM fallback, boot {b}{which}: {f}", i + 1);
        }
        if r.fallback.is_empty() {
            println!(
                "  run {}: no \"PVM fallback this boot\" line (none needed, or not PVM)",
                i + 1
            );
        }
        for n in &r.notes {
            println!("  run {}: note: {n}", i + 1);
        }
    }
    if o.runs < 2 {
        println!("  (1 run: medians need --linux-runs N)");
    }
    Ok(())
}

fn one_run(vmm: &Path, o: &LinuxOpts, entry: &Path, dir: &Path) -> Result<Run, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sock = dir.join("control.sock");
    let mut c = Command::new(vmm);
    let base = std::fs::read_to_string(entry.join("cmdline"))
        .map_err(|e| format!("cannot read {}/cmdline: {e}", entry.display()))?;
    // "Run /init" is an info line: the kernel's default console level
    // (the Debian entries' own loglevel=4 hides it; the last one wins).
    let mut cmdline = format!("{} loglevel=7", base.trim());
    if o.initrd32 || !o.kernel_file.is_empty() {
        if o.initrd32 && !cmdline.contains("vdso32=") {
            cmdline.push_str(" vdso32=0");
        }
        let initrd = if o.initrd32 {
            "initrd32.img"
        } else {
            "initrd.img"
        };
        c.arg("--kernel")
            .arg(entry.join(&o.kernel_file))
            .arg("--initrd")
            .arg(entry.join(initrd))
            .arg("--cmdline")
            .arg(cmdline);
    } else {
        c.arg("--kernel-dir")
            .arg(&o.kernel_dir)
            .args(["--kernel-name", &o.name])
            .arg("--cmdline")
            .arg(cmdline);
    }
    c.args(["--memory", &o.memory_mib.to_string(), "--vcpus", "1"])
        .args(["--console", "stdio", "--name", "bench-linux"])
        .arg("--control")
        .arg(&sock)
        .env("VMM_LOG", "info")
        .env("NO_COLOR", "1");
    let p = Proc::spawn(&mut c, "vmm")?;
    let deadline = Instant::now() + o.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut r = Run::default();
    let since = |t: Instant, from: Instant| t.saturating_duration_since(from).as_secs_f64();

    // Cold boot.
    let (_, t_run, end) = p
        .out
        .wait_any(&[RUN_INIT], 0, left())
        .ok_or_else(|| format!("no \"{RUN_INIT}\" within {:?}: {}", o.timeout, p.ended()))?;
    r.cold_run_init = Some(since(t_run, p.spawned));
    r.cold_run_init_guest = printk_time(&p.out.text(), end);
    r.first_kvm_run = crate::first_kvm_run(&p.err.text()).map(|(d, _)| d);
    match p
        .out
        .wait_any(&[INIT_OK, "Kernel panic", "--- vmm: boot "], end, left())
    {
        Some((0, t, _)) => r.cold_init_ok = Some(since(t, p.spawned)),
        Some((_, _, _)) => r.notes.push(format!(
            "cold boot: no {INIT_OK} (init failed, kernel panicked or rebooted){}",
            if o.initrd32 {
                ""
            } else {
                "; try --linux-initrd32"
            }
        )),
        None => r
            .notes
            .push(format!("cold boot: no {INIT_OK} before the timeout")),
    }

    // Reset through the control socket.
    let mut ctl = LineClient::connect(&sock, left().min(Duration::from_secs(30)))?;
    let from = p.out.len();
    let t_reset = Instant::now();
    let (_, rtt) = ctl.ours(r#"{"cmd":"reset"}"#)?;
    r.reset_rtt = Some(rtt.as_secs_f64());
    let (_, t_m, end) = p
        .out
        .wait_any(&[RESET_MARKER], from, left())
        .ok_or_else(|| format!("no boot marker after `reset`: {}", p.ended()))?;
    r.reset_marker = Some(since(t_m, t_reset));
    r.reset_boot = boot_number(&p.out.text(), end);
    match p.out.wait_any(&[RUN_INIT], end, left()) {
        Some((_, t, e2)) => {
            r.reset_run_init = Some(since(t, t_reset));
            r.reset_run_init_guest = printk_time(&p.out.text(), e2);
            match p
                .out
                .wait_any(&[INIT_OK, "Kernel panic", "--- vmm: boot "], e2, left())
            {
                Some((0, t, _)) => r.reset_init_ok = Some(since(t, t_reset)),
                Some(_) => r
                    .notes
                    .push(format!("after reset: no {INIT_OK} (init failed)")),
                None => r
                    .notes
                    .push(format!("after reset: no {INIT_OK} before the timeout")),
            }
        }
        None => r
            .notes
            .push(format!("after reset: no \"{RUN_INIT}\" before the timeout")),
    }
    // A power-off makes the vmm log the last boot's fallback counts.
    let err_from = p.err.len();
    if ctl.ours(r#"{"cmd":"poweroff"}"#).is_ok() {
        let _ = p.err.wait_any(
            &["PVM fallback this boot"],
            err_from,
            Duration::from_secs(5),
        );
    }
    p.kill();
    r.fallback = fallback_lines(&strip_ansi(&p.err.text()));
    Ok(r)
}

/// The vmm's per-boot fallback summaries, each with the boot it belongs to
/// (the `boot` event before it in the log).
fn fallback_lines(log: &str) -> Vec<(u64, String)> {
    let mut boot = 0;
    let mut out = Vec::new();
    for l in log.lines() {
        if let Some(rest) = l.split_once("\"event\":\"boot\",\"boot_count\":") {
            let n: String = rest.1.chars().take_while(char::is_ascii_digit).collect();
            boot = n.parse().unwrap_or(boot);
        } else if let Some((_, v)) = l.split_once("PVM fallback this boot: ") {
            out.push((boot, v.to_string()));
        }
    }
    out
}

/// N of the console's `--- vmm: boot N (...` marker that ends at `end`.
fn boot_number(text: &str, end: usize) -> Option<u64> {
    let head = text.get(..end)?;
    let start = head.rfind("--- vmm: boot ")? + "--- vmm: boot ".len();
    let n: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    n.parse().ok()
}

/// The printk timestamp (`[   12.345678]`) of the line ending at `end`.
fn printk_time(text: &str, end: usize) -> Option<f64> {
    let head = text.get(..end)?;
    let line = &head[head.rfind('\n').map(|i| i + 1).unwrap_or(0)..];
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    line[open + 1..close].trim().parse().ok()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn printk_time_reads_the_bracket_of_the_matched_line() {
        let t = "x\n[    1.5] a\n[   98.250000] Run /init as init process\r\nmore";
        let end = t.find("more").unwrap_or(0);
        assert_eq!(printk_time(t, end - 2), Some(98.25));
        assert_eq!(printk_time("Run /init", 9), None);
    }

    #[test]
    fn fallback_lines_belong_to_the_boot_logged_before_them() {
        let log = "x {\"event\":\"boot\",\"boot_count\":1,\"kernel\":\"mini\"}\n\
                   y PVM fallback this boot: 0 emulated, 1 injected: [(\"int3\", 1)]\n\
                   z {\"event\":\"boot\",\"boot_count\":12,\"kernel\":\"mini\"}\n\
                   y PVM fallback this boot: 3 emulated, 0 injected: []\n";
        let f = fallback_lines(log);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].0, 1);
        assert_eq!(
            (f[1].0, f[1].1.as_str()),
            (12, "3 emulated, 0 injected: []")
        );
        let con = "a\r\n--- vmm: boot 3 (reset: command, kernel mini) at T ---";
        let end = con.find(RESET_MARKER).map(|i| i + RESET_MARKER.len());
        assert_eq!(boot_number(con, end.unwrap_or(0)), Some(3));
    }
}
