//! Shell commands: the words of one command line → a typed [`Line`], and the help texts.
//! Pure functions, unit-tested.

use protocol::{WatchdogAction, MAX_STOP_TIMEOUT_S};

use crate::error::ShellError;

/// One shell command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `list`: the VMs this user can control.
    List,
    /// `status`.
    Status,
    /// `start`.
    Start,
    /// `halt`: hard power-off.
    Halt,
    /// `shutdown [--timeout SECS]`.
    Shutdown {
        /// Seconds before the hard power-off (the VMM's default when absent).
        timeout_s: Option<u64>,
    },
    /// `reboot [--timeout SECS]`.
    Reboot {
        /// Seconds before the hard reset (the VMM's default when absent).
        timeout_s: Option<u64>,
    },
    /// `reset`: hard reset.
    Reset,
    /// `sysrq KEY`: Alt+SysRq+KEY on the guest keyboard.
    Sysrq(String),
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `console`: attach to the serial console.
    Console,
    /// `log [--follow] [--bytes N]`.
    Log {
        /// Keep printing new console output.
        follow: bool,
        /// Only the last N bytes of the history.
        bytes: Option<u64>,
    },
    /// `kernel list`.
    KernelList,
    /// `kernel show`.
    KernelShow,
    /// `kernel set NAME`.
    KernelSet(String),
    /// `watchdog show`.
    WatchdogShow,
    /// `watchdog action ACTION`.
    WatchdogAction(WatchdogAction),
    /// `events`.
    Events,
    /// `help [COMMAND]`.
    Help(Option<String>),
    /// `use VM` (interactive): select the VM later commands act on.
    Use(String),
    /// `exit` / `quit` (interactive).
    Exit,
}

/// A parsed command line: `[VM] COMMAND [ARGS]` plus the flags any command takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The VM named on the line (`VM COMMAND` or `--vm VM`).
    pub vm: Option<String>,
    /// The command.
    pub command: Command,
    /// `--json`: print the VMM's response objects.
    pub json: bool,
    /// `-y` / `--yes`: do not ask for confirmation.
    pub yes: bool,
}

/// Help for one command.
#[derive(Debug)]
pub struct CommandSpec {
    /// The command word.
    pub name: &'static str,
    /// Arguments, for the usage line.
    pub args: &'static str,
    /// One line for the command list.
    pub summary: &'static str,
    /// More detail for `help COMMAND` (may be empty).
    pub details: &'static str,
    /// Sub-commands or options, for completion.
    pub completions: &'static [&'static str],
    /// Only meaningful in the interactive shell.
    pub interactive_only: bool,
}

