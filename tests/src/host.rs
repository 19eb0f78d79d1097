//! Where the end-to-end tests run guests: on this machine's own `/dev/kvm`
//! when it is hardware KVM, else inside a test host (see `testhost`).
//! Tests say what to run through [`Host`]; the same test runs either way.
//!
//! `VMM_TESTHOST=1` forces the test host, `VMM_TESTHOST=0` this machine;
//! unset (or `auto`), the choice follows [`hardware_kvm`].

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::testhost::{ExecOptions, RemoteChild, TestHost};

/// Is this machine's `/dev/kvm` hardware virtualization (kvm_intel or
/// kvm_amd, not the kvm_pvm software hypervisor, under which guest user
/// space cannot make system calls)?
pub fn hardware_kvm() -> bool {
    !Path::new("/sys/module/kvm_pvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

pub enum Host {
    /// This machine.
    Local,
    /// A test host booted for this test process.
    Test(TestHost),
}

/// The host tests use now; a test host that died is replaced (the old one
/// is leaked: it lives as long as the process anyway).
static HOST: Mutex<Option<&'static Host>> = Mutex::new(None);

/// The host of this test process, booted at the first call (and again
/// after a test host died).
pub fn host() -> &'static Host {
    let mut current = HOST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = *current {
        if h.is_alive() {
            return h;
        }
        eprintln!(
            "NOTE: the test host died (its emulator's fault, docs/notes.md); booting another\n{}",
            h.report()
        );
    }
    match choose() {
        Ok(h) => {
            let h: &'static Host = Box::leak(Box::new(h));
            *current = Some(h);
            h
        }
        Err(e) => panic!("{e}"),
    }
}

fn choose() -> Result<Host, String> {
    let want = std::env::var("VMM_TESTHOST").unwrap_or_default();
    let use_testhost = match want.as_str() {
        "0" | "off" => false,
        "1" | "on" => true,
        "" | "auto" => !hardware_kvm(),
        other => return Err(format!("VMM_TESTHOST={other}: expected 0, 1 or auto")),
    };
    if !use_testhost {
        eprintln!("guests run on this machine's /dev/kvm (hardware KVM)");
        return Ok(Host::Local);
    }
    let log = std::env::temp_dir().join(format!(
        "vmm-testhost-{}-{}.log",
        std::process::id(),
        crate::rand_u64() % 10_000
    ));
    let th = TestHost::boot(&crate::repo_root(), &crate::bin("vmm-testhost"), &log)?;
    eprintln!(
        "guests run in a test host (QEMU TCG, kvm_amd, Linux {}), up in {:.1} s; console: {}; \
         agent: {} (vmm-testhost exec --agent {} -- CMD)",
        th.release,
        th.boot_time.as_secs_f64(),
        th.log.display(),
        th.agent.addr,
        th.agent.addr,
    );
    Ok(Host::Test(th))
}

/// A test host of its own with systemd as PID 1 (an operator's host:
/// `qemu::Options::systemd`), for the tests of the systemd unit. It is
/// booted whatever this machine's KVM: the point is a real systemd that
/// the test may configure, which this machine's own is not.
pub fn boot_systemd_host() -> Result<Host, String> {
    let log = std::env::temp_dir().join(format!(
        "vmm-testhost-systemd-{}-{}.log",
        std::process::id(),
        crate::rand_u64() % 10_000
    ));
    let th = TestHost::boot_with(&crate::repo_root(), &crate::bin("vmm-testhost"), &log, true)?;
    eprintln!(
        "a test host with systemd as PID 1 (Linux {}), up in {:.1} s; console: {}; agent: {}",
        th.release,
        th.boot_time.as_secs_f64(),
        th.log.display(),
        th.agent.addr,
    );
    Ok(Host::Test(th))
}

/// A process on a [`Host`].
pub enum Proc {
    Local(Child),
    Remote(RemoteChild),
}

/// The result of [`Host::sh`].
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// stdout, asserting that the command succeeded.
    pub fn ok(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self.stdout
    }
}

impl Proc {
    pub fn id(&self) -> u32 {
        match self {
            Proc::Local(c) => c.id(),
            Proc::Remote(c) => c.id(),
        }
    }

