//! The same sequential block figures from inside a real guest: `mini` boots
//! with the scratch image as `/dev/vda` (`direct=on`) and runs
//! `/etc/vmm/blkbench.sh` (`vmm.run=blkbench`: busybox `dd` with O_DIRECT,
//! 1 MiB blocks), which prints one summary line per pass and powers off.
//!
//! Under this machine's kvm_pvm guest user space cannot make system calls,
//! so init never runs; the kernel panics and the run reports that instead
//! of figures. On hardware KVM it prints MB/s to compare with the harness.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct GuestFigures {
    pub seq_read_mbs: Option<f64>,
    pub seq_write_mbs: Option<f64>,
}

/// MB/s from busybox dd's "N bytes (…) copied, S seconds, …" line.
fn dd_rate(line: &str) -> Option<f64> {
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let secs: f64 = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" seconds"))?
        .trim()
        .parse()
        .ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

pub fn run(
    vmm: &Path,
    kernel_dir: &Path,
    image: &Path,
    timeout: Duration,
) -> Result<GuestFigures, String> {
    let entry = kernel_dir.join("mini");
    let cmdline = std::fs::read_to_string(entry.join("cmdline")).map_err(|e| {
        format!(
            "{}: {e} (run resources/build-kernels.sh mini)",
            entry.display()
        )
    })?;
    let mut child = Command::new(vmm)
        .args(["--name", "devbench-guest", "--kernel-dir"])
        .arg(kernel_dir)
        .args(["--kernel-name", "mini", "--memory", "256", "--vcpus", "1"])
        .arg("--disk")
        .arg(format!("path={},direct=on", image.display()))
        .args(["--cmdline", &format!("{} vmm.run=blkbench", cmdline.trim())])
        .args(["--console", "stdio", "--on-panic", "poweroff"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", vmm.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut figs = GuestFigures {
        seq_read_mbs: None,
        seq_write_mbs: None,
    };
    let mut outcome = Err(format!(
        "no result from the guest in {} s",
        timeout.as_secs()
    ));
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        if let Some(r) = line.split("vmm-bench: seq-read ").nth(1) {
            figs.seq_read_mbs = dd_rate(r);
        } else if let Some(w) = line.split("vmm-bench: seq-write ").nth(1) {
            figs.seq_write_mbs = dd_rate(w);
        } else if line.contains("vmm-bench: done") {
            outcome = Ok(());
            break;
        } else if line.contains("Kernel panic") {
            outcome = Err(format!(
                "the guest's init could not run (kernel said: {}); under kvm_pvm guest \
                 user space cannot make system calls (see README)",
                line.trim()
            ));
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    outcome.map(|()| figs)
}

#[cfg(test)]
mod tests {
    use super::dd_rate;

    #[test]
    fn parses_busybox_dd_summary() {
        let r = dd_rate("268435456 bytes (256.0MB) copied, 0.500000 seconds, 512.0MB/s");
        assert!((r.unwrap() - 536.870912).abs() < 1e-6);
        assert_eq!(dd_rate("garbage"), None);
    }
}