/// Every command, in help order.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "list",
        args: "",
        summary: "list the VMs you can control",
        details: "Shows each VM whose control socket lets you in, with its state, uptime and \
                  kernel. VMs of other users are not shown: the operating system and the VMM \
                  decide who may connect.",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "status",
        args: "",
        summary: "show state, uptime, kernel and watchdog",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "start",
        args: "",
        summary: "boot a stopped VM",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "halt",
        args: "[-y]",
        summary: "power off at once (hard, like pulling the plug)",
        details: "The guest gets no chance to shut down cleanly; prefer `shutdown`. Asks for \
                  confirmation unless -y is given; without a terminal to ask on, -y is \
                  required. The VM stays `stopped` until `start`.",
        completions: &["-y"],
        interactive_only: false,
    },
    CommandSpec {
        name: "shutdown",
        args: "[--timeout SECS]",
        summary: "shut down gracefully, power off after a timeout",
        details: "Asks the guest to shut down (Ctrl-Alt-Del / ACPI power button) and waits; \
                  if it has not stopped after the timeout (default 60 s) the VM is powered \
                  off. Says which happened.",
        completions: &["--timeout"],
        interactive_only: false,
    },
    CommandSpec {
        name: "reboot",
        args: "[--timeout SECS]",
        summary: "reboot gracefully, hard reset after a timeout",
        details: "Asks the guest to reboot and waits; if it has not rebooted after the \
                  timeout (default 60 s) the VM is reset. Says which happened.",
        completions: &["--timeout"],
        interactive_only: false,
    },
    CommandSpec {
        name: "reset",
        args: "",
        summary: "hard reset at once (works when the guest hangs)",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "sysrq",
        args: "KEY",
        summary: "press Alt+SysRq+KEY on the guest keyboard (b reboot, o power off, c crash, s sync, u remount ro, l/w/t backtraces; any letter or digit)",
        details: "The guest kernel acts on it by itself, without its user space: \
                  useful when a guest is stuck but its kernel still runs. Keys pressed \
                  before the guest's keyboard driver is up may be lost.",
        completions: &["b", "o", "c", "s", "u", "e", "i"],
        interactive_only: false,
    },
    CommandSpec {
        name: "pause",
        args: "",
        summary: "freeze the guest",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "resume",
        args: "",
        summary: "continue a paused guest",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "console",
        args: "",
        summary: "attach to the serial console (Ctrl-] detaches)",
        details: "Recent console output is replayed first, then you type to the guest. \
                  Press Ctrl-] to detach; the terminal is restored.",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "log",
        args: "[--follow] [--bytes N]",
        summary: "print the console history",
        details: "--follow (-f) keeps printing new output without sending input; stop it \
                  with Ctrl-C (or Ctrl-] on a terminal). --bytes N prints only the last N \
                  bytes.",
        completions: &["--follow", "--bytes"],
        interactive_only: false,
    },
    CommandSpec {
        name: "kernel",
        args: "list | show | set NAME",
        summary: "list, show or choose the kernel",
        details: "`kernel list` shows the kernel library, `kernel show` the kernel running \
                  now and the one for the next boot, `kernel set NAME` chooses the kernel \
                  for the next boot (it takes effect when the VM next boots; the \
                  interactive shell offers to reboot).",
        completions: &["list", "show", "set"],
        interactive_only: false,
    },
    CommandSpec {
        name: "watchdog",
        args: "show | action ACTION",
        summary: "show the watchdog or set its expiry action",
        details: "The action is what the VMM does when the guest's watchdog expires: reset \
                  (hard reset, the default), poweroff, pause, shutdown (graceful, then power \
                  off) or none (only report it).",
        completions: &["show", "action"],
        interactive_only: false,
    },
    CommandSpec {
        name: "events",
        args: "",
        summary: "print events (state changes, resets, panics) until Ctrl-C",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "help",
        args: "[COMMAND]",
        summary: "list commands, or explain one",
        details: "",
        completions: &[],
        interactive_only: false,
    },
    CommandSpec {
        name: "use",
        args: "VM",
        summary: "select the VM later commands act on",
        details: "",
        completions: &[],
        interactive_only: true,
    },
    CommandSpec {
        name: "exit",
        args: "",
        summary: "leave the shell (also `quit`, Ctrl-D)",
        details: "",
        completions: &[],
        interactive_only: true,
    },
];

/// Flags every command accepts.
pub const COMMON_FLAGS: &[&str] = &["--json", "--help"];

/// The spec of a command word (aliases included).
pub fn spec(word: &str) -> Option<&'static CommandSpec> {
    let word = match word {
        "ls" => "list",
        "poweroff" => "halt",
        "quit" => "exit",
        "?" => "help",
        other => other,
    };
    COMMANDS.iter().find(|c| c.name == word)
}

/// Whether `word` is a command (or an alias of one).
pub fn is_command(word: &str) -> bool {
    spec(word).is_some()
}

