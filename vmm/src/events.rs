//! Events that vCPU threads and devices raise for the VMM thread: a queue
//! plus an `EventFd` that wakes the event loop.
//!
//! The guest decides how often most of these happen (a loop writing the
//! pvpanic port, a reset loop on every vCPU), so the queue is bounded: an
//! event equal to one already waiting is dropped, and the queue never holds
//! more than the distinct events there are (a handful of kinds, plus one
//! failure per vCPU). The VMM thread handles each kind once per wake-up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::{GuestEvent, GuestEventSink};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Guest(GuestEvent),
    /// A vCPU hit something it cannot continue from.
    VcpuFailed {
        vcpu: u8,
        reason: String,
    },
    /// The watchdog timer or another VMM-side timer fired.
    Timer,
}

#[derive(Clone)]
pub struct VmEventQueue {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Mutex<VecDeque<VmEvent>>,
    wake: EventFd,
}

impl VmEventQueue {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                queue: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
        })
    }

    pub fn push(&self, ev: VmEvent) {
        {
            let mut q = lock(&self.inner.queue);
            if q.contains(&ev) {
                // Already waiting: handling it once is what the guest gets.
                return;
            }
            q.push_back(ev);
        }
        // A full counter still leaves the fd readable: ignoring is right.
        let _ = self.inner.wake.write(1);
    }

    /// Takes everything queued (and clears the wake-up).
    pub fn drain(&self) -> Vec<VmEvent> {
        let _ = self.inner.wake.read();
        lock(&self.inner.queue).drain(..).collect()
    }

    /// Whether something waits to be handled (a guest's reset or power-off
    /// request, a vCPU that failed).
    pub fn pending(&self) -> bool {
        lock(&self.inner.queue)
            .iter()
            .any(|e| !matches!(e, VmEvent::Timer))
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.inner.wake
    }

    /// A sink devices can hold.
    pub fn sink(&self) -> Arc<dyn GuestEventSink> {
        Arc::new(self.clone())
    }
}

impl GuestEventSink for VmEventQueue {
    fn notify(&self, event: GuestEvent) {
        self.push(VmEvent::Guest(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::ResetCause;

    #[test]
    fn events_arrive_in_order_and_wake_the_loop() {
        let q = VmEventQueue::new().unwrap();
        q.sink().notify(GuestEvent::Reset(ResetCause::I8042));
        q.push(VmEvent::Timer);
        assert_eq!(q.wake_fd().read().unwrap(), 2);
        assert_eq!(
            q.drain(),
            vec![
                VmEvent::Guest(GuestEvent::Reset(ResetCause::I8042)),
                VmEvent::Timer
            ]
        );
        assert!(q.drain().is_empty());
    }

    #[test]
    fn a_storm_of_equal_events_queues_each_once() {
        let q = VmEventQueue::new().unwrap();
        let sink = q.sink();
        for _ in 0..100_000 {
            sink.notify(GuestEvent::Panic(1));
            sink.notify(GuestEvent::Reset(ResetCause::TripleFault));
        }
        q.push(VmEvent::VcpuFailed {
            vcpu: 0,
            reason: "x".into(),
        });
        assert_eq!(
            q.drain(),
            vec![
                VmEvent::Guest(GuestEvent::Panic(1)),
                VmEvent::Guest(GuestEvent::Reset(ResetCause::TripleFault)),
                VmEvent::VcpuFailed {
                    vcpu: 0,
                    reason: "x".into()
                },
            ]
        );
        // Once handled, the next one is news again.
        sink.notify(GuestEvent::Panic(1));
        assert_eq!(q.drain(), vec![VmEvent::Guest(GuestEvent::Panic(1))]);
    }
}
