//! The control socket's actions layer: executes typed requests on the VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use devices::bus::lock;
use devices::virtio::RingWatch;
use protocol::{
    ControlError, DiskInfo, ErrorCode, Event, KernelEntry, KernelList, KernelSelection, NetInfo,
    QueueInfo, Reply, Request, StatusInfo, WatchdogInfo,
};

use crate::config::{library_entries, library_entry};
use crate::control::{ControlHandler, Responder};
use crate::runtime::SharedVm;
use crate::vm::{StopKind, Vm};

pub struct VmControlHandler {
    pub vm: SharedVm,
}

pub fn watchdog_info(vm: &Vm) -> WatchdogInfo {
    let s = vm.watchdog.status();
    WatchdogInfo {
        armed: s.armed,
        timeout_s: s.timeout_s.map(u64::from),
        seconds_left: s.seconds_left,
        action: vm.watchdog_action,
        expiries: s.expiries,
    }
}

pub fn status_info(vm: &Vm) -> StatusInfo {
    StatusInfo {
        name: vm.config.name.clone(),
        state: vm.state(),
        kernel: vm.current_kernel.clone(),
        next_kernel: vm.next_kernel.clone(),
        vcpus: u32::from(vm.config.vcpus),
        memory_mib: vm.config.mem_mib,
        uptime_ms: vm.uptime().as_millis() as u64,
        boot_count: vm.boot_count,
        last_reset: vm.last_reset,
        migrating: vm.migrating(),
        snapshotting: vm.snapshotting(),
        throttle_pct: vm.throttle_pct(),
        watchdog: Some(watchdog_info(vm)),
        on_panic: Some(vm.panic_action),
        disks: vm.disks.iter().map(disk_info).collect(),
        nets: vm
            .nets
            .iter()
            .map(|n| {
                let (tap_rx, tap_tx) = tap_bytes(&n.tap).unzip();
                let queues = ring_info(&n.rings);
                NetInfo {
                    tap: n.tap.clone(),
                    mac: devices::virtio::net::format_mac(n.mac),
                    datapath: n.counters.snapshot().datapath().to_string(),
                    // What the TAP received came from the guest.
                    rx_bytes: tap_tx,
                    tx_bytes: tap_rx,
                    queue_pairs: n.counters.queue_pairs() as u64,
                    queue_pairs_enabled: n.counters.enabled_pairs(),
                    pair_frames: n.counters.pair_frames(),
                    poll_us: u64::from(n.counters.vhost_poll_us()),
                    queues,
                    interrupt_status: n.interrupt.untaken(),
                }
            })
            .collect(),
    }
}

/// One disk as `status` (and `set-disk`) shows it.
fn disk_info(d: &crate::vm::DiskSource) -> DiskInfo {
    let s = d.counters.snapshot();
    let limits = d.limits.get();
    DiskInfo {
        id: d.id.clone(),
        path: d.path.display().to_string(),
        read_only: d.read_only,
        engine: d.engine.to_string(),
        poll_us: d.poll.get(),
        polled: s.polled,
        iops: limits.iops,
        mib_s: limits.bytes_per_s >> 20,
        throttled: s.throttled,
        read_bytes: s.read_bytes,
        write_bytes: s.write_bytes,
        io_errors: s.io_errors,
        queues: ring_info(&d.rings),
        interrupt_status: d.interrupt.untaken(),
    }
}

/// What `set-disk` changes; `None`: left as it is.
struct DiskSettings {
    poll_us: Option<u64>,
    iops: Option<u64>,
    mib_s: Option<u64>,
}