/// Parses the words of one command line.
///
/// The first word is the command if it is one; otherwise it names the VM and the command
/// follows. (`--vm NAME` names a VM that is called like a command.) `--json`, `-y`/`--yes`,
/// `--vm NAME` and `--help` may appear anywhere; `--` ends them.
pub fn parse_line(words: &[String]) -> Result<Line, ShellError> {
    let mut json = false;
    let mut yes = false;
    let mut help = false;
    let mut vm: Option<String> = None;
    let mut rest: Vec<&str> = Vec::new();
    let mut iter = words.iter();
    while let Some(word) = iter.next() {
        match word.as_str() {
            "--json" => json = true,
            "-y" | "--yes" => yes = true,
            "-h" | "--help" => help = true,
            "--vm" => {
                let name = iter
                    .next()
                    .ok_or_else(|| ShellError::usage("--vm needs a VM name"))?;
                vm = Some(name.clone());
            }
            s if s.starts_with("--vm=") => vm = Some(s["--vm=".len()..].to_string()),
            "--" => {
                rest.extend(iter.by_ref().map(String::as_str));
            }
            other => rest.push(other),
        }
    }
    let mut rest = rest.into_iter();
    let Some(first) = rest.next() else {
        if help {
            return Ok(Line {
                vm,
                command: Command::Help(None),
                json,
                yes,
            });
        }
        return Err(match vm {
            Some(vm) => ShellError::usage(format!("missing command for VM '{vm}' (try `help`)")),
            None => ShellError::usage("missing command (try `help`)"),
        });
    };
    let (cmd_word, args): (&str, Vec<&str>) = if is_command(first) || vm.is_some() {
        (first, rest.collect())
    } else {
        vm = Some(first.to_string());
        match rest.next() {
            Some(cmd) => (cmd, rest.collect()),
            None if help => {
                return Ok(Line {
                    vm,
                    command: Command::Help(None),
                    json,
                    yes,
                })
            }
            None => {
                return Err(ShellError::usage(format!(
                    "unknown command '{first}' (try `help`; to act on a VM named so, add a \
                     command: `{first} status`)"
                )))
            }
        }
    };
    let Some(spec) = spec(cmd_word) else {
        return Err(ShellError::usage(format!(
            "unknown command '{cmd_word}' (try `help`)"
        )));
    };
    let command = if help {
        Command::Help(Some(spec.name.to_string()))
    } else {
        parse_command(spec.name, &args)?
    };
    Ok(Line {
        vm,
        command,
        json,
        yes,
    })
}

fn parse_command(name: &'static str, args: &[&str]) -> Result<Command, ShellError> {
    let no_args = |command: Command| -> Result<Command, ShellError> {
        match args.first() {
            None => Ok(command),
            Some(extra) => Err(unexpected(name, extra)),
        }
    };
    match name {
        "list" => no_args(Command::List),
        "status" => no_args(Command::Status),
        "start" => no_args(Command::Start),
        "halt" => no_args(Command::Halt),
        "reset" => no_args(Command::Reset),
        "pause" => no_args(Command::Pause),
        "sysrq" => match args {
            [key] => Ok(Command::Sysrq((*key).to_string())),
            [] => Err(ShellError::usage(
                "sysrq needs a key: sysrq b|o|c|s|u|e|i|l|w|t|m|0-9 (any letter or digit)",
            )),
            [_, extra, ..] => Err(unexpected(name, extra)),
        },
        "resume" => no_args(Command::Resume),
        "console" => no_args(Command::Console),
        "events" => no_args(Command::Events),
        "exit" => no_args(Command::Exit),
        "shutdown" => Ok(Command::Shutdown {
            timeout_s: parse_timeout(name, args)?,
        }),
        "reboot" => Ok(Command::Reboot {
            timeout_s: parse_timeout(name, args)?,
        }),
        "log" => parse_log(args),
        "kernel" => parse_kernel(args),
        "watchdog" => parse_watchdog(args),
        "help" => match args {
            [] => Ok(Command::Help(None)),
            [topic] => Ok(Command::Help(Some((*topic).to_string()))),
            [_, extra, ..] => Err(unexpected(name, extra)),
        },
        "use" => match args {
            [vm] => Ok(Command::Use((*vm).to_string())),
            [] => Err(ShellError::usage("use needs a VM name: use VM")),
            [_, extra, ..] => Err(unexpected(name, extra)),
        },
        other => Err(ShellError::usage(format!("unknown command '{other}'"))),
    }
}

fn unexpected(cmd: &str, arg: &str) -> ShellError {
    if arg.starts_with('-') {
        ShellError::usage(format!("{cmd}: unknown option '{arg}' (try `help {cmd}`)"))
    } else {
        ShellError::usage(format!(
            "{cmd}: unexpected argument '{arg}' (try `help {cmd}`)"
        ))
    }
}

