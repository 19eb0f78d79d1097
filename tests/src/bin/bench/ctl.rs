//! Raw JSON-lines clients: our control socket and QEMU's QMP, timed per
//! request.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct LineClient {
    r: BufReader<UnixStream>,
    w: UnixStream,
    line: String,
}

impl LineClient {
    /// Connects, retrying while the server starts.
    pub fn connect(path: &Path, timeout: Duration) -> Result<LineClient, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    let io = |e: std::io::Error| format!("{}: {e}", path.display());
                    s.set_read_timeout(Some(Duration::from_secs(30)))
                        .map_err(io)?;
                    let w = s.try_clone().map_err(io)?;
                    return Ok(LineClient {
                        r: BufReader::new(s),
                        w,
                        line: String::new(),
                    });
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn send(&mut self, req: &str) -> Result<(), String> {
        let mut b = Vec::with_capacity(req.len() + 1);
        b.extend_from_slice(req.as_bytes());
        b.push(b'\n');
        self.w
            .write_all(&b)
            .map_err(|e| format!("write request: {e}"))
    }

    fn read_line(&mut self) -> Result<&str, String> {
        self.line.clear();
        match self.r.read_line(&mut self.line) {
            Ok(0) => Err("the server closed the connection".into()),
            Ok(_) => Ok(self.line.trim_end()),
            Err(e) => Err(format!("read response: {e}")),
        }
    }

    /// Reads lines until one contains `key` (skipping event lines).
    fn read_until(&mut self, key: &str) -> Result<String, String> {
        loop {
            let l = self.read_line()?;
            if l.contains(key) {
                return Ok(l.to_string());
            }
        }
    }

    /// Our protocol: one request, the response line, its round trip time.
    /// The response is checked for `"ok":true` after the clock stops.
    pub fn ours(&mut self, req: &str) -> Result<(Value, Duration), String> {
        let t = Instant::now();
        self.send(req)?;
        let l = self.read_until("\"ok\"")?;
        let rtt = t.elapsed();
        let v: Value =
            serde_json::from_str(&l).map_err(|e| format!("bad JSON response {l:?}: {e}"))?;
        if v["ok"] != Value::Bool(true) {
            return Err(format!("{req} -> {l}"));
        }
        Ok((v, rtt))
    }

    /// QMP: reads the greeting and negotiates capabilities.
    pub fn qmp_handshake(&mut self) -> Result<(), String> {
        self.read_until("\"QMP\"")?;
        self.qmp(r#"{"execute":"qmp_capabilities"}"#).map(|_| ())
    }

    /// QMP: one command, its round trip time.
    pub fn qmp(&mut self, req: &str) -> Result<Duration, String> {
        let t = Instant::now();
        self.send(req)?;
        loop {
            let l = self.read_line()?;
            if l.contains("\"return\"") {
                return Ok(t.elapsed());
            }
            if l.contains("\"error\"") {
                return Err(format!("{req} -> {l}"));
            }
        }
    }
}
