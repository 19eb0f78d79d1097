//! The VM's side of snapshots (`snapshot::` has the files and KVM's
//! state): taking one of the running VM, and a `--restore` process's
//! first "boot", which continues the saved machine instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use protocol::{ControlError, ErrorCode, Event, VmState};

use super::{Vm, VmmError};
use crate::machine::{BootConfig, Machine};

impl Vm {
    /// The first "boot" of a `--restore` process: the snapshot's machine,
    /// continued where it stopped (same boot, same kernel, devices as they
    /// were).
    pub(super) fn continue_snapshot(
        &mut self,
        mut r: crate::snapshot::RestoreSource,
    ) -> Result<(), VmmError> {
        r.check_shape(self.config.mem_mib, self.config.vcpus, self.virtio.len())
            .map_err(VmmError::Setup)?;
        let cfg = BootConfig {
            // Not loaded: the kernel is in the snapshot's memory.
            kernel: crate::boot::Image::Bytes {
                label: "snapshot".into(),
                data: Arc::from(Vec::new()),
            },
            initrd: None,
            cmdline: String::new(),
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            cpuid: self.cpuid,
        };
        self.watchdog.reset();
        self.watchdog.resume();
        let env = self.boot_env(None);
        let m = Machine::boot(&self.kvm, &cfg, env, Some(&mut r))?;
        let snap = &r.snapshot;
        for (i, (slot, state)) in self.virtio.iter().zip(&snap.devices.virtio).enumerate() {
            lock(&slot.transport)
                .check_restore(state)
                .map_err(|e| VmmError::Setup(format!("cannot restore virtio device {i}: {e}")))?;
        }
        devices::legacy::ib700::Ib700Watchdog::new()
            .restore_state(&snap.devices.watchdog, Duration::ZERO)
            .map_err(|e| VmmError::Setup(format!("cannot restore the watchdog: {e}")))?;
        if let Some(conn) = r.incoming.as_mut() {
            // A migration: the source lets go of the guest (and its disks)
            // only now; before its go-ahead nothing may run here, not even
            // a device serving what the guest queued (the source would
            // serve it again if it went on).
            crate::migration::target::handshake(conn).map_err(|e| {
                VmmError::Setup(format!("the migration's source did not let go: {e}"))
            })?;
            if let Err(e) = self.acquire_images() {
                crate::migration::wire::send_error(conn, &e.message);
                return Err(VmmError::Setup(e.message));
            }
        }
        // The vCPUs wait, parked, while the devices come back.
        if let Err(e) = self.start_restored_devices(snap) {
            if let Some(conn) = r.incoming.as_mut() {
                // The source may take the guest back: nothing of it runs
                // here, and the disks are let go first.
                for slot in &self.virtio {
                    lock(&slot.transport).reset();
                }
                self.release_images_quietly();
                crate::migration::wire::send_error(conn, &e);
            }
            return Err(VmmError::Setup(e));
        }
        self.boot_count = snap.boot_count;
        self.current_kernel = snap.kernel.clone();
        self.last_reset = snap.last_reset.as_deref().and_then(|c| c.parse().ok());
        self.boot_started = Instant::now()
            .checked_sub(Duration::from_millis(snap.uptime_ms))
            .unwrap_or_else(Instant::now);
        if let Some(conn) = r.incoming.as_mut() {
            // Best effort: a source that does not hear it stays stopped.
            if let Err(e) = crate::migration::target::running(conn) {
                tracing::warn!("migration: cannot tell the source the guest runs here: {e}");
            }
        }
        (self.hooks.on_boot)(
            snap.boot_count,
            &if r.incoming.is_some() {
                format!("restored from {}", r.dir.display())
            } else {
                format!("restored from snapshot {}", r.dir.display())
            },
        );
        // A VM saved paused stays paused (`power_on` pauses it for good).
        self.restored_paused = snap.paused;
        if !snap.paused {
            m.resume();
        }
        if r.incoming.is_some() {
            // Where the guest is now, for the network's switches.
            for n in &self.nets {
                if let Err(e) = lock(&n.device).announce() {
                    tracing::warn!("cannot announce the guest on {}: {e}", n.tap);
                }
            }
        }
        self.machine = Some(m);
        (self.hooks.publish)(Event::Restored {
            boot_count: self.boot_count,
        });
        Ok(())
    }

    /// Starts the restored virtio devices and the watchdog.
    fn start_restored_devices(&self, snap: &crate::snapshot::VmSnapshot) -> Result<(), String> {
        for (i, (slot, state)) in self.virtio.iter().zip(&snap.devices.virtio).enumerate() {
            lock(&slot.transport)
                .restore_state(state)
                .map_err(|e| format!("cannot restore virtio device {i}: {e}"))?;
        }
        lock(&self.watchdog.device)
            .restore_state(&snap.devices.watchdog)
            .map_err(|e| format!("cannot restore the watchdog: {e}"))
    }

    /// KVM's MSR list, read once.
    pub(super) fn msr_index(&mut self) -> Result<Arc<Vec<u32>>, ControlError> {
        if let Some(i) = &self.msr_index {
            return Ok(i.clone());
        }
        let list = self.kvm.get_msr_index_list().map_err(|e| {
            ControlError::new(ErrorCode::HostError, format!("KVM_GET_MSR_INDEX_LIST: {e}"))
        })?;
        let mut v = list.as_slice().to_vec();
        v.sort_unstable();
        v.dedup();
        let v = Arc::new(v);
        self.msr_index = Some(v.clone());
        Ok(v)
    }