/// `--opt VALUE` or `--opt=VALUE` at `args[*i]`; advances `i` past it.
fn option_value<'a>(
    cmd: &str,
    opt: &str,
    args: &[&'a str],
    i: &mut usize,
) -> Result<Option<&'a str>, ShellError> {
    let Some(arg) = args.get(*i) else {
        return Ok(None);
    };
    if *arg == opt {
        let value = args
            .get(*i + 1)
            .ok_or_else(|| ShellError::usage(format!("{cmd}: {opt} needs a value")))?;
        *i += 2;
        return Ok(Some(value));
    }
    if let Some(value) = arg.strip_prefix(opt).and_then(|v| v.strip_prefix('=')) {
        *i += 1;
        return Ok(Some(value));
    }
    Ok(None)
}

fn parse_number(cmd: &str, opt: &str, value: &str, max: u64) -> Result<u64, ShellError> {
    let value = value
        .strip_suffix('s')
        .filter(|_| opt == "--timeout")
        .unwrap_or(value);
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ShellError::usage(format!(
            "{cmd}: {opt} needs a whole number from 0 to {max}, not '{value}'"
        ))),
    }
}

fn parse_timeout(cmd: &str, args: &[&str]) -> Result<Option<u64>, ShellError> {
    let mut timeout = None;
    let mut i = 0;
    while i < args.len() {
        if let Some(v) = option_value(cmd, "--timeout", args, &mut i)? {
            timeout = Some(parse_number(cmd, "--timeout", v, MAX_STOP_TIMEOUT_S)?);
        } else {
            return Err(unexpected(cmd, args[i]));
        }
    }
    Ok(timeout)
}

fn parse_log(args: &[&str]) -> Result<Command, ShellError> {
    let mut follow = false;
    let mut bytes = None;
    let mut i = 0;
    while i < args.len() {
        if matches!(args[i], "-f" | "--follow") {
            follow = true;
            i += 1;
        } else if let Some(v) = option_value("log", "--bytes", args, &mut i)? {
            bytes = Some(parse_number("log", "--bytes", v, u64::MAX)?);
        } else {
            return Err(unexpected("log", args[i]));
        }
    }
    Ok(Command::Log { follow, bytes })
}

fn parse_kernel(args: &[&str]) -> Result<Command, ShellError> {
    match args {
        [] | ["show"] => Ok(Command::KernelShow),
        ["list"] => Ok(Command::KernelList),
        ["set", name] => Ok(Command::KernelSet((*name).to_string())),
        ["set"] => Err(ShellError::usage(
            "kernel set needs a kernel name (see `kernel list`)",
        )),
        ["show" | "list" | "set", ..] => Err(ShellError::usage(format!(
            "kernel {}: too many arguments (try `help kernel`)",
            args[0]
        ))),
        [other, ..] => Err(ShellError::usage(format!(
            "kernel: unknown sub-command '{other}': expected list, show or set NAME"
        ))),
    }
}

fn parse_watchdog(args: &[&str]) -> Result<Command, ShellError> {
    match args {
        [] | ["show"] => Ok(Command::WatchdogShow),
        ["action", action] => action
            .parse::<WatchdogAction>()
            .map(Command::WatchdogAction)
            .map_err(|e| ShellError::usage(format!("watchdog action: {e}"))),
        ["action"] => Err(ShellError::usage(format!(
            "watchdog action needs one of {}",
            WatchdogAction::NAMES
        ))),
        ["show" | "action", ..] => Err(ShellError::usage(format!(
            "watchdog {}: too many arguments (try `help watchdog`)",
            args[0]
        ))),
        [other, ..] => Err(ShellError::usage(format!(
            "watchdog: unknown sub-command '{other}': expected show or action ACTION"
        ))),
    }
}

