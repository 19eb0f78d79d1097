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

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, Weak};
use std::thread::JoinHandle;
use std::time::SystemTime;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Default scrollback size (what `log` and `console` replay can return).
pub const DEFAULT_SCROLLBACK: usize = 1024 * 1024;
/// Default backlog a reader may accumulate before its oldest bytes are dropped.
pub const DEFAULT_READER_BACKLOG: usize = 256 * 1024;
/// Default input queue size (bytes typed or pasted but not yet taken by the UART).
pub const DEFAULT_INPUT_CAPACITY: usize = 64 * 1024;
/// Backlog of the log-file writer before its oldest pending bytes are dropped.
const LOG_BACKLOG: usize = 4 * 1024 * 1024;

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
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            scrollback_bytes: DEFAULT_SCROLLBACK,
            reader_backlog: DEFAULT_READER_BACKLOG,
            input_capacity: DEFAULT_INPUT_CAPACITY,
            log_path: None,
        }
    }
}

/// A bounded byte queue that drops its oldest bytes when full and remembers how many.
#[derive(Debug)]
struct DropQueue {
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

struct LogShared {
    queue: Mutex<(DropQueue, bool)>,
    cond: Condvar,
}

struct LogWriter {
    shared: Arc<LogShared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    fn start(path: &Path) -> Result<Self, ConsoleError> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|source| ConsoleError::OpenLog {
                path: path.to_path_buf(),
                source,
            })?;
        let shared = Arc::new(LogShared {
            queue: Mutex::new((DropQueue::new(LOG_BACKLOG), false)),
            cond: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let display = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("console-log".into())
            .spawn(move || log_writer_thread(file, &thread_shared, &display))
            .map_err(ConsoleError::LogThread)?;
        Ok(LogWriter {
            shared,
            thread: Some(thread),
        })
    }

    fn push(&self, bytes: &[u8]) {
        if lock(&self.shared.queue).0.push(bytes) {
            self.shared.cond.notify_one();
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        lock(&self.shared.queue).1 = true;
        self.shared.cond.notify_one();
        if let Some(thread) = self.thread.take() {
            // The writer flushes what is queued and exits; a panic there is already reported.
            let _ = thread.join();
        }
    }
}

fn log_writer_thread(mut file: File, shared: &LogShared, path: &str) {
    let mut chunk = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    loop {
        let closed = {
            let mut guard = lock(&shared.queue);
            while guard.0.is_empty() && !guard.1 {
                guard = shared.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            chunk.clear();
            guard.0.take(usize::MAX, &mut chunk);
            guard.1
        };
        if !chunk.is_empty() {
            match file.write_all(&chunk) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("console log {path}: write failed: {e}");
                }
                Err(_) => {}
            }
        }
        if closed && lock(&shared.queue).0.is_empty() {
            return;
        }
    }
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
            Some(path) => Some(LogWriter::start(path)?),
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
                input_evt: EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::EventFd)?,
                log,
            }),
        })
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

/// Set when the operator typed the quit escape (Ctrl-A x) on the stdio console. Clone it into
/// the VMM's main loop: poll [`is_requested`](Self::is_requested) after each
/// `EventManager::run`, or register [`eventfd`](Self::eventfd).
#[derive(Clone, Debug)]
pub struct QuitRequested {
    flag: Arc<AtomicBool>,
    evt: Arc<EventFd>,
}