/// `set-disk`: the operator's; takes effect at the disk's next wake-up
/// (its thread reads the settings without the device's lock).
fn set_disk(
    vm: &Vm,
    peer: &crate::control::PeerIdentity,
    disk: &str,
    set: DiskSettings,
) -> Result<DiskInfo, ControlError> {
    peer.require_operator("set-disk")?;
    let d = vm.find_disk(disk)?;
    if let Some(us) = set.poll_us {
        // The parser allows at most MAX_POLL_US (1000); the device clamps too.
        d.poll.set(u32::try_from(us).unwrap_or(u32::MAX));
    }
    if set.iops.is_some() || set.mib_s.is_some() {
        let mut limits = d.limits.get();
        if let Some(n) = set.iops {
            limits.iops = n;
        }
        if let Some(m) = set.mib_s {
            limits.bytes_per_s = m.saturating_mul(1 << 20);
        }
        d.limits.set(limits);
    }
    Ok(disk_info(d))
}

/// A device's running queues, read from guest memory.
fn ring_info(rings: &RingWatch) -> Vec<QueueInfo> {
    rings
        .views()
        .into_iter()
        .map(|r| QueueInfo {
            queue: r.queue,
            size: r.size,
            avail_idx: r.avail_idx,
            used_idx: r.used_idx,
            used_event: r.used_event,
            avail_event: r.avail_event,
        })
        .collect()
}

/// The TAP's own byte counters (received, transmitted) from
/// `/proc/self/net/dev` (this process's network namespace, where the TAP
/// is): they count either datapath, the kernel's included.
fn tap_bytes(tap: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let f = NET_DEV.get()?.as_ref()?;
    // A seq_file: every read from offset 0 is a fresh snapshot.
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    while text.len() < (1 << 20) {
        let n = f.read_at(&mut buf, text.len() as u64).ok()?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    parse_net_dev(&String::from_utf8_lossy(&text), tap)
}

static NET_DEV: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Opens `/proc/self/net/dev` for [`tap_bytes`]: at start-up, before the
/// sandbox (which grants no path under `/proc`).
pub fn open_net_dev() {
    let _ = NET_DEV.get_or_init(|| std::fs::File::open("/proc/self/net/dev").ok());
}

/// `  tap0: RXBYTES RXPACKETS ... (8 receive fields) TXBYTES ...`.
pub(crate) fn parse_net_dev(text: &str, name: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let (iface, rest) = line.split_once(':')?;
        if iface.trim() != name {
            return None;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        Some((*f.first()?, *f.get(8)?))
    })
}

/// `kernels` and `set-kernel` on a VM started with `--kernel FILE`.
fn fixed_kernel() -> ControlError {
    ControlError::new(
        ErrorCode::Unsupported,
        "this VM boots a fixed kernel file, not a kernel library entry",
    )
}

fn kernel_list(vm: &Vm) -> Result<KernelList, ControlError> {
    let dir = vm.config.library_dir().ok_or_else(fixed_kernel)?;
    let mut kernels: Vec<KernelEntry> = library_entries(dir)
        .into_iter()
        .map(|name| KernelEntry {
            version: std::fs::read_to_string(dir.join(&name).join("release"))
                .ok()
                .map(|s| s.trim().to_string()),
            description: None,
            name,
        })
        .collect();
    // The VM's own disk, as found at its last boot (the control socket
    // never reads the customer's disk: a stalled one would stall it).
    if let Some(disk) = &vm.boot_disk {
        let found = disk.found();
        if let Some(newest) = found.last() {
            kernels.push(KernelEntry {
                name: "disk".into(),
                version: Some(newest.clone()),
                description: Some("the newest kernel in the VM's /boot, at each boot".into()),
            });
        }
        for v in found.iter().rev() {
            kernels.push(KernelEntry {
                name: format!("disk:{v}"),
                version: Some(v.clone()),
                description: Some(format!("/boot/vmlinuz-{v} on the VM's disk")),
            });
        }
    }
    Ok(KernelList {
        kernels,
        current: Some(vm.current_kernel.clone()),
        next: vm.next_kernel.clone().or(Some(vm.current_kernel.clone())),
    })
}