/// `help`: the command list.
pub fn help_overview(interactive: bool) -> String {
    let mut out = String::new();
    if interactive {
        out.push_str("Commands (put a VM name first to act on another VM: `NAME status`):\n");
    } else {
        out.push_str("Usage: vmm-shell [--run-dir DIR] [--json] [VM] COMMAND [ARGS]\n");
        out.push_str("       vmm-shell            (interactive shell)\n");
        out.push_str("       vmm-shell -c \"[VM] COMMAND [ARGS]\"\n\nCommands:\n");
    }
    let width = COMMANDS
        .iter()
        .filter(|c| interactive || !c.interactive_only)
        .map(|c| usage(c).len())
        .max()
        .unwrap_or(0);
    for c in COMMANDS
        .iter()
        .filter(|c| interactive || !c.interactive_only)
    {
        out.push_str(&format!("  {:<width$}  {}\n", usage(c), c.summary));
    }
    out.push_str(
        "\nAny command takes --json (print the VMM's response objects). `help COMMAND` \
         explains one.\n",
    );
    if !interactive {
        out.push_str(
            "VM may be left out when you have exactly one. The run directory is /run/vmm, \
             or $VMM_RUN_DIR, or --run-dir.\nExit status: 0 done, 1 failed, 2 bad command \
             line, 130 interrupted.\n",
        );
    }
    out
}

fn usage(c: &CommandSpec) -> String {
    if c.args.is_empty() {
        c.name.to_string()
    } else {
        format!("{} {}", c.name, c.args)
    }
}

/// `help COMMAND`.
pub fn help_command(word: &str) -> Result<String, ShellError> {
    let c = spec(word)
        .ok_or_else(|| ShellError::usage(format!("help: unknown command '{word}' (try `help`)")))?;
    let mut out = format!("{}\n  {}\n", usage(c), c.summary);
    if !c.details.is_empty() {
        out.push('\n');
        out.push_str(&wrap(c.details, 78, "  "));
    }
    Ok(out)
}

