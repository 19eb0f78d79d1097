//! The console log file: a writer thread fed through a capped queue (the
//! vCPU printing never waits on the disk), and a size cap with rotation so
//! a guest printing without end cannot fill the host's disk: when the file
//! would pass [`LogLimits::max_bytes`] it becomes `PATH.1` (`PATH.1` becomes
//! `PATH.2`, and so on up to [`LogLimits::keep`]; the oldest is deleted) and
//! a new `PATH` starts. The files are opened with `O_NOFOLLOW`: a link
//! planted where the log goes is refused, not followed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{lock, ConsoleError, DropQueue};

/// Backlog of the log-file writer before its oldest pending bytes are dropped.
const LOG_BACKLOG: usize = 4 * 1024 * 1024;

/// The console log's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// A file is rotated before it grows past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` … `PATH.keep`); 0 keeps none.
    pub keep: u32,
}

impl LogLimits {
    pub const DEFAULT_MAX_MIB: u64 = 64;
    pub const DEFAULT_KEEP: u32 = 2;
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            max_bytes: Self::DEFAULT_MAX_MIB << 20,
            keep: Self::DEFAULT_KEEP,
        }
    }
}

fn open_log(path: &Path, create_new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if create_new {
        // Right after the rename nothing may be there; anything that is was planted.
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.open(path)
}

/// An open log file that knows its size and rotates itself.
pub(super) struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    limits: LogLimits,
}

impl RotatingLog {
    pub(super) fn open(path: &Path, limits: LogLimits) -> io::Result<Self> {
        let file = open_log(path, false)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            limits: LogLimits {
                max_bytes: limits.max_bytes.max(1),
                ..limits
            },
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.limits.keep == 0 {
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        } else {
            std::fs::remove_file(self.rotated(self.limits.keep)).or_else(ignore_missing)?;
            for n in (1..self.limits.keep).rev() {
                std::fs::rename(self.rotated(n), self.rotated(n + 1)).or_else(ignore_missing)?;
            }
            std::fs::rename(&self.path, self.rotated(1)).or_else(ignore_missing)?;
        }
        self.file = open_log(&self.path, true)?;
        self.size = 0;
        Ok(())
    }

    /// Appends `bytes`, rotating as often as the cap requires.
    pub(super) fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.size >= self.limits.max_bytes {
                // Someone may have truncated it (logrotate's copytruncate): believe the file.
                self.size = self.file.metadata()?.len();
                if self.size >= self.limits.max_bytes {
                    self.rotate()?;
                }
            }
            let room = self.limits.max_bytes - self.size;
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(bytes.len());
            self.file.write_all(&bytes[..n])?;
            self.size += n as u64;
            bytes = &bytes[n..];
        }
        Ok(())
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

struct LogShared {
    queue: Mutex<(DropQueue, bool)>,
    cond: Condvar,
}

pub(super) struct LogWriter {
    shared: Arc<LogShared>,
    state: Mutex<WriterState>,
}

/// The log file until its writer thread starts, then the thread.
enum WriterState {
    /// Opened, not yet written: the VMM confines itself (sandbox.rs) before
    /// it starts any thread; output queues meanwhile.
    Deferred(RotatingLog, String),
    Running(JoinHandle<()>),
    Done,
}

impl LogWriter {
    /// Opens the log; its writer thread starts now, or at [`Self::begin`]
    /// when `defer`.
    pub(super) fn start(path: &Path, limits: LogLimits, defer: bool) -> Result<Self, ConsoleError> {
        let log = RotatingLog::open(path, limits).map_err(|source| ConsoleError::OpenLog {
            path: path.to_path_buf(),
            source,
        })?;
        let shared = Arc::new(LogShared {
            queue: Mutex::new((DropQueue::new(LOG_BACKLOG), false)),
            cond: Condvar::new(),
        });
        let writer = LogWriter {
            shared,
            state: Mutex::new(WriterState::Deferred(log, path.display().to_string())),
        };
        if !defer {
            writer.begin()?;
        }
        Ok(writer)
    }

    /// Starts the writer thread (once; later calls do nothing).
    pub(super) fn begin(&self) -> Result<(), ConsoleError> {
        let mut state = lock(&self.state);
        let (log, display) = match std::mem::replace(&mut *state, WriterState::Done) {
            WriterState::Deferred(log, display) => (log, display),
            started => {
                *state = started;
                return Ok(());
            }
        };
        let thread_shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("console-log".into())
            .spawn(move || {
                crate::seccomp::install(crate::seccomp::Kind::ConsoleLog);
                log_writer_thread(log, &thread_shared, &display)
            })
            .map_err(ConsoleError::LogThread)?;
        *state = WriterState::Running(thread);
        Ok(())
    }

