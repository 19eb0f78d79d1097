//! Running one parsed command line against a VM.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use protocol::{
    ConsoleAttached, KernelList, KernelSelection, LogInfo, Request, StatusInfo, StopOutcome,
    VmState, WatchdogInfo, DEFAULT_STOP_TIMEOUT_S,
};

use crate::command::{self, Command, Line};
use crate::conn::{Conn, QUICK_TIMEOUT};
use crate::console::{self, End, Input};
use crate::discovery::{self, PROBE_TIMEOUT};
use crate::error::ShellError;
use crate::format::{self, ListRow, Style};
use crate::term;

/// Asks the user a yes/no question.
pub trait Confirm {
    /// `Ok(true)` for yes; `Err` when nobody can be asked.
    fn confirm(&mut self, question: &str) -> Result<bool, ShellError>;
}

/// One-shot mode: asks on the terminal if stdin is one, else refuses.
#[derive(Debug, Default)]
pub struct StdinConfirm;

impl Confirm for StdinConfirm {
    fn confirm(&mut self, question: &str) -> Result<bool, ShellError> {
        if !term::isatty(libc::STDIN_FILENO) {
            return Err(ShellError::usage(format!(
                "{question} needs confirmation, and stdin is not a terminal to ask on: add -y"
            )));
        }
        let mut err = std::io::stderr();
        write!(err, "{question} [y/N] ")?;
        err.flush()?;
        let answer = term::read_stdin_line()?;
        Ok(is_yes(answer.as_deref().unwrap_or("")))
    }
}

/// Whether an answer means yes.
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// The shell's state across commands.
#[derive(Debug)]
pub struct Session {
    /// Where the VMs' directories are.
    pub run_dir: PathBuf,
    /// Colour for stdout.
    pub out_style: Style,
    /// Colour for stderr.
    pub err_style: Style,
    /// The interactive shell (prompt) rather than one command.
    pub interactive: bool,
    /// The VM commands act on when none is named (interactive `use`).
    pub selected: Option<String>,
}

/// Prints a progress or informational message on stderr (never fails the command).
fn note(msg: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "{msg}");
}

impl Session {
    /// The VM a command acts on: named on the line, else selected, else the only one.
    pub fn target(&self, line: &Line) -> Result<String, ShellError> {
        if let Some(vm) = &line.vm {
            return discovery::vm_name(&self.run_dir, vm);
        }
        if let Some(vm) = &self.selected {
            return Ok(vm.clone());
        }
        let found = discovery::discover(&self.run_dir, PROBE_TIMEOUT)?;
        match found.as_slice() {
            [only] => Ok(only.name.clone()),
            [] => Err(ShellError::failed(format!(
                "no VMs available to you under {}",
                self.run_dir.display()
            ))),
            many => {
                let names: Vec<&str> = many.iter().map(|f| f.name.as_str()).collect();
                let hint = if self.interactive {
                    format!("select one with `use {}`", names[0])
                } else {
                    format!("name one: vmm-shell {} COMMAND", names[0])
                };
                Err(ShellError::usage(format!(
                    "you have {} VMs ({}); {hint}",
                    names.len(),
                    names.join(", ")
                )))
            }
        }
    }