/// Wraps `text` at `width` columns, each line starting with `indent`.
pub fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::from(indent);
    for word in text.split_whitespace() {
        if line.len() > indent.len() && line.len() + 1 + word.len() > width {
            out.push_str(&line);
            out.push('\n');
            line = String::from(indent);
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if line.len() > indent.len() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Line, ShellError> {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse_line(&words)
    }

    fn cmd(line: &str) -> Command {
        parse(line).unwrap().command
    }

    fn usage_err(line: &str) -> String {
        match parse(line) {
            Err(ShellError::Usage(m)) => m,
            other => panic!("{line}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn simple_commands_parse_without_a_vm() {
        for (word, command) in [
            ("list", Command::List),
            ("ls", Command::List),
            ("status", Command::Status),
            ("start", Command::Start),
            ("halt", Command::Halt),
            ("poweroff", Command::Halt),
            ("reset", Command::Reset),
            ("pause", Command::Pause),
            ("resume", Command::Resume),
            ("console", Command::Console),
            ("events", Command::Events),
            ("exit", Command::Exit),
            ("quit", Command::Exit),
        ] {
            let line = parse(word).unwrap();
            assert_eq!(line.command, command, "{word}");
            assert_eq!(line.vm, None);
            assert!(!line.json && !line.yes);
        }
    }

    #[test]
    fn a_leading_non_command_word_names_the_vm() {
        let line = parse("web1 status").unwrap();
        assert_eq!(line.vm.as_deref(), Some("web1"));
        assert_eq!(line.command, Command::Status);
        let line = parse("--json web1 kernel set mini").unwrap();
        assert_eq!(line.vm.as_deref(), Some("web1"));
        assert!(line.json);
        assert_eq!(line.command, Command::KernelSet("mini".into()));
        // A VM called like a command needs --vm.
        let line = parse("--vm status status").unwrap();
        assert_eq!(line.vm.as_deref(), Some("status"));
        assert_eq!(line.command, Command::Status);
        let line = parse("--vm=list list").unwrap();
        assert_eq!(line.vm.as_deref(), Some("list"));
        assert_eq!(line.command, Command::List);
    }

    #[test]
    fn common_flags_are_accepted_anywhere() {
        let line = parse("web1 halt -y --json").unwrap();
        assert!(line.yes && line.json);
        assert_eq!(line.command, Command::Halt);
        assert!(parse("-y halt").unwrap().yes);
        assert_eq!(cmd("status --help"), Command::Help(Some("status".into())));
        assert_eq!(cmd("web1 --help"), Command::Help(None));
        assert_eq!(cmd("--help"), Command::Help(None));
        assert_eq!(cmd("help kernel"), Command::Help(Some("kernel".into())));
        assert_eq!(cmd("? halt"), Command::Help(Some("halt".into())));
    }

    #[test]
    fn timeouts_parse_and_are_bounded() {
        assert_eq!(cmd("shutdown"), Command::Shutdown { timeout_s: None });
        assert_eq!(
            cmd("shutdown --timeout 30"),
            Command::Shutdown {
                timeout_s: Some(30)
            }
        );
        assert_eq!(
            cmd("reboot --timeout=5s"),
            Command::Reboot { timeout_s: Some(5) }
        );
        assert!(usage_err("reboot --timeout").contains("needs a value"));
        assert!(usage_err("reboot --timeout soon").contains("whole number"));
        assert!(usage_err("reboot --timeout 86401").contains("86400"));
        assert!(usage_err("reboot now").contains("unexpected argument 'now'"));
    }

    #[test]
    fn log_options() {
        assert_eq!(
            cmd("log"),
            Command::Log {
                follow: false,
                bytes: None
            }
        );
        assert_eq!(
            cmd("log -f --bytes 100"),
            Command::Log {
                follow: true,
                bytes: Some(100)
            }
        );
        assert_eq!(
            cmd("log --bytes=7 --follow"),
            Command::Log {
                follow: true,
                bytes: Some(7)
            }
        );
        assert!(usage_err("log --tail").contains("unknown option '--tail'"));
        assert!(usage_err("log --bytes -1").contains("whole number"));
    }

    #[test]
    fn kernel_subcommands() {
        assert_eq!(cmd("kernel"), Command::KernelShow);
        assert_eq!(cmd("kernel show"), Command::KernelShow);
        assert_eq!(cmd("kernel list"), Command::KernelList);
        assert_eq!(cmd("kernel set deb"), Command::KernelSet("deb".into()));
        assert!(usage_err("kernel set").contains("needs a kernel name"));
        assert!(usage_err("kernel set a b").contains("too many"));
        assert!(usage_err("kernel frob").contains("unknown sub-command 'frob'"));
    }

    #[test]
    fn watchdog_subcommands() {
        assert_eq!(cmd("watchdog"), Command::WatchdogShow);
        assert_eq!(cmd("watchdog show"), Command::WatchdogShow);
        for a in WatchdogAction::ALL {
            assert_eq!(
                cmd(&format!("watchdog action {a}")),
                Command::WatchdogAction(*a)
            );
        }
        assert!(usage_err("watchdog action explode").contains("reset, poweroff"));
        assert!(usage_err("watchdog action").contains("needs one of"));
    }

    #[test]
    fn unknown_and_missing_commands_are_usage_errors() {
        assert!(usage_err("").contains("missing command"));
        assert!(usage_err("frobnicate").contains("unknown command 'frobnicate'"));
        assert!(usage_err("web1 frobnicate").contains("unknown command 'frobnicate'"));
        assert!(usage_err("--vm web1").contains("missing command for VM 'web1'"));
        assert!(usage_err("--vm").contains("--vm needs"));
        assert!(usage_err("status now").contains("unexpected argument"));
        assert!(usage_err("use").contains("use needs"));
        assert!(usage_err("help a b").contains("unexpected argument 'b'"));
        // Messages are one line.
        for line in ["frobnicate", "web1 frobnicate", "log --tail", "kernel frob"] {
            assert!(!usage_err(line).contains('\n'), "{line}");
        }
    }

    #[test]
    fn help_texts_cover_every_command() {
        let overview = help_overview(true);
        for c in COMMANDS {
            assert!(overview.contains(c.summary), "{}", c.name);
            let text = help_command(c.name).unwrap();
            assert!(text.starts_with(c.name));
        }
        let one_shot = help_overview(false);
        assert!(one_shot.contains("Usage: vmm-shell"));
        assert!(!one_shot.contains("select the VM"));
        assert!(help_command("nope").is_err());
        assert!(help_command("poweroff").unwrap().starts_with("halt"));
    }

    #[test]
    fn wrap_breaks_at_width() {
        let text = wrap("aaa bbb ccc ddd", 9, "  ");
        assert_eq!(text, "  aaa bbb\n  ccc ddd\n");
        assert_eq!(wrap("", 10, "  "), "");
    }
}
