//! Snapshots: the whole running VM (guest memory, every vCPU, KVM's
//! in-kernel devices and ours) written to a directory, and continued by a
//! new process started with `--restore DIR` (issue 13, item 1).
//!
//! Taking one (the control socket's `snapshot`, operator only): the vCPUs
//! park, each reads its own state on its own thread (the thread owns its
//! fd), the virtio devices quiesce (no request in flight, vhost-net
//! stopped; their queue positions saved), guest memory and the state are
//! written to `NAME.part/` in `--snapshot-dir`, which is then renamed to
//! `NAME`. Then the devices start again from the positions saved and the
//! vCPUs resume, or, with `stop`, the VM is powered off. A failure at any
//! step leaves no `NAME`, removes the part, and the VM runs on as before:
//! the devices are restarted from what was saved whatever happened after.
//!
//! The files are described in [`format`].

pub mod format;
pub mod kvm_state;

use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::{AcpiPmState, I8042State, Ib700State, PvPanicState, SerialState};
use devices::virtio::TransportState;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use self::format::{FormatError, MemoryInfo};
use self::kvm_state::{VcpuState, VmKvmState};
use crate::machine::{Machine, VirtioSlot};

/// The state file's and the memory file's names in a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The VMM that wrote it (for the operator; the format version is what
    /// a reader checks).
    pub vmm_version: String,
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// The boot it continues, and what `status` said of it.
    pub boot_count: u64,
    pub kernel: String,
    pub last_reset: Option<String>,
    pub uptime_ms: u64,
    pub memory: MemoryInfo,
    pub kvm: VmKvmState,
    pub cpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

/// Our devices' registers.
#[derive(Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub acpi_pm: AcpiPmState,
    pub pvpanic: PvPanicState,
    pub watchdog: Ib700State,
    /// In slot order: disks, the modules disk, then network interfaces.
    pub virtio: Vec<TransportState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
    #[error("{}: unreadable state: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Machine(String),
}

/// A snapshot read at start-up (`--restore`), before the process is
/// confined: the state checked, the memory file open.
pub struct RestoreSource {
    pub dir: PathBuf,
    pub snapshot: VmSnapshot,
    memory: File,
}

impl RestoreSource {
    pub fn open(dir: &Path) -> Result<RestoreSource, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        let file_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::File { path, source }
        };
        let mut f = File::open(&state_path).map_err(file_err(&state_path))?;
        let body = format::decode_state(&mut f).map_err(|source| SnapshotError::Format {
            path: state_path.clone(),
            source,
        })?;
        let snapshot: VmSnapshot =
            serde_json::from_slice(&body).map_err(|source| SnapshotError::Json {
                path: state_path.clone(),
                source,
            })?;
        let mem_path = dir.join(MEMORY_FILE);
        let memory = File::open(&mem_path).map_err(file_err(&mem_path))?;
        Ok(RestoreSource {
            dir: dir.to_path_buf(),
            snapshot,
            memory,
        })
    }

    /// Fills the new machine's memory from the snapshot.
    pub fn read_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let path = self.dir.join(MEMORY_FILE);
        format::read_memory(mem, &self.memory, self.snapshot.memory)
            .map_err(|source| SnapshotError::Format { path, source })
    }

    /// Whether this VM's configuration can take the snapshot: the same
    /// memory, vCPUs and virtio devices (paths may differ).
    pub fn check_shape(&self, mem_mib: u64, vcpus: u8, virtio: usize) -> Result<(), String> {
        let s = &self.snapshot;
        let mut wrong = Vec::new();
        if s.mem_mib != mem_mib {
            wrong.push(format!("memory {} MiB (this VM: {mem_mib})", s.mem_mib));
        }
        if s.vcpus != vcpus || s.cpus.len() != usize::from(vcpus) {
            wrong.push(format!("{} vCPUs (this VM: {vcpus})", s.vcpus));
        }
        if s.devices.virtio.len() != virtio {
            wrong.push(format!(
                "{} virtio devices (this VM: {virtio}; disks, the modules disk and \
                 network interfaces must be the same, in the same order)",
                s.devices.virtio.len()
            ));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the snapshot in {} was taken of another machine: {}",
                self.dir.display(),
                wrong.join(", ")
            ))
        }
    }
}

/// Where a `snapshot` named `to` goes: a new directory directly in `dir`
/// (a bare name is taken as one there). Lexical: no `..`.
pub fn target(dir: &Path, to: &str) -> Result<PathBuf, String> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let asked = Path::new(to);
    let path = if asked.is_absolute() {
        asked.to_path_buf()
    } else {
        dir.join(asked)
    };
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let name_ok = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.ends_with(".part"));
    if !plain || path.parent() != Some(dir.as_path()) || !name_ok {
        return Err(format!(
            "'{to}': a snapshot is a new directory directly in the snapshot directory {} \
             (a bare name is taken as one there; not ending in .part)",
            dir.display()
        ));
    }
    Ok(path)
}

/// What the VM is, beyond its machine, for the state file.
pub struct Meta {
    pub name: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub boot_count: u64,
    pub kernel: String,
    pub last_reset: Option<String>,
    pub uptime: Duration,
    pub watchdog: Ib700State,
}

/// The figures a taken snapshot reports.
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    pub memory_bytes: u64,
    pub state_bytes: u64,
}

