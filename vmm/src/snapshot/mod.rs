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
//! The capture is quick and runs on the event loop; the files (guest
//! memory is most of it: seconds for gigabytes) are written on a thread of
//! their own (`snapshot`), so the console and the control socket answer
//! meanwhile. The lifecycle holds the machine while they are written
//! (every hard power request is refused, see `lifecycle`), and the thread ends
//! it under the VM's lock ([`finish`], then resume or power-off).
//!
//! The files are described in [`format`].

pub mod format;
pub mod kvm_state;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::{AcpiPmState, I8042State, Ib700State, PvPanicState, SerialState};
use devices::virtio::GuestMemoryMmap;
use devices::virtio::TransportState;
use serde::{Deserialize, Serialize};

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
    /// The VM was paused (it is restored paused).
    #[serde(default)]
    pub paused: bool,
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
    /// Where it came from (a directory, or a migration's source), for messages.
    pub dir: PathBuf,
    pub snapshot: VmSnapshot,
    memory: Memory,
    /// A migration's connection: the target tells the source it is ready
    /// and waits for its go-ahead before the guest runs.
    pub incoming: Option<std::net::TcpStream>,
}

/// Where a restored machine's memory comes from.
enum Memory {
    /// A snapshot's memory file, read into fresh guest RAM.
    File(File),
    /// Received already (a migration), taken by the new machine.
    Received(Option<GuestMemoryMmap>),
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
            memory: Memory::File(memory),
            incoming: None,
        })
    }

    /// A migration's machine: its state, its memory as received, and the
    /// connection to its source.
    pub fn received(
        from: PathBuf,
        snapshot: VmSnapshot,
        mem: GuestMemoryMmap,
        stream: std::net::TcpStream,
    ) -> RestoreSource {
        RestoreSource {
            dir: from,
            snapshot,
            memory: Memory::Received(Some(mem)),
            incoming: Some(stream),
        }
    }

    /// The guest memory received, once (None for a snapshot's file).
    pub fn take_memory(&mut self) -> Option<GuestMemoryMmap> {
        match &mut self.memory {
            Memory::Received(m) => m.take(),
            Memory::File(_) => None,
        }
    }

    /// Fills the new machine's memory from the snapshot (nothing to do for
    /// memory received).
    pub fn read_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let Memory::File(f) = &self.memory else {
            return Ok(());
        };
        let path = self.dir.join(MEMORY_FILE);
        format::read_memory(mem, f, &self.snapshot.memory)
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
    crate::backup::entry_in(dir, to).map_err(|dir| {
        format!(
            "'{to}': a snapshot is a new directory directly in the snapshot directory {} \
             (a bare name is taken as one there; not ending in .part)",
            dir.display()
        )
    })
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
    pub paused: bool,
    pub watchdog: Ib700State,
}

/// The figures a taken snapshot reports.
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    pub memory_bytes: u64,
    pub state_bytes: u64,
}

/// A paused machine's state, its devices quiesced: what a snapshot file
/// holds, or a migration sends. `memory` is left for the caller to fill.
pub struct Captured {
    pub snapshot: VmSnapshot,
    /// The virtio transports' states, to start the devices again
    /// ([`restart_devices`]) unless the machine is being left for good.
    pub virtio: Vec<TransportState>,
}

/// Reads a paused machine's state and quiesces its virtio devices (no
/// request in flight, nothing more written to guest memory by them). On
/// failure the devices quiesced so far are started again.
pub fn capture(
    machine: &Machine,
    virtio: &[VirtioSlot],
    msr_index: &Arc<Vec<u32>>,
    meta: &Meta,
) -> Result<Captured, SnapshotError> {
    // The interrupt controllers before the LAPICs: KVM's PIT keeps
    // ticking while the vCPUs are parked, and an interrupt passed on in
    // between is then saved twice (delivered once more: harmless for edge
    // interrupts) rather than not at all.
    let kvm = kvm_state::save_vm(&machine.vm).map_err(|e| SnapshotError::Machine(e.to_string()))?;
    let cpus = machine
        .save_vcpus(msr_index)
        .map_err(SnapshotError::Machine)?;
    let mut saved: Vec<TransportState> = Vec::with_capacity(virtio.len());
    for (i, slot) in virtio.iter().enumerate() {
        match lock(&slot.transport).save_state() {
            Ok(s) => saved.push(s),
            Err(e) => {
                restart_devices(virtio, &saved);
                return Err(SnapshotError::Machine(format!("virtio device {i}: {e}")));
            }
        }
    }
    let devices = DeviceStates {
        serial: lock(&machine.serial).save_state(),
        i8042: lock(&machine.i8042).save_state(),
        acpi_pm: lock(&machine.acpi_pm).save_state(),
        pvpanic: lock(&machine.pvpanic).save_state(),
        watchdog: meta.watchdog.clone(),
        virtio: saved.clone(),
    };
    Ok(Captured {
        snapshot: VmSnapshot {
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            name: meta.name.clone(),
            mem_mib: meta.mem_mib,
            vcpus: meta.vcpus,
            boot_count: meta.boot_count,
            kernel: meta.kernel.clone(),
            last_reset: meta.last_reset.clone(),
            uptime_ms: u64::try_from(meta.uptime.as_millis()).unwrap_or(u64::MAX),
            paused: meta.paused,
            memory: MemoryInfo {
                bytes: 0,
                crc32: 0,
                data: Vec::new(),
            },
            kvm,
            cpus,
            devices,
        },
        virtio: saved,
    })
}

