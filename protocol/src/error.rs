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
