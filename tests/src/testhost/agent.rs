//! The agent that runs inside the test host: it runs commands for the
//! tests outside and relays their control sockets (see `proto`).
//!
//! One thread per connection. A command runs in a session of its own, and
//! when its connection ends (the test finished, failed or died) its whole
//! process group is killed, so no VMM outlives the test that started it.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::proto::{self, Reply, Request};

/// How long output may still arrive after the command exited (from
/// processes it left behind holding its stdout) before the exit is sent.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Serves connections forever.
pub fn serve(listener: TcpListener) -> io::Result<()> {
    for conn in listener.incoming() {
        let conn = conn?;
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("testhost agent: connection: {e}");
            }
        });
    }
    Ok(())
}

fn handle(conn: TcpStream) -> io::Result<()> {
    let _ = conn.set_nodelay(true);
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let line = proto::read_line(&mut reader)?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return proto::write_json(&mut writer, &Reply::error(format!("bad request: {e}")))
        }
    };
    match req {
        Request::Ping => {
            let mut r = Reply::ok();
            r.info = Some(format!(
                "{} pid {}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim(),
                std::process::id()
            ));
            proto::write_json(&mut writer, &r)
        }
        Request::Connect { path } => match UnixStream::connect(&path) {
            Ok(unix) => {
                proto::write_json(&mut writer, &Reply::ok())?;
                relay(reader, writer, unix)
            }
            Err(e) => proto::write_json(&mut writer, &Reply::error(format!("{path}: {e}"))),
        },
        Request::Exec {
            argv,
            env,
            cwd,
            pty,
        } => exec(reader, writer, &argv, &env, cwd.as_deref(), pty),
    }
}

/// Copies both ways until either side ends, then ends the other.
fn relay(
    mut from_client: BufReader<TcpStream>,
    to_client: TcpStream,
    unix: UnixStream,
) -> io::Result<()> {
    let mut unix_w = unix.try_clone()?;
    let mut unix_r = unix;
    let mut client_w = to_client.try_clone()?;
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut unix_w);
        let _ = unix_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut unix_r, &mut client_w);
    let _ = to_client.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    Ok(())
}

type Out = Arc<Mutex<TcpStream>>;

fn send(out: &Out, kind: u8, data: &[u8]) -> io::Result<()> {
    let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
    proto::write_frame(&mut *w, kind, data)
}

/// Forwards what `r` yields as frames of `kind`; says on `done` when it ends.
fn forward(mut r: impl Read + Send + 'static, kind: u8, out: Out, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if send(&out, kind, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = done.send(());
    });
}

fn exec(
    mut from_client: BufReader<TcpStream>,
    conn: TcpStream,
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    pty: bool,
) -> io::Result<()> {
    let out: Out = Arc::new(Mutex::new(conn.try_clone()?));
    let Some((prog, args)) = argv.split_first() else {
        return proto::write_json(
            &mut *out.lock().unwrap_or_else(|e| e.into_inner()),
            &Reply::error("empty argv"),
        );
    };
    let mut cmd = Command::new(prog);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let master = if pty {
        let (master, slave) = crate::pty::try_open_pty()?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        Some(master)
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        None
    };
    // SAFETY: runs in the child between fork and exec and only calls
    // async-signal-safe functions (setsid, ioctl) on its own descriptors.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
            return proto::write_json(&mut *w, &Reply::error(format!("{prog}: {e}")));
        }
    };
    drop(cmd);
    let pid = child.id();
    let pgid = pid as libc::pid_t;
    {
        let mut r = Reply::ok();
        r.pid = Some(pid);
        let mut w = out.lock().unwrap_or_else(|e| e.into_inner());
        proto::write_json(&mut *w, &r)?;
    }

    let (done_tx, done_rx) = mpsc::channel();
    let mut streams = 0;
    let mut stdin: Box<dyn Write + Send> = match master {
        Some(m) => {
            let reader = std::fs::File::from(m.try_clone()?);
            forward(reader, proto::STDOUT, out.clone(), done_tx.clone());
            streams += 1;
            Box::new(std::fs::File::from(m))
        }
        None => {
            if let Some(o) = child.stdout.take() {
                forward(o, proto::STDOUT, out.clone(), done_tx.clone());
                streams += 1;
            }
            if let Some(e) = child.stderr.take() {
                forward(e, proto::STDERR, out.clone(), done_tx.clone());
                streams += 1;
            }
            match child.stdin.take() {
                Some(i) => Box::new(i),
                None => Box::new(io::sink()),
            }
        }
    };
    drop(done_tx);

    // The client's frames: standard input and signals. When the client
    // goes away, the command's whole process group goes with it.
    std::thread::spawn(move || {
        let mut stdin_open = true;
        loop {
            match proto::read_frame(&mut from_client) {
                Ok(Some((proto::STDIN, data))) if stdin_open => {
                    if data.is_empty() {
                        stdin = Box::new(io::sink());
                        stdin_open = false;
                    } else if stdin.write_all(&data).and_then(|_| stdin.flush()).is_err() {
                        stdin_open = false;
                    }
                }
                Ok(Some((proto::SIGNAL, data))) if data.len() == 4 => {
                    let sig = i32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    // SAFETY: kill(2) with a pid we spawned and a client-given signal number;
                    // the kernel checks the number.
                    unsafe { libc::kill(pgid, sig) };
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        // SAFETY: kill(2) of the process group the command leads (setsid above).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    });

    let status = child.wait()?;
    // Output already written by the command is forwarded in full; output
    // from processes it left behind is waited for only briefly.
    let deadline = std::time::Instant::now() + OUTPUT_GRACE;
    for _ in 0..streams {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    send(&out, proto::EXIT, &status.into_raw().to_le_bytes())?;
    let _ = conn.shutdown(std::net::Shutdown::Write);
    Ok(())
}