/// Starts quiesced virtio devices again from their saved positions (a
/// request the guest queued meanwhile is served).
pub fn restart_devices(virtio: &[VirtioSlot], saved: &[TransportState]) {
    for (slot, s) in virtio.iter().zip(saved) {
        if let Err(e) = lock(&slot.transport).restore_state(s) {
            // The device the guest had is gone: say so loudly; the guest's
            // driver sees DEVICE_NEEDS_RESET and may recover it.
            tracing::error!("a quiesced virtio device did not start again: {e}");
        }
    }
}

/// After [`write_dir`] (`written`: it succeeded): the virtio devices
/// start again from their saved positions, unless the snapshot was taken
/// with `stop` (then they are reset: the guest's queued requests are the
/// restored VM's to serve, not this one's); the caller resumes the vCPUs
/// (or powers the VM off).
pub fn finish(virtio: &[VirtioSlot], saved: &[TransportState], written: bool, stop: bool) {
    if written && stop {
        for slot in virtio {
            lock(&slot.transport).reset();
        }
    } else {
        restart_devices(virtio, saved);
    }
}

/// Writes `NAME.part/` with the paused guest's memory `mem` and `snapshot`
/// (its `memory` filled in here), and renames it to `NAME`; removes the
/// part on failure. Needs no lock of the VM's: the guest stays paused and
/// its devices quiesced until [`finish`] (the lifecycle holds the machine).
pub fn write_dir(
    mem: &GuestMemoryMmap,
    snapshot: &mut VmSnapshot,
    path: &Path,
) -> Result<Taken, SnapshotError> {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    // Only a directory this call made is removed on failure (not, say, a
    // `.part` someone else left there).
    std::fs::create_dir(&part).map_err(|source| SnapshotError::File {
        path: part.clone(),
        source,
    })?;
    let r = write_files(mem, snapshot, &part).and_then(|taken| {
        // The files' names are in the directory for good, then the
        // directory's new name in its parent: a snapshot answered as
        // taken survives a crash of the host.
        sync_dir(&part)?;
        std::fs::rename(&part, path).map_err(|source| SnapshotError::File {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(taken)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(part.join(STATE_FILE));
        let _ = std::fs::remove_file(part.join(MEMORY_FILE));
        let _ = std::fs::remove_dir(&part);
    }
    r
}

/// `fsync` of a directory (its entries).
fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SnapshotError::File {
            path: dir.to_path_buf(),
            source,
        })
}

fn write_files(
    mem: &GuestMemoryMmap,
    snapshot: &mut VmSnapshot,
    part: &Path,
) -> Result<Taken, SnapshotError> {
    use std::io::Write;
    let file_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::File { path, source }
    };
    let mem_path = part.join(MEMORY_FILE);
    let mf = File::create(&mem_path).map_err(file_err(&mem_path))?;
    snapshot.memory = format::write_memory(mem, &mf).map_err(|source| SnapshotError::Format {
        path: mem_path.clone(),
        source,
    })?;
    mf.sync_all().map_err(file_err(&mem_path))?;
    let state_path = part.join(STATE_FILE);
    let body = serde_json::to_vec(&*snapshot).map_err(|source| SnapshotError::Json {
        path: state_path.clone(),
        source,
    })?;
    let bytes = format::encode_state(&body);
    let mut sf = File::create(&state_path).map_err(file_err(&state_path))?;
    sf.write_all(&bytes).map_err(file_err(&state_path))?;
    sf.sync_all().map_err(file_err(&state_path))?;
    Ok(Taken {
        memory_bytes: snapshot.memory.bytes,
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
