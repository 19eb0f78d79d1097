//! The interactive admin shell on a pseudo-terminal against a real VMM process running a
//! tiny guest: completion of a command and a VM name, `status`, `console` (replay, typed
//! bytes echoed by the guest, Ctrl-] detach, terminal restored), `reboot` and back, and a
//! VMM killed while the shell is attached (the shell says so and prompts again).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tests::pty::{attach_to_pty, open_pty, same_termios, termios};

use tests::tiny::{write_guest, Asm};
use tests::{bin, TempDir, VmmProcess};

/// Generous: other tests share this machine's CPUs, and the KVM may be a software one.
const TIMEOUT: Duration = Duration::from_secs(60);
const BANNER: &str = "ECHO-GUEST-READY";

/// A guest that prints a banner, then forever: echoes each byte it reads from COM1 back to
/// COM1, and when the i8042 has a byte (Ctrl-Alt-Del from a graceful `reboot`), resets the
/// machine through the keyboard controller (0xFE to port 0x64).
fn echo_guest() -> Asm {
    let mut a = Asm::new();
    a.print(&format!("{BANNER}\r\n"));
    let top = a.here();
    // in al, 0x3fd (line status); test al, 1 (data ready); jz +10 (skip the echo)
    a.inb(0x3fd);
    a.code.extend_from_slice(&[0xa8, 0x01, 0x74, 0x0a]);
    // in al, 0x3f8 (5 bytes); mov dx, 0x3f8; out dx, al (5 bytes)
    a.inb(0x3f8);
    a.code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xee]);
    // in al, 0x64 (i8042 status); test al, 1; jnz +5 (over the jmp back)
    a.inb(0x64);
    a.code.extend_from_slice(&[0xa8, 0x01, 0x75, 0x05]);
    a.jmp_back(top);
    // A key arrived: pulse the CPU reset line.
    a.inb(0x60).outb(0x64, 0xfe).cli_hlt_forever();
    a
}

// ---------------------------------------------------------------------------------------
// Output collection and the pseudo-terminal (as in shell_cli.rs)

type Collected = Arc<(Mutex<(Vec<u8>, bool)>, Condvar)>;

struct Collector {
    buf: Collected,
}

impl Collector {
    fn new(mut r: impl Read + Send + 'static) -> Collector {
        let buf: Collected = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
        let shared = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                let n = r.read(&mut chunk).unwrap_or(0);
                let mut g = shared.0.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    g.1 = true;
                    shared.1.notify_all();
                    return;
                }
                g.0.extend_from_slice(&chunk[..n]);
                shared.1.notify_all();
            }
        });
        Collector { buf }
    }

    /// Waits for any of `needles` at or after byte `from`; returns which one and the offset
    /// just past it.
    fn wait_for_any(
        &self,
        needles: &[&[u8]],
        from: usize,
        timeout: Duration,
    ) -> Option<(usize, usize)> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.buf;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let hay = g.0.get(from..).unwrap_or_default();
            let found = needles
                .iter()
                .enumerate()
                .filter_map(|(k, n)| {
                    hay.windows(n.len())
                        .position(|w| w == *n)
                        .map(|i| (i, k, from + i + n.len()))
                })
                .min();
            if let Some((_, k, end)) = found {
                return Some((k, end));
            }
            let now = Instant::now();
            if now >= deadline || g.1 {
                return None;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn text(&self) -> String {
        let g = self.buf.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&g.0).into_owned()
    }
}

struct Pty {
    child: Child,
    /// Our copy of the terminal side, to read its settings.
    slave: OwnedFd,
    master: File,
    out: Collector,
    pos: usize,
    /// The terminal settings before the shell started.
    initial: libc::termios,
}

impl Pty {
    fn spawn(mut cmd: Command) -> Pty {
        let (master, slave) = open_pty();
        let initial = termios(slave.as_raw_fd());
        attach_to_pty(&mut cmd, &slave);
        let child = cmd.spawn().expect("spawn vmm-shell on a pty");
        let master = File::from(master);
        let out = Collector::new(master.try_clone().expect("dup pty master"));
        Pty {
            child,
            slave,
            master,
            out,
            pos: 0,
            initial,
        }
    }

    /// The terminal output from `from` on, for failure messages.
    fn transcript(&self, from: usize) -> String {
        let text = self.out.text();
        format!(
            "--- pty transcript (from byte {from}) ---\n{}\n--- full pty transcript ---\n{text}",
            text.get(from..).unwrap_or_default()
        )
    }

    /// Waits for any of `needles` after the last match; returns the index of the one seen.
    fn expect_any_within(&mut self, needles: &[&str], timeout: Duration, vm: &VmmProcess) -> usize {
        let bytes: Vec<&[u8]> = needles.iter().map(|n| n.as_bytes()).collect();
        match self.out.wait_for_any(&bytes, self.pos, timeout) {
            Some((k, end)) => {
                self.pos = end;
                k
            }
            None => panic!(
                "expected one of {needles:?} within {timeout:?}\n{}\n--- vmm ---\n{}",
                self.transcript(self.pos),
                vm.report()
            ),
        }
    }

    fn expect(&mut self, needle: &str, vm: &VmmProcess) {
        self.expect_any_within(&[needle], TIMEOUT, vm);
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to the pty");
        self.master.flush().expect("flush the pty");
    }

    fn termios(&self) -> libc::termios {
        termios(self.slave.as_raw_fd())
    }

