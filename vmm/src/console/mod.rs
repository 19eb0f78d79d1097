//! The guest's serial console as the VMM shares it: scrollback, log file, live readers, input.
//!
//! [`ConsoleHub`] is the one place console bytes go through:
//!
//! * **Output** ([`ConsoleHub::output`], called by the UART on the vCPU thread) never blocks:
//!   it copies the bytes into the scrollback ring, into the queue of the log-file writer thread,
//!   and into the queue of every attached [`ConsoleReader`] (control-socket consoles, the VMM's
//!   stdout). Each of those queues is capped; when a consumer falls behind, its *oldest* bytes
//!   are dropped and it later receives `\r\n[vmm: N bytes of console output dropped]\r\n` in
//!   their place. Readers are woken through an `EventFd` when their queue becomes non-empty.
//! * **Input** ([`ConsoleHub::push_input`], from stdin or console clients) goes into a bounded
//!   queue; the VMM takes it with [`ConsoleHub::take_input`] as the UART has room.
//!
//! [`StdioConsole`] connects the hub to the VMM's own terminal (raw mode, Ctrl-A escapes).
//!
//! Files: `logfile.rs` (the console log: its writer thread, size cap and rotation),
//! `escape.rs` (the Ctrl-A parser), `terminal.rs` (raw mode and its restore from signal
//! handlers, atexit and the panic hook), `stdio.rs` ([`StdioConsole`], [`QuitRequested`]),
//! `tests.rs`.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::SystemTime;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Default scrollback size (what `log` and `console` replay can return).
pub const DEFAULT_SCROLLBACK: usize = 1024 * 1024;
/// Default backlog a reader may accumulate before its oldest bytes are dropped.
pub const DEFAULT_READER_BACKLOG: usize = 256 * 1024;
/// Default input queue size (bytes typed or pasted but not yet taken by the UART).
pub const DEFAULT_INPUT_CAPACITY: usize = 64 * 1024;
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The notice a consumer receives in place of dropped bytes.
pub fn drop_notice(dropped: u64) -> String {
    format!("\r\n[vmm: {dropped} bytes of console output dropped]\r\n")
}

/// The boot marker written into scrollback, log and readers by [`ConsoleHub::mark_boot`].
pub fn boot_marker(boot_count: u64, reason: &str, time: SystemTime) -> String {
    format!(
        "\r\n--- vmm: boot {boot_count} ({reason}) at {} ---\r\n",
        protocol::time::rfc3339_seconds(time)
    )
}

/// Errors setting up the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The `--console-log` file could not be opened.
    #[error("cannot open console log {path}: {source}")]
    OpenLog {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The log writer thread could not be started.
    #[error("cannot start the console log writer: {0}")]
    LogThread(io::Error),
    /// An `EventFd` could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

/// Console settings.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Scrollback ring size in bytes (at least 1 MiB is recommended; default 1 MiB).
    pub scrollback_bytes: usize,
    /// Per-reader backlog cap in bytes (default 256 KiB).
    pub reader_backlog: usize,
    /// Input queue capacity in bytes (default 64 KiB).
    pub input_capacity: usize,
    /// `--console-log`: appended to (O_APPEND), created with mode 0640.
    pub log_path: Option<PathBuf>,
    /// Its size cap and how many rotated files are kept.
    pub log_limits: LogLimits,
    /// Start the log's writer thread only at [`ConsoleHub::start_log`].
    pub defer_log_thread: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            scrollback_bytes: DEFAULT_SCROLLBACK,
            reader_backlog: DEFAULT_READER_BACKLOG,
            input_capacity: DEFAULT_INPUT_CAPACITY,
            log_path: None,
            log_limits: LogLimits::default(),
            defer_log_thread: false,
        }
    }
}