/// Saves a paused machine into `path` (which must not exist). The virtio
/// devices are started again from their saved positions before this
/// returns, whatever happened: the caller resumes the vCPUs (or powers
/// the VM off).
pub fn take(
    machine: &Machine,
    virtio: &[VirtioSlot],
    msr_index: &Arc<Vec<u32>>,
    meta: Meta,
    path: &Path,
) -> Result<Taken, SnapshotError> {
    let machine_err = SnapshotError::Machine;
    let cpus = machine.save_vcpus(msr_index).map_err(machine_err)?;
    let kvm = kvm_state::save_vm(&machine.vm).map_err(|e| SnapshotError::Machine(e.to_string()))?;
    // Quiescing stops each device; every one stopped is started again
    // below, on success or failure alike.
    let mut saved: Vec<TransportState> = Vec::with_capacity(virtio.len());
    let mut quiesce_err = None;
    for (i, slot) in virtio.iter().enumerate() {
        match lock(&slot.transport).save_state() {
            Ok(s) => saved.push(s),
            Err(e) => {
                quiesce_err = Some(SnapshotError::Machine(format!("virtio device {i}: {e}")));
                break;
            }
        }
    }
    let result = match quiesce_err {
        Some(e) => Err(e),
        None => {
            let snapshot_devices = DeviceStates {
                serial: lock(&machine.serial).save_state(),
                i8042: lock(&machine.i8042).save_state(),
                acpi_pm: lock(&machine.acpi_pm).save_state(),
                pvpanic: lock(&machine.pvpanic).save_state(),
                watchdog: meta.watchdog.clone(),
                virtio: saved.clone(),
            };
            write_dir(machine, cpus, kvm, snapshot_devices, &meta, path)
        }
    };
    for (slot, s) in virtio.iter().zip(&saved) {
        if let Err(e) = lock(&slot.transport).restore_state(s) {
            // The device the guest had is gone: say so loudly; the guest's
            // driver sees DEVICE_NEEDS_RESET and may recover it.
            tracing::error!("after a snapshot, a virtio device did not start again: {e}");
        }
    }
    result
}

/// Writes `NAME.part/` and renames it to `NAME`; removes the part on failure.
fn write_dir(
    machine: &Machine,
    cpus: Vec<VcpuState>,
    kvm: VmKvmState,
    devices: DeviceStates,
    meta: &Meta,
    path: &Path,
) -> Result<Taken, SnapshotError> {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let r = write_files(machine, cpus, kvm, devices, meta, &part).and_then(|taken| {
        std::fs::rename(&part, path).map_err(|source| SnapshotError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(taken)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(part.join(STATE_FILE));
        let _ = std::fs::remove_file(part.join(MEMORY_FILE));
        let _ = std::fs::remove_dir(&part);
    }
    r
}

fn write_files(
    machine: &Machine,
    cpus: Vec<VcpuState>,
    kvm: VmKvmState,
    devices: DeviceStates,
    meta: &Meta,
    part: &Path,
) -> Result<Taken, SnapshotError> {
    use std::io::Write;
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::File { path, source }
    };
    std::fs::create_dir(part).map_err(file_err(part))?;
    let mem_path = part.join(MEMORY_FILE);
    let mf = File::create(&mem_path).map_err(file_err(&mem_path))?;
    let memory =
        format::write_memory(&machine.mem, &mf).map_err(|source| SnapshotError::Format {
            path: mem_path.clone(),
            source,
        })?;
    mf.sync_all().map_err(file_err(&mem_path))?;
    let snapshot = VmSnapshot {
        vmm_version: env!("CARGO_PKG_VERSION").to_string(),
        name: meta.name.clone(),
        mem_mib: meta.mem_mib,
        vcpus: meta.vcpus,
        boot_count: meta.boot_count,
        kernel: meta.kernel.clone(),
        last_reset: meta.last_reset.clone(),
        uptime_ms: u64::try_from(meta.uptime.as_millis()).unwrap_or(u64::MAX),
        memory,
        kvm,
        cpus,
        devices,
    };
    let state_path = part.join(STATE_FILE);
    let body = serde_json::to_vec(&snapshot).map_err(|source| SnapshotError::Json {
        path: state_path.clone(),
        source,
    })?;
    let bytes = format::encode_state(&body);
    let mut sf = File::create(&state_path).map_err(file_err(&state_path))?;
    sf.write_all(&bytes).map_err(file_err(&state_path))?;
    sf.sync_all().map_err(file_err(&state_path))?;
    Ok(Taken {
        memory_bytes: memory.bytes,
        state_bytes: bytes.len() as u64,
    })
}

/// How long a step took, in microseconds, for the answer.
pub fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_goes_directly_into_the_snapshot_directory() {
        let d = Path::new("/srv/snap");
        assert_eq!(target(d, "web1").unwrap(), Path::new("/srv/snap/web1"));
        assert_eq!(
            target(d, "/srv/snap/web1").unwrap(),
            Path::new("/srv/snap/web1")
        );
    }

    #[test]
    fn a_snapshot_outside_the_snapshot_directory_is_refused() {
        let d = Path::new("/srv/snap");
        for bad in ["../etc", "/etc/x", "a/b", "x.part", "/srv/snap/../x", ""] {
            assert!(target(d, bad).is_err(), "{bad}");
        }
    }
}