    fn wait_exit(&mut self, vm: &VmmProcess) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "vmm-shell did not exit\n{}\n--- vmm ---\n{}",
                    self.transcript(self.pos),
                    vm.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_socket(sock: &Path, vm: &VmmProcess) {
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared\n{}",
            sock.display(),
            vm.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interactive_shell_drives_a_real_vm_and_survives_its_death() {
    let dir = TempDir::new("shell-interactive-real");
    let kernel = dir.path().join("echo.elf");
    write_guest(&kernel, &echo_guest()).expect("write guest");
    let run = dir.path().join("run");
    let sock = run.join("web1/control.sock");
    let mut vm = VmmProcess::spawn(&[
        "--name",
        "web1",
        "--kernel",
        kernel.to_str().unwrap_or_default(),
        "--memory",
        "64",
        "--control",
        sock.to_str().unwrap_or_default(),
    ]);
    assert!(vm.wait_for(BANNER, TIMEOUT), "{}", vm.report());
    wait_socket(&sock, &vm);

    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    let mut cmd = Command::new(bin("vmm-shell"));
    cmd.env_remove("SSH_ORIGINAL_COMMAND")
        .env_remove("VMM_RUN_DIR")
        .env("NO_COLOR", "1")
        .env("HOME", &home)
        .env("TERM", "xterm")
        .arg("--run-dir")
        .arg(&run);
    let mut pty = Pty::spawn(cmd);
    let original = pty.initial;

    // The only VM is selected at once.
    pty.expect("Your VM: web1 (selected)", &vm);
    pty.expect("web1> ", &vm);

    // Complete a command, then a VM name.
    pty.send(b"stat\t");
    pty.expect("status ", &vm);
    pty.send(b"\r");
    pty.expect("state", &vm);
    pty.expect("running", &vm);
    pty.expect("boots       1", &vm);
    pty.expect("web1> ", &vm);

    pty.send(b"use we\t");
    pty.expect("web1 ", &vm);
    pty.send(b"\r");
    pty.expect("Selected web1 (running)", &vm);
    pty.expect("web1> ", &vm);
    let at_prompt = pty.termios();

    // Attach: the banner is replayed; typed bytes come back from the guest; Ctrl-] detaches.
    pty.send(b"console\r");
    pty.expect("Connected to the console of web1", &vm);
    pty.expect(BANNER, &vm);
    let raw = pty.termios();
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "console not in raw mode\n{}",
        pty.transcript(0)
    );
    pty.send(b"q7z");
    pty.expect("q7z", &vm);
    // The guest wrote them (the VMM's own console shows them too), not a local echo.
    assert!(
        vm.wait_for("q7z", TIMEOUT),
        "guest did not echo\n{}\n{}",
        pty.transcript(0),
        vm.report()
    );
    pty.send(b"\x1d");
    pty.expect("Detached from web1", &vm);
    pty.expect("web1> ", &vm);
    assert!(
        same_termios(&pty.termios(), &at_prompt),
        "terminal settings not restored after detach\n{}",
        pty.transcript(0)
    );

    // Reboot: the guest resets on Ctrl-Alt-Del, so this is normally graceful; a forced
    // reset after the timeout is an answer too.
    pty.send(b"reboot --timeout 30\r");
    let k = pty.expect_any_within(
        &["web1 rebooted cleanly", "web1 did not reboot in time"],
        TIMEOUT + Duration::from_secs(30),
        &vm,
    );
    assert!(k <= 1);
    pty.expect("web1> ", &vm);
    assert!(
        vm.wait_for_count(BANNER, 2, TIMEOUT),
        "no second boot\n{}",
        vm.report()
    );
    pty.send(b"status\r");
    pty.expect("running", &vm);
    pty.expect("boots       2", &vm);
    pty.expect("web1> ", &vm);

    // Attach again (both boots replayed) and kill the VMM while attached: the shell says so
    // and prompts again.
    pty.send(b"console\r");
    pty.expect("Connected to the console of web1", &vm);
    pty.expect(BANNER, &vm);
    pty.expect("q7z", &vm);
    pty.expect(BANNER, &vm);
    let raw = pty.termios();
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "console not in raw mode\n{}",
        pty.transcript(0)
    );
    vm.child.kill().expect("SIGKILL the vmm");
    assert!(vm.wait_exit(TIMEOUT).is_some(), "vmm did not die");
    pty.expect("the VMM closed the console connection", &vm);
    pty.expect("web1> ", &vm);
    assert!(
        same_termios(&pty.termios(), &at_prompt),
        "terminal settings not restored after the VMM died\n{}",
        pty.transcript(0)
    );

    // Still a working shell: a command to the dead VM fails with a message, then exit.
    pty.send(b"status\r");
    pty.expect("error: ", &vm);
    pty.expect("web1> ", &vm);
    pty.send(b"exit\r");
    let status = pty.wait_exit(&vm);
    assert_eq!(status.code(), Some(0), "{}", pty.transcript(0));
    assert!(
        same_termios(&pty.termios(), &original),
        "terminal left changed: lflag {:#x} -> {:#x}, iflag {:#x} -> {:#x}, oflag {:#x} -> {:#x}\n{}",
        original.c_lflag,
        pty.termios().c_lflag,
        original.c_iflag,
        pty.termios().c_iflag,
        original.c_oflag,
        pty.termios().c_oflag,
        pty.transcript(0)
    );
}
