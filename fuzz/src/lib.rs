//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Harness code: it may unwrap set-up that cannot fail (creating an eventfd,
//! mapping a few pages), never anything derived from the fuzz input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod net;
pub mod virtio;

use std::sync::Mutex;

use devices::{GuestEvent, GuestEventSink};

/// Records the `GuestEvent`s a device reports.
#[derive(Default)]
pub struct RecordingSink(Mutex<Vec<GuestEvent>>);

impl RecordingSink {
    pub fn take(&self) -> Vec<GuestEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl GuestEventSink for RecordingSink {
    fn notify(&self, event: GuestEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }
}

/// A non-blocking eventfd-backed interrupt line, and a way to count edges.
pub fn irq() -> devices::legacy::EventFdTrigger {
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    devices::legacy::EventFdTrigger::new(evt)
}

/// Edges on `t` since the last call.
pub fn fired(t: &devices::legacy::EventFdTrigger) -> u64 {
    t.eventfd().read().unwrap_or(0)
}
