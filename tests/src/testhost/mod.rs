//! The test host: Debian's kernel under QEMU's software emulation of an
//! AMD CPU with SVM, where `kvm_amd` gives the VMM real hardware
//! virtualization semantics even on a machine whose own `/dev/kvm` cannot
//! run guest user space. The outer root is shared read-only, so the
//! project's binaries, kernel library and tools are at the same paths
//! inside; an agent there runs the tests' commands (see `agent`, `proto`).

pub mod agent;
pub mod client;
pub mod proto;
pub mod qemu;
pub mod wedge;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

pub use client::{Agent, ExecOptions, RemoteChild};

/// A test host's start-up, QEMU's own start included, seldom takes more
/// than ~10 s; this allows for a machine loaded by other builds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Boots of a test host tried before [`TestHost::boot`] gives up.
const BOOTS: u32 = 3;

/// A booted test host. QEMU runs as long as this process (it gets SIGKILL
/// when its parent thread, which lives as long as the process, ends).
pub struct TestHost {
    pub agent: Agent,
    /// Its serial console (the test host's kernel and /init).
    pub log: PathBuf,
    pub release: String,
    /// How long it took from QEMU's start to the agent's first answer.
    pub boot_time: Duration,
    pub qemu_pid: u32,
    /// QEMU's pidfd, to kill it even after its exit raced with ours.
    qemu_pidfd: OwnedFd,
    /// QEMU's exit status, once it has exited.
    exit: Exited,
    /// Set once its agent stopped answering (its kernel hung: see
    /// `wedge`); QEMU is then killed.
    dead: AtomicBool,
    /// When the agent last answered a liveness ping; `None` once a request
    /// to it failed since (see [`TestHost::suspect`]).
    last_pong: Mutex<Option<Instant>>,
}

/// How long the agent may take to answer a liveness ping. It answers in
/// milliseconds even while a guest boots; a test host whose kernel hung
/// (seen in CI: no panic on its console, QEMU still running, every later
/// test failing on the dead agent) never does.
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// A ping this recent vouches for the test host.
const PONG_FRESH: Duration = Duration::from_secs(5);

type Exited = std::sync::Arc<std::sync::Mutex<Option<String>>>;