    /// Runs one command line, writing results to `out`.
    pub fn run(
        &mut self,
        line: &Line,
        confirm: &mut dyn Confirm,
        out: &mut dyn Write,
    ) -> Result<(), ShellError> {
        match &line.command {
            Command::Help(topic) => return self.help(topic.as_deref(), out),
            Command::List => return self.list(line.json, out),
            Command::Use(vm) => return self.use_vm(vm, out),
            Command::Exit => return Ok(()),
            _ => {}
        }
        let vm = self.target(line)?;
        let mut conn = Conn::connect(&self.run_dir, &vm)?;
        let json = line.json;
        match &line.command {
            Command::Status => {
                let answer = conn.call(&Request::Status, Some(QUICK_TIMEOUT))?;
                if json {
                    return print_json(out, &answer.raw);
                }
                let status: StatusInfo = answer.decode(&vm)?;
                write!(out, "{}", format::status(&status, self.out_style))?;
            }
            Command::Start => simple(&mut conn, Request::Start, json, "started", out)?,
            Command::Pause => simple(&mut conn, Request::Pause, json, "paused", out)?,
            Command::Sysrq(key) => simple(
                &mut conn,
                Request::Sysrq { key: key.clone() },
                json,
                "SysRq key pressed",
                out,
            )?,
            Command::Resume => simple(&mut conn, Request::Resume, json, "resumed", out)?,
            Command::Reset => simple(&mut conn, Request::Reset, json, "reset", out)?,
            Command::Halt => {
                if !line.yes {
                    let question = format!("Power off {vm} now, without a clean shutdown?");
                    let question = if self.interactive || term::isatty(libc::STDIN_FILENO) {
                        question
                    } else {
                        format!("halt (hard power-off of {vm})")
                    };
                    if !confirm.confirm(&question)? {
                        return Err(ShellError::failed("halt cancelled"));
                    }
                }
                simple(&mut conn, Request::Poweroff, json, "powered off", out)?;
            }
            Command::Shutdown { timeout_s } => {
                self.stop(&mut conn, false, *timeout_s, json, out)?;
            }
            Command::Reboot { timeout_s } => {
                self.stop(&mut conn, true, *timeout_s, json, out)?;
            }
            Command::Console => self.console(conn, out)?,
            Command::Log { follow, bytes } => self.log(conn, *follow, *bytes, json, out)?,
            Command::KernelList | Command::KernelShow => {
                let answer = conn.call(&Request::Kernels, Some(QUICK_TIMEOUT))?;
                if json {
                    return print_json(out, &answer.raw);
                }
                let kernels: KernelList = answer.decode(&vm)?;
                let text = if line.command == Command::KernelList {
                    format::kernels(&kernels, self.out_style)
                } else {
                    format::kernel_show(&kernels, self.out_style)
                };
                write!(out, "{text}")?;
            }
            Command::KernelSet(name) => self.kernel_set(conn, name, json, confirm, out)?,
            Command::WatchdogShow => {
                let answer = conn.call(&Request::Watchdog, Some(QUICK_TIMEOUT))?;
                if json {
                    return print_json(out, &answer.raw);
                }
                let w: WatchdogInfo = answer.decode(&vm)?;
                write!(out, "{}", format::watchdog(&w, self.out_style))?;
            }
            Command::WatchdogAction(action) => {
                let answer = conn.call(
                    &Request::SetWatchdog { action: *action },
                    Some(QUICK_TIMEOUT),
                )?;
                if json {
                    return print_json(out, &answer.raw);
                }
                writeln!(
                    out,
                    "{vm}: when the watchdog expires, the VMM will now {}.",
                    format::watchdog_action(*action)
                )?;
                if let Ok(w) = answer.decode::<WatchdogInfo>(&vm) {
                    write!(out, "{}", format::watchdog(&w, self.out_style))?;
                }
            }
            Command::Events => self.events(conn, json, out)?,
            Command::Help(_) | Command::List | Command::Use(_) | Command::Exit => {}
        }
        Ok(())
    }

    fn help(&self, topic: Option<&str>, out: &mut dyn Write) -> Result<(), ShellError> {
        let text = match topic {
            None => command::help_overview(self.interactive),
            Some(t) => command::help_command(t)?,
        };
        write!(out, "{text}")?;
        Ok(())
    }

    fn list(&self, json: bool, out: &mut dyn Write) -> Result<(), ShellError> {
        let found = discovery::discover(&self.run_dir, PROBE_TIMEOUT)?;
        if json {
            let items: Vec<serde_json::Value> = found
                .iter()
                .map(|f| {
                    let status = serde_json::from_str::<serde_json::Value>(&f.raw)
                        .unwrap_or(serde_json::Value::Null);
                    serde_json::json!({
                        "vm": f.name,
                        "socket": self.run_dir.join(&f.name).join(discovery::SOCKET_NAME),
                        "status": status,
                    })
                })
                .collect();
            writeln!(out, "{}", serde_json::Value::Array(items))?;
            return Ok(());
        }
        if found.is_empty() {
            writeln!(
                out,
                "No VMs available to you under {}.",
                self.run_dir.display()
            )?;
            return Ok(());
        }
        let rows: Vec<ListRow> = found
            .into_iter()
            .map(|f| ListRow {
                name: f.name,
                status: f.status,
            })
            .collect();
        write!(
            out,
            "{}",
            format::list(&rows, self.selected.as_deref(), self.out_style)
        )?;
        Ok(())
    }

