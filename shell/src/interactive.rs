//! The interactive shell: a prompt naming the selected VM, line editing and history
//! (rustyline, `~/.vmm_shell_history`), completion of commands, VM names, kernel names and
//! options. Without a terminal on stdin, commands are read one per line with no prompt.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustyline::completion::{Completer, Pair};
use rustyline::config::{Builder, CompletionType};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::{FileHistory, History};
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

use protocol::{KernelList, Request, WatchdogAction};

use crate::args::split_words;
use crate::command::{self, Command, COMMANDS, COMMON_FLAGS};
use crate::conn::Conn;
use crate::discovery::{self, PROBE_TIMEOUT};
use crate::error::{ShellError, EXIT_OK};
use crate::exec::{is_yes, Confirm, Session};
use crate::signals;

/// History file name, in the home directory.
pub const HISTORY_FILE: &str = ".vmm_shell_history";
/// How long the VM names used for completion are reused.
const VM_CACHE_TTL: Duration = Duration::from_secs(10);

/// What completion knows about: VM names and a VM's kernels.
pub trait CompletionSource {
    /// The VMs this user can control.
    fn vms(&self) -> Vec<String>;
    /// The kernel library of `vm` (or of the selected VM).
    fn kernels(&self, vm: Option<&str>) -> Vec<String>;
}

fn is_flag_word(word: &str) -> bool {
    COMMON_FLAGS.contains(&word) || matches!(word, "-y" | "--yes")
}

/// Completes the word that ends at the end of `before` (the line up to the cursor). Returns
/// the byte offset where that word starts and the candidates (sorted, without duplicates).
pub fn complete(before: &str, src: &dyn CompletionSource) -> (usize, Vec<String>) {
    let start = before
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or(0);
    let partial = &before[start..];
    let all: Vec<&str> = before[..start]
        .split_whitespace()
        .filter(|w| !is_flag_word(w))
        .collect();
    let mut words: &[&str] = &all;
    let mut vm: Option<&str> = None;
    if let Some(first) = words.first() {
        if !command::is_command(first) {
            vm = Some(first);
            words = &words[1..];
        }
    }
    let strs = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let names = |interactive: bool| -> Vec<String> {
        COMMANDS
            .iter()
            .filter(|c| interactive || !c.interactive_only)
            .map(|c| c.name.to_string())
            .collect()
    };
    let mut candidates: Vec<String> = match (vm, words) {
        (None, []) => {
            let mut c = names(true);
            c.extend(src.vms());
            c
        }
        (Some(_), []) => names(false),
        (None, ["help"]) => names(true),
        (None, ["use"]) => src.vms(),
        (_, ["kernel"]) => strs(&["list", "show", "set"]),
        (_, ["kernel", "set"]) => src.kernels(vm),
        (_, ["watchdog"]) => strs(&["show", "action"]),
        (_, ["watchdog", "action"]) => WatchdogAction::ALL
            .iter()
            .map(|a| a.as_str().to_string())
            .collect(),
        (_, [cmd, rest @ ..]) => {
            let mut c: Vec<String> = match command::spec(cmd) {
                Some(spec) if !matches!(spec.name, "kernel" | "watchdog" | "help" | "use") => spec
                    .completions
                    .iter()
                    .filter(|o| !rest.contains(o))
                    .map(|o| o.to_string())
                    .collect(),
                _ => Vec::new(),
            };
            if partial.starts_with('-') {
                c.extend(strs(COMMON_FLAGS));
            }
            c
        }
    };
    candidates.retain(|c| c.starts_with(partial));
    candidates.sort();
    candidates.dedup();
    (start, candidates)
}

/// The rustyline helper: completion from the run directory and the selected VM.
pub struct ShellHelper {
    run_dir: PathBuf,
    /// The selected VM (kept in step with the session).
    pub selected: Option<String>,
    vms: RefCell<Option<(Instant, Vec<String>)>>,
}

impl ShellHelper {
    fn new(run_dir: &Path) -> Self {
        ShellHelper {
            run_dir: run_dir.to_path_buf(),
            selected: None,
            vms: RefCell::new(None),
        }
    }

    /// Seeds the VM name cache (after a discovery the shell did anyway).
    fn set_vms(&self, names: Vec<String>) {
        *self.vms.borrow_mut() = Some((Instant::now(), names));
    }
}

impl CompletionSource for ShellHelper {
    fn vms(&self) -> Vec<String> {
        if let Some((at, names)) = self.vms.borrow().as_ref() {
            if at.elapsed() < VM_CACHE_TTL {
                return names.clone();
            }
        }
        let names: Vec<String> = discovery::discover(&self.run_dir, Duration::from_secs(1))
            .map(|found| found.into_iter().map(|f| f.name).collect())
            .unwrap_or_default();
        self.set_vms(names.clone());
        names
    }

