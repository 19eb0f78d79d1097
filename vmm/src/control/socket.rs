//! The socket file: its directory, stale-socket handling, permissions, removal.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::ControlError;

/// Mode of the socket file: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of a per-VM directory the VMM creates.
pub const DIR_MODE: u32 = 0o750;

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// Creates `dir` (mode 0750, group `gid`) if it is missing; missing ancestors get 0755 so users
/// can reach their VMs' directories. An existing directory is left as the operator set it up.
fn ensure_dir(dir: &Path, gid: Option<u32>) -> Result<(), ControlError> {
    let err = |source| ControlError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(err)?;
        }
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(err(e)),
    }
    // The umask may have removed bits; the group needs r-x.
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(err)?;
    if let Some(gid) = gid {
        chown_group(dir, gid).map_err(err)?;
    }
    Ok(())
}

/// Removes a socket file left by a VMM that died; refuses when a VMM still listens there or
/// when the path is not a socket.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ControlError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyListening(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale control socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ControlError::Bind {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(source) => Err(ControlError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The bound socket file; removed on drop if it is still ours.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// Prepares the directory, clears a stale socket, binds (nonblocking), sets mode 0660 and the
/// group.
pub(crate) fn bind(
    path: &Path,
    gid: Option<u32>,
) -> Result<(UnixListener, SocketFile), ControlError> {
    let dir = path.parent().unwrap_or(Path::new(""));
    ensure_dir(dir, gid)?;
    clear_stale(path)?;
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            ControlError::AlreadyListening(path.to_path_buf())
        } else {
            bind_err(e)
        }
    })?;
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let perm_err = |source| ControlError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(perm_err)?;
    if let Some(gid) = gid {
        chown_group(path, gid).map_err(perm_err)?;
    }
    Ok((listener, file))
}