    pub(super) fn push(&self, bytes: &[u8]) {
        if lock(&self.shared.queue).0.push(bytes) {
            self.shared.cond.notify_one();
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        lock(&self.shared.queue).1 = true;
        self.shared.cond.notify_one();
        match std::mem::replace(&mut *lock(&self.state), WriterState::Done) {
            // The writer flushes what is queued and exits; a panic there is already reported.
            WriterState::Running(thread) => {
                let _ = thread.join();
            }
            // Never started: what is queued is written here.
            WriterState::Deferred(log, display) => log_writer_thread(log, &self.shared, &display),
            WriterState::Done => {}
        }
    }
}

fn log_writer_thread(mut log: RotatingLog, shared: &LogShared, path: &str) {
    let mut chunk = Vec::with_capacity(64 * 1024);
    let mut failing = false;
    loop {
        let closed = {
            let mut guard = lock(&shared.queue);
            while guard.0.is_empty() && !guard.1 {
                guard = shared.cond.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            chunk.clear();
            guard.0.take(usize::MAX, &mut chunk);
            guard.1
        };
        if !chunk.is_empty() {
            match log.write(&chunk) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("console log {path}: write failed: {e}");
                }
                Err(_) => {}
            }
        }
        if closed && lock(&shared.queue).0.is_empty() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-logfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn a_full_log_rotates_and_keeps_only_the_configured_files() {
        let d = dir("rotate");
        let path = d.join("console.log");
        let limits = LogLimits {
            max_bytes: 10,
            keep: 2,
        };
        let mut log = RotatingLog::open(&path, limits).unwrap();
        log.write(b"0123456789abcdefghij").unwrap();
        log.write(b"ABCDE").unwrap();
        log.write(b"FGHIJKLMNOP").unwrap();
        assert_eq!(read(&path), "KLMNOP");
        assert_eq!(read(&d.join("console.log.1")), "ABCDEFGHIJ");
        assert_eq!(read(&d.join("console.log.2")), "abcdefghij");
        assert!(
            !d.join("console.log.3").exists(),
            "more files kept than asked"
        );
        let total: u64 = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 10 * 3, "{total} bytes on disk");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn keep_zero_starts_the_log_over() {
        let d = dir("keep0");
        let path = d.join("c.log");
        let mut log = RotatingLog::open(
            &path,
            LogLimits {
                max_bytes: 4,
                keep: 0,
            },
        )
        .unwrap();
        log.write(b"aaaabbbbcc").unwrap();
        assert_eq!(read(&path), "cc");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn an_existing_log_is_appended_to_and_counted_against_the_cap() {
        let d = dir("append");
        let path = d.join("c.log");
        std::fs::write(&path, "12345678").unwrap();
        let mut log = RotatingLog::open(
            &path,
            LogLimits {
                max_bytes: 10,
                keep: 1,
            },
        )
        .unwrap();
        log.write(b"9012").unwrap();
        assert_eq!(read(&d.join("c.log.1")), "1234567890");
        assert_eq!(read(&path), "12");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_log_truncated_by_logrotate_is_not_rotated_early() {
        let d = dir("truncated");
        let path = d.join("c.log");
        let mut log = RotatingLog::open(
            &path,
            LogLimits {
                max_bytes: 10,
                keep: 1,
            },
        )
        .unwrap();
        log.write(b"0123456789").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        log.write(b"abc").unwrap();
        assert_eq!(read(&path), "abc");
        assert!(!d.join("c.log.1").exists());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_link_planted_where_the_log_goes_is_refused() {
        let d = dir("link");
        let target = d.join("victim");
        std::fs::write(&target, "precious").unwrap();
        let path = d.join("c.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = LogWriter::start(&path, LogLimits::default(), false)
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot open console log"), "{e}");
        // And at rotation: a link planted at PATH.1 is replaced, not written through.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, d.join("c.log.1")).unwrap();
        let mut log = RotatingLog::open(
            &path,
            LogLimits {
                max_bytes: 2,
                keep: 1,
            },
        )
        .unwrap();
        log.write(b"abcd").unwrap();
        assert_eq!(read(&target), "precious");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn a_deferred_log_keeps_what_came_before_its_thread_started() {
        let d = dir("deferred");
        let path = d.join("c.log");
        let w = LogWriter::start(&path, LogLimits::default(), true).unwrap();
        w.push(b"early ");
        assert_eq!(
            read(&path),
            "",
            "nothing is written before the thread starts"
        );
        w.begin().unwrap();
        w.begin().unwrap();
        w.push(b"late");
        drop(w);
        assert_eq!(read(&path), "early late");
        // Never started: dropping it still writes what was queued.
        let w = LogWriter::start(&path, LogLimits::default(), true).unwrap();
        w.push(b"!");
        drop(w);
        assert_eq!(read(&path), "early late!");
        std::fs::remove_dir_all(&d).ok();
    }
}
