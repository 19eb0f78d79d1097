//! Saved device state, for snapshots and migration.
//!
//! Every device that has guest-visible state offers
//! `save_state(&self) -> XState` and
//! `restore_state(&mut self, &XState) -> Result<(), StateError>`. The state
//! types are plain serde structs (the VMM writes them into the snapshot's
//! versioned, checksummed file); `restore_state` validates what it reads,
//! since a snapshot is a file and may be corrupt or from another version,
//! and never panics on it.

/// A saved state a device cannot take.
#[derive(Debug, thiserror::Error)]
#[error("{device}: {why}")]
pub struct StateError {
    /// The device, as an operator would name it ("serial", "virtio-blk").
    pub device: &'static str,
    /// What is wrong with the saved state, in one line.
    pub why: String,
}

impl StateError {
    pub fn new(device: &'static str, why: impl Into<String>) -> Self {
        Self {
            device,
            why: why.into(),
        }
    }
}
