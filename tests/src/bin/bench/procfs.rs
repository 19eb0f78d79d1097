//! What /proc and /sys say about the host and about a process.

use std::path::Path;

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// A `kB` field of /proc/PID/status (VmHWM, VmRSS, RssAnon, ...).
pub fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let s = read(&format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| format!("/proc/{pid}/status has no {field}"))
}

/// Resident KiB of the guest RAM: the anonymous mappings whose size is the
/// guest memory size (up to 4 MiB more, for an aligned allocation).
pub fn guest_ram_rss_kib(pid: u32, mem_mib: u64) -> Result<u64, String> {
    let s = read(&format!("/proc/{pid}/smaps"))?;
    let want = mem_mib * 1024;
    let mut total = None;
    let (mut anon, mut size) = (false, 0u64);
    for l in s.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // header: range perms offset dev inode [path]
            anon = f.nth(4).is_none();
            size = 0;
        } else if first == "Size:" {
            size = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if first == "Rss:" && anon && size >= want && size <= want + 4096 {
            let rss: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total = Some(total.unwrap_or(0) + rss);
        }
    }
    total.ok_or_else(|| format!("no anonymous {mem_mib} MiB mapping in /proc/{pid}/smaps"))
}

/// utime + stime of the whole process (all threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let s = read(&format!("/proc/{pid}/stat"))?;
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after the command: state(3) ... utime(14) stime(15)
    let get = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: field {} unreadable", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// Sum of the threads' on-CPU time in ns (/proc/PID/task/*/schedstat);
/// finer than clock ticks. Threads that already ended are not counted.
pub fn sched_ns(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("cannot list {dir}: {e}"))?;
    let mut total = 0u64;
    for e in rd.flatten() {
        let p = e.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(&p) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

pub struct Host {
    pub kernel: String,
    pub kvm: String,
    pub cpu: String,
    pub cpus: usize,
}

pub fn host() -> Host {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    let backend = if m("kvm_pvm") {
        "kvm_pvm (software nested KVM: /sys/module/kvm_pvm exists; guest figures say nothing about hardware)"
    } else if m("kvm_intel") {
        "kvm_intel (hardware VT-x)"
    } else if m("kvm_amd") {
        "kvm_amd (hardware AMD-V)"
    } else {
        "unknown backend"
    };
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => backend.to_string(),
        Err(e) => format!("{backend}; /dev/kvm not usable: {e}"),
    };
    Host {
        kernel,
        kvm,
        cpu,
        cpus,
    }
}
