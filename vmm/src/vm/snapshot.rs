//! The VM's side of snapshots (`snapshot::` has the files and KVM's
//! state): taking one of the running VM, and a `--restore` process's
//! first "boot", which continues the saved machine instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::ib700::{IB700_BASE, IB700_LEN};
use protocol::{ControlError, ErrorCode, Event, VmState};

use super::{Vm, VmmError};
use crate::machine::{BootConfig, BootEnv, Machine, PioDevice};

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
        let handle = self.mem_handle.clone();
        let env = BootEnv {
            events: &self.events,
            serial_out: (self.hooks.serial_out)(),
            serial_input_drained: self
                .serial_input_drained
                .as_ref()
                .and_then(|e| e.try_clone().ok()),
            extra_pio: vec![PioDevice {
                base: IB700_BASE,
                len: IB700_LEN,
                device: self.watchdog.device.clone(),
                irqs: Vec::new(),
            }],
            virtio: self.virtio.clone(),
            set_memory: Some(Box::new(move |mem| handle.set(Arc::new(mem.clone())))),
            on_first_run: None,
        };
        let m = Machine::boot(&self.kvm, &cfg, env, Some(&mut r))?;
        let snap = &r.snapshot;
        // The vCPUs wait, parked, while the devices come back.
        for (i, (slot, state)) in self.virtio.iter().zip(&snap.devices.virtio).enumerate() {
            lock(&slot.transport)
                .restore_state(state)
                .map_err(|e| VmmError::Setup(format!("cannot restore virtio device {i}: {e}")))?;
        }
        lock(&self.watchdog.device)
            .restore_state(&snap.devices.watchdog)
            .map_err(|e| VmmError::Setup(format!("cannot restore the watchdog: {e}")))?;
        self.boot_count = snap.boot_count;
        self.current_kernel = snap.kernel.clone();
        self.last_reset = snap.last_reset.as_deref().and_then(|c| c.parse().ok());
        self.boot_started = Instant::now()
            .checked_sub(Duration::from_millis(snap.uptime_ms))
            .unwrap_or_else(Instant::now);
        (self.hooks.on_boot)(
            snap.boot_count,
            &format!("restored from snapshot {}", r.dir.display()),
        );
        m.resume();
        self.machine = Some(m);
        (self.hooks.publish)(Event::Restored {
            boot_count: self.boot_count,
        });
        Ok(())
    }

    /// Writes the running (or paused) VM to a new directory `path`; the
    /// guest is paused meanwhile and then runs on (or, with `stop`, is
    /// powered off). A failure leaves the VM as it was.
    pub fn snapshot(
        &mut self,
        path: &std::path::Path,
        stop: bool,
    ) -> Result<protocol::SnapshotInfo, ControlError> {
        let state = self.state;
        let Some(m) = self
            .machine
            .as_ref()
            .filter(|_| matches!(state, VmState::Running | VmState::Paused))
        else {
            return Err(ControlError::invalid_state(format!(
                "the VM is {state}: there is nothing to snapshot"
            )));
        };
        let msr_index = match &self.msr_index {
            Some(i) => i.clone(),
            None => {
                let list = self.kvm.get_msr_index_list().map_err(|e| {
                    ControlError::new(ErrorCode::HostError, format!("KVM_GET_MSR_INDEX_LIST: {e}"))
                })?;
                let mut v = list.as_slice().to_vec();
                v.sort_unstable();
                v.dedup();
                let v = Arc::new(v);
                self.msr_index = Some(v.clone());
                v
            }
        };
        let started = Instant::now();
        let running = state == VmState::Running;
        if running {
            m.pause();
            self.watchdog.pause();
        }
        let meta = crate::snapshot::Meta {
            name: self.config.name.clone(),
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            boot_count: self.boot_count,
            kernel: self.current_kernel.clone(),
            last_reset: self.last_reset.map(|c| c.to_string()),
            uptime: self.uptime(),
            watchdog: lock(&self.watchdog.device).save_state(),
        };
        let taken = crate::snapshot::take(m, &self.virtio, &msr_index, meta, path);
        let paused_us = crate::snapshot::micros(started);
        match &taken {
            Ok(_) if stop => self.poweroff(),
            _ if running => {
                self.watchdog.resume();
                m.resume();
            }
            _ => {}
        }
        let taken = taken.map_err(|e| {
            ControlError::new(ErrorCode::HostError, format!("snapshot failed: {e}"))
        })?;
        Ok(protocol::SnapshotInfo {
            dir: path.display().to_string(),
            memory_bytes: taken.memory_bytes,
            state_bytes: taken.state_bytes,
            paused_us,
            stopped: stop,
        })
    }
}
