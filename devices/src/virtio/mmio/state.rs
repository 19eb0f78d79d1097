//! Saving and restoring a virtio-mmio transport and its device (snapshots,
//! migration).
//!
//! [`MmioTransport::save_state`] records the register file and, when the
//! device runs, quiesces it ([`VirtioDevice::quiesce`]) to take its queue
//! positions. [`MmioTransport::restore_state`] validates a state (it comes
//! from a file: never trusted, never a panic) and puts the transport back
//! into it, restarting the device where it stopped.
//!
//! The same pair serves a snapshot that does not stop the VM:
//! `let s = t.save_state()?; /* copy guest memory */ t.restore_state(&s)?;`
//! and a restore in a new process, on a transport built from the same
//! configuration over the copied memory.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{status, MmioTransport};
use crate::bus::lock;
use crate::state::StateError;
use crate::virtio::{INT_CONFIG_CHANGE, INT_USED_RING, VIRTIO_F_VERSION_1};

/// The device name in errors.
const NAME: &str = "virtio-mmio";

/// A virtqueue's saved state: `virtio_queue::QueueState`, which is not
/// serde, field for field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// The maximum size the device offered (informative: a restore checks
    /// `size` against the maximum of the device it restores onto).
    pub max_size: u16,
    /// The next avail-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated (derived again from the driver's
    /// features at activation).
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest physical addresses of the descriptor table, the avail
    /// (driver) ring and the used (device) ring.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&SavedQueue> for QueueState {
    fn from(q: &SavedQueue) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport's saved state, with its device's queue positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// DeviceID (1 = net, 2 = block): a restore refuses another device.
    pub device_id: u32,
    /// The features the device offered (informative: a restore checks the
    /// driver's features against what the device offers there).
    pub device_features: u64,
    pub device_features_sel: u32,
    /// The features the driver wrote (accepted once FEATURES_OK is set).
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    /// Status (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ...).
    pub status: u32,
    /// INTERRUPT_STATUS bits still pending (not yet acknowledged).
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Every queue, in index order: the registers the driver wrote and,
    /// when the device was running (DRIVER_OK), where it stopped.
    pub queues: Vec<SavedQueue>,
    /// A multi-queue virtio-net's enabled queue pairs (what its driver
    /// asked on the control queue); absent for other devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<u16>,
}

impl MmioTransport {
    /// The transport's state, with the device's queue positions when it
    /// runs. A running device is quiesced first ([`VirtioDevice::quiesce`]),
    /// so after this returns `Ok` it is stopped: nothing in flight, its
    /// last completions in guest memory. Copy guest memory after this, and
    /// keep the vCPUs paused until [`Self::restore_state`] (or a reset)
    /// restarts it. Saving again before that returns the same state. On
    /// error the device keeps running.
    ///
    /// [`VirtioDevice::quiesce`]: crate::virtio::VirtioDevice::quiesce
    pub fn save_state(&mut self) -> Result<TransportState, StateError> {
        if self.status & status::DRIVER_OK != 0 {
            // A device in DRIVER_OK that is not running was quiesced by an
            // earlier save (no restore since): its positions are in the
            // transport's queues already, and this save returns the same.
            let running = {
                let mut dev = lock(&self.device);
                if dev.is_activated() {
                    Some(dev.quiesce()?)
                } else {
                    None
                }
            };
            if let Some(running) = running {
                // Our devices always hand back one state per queue; a device
                // that does not is a bug, and its positions would be lost.
                if running.len() != self.queues.len() {
                    return Err(StateError::new(
                        NAME,
                        format!(
                            "device {} is in DRIVER_OK but returned {} queue states for {} queues",
                            self.device_id,
                            running.len(),
                            self.queues.len()
                        ),
                    ));
                }
                // The configuration is the transport's (the device got
                // copies of it); the positions are the device's.
                for (q, r) in self.queues.iter_mut().zip(&running) {
                    q.set_next_avail(r.next_avail);
                    q.set_next_used(r.next_used);
                    q.set_event_idx(r.event_idx_enabled);
                }
            }
        }
        let queues = self.queues.iter().map(|q| q.state().into()).collect();
        let queue_pairs = lock(&self.device).saved_queue_pairs();
        // Read after quiescing: the completions it wrote may have raised
        // an interrupt.
        Ok(TransportState {
            device_id: self.device_id,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.pending(),
            config_generation: self.interrupt.config_generation(),
            queues,
            queue_pairs,
        })
    }

