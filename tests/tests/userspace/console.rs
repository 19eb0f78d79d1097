//! The admin shell's `console` on a real guest: attach, run a command in
//! the guest's shell, see its output, detach with Ctrl-], back at the
//! admin shell's prompt.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use tests::guest::{scenario, Spec};

use crate::boot;

/// Reads from `r` into `buf` until `needle` appears after `from`.
fn read_until(r: &mut dyn Read, buf: &mut Vec<u8>, from: usize, needle: &str, what: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(i) = String::from_utf8_lossy(&buf[from.min(buf.len())..]).find(needle) {
            return from + i + needle.len();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {needle:?} not seen; screen:\n{}",
            String::from_utf8_lossy(buf)
        );
        let mut chunk = [0u8; 4096];
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => panic!(
                "{what}: the terminal closed before {needle:?}:\n{}",
                String::from_utf8_lossy(buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn the_admin_shells_console_attaches_runs_a_command_and_detaches() {
    scenario(|h| {
        let g = boot(h, Spec::new("mini").name("web1"));
        let run_dir = g.dir.join("run");
        let shell = tests::bin("vmm-shell");
        let mut p = h
            .spawn_pty(
                &[shell.to_str().unwrap_or("vmm-shell"), "--run-dir", &run_dir],
                &[("HOME", "/tmp"), ("TERM", "xterm"), ("NO_COLOR", "1")],
            )
            .expect("start vmm-shell on a terminal");
        let mut out = p.take_stdout().expect("terminal");
        let mut input = p.take_stdin().expect("terminal");
        let mut screen = Vec::new();
        let at = read_until(&mut *out, &mut screen, 0, "web1> ", "prompt");
        input.write_all(b"console\r").expect("type");
        let at = read_until(
            &mut *out,
            &mut screen,
            at,
            "Connected to the console of web1",
            "attach",
        );
        input.write_all(b"\recho typed-$((6*7))\r").expect("type");
        let at = read_until(&mut *out, &mut screen, at, "typed-42", "the guest's answer");
        input.write_all(&[0x1d]).expect("Ctrl-]");
        read_until(&mut *out, &mut screen, at, "web1> ", "prompt after detach");
        input.write_all(b"exit\r").expect("type");
        let st = p.wait_timeout(Duration::from_secs(30));
        assert!(st.is_some_and(|s| s.success()), "vmm-shell: {st:?}");
    });
}
