//! The operator's `backup` request: a crash-consistent copy of one of the
//! VM's disks, taken while the guest runs (the copying itself is the disk
//! device's: `devices::virtio::block::backup`).
//!
//! Who: root or the VMM's owner only ([`PeerIdentity::operator`]); a
//! customer's connection gets `forbidden`. Where: a new file in the VM's
//! `--backup-dir` (the only directory the sandbox opens for it). The copy
//! is written as `NAME.part` and renamed to `NAME` once complete and
//! synced, so a file by the asked name is always a whole copy; a failed
//! copy's part is removed. The answer comes when the copy is complete;
//! `backup_started` tells subscribers the instant it copies.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::{BackupInbox, BackupReport, BackupRequest, BackupSubmitError};
use protocol::{BackupInfo, ControlError, ErrorCode, Event, Reply};

use crate::control::{PeerIdentity, Responder};
use crate::vm::{Publish, Vm};

/// A checked `backup` request, ready to start.
pub struct Prepared {
    disk: String,
    inbox: BackupInbox,
    path: PathBuf,
    part: PathBuf,
    bytes_per_s: Option<u64>,
}

/// Checks a `backup` request against the VM (with its lock held): who asks,
/// which disk, where to.
pub fn prepare(
    vm: &Vm,
    peer: &PeerIdentity,
    disk: &str,
    to: &str,
    speed_mib_s: Option<u64>,
) -> Result<Prepared, ControlError> {
    peer.require_operator("backup")?;
    vm.refuse_while_snapshotting()?;
    let Some(dir) = vm.config.backup_dir.as_deref() else {
        return Err(ControlError::new(
            ErrorCode::Unsupported,
            "this VM has no --backup-dir: the operator names the directory backups go to",
        ));
    };
    let source = vm.find_disk(disk)?;
    let path = target(dir, to).map_err(|e| ControlError::new(ErrorCode::BadRequest, e))?;
    if path.symlink_metadata().is_ok() {
        return Err(ControlError::new(
            ErrorCode::BadRequest,
            format!("{} exists: a backup never replaces a file", path.display()),
        ));
    }
    let mut part = path.clone().into_os_string();
    part.push(".part");
    Ok(Prepared {
        disk: source.id.clone(),
        inbox: source.backup.clone(),
        path,
        part: PathBuf::from(part),
        bytes_per_s: speed_mib_s
            .filter(|&s| s > 0)
            .map(|s| s.saturating_mul(1 << 20)),
    })
}

/// Where `to` puts the copy: a file directly in `dir` (a bare name is taken
/// as one there). Lexical: no `..`, nothing outside `dir`.
pub fn target(dir: &Path, to: &str) -> Result<PathBuf, String> {
    entry_in(dir, to).map_err(|dir| {
        format!(
            "'{to}': the copy must be a file directly in the backup directory {} \
             (a bare name is taken as one there; not ending in .part)",
            dir.display()
        )
    })
}

/// `to` as a new entry directly in the operator's directory `dir` (a bare
/// name is taken as one there), not ending in `.part` (the name a copy in
/// progress has). Lexical: no `..`, nothing outside `dir`. On refusal,
/// `dir` made absolute, for the message.
pub fn entry_in(dir: &Path, to: &str) -> Result<PathBuf, PathBuf> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let asked = Path::new(to);
    let path = if asked.is_absolute() {
        asked.to_path_buf()
    } else {
        dir.join(asked)
    };
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    let name_ok = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.ends_with(".part"));
    if !plain || path.parent() != Some(dir.as_path()) || !name_ok {
        return Err(dir);
    }
    Ok(path)
}

impl Prepared {
    /// Creates the copy's file and hands the request to the disk's own I/O
    /// thread, which takes the instant between two guest requests; this
    /// thread never waits on the disk. `backup_started` is published at
    /// the instant; the answer goes to `responder` when the copy is
    /// complete (or refused, or failed).
    pub fn start(self, responder: Responder, publish: Publish) {
        let dst = match create(&self.part) {
            Ok(f) => f,
            Err(e) => {
                responder.error(ControlError::new(
                    ErrorCode::HostError,
                    format!("cannot create {}: {e}", self.part.display()),
                ));
                return;
            }
        };
        let pause_us = Arc::new(AtomicU64::new(0));
        let Prepared {
            disk,
            inbox,
            path,
            part,
            bytes_per_s,
        } = self;
        let (d, p, pause) = (disk.clone(), path.clone(), pause_us.clone());
        let done = move |r: Result<BackupReport, String>| {
            let r = r.and_then(|report| {
                std::fs::rename(&part, &p)
                    .map(|()| report)
                    .map_err(|e| format!("cannot rename {} into place: {e}", part.display()))
            });
            match r {
                Ok(report) => {
                    let info = info(&d, &p, &report, pause.load(Ordering::Relaxed));
                    tracing::info!(
                        "backup of {d} to {}: {} bytes ({} of data) in {} ms, {} chunks copied \
                         ahead of guest writes",
                        p.display(),
                        info.size,
                        info.data_bytes,
                        info.duration_ms,
                        info.chunks_before_writes
                    );
                    responder.ok(Reply::Backup(info));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&part);
                    tracing::warn!("backup of {d} failed: {e}");
                    responder.error(ControlError::new(
                        ErrorCode::HostError,
                        format!("backup of {d} failed: {e}"),
                    ));
                }
            }
        };
        let t0 = Instant::now();
        let started_disk = disk.clone();
        let started = move || {
            pause_us.store(
                u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            publish(Event::BackupStarted { disk: started_disk });
        };
        let req = BackupRequest {
            dst,
            bytes_per_s,
            done: Box::new(done),
            started: Some(Box::new(started)),
        };
        if let Err((why, req)) = inbox.submit(req) {
            let why = match why {
                BackupSubmitError::Busy => format!("a backup of {disk} is already starting"),
                BackupSubmitError::Gone => format!("the device of {disk} takes no backups"),
            };
            // Its `done` answers, as for any refused copy, and removes the part.
            drop(req.dst);
            (req.done)(Err(why));
        }
    }
}

fn info(disk: &str, path: &Path, r: &BackupReport, pause_us: u64) -> BackupInfo {
    let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    BackupInfo {
        disk: disk.to_string(),
        path: path.display().to_string(),
        size: r.size,
        data_bytes: r.data_bytes,
        pause_us,
        chunks_before_writes: r.chunks_before_writes,
        write_delay_us: us(r.write_delay),
        duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
    }
}

/// A new file for the copy, the operator's only (never through a link,
/// never over an existing file: a part left by a VMM that died is the
/// operator's to remove).
fn create(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_goes_directly_into_the_backup_directory() {
        let dir = Path::new("/var/backups/vmm/web1");
        assert_eq!(
            target(dir, "root.img").unwrap(),
            PathBuf::from("/var/backups/vmm/web1/root.img")
        );
        assert_eq!(
            target(dir, "/var/backups/vmm/web1/root.img").unwrap(),
            PathBuf::from("/var/backups/vmm/web1/root.img")
        );
    }

    #[test]
    fn a_copy_outside_the_backup_directory_is_refused() {
        let dir = Path::new("/var/backups/vmm/web1");
        for to in [
            "../web2/root.img",
            "/var/backups/vmm/web2/root.img",
            "/etc/passwd",
            "sub/root.img",
            "/var/backups/vmm/web1/../web1/root.img",
            "/var/backups/vmm/web1",
            "root.img.part",
            ".",
        ] {
            let e = target(dir, to).unwrap_err();
            assert!(e.contains("directly in the backup directory"), "{to}: {e}");
        }
    }
}
