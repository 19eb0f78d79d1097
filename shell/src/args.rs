//! How the shell was started: argv, `-c STRING` (login shell) and `SSH_ORIGINAL_COMMAND`
//! (sshd `ForceCommand`). Pure functions, unit-tested.

use std::path::PathBuf;

use crate::error::ShellError;

/// The binary's name, recognised at the start of a `-c` string (ForceCommand through a login
/// shell that is this shell) and of `SSH_ORIGINAL_COMMAND`.
pub const SELF_NAME: &str = "vmm-shell";

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The interactive shell (or commands read from a non-terminal stdin).
    Interactive,
    /// One command: the words after the global options.
    Run(Vec<String>),
    /// `--help`.
    Help,
    /// `--version`.
    Version,
}

/// The parsed invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `--run-dir DIR`.
    pub run_dir: Option<PathBuf>,
    /// `--no-color`.
    pub no_color: bool,
    /// What to do.
    pub action: Action,
}

impl Default for Invocation {
    fn default() -> Self {
        Invocation {
            run_dir: None,
            no_color: false,
            action: Action::Interactive,
        }
    }
}

/// Parses the arguments after `argv[0]`.
///
/// * Global options (`--run-dir DIR`, `--no-color`, `--help`, `--version`) come first; the
///   first other word starts the command (`[VM] COMMAND [ARGS]`, parsed later).
/// * `-c STRING` runs STRING as a command: this is how sshd runs `ssh host COMMAND` when this
///   shell is the login shell. A STRING that itself starts with `vmm-shell` (sshd's
///   `ForceCommand vmm-shell ...` run through a login shell that is this shell) is parsed as a
///   full command line, global options included; a plain STRING is only `[VM] COMMAND [ARGS]`.
/// * No command at all: `SSH_ORIGINAL_COMMAND` (`ssh host COMMAND` under `ForceCommand`) if
///   set and not empty, else the interactive shell. Its words are only `[VM] COMMAND [ARGS]`,
///   so a remote user cannot point the shell at another run directory.
pub fn parse_invocation(
    args: &[String],
    ssh_original_command: Option<&str>,
) -> Result<Invocation, ShellError> {
    parse_argv(args, ssh_original_command, 0)
}

fn parse_argv(
    args: &[String],
    ssh_original_command: Option<&str>,
    depth: u32,
) -> Result<Invocation, ShellError> {
    let mut inv = Invocation::default();
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        match arg.as_str() {
            "--run-dir" => {
                let dir = args
                    .get(i + 1)
                    .ok_or_else(|| ShellError::usage("--run-dir needs a directory"))?;
                inv.run_dir = Some(nonempty_dir(dir)?);
                i += 2;
            }
            s if s.starts_with("--run-dir=") => {
                inv.run_dir = Some(nonempty_dir(&s["--run-dir=".len()..])?);
                i += 1;
            }
            "--no-color" | "--no-colour" => {
                inv.no_color = true;
                i += 1;
            }
            "-h" | "--help" => {
                inv.action = Action::Help;
                return Ok(inv);
            }
            "-V" | "--version" => {
                inv.action = Action::Version;
                return Ok(inv);
            }
            "-c" => {
                let string = args
                    .get(i + 1)
                    .ok_or_else(|| ShellError::usage("-c needs a command string"))?;
                // Anything after the string is $0, $1... for a POSIX shell: ignored here.
                return command_string(inv, string, ssh_original_command, depth);
            }
            "--" => {
                i += 1;
                break;
            }
            _ => break,
        }
    }
    let rest = args.get(i..).unwrap_or_default();
    if rest.is_empty() {
        inv.action = ssh_action(ssh_original_command)?;
    } else {
        inv.action = Action::Run(rest.to_vec());
    }
    Ok(inv)
}

fn nonempty_dir(dir: &str) -> Result<PathBuf, ShellError> {
    if dir.is_empty() {
        return Err(ShellError::usage("--run-dir needs a directory"));
    }
    Ok(PathBuf::from(dir))
}

fn command_string(
    mut inv: Invocation,
    string: &str,
    ssh_original_command: Option<&str>,
    depth: u32,
) -> Result<Invocation, ShellError> {
    let words = split_words(string).map_err(ShellError::Usage)?;
    match words.split_first() {
        Some((first, rest)) if depth == 0 && is_self_name(first) => {
            let sub = parse_argv(rest, ssh_original_command, depth + 1)?;
            Ok(Invocation {
                run_dir: sub.run_dir.or(inv.run_dir),
                no_color: sub.no_color || inv.no_color,
                action: sub.action,
            })
        }
        Some(_) => {
            inv.action = Action::Run(words);
            Ok(inv)
        }
        None => {
            inv.action = ssh_action(ssh_original_command)?;
            Ok(inv)
        }
    }
}

fn ssh_action(ssh_original_command: Option<&str>) -> Result<Action, ShellError> {
    let Some(cmd) = ssh_original_command.filter(|c| !c.trim().is_empty()) else {
        return Ok(Action::Interactive);
    };
    let mut words = split_words(cmd).map_err(ShellError::Usage)?;
    // `ssh host vmm-shell status` reads naturally; accept it, but only as a command.
    if words.first().is_some_and(|w| is_self_name(w)) {
        words.remove(0);
    }
    if words.is_empty() {
        return Ok(Action::Interactive);
    }
    Ok(Action::Run(words))
}

/// Whether `word` names this program (`vmm-shell`, `/usr/local/bin/vmm-shell`).
pub fn is_self_name(word: &str) -> bool {
    word.rsplit('/').next() == Some(SELF_NAME)
}

