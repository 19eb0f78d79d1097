//! A child process with its stdout/stderr captured (each chunk stamped with
//! its arrival time) and its exit time taken by a waiter thread the moment
//! the process ends.

use std::io::Read;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct CapData {
    buf: Vec<u8>,
    /// (end offset of a chunk, when it arrived)
    marks: Vec<(usize, Instant)>,
    closed: bool,
}

/// Output of one pipe, growing as the child writes.
#[derive(Default)]
pub struct Capture {
    data: Mutex<CapData>,
    cv: Condvar,
}

impl Capture {
    fn pump(self: Arc<Self>, mut r: impl Read + Send + 'static) {
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                let n = r.read(&mut chunk).unwrap_or(0);
                let now = Instant::now();
                let mut g = lock(&self.data);
                if n == 0 {
                    g.closed = true;
                    self.cv.notify_all();
                    return;
                }
                g.buf.extend_from_slice(&chunk[..n]);
                let end = g.buf.len();
                g.marks.push((end, now));
                self.cv.notify_all();
            }
        });
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.data).buf).into_owned()
    }

    pub fn len(&self) -> usize {
        lock(&self.data).buf.len()
    }

    /// Waits until the writer closed its end (the process ended).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.data);
        while !g.closed {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits until one of `needles` occurs at or after byte `from`; returns
    /// which one, when the chunk completing it arrived, and the offset just
    /// past it.
    pub fn wait_any(
        &self,
        needles: &[&str],
        from: usize,
        timeout: Duration,
    ) -> Option<(usize, Instant, usize)> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.data);
        loop {
            let hay = g.buf.get(from..).unwrap_or_default();
            let mut best: Option<(usize, usize)> = None; // (end, index)
            for (i, n) in needles.iter().enumerate() {
                if let Some(pos) = find(hay, n.as_bytes()) {
                    let end = from + pos + n.len();
                    if best.is_none_or(|(e, _)| end < e) {
                        best = Some((end, i));
                    }
                }
            }
            if let Some((end, i)) = best {
                let at = g
                    .marks
                    .iter()
                    .find(|(e, _)| *e >= end)
                    .map(|(_, t)| *t)
                    .unwrap_or_else(Instant::now);
                return Some((i, at, end));
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Default)]
struct ExitState {
    /// Set (under the lock) before the child is reaped, so a kill by pid
    /// under the same lock can never hit a reused pid.
    exited_at: Option<Instant>,
    status: Option<ExitStatus>,
    wait_error: Option<String>,
}

/// A spawned process; killed (by its pid, only while it is unreaped) on drop.
pub struct Proc {
    pub pid: u32,
    pub spawned: Instant,
    pub spawned_wall: SystemTime,
    pub out: Arc<Capture>,
    pub err: Arc<Capture>,
    _stdin: Option<ChildStdin>,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
}

impl Proc {
    /// Spawns `cmd` with stdin a held-open pipe and stdout/stderr captured.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Proc, String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned_wall = SystemTime::now();
        let spawned = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {what} ({:?}): {e}", cmd.get_program()))?;
        let out = Arc::new(Capture::default());
        let err = Arc::new(Capture::default());
        if let Some(o) = child.stdout.take() {
            out.clone().pump(o);
        }
        if let Some(e) = child.stderr.take() {
            err.clone().pump(e);
        }
        let stdin = child.stdin.take();
        let pid = child.id();
        let exit = Arc::new((Mutex::new(ExitState::default()), Condvar::new()));
        let ex = exit.clone();
        std::thread::spawn(move || waiter(child, ex));
        Ok(Proc {
            pid,
            spawned,
            spawned_wall,
            out,
            err,
            _stdin: stdin,
            exit,
        })
    }

    /// Waits for the process to end: its status and when it ended.
    pub fn wait_exit(&self, timeout: Duration) -> Option<(ExitStatus, Instant)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.exit;
        let mut g = lock(m);
        loop {
            if let (Some(s), Some(t)) = (g.status, g.exited_at) {
                return Some((s, t));
            }
            if g.wait_error.is_some() {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn alive(&self) -> bool {
        lock(&self.exit.0).exited_at.is_none()
    }

    /// SIGKILL unless it has already ended, then waits until it is reaped.
    pub fn kill(&self) {
        {
            let g = lock(&self.exit.0);
            if g.exited_at.is_none() {
                // SAFETY: plain syscall on a pid we spawned and that has not
                // been reaped yet (the waiter reaps only after setting
                // `exited_at`, which we checked under the same lock).
                unsafe {
                    libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        let _ = self.wait_exit(Duration::from_secs(10));
    }

    /// `describe` after giving a process whose output just closed a moment
    /// to be reaped (so it reads "exited with ..." rather than "running").
    pub fn ended(&self) -> String {
        if self.out.wait_closed(Duration::ZERO) {
            let _ = self.wait_exit(Duration::from_secs(2));
        }
        self.describe()
    }

    /// One line describing how it ended and the tail of its stderr.
    pub fn describe(&self) -> String {
        let g = lock(&self.exit.0);
        let how = match (g.status, &g.wait_error) {
            (Some(s), _) => format!("exited with {s}"),
            (None, Some(e)) => format!("wait failed: {e}"),
            _ => "still running".to_string(),
        };
        drop(g);
        let err = self.err.text();
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        let tail: Vec<String> = tail.iter().rev().map(|l| strip_ansi(l)).collect();
        if tail.is_empty() {
            how
        } else {
            format!("{how}; stderr: {}", tail.join(" | "))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn waiter(mut child: Child, exit: Arc<(Mutex<ExitState>, Condvar)>) {
    let pid = child.id();
    // SAFETY: siginfo_t is plain data; zeroed is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = loop {
        // SAFETY: waits (without reaping: WNOWAIT) for our own child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break r;
        }
    };
    let now = Instant::now();
    let (m, cv) = &*exit;
    if r != 0 {
        let e = std::io::Error::last_os_error();
        lock(m).wait_error = Some(e.to_string());
        cv.notify_all();
        return;
    }
    lock(m).exited_at = Some(now);
    let st = child.wait();
    let mut g = lock(m);
    match st {
        Ok(s) => g.status = Some(s),
        Err(e) => g.wait_error = Some(e.to_string()),
    }
    cv.notify_all();
}

/// Removes ANSI colour sequences (the vmm's tracing output has them).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
