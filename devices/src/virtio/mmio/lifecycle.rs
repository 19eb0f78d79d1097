//! The device status state machine of [`MmioTransport`]: feature
//! negotiation, the protocol order of status bits, and activation of the
//! device at DRIVER_OK.

use virtio_queue::{Queue, QueueT};

use super::{status, MmioTransport};
use crate::bus::lock;
use crate::virtio::{ActivateError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

impl MmioTransport {
    fn features_acceptable(&self) -> bool {
        self.driver_features & VIRTIO_F_VERSION_1 != 0
            && self.driver_features & !self.device_features == 0
    }

    pub(super) fn set_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        if v & FAILED != 0 {
            crate::limited!(
                info,
                "virtio-mmio: driver set FAILED (device id {})",
                self.device_id
            );
            self.status |= FAILED;
            return;
        }
        if v & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        // Apply the new bits one step at a time, in protocol order.
        for bit in [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK] {
            if v & bit == 0 || self.status & bit != 0 {
                continue;
            }
            let ok = match bit {
                ACKNOWLEDGE => self.status == 0,
                DRIVER => self.status == ACKNOWLEDGE,
                FEATURES_OK => {
                    let ok = self.status == ACKNOWLEDGE | DRIVER && self.features_acceptable();
                    if !ok {
                        crate::limited!(
                            warn,
                            "virtio-mmio: refusing FEATURES_OK for features {:#x} (device offers {:#x}, VERSION_1 is required)",
                            self.driver_features,
                            self.device_features
                        );
                    }
                    ok
                }
                _ => {
                    if self.status != ACKNOWLEDGE | DRIVER | FEATURES_OK {
                        false
                    } else if let Err(e) = self.activate() {
                        crate::limited!(
                            warn,
                            "virtio-mmio: device {} failed to start: {e}",
                            self.device_id
                        );
                        self.status |= DEVICE_NEEDS_RESET;
                        self.interrupt.signal_config_change();
                        return;
                    } else {
                        true
                    }
                }
            };
            if !ok {
                tracing::debug!("virtio-mmio: status {v:#x} from {:#x} ignored", self.status);
                return;
            }
            self.status |= bit;
        }
    }

    pub(super) fn activate(&mut self) -> Result<(), ActivateError> {
        let mem = self.mem.get().ok_or(ActivateError::NoMemory)?;
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            // A driver may leave queues unused (a multi-queue disk with
            // fewer CPUs than queues): those stay not ready, and each
            // device decides which it needs.
            if q.ready() && !q.is_valid(&*mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            let mut copy =
                Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(i))?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
        }
        let rings = mem.clone();
        lock(&self.device).activate(mem, queues, self.driver_features, self.interrupt.clone())?;
        self.rings.start(rings, event_idx, &self.queues);
        Ok(())
    }
}