/// A bounded byte queue that drops its oldest bytes when full and remembers how many.
#[derive(Debug)]
pub(super) struct DropQueue {
    buf: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl DropQueue {
    fn new(cap: usize) -> Self {
        DropQueue {
            buf: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.dropped == 0
    }

    /// Appends; returns whether the queue was empty before (the consumer needs a wake-up).
    fn push(&mut self, bytes: &[u8]) -> bool {
        let was_empty = self.is_empty();
        let bytes = if bytes.len() > self.cap {
            self.dropped += (bytes.len() - self.cap) as u64;
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        if overflow > 0 {
            self.buf.drain(..overflow);
            self.dropped += overflow as u64;
        }
        self.buf.extend(bytes);
        was_empty
    }

    /// Takes up to about `max` bytes (the drop notice, if any, comes first and may exceed it).
    fn take(&mut self, max: usize, out: &mut Vec<u8>) {
        if self.dropped > 0 {
            out.extend_from_slice(drop_notice(self.dropped).as_bytes());
            self.dropped = 0;
        }
        let n = max.min(self.buf.len());
        out.extend(self.buf.drain(..n));
    }
}

struct ReaderShared {
    queue: Mutex<DropQueue>,
    waker: Arc<EventFd>,
}

impl ReaderShared {
    fn push(&self, bytes: &[u8]) {
        if lock(&self.queue).push(bytes) {
            // EAGAIN only when the counter is saturated, and then the fd is readable anyway.
            let _ = self.waker.write(1);
        }
    }
}

struct HubState {
    scrollback: VecDeque<u8>,
    scrollback_cap: usize,
    total: u64,
    readers: Vec<(u64, Arc<ReaderShared>)>,
    next_reader: u64,
}

struct InputState {
    queue: VecDeque<u8>,
    waiters: Vec<Arc<EventFd>>,
}

struct HubInner {
    state: Mutex<HubState>,
    reader_backlog: usize,
    input: Mutex<InputState>,
    input_cap: usize,
    input_evt: EventFd,
    log: Option<LogWriter>,
}

/// The shared console: scrollback, log file, readers and input. Cheap to clone; every clone is
/// the same console.
#[derive(Clone)]
pub struct ConsoleHub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for ConsoleHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleHub").finish_non_exhaustive()
    }
}

impl ConsoleHub {
    /// Creates the hub; opens the log file (O_APPEND, created 0640) and starts its writer thread.
    pub fn new(config: ConsoleConfig) -> Result<Self, ConsoleError> {
        let log = match &config.log_path {
            Some(path) => Some(LogWriter::start(
                path,
                config.log_limits,
                config.defer_log_thread,
            )?),
            None => None,
        };
        Ok(ConsoleHub {
            inner: Arc::new(HubInner {
                state: Mutex::new(HubState {
                    scrollback: VecDeque::new(),
                    scrollback_cap: config.scrollback_bytes.max(1),
                    total: 0,
                    readers: Vec::new(),
                    next_reader: 0,
                }),
                reader_backlog: config.reader_backlog.max(1),
                input: Mutex::new(InputState {
                    queue: VecDeque::new(),
                    waiters: Vec::new(),
                }),
                input_cap: config.input_capacity.max(1),
                input_evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(ConsoleError::EventFd)?,
                log,
            }),
        })
    }

    /// Starts the console log's writer thread when its start was deferred
    /// (`defer_log_thread`); output before it waits in the log's queue.
    pub fn start_log(&self) -> Result<(), ConsoleError> {
        match &self.inner.log {
            Some(log) => log.begin(),
            None => Ok(()),
        }
    }

    /// Guest console output. Called from the vCPU thread; never blocks on I/O (only short
    /// in-memory copies under a mutex).
    pub fn output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut state = lock(&self.inner.state);
        state.total += bytes.len() as u64;
        let cap = state.scrollback_cap;
        let kept = if bytes.len() > cap {
            &bytes[bytes.len() - cap..]
        } else {
            bytes
        };
        let overflow = (state.scrollback.len() + kept.len()).saturating_sub(cap);
        state.scrollback.drain(..overflow);
        state.scrollback.extend(kept);
        for (_, reader) in &state.readers {
            reader.push(bytes);
        }
        drop(state);
        if let Some(log) = &self.inner.log {
            log.push(bytes);
        }
    }

    /// Writes a boot marker (`--- vmm: boot N (reason) at TIME ---`) into the scrollback, the
    /// log and every reader. `reason` is free text such as `power-on`, `start` or
    /// `reset: watchdog`.
    pub fn mark_boot(&self, boot_count: u64, reason: &str) {
        self.output(boot_marker(boot_count, reason, SystemTime::now()).as_bytes());
    }

    /// The whole scrollback (oldest first).
    pub fn scrollback(&self) -> Vec<u8> {
        self.scrollback_tail(usize::MAX)
    }

    /// The last `max` bytes of the scrollback.
    pub fn scrollback_tail(&self, max: usize) -> Vec<u8> {
        let state = lock(&self.inner.state);
        let n = max.min(state.scrollback.len());
        state
            .scrollback
            .range(state.scrollback.len() - n..)
            .copied()
            .collect()
    }

    /// Console bytes output since the hub was created.
    pub fn total_output(&self) -> u64 {
        lock(&self.inner.state).total
    }

    /// Attaches a live reader woken through `waker` whenever its queue becomes non-empty. With
    /// `replay`, also returns the scrollback as of the attach: no byte is lost or repeated
    /// between the replay and the live output.
    pub fn attach(&self, waker: Arc<EventFd>, replay: bool) -> (ConsoleReader, Vec<u8>) {
        self.attach_with_backlog(waker, replay, self.inner.reader_backlog)
    }