impl QuitRequested {
    /// A fresh, unset signal.
    pub fn new() -> io::Result<Self> {
        Ok(QuitRequested {
            flag: Arc::new(AtomicBool::new(false)),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Sets the signal and wakes the eventfd.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Whether quitting was requested.
    pub fn is_requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Readable once quitting was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// The escape character: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// What the user asked for with an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeCommand {
    /// Ctrl-A x: quit the VMM.
    Quit,
    /// Ctrl-A h or Ctrl-A ?: show the escape help.
    Help,
}

/// The help text for Ctrl-A h.
pub const ESCAPE_HELP: &str =
    "\r\n[vmm: Ctrl-A x quits the VMM, Ctrl-A Ctrl-A sends Ctrl-A, Ctrl-A h shows this]\r\n";

/// Recognizes Ctrl-A escapes in terminal input: Ctrl-A x → quit, Ctrl-A Ctrl-A → one Ctrl-A
/// for the guest, Ctrl-A h/? → help; Ctrl-A followed by anything else passes both bytes on.
/// The state survives across reads (Ctrl-A and x may arrive separately).
#[derive(Debug, Default)]
pub struct EscapeParser {
    pending: bool,
}

impl EscapeParser {
    /// Filters `input` into `guest` bytes; stops at and returns the first command.
    /// Returns the command and the number of input bytes consumed.
    pub fn feed(&mut self, input: &[u8], guest: &mut Vec<u8>) -> (Option<EscapeCommand>, usize) {
        for (i, &b) in input.iter().enumerate() {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' => return (Some(EscapeCommand::Quit), i + 1),
                    b'h' | b'?' => return (Some(EscapeCommand::Help), i + 1),
                    ESCAPE => guest.push(ESCAPE),
                    other => guest.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                guest.push(b);
            }
        }
        (None, input.len())
    }
}

// ----- terminal state, restorable from signal handlers, atexit and the panic hook -----

struct SavedTermios(std::cell::UnsafeCell<std::mem::MaybeUninit<libc::termios>>);
// SAFETY: written once by `enter_raw_mode` before `TERMIOS_SAVED` is set (Release), read only
// after observing it set (Acquire); never written concurrently.
unsafe impl Sync for SavedTermios {}

static SAVED_TERMIOS: SavedTermios =
    SavedTermios(std::cell::UnsafeCell::new(std::mem::MaybeUninit::uninit()));
static TERMIOS_SAVED: AtomicBool = AtomicBool::new(false);
static TERMIOS_FD: AtomicI32 = AtomicI32::new(-1);
static RESTORE_HOOKS: Once = Once::new();

/// Restores the terminal settings saved when the stdio console entered raw mode. Idempotent
/// and async-signal-safe (only `tcsetattr`): call it from your own signal handlers. It is
/// already called on drop of [`StdioConsole`], at `exit`, from the panic hook and on
/// SIGTERM/SIGHUP/SIGQUIT/SIGINT when those had their default disposition.
pub fn restore_terminal() {
    if TERMIOS_SAVED.swap(false, Ordering::AcqRel) {
        let fd = TERMIOS_FD.load(Ordering::Acquire);
        // SAFETY: `TERMIOS_SAVED` was set after `SAVED_TERMIOS` was fully written; tcsetattr
        // only reads the struct.
        unsafe {
            libc::tcsetattr(fd, libc::TCSANOW, (*SAVED_TERMIOS.0.get()).as_ptr());
        }
    }
}

extern "C" fn restore_terminal_at_exit() {
    restore_terminal();
}

extern "C" fn restore_terminal_on_signal(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: signal() and raise() are async-signal-safe; re-raising with the default action
    // terminates the process as the signal would have without our handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_restore_hooks() {
    RESTORE_HOOKS.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        unsafe {
            libc::atexit(restore_terminal_at_exit);
        }
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGINT] {
            // SAFETY: query-then-set of a handler; the handler only calls async-signal-safe
            // functions. Handlers the VMM installed earlier are left alone.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_DFL
                {
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction =
                        restore_terminal_on_signal as *const () as libc::sighandler_t;
                    libc::sigemptyset(&mut new.sa_mask);
                    libc::sigaction(sig, &new, std::ptr::null_mut());
                }
            }
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts `fd` in raw input mode (no echo, no line editing, no signals from keys, output
/// post-processing kept so the VMM's own log lines stay readable) and arranges for restore.
fn enter_raw_mode(fd: RawFd) -> io::Result<()> {
    if TERMIOS_SAVED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut original: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios.
    if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = original;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: single writer before the flag is published (see `SavedTermios`).
    unsafe {
        (*SAVED_TERMIOS.0.get()).write(original);
    }
    TERMIOS_FD.store(fd, Ordering::Release);
    TERMIOS_SAVED.store(true, Ordering::Release);
    install_restore_hooks();
    // SAFETY: valid pointer to a termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        let e = io::Error::last_os_error();
        TERMIOS_SAVED.store(false, Ordering::Release);
        return Err(e);
    }
    Ok(())
}

/// How console output reaches the output descriptor.
enum Output {
    /// Our own nonblocking descriptor (stdout reopened through /proc, or a test pipe): the
    /// open file description shared by fds 1 and 2 and the parent shell stays blocking.
    Nonblocking(OwnedFd),
    /// A socket (e.g. journald's stdout stream): `send` with `MSG_DONTWAIT`.
    Socket(RawFd),
    /// Not pollable (regular file): plain writes, which do not block for long.
    Plain(RawFd),
}

impl Output {
    fn fd(&self) -> RawFd {
        match self {
            Output::Nonblocking(fd) => fd.as_raw_fd(),
            Output::Socket(fd) | Output::Plain(fd) => *fd,
        }
    }

    fn pollable(&self) -> bool {
        !matches!(self, Output::Plain(_))
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let n = match self {
            // SAFETY: sending from a live buffer of the given length.
            Output::Socket(fd) => unsafe {
                libc::send(
                    *fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            },
            // SAFETY: writing from a live buffer of the given length.
            _ => unsafe { libc::write(self.fd(), buf.as_ptr().cast(), buf.len()) },
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

const TOKEN_INPUT: u32 = 0;
const TOKEN_OUTPUT: u32 = 1;
const TOKEN_WAKE: u32 = 2;
const OUTPUT_CHUNK: usize = 64 * 1024;

/// The console on the VMM's own stdin/stdout, as an event-manager subscriber.
///
/// * stdin (raw mode when it is a terminal) → [`ConsoleHub::push_input`], after Ctrl-A escape
///   processing (terminal only; piped input passes through untouched).
/// * hub output → stdout, nonblocking with a capped backlog (oldest bytes dropped with a notice).
/// * Ctrl-A x sets the [`QuitRequested`] signal.
///
/// The terminal is restored on drop, at exit, on panic and on fatal signals.
pub struct StdioConsole {
    hub: ConsoleHub,
    quit: QuitRequested,
    input_fd: Option<RawFd>,
    input_registered: bool,
    _owned_input: Option<OwnedFd>,
    output: Output,
    output_registered: bool,
    output_dead: bool,
    escape: Option<EscapeParser>,
    reader: ConsoleReader,
    wake: Arc<EventFd>,
    pending_out: Vec<u8>,
    pending_in: Vec<u8>,
    owns_terminal: bool,
}

impl std::fmt::Debug for StdioConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioConsole").finish_non_exhaustive()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where stdout output goes: terminals and pipes are reopened through /proc/self/fd/1, which
/// gives a new open file description, so O_NONBLOCK does not leak to stderr or the parent
/// shell; sockets are written with `MSG_DONTWAIT`; regular files plainly.
fn stdout_output() -> Output {
    // SAFETY: fstat fills a plain struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; if fd 1 is closed fstat fails.
    if unsafe { libc::fstat(1, &mut st) } != 0 {
        return Output::Plain(1);
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Output::Plain(1),
        libc::S_IFSOCK => Output::Socket(1),
        _ => match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open("/proc/self/fd/1")
        {
            Ok(file) => Output::Nonblocking(file.into()),
            Err(_) => Output::Plain(1),
        },
    }
}

impl StdioConsole {
    /// The console on fds 0 and 1. Puts stdin in raw mode when it is a terminal and
    /// recognizes the Ctrl-A escapes there.
    pub fn new(hub: ConsoleHub, quit: QuitRequested) -> Result<Self, ConsoleError> {
        let escape = if is_tty(0) {
            if let Err(e) = enter_raw_mode(0) {
                tracing::warn!("cannot put the terminal in raw mode: {e}");
            }
            true
        } else {
            false
        };
        let mut console = Self::build(hub, quit, Some(0), None, stdout_output(), escape)?;
        console.owns_terminal = escape;
        Ok(console)
    }

    /// The console on given descriptors (pipes, sockets, pseudo-terminals): `input` is read,
    /// `output` written nonblocking; both are owned. `escape` enables Ctrl-A processing. No
    /// terminal mode is changed.
    pub fn with_fds(
        hub: ConsoleHub,
        quit: QuitRequested,
        input: Option<OwnedFd>,
        output: OwnedFd,
        escape: bool,
    ) -> Result<Self, ConsoleError> {
        set_nonblocking(output.as_raw_fd()).map_err(ConsoleError::EventFd)?;
        let fd = input.as_ref().map(|i| i.as_raw_fd());
        Self::build(hub, quit, fd, input, Output::Nonblocking(output), escape)
    }

    fn build(
        hub: ConsoleHub,
        quit: QuitRequested,
        input_fd: Option<RawFd>,
        owned_input: Option<OwnedFd>,
        output: Output,
        escape: bool,
    ) -> Result<Self, ConsoleError> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ConsoleError::EventFd)?);
        let (reader, _) = hub.attach(wake.clone(), false);
        Ok(StdioConsole {
            hub,
            quit,
            input_fd,
            input_registered: false,
            _owned_input: owned_input,
            output,
            output_registered: false,
            output_dead: false,
            escape: escape.then(EscapeParser::default),
            reader,
            wake,
            pending_out: Vec::new(),
            pending_in: Vec::new(),
            owns_terminal: false,
        })
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let Some(fd) = self.input_fd else { return };
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a stack buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return;
            }
            tracing::warn!("console input: {e}");
        }
        if n <= 0 {
            // EOF, hang-up or error: stop reading; the guest keeps running.
            if self.input_registered {
                let _ = ops.remove(Events::with_data_raw(fd, TOKEN_INPUT, EventSet::IN));
                self.input_registered = false;
            }
            self.input_fd = None;
            return;
        }
        let data = &buf[..n as usize];
        let mut guest = Vec::with_capacity(data.len());
        match &mut self.escape {
            None => guest.extend_from_slice(data),
            Some(parser) => {
                let mut rest = data;
                while !rest.is_empty() {
                    let (cmd, used) = parser.feed(rest, &mut guest);
                    rest = &rest[used..];
                    match cmd {
                        Some(EscapeCommand::Quit) => {
                            tracing::info!("quit requested from the console (Ctrl-A x)");
                            self.quit.request();
                            break;
                        }
                        Some(EscapeCommand::Help) => {
                            self.pending_out.extend_from_slice(ESCAPE_HELP.as_bytes());
                        }
                        None => {}
                    }
                }
            }
        }
        self.pending_in.extend_from_slice(&guest);
        self.push_pending_input(ops);
    }

    /// Hands pending input to the hub. While it does not fit, stdin is taken out of the epoll
    /// set (so a hang-up cannot spin the loop) until the VMM takes input: the hub then signals
    /// our wake eventfd and we read again. Typed or pasted bytes are never dropped.
    fn push_pending_input(&mut self, ops: &mut EventOps) {
        if !self.pending_in.is_empty() {
            let n = self.hub.push_input_or_notify(&self.pending_in, &self.wake);
            self.pending_in.drain(..n);
        }
        let Some(fd) = self.input_fd else { return };
        let events = Events::with_data_raw(fd, TOKEN_INPUT, EventSet::IN);
        if !self.pending_in.is_empty() && self.input_registered {
            let _ = ops.remove(events);
            self.input_registered = false;
        } else if self.pending_in.is_empty() && !self.input_registered {
            // Regular files and /dev/null cannot be polled: then there is no console input.
            if ops.add(events).is_ok() {
                self.input_registered = true;
            } else {
                tracing::debug!("console input is not pollable; not reading it");
                self.input_fd = None;
            }
        }
    }

    fn flush_output(&mut self, ops: &mut EventOps) {
        while !self.output_dead {
            if self.pending_out.len() < OUTPUT_CHUNK {
                self.reader
                    .take_into(OUTPUT_CHUNK - self.pending_out.len(), &mut self.pending_out);
            }
            if self.pending_out.is_empty() {
                break;
            }
            match self.output.write(&self.pending_out) {
                Ok(n) => {
                    self.pending_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // stdout is gone: discard output from now on (the scrollback keeps it).
                    tracing::warn!("console output: {e}; discarding further output");
                    self.pending_out.clear();
                    self.output_dead = true;
                    break;
                }
            }
        }
        if self.output_dead {
            self.reader.take(usize::MAX);
        }
        let want_out = !self.pending_out.is_empty();
        if self.output.pollable() {
            let fd = self.output.fd();
            if want_out && !self.output_registered {
                self.output_registered = ops
                    .add(Events::with_data_raw(fd, TOKEN_OUTPUT, EventSet::OUT))
                    .is_ok();
            } else if !want_out && self.output_registered {
                let _ = ops.remove(Events::with_data_raw(fd, TOKEN_OUTPUT, EventSet::OUT));
                self.output_registered = false;
            }
        }
    }
}

impl MutEventSubscriber for StdioConsole {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&*self.wake, TOKEN_WAKE, EventSet::IN)) {
            tracing::error!("console: cannot register its wake-up eventfd: {e:?}");
        }
        self.push_pending_input(ops);
        self.flush_output(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            // Readable, hung up or failed: the read tells which.
            TOKEN_INPUT => self.read_input(ops),
            TOKEN_WAKE => {
                let _ = self.wake.read();
                self.push_pending_input(ops);
            }
            _ => {}
        }
        self.flush_output(ops);
    }
}

