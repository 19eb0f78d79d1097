//! The operator's alert hook: a command run on `watchdog` and `panic`
//! events, in its own thread, killed if it outlives its timeout.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `command` (through `/bin/sh -c`) with VMM_EVENT, VMM_NAME and
/// VMM_TIME in its environment. Never blocks the caller.
pub fn run_alert_hook(command: &str, event: &str, vm: &str, time: &str, timeout: Duration) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("VMM_EVENT", event)
        .env("VMM_NAME", vm)
        .env("VMM_TIME", time)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let event = event.to_string();
    let vm = vm.to_string();
    let spawned = std::thread::Builder::new()
        .name("alert-hook".into())
        .spawn(move || {
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(vm, event, "alert hook could not start: {e}");
                    return;
                }
            };
            // Collect output without blocking the wait loop.
            let out = child.stdout.take().map(|s| {
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    let _ = s.take(64 * 1024).read_to_end(&mut v);
                    v
                })
            });
            let err = child.stderr.take().map(|s| {
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    let _ = s.take(64 * 1024).read_to_end(&mut v);
                    v
                })
            });
            let start = Instant::now();
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if start.elapsed() >= timeout => {
                        let _ = child.kill();
                        let _ = child.wait();
                        tracing::warn!(vm, event, "alert hook killed after {timeout:?}");
                        break None;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => {
                        tracing::warn!(vm, event, "alert hook: {e}");
                        break None;
                    }
                }
            };
            let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
                h.and_then(|h| h.join().ok())
                    .map(|v| String::from_utf8_lossy(&v).trim().to_string())
                    .unwrap_or_default()
            };
            let (o, e) = (text(out), text(err));
            if let Some(s) = status {
                tracing::info!(
                    vm,
                    event,
                    "alert hook exited with {s}; stdout: {o:?}; stderr: {e:?}"
                );
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start alert hook thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_gets_the_event_in_its_environment() {
        let dir = std::env::temp_dir().join(format!("vmm-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let cmd = format!(
            "echo \"$VMM_EVENT $VMM_NAME $VMM_TIME\" > {}",
            out.display()
        );
        run_alert_hook(
            &cmd,
            "watchdog",
            "web1",
            "2026-11-25T00:00:00Z",
            HOOK_TIMEOUT,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        let s = std::fs::read_to_string(&out).unwrap();
        assert_eq!(s.trim(), "watchdog web1 2026-11-25T00:00:00Z");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_hanging_hook_is_killed_and_does_not_block_the_caller() {
        let start = Instant::now();
        run_alert_hook("sleep 30", "panic", "vm", "t", Duration::from_millis(200));
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "caller was blocked"
        );
    }
}
