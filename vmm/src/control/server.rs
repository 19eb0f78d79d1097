//! The transport layer: the listening socket and every connection, as one event-manager
//! subscriber.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use protocol::{
    parse_request_bytes, ConsoleAttached, LogInfo, ProtocolError, Reply, Request, Response,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::access::{is_allowed, PeerIdentity};
use super::broadcaster::EventBroadcaster;
use super::connection::{Connection, Mode, ReadOutcome, CONSOLE_CHUNK, READ_CHUNK};
use super::responder::{Responder, Shared};
use super::socket::{self, SocketFile};
use super::{ControlConfig, ControlError, ControlHandler, ControlLimits};
use crate::console::ConsoleHub;

const TOKEN_LISTENER: u32 = 0;
const TOKEN_WAKE: u32 = 1;
const TOKEN_CONSOLE_WAKE: u32 = 2;
const FIRST_CONNECTION_TOKEN: u32 = 16;
/// Rounds of pull-and-send per connection and wake-up.
const SERVICE_ROUNDS: usize = 16;

/// Counters for tests and diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Open connections.
    pub connections: usize,
    /// Connections accepted since start (refused ones included).
    pub accepted: u64,
    /// Peers refused by the access check.
    pub refused: u64,
    /// Connections closed because they did not read their events.
    pub slow_disconnects: u64,
    /// Largest input any connection buffered (bytes), a check on the line limit.
    pub max_input_buffered: usize,
}

