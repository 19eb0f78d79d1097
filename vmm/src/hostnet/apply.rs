//! Carries out a port's plan on the host: `ip` for the TAP and the
//! bridge, `nft -f -` for the rules (one transaction each), and the DHCP
//! lease file. Each step can be run again: `up` twice is `up` once with the
//! second call's addresses.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Port;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0} is not installed (Debian: apt install {1})")]
    Missing(String, &'static str),
    #[error("cannot run {cmd}: {reason}")]
    Spawn { cmd: String, reason: String },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error(
        "bridge {0} does not exist (create it: ip link add {0} type bridge; ip link set {0} up)"
    )]
    NoBridge(String),
    #[error("{0} exists and is not a TAP")]
    NotTap(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("{addr} is already {other}'s (another VM's ip=): one address, one VM")]
    Taken { addr: String, other: String },
}

/// Runs `prog args`, feeding `input` to its stdin: its stdout, or the
/// first line of its stderr as the error.
fn run(prog: &str, args: &[&str], input: Option<&str>) -> Result<String, NetError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetError::Missing(
                prog.to_string(),
                if prog == "nft" {
                    "nftables"
                } else {
                    "iproute2"
                },
            ),
            _ => NetError::Spawn {
                cmd: cmd.clone(),
                reason: e.to_string(),
            },
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as the command's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| NetError::Spawn {
        cmd: cmd.clone(),
        reason: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .to_string();
    Err(NetError::Failed { cmd, stderr: first })
}

fn sys_net(name: &str) -> PathBuf {
    Path::new("/sys/class/net").join(name)
}

/// Creates the TAP (persistent, root's: the VMM opens it before it drops
/// its privileges) unless it exists, puts it on `bridge` and up, and
/// installs its filtering.
pub fn up(port: &Port, bridge: Option<&str>, filter: bool) -> Result<(), NetError> {
    let tap = port.tap.as_str();
    if let Some(br) = bridge {
        if !sys_net(br).join("bridge").exists() {
            return Err(NetError::NoBridge(br.to_string()));
        }
    }
    // Before anything is made: a refused VM leaves no trace.
    if filter {
        if let Some((net, other)) = existing()?.and_then(|e| super::conflict(port, &e)) {
            return Err(NetError::Taken {
                addr: net.to_string(),
                other,
            });
        }
    }
    if sys_net(tap).exists() {
        if !sys_net(tap).join("tun_flags").exists() {
            return Err(NetError::NotTap(tap.to_string()));
        }
    } else {
        // multi_queue: one TAP queue per virtio-net queue pair (a TAP made
        // without it gives the VM one pair).
        run(
            "ip",
            &["tuntap", "add", "dev", tap, "mode", "tap", "multi_queue"],
            None,
        )?;
    }
    // Filtering first: the TAP is never up on the bridge without it.
    if filter {
        run("nft", &["-f", "-"], Some(&super::up_script(port)))?;
    }
    if let Some(br) = bridge {
        run("ip", &["link", "set", "dev", tap, "master", br], None)?;
    }
    run("ip", &["link", "set", "dev", tap, "up"], None)?;
    Ok(())
}

/// Removes the TAP's filtering, whatever of it is there. The TAP stays
/// (it may be the operator's own), down once no VMM holds it.
pub fn down(tap: &str) -> Result<(), NetError> {
    let Some(existing) = existing()? else {
        return Ok(());
    };
    let script = super::down_script(tap, &existing);
    if !script.is_empty() {
        run("nft", &["-f", "-"], Some(&script))?;
    }
    Ok(())
}

/// The table's chains, sets and claims; `None` when there is no table, or
/// no nft at all: no VM was ever filtered here.
fn existing() -> Result<Option<super::Existing>, NetError> {
    let listing = match run(
        "nft",
        &["-j", "list", "table", "netdev", super::TABLE],
        None,
    ) {
        Ok(text) => text,
        Err(NetError::Failed { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(None)
        }
        Err(NetError::Missing(..)) => return Ok(None),
        Err(e) => return Err(e),
    };
    super::Existing::from_json(&listing)
        .map(Some)
        .ok_or_else(|| NetError::Failed {
            cmd: "nft -j list table".into(),
            stderr: "its output is not nft's JSON".into(),
        })
}

/// Writes (atomically: dnsmasq watches the directory) or removes the VM's
/// DHCP lease file `dir/NAME`.
pub fn write_leases(dir: &Path, name: &str, text: &str) -> Result<(), NetError> {
    let path = dir.join(name);
    let err = |p: &Path, e: std::io::Error| NetError::Write {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    if text.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(&path, e)),
            _ => Ok(()),
        };
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    // dnsmasq reads every file in the directory: the temporary name is a
    // hidden one it skips.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))
}