/// The test host's build directory (`build/testhost`).
pub fn files_dir(repo: &Path) -> PathBuf {
    std::env::var_os("TESTHOST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("build/testhost"))
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn tail(path: &Path, n: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A pidfd for our child `pid`, taken before it is reaped (so the pid
/// names it).
fn pidfd_open(pid: u32) -> Result<OwnedFd, String> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(format!(
            "pidfd_open of the test host's QEMU: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// SIGKILL to the process behind `pidfd` (a no-op once it has exited).
fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Spawns QEMU from a thread that lives as long as the process, with
/// PR_SET_PDEATHSIG, so the test host dies with the process however it
/// ends (the death signal follows the parent *thread*).
fn spawn_for_life(mut cmd: std::process::Command) -> Result<(u32, OwnedFd, Exited), String> {
    let (tx, rx) = mpsc::channel::<Result<(u32, OwnedFd), String>>();
    let exited = Exited::default();
    let exit_tx = exited.clone();
    std::thread::Builder::new()
        .name("testhost-qemu".into())
        .spawn(move || {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the child between fork and exec; prctl is
            // async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child: Result<Child, _> = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn();
            match child {
                Ok(mut c) => {
                    let _ = tx.send(pidfd_open(c.id()).map(|fd| (c.id(), fd)));
                    let status = c.wait();
                    *exit_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{status:?}"));
                    // Stay alive: this thread is the test host's parent.
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot start the test host's QEMU: {e} (resources/build-kernels.sh testhost unpacks it)")));
                }
            }
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    let (pid, pidfd) = rx
        .recv()
        .map_err(|_| "the QEMU thread died".to_string())??;
    Ok((pid, pidfd, exited))
}

impl TestHost {
    /// Boots a test host for tests: its console goes to `log`, its agent
    /// is `agent` (the `vmm-testhost` binary).
    pub fn boot(repo: &Path, agent: &Path, log: &Path) -> Result<TestHost, String> {
        Self::boot_with(repo, agent, log, false)
    }

    /// [`TestHost::boot`], with systemd as PID 1 when `systemd` is set (an
    /// operator's host: `qemu::Options::systemd`).
    pub fn boot_with(
        repo: &Path,
        agent: &Path,
        log: &Path,
        systemd: bool,
    ) -> Result<TestHost, String> {
        // The test host sees the outer root at the same paths, except its
        // /tmp, which is a tmpfs of its own (resources/testhost/init).
        if repo.starts_with("/tmp") || agent.starts_with("/tmp") {
            return Err(format!(
                "the test host cannot see {} (its /tmp is its own): put the repository and its target directory outside /tmp",
                repo.display()
            ));
        }
        let files = qemu::Files::locate(&files_dir(repo))?;
        let cpus = std::env::var("VMM_TESTHOST_CPUS")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
        let memory_mib = std::env::var("VMM_TESTHOST_MEMORY")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(4096);
        // A port picked now could be taken before QEMU binds it, and the
        // test host's own boot meets its emulator's faults too (not the
        // VMM's): either is tried again, twice. (A failed boot used to end
        // the test outside its scenario's retries: a CI run, stop 32,
        // failed five scenarios in a row after the first three passed.)
        let mut last = String::new();
        for attempt in 1..=BOOTS {
            if attempt > 1 {
                eprintln!(
                    "NOTE: test host boot {} of {BOOTS} failed: {last}",
                    attempt - 1
                );
                crate::guest::log_note(&format!(
                    "test host boot {} failed: {}",
                    attempt - 1,
                    last.lines().next().unwrap_or("")
                ));
            }
            let _ = std::fs::remove_file(log);
            let port = free_port()?;
            let opts = qemu::Options {
                cpus,
                memory_mib,
                agent: agent.to_path_buf(),
                run: None,
                serial: qemu::Serial::File(log.to_path_buf()),
                port,
                share: None,
                systemd,
            };
            let mut cmd = qemu::command(&files, &opts);
            let err_path = log.with_extension("qemu-stderr");
            let err = std::fs::File::create(&err_path)
                .map_err(|e| format!("{}: {e}", err_path.display()))?;
            cmd.stderr(err);
            let t0 = Instant::now();
            let (qemu_pid, qemu_pidfd, exited) = spawn_for_life(cmd)?;
            let agent = Agent {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            };
            loop {
                let status = exited.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(status) = status {
                    last = format!(
                        "the test host's QEMU exited ({status}): {}\n--- console ---\n{}",
                        tail(&err_path, 5),
                        tail(log, 30)
                    );
                    break;
                }
                if agent.ping(Duration::from_secs(2)).is_ok() {
                    return Ok(TestHost {
                        agent,
                        log: log.to_path_buf(),
                        release: files.release,
                        boot_time: t0.elapsed(),
                        qemu_pid,
                        qemu_pidfd,
                        exit: exited,
                        dead: AtomicBool::new(false),
                        last_pong: Mutex::new(Some(Instant::now())),
                    });
                }
                if t0.elapsed() > BOOT_TIMEOUT {
                    kill(&qemu_pidfd);
                    last = format!(
                        "the test host's agent did not answer within {BOOT_TIMEOUT:?}\n--- console ---\n{}",
                        tail(log, 30)
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Err(format!(
            "the test host did not boot in {BOOTS} tries; the last: {last}"
        ))
    }

    /// Is it still running and answering? Its kernel may have died
    /// under it, or hung (see `wedge` for the emulator fault behind
    /// both): QEMU exited, a panic or a kernel BUG on its console, or an
    /// agent that did not answer two pings. A test host found dead stays
    /// dead, and its QEMU is killed.
    pub fn is_alive(&self) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return false;
        }
        let exited = self
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let console = std::fs::read_to_string(&self.log).unwrap_or_default();
        let died = exited || console.contains("Kernel panic");
        if !died && self.answers() {
            return true;
        }
        self.dead.store(true, Ordering::SeqCst);
        kill(&self.qemu_pidfd);
        false
    }

    /// A request to the agent failed (refused, reset, closed before its
    /// reply): the next [`TestHost::is_alive`] must ping instead of trusting
    /// a recent pong. (Seen in CI: QEMU died a moment after a pong, and
    /// every test of the next five seconds failed twice on "Connection
    /// refused" without the test host ever being found dead and replaced.)
    pub fn suspect(&self) {
        *self.last_pong.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Was it found dead already? (No ping: for clean-up code, which
    /// should not wait on a dead agent.)
    pub fn known_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Did the agent answer a ping lately, or does it now (two tries)?
    fn answers(&self) -> bool {
        let mut last = self.last_pong.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < PONG_FRESH) {
            return true;
        }
        for _ in 0..2 {
            if self.agent.ping(PING_TIMEOUT).is_ok() {
                *last = Some(Instant::now());
                return true;
            }
        }
        false
    }

    /// The last lines of its console, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}