/// Splits a command line into words like a POSIX shell does, without expansions: blanks
/// separate words, `'...'` is literal, `"..."` allows `\"`, `\\`, `\$` and `` \` ``, and a
/// backslash outside quotes takes the next character literally.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated ' quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated \" quote".into()),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated \" quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => word.push(c),
                    None => return Err("a backslash ends the line".into()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn parse(args: &[&str]) -> Invocation {
        parse_invocation(&s(args), None).unwrap()
    }

    #[test]
    fn split_words_handles_quotes_and_escapes() {
        assert_eq!(split_words("").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("  \t ").unwrap(), Vec::<String>::new());
        assert_eq!(split_words("web1  status").unwrap(), s(&["web1", "status"]));
        assert_eq!(
            split_words(r#"kernel set 'my kernel' "a \"b\" \x" c\ d ''"#).unwrap(),
            s(&["kernel", "set", "my kernel", "a \"b\" \\x", "c d", ""])
        );
        assert_eq!(split_words("a'b'\"c\"d").unwrap(), s(&["abcd"]));
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
        assert!(split_words("trailing\\").is_err());
    }

    #[test]
    fn no_arguments_is_interactive() {
        assert_eq!(parse(&[]).action, Action::Interactive);
        assert_eq!(parse(&["--run-dir", "/x"]).action, Action::Interactive);
        assert_eq!(
            parse(&["--run-dir", "/x"]).run_dir,
            Some(PathBuf::from("/x"))
        );
    }

    #[test]
    fn global_options_stop_at_the_first_command_word() {
        let inv = parse(&["--run-dir=/r", "--no-color", "web1", "status", "--json"]);
        assert_eq!(inv.run_dir, Some(PathBuf::from("/r")));
        assert!(inv.no_color);
        assert_eq!(inv.action, Action::Run(s(&["web1", "status", "--json"])));
        // `--json` and `-y` belong to the command line, not to the global options.
        assert_eq!(
            parse(&["--json", "status"]).action,
            Action::Run(s(&["--json", "status"]))
        );
        assert_eq!(
            parse(&["--", "--run-dir"]).action,
            Action::Run(s(&["--run-dir"]))
        );
        assert_eq!(parse(&["--help"]).action, Action::Help);
        assert_eq!(parse(&["-V"]).action, Action::Version);
    }

    #[test]
    fn missing_option_values_are_usage_errors() {
        for args in [&["--run-dir"][..], &["--run-dir="], &["-c"]] {
            let err = parse_invocation(&s(args), None).unwrap_err();
            assert!(matches!(err, ShellError::Usage(_)), "{args:?}");
        }
    }

    #[test]
    fn dash_c_runs_the_string_as_a_command() {
        assert_eq!(
            parse(&["-c", "web1 kernel set 'new one'"]).action,
            Action::Run(s(&["web1", "kernel", "set", "new one"]))
        );
        // Extra arguments after the string are ignored like a POSIX shell's $0...
        assert_eq!(
            parse(&["-c", "status", "zero", "one"]).action,
            Action::Run(s(&["status"]))
        );
        let err = parse_invocation(&s(&["-c", "status 'x"]), None).unwrap_err();
        assert!(err.to_string().contains("quote"));
    }

    #[test]
    fn dash_c_string_cannot_set_the_run_dir_unless_it_names_the_shell() {
        // A user command through the login shell: only command words.
        assert_eq!(
            parse(&["-c", "--run-dir /tmp status"]).action,
            Action::Run(s(&["--run-dir", "/tmp", "status"]))
        );
        // ForceCommand "/usr/local/bin/vmm-shell --run-dir /srv/vmm" through this login shell.
        let inv = parse(&["-c", "/usr/local/bin/vmm-shell --run-dir /srv/vmm list"]);
        assert_eq!(inv.run_dir, Some(PathBuf::from("/srv/vmm")));
        assert_eq!(inv.action, Action::Run(s(&["list"])));
    }

    #[test]
    fn ssh_original_command_is_used_when_there_is_no_command() {
        let with = |args: &[&str], ssh: &str| parse_invocation(&s(args), Some(ssh)).unwrap();
        assert_eq!(
            with(&[], "web1 status --json").action,
            Action::Run(s(&["web1", "status", "--json"]))
        );
        assert_eq!(with(&[], "   ").action, Action::Interactive);
        assert_eq!(
            with(&[], "vmm-shell list").action,
            Action::Run(s(&["list"]))
        );
        assert_eq!(with(&[], "vmm-shell").action, Action::Interactive);
        // Explicit arguments win over the variable.
        assert_eq!(
            with(&["status"], "halt -y").action,
            Action::Run(s(&["status"]))
        );
        // ForceCommand through a login shell that is this shell.
        let inv = with(&["-c", "/usr/local/bin/vmm-shell --run-dir /srv"], "reboot");
        assert_eq!(inv.run_dir, Some(PathBuf::from("/srv")));
        assert_eq!(inv.action, Action::Run(s(&["reboot"])));
        // The variable's words never carry global options.
        assert_eq!(
            with(&[], "--run-dir /tmp list").action,
            Action::Run(s(&["--run-dir", "/tmp", "list"]))
        );
    }

    #[test]
    fn self_name_matches_the_basename() {
        assert!(is_self_name("vmm-shell"));
        assert!(is_self_name("/usr/local/bin/vmm-shell"));
        assert!(!is_self_name("vmm-shell2"));
        assert!(!is_self_name("status"));
    }
}
