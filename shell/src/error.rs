//! The shell's errors: each prints as one readable line and maps to an exit status.

use std::io;

/// Exit status: the command worked.
pub const EXIT_OK: i32 = 0;
/// Exit status: the command failed (the VMM refused it, the VM is unreachable, ...).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: the command line was wrong (unknown command, bad argument, missing `-y`).
pub const EXIT_USAGE: i32 = 2;
/// Exit status: interrupted by Ctrl-C while waiting for the VMM.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Why a command did not complete. `Display` is the one-line message shown to the user.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The command line is wrong; the message says how to fix it.
    #[error("{0}")]
    Usage(String),
    /// Something failed on this side (no such VM, cannot connect, ...).
    #[error("{0}")]
    Failed(String),
    /// The VMM answered `{"ok":false,"error":...}`.
    #[error("{vm}: {message}")]
    Remote {
        /// The VM.
        vm: String,
        /// The VMM's message, verbatim.
        message: String,
        /// The response line as received, for `--json`.
        raw: String,
    },
    /// The VMM closed the connection or stopped answering mid-conversation.
    #[error("{vm}: {what}")]
    VmmGone {
        /// The VM.
        vm: String,
        /// What happened, e.g. "the VMM closed the connection (did it exit?)".
        what: String,
    },
    /// Ctrl-C while waiting.
    #[error("interrupted")]
    Interrupted,
    /// Writing our own output failed (a closed pipe, a vanished terminal).
    #[error("cannot write output: {0}")]
    Output(io::Error),
}

impl ShellError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ShellError::Usage(_) => EXIT_USAGE,
            ShellError::Interrupted => EXIT_INTERRUPTED,
            _ => EXIT_FAILED,
        }
    }

    /// The error as a response object for `--json`: the VMM's own line where there is one.
    pub fn json_line(&self) -> String {
        match self {
            ShellError::Remote { raw, .. } => raw.trim_end().to_string(),
            other => serde_json::json!({ "ok": false, "error": other.to_string() }).to_string(),
        }
    }

    /// A usage error.
    pub fn usage(msg: impl Into<String>) -> Self {
        ShellError::Usage(msg.into())
    }

    /// A failure.
    pub fn failed(msg: impl Into<String>) -> Self {
        ShellError::Failed(msg.into())
    }
}

/// Converts output errors (`?` on `write!`).
impl From<io::Error> for ShellError {
    fn from(e: io::Error) -> Self {
        ShellError::Output(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_distinguish_usage_failure_and_interrupt() {
        assert_eq!(ShellError::usage("x").exit_code(), EXIT_USAGE);
        assert_eq!(ShellError::failed("x").exit_code(), EXIT_FAILED);
        assert_eq!(ShellError::Interrupted.exit_code(), EXIT_INTERRUPTED);
        let gone = ShellError::VmmGone {
            vm: "a".into(),
            what: "gone".into(),
        };
        assert_eq!(gone.exit_code(), EXIT_FAILED);
        assert_eq!(gone.to_string(), "a: gone");
    }

    #[test]
    fn json_line_keeps_the_vmm_response_or_builds_one() {
        let remote = ShellError::Remote {
            vm: "a".into(),
            message: "nope".into(),
            raw: "{\"ok\":false,\"error\":\"nope\"}\n".into(),
        };
        assert_eq!(remote.json_line(), "{\"ok\":false,\"error\":\"nope\"}");
        assert_eq!(remote.to_string(), "a: nope");
        let v: serde_json::Value =
            serde_json::from_str(&ShellError::failed("no VM named \"x\"").json_line()).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "no VM named \"x\"");
    }
}
