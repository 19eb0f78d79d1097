//! Finding the VMs this user may control: one directory per VM under the run directory,
//! holding the VMM's `control.sock`. A VM is listed only when its VMM lets us in: we connect
//! and ask for its status. The shell never decides access itself.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::{Request, StatusInfo};

use crate::conn::{Answer, Conn};
use crate::error::ShellError;

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/vmm";
/// Environment variable naming the run directory.
pub const RUN_DIR_ENV: &str = "VMM_RUN_DIR";
/// The control socket's name inside a VM's directory.
pub const SOCKET_NAME: &str = "control.sock";
/// How long discovery waits for all VMs to answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The run directory: `--run-dir`, else `$VMM_RUN_DIR`, else `/run/vmm`.
pub fn run_dir(option: Option<PathBuf>, env: Option<&str>) -> PathBuf {
    option
        .or_else(|| env.filter(|e| !e.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// Checks a VM name: one plain path component (no `/`, not `.` or `..`).
pub fn check_name(name: &str) -> Result<(), ShellError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ShellError::usage(format!(
            "'{name}' is not a VM name (see `list`)"
        )))
    }
}

/// Accepts a VM as its name, or as the path of its directory or socket under the run
/// directory (`/run/vmm/web1`, `/run/vmm/web1/control.sock`), and returns the name. Paths
/// elsewhere are refused: the shell only talks to VMs under its run directory.
pub fn vm_name(run_dir: &Path, arg: &str) -> Result<String, ShellError> {
    if !arg.contains('/') {
        check_name(arg)?;
        return Ok(arg.to_string());
    }
    let mut path = Path::new(arg);
    if path.file_name().is_some_and(|n| n == SOCKET_NAME) {
        path = path.parent().unwrap_or(path);
    }
    let name = path
        .parent()
        .filter(|parent| same_path(parent, run_dir))
        .and_then(|_| path.file_name())
        .and_then(|n| n.to_str());
    match name {
        Some(name) => {
            check_name(name)?;
            Ok(name.to_string())
        }
        None => Err(ShellError::usage(format!(
            "'{arg}' is not a VM under {} (name a VM from `list`)",
            run_dir.display()
        ))),
    }
}

/// Lexical comparison ignoring `.` components and trailing slashes.
fn same_path(a: &Path, b: &Path) -> bool {
    fn norm(p: &Path) -> Vec<Component<'_>> {
        p.components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect()
    }
    norm(a) == norm(b)
}

/// The control socket of `vm`.
pub fn socket_path(run_dir: &Path, vm: &str) -> Result<PathBuf, ShellError> {
    check_name(vm)?;
    Ok(run_dir.join(vm).join(SOCKET_NAME))
}

/// A readable message for a failed connect to `vm`'s socket.
pub fn connect_error(run_dir: &Path, vm: &str, e: &io::Error) -> ShellError {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
            if run_dir.join(vm).is_dir() {
                ShellError::failed(format!(
                    "VM '{vm}' has no control socket: its VMM is not running"
                ))
            } else if !run_dir.is_dir() {
                ShellError::failed(format!(
                    "no VM named '{vm}': run directory {} does not exist",
                    run_dir.display()
                ))
            } else {
                ShellError::failed(format!("no VM named '{vm}' (see `list`)"))
            }
        }
        Some(libc::EACCES) | Some(libc::EPERM) => ShellError::failed(format!(
            "VM '{vm}' is not available to you (permission denied)"
        )),
        Some(libc::ECONNREFUSED) => ShellError::failed(format!(
            "VM '{vm}' is not running: nothing answers on its control socket"
        )),
        Some(libc::ENOTSOCK) => {
            ShellError::failed(format!("VM '{vm}': {SOCKET_NAME} is not a socket"))
        }
        _ => ShellError::failed(format!("cannot connect to VM '{vm}': {e}")),
    }
}