    /// What a snapshot says of the VM beyond its machine.
    pub(super) fn snapshot_meta(&self) -> crate::snapshot::Meta {
        crate::snapshot::Meta {
            name: self.config.name.clone(),
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            boot_count: self.boot_count,
            kernel: self.current_kernel.clone(),
            last_reset: self.last_reset.map(|c| c.to_string()),
            uptime: self.uptime(),
            paused: self.state == VmState::Paused,
            watchdog: lock(&self.watchdog.device).save_state(),
        }
    }

    /// A snapshot's first half, on the event loop: the guest paused, its
    /// machine captured and its devices quiesced, the lifecycle holding it.
    /// The files are written from the job (no lock needed) and
    /// [`Vm::snapshot_end`] follows, whatever happened. A failure here leaves
    /// the VM as it was.
    pub fn snapshot_begin(
        &mut self,
        path: &std::path::Path,
        stop: bool,
    ) -> Result<SnapshotJob, ControlError> {
        let state = self.state;
        if self.migrating.is_some() {
            return Err(ControlError::invalid_state(
                "a migration of this VM is running",
            ));
        }
        self.refuse_while_snapshotting()?;
        let msr_index = self.msr_index()?;
        let Some(m) = self
            .machine
            .as_ref()
            .filter(|_| matches!(state, VmState::Running | VmState::Paused))
        else {
            return Err(ControlError::invalid_state(format!(
                "the VM is {state}: there is nothing to snapshot"
            )));
        };
        let started = Instant::now();
        let running = state == VmState::Running;
        // Running or paused and not held (looked at above): it can be held,
        // and every way out before the job is made lets go of it again.
        self.lifecycle
            .hold()
            .map_err(|e| ControlError::invalid_state(e.to_string()))?;
        let undo = |vm: &mut Vm| {
            vm.lifecycle.release();
            if let (true, Some(m)) = (running, &vm.machine) {
                vm.watchdog.resume();
                m.resume();
            }
        };
        if running {
            m.pause();
            self.watchdog.pause();
        }
        // A reset or power-off the guest asked for just before the pause,
        // or a vCPU that stopped for good, is not in any saved register:
        // handled first, then asked again.
        if self.events.pending() {
            undo(self);
            return Err(ControlError::new(
                ErrorCode::InvalidState,
                "the guest is resetting or powering off right now: try again",
            ));
        }
        let meta = self.snapshot_meta();
        let captured = match crate::snapshot::capture(m, &self.virtio, &msr_index, &meta) {
            Ok(c) => c,
            Err(e) => {
                undo(self);
                return Err(ControlError::new(
                    ErrorCode::HostError,
                    format!("snapshot failed: {e}"),
                ));
            }
        };
        Ok(SnapshotJob {
            mem: m.mem.clone(),
            captured,
            path: path.to_path_buf(),
            stop,
            running,
            started,
        })
    }

    /// A snapshot's end, under the VM's lock, with what writing its files
    /// gave: the devices start again and the guest runs on (or, written with
    /// `stop`, the VM is powered off), and the lifecycle serves requests
    /// again.
    pub fn snapshot_end(
        &mut self,
        job: SnapshotJob,
        written: Result<crate::snapshot::Taken, crate::snapshot::SnapshotError>,
    ) -> Result<protocol::SnapshotInfo, ControlError> {
        self.lifecycle.release();
        let ok = written.is_ok();
        // Held meanwhile: the machine is the one captured, unless the VMM
        // is being torn down (then nothing is left to start again).
        if let Some(m) = &self.machine {
            crate::snapshot::finish(&self.virtio, &job.captured.virtio, ok, job.stop);
            if ok && job.stop {
                self.poweroff();
            } else if job.running {
                self.watchdog.resume();
                m.resume();
            }
        }
        if self.events.pending() {
            // What the guest queued while held (see `handle_events`).
            let _ = self.events.wake_fd().write(1);
        }
        let paused_us = crate::snapshot::micros(job.started);
        let taken = written.map_err(|e| {
            ControlError::new(ErrorCode::HostError, format!("snapshot failed: {e}"))
        })?;
        Ok(protocol::SnapshotInfo {
            dir: job.path.display().to_string(),
            memory_bytes: taken.memory_bytes,
            state_bytes: taken.state_bytes,
            paused_us,
            stopped: job.stop,
        })
    }

    /// A snapshot's files are being written (the machine is held).
    pub(crate) fn snapshotting(&self) -> bool {
        self.lifecycle.is_held()
    }

    /// For requests other than power ones, which the lifecycle refuses
    /// itself: refused, with the lifecycle's words, while a snapshot holds
    /// the machine (its devices are quiesced as captured until it ends).
    pub(crate) fn refuse_while_snapshotting(&self) -> Result<(), ControlError> {
        if self.snapshotting() {
            return Err(ControlError::invalid_state(
                crate::lifecycle::Refusal::Held.to_string(),
            ));
        }
        Ok(())
    }
}

/// A snapshot between [`Vm::snapshot_begin`] and [`Vm::snapshot_end`]:
/// what its files are written from.
pub struct SnapshotJob {
    /// The paused guest's memory (the machine's, shared, not copied).
    mem: devices::virtio::GuestMemoryMmap,
    captured: crate::snapshot::Captured,
    path: std::path::PathBuf,
    stop: bool,
    running: bool,
    started: Instant,
}

impl SnapshotJob {
    /// Writes the snapshot's directory (the long part: no lock taken).
    pub fn write(&mut self) -> Result<crate::snapshot::Taken, crate::snapshot::SnapshotError> {
        crate::snapshot::write_dir(&self.mem, &mut self.captured.snapshot, &self.path)
    }
}
