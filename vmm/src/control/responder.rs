//! Answers travelling from the handler (any thread) back to the event loop.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::{ControlError, Reply, Response};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::access::PeerIdentity;

/// Event lines kept for subscribers while the loop is busy; beyond this the oldest are dropped.
const MAX_QUEUED_EVENTS: usize = 4096;

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The `Shared` whose server is dispatching on this thread right now (0: none). Answers
    /// given during dispatch are drained before `process` returns, so they need no wake-up.
    static DISPATCHING: Cell<usize> = const { Cell::new(0) };
}

/// A response waiting to be routed to its connection.
pub(crate) struct Completion {
    pub conn: u32,
    pub seq: u64,
    pub line: String,
}

#[derive(Default)]
struct Pending {
    responses: Vec<Completion>,
    events: VecDeque<Arc<str>>,
    events_dropped: u64,
}

/// State shared between the server and everything that answers it or publishes to it.
pub(crate) struct Shared {
    wake: EventFd,
    pending: Mutex<Pending>,
}

impl Shared {
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Shared {
            wake: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            pending: Mutex::new(Pending::default()),
        }))
    }

    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    fn id(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }

    /// Marks this thread as dispatching for `self` until the guard drops.
    pub(crate) fn dispatching(self: &Arc<Self>) -> DispatchGuard {
        let previous = DISPATCHING.with(|d| d.replace(self.id()));
        DispatchGuard { previous }
    }

    fn wake(self: &Arc<Self>) {
        if DISPATCHING.with(|d| d.get()) != self.id() {
            // EAGAIN only when the counter is saturated, and then the fd is readable anyway.
            let _ = self.wake.write(1);
        }
    }

    fn complete(self: &Arc<Self>, completion: Completion) {
        lock(&self.pending).responses.push(completion);
        self.wake();
    }

    pub(crate) fn push_event(self: &Arc<Self>, line: Arc<str>) {
        {
            let mut pending = lock(&self.pending);
            if pending.events.len() >= MAX_QUEUED_EVENTS {
                pending.events.pop_front();
                pending.events_dropped += 1;
            }
            pending.events.push_back(line);
        }
        self.wake();
    }

    /// Takes everything queued: (responses, events, events dropped since the last call).
    pub(crate) fn take(&self) -> (Vec<Completion>, VecDeque<Arc<str>>, u64) {
        let mut pending = lock(&self.pending);
        let dropped = std::mem::take(&mut pending.events_dropped);
        (
            std::mem::take(&mut pending.responses),
            std::mem::take(&mut pending.events),
            dropped,
        )
    }

    pub(crate) fn ack_wake(&self) {
        let _ = self.wake.read();
    }
}

pub(crate) struct DispatchGuard {
    previous: usize,
}

impl Drop for DispatchGuard {
    fn drop(&mut self) {
        DISPATCHING.with(|d| d.set(self.previous));
    }
}

enum Target {
    Connection {
        shared: Arc<Shared>,
        conn: u32,
        seq: u64,
    },
    Channel(mpsc::Sender<Result<Reply, ControlError>>),
}

/// The way to answer one request: exactly one response, now (inside
/// [`ControlHandler::execute`](super::ControlHandler::execute)) or later from any thread (e.g.
/// `shutdown` answers when the guest stopped or the timeout hit). The connection processes its
/// next request only after this one is answered, so answers keep request order.
///
/// Dropping a `Responder` without answering sends
/// `{"ok":false,"error":"internal error: <cmd> was not answered"}`.
pub struct Responder {
    target: Option<Target>,
    peer: Arc<PeerIdentity>,
    command: &'static str,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("command", &self.command)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Responder {
    pub(crate) fn new(
        shared: Arc<Shared>,
        conn: u32,
        seq: u64,
        peer: Arc<PeerIdentity>,
        command: &'static str,
    ) -> Self {
        Responder {
            target: Some(Target::Connection { shared, conn, seq }),
            peer,
            command,
        }
    }

