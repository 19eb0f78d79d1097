//! `vmm-testhost`: the test host from the command line.
//!
//! * `vmm-testhost run [--forward SOCK]... SCRIPT`: boots a test host with
//!   its console on this terminal and runs SCRIPT there (`./run.sh` on a
//!   machine whose `/dev/kvm` cannot run guest user space). Each
//!   `--forward` makes a Unix socket of the test host reachable at the same
//!   path here (the VM's control socket, for `vmm-shell`).
//! * `vmm-testhost shell`: the same with a root shell (for developers).
//! * `vmm-testhost agent`: the agent, run by the test host's /init.
//!
//! See resources/README.md ("The test host").

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tests::testhost::{self, agent, proto, qemu, Agent};

#[derive(Parser)]
#[command(
    about = "The test host: a QEMU-emulated machine with AMD SVM where the VMM runs on real KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a test host with its console on this terminal and run SCRIPT there.
    Run {
        /// Make this Unix socket of the test host reachable at the same path here (repeatable).
        #[arg(long = "forward", value_name = "SOCK")]
        forward: Vec<PathBuf>,
        /// The test host's memory in MiB.
        #[arg(long, default_value_t = 4096)]
        memory: u32,
        /// A directory of this machine the test host may write, at the same path inside.
        #[arg(long, value_name = "DIR")]
        share: Option<PathBuf>,
        /// A shell script on this machine's file system (the test host sees it at the same path).
        script: PathBuf,
    },
    /// Boot a test host with a root shell on this terminal.
    Shell {
        #[arg(long, default_value_t = 4096)]
        memory: u32,
    },
    /// Run a command in a running test host (its agent's address is in the tests' output).
    Exec {
        #[arg(long)]
        agent: SocketAddr,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// The agent (inside the test host).
    Agent {
        #[arg(long, default_value_t = proto::AGENT_PORT)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Agent { port } => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .and_then(agent::serve)
            .map_err(|e| format!("agent on port {port}: {e}")),
        Cmd::Run {
            forward,
            memory,
            share,
            script,
        } => run(&script, &forward, memory, share),
        Cmd::Shell { memory } => shell(memory),
        Cmd::Exec { agent, argv } => exec(Agent { addr: agent }, &argv),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-testhost: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `argv` through the agent at `agent`, with this process's stdin,
/// stdout and stderr; exits with its status.
fn exec(agent: Agent, argv: &[String]) -> Result<(), String> {
    let mut child = agent
        .spawn(argv, &testhost::ExecOptions::default())
        .map_err(|e| format!("agent {}: {e}", agent.addr))?;
    if let Some(mut stdin) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut stdin);
        });
    }
    let out = child.stdout.take().map(|mut o| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut o, &mut io::stdout());
        })
    });
    let err = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let _ = io::copy(&mut e, &mut io::stderr());
        })
    });
    let status = child.wait_timeout(Duration::from_secs(365 * 24 * 3600));
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    match status.and_then(|s| s.code()) {
        Some(0) => Ok(()),
        Some(c) => std::process::exit(c),
        None => Err(format!("{}: {status:?}", argv.join(" "))),
    }
}

fn shell(memory: u32) -> Result<(), String> {
    let dir = tests::repo_root().join("build/testhost");
    let script = dir.join(format!("shell-{}.sh", std::process::id()));
    std::fs::write(
        &script,
        "echo 'test host shell: the outer root is read-only; /tmp, /run and /root are its own; exit powers off'\n\
         cd \"$(dirname \"$0\")/../..\" && exec bash -l\n",
    )
    .map_err(|e| format!("{}: {e}", script.display()))?;
    let r = run(&script, &[], memory, None);
    let _ = std::fs::remove_file(&script);
    r
}

fn run(
    script: &Path,
    forward: &[PathBuf],
    memory: u32,
    share: Option<PathBuf>,
) -> Result<(), String> {
    let repo = tests::repo_root();
    let files = qemu::Files::locate(&testhost::files_dir(&repo))?;
    let script = std::fs::canonicalize(script).map_err(|e| format!("{}: {e}", script.display()))?;
    let agent_bin = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))?;
    let agent = Agent {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    };
    for sock in forward {
        forward_socket(agent, sock)?;
    }
    let opts = qemu::Options {
        cpus: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
        memory_mib: memory,
        agent: agent_bin,
        run: Some(script),
        serial: qemu::Serial::Stdio,
        port,
        share: match share {
            Some(d) => {
                Some(std::fs::canonicalize(&d).map_err(|e| format!("{}: {e}", d.display()))?)
            }
            None => None,
        },
        systemd: false,
    };
    let status = qemu::command(&files, &opts)
        .status()
        .map_err(|e| format!("cannot start the test host's QEMU: {e} (resources/build-kernels.sh testhost unpacks it)"))?;
    for sock in forward {
        let _ = std::fs::remove_file(sock);
    }
    if status.success() {
        Ok(())
    } else {
        Err(format!("qemu-system-x86_64: {status}"))
    }
}

/// Listens on `sock` here; each connection is relayed to the socket of the
/// same path in the test host.
fn forward_socket(agent: Agent, sock: &Path) -> Result<(), String> {
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let path = sock.display().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let path = path.clone();
            std::thread::spawn(move || {
                // The VM inside may still be starting: try for a while.
                let mut remote = None;
                for _ in 0..50 {
                    if let Ok(r) = agent.connect(&path) {
                        remote = Some(r);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                let Some(remote) = remote else { return };
                let (Ok(mut c_r), Ok(mut r_w)) = (conn.try_clone(), remote.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = io::copy(&mut c_r, &mut r_w);
                    let _ = r_w.shutdown(std::net::Shutdown::Write);
                });
                let (mut r_r, mut c_w) = (remote, conn);
                let _ = io::copy(&mut r_r, &mut c_w);
                let _ = c_w.shutdown(std::net::Shutdown::Both);
                let _ = up.join();
            });
        }
    });
    Ok(())
}