    /// Puts the transport into `s` (from [`Self::save_state`], here or in
    /// another process whose devices had the same configuration). With
    /// DRIVER_OK in `s` the device is activated with the saved queues over
    /// the guest memory now in the transport's `GuestMemoryHandle` (copy
    /// the memory in first), every queue eventfd is kicked (requests the
    /// guest queued before the snapshot get served) and a pending
    /// interrupt is signalled again.
    ///
    /// Everything in `s` is checked before anything changes, so a refused
    /// state leaves the transport as it was; a device that then fails to
    /// start is left stopped with DEVICE_NEEDS_RESET set and a
    /// config-change interrupt, as after a failed DRIVER_OK. A device
    /// running now is reset first.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), StateError> {
        let queues = self.check_state(s)?;
        let running = lock(&self.device).is_activated();
        if running {
            self.reset();
        }
        self.device_features_sel = s.device_features_sel;
        self.driver_features = s.driver_features;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.queues = queues;
        // Before the device starts: a request the kicks below restart may
        // complete at once, and its signal must not be overwritten by the
        // saved bits (with nothing set, the guest's handler would skip the
        // rings and, with EVENT_IDX, never hear of that completion).
        self.interrupt
            .restore(s.interrupt_status, s.config_generation);
        if s.status & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                // As a failed DRIVER_OK: the driver is told to reset the
                // device (and gets nothing from it until it does), rather
                // than finding a device gone silent.
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
                return Err(StateError::new(
                    NAME,
                    format!("device {} did not start: {e}", self.device_id),
                ));
            }
            if let Some(n) = s.queue_pairs {
                lock(&self.device).restore_queue_pairs(n);
            }
            for evt in &self.queue_evts {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: cannot kick a restored queue: {e}");
                }
            }
        }
        Ok(())
    }

    /// Whether `s` would be taken by [`Self::restore_state`], without
    /// changing anything (a migration's target checks before it lets its
    /// source go; activation itself can still fail).
    pub fn check_restore(&self, s: &TransportState) -> Result<(), StateError> {
        self.check_state(s).map(|_| ())
    }

    /// Validates `s` against this transport and its device; returns the
    /// queues to install.
    fn check_state(&self, s: &TransportState) -> Result<Vec<Queue>, StateError> {
        use status::*;
        let err = |why: String| Err(StateError::new(NAME, why));
        if s.device_id != self.device_id {
            return err(format!(
                "the saved state is of a device with id {}, this one has id {}",
                s.device_id, self.device_id
            ));
        }
        if !status_reachable(s.status) {
            return err(format!(
                "status {:#x} is not a valid device status",
                s.status
            ));
        }
        if s.status & FEATURES_OK != 0 {
            // Before FEATURES_OK the driver's features are not accepted
            // yet: the FEATURES_OK write checks them, as on any host.
            let missing = s.driver_features & !self.device_features;
            if missing != 0 {
                return err(format!(
                    "the guest's driver uses features {missing:#x} that this device does not offer \
                     here (it offers {:#x}, the saved device offered {:#x}): restore on a host \
                     and with a configuration that offer them",
                    self.device_features, s.device_features
                ));
            }
            if s.driver_features & VIRTIO_F_VERSION_1 == 0 {
                return err("FEATURES_OK without VIRTIO_F_VERSION_1".into());
            }
        }
        if s.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return err(format!(
                "interrupt status {:#x} has unknown bits",
                s.interrupt_status
            ));
        }
        if s.queues.len() != self.queues.len() {
            return err(format!(
                "{} queues saved, this device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let running = s.status & DRIVER_OK != 0;
        let mem = if running {
            match self.mem.get() {
                Some(m) => Some(m),
                None => return err("no guest memory to restore a running device into".into()),
            }
        } else {
            None
        };
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (saved, now)) in s.queues.iter().zip(&self.queues).enumerate() {
            let max = now.max_size();
            if saved.size > max {
                return err(format!(
                    "queue {i}: size {} is above this device's maximum {max}",
                    saved.size
                ));
            }
            // A queue that never ran has not moved: positions elsewhere
            // would be taken up by the driver's later DRIVER_OK.
            if !running && (saved.next_avail != 0 || saved.next_used != 0) {
                return err(format!(
                    "queue {i}: positions {}/{} on a device that is not running",
                    saved.next_avail, saved.next_used
                ));
            }
            let mut state = QueueState::from(saved);
            state.max_size = max;
            // Checks the size (a power of two, not zero) and the rings'
            // alignment.
            let q = Queue::try_from(state)
                .map_err(|e| StateError::new(NAME, format!("queue {i}: {e}")))?;
            if let Some(mem) = &mem {
                if q.ready() && !q.is_valid(&**mem) {
                    return err(format!("queue {i}: its rings are not inside guest memory"));
                }
            }
            queues.push(q);
        }
        Ok(queues)
    }
}

/// Whether the transport can be in `s`: the steps ACKNOWLEDGE → DRIVER →
/// FEATURES_OK → DRIVER_OK taken in order, FAILED at any point, and
/// DEVICE_NEEDS_RESET only where activation failed (at FEATURES_OK).
fn status_reachable(s: u32) -> bool {
    use status::*;
    let steps = s & !(FAILED | DEVICE_NEEDS_RESET);
    let in_order = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ]
    .contains(&steps);
    let needs_reset_ok = s & DEVICE_NEEDS_RESET == 0 || steps == ACKNOWLEDGE | DRIVER | FEATURES_OK;
    in_order && needs_reset_ok
}

#[cfg(test)]
mod tests;
