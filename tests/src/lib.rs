//! Fixtures for the end-to-end tests: locate the built binaries and the
//! kernel library, run a VMM process with its console on pipes, wait for
//! console output, and assemble tiny guests.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod control;
pub mod pty;
pub mod tiny;
pub mod tiny_virtio;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a binary built by this workspace (same profile as the tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/test-xxxx -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(name)
}

/// The kernel library built by resources/build-kernels.sh.
pub fn kernel_dir() -> PathBuf {
    std::env::var_os("KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build/kernels"))
}

/// Skips (returns None) with a printed reason when a library entry is absent,
/// unless VMM_REQUIRE_KERNELS=1 (CI), where it panics.
pub fn library_entry(name: &str) -> Option<PathBuf> {
    let p = kernel_dir().join(name);
    if p.join("bzImage").is_file() {
        return Some(p);
    }
    let msg = format!(
        "kernel library entry {} missing: run resources/build-kernels.sh",
        p.display()
    );
    if std::env::var("VMM_REQUIRE_KERNELS").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIP: {msg}");
    None
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vmm-e2e-{tag}-{}-{}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b)
}

#[derive(Default)]
struct Shared {
    out: Vec<u8>,
    closed: bool,
}

/// A running `vmm` process with its console on pipes.
pub struct VmmProcess {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<(Mutex<Shared>, Condvar)>,
    stderr: Arc<(Mutex<Shared>, Condvar)>,
    status: Option<ExitStatus>,
}

fn pump(mut r: impl Read + Send + 'static, sh: Arc<(Mutex<Shared>, Condvar)>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = r.read(&mut buf).unwrap_or(0);
            let mut g = sh.0.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                g.closed = true;
                sh.1.notify_all();
                return;
            }
            g.out.extend_from_slice(&buf[..n]);
            sh.1.notify_all();
        }
    });
}

impl VmmProcess {
    /// Starts the vmm binary with `args` and `--console stdio`.
    pub fn spawn(args: &[&str]) -> VmmProcess {
        Self::spawn_cmd(
            Command::new(bin("vmm"))
                .args(args)
                .args(["--console", "stdio"]),
        )
    }

    pub fn spawn_cmd(cmd: &mut Command) -> VmmProcess {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmm");
        let stdout = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let stderr = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        pump(child.stdout.take().expect("stdout"), stdout.clone());
        pump(child.stderr.take().expect("stderr"), stderr.clone());
        let stdin = child.stdin.take();
        VmmProcess {
            child,
            stdin,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn output(&self) -> String {
        let g = self.stdout.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&g.out).into_owned()
    }

    pub fn stderr(&self) -> String {
        let g = self.stderr.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&g.out).into_owned()
    }

    /// Waits until the console output contains `needle` `count` times.
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.stdout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if String::from_utf8_lossy(&g.out).matches(needle).count() >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || g.closed {
                return false;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Types into the guest's console.
    pub fn send(&mut self, s: &str) {
        if let Some(i) = &mut self.stdin {
            let _ = i.write_all(s.as_bytes());
            let _ = i.flush();
        }
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.status {
            return Some(s);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_alive(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// A report for assertion messages: the tail of stdout and stderr.
    pub fn report(&self) -> String {
        let out = self.output();
        let tail: String = out
            .chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "--- console (tail) ---\n{tail}\n--- stderr ---\n{}",
            self.stderr()
        )
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.is_alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