    fn use_vm(&mut self, vm: &str, out: &mut dyn Write) -> Result<(), ShellError> {
        if !self.interactive {
            return Err(ShellError::usage(
                "`use` selects a VM in the interactive shell; name the VM instead: \
                 vmm-shell VM COMMAND",
            ));
        }
        let vm = discovery::vm_name(&self.run_dir, vm)?;
        // Only select a VM that lets us in.
        let mut conn = Conn::connect(&self.run_dir, &vm)?;
        let answer = conn.call(&Request::Status, Some(QUICK_TIMEOUT))?;
        let state = answer
            .decode::<StatusInfo>(&vm)
            .map(|s| format!(" ({})", self.out_style.state(s.state)))
            .unwrap_or_default();
        writeln!(out, "Selected {vm}{state}.")?;
        self.selected = Some(vm);
        Ok(())
    }

    fn stop(
        &self,
        conn: &mut Conn,
        reboot: bool,
        timeout_s: Option<u64>,
        json: bool,
        out: &mut dyn Write,
    ) -> Result<(), ShellError> {
        let vm = conn.vm().to_string();
        let secs = timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S);
        let request = if reboot {
            Request::Reboot { timeout_s }
        } else {
            Request::Shutdown { timeout_s }
        };
        if !json && term::isatty(libc::STDERR_FILENO) {
            let (what, hard) = if reboot {
                ("reboot", "reset")
            } else {
                ("shut down", "powered off")
            };
            note(&format!(
                "Asked {vm} to {what}; waiting up to {secs} s before it is {hard} (Ctrl-C \
                 stops waiting)..."
            ));
        }
        // The VMM answers when the guest complied or the hard action was taken.
        let wait = Duration::from_secs(secs) + Duration::from_secs(30);
        let answer = conn.call(&request, Some(wait))?;
        if json {
            return print_json(out, &answer.raw);
        }
        let outcome: StopOutcome = answer.decode(&vm)?;
        writeln!(
            out,
            "{}",
            format::stop_outcome(&vm, reboot, &outcome, self.out_style)
        )?;
        Ok(())
    }

    fn console(&self, mut conn: Conn, out: &mut dyn Write) -> Result<(), ShellError> {
        let vm = conn.vm().to_string();
        let answer = conn.call(&Request::Console { replay: true }, Some(QUICK_TIMEOUT))?;
        // Only the reply's shape is checked; the byte count is informational.
        let _: Option<ConsoleAttached> = answer.decode(&vm).ok();
        note(&self.err_style.dim(&format!(
            "Connected to the console of {vm}. Press Ctrl-] to detach."
        )));
        let (stream, first) = conn.into_raw();
        let end = console::attach(stream, &first, 0, Input::Forward, &vm, out)?;
        match end {
            End::Detached => note(&self.err_style.dim(&format!("\r\nDetached from {vm}."))),
            End::InputClosed => {
                if term::isatty(libc::STDIN_FILENO) {
                    note(&format!("\r\nInput closed; detached from {vm}."));
                }
            }
            End::Interrupted => note(&format!("\nDetached from {vm}.")),
        }
        Ok(())
    }

    fn log(
        &self,
        mut conn: Conn,
        follow: bool,
        bytes: Option<u64>,
        json: bool,
        out: &mut dyn Write,
    ) -> Result<(), ShellError> {
        let vm = conn.vm().to_string();
        if !follow {
            let answer = conn.call(&Request::Log { bytes }, Some(QUICK_TIMEOUT))?;
            if json {
                return print_json(out, &answer.raw);
            }
            let log: LogInfo = answer.decode(&vm)?;
            out.write_all(log.data.as_bytes())?;
            if !log.data.is_empty() && !log.data.ends_with('\n') && self.interactive {
                writeln!(out)?;
            }
            return Ok(());
        }
        if json {
            return Err(ShellError::usage(
                "log --follow prints the raw console; --json does not apply (use `log --json` \
                 or `events --json`)",
            ));
        }
        let answer = conn.call(&Request::Console { replay: true }, Some(QUICK_TIMEOUT))?;
        let replay = answer
            .decode::<ConsoleAttached>(&vm)
            .map(|a| a.replay_bytes)
            .unwrap_or(0);
        let skip = bytes.map(|b| replay.saturating_sub(b)).unwrap_or(0);
        if term::isatty(libc::STDIN_FILENO) {
            note(&self.err_style.dim(&format!(
                "Following the console of {vm}. Press Ctrl-C, Ctrl-] or q to stop."
            )));
        }
        let (stream, first) = conn.into_raw();
        let end = console::attach(stream, &first, skip, Input::StopKeysOnly, &vm, out)?;
        if end != End::InputClosed && term::isatty(libc::STDIN_FILENO) {
            note("\r");
        }
        Ok(())
    }

    fn kernel_set(
        &self,
        mut conn: Conn,
        name: &str,
        json: bool,
        confirm: &mut dyn Confirm,
        out: &mut dyn Write,
    ) -> Result<(), ShellError> {
        let vm = conn.vm().to_string();
        let answer = conn.call(
            &Request::SetKernel {
                name: name.to_string(),
            },
            Some(QUICK_TIMEOUT),
        )?;
        if json {
            return print_json(out, &answer.raw);
        }
        let sel: KernelSelection = answer.decode(&vm)?;
        let now = sel
            .current
            .as_deref()
            .map(|c| format!(" (running now: {c})"))
            .unwrap_or_default();
        writeln!(
            out,
            "{vm} will boot kernel {} at its next boot{now}. It takes effect at the next boot.",
            self.out_style.bold(&sel.next)
        )?;
        if sel.current.as_deref() == Some(sel.next.as_str()) {
            return Ok(());
        }
        let state = conn
            .call(&Request::Status, Some(QUICK_TIMEOUT))
            .and_then(|a| a.decode::<StatusInfo>(&vm))
            .map(|s| s.state)
            .ok();
        if state == Some(VmState::Stopped) {
            writeln!(out, "{vm} is stopped: `start` boots it with {}.", sel.next)?;
            return Ok(());
        }
        if !(self.interactive && term::isatty(libc::STDIN_FILENO)) {
            writeln!(out, "To switch now, reboot it: vmm-shell {vm} reboot")?;
            return Ok(());
        }
        if confirm.confirm(&format!("Reboot {vm} now to boot {}?", sel.next))? {
            out.flush()?;
            self.stop(&mut conn, true, None, false, out)?;
        } else {
            writeln!(out, "Not rebooting; `reboot` switches when you are ready.")?;
        }
        Ok(())
    }

    fn events(&self, mut conn: Conn, json: bool, out: &mut dyn Write) -> Result<(), ShellError> {
        let vm = conn.vm().to_string();
        conn.call(&Request::Subscribe, Some(QUICK_TIMEOUT))?;
        if !json && term::isatty(libc::STDERR_FILENO) {
            note(
                &self
                    .err_style
                    .dim(&format!("Waiting for events from {vm}; Ctrl-C stops.")),
            );
        }
        loop {
            let (raw, line) = match conn.next_line(None) {
                Ok(Some(item)) => item,
                Ok(None) => continue,
                Err(ShellError::Interrupted) => return Ok(()),
                Err(e) => return Err(e),
            };
            if json {
                writeln!(out, "{raw}")?;
            } else if let Some(text) = format::event(&line, self.out_style) {
                writeln!(out, "{text}")?;
            }
            out.flush()?;
        }
    }
}

fn print_json(out: &mut dyn Write, raw: &str) -> Result<(), ShellError> {
    writeln!(out, "{raw}")?;
    Ok(())
}

fn simple(
    conn: &mut Conn,
    request: Request,
    json: bool,
    done: &str,
    out: &mut dyn Write,
) -> Result<(), ShellError> {
    let answer = conn.call(&request, Some(QUICK_TIMEOUT))?;
    if json {
        return print_json(out, &answer.raw);
    }
    writeln!(out, "{}: {done}.", conn.vm())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_answers() {
        for y in ["y", "Y", "yes", " YES \n"] {
            assert!(is_yes(y), "{y:?}");
        }
        for n in ["", "n", "no", "yep", "maybe"] {
            assert!(!is_yes(n), "{n:?}");
        }
    }
}
