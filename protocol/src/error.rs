//! Errors of request parsing; their messages are sent to clients verbatim.

/// Why a request line was rejected. `Display` gives the message the server sends back in
/// `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The line is JSON but not an object.
    #[error("a request must be a JSON object like {{\"cmd\":\"status\"}}")]
    NotAnObject,
    /// The object has no `cmd` member.
    #[error("missing 'cmd' in request")]
    MissingCommand,
    /// `cmd` is not a string.
    #[error("'cmd' must be a string")]
    CommandNotString,
    /// `cmd` names no command.
    #[error("unknown command '{0}'")]
    UnknownCommand(String),
    /// A required argument is absent.
    #[error("missing argument '{arg}' for {cmd}")]
    MissingArgument {
        /// The command.
        cmd: &'static str,
        /// The argument name.
        arg: &'static str,
    },
    /// An argument has the wrong type or value.
    #[error("invalid argument '{arg}' for {cmd}: expected {expected}")]
    InvalidArgument {
        /// The command.
        cmd: &'static str,
        /// The argument name.
        arg: &'static str,
        /// What would have been accepted.
        expected: String,
    },
    /// An argument the command does not take (often a typo).
    #[error("unknown argument '{arg}' for {cmd}")]
    UnknownArgument {
        /// The command.
        cmd: &'static str,
        /// The argument name as sent.
        arg: String,
    },
    /// The line is not UTF-8.
    #[error("request is not valid UTF-8")]
    InvalidUtf8,
    /// The line exceeds the length limit; it was discarded.
    #[error("request line longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
}

/// What kind of failure an error response reports: the `"code"` beside
/// `"error"` in `{"ok":false,"error":"...","code":"invalid_state"}`, for
/// programs (the message is for people and may change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request line itself is wrong: not JSON, an unknown command or
    /// argument, a bad value, too long. Sending it again will not help.
    BadRequest,
    /// A valid request the VM's current state does not allow (pausing a
    /// stopped VM, `sysrq` while paused): it may succeed later.
    InvalidState,
    /// What the request names does not exist (a kernel library entry).
    NotFound,
    /// This peer may not control this VM (or do that).
    Forbidden,
    /// This VM cannot do that: it lacks the device or the setup it needs
    /// (no console, a fixed kernel file instead of a library).
    Unsupported,
    /// The VMM will not take on more now (too many clients, too much
    /// output not yet read): try again later.
    Overloaded,
    /// The host failed to carry it out (a file could not be written).
    HostError,
    /// Called off by another request before it was carried out (a
    /// `migrate` that `migrate-cancel` stopped): nothing of it took effect.
    Cancelled,
    /// A bug in the VMM: the request was not answered properly.
    Internal,
}

impl ErrorCode {
    /// The wire name (`"bad_request"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::HostError => "host_error",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A request that failed: what the server sends as
/// `{"ok":false,"error":MESSAGE,"code":CODE}` and what a client reads back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The kind of failure; `None` from a VMM older than error codes.
    pub code: Option<ErrorCode>,
    /// One line for people.
    pub message: String,
}

impl ControlError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidState, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<ProtocolError> for ControlError {
    fn from(e: ProtocolError) -> Self {
        Self::bad_request(e.to_string())
    }
}
