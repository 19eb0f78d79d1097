//! The control socket: a Unix socket speaking newline-delimited JSON (`docs/protocol.md`).
//!
//! Three layers, Firecracker-style:
//!
//! * **transport** — [`ControlServer`], one `event_manager::MutEventSubscriber` owning the
//!   listening socket, every connection and two wake-up eventfds. Nonblocking throughout: a
//!   client that does not read stops being served (its requests wait) and, if subscribed,
//!   is disconnected once its unsent events exceed a cap; console clients lose their oldest
//!   bytes instead. Every peer is checked with `SO_PEERCRED` ([`is_allowed`]).
//! * **parsing** — the `protocol` crate, pure functions from a line to a typed request.
//! * **actions** — a [`ControlHandler`] the VMM implements; it answers through a
//!   [`Responder`], now or later, from any thread.
//!
//! Wiring, in the VMM thread:
//!
//! ```ignore
//! let events = EventBroadcaster::new(&vm_name);          // clone into vCPU/device code
//! let hub = ConsoleHub::new(console_config)?;             // the UART calls hub.output()
//! let policy = AccessPolicy::resolve(&cfg.allow_users, &cfg.allow_groups)?;
//! let server = ControlServer::new(
//!     ControlConfig::new(cfg.control_path, policy),
//!     Box::new(MyHandler { .. }),                         // impl ControlHandler
//!     &events,
//!     Some(hub.clone()),
//! )?;
//! event_manager.add_subscriber(Arc::new(Mutex::new(server)));
//! // later, anywhere: events.publish(protocol::Event::Reset { cause });
//! ```

mod access;
mod broadcaster;
mod connection;
mod responder;
mod server;
mod socket;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub(crate) use access::lookup_user;
pub use access::{
    is_allowed, peer_cred, supplementary_groups, AccessError, AccessPolicy, PeerIdentity,
};
pub use broadcaster::EventBroadcaster;
pub use responder::Responder;
pub use server::{ControlServer, ControlStats};
pub use socket::{DIR_MODE, SOCKET_MODE};

/// The actions layer: executes typed requests on the VM.
///
/// Called on the VMM thread (inside the event loop) for every request except `console`, `log`
/// and `subscribe`, which the server answers itself. Answer exactly once through `responder`,
/// immediately or later from any thread; until then the connection's further requests wait,
/// so a slow answer (`shutdown`, `reboot`) never reorders responses. `execute` must not block:
/// start long operations and keep the responder.
pub trait ControlHandler: Send {
    /// Executes `request` and answers through `responder`.
    fn execute(&mut self, request: protocol::Request, responder: Responder);
}

/// Per-server limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlLimits {
    /// Simultaneous connections (more are refused with an error line).
    pub max_connections: usize,
    /// Longest request line.
    pub max_line: usize,
    /// Unsent output a subscribed connection may accumulate before it is disconnected.
    pub max_event_backlog: usize,
    /// Console backlog per console connection before the oldest bytes are dropped.
    pub console_backlog: usize,
    /// Unsent answers all connections together may hold; a `log` answer that would pass it
    /// is refused with an error (every other answer is small: see `OUT_HIGH_WATER`).
    pub max_unsent_output: usize,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_connections: 256,
            max_line: protocol::MAX_LINE,
            max_event_backlog: 1024 * 1024,
            console_backlog: crate::console::DEFAULT_READER_BACKLOG,
            max_unsent_output: 16 * 1024 * 1024,
        }
    }
}

/// Where and for whom the server listens.
///
/// The socket gets mode 0660 and the group [`AccessPolicy::socket_gid`]. Its directory, if
/// missing, is created with mode 0750 owned by the VMM's user (root or the operator) and that
/// group (missing ancestors get 0755); an existing directory is left as it is.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Socket path, e.g. `/run/vmm/NAME/control.sock`.
    pub path: PathBuf,
    /// Who may connect.
    pub policy: AccessPolicy,
    /// Limits.
    pub limits: ControlLimits,
}

impl ControlConfig {
    /// A config with default limits.
    pub fn new(path: impl Into<PathBuf>, policy: AccessPolicy) -> Self {
        ControlConfig {
            path: path.into(),
            policy,
            limits: ControlLimits::default(),
        }
    }
}

/// Errors starting the control server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Access configuration.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The socket's directory could not be created.
    #[error("cannot create control socket directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A VMM is already listening on the path.
    #[error("another VMM is already listening on {0}")]
    AlreadyListening(PathBuf),
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Mode or group of the socket could not be set.
    #[error("cannot set the permissions of {path}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}