    /// A responder not tied to a socket, for unit tests of a
    /// [`ControlHandler`](super::ControlHandler): the answer arrives on the receiver (an
    /// unanswered drop arrives as `Err("internal error: ...")`).
    pub fn channel(command: &'static str) -> (Self, mpsc::Receiver<Result<Reply, ControlError>>) {
        let (tx, rx) = mpsc::channel();
        (
            Responder {
                target: Some(Target::Channel(tx)),
                peer: Arc::new(PeerIdentity {
                    pid: std::process::id() as i32,
                    uid: 0,
                    gid: 0,
                    groups: Vec::new(),
                    operator: true,
                }),
                command,
            },
            rx,
        )
    }

    /// The peer that sent the request (for logs, or operator-only decisions).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The command being answered.
    pub fn command(&self) -> &'static str {
        self.command
    }

    /// Sends the answer.
    pub fn send(mut self, result: Result<Reply, ControlError>) {
        self.deliver(result);
    }

    /// Sends a successful answer.
    pub fn ok(self, reply: Reply) {
        self.send(Ok(reply));
    }

    /// Sends `{"ok":true}`.
    pub fn done(self) {
        self.send(Ok(Reply::Done));
    }

    /// Sends `{"ok":false,"error":"<message>","code":"<code>"}`; the message should read
    /// well to a customer.
    pub fn error(self, e: ControlError) {
        self.send(Err(e));
    }

    fn deliver(&mut self, result: Result<Reply, ControlError>) {
        match self.target.take() {
            Some(Target::Connection { shared, conn, seq }) => {
                let line = Response::line_for(&result);
                shared.complete(Completion { conn, seq, line });
            }
            Some(Target::Channel(tx)) => {
                // The test dropped its receiver: nobody to tell.
                let _ = tx.send(result);
            }
            None => {}
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.target.is_some() {
            tracing::warn!(command = self.command, "control request dropped unanswered");
            let message = format!("internal error: {} was not answered", self.command);
            self.deliver(Err(ControlError::internal(message)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_responder_delivers_once() {
        let (r, rx) = Responder::channel("status");
        assert_eq!(r.command(), "status");
        r.done();
        assert_eq!(rx.recv().unwrap(), Ok(Reply::Done));
        assert!(rx.recv().is_err(), "exactly one answer");
    }

    #[test]
    fn dropped_responder_answers_with_an_error() {
        let (r, rx) = Responder::channel("reboot");
        drop(r);
        assert_eq!(
            rx.recv().unwrap(),
            Err(ControlError::internal(
                "internal error: reboot was not answered"
            ))
        );
    }

    #[test]
    fn answers_from_other_threads_wake_the_loop_and_dispatch_answers_do_not() {
        let shared = Shared::new().unwrap();
        let peer = Arc::new(PeerIdentity {
            pid: 1,
            uid: 0,
            gid: 0,
            groups: vec![],
            operator: true,
        });
        {
            let _guard = shared.dispatching();
            Responder::new(shared.clone(), 7, 1, peer.clone(), "pause").done();
        }
        assert!(
            shared.wake_fd().read().is_err(),
            "no wake-up during dispatch"
        );
        let r = Responder::new(shared.clone(), 7, 2, peer, "shutdown");
        std::thread::spawn(move || r.error(ControlError::invalid_state("boom")))
            .join()
            .unwrap();
        assert_eq!(shared.wake_fd().read().unwrap(), 1);
        let (responses, _, _) = shared.take();
        let lines: Vec<_> = responses
            .iter()
            .map(|c| (c.conn, c.seq, c.line.as_str()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (7, 1, "{\"ok\":true}\n"),
                (
                    7,
                    2,
                    "{\"ok\":false,\"error\":\"boom\",\"code\":\"invalid_state\"}\n"
                )
            ]
        );
    }

    #[test]
    fn event_queue_is_bounded() {
        let shared = Shared::new().unwrap();
        for i in 0..(MAX_QUEUED_EVENTS + 10) {
            shared.push_event(Arc::from(format!("{i}\n").as_str()));
        }
        let (_, events, dropped) = shared.take();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(dropped, 10);
        assert_eq!(&*events[0], "10\n");
    }
}