/// The state file keeps the customer's kernel choice across VMM restarts. Written to a
/// temporary file then renamed (a crash leaves the old choice, never half a file); neither is
/// opened through a symbolic link (`O_NOFOLLOW`), so a link planted there is refused.
pub fn save_kernel_choice(path: &Path, name: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(format!("{{\"kernel\":{}}}\n", serde_json::Value::from(name)).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn load_kernel_choice(path: &Path) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?
        // A state file is a few bytes; more is not ours.
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("kernel")?.as_str().map(str::to_string)
}

/// Where the state file lives: in `--state-dir`, else beside the config
/// file, else beside the control socket.
pub fn state_file_path(
    state_dir: Option<&Path>,
    config_file: Option<&Path>,
    control: Option<&Path>,
    name: &str,
) -> Option<PathBuf> {
    if let Some(d) = state_dir {
        return Some(d.join("state.json"));
    }
    config_file
        .and_then(Path::parent)
        .map(|d| d.join(format!("{name}.state.json")))
        .or_else(|| control.and_then(Path::parent).map(|d| d.join("state.json")))
}

fn set_kernel(vm: &mut Vm, name: &str) -> Result<KernelSelection, ControlError> {
    let dir = vm
        .config
        .library_dir()
        .ok_or_else(fixed_kernel)?
        .to_path_buf();
    if crate::disk_kernels::is_disk_name(name) {
        // Checked at the boot that takes it (a kernel just installed in
        // the guest is not known here yet), which fails clearly if absent.
        if vm.boot_disk.is_none() {
            return Err(ControlError::new(
                ErrorCode::NotFound,
                format!("{name}: this VM has no disk to boot a kernel from"),
            ));
        }
    } else {
        library_entry(&dir, name, None)
            .map_err(|e| ControlError::new(ErrorCode::NotFound, e.to_string()))?;
    }
    if let Some(p) = &vm.state_file {
        save_kernel_choice(p, name).map_err(|e| {
            ControlError::new(
                ErrorCode::HostError,
                format!("cannot save the kernel choice in {}: {e}", p.display()),
            )
        })?;
    }
    vm.next_kernel = Some(name.to_string());
    (vm.hooks.publish)(Event::KernelSelected {
        kernel: name.to_string(),
    });
    Ok(KernelSelection {
        next: name.to_string(),
        current: Some(vm.current_kernel.clone()),
    })
}

impl ControlHandler for VmControlHandler {
    fn execute(&mut self, request: Request, responder: Responder) {
        let mut vm = lock(&self.vm);
        let done = |r: Result<(), ControlError>| r.map(|()| Reply::Done);
        let result = match request {
            Request::Status => {
                crate::fatal::inject("control-status");
                Ok(Reply::Status(status_info(&vm)))
            }
            Request::Pause => done(vm.pause()),
            Request::Resume => done(vm.resume()),
            Request::Reset => done(vm.reset(protocol::ResetCause::Command)),
            Request::Poweroff => done(vm.poweroff_request()),
            Request::Start => done(vm.start()),
            Request::Shutdown { timeout_s } | Request::Reboot { timeout_s } => {
                let kind = if matches!(request, Request::Shutdown { .. }) {
                    StopKind::Shutdown
                } else {
                    StopKind::Reboot
                };
                let timeout = timeout_s
                    .map(Duration::from_secs)
                    .unwrap_or(vm.stop_timeout);
                vm.graceful_stop(
                    kind,
                    timeout,
                    Box::new(move |r| responder.send(r.map(Reply::Stopped))),
                );
                return;
            }
            Request::Kernels => kernel_list(&vm).map(Reply::Kernels),
            Request::SetKernel { name } => set_kernel(&mut vm, &name).map(Reply::KernelSelected),
            Request::Watchdog => Ok(Reply::Watchdog(watchdog_info(&vm))),
            Request::SetWatchdog { action } => {
                vm.watchdog_action = action;
                Ok(Reply::Watchdog(watchdog_info(&vm)))
            }
            Request::Sysrq { key } => done(vm.sysrq(&key)),
            Request::SetDisk {
                disk,
                poll_us,
                iops,
                mib_s,
            } => {
                let set = DiskSettings {
                    poll_us,
                    iops,
                    mib_s,
                };
                set_disk(&vm, responder.peer(), &disk, set).map(Reply::Disk)
            }
            Request::Backup {
                disk,
                to,
                speed_mib_s,
            } => match crate::backup::prepare(&vm, responder.peer(), &disk, &to, speed_mib_s) {
                Ok(job) => {
                    // The answer comes from the disk's thread.
                    let publish = vm.hooks.publish.clone();
                    drop(vm);
                    job.start(responder, publish);
                    return;
                }
                Err(e) => Err(e),
            },
            Request::Snapshot { dir, stop } => {
                match snapshot_begin(&mut vm, responder.peer(), &dir, stop) {
                    Ok(job) => {
                        drop(vm);
                        write_snapshot(self.vm.clone(), job, responder);
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Request::Migrate {
                to,
                token,
                disks,
                speed_mib_s,
                auto_converge,
                downtime_ms,
            } => match migrate_checks(&mut vm, responder.peer(), &to) {
                Ok((addr, cancel)) => {
                    let publish = vm.hooks.publish.clone();
                    drop(vm);
                    let shared = self.vm.clone();
                    let p2 = publish.clone();
                    let spawned = crate::spawner::spawn("migration".into(), move || {
                        crate::seccomp::install(crate::seccomp::Kind::Migration);
                        let flow = crate::migration::flow::Flow::new(cancel, speed_mib_s);
                        let how = crate::migration::source::How {
                            disks,
                            auto_converge,
                            downtime: Duration::from_millis(
                                downtime_ms.unwrap_or(protocol::DEFAULT_DOWNTIME_MS),
                            ),
                        };
                        let r = crate::migration::source::run(shared, addr, token, how, flow, p2);
                        let done = r.is_ok();
                        responder.send(r.map(Reply::Migrated));
                        if done {
                            crate::migration::source::end_process();
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::error!("cannot start the migration's thread: {e}");
                        lock(&self.vm).migration_abort(None);
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            Request::MigrateCancel => done(
                responder
                    .peer()
                    .require_operator("migrate-cancel")
                    .and_then(|()| vm.cancel_migration()),
            ),
            Request::Console { .. } | Request::Log { .. } | Request::Subscribe => Err(
                ControlError::internal("internal error: handled by the server"),
            ),
        };
        drop(vm);
        responder.send(result);
    }
}

/// `migrate`: the operator's; the VM must be running or paused, and the
/// target an address. Returns it and what `migrate-cancel` reaches.
fn migrate_checks(
    vm: &mut Vm,
    peer: &crate::control::PeerIdentity,
    to: &str,
) -> Result<(std::net::SocketAddr, Arc<crate::migration::flow::Cancel>), ControlError> {
    peer.require_operator("migrate")?;
    let addr = crate::migration::source::parse_target(to)?;
    let state = vm.state();
    if !matches!(
        state,
        protocol::VmState::Running | protocol::VmState::Paused
    ) {
        return Err(ControlError::invalid_state(format!(
            "the VM is {state}: there is nothing to migrate"
        )));
    }
    // Claimed now, under the VM's lock: a second `migrate` (or a
    // `snapshot`) is refused until this one ends.
    let cancel = vm.reserve_migration()?;
    Ok((addr, cancel))
}

/// `snapshot`'s checks and its capture, on the event loop (quick).
fn snapshot_begin(
    vm: &mut Vm,
    peer: &crate::control::PeerIdentity,
    dir: &str,
    stop: bool,
) -> Result<crate::vm::SnapshotJob, ControlError> {
    peer.require_operator("snapshot")?;
    let Some(base) = vm.config.snapshot_dir.as_deref() else {
        return Err(ControlError::new(
            ErrorCode::Unsupported,
            "this VM has no --snapshot-dir: the operator names the directory snapshots go to",
        ));
    };
    let path = crate::snapshot::target(base, dir).map_err(ControlError::bad_request)?;
    if path.symlink_metadata().is_ok() {
        return Err(ControlError::bad_request(format!(
            "{} exists: a snapshot never replaces one",
            path.display()
        )));
    }
    vm.snapshot_begin(&path, stop)
}

/// Writes the snapshot's files on a thread of its own (seconds for a large
/// guest: the console and the control socket answer meanwhile), then ends
/// it under the VM's lock and answers.
fn write_snapshot(shared: SharedVm, job: crate::vm::SnapshotJob, responder: Responder) {
    // The thread takes the job; one that cannot start leaves it here, to
    // be ended unwritten (the machine must not stay held).
    let slot = Arc::new(std::sync::Mutex::new(Some((job, responder))));
    let theirs = slot.clone();
    let vm = shared.clone();
    let end = |vm: &SharedVm, job, written, responder: Responder| {
        let r = lock(vm).snapshot_end(job, written);
        responder.send(r.map(Reply::Snapshot));
    };
    let spawned = crate::spawner::spawn("snapshot".into(), move || {
        crate::seccomp::install(crate::seccomp::Kind::Snapshot);
        let Some((mut job, responder)) = lock(&theirs).take() else {
            return;
        };
        let written = job.write();
        end(&vm, job, written, responder);
    });
    if let Err(e) = spawned {
        if let Some((job, responder)) = lock(&slot).take() {
            let why = crate::snapshot::SnapshotError::Machine(format!(
                "cannot start the snapshot's thread: {e}"
            ));
            end(&shared, job, Err(why), responder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice_round_trips_through_the_state_file() {
        let d = std::env::temp_dir().join(format!("vmm-state-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("vm.state.json");
        assert_eq!(load_kernel_choice(&p), None);
        save_kernel_choice(&p, "debian-6.12").unwrap();
        assert_eq!(load_kernel_choice(&p).as_deref(), Some("debian-6.12"));
        std::fs::write(&p, "not json").unwrap();
        assert_eq!(
            load_kernel_choice(&p),
            None,
            "a corrupt file is ignored, not fatal"
        );
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_link_planted_at_the_state_file_is_not_written_through() {
        let d = std::env::temp_dir().join(format!("vmm-state-link-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let p = d.join("vm.state.json");
        std::os::unix::fs::symlink(&victim, p.with_extension("tmp")).unwrap();
        let e = save_kernel_choice(&p, "x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(p.with_extension("tmp")).unwrap();
        std::fs::write(&victim, "{\"kernel\":\"planted\"}").unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        assert_eq!(load_kernel_choice(&p), None, "read through a link");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn state_file_sits_in_the_state_dir_else_beside_the_config_or_the_socket() {
        assert_eq!(
            state_file_path(
                Some(Path::new("/var/lib/vmm/web1")),
                Some(Path::new("/etc/vmm/web1.toml")),
                None,
                "web1"
            ),
            Some(PathBuf::from("/var/lib/vmm/web1/state.json"))
        );
        assert_eq!(
            state_file_path(None, Some(Path::new("/etc/vmm/web1.toml")), None, "web1"),
            Some(PathBuf::from("/etc/vmm/web1.state.json"))
        );
        assert_eq!(
            state_file_path(
                None,
                None,
                Some(Path::new("/run/vmm/web1/control.sock")),
                "web1"
            ),
            Some(PathBuf::from("/run/vmm/web1/state.json"))
        );
        assert_eq!(state_file_path(None, None, None, "x"), None);
    }

    #[test]
    fn tap_byte_counters_are_read_from_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n \
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n \
  tap0: 1234567    900    0    0    0     0          0         0  7654321    800    0    0    0     0       0          0\n \
 tap01:       5       1    0    0    0     0          0         0        6       1    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(text, "tap0"), Some((1234567, 7654321)));
        assert_eq!(parse_net_dev(text, "tap01"), Some((5, 6)));
        assert_eq!(parse_net_dev(text, "tap1"), None);
        assert_eq!(parse_net_dev("tap0: 1 2 x", "tap0"), None, "garbage");
        assert_eq!(parse_net_dev("tap0: 1 2 3", "tap0"), None, "short");
    }
}
