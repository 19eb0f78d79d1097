//! Ctrl-A escapes on the stdio console.

use super::*;

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
