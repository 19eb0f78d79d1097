//! Dirty pages for frames the TAP writes straight into the guest's RX
//! buffers (`readv` on iovecs from `push_iovecs`): vm-memory never sees
//! those writes, so its bitmap must be told (see
//! [`take_dirty_pages`](crate::virtio::take_dirty_pages)). Frames that go
//! through the bounce buffer are copied in with vm-memory's API and marked
//! by it; vhost-net's writes are not tracked at all (see [`vhost`](super::vhost)).

use super::Active;
use crate::virtio::iov::mark_written;

impl Active {
    /// Marks the first `n` bytes of the RX chains at hand, in order: what
    /// one direct `readv` just wrote. Called after the read returned, so a
    /// harvest of the bitmap cannot fall between the mark and the write.
    pub(super) fn mark_rx_written(&self, n: usize) {
        let mut left = u64::try_from(n).unwrap_or(u64::MAX);
        for ch in &self.rx_chains {
            if left == 0 {
                break;
            }
            let take = u64::try_from(ch.cap).unwrap_or(u64::MAX).min(left);
            mark_written(&self.mem, &ch.segs, take);
            left = left.saturating_sub(take);
        }
    }
}
