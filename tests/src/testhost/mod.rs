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
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use client::{Agent, ExecOptions, RemoteChild};

/// A test host's start-up, QEMU's own start included, seldom takes more
/// than ~10 s; this allows for a machine loaded by other builds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

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
    /// QEMU's exit status, once it has exited.
    exit: Exited,
}

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

/// Spawns QEMU from a thread that lives as long as the process, with
/// PR_SET_PDEATHSIG, so the test host dies with the process however it
/// ends (the death signal follows the parent *thread*).
fn spawn_for_life(mut cmd: std::process::Command) -> Result<(u32, Exited), String> {
    let (tx, rx) = mpsc::channel::<Result<u32, String>>();
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
                    let _ = tx.send(Ok(c.id()));
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
    let pid = rx
        .recv()
        .map_err(|_| "the QEMU thread died".to_string())??;
    Ok((pid, exited))
}

impl TestHost {
    /// Boots a test host for tests: its console goes to `log`, its agent
    /// is `agent` (the `vmm-testhost` binary).
    pub fn boot(repo: &Path, agent: &Path, log: &Path) -> Result<TestHost, String> {
        let files = qemu::Files::locate(&files_dir(repo))?;
        let cpus = std::env::var("VMM_TESTHOST_CPUS")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32));
        let memory_mib = std::env::var("VMM_TESTHOST_MEMORY")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(4096);
        // A port picked now could be taken before QEMU binds it: try again.
        let mut last = String::new();
        for _ in 0..3 {
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
            };
            let mut cmd = qemu::command(&files, &opts);
            let err_path = log.with_extension("qemu-stderr");
            let err = std::fs::File::create(&err_path)
                .map_err(|e| format!("{}: {e}", err_path.display()))?;
            cmd.stderr(err);
            let t0 = Instant::now();
            let (qemu_pid, exited) = spawn_for_life(cmd)?;
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
                        exit: exited,
                    });
                }
                if t0.elapsed() > BOOT_TIMEOUT {
                    // SAFETY: kill(2) of the QEMU process we started.
                    unsafe { libc::kill(qemu_pid as i32, libc::SIGKILL) };
                    return Err(format!(
                        "the test host's agent did not answer within {BOOT_TIMEOUT:?}\n--- console ---\n{}",
                        tail(log, 30)
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            if !tail(&err_path, 5).contains("host forwarding") {
                break;
            }
        }
        Err(last)
    }

    /// Is it still running? (Its kernel may have died under it: see
    /// `wedge` for the emulator fault behind that.)
    pub fn is_alive(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
            && !std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains("Kernel panic")
    }

    /// The last lines of its console, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}
