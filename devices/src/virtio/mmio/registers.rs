//! Register decoding for [`MmioTransport`]: reads and writes of the
//! registers below the config space, and the queue setup they allow.

use virtio_queue::{Queue, QueueT};

use super::{reg, status, MmioTransport, MAGIC, VENDOR_ID, VERSION};

impl MmioTransport {
    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if queue setup is allowed now (features
    /// negotiated, not yet running, queue not yet enabled).
    fn queue_for_setup(&mut self) -> Option<&mut Queue> {
        use status::*;
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            tracing::debug!(
                "virtio-mmio: queue setup in status {:#x} ignored",
                self.status
            );
            return None;
        }
        let q = self.queues.get_mut(self.queue_sel as usize)?;
        (!q.ready()).then_some(q)
    }

    pub(super) fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.read_by_guest(),
            reg::STATUS => self.status,
            // No shared memory regions: length reads as all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of register {offset:#x} ignored");
                0
            }
        }
    }

    pub(super) fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                use status::*;
                if self.status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
                    tracing::debug!(
                        "virtio-mmio: driver features write in status {:#x} ignored",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {
                        if v != 0 {
                            tracing::debug!(
                                "virtio-mmio: driver features page {} ignored",
                                self.driver_features_sel
                            );
                        }
                    }
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_for_setup() {
                    let size = u16::try_from(v).unwrap_or(0);
                    // An invalid size (0, not a power of two, above the
                    // maximum) is kept out; `is_valid` at DRIVER_OK catches
                    // a driver that never sets a valid one.
                    if q.try_set_size(size).is_err() {
                        tracing::debug!("virtio-mmio: invalid queue size {v}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    use status::*;
                    let setup = self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK;
                    if setup {
                        q.set_ready(v == 1);
                    }
                }
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue notify failed: {e}");
                    }
                }
                None => tracing::debug!("virtio-mmio: notify of queue {v} ignored"),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => {
                self.with_setup_queue(|q| q.set_desc_table_address(Some(v), None))
            }
            reg::QUEUE_DESC_HIGH => {
                self.with_setup_queue(|q| q.set_desc_table_address(None, Some(v)))
            }
            reg::QUEUE_DRIVER_LOW => {
                self.with_setup_queue(|q| q.set_avail_ring_address(Some(v), None))
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.with_setup_queue(|q| q.set_avail_ring_address(None, Some(v)))
            }
            reg::QUEUE_DEVICE_LOW => {
                self.with_setup_queue(|q| q.set_used_ring_address(Some(v), None))
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.with_setup_queue(|q| q.set_used_ring_address(None, Some(v)))
            }
            _ => tracing::debug!("virtio-mmio: write of register {offset:#x} ignored"),
        }
    }

    fn with_setup_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue_for_setup() {
            f(q);
        }
    }
}
