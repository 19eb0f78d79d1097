//! The tests' side of the agent protocol (see `proto`): run a command in
//! the test host with its output streamed back, or reach a Unix socket
//! there.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::proto::{self, Reply, Request};

/// How to reach an agent.
#[derive(Debug, Clone, Copy)]
pub struct Agent {
    pub addr: SocketAddr,
}

/// Options of a command run through the agent.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub pty: bool,
}

impl Agent {
    fn open(&self, req: &Request, timeout: Duration) -> io::Result<(TcpStream, Reply)> {
        let mut s = TcpStream::connect_timeout(&self.addr, timeout)?;
        let _ = s.set_nodelay(true);
        proto::write_json(&mut s, req)?;
        s.set_read_timeout(Some(timeout))?;
        // A read timeout reads as EAGAIN ("Resource temporarily
        // unavailable"), which once passed for a failed fork: say what it is.
        let line = read_reply_line(&mut s).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the test host's agent did not answer within {timeout:?}"),
            ),
            _ => e,
        })?;
        s.set_read_timeout(None)?;
        let reply: Reply = serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("agent reply {line:?}: {e}"),
            )
        })?;
        if !reply.ok {
            return Err(io::Error::other(
                reply.error.unwrap_or_else(|| "agent said no".into()),
            ));
        }
        Ok((s, reply))
    }

    /// The agent's answer to a ping: its kernel release and pid.
    pub fn ping(&self, timeout: Duration) -> io::Result<String> {
        let (_, reply) = self.open(&Request::Ping, timeout)?;
        Ok(reply.info.unwrap_or_default())
    }

    /// A byte stream to the Unix socket at `path` in the test host.
    pub fn connect(&self, path: &str) -> io::Result<TcpStream> {
        let (s, _) = self.open(
            &Request::Connect {
                path: path.to_string(),
            },
            Duration::from_secs(30),
        )?;
        Ok(s)
    }

    /// Starts `argv` in the test host.
    pub fn spawn(&self, argv: &[String], opts: &ExecOptions) -> io::Result<RemoteChild> {
        let (s, reply) = self.open(
            &Request::Exec {
                argv: argv.to_vec(),
                env: opts.env.clone(),
                cwd: opts.cwd.clone(),
                pty: opts.pty,
            },
            Duration::from_secs(30),
        )?;
        RemoteChild::start(s.try_clone()?, BufReader::new(s), reply.pid.unwrap_or(0))
    }
}

/// The reply line, read a byte at a time so that nothing after it (a
/// relayed socket's first bytes) is swallowed by a buffer.
fn read_reply_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 * 1024 {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection before replying",
            ));
        }
        if b[0] == b'\n' {
            return String::from_utf8(line)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "reply not UTF-8"));
        }
        line.push(b[0]);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "reply line too long",
    ))
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are open descriptors nobody else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

type StatusCell = Arc<(Mutex<Option<ExitStatus>>, Condvar)>;

/// A command running in the test host. Its stdout and stderr arrive
/// through local pipes (so they read like a local child's); dropping it
/// kills the command's whole process group there.
pub struct RemoteChild {
    pid: u32,
    ctl: Arc<Mutex<TcpStream>>,
    pub stdin: Option<RemoteStdin>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    status: StatusCell,
}

/// Writes to a remote command's standard input; dropping it closes it.
pub struct RemoteStdin {
    ctl: Arc<Mutex<TcpStream>>,
}

impl Write for RemoteStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(proto::MAX_FRAME);
        let mut w = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        proto::write_frame(&mut *w, proto::STDIN, &buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RemoteStdin {
    fn drop(&mut self) {
        let mut w = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let _ = proto::write_frame(&mut *w, proto::STDIN, &[]);
    }
}

/// What a connection that broke without an exit frame reports: killed.
const LOST: i32 = libc::SIGKILL;

impl RemoteChild {
    fn start(w: TcpStream, mut r: BufReader<TcpStream>, pid: u32) -> io::Result<RemoteChild> {
        let (out_r, mut out_w) = pipe()?;
        let (err_r, mut err_w) = pipe()?;
        let status: StatusCell = Arc::new((Mutex::new(None), Condvar::new()));
        let cell = status.clone();
        std::thread::spawn(move || {
            let mut raw = LOST;
            loop {
                match proto::read_frame(&mut r) {
                    Ok(Some((proto::STDOUT, d))) => {
                        let _ = out_w.write_all(&d);
                    }
                    Ok(Some((proto::STDERR, d))) => {
                        let _ = err_w.write_all(&d);
                    }
                    Ok(Some((proto::EXIT, d))) if d.len() == 4 => {
                        raw = i32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            // The pipes close before the status is published, so a reader
            // that saw the exit also sees all the output.
            drop(out_w);
            drop(err_w);
            let mut g = cell.0.lock().unwrap_or_else(|e| e.into_inner());
            *g = Some(ExitStatus::from_raw(raw));
            cell.1.notify_all();
        });
        let ctl = Arc::new(Mutex::new(w));
        Ok(RemoteChild {
            pid,
            stdin: Some(RemoteStdin { ctl: ctl.clone() }),
            ctl,
            stdout: Some(out_r),
            stderr: Some(err_r),
            status,
        })
    }

    /// Its pid in the test host.
    pub fn id(&self) -> u32 {
        self.pid
    }

    pub fn signal(&self, sig: i32) -> io::Result<()> {
        let mut w = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        proto::write_frame(&mut *w, proto::SIGNAL, &sig.to_le_bytes())
    }

    pub fn try_wait(&self) -> Option<ExitStatus> {
        *self.status.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the exit, at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.status;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = *g {
                return Some(s);
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
}

impl Drop for RemoteChild {
    fn drop(&mut self) {
        // The agent kills the process group when the connection ends.
        let w = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
}
