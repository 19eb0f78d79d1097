//! The VM's side of a live migration's source (`migration::source` drives
//! it from its own thread, taking the VM's lock for each step): dirty-page
//! logging on and off, the pages written since the last look, the final
//! stop, and undoing all of it when the migration fails.

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::lock;
use protocol::{ControlError, ErrorCode, VmState};

use super::Vm;
use crate::migration::flow::Cancel;
use crate::snapshot::Captured;

/// What a migration copies from, fixed at its start.
pub struct Started {
    /// The guest's memory (the running machine's; shared, not copied).
    pub mem: devices::virtio::GuestMemoryMmap,
    /// The boot being migrated: a reset meanwhile ends the migration.
    pub boot_count: u64,
    /// `"disks":"copy"`: the disks copied (their index among the VM's
    /// disks), whose writes are logged from now on.
    pub disks: Vec<(u32, devices::virtio::CopySource)>,
}

/// The guest stopped for the last pass.
pub struct Stopped {
    pub captured: Captured,
    pub was_running: bool,
    pub at: Instant,
}

fn host_error(what: String) -> ControlError {
    ControlError::new(ErrorCode::HostError, what)
}

impl Vm {
    /// Starts logging the guest's writes (to memory, and with `copy` to
    /// its writable disks) and moves its network to the userspace
    /// datapath (vhost-net's writes would go unlogged).
    pub(crate) fn migration_begin(&mut self, copy: bool) -> Result<Started, ControlError> {
        let state = self.state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ControlError::invalid_state(format!(
                "the VM is {state}: there is nothing to migrate"
            )));
        }
        let Some(m) = &self.machine else {
            return Err(ControlError::invalid_state("the VM is not running"));
        };
        let disks = if copy {
            self.disks_to_copy()?
        } else {
            Vec::new()
        };
        m.set_dirty_log(true)
            .map_err(|e| host_error(format!("cannot log the guest's writes: {e}")))?;
        devices::virtio::clear_dirty_pages(&m.mem);
        let mem = m.mem.clone();
        let vhost = match self.nets_to_userspace() {
            Ok(v) => v,
            Err(e) => {
                if let Some(m) = &self.machine {
                    let _ = m.set_dirty_log(false);
                }
                return Err(e);
            }
        };
        self.migrating = Some(vhost);
        // Logged from before the first pass reads them.
        for (_, d) in &disks {
            if let Err(e) = d.log().start() {
                self.migration_end();
                return Err(host_error(format!("cannot copy a disk: {e}")));
            }
        }
        Ok(Started {
            mem,
            boot_count: self.boot_count,
            disks,
        })
    }

    /// The writable disks, which a migration with `"disks":"copy"` sends
    /// (a read-only one cannot change: the target's own copy serves).
    pub(crate) fn disks_to_copy(
        &self,
    ) -> Result<Vec<(u32, devices::virtio::CopySource)>, ControlError> {
        let mut out = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            if d.read_only {
                continue;
            }
            let i = u32::try_from(i).map_err(|_| host_error("too many disks".into()))?;
            out.push((i, d.copy.clone()));
        }
        Ok(out)
    }

    /// Quiesces each network device, takes its vhost-net instance away and
    /// starts it again on the userspace datapath. Returns the instances.
    fn nets_to_userspace(&self) -> Result<Vec<Vec<File>>, ControlError> {
        let mut taken = Vec::new();
        let first = self.virtio.len() - self.nets.len();
        for (i, n) in self.nets.iter().enumerate() {
            let Some(slot) = self.virtio.get(first + i) else {
                taken.push(Vec::new());
                continue;
            };
            let mut t = lock(&slot.transport);
            let vhost = lock(&n.device).take_vhost();
            if !vhost.is_empty() {
                // Restarted without it; on any failure it keeps (or gets
                // back) vhost-net, and the migration does not begin.
                let saved = t.save_state();
                let moved = match &saved {
                    Ok(s) => t.restore_state(s),
                    Err(e) => Err(devices::state::StateError::new("virtio-net", e.to_string())),
                };
                if let Err(e) = moved {
                    lock(&n.device).put_vhost(vhost);
                    // Back as it was, from the state saved before the move.
                    if let Ok(s) = &saved {
                        if let Err(e) = t.restore_state(s) {
                            tracing::error!("migration: {} did not restart: {e}", n.tap);
                        }
                    }
                    drop(t);
                    let mut back = taken;
                    back.resize_with(self.nets.len(), Vec::new);
                    self.nets_back(back);
                    return Err(host_error(format!(
                        "cannot move {} off vhost-net for the migration: {e}",
                        n.tap
                    )));
                }
            }
            taken.push(vhost);
        }
        Ok(taken)
    }

    /// Gives the network devices their vhost-net instances back (they use
    /// them from their next activation: restarted here).
    fn nets_back(&self, vhost: Vec<Vec<File>>) {
        let first = self.virtio.len() - self.nets.len();
        for (i, (n, dev)) in self.nets.iter().zip(vhost).enumerate() {
            if dev.is_empty() {
                continue;
            }
            lock(&n.device).put_vhost(dev);
            if let Some(slot) = self.virtio.get(first + i) {
                let mut t = lock(&slot.transport);
                if let Ok(s) = t.save_state() {
                    if let Err(e) = t.restore_state(&s) {
                        tracing::warn!("migration: {} did not restart: {e}", n.tap);
                    }
                }
            }
        }
    }

    /// The 4 KiB pages written since the last call, per memory region: by
    /// the vCPUs (KVM's log) or by our devices (the memory's bitmap).
    pub(crate) fn migration_dirty(&self, boot_count: u64) -> Result<Vec<Vec<u64>>, ControlError> {
        let m = self.same_boot(boot_count)?;
        let mut kvm = m
            .take_kvm_dirty_log()
            .map_err(|e| host_error(format!("cannot read the guest's writes: {e}")))?;
        let ours = devices::virtio::take_dirty_pages(&m.mem);
        crate::migration::bits::or_into(&mut kvm, &ours);
        Ok(kvm)
    }

    fn same_boot(&self, boot_count: u64) -> Result<&crate::machine::Machine, ControlError> {
        match &self.machine {
            Some(m) if self.boot_count == boot_count => Ok(m),
            _ => Err(ControlError::invalid_state(
                "the guest was reset or stopped during the migration",
            )),
        }
    }

    /// Takes `pct` percent of the vCPUs' time from now on (auto-converge;
    /// 0: none). A throttle that cannot start is a warning: the migration
    /// goes on unthrottled. Returns what holds now.
    pub(crate) fn migration_throttle(
        &mut self,
        boot_count: u64,
        pct: u8,
    ) -> Result<u8, ControlError> {
        let m = self.same_boot(boot_count)?;
        if let Err(e) = m.throttle.set(pct) {
            tracing::warn!("migration: cannot throttle the vCPUs ({pct} %): {e}");
        }
        Ok(m.throttle.pct())
    }

    /// Stops the guest for the last pass: vCPUs parked, devices quiesced,
    /// the state read. On failure the guest runs on.
    pub(crate) fn migration_stop(&mut self, boot_count: u64) -> Result<Stopped, ControlError> {
        let msr_index = self.msr_index()?;
        let running = self.state == VmState::Running;
        let m = self.same_boot(boot_count)?;
        let at = Instant::now();
        // The guest stops: nothing left to slow down (the kicker ends),
        // and should it run on here after all, it runs at full speed.
        let _ = m.throttle.set(0);
        if running {
            m.pause();
            self.watchdog.pause();
        }
        let resume = |vm: &Vm| {
            if running {
                vm.watchdog.resume();
                if let Some(m) = &vm.machine {
                    m.resume();
                }
            }
        };
        if self.events.pending() {
            resume(self);
            return Err(ControlError::invalid_state(
                "the guest is resetting or powering off right now",
            ));
        }
        let meta = self.snapshot_meta();
        let Some(m) = &self.machine else {
            return Err(ControlError::invalid_state("the VM is not running"));
        };
        match crate::snapshot::capture(m, &self.virtio, &msr_index, &meta) {
            // Finishing the vCPUs' last I/O may have been a write to a
            // reset or power-off register: not in the state, so not now.
            Ok(captured) if self.events.pending() => {
                crate::snapshot::restart_devices(&self.virtio, &captured.virtio);
                resume(self);
                Err(ControlError::invalid_state(
                    "the guest is resetting or powering off right now",
                ))
            }
            Ok(captured) => Ok(Stopped {
                captured,
                was_running: running,
                at,
            }),
            Err(e) => {
                resume(self);
                Err(host_error(format!("cannot stop the guest: {e}")))
            }
        }
    }

    /// The migration failed: the guest goes on here as before (devices
    /// restarted, vCPUs resumed, logging off, vhost-net back).
    pub(crate) fn migration_abort(&mut self, stopped: Option<Stopped>) {
        if let Some(s) = stopped {
            crate::snapshot::restart_devices(&self.virtio, &s.captured.virtio);
            if s.was_running {
                self.watchdog.resume();
                if let Some(m) = &self.machine {
                    m.resume();
                }
            }
        }
        self.migration_end();
    }

    fn migration_end(&mut self) {
        for d in &self.disks {
            d.copy.log().stop();
        }
        if let Some(m) = &self.machine {
            // The guest gets all of its vCPUs' time back, however the
            // migration ended (this is every way out but a success).
            let _ = m.throttle.set(0);
            if let Err(e) = m.set_dirty_log(false) {
                tracing::warn!("migration: cannot stop logging the guest's writes: {e}");
            }
        }
        if let Some(vhost) = self.migrating.take() {
            self.nets_back(vhost);
        }
    }

    /// Lets go of the disks' images (the target takes them); on failure
    /// takes back what it let go. Call with the guest stopped.
    pub(crate) fn release_images(&self) -> Result<(), ControlError> {
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(e) = d.image.release() {
                for back in &self.disks[..i] {
                    let _ = back.image.acquire();
                }
                return Err(host_error(format!(
                    "cannot let go of {}: {e}",
                    d.path.display()
                )));
            }
        }
        Ok(())
    }

    /// Takes the disks' images back after [`Vm::release_images`] (or, on a
    /// migration's target, for the first time).
    /// All or none: a lock that cannot be taken lets go of those taken.
    pub(crate) fn acquire_images(&self) -> Result<(), ControlError> {
        for (i, d) in self.disks.iter().enumerate() {
            if let Err(e) = d.image.acquire() {
                for back in &self.disks[..i] {
                    let _ = back.image.release();
                }
                return Err(host_error(format!("cannot lock {}: {e}", d.path.display())));
            }
        }
        Ok(())
    }

    /// Lets go of every image lock (a target giving the guest back).
    pub(crate) fn release_images_quietly(&self) {
        for d in &self.disks {
            let _ = d.image.release();
        }
    }

    /// The guest runs on the target now: this one is powered off for good
    /// (it will not boot again in this process).
    pub(crate) fn migration_done(&mut self) {
        self.migrating = None;
        self.migrated_away = true;
        self.poweroff();
    }

    /// The target was told to run the guest and did not confirm: powered
    /// off, never to boot again here, the disks' locks let go.
    pub(crate) fn migration_unknown(&mut self) {
        self.migrating = None;
        self.migrated_away = true;
        self.poweroff();
    }

    /// Claims the VM for a migration about to start (a second `migrate`
    /// is refused from now on); `migration_begin` or `migration_abort`
    /// follows. Returns what `migrate-cancel` reaches of this one.
    pub(crate) fn reserve_migration(&mut self) -> Result<Arc<Cancel>, ControlError> {
        if self.migrated_away {
            return Err(ControlError::invalid_state(
                "this VM has migrated away: this VMM will not run it again",
            ));
        }
        if self.migrating.is_some() {
            return Err(ControlError::invalid_state(
                "a migration of this VM is running already",
            ));
        }
        self.refuse_while_snapshotting()?;
        self.migrating = Some(Vec::new());
        self.migration_cancel = Arc::default();
        Ok(self.migration_cancel.clone())
    }

    /// A migration of this VM is running (reserved, copying, or in its
    /// final phase).
    pub(crate) fn migrating(&self) -> bool {
        self.migrating.is_some()
    }

    /// The share of the vCPUs' time a migration's throttle takes now.
    pub(crate) fn throttle_pct(&self) -> u8 {
        self.machine.as_ref().map_or(0, |m| m.throttle.pct())
    }

    /// `migrate-cancel`: calls the running migration off. Its thread holds
    /// the VM's lock from the guest's stop for the last pass to the end,
    /// so whoever gets here finds the guest still running here (the copy
    /// stops and the guest runs on) or the migration over.
    pub(crate) fn cancel_migration(&self) -> Result<(), ControlError> {
        if self.migrated_away {
            return Err(ControlError::invalid_state(
                "too late: this VM's migration is over and its guest does not run here (see the target)",
            ));
        }
        if self.migrating.is_none() {
            return Err(ControlError::invalid_state(
                "no migration of this VM is running",
            ));
        }
        self.migration_cancel.cancel();
        Ok(())
    }
}
