//! A raw JSON-lines client for the control socket, as `socat` would use it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{Host, Stream};

/// How long a read waits for the VMM's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Ctl {
    reader: BufReader<Stream>,
    writer: Stream,
}

impl Ctl {
    /// Connects to a socket on this machine, retrying while the VMM starts.
    pub fn connect(path: &Path) -> Ctl {
        Self::connect_on(&Host::Local, path)
    }

    /// Connects to a socket on `host`, retrying while the VMM starts.
    pub fn connect_on(host: &Host, path: &Path) -> Ctl {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match host.connect(path) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                    let writer = s.try_clone().expect("clone socket");
                    return Ctl {
                        reader: BufReader::new(s),
                        writer,
                    };
                }
                Err(e) if Instant::now() >= deadline => {
                    panic!("cannot connect to {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn send_line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("write request");
    }

    pub fn read_value(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read response");
        assert!(n > 0, "the VMM closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Sends one request line and returns the next line that is a response
    /// (event lines in between are skipped). A request that may take its
    /// time (`timeout_s`, as `reboot` and `shutdown` have) is waited for
    /// that long and a margin, so the VMM's own answer (`forced`, or an
    /// error) is what a slow guest produces, not the client giving up.
    pub fn call(&mut self, line: &str) -> Value {
        let patient = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["timeout_s"].as_u64())
            .map(|s| Duration::from_secs(s.saturating_add(30)))
            .filter(|d| *d > READ_TIMEOUT);
        if let Some(wait) = patient {
            let _ = self.writer.set_read_timeout(Some(wait));
        }
        self.send_line(line);
        let v = loop {
            let v = self.read_value();
            if v.get("ok").is_some() {
                break v;
            }
        };
        if patient.is_some() {
            let _ = self.writer.set_read_timeout(Some(READ_TIMEOUT));
        }
        v
    }

    /// `call` that asserts success.
    pub fn ok(&mut self, line: &str) -> Value {
        let v = self.call(line);
        assert_eq!(v["ok"], Value::Bool(true), "{line} -> {v}");
        v
    }

    pub fn status(&mut self) -> Value {
        self.ok(r#"{"cmd":"status"}"#)
    }

    /// Waits for an event line named `name`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let _ = self.writer.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v["event"] == name {
                            return Some(v);
                        }
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Polls `status` until `pred` holds.
    pub fn wait_status(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stream(&self) -> &Stream {
        &self.writer
    }

    pub fn reader(&mut self) -> &mut BufReader<Stream> {
        &mut self.reader
    }
}

/// Sends `line` (if any) on the control socket at `sock` as uid and gid
/// 65534 (nobody, no supplementary groups), through `setpriv` and
/// `socat`: a client the VMM's access rules must judge. The socket and
/// its directory are opened to everyone first, so that what decides is
/// the VMM's own SO_PEERCRED check. Returns what came back (stdout) and
/// what `setpriv`/`socat` said (stderr).
pub fn send_as_nobody(sock: &Path, line: Option<&str>) -> (String, String) {
    let dir = sock.parent().unwrap_or(Path::new("/"));
    for (mode, path) in [("0755", dir), ("0666", sock)] {
        let st = std::process::Command::new("chmod")
            .arg(mode)
            .arg(path)
            .status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "chmod {mode} {}",
            path.display()
        );
    }
    let send = line.map_or(String::new(), |l| format!("echo '{l}' | "));
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!(
            "{send}socat -t 5 - UNIX-CONNECT:{}",
            sock.display()
        ))
        .output()
        .expect("setpriv and socat (scripts/host-deps.sh installs them)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
