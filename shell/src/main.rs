//! `vmm-shell`: the customer's admin shell for the VMs run by `vmm`.
//!
//! It finds the VMs the calling Unix user may control (control sockets under the run
//! directory that let this user in) and talks the control protocol to them: interactively
//! with a prompt, line editing, history and completion, or one command at a time for scripts
//! and `ssh host COMMAND`. Operator documentation: `shell/README.md`.

mod args;
mod command;
mod conn;
mod console;
mod discovery;
mod error;
mod exec;
mod format;
mod interactive;
mod signals;
mod term;

use std::io::{self, Write};

use args::{parse_invocation, Action};
use error::{ShellError, EXIT_OK};
use exec::{Session, StdinConfirm};
use format::Style;

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let ssh_command = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let no_color_env = std::env::var("NO_COLOR").ok();
    let term_env = std::env::var("TERM").ok();
    let invocation = match parse_invocation(&args, ssh_command.as_deref()) {
        Ok(inv) => inv,
        Err(e) => {
            let style = Style::detect(
                term::isatty(libc::STDERR_FILENO),
                no_color_env.as_deref(),
                term_env.as_deref(),
            );
            report(&e, false, style);
            return e.exit_code();
        }
    };
    // Ctrl-C handling and terminal restoration on SIGTERM/SIGHUP; without them the shell
    // still works, only less gracefully.
    let _ = signals::install();
    let detect = |fd| {
        let mut style = Style::detect(
            term::isatty(fd),
            no_color_env.as_deref(),
            term_env.as_deref(),
        );
        if invocation.no_color {
            style = Style::PLAIN;
        }
        style
    };
    let env_dir = std::env::var(discovery::RUN_DIR_ENV).ok();
    let mut session = Session {
        run_dir: discovery::run_dir(invocation.run_dir.clone(), env_dir.as_deref()),
        out_style: detect(libc::STDOUT_FILENO),
        err_style: detect(libc::STDERR_FILENO),
        interactive: false,
        selected: None,
    };
    match invocation.action {
        Action::Help => {
            let mut out = io::stdout();
            let _ = write!(out, "{}", command::help_overview(false));
            EXIT_OK
        }
        Action::Version => {
            let mut out = io::stdout();
            let _ = writeln!(out, "vmm-shell {}", env!("CARGO_PKG_VERSION"));
            EXIT_OK
        }
        Action::Run(words) => one_shot(&mut session, &words),
        Action::Interactive => {
            if term::isatty(libc::STDIN_FILENO) {
                session.interactive = true;
                interactive::run(session)
            } else {
                interactive::run_script(session)
            }
        }
    }
}

/// Prints an error as one line on stderr (and, for `--json`, as a response object on stdout).
fn report(e: &ShellError, json: bool, style: Style) {
    if json {
        let mut out = io::stdout();
        let _ = writeln!(out, "{}", e.json_line());
    }
    let mut err = io::stderr();
    let _ = writeln!(err, "vmm-shell: {}", style.red(&e.to_string()));
}

fn one_shot(session: &mut Session, words: &[String]) -> i32 {
    let json = words.iter().any(|w| w == "--json");
    let result = command::parse_line(words).and_then(|line| {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let result = session.run(&line, &mut StdinConfirm, &mut out);
        let flushed = out.flush();
        result.and(flushed.map_err(ShellError::Output))
    });
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            report(&e, json, session.err_style);
            e.exit_code()
        }
    }
}
