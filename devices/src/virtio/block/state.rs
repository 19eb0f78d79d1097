//! Quiescing a disk for a snapshot ([`VirtioDevice::quiesce`]).
//!
//! With the device's lock held no request is being served synchronously
//! (the event loop serves them under that lock), so only io_uring's
//! requests can be in flight. A reset waits for them and throws their
//! completions away (no old completion may reach a new driver); quiescing
//! waits for them too, but completes them into the used ring as the event
//! loop would have: status byte, used entry, interrupt. Then the queues'
//! positions say exactly what was served: `next_avail` past every request
//! taken, `next_used` past every completion, and a later activation with
//! them serves what the guest queued meanwhile, once.
//!
//! A running backup (`backup.rs`) is not disturbed: it is copied on this
//! disk's own I/O thread, driven by its timer, and does not depend on the
//! queues. Every guest write that reached the image went through
//! `before_write` first (io_uring's included: it runs when the request is
//! parsed, before submission). After a restore in this same process the
//! device serves the guest again under the same job, so the copy stays
//! the disk as it was at the backup's instant. A VMM that ends after a
//! snapshot ends the backup as any exit does: its `done` reports that the
//! disk went away, and the copy is not complete. Nothing is refused here
//! for it; [`Block::backup_running`] tells a VMM that wants to wait.
//!
//! The image is not synced: completed writes are in the host's page cache,
//! which is what a process on this host reading the image next sees.
//!
//! [`VirtioDevice::quiesce`]: crate::virtio::VirtioDevice::quiesce

use virtio_queue::QueueState;

use super::uring::Uring;
use super::Block;
use crate::state::StateError;

/// How long a snapshot waits for a disk's requests in flight.
const QUIESCE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Block {
    /// See the module's documentation.
    pub(super) fn quiesce_queues(&mut self) -> Result<Vec<QueueState>, StateError> {
        if self.active.is_none() {
            return Ok(Vec::new());
        }
        // Not for ever: a stalled image must not hold the VM paused (and
        // the VMM's lock) for good. What is left completes later as usual.
        self.complete_ring(Some(std::time::Instant::now() + QUIESCE_WAIT));
        let left = self.ring.as_ref().map_or(0, Uring::in_flight);
        if left > 0 {
            // The requests keep their memory and will complete on a later
            // wake-up, so the disk goes on serving; the snapshot fails.
            return Err(StateError::new(
                "virtio-blk",
                format!(
                    "{}: {left} requests are still in flight after {} s (a stalled image?)",
                    self.disk.path.display(),
                    QUIESCE_WAIT.as_secs()
                ),
            ));
        }
        Ok(self
            .active
            .take()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default())
    }
}
