//! Running as a service: systemd's readiness protocol (`Type=notify`, the
//! `sd-notify` crate) and `vmm check`, the operator's dry run of a config.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::config::{library_entry, KernelSource, VmConfig};

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) that the VM is
/// up: its control socket listens and its first boot has started, so a
/// unit ordered after this one finds the socket answering.
pub fn notify_ready(name: &str) {
    let status = format!("{name}: running, control socket up");
    let states = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ];
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!("cannot tell systemd the VM is ready: {e}");
    }
}

/// Tells systemd the VMM is stopping (the VM is being torn down).
pub fn notify_stopping() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::debug!("cannot tell systemd the VMM is stopping: {e}");
    }
}

/// `vmm check`: what starting `cfg` would need, checked without starting
/// anything (no VM, no socket, no lock taken): a summary line, or the
/// first problem as one line.
pub fn check(cfg: &VmConfig) -> Result<String, String> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let kernel = match &cfg.kernel {
        KernelSource::Library { dir, name } if crate::disk_kernels::is_disk_name(name) => {
            // The kernels in the first disk's /boot, as the start would find them.
            let disk = cfg.disks.first().ok_or_else(|| {
                crate::config::ConfigError::DiskKernelWithoutDisk(name.clone()).to_string()
            })?;
            let d = crate::disk_kernels::BootDisk::open(&disk.path)
                .map_err(|e| format!("{}: {e}", disk.path.display()))?;
            if d.found().is_empty() {
                format!(
                    "kernel {name}: none in {}'s /boot yet (rescue: kernel set with a library \
                     entry from {})",
                    disk.path.display(),
                    dir.display()
                )
            } else {
                format!(
                    "kernel {name} from {}'s /boot ({})",
                    disk.path.display(),
                    d.found().join(", ")
                )
            }
        }
        KernelSource::Library { dir, name } => {
            // The kernel the next boot would take: a saved `set-kernel`
            // choice is the VMM's business at start; the configured one
            // must exist either way.
            let k = library_entry(dir, name, None).map_err(|e| e.to_string())?;
            for f in [Some(&k.kernel), k.initrd.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|i| i.path())
            {
                readable(f)?;
            }
            format!("kernel {name} from {}", dir.display())
        }
        KernelSource::Path { kernel, initrd } => {
            readable(kernel)?;
            if let Some(i) = initrd {
                readable(i)?;
            }
            format!("kernel {}", kernel.display())
        }
    };
    let mut disks = Vec::new();
    for d in &cfg.disks {
        let f = File::options()
            .read(true)
            .open(&d.path)
            .map_err(|e| format!("disk {}: {e}", d.path.display()))?;
        let meta = f
            .metadata()
            .map_err(|e| format!("disk {}: {e}", d.path.display()))?;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            return Err(format!(
                "disk {}: not a regular file or a block device",
                d.path.display()
            ));
        }
        if !d.read_only && meta.permissions().readonly() && meta.is_file() {
            return Err(format!(
                "disk {}: the image is read-only; add ro=on or fix its mode",
                d.path.display()
            ));
        }
        disks.push(format!(
            "{}{}",
            d.path.display(),
            if d.read_only { " (ro)" } else { "" }
        ));
    }
    let plan = crate::sandbox::Plan::for_config(cfg).map_err(|e| e.to_string())?;
    // The datapath the start would choose. The start opens vhost-net as
    // root, before it drops to `--user` (devices::virtio::net::vhost), so
    // the user's own access to the node does not matter.
    let mut nets = Vec::new();
    for n in &cfg.nets {
        let vhost = n.vhost.resolve(1).map_err(|e| {
            format!(
                "net {}: vhost=on, but {}: {e}",
                n.tap,
                devices::virtio::net::vhost::VHOST_NET_DEV
            )
        })?;
        let datapath = if !vhost.is_empty() {
            "vhost-net"
        } else {
            "userspace"
        };
        nets.push(format!("{} ({datapath})", n.tap));
    }
    if let Some(sock) = &cfg.control {
        dir_exists("control socket", sock)?;
    }
    if let Some(log) = &cfg.console_log {
        dir_exists("console log", log)?;
    }
    let sandbox = check_sandbox(cfg, &plan)?;
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    Ok(format!(
        "{}: ok: {kernel}, {} vCPU(s), {} MiB, disks: {}, nets: {}, control socket: {}; {sandbox}",
        cfg.name,
        cfg.vcpus,
        cfg.mem_mib,
        list(&disks),
        list(&nets),
        cfg.control
            .as_deref()
            .map_or("none".to_string(), |p| p.display().to_string()),
    ))
}

/// The sandbox the VMM would enter, and whether its user could still do
/// what the VM needs after start-up: read the kernels, write the console
/// log's and the state file's directories.
fn check_sandbox(cfg: &VmConfig, plan: &crate::sandbox::Plan) -> Result<String, String> {
    use crate::sandbox::Grant;
    if let Some(id) = &plan.identity {
        for (path, grant) in &plan.rules {
            let dir = path.is_dir();
            let (bits, what) = match grant {
                Grant::Read if dir => (0o5, "read"),
                Grant::Read => (0o4, "read"),
                Grant::ReadWriteDir | Grant::ReadWriteTree => (0o3, "write to"),
                Grant::Device => continue,
            };
            // A missing --state-dir is made for the user at start.
            let made_at_start = cfg
                .state_dir
                .as_deref()
                .and_then(|d| std::path::absolute(d).ok())
                .is_some_and(|d| &d == path && !d.exists());
            if !made_at_start && !id.may(path, bits) {
                return Err(format!(
                    "user {} could not {what} {} after start-up (its owner, group or mode)",
                    id.name,
                    path.display()
                ));
            }
        }
    }
    let mut line = plan.describe();
    for w in &plan.warnings {
        line.push_str("; warning: ");
        line.push_str(w);
    }
    Ok(line)
}

fn readable(p: &Path) -> Result<(), String> {
    File::open(p)
        .map(drop)
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn dir_exists(what: &str, p: &Path) -> Result<(), String> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "{what} {}: its directory {} does not exist",
            p.display(),
            dir.display()
        ))
    }
}