    /// [`attach`](Self::attach) with a specific backlog cap.
    pub fn attach_with_backlog(
        &self,
        waker: Arc<EventFd>,
        replay: bool,
        backlog: usize,
    ) -> (ConsoleReader, Vec<u8>) {
        let shared = Arc::new(ReaderShared {
            queue: Mutex::new(DropQueue::new(backlog)),
            waker,
        });
        let mut state = lock(&self.inner.state);
        let id = state.next_reader;
        state.next_reader += 1;
        state.readers.push((id, shared.clone()));
        let replayed = if replay {
            state.scrollback.iter().copied().collect()
        } else {
            Vec::new()
        };
        drop(state);
        (
            ConsoleReader {
                hub: Arc::downgrade(&self.inner),
                id,
                shared,
            },
            replayed,
        )
    }

    /// Number of attached readers.
    pub fn reader_count(&self) -> usize {
        lock(&self.inner.state).readers.len()
    }

    /// Queues input for the guest; returns how many bytes were accepted (the rest does not fit
    /// in the input queue). Signals [`input_eventfd`](Self::input_eventfd) when the queue
    /// becomes non-empty.
    pub fn push_input(&self, bytes: &[u8]) -> usize {
        self.push_input_inner(bytes, None)
    }

    /// [`push_input`](Self::push_input); when not everything fits, `waker` is signalled once the
    /// VMM has taken input (so the caller can retry instead of dropping keystrokes).
    pub fn push_input_or_notify(&self, bytes: &[u8], waker: &Arc<EventFd>) -> usize {
        self.push_input_inner(bytes, Some(waker))
    }

    fn push_input_inner(&self, bytes: &[u8], waker: Option<&Arc<EventFd>>) -> usize {
        let mut input = lock(&self.inner.input);
        let was_empty = input.queue.is_empty();
        let n = bytes
            .len()
            .min(self.inner.input_cap.saturating_sub(input.queue.len()));
        input.queue.extend(&bytes[..n]);
        if n < bytes.len() {
            if let Some(waker) = waker {
                if !input.waiters.iter().any(|w| Arc::ptr_eq(w, waker)) {
                    input.waiters.push(waker.clone());
                }
            }
        }
        drop(input);
        if was_empty && n > 0 {
            let _ = self.inner.input_evt.write(1);
        }
        n
    }

    /// Takes up to `max` bytes of queued input (for the UART's receive FIFO).
    pub fn take_input(&self, max: usize) -> Vec<u8> {
        let mut input = lock(&self.inner.input);
        let n = max.min(input.queue.len());
        let taken: Vec<u8> = input.queue.drain(..n).collect();
        let waiters = if n > 0 {
            std::mem::take(&mut input.waiters)
        } else {
            Vec::new()
        };
        drop(input);
        for w in waiters {
            let _ = w.write(1);
        }
        taken
    }

    /// Whether input is queued.
    pub fn has_input(&self) -> bool {
        !lock(&self.inner.input).queue.is_empty()
    }

    /// Readable when input became available. Register it (EPOLLIN) in the event loop; on an
    /// event call [`ack_input_event`](Self::ack_input_event), then
    /// [`take_input`](Self::take_input) for as much as the UART FIFO holds. It is signalled only
    /// when the queue goes from empty to non-empty, so input left over must be taken when the
    /// UART has room again (vm-superio's `SerialEvents::in_buffer_empty`).
    pub fn input_eventfd(&self) -> &EventFd {
        &self.inner.input_evt
    }

    /// Clears [`input_eventfd`](Self::input_eventfd).
    pub fn ack_input_event(&self) {
        let _ = self.inner.input_evt.read();
    }
}

/// A live view of console output with its own capped backlog; detaches when dropped.
pub struct ConsoleReader {
    hub: Weak<HubInner>,
    id: u64,
    shared: Arc<ReaderShared>,
}

impl std::fmt::Debug for ConsoleReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleReader")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ConsoleReader {
    /// Appends up to about `max` pending bytes to `out` (a drop notice comes first when bytes
    /// were dropped, and may exceed `max`).
    pub fn take_into(&self, max: usize, out: &mut Vec<u8>) {
        lock(&self.shared.queue).take(max, out);
    }

    /// Takes up to about `max` pending bytes.
    pub fn take(&self, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.take_into(max, &mut out);
        out
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        lock(&self.shared.queue).is_empty()
    }

    /// Bytes pending (excluding a drop notice).
    pub fn pending(&self) -> usize {
        lock(&self.shared.queue).buf.len()
    }
}

impl Drop for ConsoleReader {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            lock(&hub.state).readers.retain(|(id, _)| *id != self.id);
        }
    }
}

mod escape;
mod logfile;
mod stdio;
mod terminal;

use escape::*;
pub use escape::{EscapeCommand, EscapeParser};
pub use logfile::LogLimits;
use logfile::LogWriter;
use stdio::*;
pub use stdio::{QuitRequested, StdioConsole};
pub use terminal::restore_terminal;
use terminal::*;

#[cfg(test)]
mod tests;