/// The control server: owns the listening socket and every connection, and registers them all
/// (plus two wake-up eventfds) with its own `EventOps`, telling them apart by data token.
///
/// Add it to the VMM's event manager; it parses request lines (the `protocol` crate), answers
/// `console`, `log` and `subscribe` itself, and hands every other request to the
/// [`ControlHandler`]. Dropping it removes the socket file.
pub struct ControlServer {
    listener: UnixListener,
    socket: SocketFile,
    listener_paused: bool,
    shared: Arc<Shared>,
    console_wake: Arc<EventFd>,
    actions: Actions,
    config: ControlConfig,
    conns: HashMap<u32, Connection>,
    next_token: u32,
    dirty: Vec<u32>,
    read_buf: Vec<u8>,
    stats: ControlStats,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.socket.path())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket (see [`ControlConfig`] for the directory and permissions), subscribes
    /// to `events` for `subscribe`d connections, and serves `console`/`log` from `console`
    /// when given.
    pub fn new(
        config: ControlConfig,
        handler: Box<dyn ControlHandler>,
        events: &EventBroadcaster,
        console: Option<ConsoleHub>,
    ) -> Result<Self, ControlError> {
        let (listener, socket) = socket::bind(&config.path, config.policy.socket_gid)?;
        let shared = Shared::new().map_err(ControlError::EventFd)?;
        let console_wake = Arc::new(
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ControlError::EventFd)?,
        );
        let weak = Arc::downgrade(&shared);
        events.add_listener(move |message| {
            if let Some(shared) = weak.upgrade() {
                shared.push_event(Arc::from(message.to_line()));
            }
        });
        tracing::info!("control socket listening on {}", config.path.display());
        Ok(ControlServer {
            listener,
            socket,
            listener_paused: false,
            actions: Actions {
                handler,
                next_seq: 0,
                hub: console,
                shared: shared.clone(),
                console_wake: console_wake.clone(),
                console_backlog: config.limits.console_backlog,
                max_unsent: config.limits.max_unsent_output,
                unsent_elsewhere: 0,
            },
            shared,
            console_wake,
            config,
            conns: HashMap::new(),
            next_token: FIRST_CONNECTION_TOKEN,
            dirty: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            stats: ControlStats::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Counters.
    pub fn stats(&self) -> ControlStats {
        ControlStats {
            connections: self.conns.len(),
            ..self.stats.clone()
        }
    }

    fn limits(&self) -> &ControlLimits {
        &self.config.limits
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let token = self.next_token;
            self.next_token = self
                .next_token
                .checked_add(1)
                .unwrap_or(FIRST_CONNECTION_TOKEN);
            if !self.conns.contains_key(&token) {
                return token;
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE): stop polling the listener until a
                    // connection closes, instead of spinning on it.
                    tracing::warn!("control socket: accept failed: {e}");
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.pause_listener(ops, true);
                    }
                    return;
                }
            };
            self.stats.accepted += 1;
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!("control socket: {e}");
                continue;
            }
            let peer = match PeerIdentity::of(&stream, &self.config.policy) {
                Ok(peer) => peer,
                Err(e) => {
                    tracing::warn!("control socket: cannot read peer credentials: {e}");
                    continue;
                }
            };
            if !is_allowed(&peer, &self.config.policy) {
                self.stats.refused += 1;
                tracing::warn!(
                    uid = peer.uid,
                    gid = peer.gid,
                    pid = peer.pid,
                    "control socket: peer refused"
                );
                refuse(
                    stream,
                    &protocol::ControlError::new(
                        protocol::ErrorCode::Forbidden,
                        format!(
                            "permission denied: uid {} may not control this VM",
                            peer.uid
                        ),
                    ),
                );
                continue;
            }
            if self.conns.len() >= self.limits().max_connections {
                tracing::warn!("control socket: too many connections; refusing one");
                refuse(
                    stream,
                    &protocol::ControlError::new(
                        protocol::ErrorCode::Overloaded,
                        "too many connections to this VM; try again later",
                    ),
                );
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) = ops.add(Events::with_data(&stream, token, EventSet::IN)) {
                tracing::warn!("control socket: cannot register a connection: {e:?}");
                continue;
            }
            tracing::debug!(uid = peer.uid, pid = peer.pid, token, "control connection");
            self.conns.insert(
                token,
                Connection::new(stream, token, Arc::new(peer), self.config.limits.max_line),
            );
        }
    }

    fn pause_listener(&mut self, ops: &mut EventOps, pause: bool) {
        if self.listener_paused == pause {
            return;
        }
        let set = if pause {
            EventSet::empty()
        } else {
            EventSet::IN
        };
        if ops
            .modify(Events::with_data(&self.listener, TOKEN_LISTENER, set))
            .is_ok()
        {
            self.listener_paused = pause;
        }
    }

    fn connection_event(&mut self, token: u32, set: EventSet) {
        let max_input = &mut self.stats.max_input_buffered;
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        self.dirty.push(token);
        if set.contains(EventSet::ERROR) {
            conn.broken = true;
            return;
        }
        if set.contains(EventSet::HANG_UP) {
            conn.hung_up = true;
        }
        if !set.intersects(EventSet::IN | EventSet::HANG_UP) || conn.read_closed {
            return;
        }
        let buf = &mut self.read_buf;
        // A hung-up peer's data is read to the end now: there will be no further events.
        let rounds = if conn.hung_up { usize::MAX } else { 4 };
        for _ in 0..rounds {
            let want = match conn.mode {
                Mode::Command => !conn.lines.has_line() || conn.hung_up,
                Mode::Console(_) => conn.pending_input.len() < READ_CHUNK || conn.hung_up,
            };
            if !want {
                break;
            }
            match conn.read(buf) {
                Ok(ReadOutcome::Data(n)) => match conn.mode {
                    Mode::Command => {
                        conn.lines.push(&buf[..n]);
                        *max_input = (*max_input).max(conn.lines.buffered_len());
                    }
                    Mode::Console(_) => conn.pending_input.extend_from_slice(&buf[..n]),
                },
                Ok(ReadOutcome::WouldBlock) => break,
                Ok(ReadOutcome::Eof) => {
                    conn.read_closed = true;
                    break;
                }
                Err(_) => {
                    conn.broken = true;
                    break;
                }
            }
        }
    }

    /// Applies answers and events queued by responders and publishers, then serves every
    /// connection that has something to do, until nothing is left.
    fn settle(&mut self, ops: &mut EventOps) {
        let mut touched: Vec<u32> = Vec::new();
        loop {
            let (responses, events, dropped) = self.shared.take();
            if dropped > 0 {
                tracing::warn!("control socket: {dropped} events dropped (event loop busy)");
            }
            for line in &events {
                for conn in self.conns.values_mut() {
                    if !conn.subscribed || conn.is_console() || conn.broken {
                        continue;
                    }
                    conn.queue(line.as_bytes());
                    if conn.out_len() > self.config.limits.max_event_backlog {
                        tracing::warn!(
                            uid = conn.peer.uid,
                            "control socket: subscriber does not read its events; disconnecting"
                        );
                        self.stats.slow_disconnects += 1;
                        conn.broken = true;
                    }
                    self.dirty.push(conn.token);
                }
            }
            for completion in responses {
                if let Some(conn) = self.conns.get_mut(&completion.conn) {
                    if conn.awaiting == Some(completion.seq) {
                        conn.awaiting = None;
                        conn.queue(completion.line.as_bytes());
                        self.dirty.push(conn.token);
                    }
                }
            }
            if self.dirty.is_empty() {
                break;
            }
            let mut tokens = std::mem::take(&mut self.dirty);
            tokens.sort_unstable();
            tokens.dedup();
            for token in &tokens {
                self.service(*token);
            }
            touched.extend(tokens);
        }
        touched.sort_unstable();
        touched.dedup();
        for token in touched {
            self.update(token, ops);
        }
    }

    /// Moves data for one connection until it makes no more progress (or, for a console
    /// that keeps streaming, for a bounded number of rounds: the OUT interest then brings us
    /// back after the other connections had their turn).
    fn service(&mut self, token: u32) {
        self.actions.unsent_elsewhere = self
            .conns
            .iter()
            .filter(|(t, _)| **t != token)
            .map(|(_, c)| c.out_len())
            .sum();
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        for _ in 0..SERVICE_ROUNDS {
            if conn.broken {
                return;
            }
            let mut progress = false;
            match conn.mode {
                Mode::Command => {
                    while conn.ready_for_request() {
                        let Some(line) = conn.lines.next_line() else {
                            break;
                        };
                        progress = true;
                        let request = match line {
                            Err(frame) => Err(ProtocolError::from(frame)),
                            Ok(line) if line.iter().all(u8::is_ascii_whitespace) => continue,
                            Ok(line) => parse_request_bytes(&line),
                        };
                        match request {
                            Ok(request) => self.actions.dispatch(conn, request),
                            Err(e) => conn.queue(Response::error_line(&e.into()).as_bytes()),
                        }
                    }
                }
                Mode::Console(_) => {
                    if !conn.pending_input.is_empty() {
                        if let Some(hub) = &self.actions.hub {
                            let n =
                                hub.push_input_or_notify(&conn.pending_input, &self.console_wake);
                            conn.pending_input.drain(..n);
                            progress |= n > 0;
                        }
                    }
                    let room = CONSOLE_CHUNK.saturating_sub(conn.out_len());
                    if room > 0 {
                        progress |= conn.pull_console(room) > 0;
                    }
                }
            }
            match conn.flush() {
                Ok(n) => progress |= n > 0,
                Err(_) => conn.broken = true,
            }
            if !progress {
                return;
            }
        }
    }

    /// Re-registers interest, or closes a finished connection.
    fn update(&mut self, token: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.should_close() {
            if let Some(conn) = self.conns.remove(&token) {
                let _ = ops.remove(Events::with_data(&conn.stream, token, conn.registered));
                tracing::debug!(token, "control connection closed");
            }
            self.pause_listener(ops, false);
            return;
        }
        let want = conn.desired_interest();
        if want != conn.registered
            && ops
                .modify(Events::with_data(&conn.stream, token, want))
                .is_ok()
        {
            conn.registered = want;
        }
    }
}

