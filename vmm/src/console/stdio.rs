//! [`StdioConsole`]: the hub on the VMM's own stdin/stdout, and the quit request.

use super::*;

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
            evt: Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
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

/// How console output reaches the output descriptor.
pub(super) enum Output {
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

pub(super) const TOKEN_INPUT: u32 = 0;
pub(super) const TOKEN_OUTPUT: u32 = 1;
pub(super) const TOKEN_WAKE: u32 = 2;
pub(super) const OUTPUT_CHUNK: usize = 64 * 1024;

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

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
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
pub(super) fn stdout_output() -> Output {
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
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ConsoleError::EventFd)?,
        );
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
