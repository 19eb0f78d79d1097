//! Publishing events to subscribed control connections (and other listeners).

use std::sync::{Arc, RwLock};

use protocol::{Event, EventMessage};

type Listener = Arc<dyn Fn(&EventMessage) + Send + Sync>;

struct Inner {
    vm: String,
    listeners: RwLock<Vec<Listener>>,
}

/// Publishes [`protocol::Event`]s from any thread. Each event is stamped with the VM name and
/// the time, logged (tracing, target `vmm::event`), and handed to every listener: each
/// [`ControlServer`](super::ControlServer) built with this broadcaster queues it for its
/// subscribed connections; the alert hook can add its own listener. Publishing never blocks on
/// a client.
#[derive(Clone)]
pub struct EventBroadcaster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBroadcaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBroadcaster")
            .field("vm", &self.inner.vm)
            .finish_non_exhaustive()
    }
}

impl EventBroadcaster {
    /// A broadcaster for the VM named `vm`.
    pub fn new(vm: impl Into<String>) -> Self {
        EventBroadcaster {
            inner: Arc::new(Inner {
                vm: vm.into(),
                listeners: RwLock::new(Vec::new()),
            }),
        }
    }

    /// The VM name stamped on events.
    pub fn vm_name(&self) -> &str {
        &self.inner.vm
    }

    /// Stamps, logs and delivers an event; returns the stamped message.
    pub fn publish(&self, event: Event) -> EventMessage {
        let message = EventMessage::now(self.inner.vm.clone(), event);
        tracing::info!(target: "vmm::event", "{}", message.to_line().trim_end());
        let listeners = self
            .inner
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for listener in listeners {
            listener(&message);
        }
        message
    }

    /// Calls `listener` for every event published from now on (on the publishing thread: keep
    /// it short and non-blocking).
    pub fn add_listener(&self, listener: impl Fn(&EventMessage) + Send + Sync + 'static) {
        self.inner
            .listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(listener));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ResetCause;
    use std::sync::Mutex;

    #[test]
    fn publish_stamps_and_reaches_every_listener() {
        let b = EventBroadcaster::new("web1");
        let seen = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..2 {
            let seen = seen.clone();
            b.add_listener(move |m| seen.lock().unwrap().push(m.clone()));
        }
        let m = b.publish(Event::Reset {
            cause: ResetCause::Watchdog,
        });
        assert_eq!(m.vm, "web1");
        assert!(m.time.ends_with('Z'));
        assert_eq!(seen.lock().unwrap().as_slice(), &[m.clone(), m]);
    }
}