/// Names of the directories under `run_dir` that hold a control socket we can see, sorted.
pub fn candidates(run_dir: &Path) -> Result<Vec<String>, ShellError> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        // No run directory: no VMs (the VMM creates it).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(ShellError::failed(format!(
                "cannot list {}: permission denied (name the VM: vmm-shell VM COMMAND)",
                run_dir.display()
            )))
        }
        Err(e) => {
            return Err(ShellError::failed(format!(
                "cannot list {}: {e}",
                run_dir.display()
            )))
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| check_name(name).is_ok())
        .filter(|name| {
            // Following links; an unreadable directory is simply not ours.
            std::fs::metadata(run_dir.join(name).join(SOCKET_NAME))
                .is_ok_and(|m| m.file_type().is_socket())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// A VM whose VMM answered our `status`.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its name.
    pub name: String,
    /// The status response as received.
    pub raw: String,
    /// The decoded status (None if it did not decode).
    pub status: Option<StatusInfo>,
}

fn probe(run_dir: &Path, name: &str, timeout: Duration) -> Option<Found> {
    let mut conn = Conn::connect(run_dir, name).ok()?;
    let answer: Answer = conn.call(&Request::Status, Some(timeout)).ok()?;
    Some(Found {
        name: name.to_string(),
        status: answer.decode(name).ok(),
        raw: answer.raw,
    })
}

/// The VMs under `run_dir` whose VMMs let this user in, sorted by name. Every VM is asked in
/// parallel; one that does not answer within `timeout` is left out.
pub fn discover(run_dir: &Path, timeout: Duration) -> Result<Vec<Found>, ShellError> {
    let names = candidates(run_dir)?;
    let (tx, rx) = mpsc::channel();
    for name in &names {
        let tx = tx.clone();
        let run_dir = run_dir.to_path_buf();
        let name = name.clone();
        // A thread per VM: a hung VMM (full listen backlog, stopped process) cannot delay
        // the others, and a thread stuck in connect() is simply abandoned.
        let spawned = std::thread::Builder::new()
            .name(format!("probe-{name}"))
            .spawn(move || {
                let _ = tx.send(probe(&run_dir, &name, timeout));
            });
        if spawned.is_err() {
            return Err(ShellError::failed("cannot start a thread"));
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout + Duration::from_millis(200);
    let mut found = Vec::new();
    for _ in &names {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(f)) => found.push(f),
            Ok(None) => {}
            Err(_) => break,
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_precedence() {
        assert_eq!(run_dir(None, None), PathBuf::from("/run/vmm"));
        assert_eq!(run_dir(None, Some("")), PathBuf::from("/run/vmm"));
        assert_eq!(run_dir(None, Some("/e")), PathBuf::from("/e"));
        assert_eq!(
            run_dir(Some(PathBuf::from("/o")), Some("/e")),
            PathBuf::from("/o")
        );
    }

    #[test]
    fn names_are_single_components() {
        for ok in ["web1", "a.b", "db_2", "x-y"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "-rf", "a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn vm_may_be_named_by_its_path_under_the_run_dir_only() {
        let rd = Path::new("/run/vmm");
        assert_eq!(vm_name(rd, "web1").unwrap(), "web1");
        assert_eq!(vm_name(rd, "/run/vmm/web1").unwrap(), "web1");
        assert_eq!(vm_name(rd, "/run/vmm/web1/").unwrap(), "web1");
        assert_eq!(vm_name(rd, "/run/vmm/web1/control.sock").unwrap(), "web1");
        assert_eq!(vm_name(rd, "/run/./vmm/web1").unwrap(), "web1");
        for bad in [
            "/tmp/web1",
            "/run/vmm/web1/other.sock",
            "/run/vmm",
            "/run/vmm/../etc",
            "/var/run/docker.sock",
            "web1/control.sock",
        ] {
            let err = vm_name(rd, bad).unwrap_err();
            assert!(matches!(err, ShellError::Usage(_)), "{bad}");
        }
    }

    #[test]
    fn socket_path_is_inside_the_vm_directory() {
        assert_eq!(
            socket_path(Path::new("/r"), "a").unwrap(),
            PathBuf::from("/r/a/control.sock")
        );
        assert!(socket_path(Path::new("/r"), "../a").is_err());
    }

    #[test]
    fn connect_errors_read_well() {
        let rd = Path::new("/nonexistent-run-dir-for-test");
        let msg =
            |errno| connect_error(rd, "web1", &io::Error::from_raw_os_error(errno)).to_string();
        assert!(msg(libc::ENOENT).contains("run directory"));
        assert_eq!(
            msg(libc::EACCES),
            "VM 'web1' is not available to you (permission denied)"
        );
        assert!(msg(libc::ECONNREFUSED).contains("not running"));
        assert!(msg(libc::EIO).starts_with("cannot connect to VM 'web1'"));
    }

    #[test]
    fn candidates_of_a_missing_run_dir_is_empty() {
        assert!(candidates(Path::new("/nonexistent-run-dir-for-test"))
            .unwrap()
            .is_empty());
    }
}