    pub fn take_stdin(&mut self) -> Option<Box<dyn Write + Send>> {
        match self {
            Proc::Local(c) => c.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>),
            Proc::Remote(c) => c.stdin.take().map(|s| Box::new(s) as Box<dyn Write + Send>),
        }
    }

    pub fn take_stdout(&mut self) -> Option<Box<dyn Read + Send>> {
        match self {
            Proc::Local(c) => c.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            Proc::Remote(c) => c.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        }
    }

    pub fn take_stderr(&mut self) -> Option<Box<dyn Read + Send>> {
        match self {
            Proc::Local(c) => c.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
            Proc::Remote(c) => c.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        }
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        match self {
            Proc::Local(c) => {
                // SAFETY: kill(2) of a child we spawned (not yet reaped: we hold it).
                if unsafe { libc::kill(c.id() as libc::pid_t, sig) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Proc::Remote(c) => c.signal(sig),
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> io::Result<()> {
        match self {
            Proc::Local(c) => c.kill(),
            Proc::Remote(c) => c.signal(libc::SIGKILL),
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        match self {
            Proc::Local(c) => c.try_wait().ok().flatten(),
            Proc::Remote(c) => c.try_wait(),
        }
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match self {
            Proc::Remote(c) => c.wait_timeout(timeout),
            Proc::Local(c) => {
                let deadline = Instant::now() + timeout;
                loop {
                    if let Ok(Some(s)) = c.try_wait() {
                        return Some(s);
                    }
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Proc::Local(c) = self {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A byte stream to a Unix socket on a [`Host`].
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Host {
    pub fn is_test_host(&self) -> bool {
        matches!(self, Host::Test(_))
    }

    /// False once a test host has died.
    pub fn is_alive(&self) -> bool {
        match self {
            Host::Local => true,
            Host::Test(th) => th.is_alive(),
        }
    }

    /// Starts `argv` with piped stdin, stdout and stderr, in a session of
    /// its own.
    pub fn spawn(&self, argv: &[&str], env: &[(&str, &str)]) -> io::Result<Proc> {
        self.spawn_with(argv, env, false)
    }

    /// Starts `argv` on a pseudo-terminal (its controlling terminal);
    /// stdin and stdout are the terminal's master side.
    pub fn spawn_pty(&self, argv: &[&str], env: &[(&str, &str)]) -> io::Result<Proc> {
        self.spawn_with(argv, env, true)
    }

    fn spawn_with(&self, argv: &[&str], env: &[(&str, &str)], pty: bool) -> io::Result<Proc> {
        match self {
            Host::Test(th) if th.known_dead() => Err(dead()),
            Host::Test(th) => {
                let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
                let opts = ExecOptions {
                    env: env
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    cwd: Some(crate::repo_root().display().to_string()),
                    pty,
                };
                th.agent
                    .spawn(&argv, &opts)
                    .map(Proc::Remote)
                    .inspect_err(|_| th.suspect())
            }
            Host::Local => {
                let (prog, args) = argv
                    .split_first()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
                let mut cmd = Command::new(prog);
                cmd.args(args).current_dir(crate::repo_root());
                for (k, v) in env {
                    cmd.env(k, v);
                }
                if pty {
                    let (master, slave) = crate::pty::open_pty();
                    crate::pty::attach_to_pty(&mut cmd, &slave);
                    let mut child = cmd.spawn()?;
                    drop(slave);
                    child.stdin = Some(std::process::ChildStdin::from(master.try_clone()?));
                    child.stdout = Some(std::process::ChildStdout::from(master));
                    Ok(Proc::Local(child))
                } else {
                    use std::os::unix::process::CommandExt;
                    cmd.stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .process_group(0);
                    cmd.spawn().map(Proc::Local)
                }
            }
        }
    }

    /// Runs a shell script (`sh -c`) to the end, at most `timeout`;
    /// panics if it cannot be run or does not finish.
    pub fn sh_timeout(&self, script: &str, timeout: Duration) -> Output {
        self.try_sh(script, timeout)
            .unwrap_or_else(|e| panic!("`{script}`: {e}\n{}", self.report()))
    }

    /// [`Host::sh_timeout`] that returns what went wrong instead (for
    /// clean-up code, which must not panic).
    pub fn try_sh(&self, script: &str, timeout: Duration) -> io::Result<Output> {
        let mut p = self.spawn(&["/bin/sh", "-c", script], &[])?;
        drop(p.take_stdin());
        let out = p.take_stdout().map(collect);
        let err = p.take_stderr().map(collect);
        let Some(status) = p.wait_timeout(timeout) else {
            let _ = p.kill();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("did not finish within {timeout:?}"),
            ));
        };
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Ok(Output {
            status,
            stdout: join(out),
            stderr: join(err),
        })
    }

    /// Runs a shell script to the end (at most 10 minutes).
    pub fn sh(&self, script: &str) -> Output {
        self.sh_timeout(script, Duration::from_secs(600))
    }

    /// Connects to a Unix socket on the host.
    pub fn connect(&self, path: &Path) -> io::Result<Stream> {
        match self {
            Host::Local => UnixStream::connect(path).map(Stream::Unix),
            Host::Test(th) if th.known_dead() => Err(dead()),
            Host::Test(th) => th
                .agent
                .connect(&path.display().to_string())
                .map(Stream::Tcp)
                .inspect_err(|_| th.suspect()),
        }
    }

    /// For failure messages: the test host's console tail, if any.
    pub fn report(&self) -> String {
        match self {
            Host::Local => String::new(),
            Host::Test(th) => format!("--- test host console (tail) ---\n{}", th.console_tail(20)),
        }
    }
}

fn dead() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the test host died")
}

fn collect(mut r: Box<dyn Read + Send>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}
