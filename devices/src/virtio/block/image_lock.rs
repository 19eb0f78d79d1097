//! The image's `flock`: exclusive for a writable disk, shared for a
//! read-only one, so that no second VMM writes an image in use. A live
//! migration hands it over: the source lets go once its guest has stopped
//! for good, the target takes it before its guest runs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Block, BlockError};

/// Takes the lock on `file` without waiting.
pub(super) fn flock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: `file` owns a valid descriptor; flock touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            BlockError::Locked {
                path: path.to_path_buf(),
            }
        } else {
            BlockError::Lock {
                path: path.to_path_buf(),
                source: e,
            }
        });
    }
    Ok(())
}

/// The disk's image lock, usable without the device's lock (which its I/O
/// thread holds through synchronous I/O). A duplicate of the image's
/// descriptor: the same open file, hence the same `flock`.
#[derive(Clone)]
pub struct ImageLock {
    file: Arc<File>,
    path: PathBuf,
    read_only: bool,
}

impl ImageLock {
    /// Lets go of the lock (the guest will not write through this VMM
    /// again unless it is taken back).
    pub fn release(&self) -> io::Result<()> {
        // SAFETY: a descriptor this handle owns; flock touches no memory.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the lock, or says who has it.
    pub fn acquire(&self) -> Result<(), BlockError> {
        flock(&self.file, &self.path, self.read_only)
    }

    /// Whether `other` is this image (the same device and inode): a file
    /// opened again by its path may be another one if the path changed.
    pub fn same_file(&self, other: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), other.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && a.rdev() == b.rdev(),
            _ => false,
        }
    }
}

impl Block {
    /// A handle on this disk's image lock.
    pub fn image_lock(&self) -> io::Result<ImageLock> {
        Ok(ImageLock {
            file: Arc::new(self.disk.file.try_clone()?),
            path: self.disk.path.clone(),
            read_only: self.disk.read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{BlockConfig, IoEngine};

    fn cfg(path: &Path) -> BlockConfig {
        BlockConfig {
            path: path.to_path_buf(),
            read_only: false,
            id: None,
            direct: false,
            engine: IoEngine::Sync,
            queues: 1,
            poll: Default::default(),
            limits: Default::default(),
        }
    }

    #[test]
    fn an_image_handed_over_is_locked_by_one_device_at_a_time() {
        let p = std::env::temp_dir().join(format!("vmm-lock-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let source = Block::new(&cfg(&p)).unwrap();
        assert!(matches!(
            Block::new(&cfg(&p)),
            Err(BlockError::Locked { .. })
        ));
        let target = Block::new_unlocked(&cfg(&p)).unwrap();
        let (s, t) = (source.image_lock().unwrap(), target.image_lock().unwrap());
        assert!(matches!(t.acquire(), Err(BlockError::Locked { .. })));
        s.release().unwrap();
        t.acquire().unwrap();
        assert!(matches!(s.acquire(), Err(BlockError::Locked { .. })));
        drop((source, target, s, t));
        std::fs::remove_file(p).unwrap();
    }
}