    fn kernels(&self, vm: Option<&str>) -> Vec<String> {
        let Some(vm) = vm.or(self.selected.as_deref()) else {
            return Vec::new();
        };
        let Ok(mut conn) = Conn::connect(&self.run_dir, vm) else {
            return Vec::new();
        };
        conn.call(&Request::Kernels, Some(Duration::from_secs(1)))
            .and_then(|a| a.decode::<KernelList>(vm))
            .map(|k| k.kernels.into_iter().map(|e| e.name).collect())
            .unwrap_or_default()
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let before = line.get(..pos).unwrap_or(line);
        let (start, words) = complete(before, self);
        let pairs = words
            .into_iter()
            .map(|w| Pair {
                replacement: format!("{w} "),
                display: w,
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

type ShellEditor = Editor<ShellHelper, FileHistory>;

/// Confirmation through the line editor (Ctrl-C and Ctrl-D mean no).
struct EditorConfirm<'a> {
    editor: &'a mut ShellEditor,
}

impl Confirm for EditorConfirm<'_> {
    fn confirm(&mut self, question: &str) -> Result<bool, ShellError> {
        signals::set_terminal_changed(true);
        let answer = self.editor.readline(&format!("{question} [y/N] "));
        signals::set_terminal_changed(false);
        match answer {
            Ok(a) => Ok(is_yes(&a)),
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => Ok(false),
            Err(e) => Err(ShellError::failed(format!("cannot read the answer: {e}"))),
        }
    }
}

/// Script mode (stdin is not a terminal): nobody to ask.
struct NoConfirm;

impl Confirm for NoConfirm {
    fn confirm(&mut self, question: &str) -> Result<bool, ShellError> {
        Err(ShellError::usage(format!(
            "{question} needs confirmation, and stdin is not a terminal to ask on: add -y"
        )))
    }
}

fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(HISTORY_FILE))
}

fn print_error(session: &Session, e: &ShellError) {
    let mut err = io::stderr();
    let _ = writeln!(err, "{} {e}", session.err_style.red("error:"));
}