impl Drop for StdioConsole {
    fn drop(&mut self) {
        if self.owns_terminal {
            restore_terminal();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::{Duration, Instant};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors that we then own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn hub_with(scrollback: usize, backlog: usize) -> ConsoleHub {
        ConsoleHub::new(ConsoleConfig {
            scrollback_bytes: scrollback,
            reader_backlog: backlog,
            ..ConsoleConfig::default()
        })
        .unwrap()
    }

    fn waker() -> Arc<EventFd> {
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn defaults_meet_the_spec() {
        let c = ConsoleConfig::default();
        assert!(c.scrollback_bytes >= 1024 * 1024);
        assert_eq!(c.reader_backlog, 256 * 1024);
    }

    #[test]
    fn scrollback_keeps_the_last_bytes_and_counts_all() {
        let hub = hub_with(10, 100);
        hub.output(b"0123456789");
        hub.output(b"abc");
        assert_eq!(hub.scrollback(), b"3456789abc");
        hub.output(b"this is longer than ten");
        assert_eq!(hub.scrollback(), b"r than ten");
        assert_eq!(hub.scrollback_tail(3), b"ten");
        assert_eq!(hub.scrollback_tail(100), b"r than ten");
        assert_eq!(hub.total_output(), 10 + 3 + 23);
    }

    #[test]
    fn reader_gets_live_output_and_is_woken_once_per_batch() {
        let hub = hub_with(100, 100);
        hub.output(b"before");
        let w = waker();
        let (reader, replay) = hub.attach(w.clone(), true);
        assert_eq!(replay, b"before");
        assert!(w.read().is_err(), "no wake-up without output");
        hub.output(b"one");
        hub.output(b"two");
        assert_eq!(w.read().unwrap(), 1);
        assert_eq!(reader.take(4), b"onet");
        assert_eq!(reader.take(100), b"wo");
        assert!(reader.is_empty());
        hub.output(b"three");
        assert_eq!(w.read().unwrap(), 1);
        assert_eq!(reader.take(100), b"three");
    }

    #[test]
    fn slow_reader_loses_oldest_bytes_and_gets_a_notice() {
        let hub = hub_with(1000, 8);
        let (reader, _) = hub.attach(waker(), false);
        hub.output(b"0123456789");
        hub.output(b"ab");
        let got = reader.take(100);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "\r\n[vmm: 4 bytes of console output dropped]\r\n456789ab"
        );
        hub.output(b"x");
        assert_eq!(reader.take(100), b"x", "the notice is delivered once");
        assert_eq!(hub.scrollback(), b"0123456789abx");
    }

    #[test]
    fn replay_and_live_output_neither_lose_nor_repeat_bytes() {
        let hub = hub_with(1 << 20, 1 << 20);
        let writer = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                for i in 0..20_000u32 {
                    hub.output(format!("{i}\n").as_bytes());
                }
            })
        };
        std::thread::sleep(Duration::from_millis(2));
        let (reader, replay) = hub.attach(waker(), true);
        writer.join().unwrap();
        let mut all = replay;
        all.extend(reader.take(usize::MAX));
        let expected: String = (0..20_000u32).map(|i| format!("{i}\n")).collect();
        assert_eq!(String::from_utf8(all).unwrap(), expected);
    }

    #[test]
    fn dropped_reader_detaches() {
        let hub = hub_with(10, 10);
        let (reader, _) = hub.attach(waker(), false);
        let (_r2, _) = hub.attach(waker(), false);
        assert_eq!(hub.reader_count(), 2);
        drop(reader);
        assert_eq!(hub.reader_count(), 1);
    }

    #[test]
    fn output_with_a_stuck_reader_never_blocks() {
        let hub = hub_with(1 << 20, 256 * 1024);
        let (reader, _) = hub.attach(waker(), false);
        let start = Instant::now();
        let chunk = vec![b'x'; 4096];
        for _ in 0..(64 * 1024 * 1024 / chunk.len()) {
            hub.output(&chunk);
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(reader.pending() <= 256 * 1024);
    }

    #[test]
    fn boot_marker_goes_to_scrollback_and_readers() {
        let hub = hub_with(1000, 1000);
        let (reader, _) = hub.attach(waker(), false);
        hub.mark_boot(2, "reset: watchdog");
        let text = String::from_utf8(hub.scrollback()).unwrap();
        assert!(
            text.starts_with("\r\n--- vmm: boot 2 (reset: watchdog) at "),
            "{text}"
        );
        assert!(text.ends_with("Z ---\r\n"));
        assert_eq!(reader.take(1000), text.as_bytes());
        let fixed = boot_marker(
            2,
            "reset: watchdog",
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_832_999),
        );
        assert_eq!(
            fixed,
            "\r\n--- vmm: boot 2 (reset: watchdog) at 2026-11-28T02:29:59Z ---\r\n"
        );
    }

    fn temp_path(name: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("vmm-console-{}-{n}-{name}", std::process::id()))
    }

    #[test]
    fn log_file_is_appended_created_0640_and_gets_markers() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("log");
        std::fs::write(&path, b"old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        {
            let hub = ConsoleHub::new(ConsoleConfig {
                log_path: Some(path.clone()),
                ..ConsoleConfig::default()
            })
            .unwrap();
            hub.output(b"hello ");
            hub.mark_boot(1, "power-on");
            hub.output(b"world");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("old\nhello \r\n--- vmm: boot 1 (power-on) at "),
            "{text}"
        );
        assert!(text.ends_with("---\r\nworld"));
        std::fs::remove_file(&path).unwrap();

        let fresh = temp_path("fresh");
        drop(
            ConsoleHub::new(ConsoleConfig {
                log_path: Some(fresh.clone()),
                ..ConsoleConfig::default()
            })
            .unwrap(),
        );
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        // The umask may only remove bits.
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
        std::fs::remove_file(&fresh).unwrap();
    }

    #[test]
    fn unopenable_log_is_a_clear_error() {
        let err = ConsoleHub::new(ConsoleConfig {
            log_path: Some("/nonexistent-dir/x.log".into()),
            ..ConsoleConfig::default()
        })
        .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot open console log /nonexistent-dir/x.log:"));
    }

    #[test]
    fn input_is_bounded_signalled_and_taken_in_order() {
        let hub = ConsoleHub::new(ConsoleConfig {
            input_capacity: 8,
            ..ConsoleConfig::default()
        })
        .unwrap();
        assert!(!hub.has_input());
        assert_eq!(hub.push_input(b"hello"), 5);
        assert_eq!(hub.input_eventfd().read().unwrap(), 1);
        let w = waker();
        assert_eq!(hub.push_input_or_notify(b" world", &w), 3);
        assert!(
            hub.input_eventfd().read().is_err(),
            "signalled on the empty edge only"
        );
        assert!(w.read().is_err());
        assert_eq!(hub.take_input(3), b"hel");
        assert_eq!(w.read().unwrap(), 1, "waiter told that there is room");
        assert_eq!(hub.take_input(100), b"lo wo");
        assert!(!hub.has_input());
        hub.ack_input_event();
    }

    #[test]
    fn raw_mode_is_entered_and_restored_on_a_pty() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty fills two descriptors; the name/termios/winsize pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors we own.
        let (_master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let get = || {
            // SAFETY: termios is plain data filled by tcgetattr.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor and pointer.
            assert_eq!(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) }, 0);
            t
        };
        let before = get();
        assert_ne!(before.c_lflag & libc::ICANON, 0);
        enter_raw_mode(slave.as_raw_fd()).unwrap();
        let raw = get();
        assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        assert_ne!(raw.c_oflag & libc::OPOST, 0, "output processing kept");
        restore_terminal();
        let after = get();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
        restore_terminal(); // idempotent
    }

    #[test]
    fn escape_parser_handles_quit_literal_ctrl_a_and_split_reads() {
        let mut p = EscapeParser::default();
        let mut g = Vec::new();
        assert_eq!(p.feed(b"ab\x01\x01c", &mut g), (None, 5));
        assert_eq!(g, b"ab\x01c");
        g.clear();
        assert_eq!(p.feed(b"z\x01", &mut g), (None, 2));
        assert_eq!(p.feed(b"xrest", &mut g), (Some(EscapeCommand::Quit), 1));
        assert_eq!(g, b"z");
        g.clear();
        assert_eq!(
            p.feed(b"\x01q\x01h!", &mut g),
            (Some(EscapeCommand::Help), 4)
        );
        assert_eq!(g, b"\x01q");
        g.clear();
        assert_eq!(p.feed(b"\x01?", &mut g), (Some(EscapeCommand::Help), 2));
    }

    struct Loop {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Loop {
        fn start<S: MutEventSubscriber + Send + 'static>(sub: S) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut em =
                    EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
                em.add_subscriber(Arc::new(Mutex::new(sub)));
                while !stop2.load(Ordering::SeqCst) {
                    em.run_with_timeout(20).unwrap();
                }
            });
            Loop {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stdio_console_moves_bytes_both_ways_and_quits_on_ctrl_a_x() {
        let hub = hub_with(1 << 16, 1 << 16);
        let quit = QuitRequested::new().unwrap();
        let (in_r, in_w) = pipe();
        let (out_r, out_w) = pipe();
        let console =
            StdioConsole::with_fds(hub.clone(), quit.clone(), Some(in_r), out_w, true).unwrap();
        let _loop = Loop::start(console);

        hub.output(b"guest says hi\r\n");
        let mut out = File::from(out_r);
        let mut got = vec![0u8; 15];
        out.read_exact(&mut got).unwrap();
        assert_eq!(got, b"guest says hi\r\n");

        let mut input = File::from(in_w);
        input.write_all(b"ls\x01\x01\r").unwrap();
        let mut typed = Vec::new();
        wait_for("input", || {
            typed.extend(hub.take_input(100));
            typed.len() >= 4
        });
        assert_eq!(typed, b"ls\x01\r");
        assert!(!quit.is_requested());

        input.write_all(b"\x01").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        input.write_all(b"x").unwrap();
        wait_for("quit", || quit.is_requested());
        assert_eq!(quit.eventfd().read().unwrap(), 1);
        assert!(hub.take_input(100).is_empty());
    }

    #[test]
    fn stdio_console_with_a_stuck_stdout_drops_oldest_and_never_blocks_output() {
        let hub = hub_with(1 << 16, 64 * 1024);
        let quit = QuitRequested::new().unwrap();
        let (out_r, out_w) = pipe();
        let console = StdioConsole::with_fds(hub.clone(), quit, None, out_w, false).unwrap();
        let _loop = Loop::start(console);
        let start = Instant::now();
        let chunk = vec![b'y'; 1024];
        for _ in 0..(16 * 1024) {
            hub.output(&chunk);
        }
        hub.output(b"END");
        assert!(start.elapsed() < Duration::from_secs(10));
        // Now drain the pipe: we see a drop notice and the final bytes.
        let mut out = File::from(out_r);
        set_nonblocking(out.as_raw_fd()).unwrap();
        let mut all = Vec::new();
        wait_for("the end of the output", || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            all.ends_with(b"END")
        });
        let text = String::from_utf8_lossy(&all);
        assert!(text.contains("bytes of console output dropped]"));
        assert!(all.len() < 1024 * 1024);
    }

    #[test]
    fn stdio_console_input_waits_for_room_instead_of_dropping() {
        let hub = ConsoleHub::new(ConsoleConfig {
            input_capacity: 4,
            ..ConsoleConfig::default()
        })
        .unwrap();
        let quit = QuitRequested::new().unwrap();
        let (in_r, in_w) = pipe();
        let (_out_r, out_w) = pipe();
        let console = StdioConsole::with_fds(hub.clone(), quit, Some(in_r), out_w, false).unwrap();
        let _loop = Loop::start(console);
        File::from(in_w).write_all(b"0123456789").unwrap();
        let mut got = Vec::new();
        wait_for("all input", || {
            got.extend(hub.take_input(3));
            got.len() == 10
        });
        assert_eq!(got, b"0123456789");
    }
}
