//! Fixtures for the end-to-end tests: locate the built binaries and the
//! kernel library, run a VMM process with its console on pipes, wait for
//! console output, and assemble tiny guests.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub mod control;
pub mod guest;
pub mod host;
pub mod pty;
pub mod testhost;
pub mod tiny;
pub mod tiny_virtio;

pub use host::{host, Host, Proc};

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
    // A test: target/<profile>/deps/test-xxxx; a binary (a benchmark):
    // target/<profile>/<bin>. Either way target/<profile>/<name>.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
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

pub fn rand_u64() -> u64 {
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

/// A running `vmm` process with its console on pipes, on this machine or
/// in the test host.
pub struct VmmProcess {
    pub child: Proc,
    stdin: Option<Box<dyn Write + Send>>,
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

/// Waits until the pump behind `sh` has read its pipe to the end, or
/// `deadline`.
fn drained(sh: &(Mutex<Shared>, Condvar), deadline: Instant) {
    let (m, cv) = sh;
    let g = m.lock().unwrap_or_else(|e| e.into_inner());
    let _ = cv.wait_timeout_while(g, deadline.saturating_duration_since(Instant::now()), |s| {
        !s.closed
    });
}

impl VmmProcess {
    /// Starts the vmm binary on this machine with `args` and `--console stdio`.
    pub fn spawn(args: &[&str]) -> VmmProcess {
        Self::spawn_cmd(
            Command::new(bin("vmm"))
                .args(args)
                .args(["--console", "stdio"]),
        )
    }

    /// Starts the vmm binary on `host` with `args` and `--console stdio`.
    pub fn spawn_on(host: &Host, args: &[&str]) -> VmmProcess {
        Self::spawn_on_with(host, &[], args)
    }

    /// The same, the command line behind `prefix` (e.g. `ip netns exec NS`).
    pub fn spawn_on_with(host: &Host, prefix: &[&str], args: &[&str]) -> VmmProcess {
        crate::guest::settle_vms(host);
        let vmm = bin("vmm");
        let mut argv = prefix.to_vec();
        argv.push(vmm.to_str().unwrap_or("vmm"));
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--console", "stdio"]);
        let proc = host
            .spawn(&argv, &[])
            .unwrap_or_else(|e| panic!("start vmm: {e}\n{}", host.report()));
        Self::from_proc(proc)
    }

    pub fn spawn_cmd(cmd: &mut Command) -> VmmProcess {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmm");
        Self::from_proc(Proc::Local(child))
    }

    pub fn from_proc(mut child: Proc) -> VmmProcess {
        let stdout = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let stderr = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        for (pipe, sh) in [
            (child.take_stdout(), &stdout),
            (child.take_stderr(), &stderr),
        ] {
            match pipe {
                Some(p) => pump(p, sh.clone()),
                None => sh.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true,
            }
        }
        let stdin = child.take_stdin();
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

    /// The console output from byte `from` on (see [`VmmProcess::len`]).
    pub fn output_from(&self, from: usize) -> String {
        let g = self.stdout.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(g.out.get(from..).unwrap_or_default()).into_owned()
    }

    /// How many console bytes have arrived so far.
    pub fn len(&self) -> usize {
        let g = self.stdout.0.lock().unwrap_or_else(|e| e.into_inner());
        g.out.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of its stderr that outlives it (for post-mortems).
    pub fn stderr_reader(&self) -> impl Fn() -> String + Send + 'static {
        let e = self.stderr.clone();
        move || {
            let g = e.0.lock().unwrap_or_else(|e| e.into_inner());
            String::from_utf8_lossy(&g.out).into_owned()
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr_reader()()
    }

    /// Waits until the console output from byte `from` on satisfies `pred`;
    /// returns what it found.
    pub fn wait_until<T>(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.stdout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let text = String::from_utf8_lossy(g.out.get(from..).unwrap_or_default());
            if let Some(t) = pred(&text) {
                return Some(t);
            }
            let now = Instant::now();
            if now >= deadline || g.closed {
                return None;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the console output contains `needle` `count` times.
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        self.wait_until(0, timeout, |t| {
            (t.matches(needle).count() >= count).then_some(())
        })
        .is_some()
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
        let s = self.child.wait_timeout(timeout);
        self.status = s;
        if s.is_some() {
            // The process is gone, but its last words may still be in the
            // pipes: a caller reading stderr right after this must see
            // them (a missing-snapshot error read too early was empty).
            // Bounded, since a grandchild may hold a pipe open.
            let deadline = Instant::now() + Duration::from_secs(5);
            drained(&self.stdout, deadline);
            drained(&self.stderr, deadline);
        }
        s
    }

    pub fn is_alive(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait();
        }
        self.status.is_none()
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
        // The whole console, for a failure whose cause is further back.
        let path = std::env::temp_dir().join(format!(
            "vmm-test-console-{}-{}.log",
            std::process::id(),
            rand_u64() % 1_000_000
        ));
        let saved = match std::fs::write(&path, out.as_bytes()) {
            Ok(()) => format!("whole console: {}", path.display()),
            Err(e) => format!("whole console not saved: {e}"),
        };
        format!(
            "--- console (tail; {saved}) ---\n{tail}\n--- stderr ---\n{}",
            self.stderr()
        )
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if self.is_alive() {
            let _ = self.child.kill();
            let _ = self.child.wait_timeout(Duration::from_secs(5));
        }
    }
}