/// The actions side of the server: what executes a parsed request.
struct Actions {
    handler: Box<dyn ControlHandler>,
    next_seq: u64,
    hub: Option<ConsoleHub>,
    shared: Arc<Shared>,
    console_wake: Arc<EventFd>,
    console_backlog: usize,
    /// Most bytes of answers all connections together may hold unsent (see `dispatch`).
    max_unsent: usize,
    /// Unsent answer bytes of the other connections, set before a connection is served.
    unsent_elsewhere: usize,
}

impl Actions {
    /// Executes one parsed request: the connection-level ones here, the rest by the handler.
    fn dispatch(&mut self, conn: &mut Connection, request: Request) {
        let no_console = || {
            Response::error_line(&protocol::ControlError::new(
                protocol::ErrorCode::Unsupported,
                "this VM has no console",
            ))
        };
        match request {
            Request::Subscribe => {
                conn.subscribed = true;
                conn.queue(Reply::Done.to_line().as_bytes());
            }
            Request::Log { bytes } => {
                let Some(hub) = &self.hub else {
                    conn.queue(no_console().as_bytes());
                    return;
                };
                let max = bytes.map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX));
                let total_bytes = hub.total_output();
                let data = hub.scrollback_tail(max);
                let reply = Reply::Log(LogInfo {
                    bytes: data.len() as u64,
                    data: String::from_utf8_lossy(&data).into_owned(),
                    total_bytes,
                })
                .to_line();
                // A `log` answer can be megabytes (a scrollback of control characters is six
                // bytes each in JSON). Clients that ask and never read would otherwise pin
                // that much each, times the connection limit.
                let unsent = self.unsent_elsewhere.saturating_add(conn.out_len());
                if unsent.saturating_add(reply.len()) > self.max_unsent {
                    conn.queue(
                        Response::error_line(&protocol::ControlError::new(
                            protocol::ErrorCode::Overloaded,
                            format!(
                                "too much unread output on this VM's control socket ({} KiB); \
                                 read earlier answers, or ask for fewer bytes",
                                unsent / 1024
                            ),
                        ))
                        .as_bytes(),
                    );
                    return;
                }
                conn.queue(reply.as_bytes());
            }
            Request::Console { replay } => {
                let Some(hub) = &self.hub else {
                    conn.queue(no_console().as_bytes());
                    return;
                };
                let (reader, replayed) = hub.attach_with_backlog(
                    self.console_wake.clone(),
                    replay,
                    self.console_backlog,
                );
                let reply = Reply::Console(ConsoleAttached {
                    replay_bytes: replayed.len() as u64,
                });
                conn.queue(reply.to_line().as_bytes());
                conn.queue(&replayed);
                // Whatever the client sent after its request line is console input already.
                conn.pending_input = conn.lines.take_remaining();
                conn.subscribed = false;
                conn.mode = Mode::Console(reader);
                tracing::debug!(uid = conn.peer.uid, "console attached");
            }
            request => {
                let seq = self.next_seq;
                self.next_seq += 1;
                conn.awaiting = Some(seq);
                let responder = Responder::new(
                    self.shared.clone(),
                    conn.token,
                    seq,
                    conn.peer.clone(),
                    request.name(),
                );
                self.handler.execute(request, responder);
            }
        }
    }
}