/// Parses and runs one line; `Ok(true)` asks the shell to exit.
fn run_line(
    session: &mut Session,
    text: &str,
    confirm: &mut dyn Confirm,
) -> Result<bool, ShellError> {
    let words = split_words(text).map_err(ShellError::Usage)?;
    if words.is_empty() {
        return Ok(false);
    }
    // A VM name alone selects it.
    let line = match command::parse_line(&words) {
        Ok(line) => line,
        Err(e) => match words.as_slice() {
            [vm] if !vm.starts_with('-') && !command::is_command(vm) => command::Line {
                vm: None,
                command: Command::Use(vm.clone()),
                json: false,
                yes: false,
            },
            _ => return Err(e),
        },
    };
    if line.command == Command::Exit {
        return Ok(true);
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = session.run(&line, confirm, &mut out);
    let _ = out.flush();
    result.map(|()| false)
}

fn greet(session: &mut Session, helper: &ShellHelper) {
    let mut err = io::stderr();
    let found = match discovery::discover(&session.run_dir, PROBE_TIMEOUT) {
        Ok(found) => found,
        Err(e) => {
            print_error(session, &e);
            Vec::new()
        }
    };
    let names: Vec<String> = found.iter().map(|f| f.name.clone()).collect();
    helper.set_vms(names.clone());
    let _ = match names.as_slice() {
        [] => writeln!(
            err,
            "No VMs available to you under {}. Type `help` for commands.",
            session.run_dir.display()
        ),
        [only] => {
            session.selected = Some(only.clone());
            writeln!(
                err,
                "Your VM: {only} (selected). Type `help` for commands, `exit` to leave."
            )
        }
        many => writeln!(
            err,
            "Your VMs: {}. Select one with `use NAME`, or prefix a command with its name. \
             Type `help` for commands.",
            many.join(", ")
        ),
    };
}

/// Runs the interactive shell on a terminal. Returns the exit status.
pub fn run(mut session: Session) -> i32 {
    let config = Builder::new()
        .completion_type(CompletionType::List)
        .auto_add_history(false)
        .history_ignore_space(true)
        .build();
    let mut editor: ShellEditor = match Editor::with_config(config) {
        Ok(e) => e,
        Err(e) => {
            print_error(
                &session,
                &ShellError::failed(format!("cannot start the line editor: {e}")),
            );
            return crate::error::EXIT_FAILED;
        }
    };
    let _ = editor.history_mut().set_max_len(1000);
    let _ = editor.history_mut().ignore_dups(true);
    let history = history_path();
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    let helper = ShellHelper::new(&session.run_dir);
    greet(&mut session, &helper);
    editor.set_helper(Some(helper));
    loop {
        if let Some(h) = editor.helper_mut() {
            h.selected = session.selected.clone();
        }
        let name = session.selected.as_deref().unwrap_or("vmm");
        let raw_prompt = format!("{name}> ");
        let styled = format!("{}> ", session.err_style.bold(name));
        signals::set_terminal_changed(true);
        let read = editor.readline(&(raw_prompt.as_str(), styled.as_str()));
        signals::set_terminal_changed(false);
        let text = match read {
            Ok(text) => text,
            // Ctrl-C at the prompt abandons the line.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                print_error(
                    &session,
                    &ShellError::failed(format!("cannot read a command: {e}")),
                );
                return crate::error::EXIT_FAILED;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        if editor.add_history_entry(text.as_str()).unwrap_or(false) {
            if let Some(path) = &history {
                let _ = editor.append_history(path);
            }
        }
        // A Ctrl-C typed before this command must not cancel it.
        signals::take_interrupt();
        let mut confirm = EditorConfirm {
            editor: &mut editor,
        };
        match run_line(&mut session, &text, &mut confirm) {
            Ok(true) => break,
            Ok(false) => {}
            Err(ShellError::Interrupted) => {
                let _ = writeln!(io::stderr(), "Interrupted.");
            }
            Err(e) => print_error(&session, &e),
        }
    }
    EXIT_OK
}

/// Runs commands read from a non-terminal stdin, one per line (`ssh host < script`). Returns
/// 0 if all succeeded, else the status of the last failure.
pub fn run_script(mut session: Session) -> i32 {
    let stdin = io::stdin();
    let mut status = EXIT_OK;
    for line in stdin.lock().lines() {
        let Ok(text) = line else {
            break;
        };
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        signals::take_interrupt();
        match run_line(&mut session, text, &mut NoConfirm) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                let mut err = io::stderr();
                let _ = writeln!(err, "vmm-shell: {e}");
                status = e.exit_code();
            }
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl CompletionSource for Fake {
        fn vms(&self) -> Vec<String> {
            vec!["web1".into(), "web2".into(), "db".into()]
        }
        fn kernels(&self, vm: Option<&str>) -> Vec<String> {
            match vm {
                Some("db") => vec!["db-kernel".into()],
                _ => vec!["mini".into(), "debian".into()],
            }
        }
    }

    fn c(before: &str) -> (usize, Vec<String>) {
        complete(before, &Fake)
    }

    fn words(before: &str) -> Vec<String> {
        c(before).1
    }

    #[test]
    fn completes_commands_and_vm_names_at_the_start() {
        assert_eq!(c("stat"), (0, vec!["status".to_string()]));
        assert_eq!(words("sta"), vec!["start", "status"]);
        assert_eq!(words("we"), vec!["web1", "web2"]);
        assert_eq!(words("d"), vec!["db"]);
        let all = words("");
        assert!(all.contains(&"halt".to_string()) && all.contains(&"db".to_string()));
        assert!(all.contains(&"use".to_string()));
    }

    #[test]
    fn completes_after_use_help_and_a_vm_prefix() {
        assert_eq!(
            c("use w"),
            (4, vec!["web1".to_string(), "web2".to_string()])
        );
        assert_eq!(words("help ker"), vec!["kernel"]);
        assert_eq!(
            c("web1 re"),
            (5, vec!["reboot".into(), "reset".into(), "resume".into()])
        );
        // Interactive-only words are not offered after a VM name.
        assert!(!words("web1 ").contains(&"use".to_string()));
    }

    #[test]
    fn completes_sub_commands_kernels_and_actions() {
        assert_eq!(words("kernel "), vec!["list", "set", "show"]);
        assert_eq!(words("kernel s"), vec!["set", "show"]);
        assert_eq!(words("kernel set "), vec!["debian", "mini"]);
        assert_eq!(words("db kernel set "), vec!["db-kernel"]);
        assert_eq!(words("watchdog "), vec!["action", "show"]);
        assert_eq!(words("watchdog action p"), vec!["pause", "poweroff"]);
        assert!(words("kernel list ").is_empty());
    }

    #[test]
    fn completes_options() {
        assert_eq!(words("log "), vec!["--bytes", "--follow"]);
        assert_eq!(words("log --follow "), vec!["--bytes"]);
        assert_eq!(words("halt "), vec!["-y"]);
        assert_eq!(words("status --j"), vec!["--json"]);
        assert_eq!(words("--json sta"), vec!["start", "status"]);
        assert_eq!(words("reboot --t"), vec!["--timeout"]);
    }

    #[test]
    fn start_offset_is_a_char_boundary() {
        let (start, _) = c("use é");
        assert_eq!(start, 4);
    }
}