/// Tells a refused peer why, then closes without resetting the connection.
fn refuse(stream: UnixStream, e: &protocol::ControlError) {
    let line = Response::error_line(e);
    // SAFETY: sending from a live buffer; nonblocking and without SIGPIPE. A fresh socket's
    // buffer has room for one short line; if not, the peer just sees the close.
    unsafe {
        libc::send(
            stream.as_raw_fd(),
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        );
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Unread input at close would turn into ECONNRESET for the peer before it reads our line.
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: reading into a stack buffer of the given length, nonblocking.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                sink.as_mut_ptr().cast(),
                sink.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
    }
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        let registrations = [
            ops.add(Events::with_data(
                &self.listener,
                TOKEN_LISTENER,
                EventSet::IN,
            )),
            ops.add(Events::with_data(
                self.shared.wake_fd(),
                TOKEN_WAKE,
                EventSet::IN,
            )),
            ops.add(Events::with_data(
                &*self.console_wake,
                TOKEN_CONSOLE_WAKE,
                EventSet::IN,
            )),
        ];
        for r in registrations {
            if let Err(e) = r {
                tracing::error!("control socket: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let _dispatching = self.shared.dispatching();
        match events.data() {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_WAKE => self.shared.ack_wake(),
            TOKEN_CONSOLE_WAKE => {
                let _ = self.console_wake.read();
                let consoles = self
                    .conns
                    .values()
                    .filter(|c| c.is_console())
                    .map(|c| c.token);
                self.dirty.extend(consoles);
            }
            token => self.connection_event(token, events.event_set()),
        }
        self.settle(ops);
    }
}
