//! A real Linux guest from the kernel library, started by `vmm` on the
//! test process's [`Host`], whose shell on the serial console the tests
//! type into and read from as a person would.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::control::Ctl;
use crate::host::Host;
use crate::testhost::wedge::wedged_vmms;
use crate::VmmProcess;

mod netns;
mod scenario;
mod spec;
pub use netns::{NetNs, GUEST_IP, HOST_IP, HOST_IP6};
pub(crate) use scenario::settle_vms;
pub use scenario::{log_note, retry_budget, scenario};
pub use spec::{entry_cmdline, entry_release, kernel_dir, HostDir, Spec};

/// Boots to a shell take seconds in the test host; this leaves room for a
/// loaded machine.
pub const BOOT: Duration = Duration::from_secs(240);
/// The usual bound for one command typed into the guest.
pub const CMD: Duration = Duration::from_secs(120);

/// How long a silent console is waited on before the test host and the
/// guest are checked for the emulator's faults (see [`Guest::watch`]).
const WATCH_SLICE: Duration = Duration::from_secs(20);

/// The line the library's initramfs prints once user space runs.
pub const INIT_OK: &str = "VMM-INIT-OK";

/// What the VMM's console banner says of a boot after a triple fault.
const TRIPLE_FAULT_RESET: &str = "(reset: triple_fault";
/// The line the root disk's init prints (after switch_root).
pub const ROOT_OK: &str = "VMM-ROOT-OK";

pub struct Guest {
    pub host: &'static Host,
    pub vmm: VmmProcess,
    /// Its scratch directory on the host (control socket, logs, images).
    pub dir: HostDir,
    pub sock: PathBuf,
    pub spec: Spec,
    /// The `vmm` arguments it was started with.
    args: Vec<String>,
    seq: u32,
}

impl Guest {
    /// Starts `vmm` with a control socket; does not wait for the guest.
    pub fn start(host: &'static Host, spec: Spec) -> Guest {
        let dir = HostDir::new(host, &spec.name);
        Self::start_in(host, spec, dir)
    }

    /// Starts `vmm` with its control socket in `dir` (which may already
    /// hold the guest's disk images).
    pub fn start_in(host: &'static Host, spec: Spec, dir: HostDir) -> Guest {
        let sock = dir.path().join(format!("run/{}/control.sock", spec.name));
        let cmdline = format!("{} {}", entry_cmdline(&spec.kernel), spec.cmdline);
        let kdir = kernel_dir().display().to_string();
        let vcpus = spec.vcpus.to_string();
        let mem = spec.memory_mib.to_string();
        let sock_s = sock.display().to_string();
        let log = dir.join("console.log");
        let mut args: Vec<String> = [
            "--name",
            &spec.name,
            "--kernel-dir",
            &kdir,
            "--kernel-name",
            spec.kernel_name.as_deref().unwrap_or(&spec.kernel),
            "--vcpus",
            &vcpus,
            "--memory",
            &mem,
            "--control",
            &sock_s,
            "--console-log",
            &log,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !spec.entry_cmdline {
            args.extend(["--cmdline".to_string(), cmdline.trim().to_string()]);
        }
        args.extend(spec.args.iter().cloned());
        let vmm = Self::spawn_vmm(host, spec.netns.as_deref(), &args);
        Guest {
            host,
            vmm,
            dir,
            sock,
            spec,
            args,
            seq: 0,
        }
    }

    fn spawn_vmm(host: &Host, netns: Option<&str>, args: &[String]) -> VmmProcess {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let vmm = match netns {
            Some(ns) => VmmProcess::spawn_on_with(host, &["ip", "netns", "exec", ns], &args),
            None => VmmProcess::spawn_on(host, &args),
        };
        let reader = vmm.stderr_reader();
        VMM_STDERRS.with(|v| v.borrow_mut().push(Box::new(reader)));
        vmm
    }

    /// Did this guest triple-fault at the test host's own VMRUN address
    /// (the emulator's fault, `testhost::wedge`)?
    pub fn emulator_triple_fault(&self) -> bool {
        self.host.is_test_host()
            && crate::testhost::wedge::triple_fault_at_vmrun(self.host, &self.vmm.stderr())
    }

    /// Is this guest wedged by the test host's emulator (see
    /// `testhost::wedge`)? Always false on hardware KVM.
    pub fn wedged(&self) -> bool {
        wedged_vmms(self.host).contains(&self.vmm.child.id())
    }

    /// What a timeout message says about the test host's known fault;
    /// without it, the VMM's threads and KVM counters, for the diagnosis.
    fn wedge_note(&self) -> String {
        if self.emulator_triple_fault() {
            EMULATOR_FAULT.with(|f| f.set(true));
            "\nNOTE: a vCPU of this guest triple-faulted at the test host's own VMRUN \
             address (QEMU's TCG SVM emulation restored the test host's instruction \
             pointer into the guest: docs/notes.md), not the VMM"
                .to_string()
        } else if self.host.is_test_host() && self.vmm.output().contains(TRIPLE_FAULT_RESET) {
            EMULATOR_FAULT.with(|f| f.set(true));
            "\nNOTE: the guest triple-faulted and was reset under the test (in the test \
             host, the emulator fault's other form: docs/notes.md), not the VMM"
                .to_string()
        } else if self.wedged() {
            EMULATOR_FAULT.with(|f| f.set(true));
            "\nNOTE: the test host's emulator wedged this guest (a vCPU entered at the \
             test host's own VMRUN address: a fault of QEMU's TCG SVM emulation, \
             docs/notes.md), not the VMM"
                .to_string()
        } else {
            format!(
                "\n{}",
                crate::testhost::wedge::threads_report(self.host, self.vmm.child.id())
            )
        }
    }

    /// Waits for `marker` (the guest's first user-space line). A guest that
    /// the test host's emulator wedged on the way (`testhost::wedge`) is
    /// started again, at most twice, and the test output says so.
    pub fn wait_boot(&mut self, marker: &str) {
        /// Restarts of one boot at most. The CI machine once met the fault
        /// in six 6.12 boots in a row (docs/notes.md, "The test host").
        const RESTARTS: u32 = 3;
        let mut deadline = Instant::now() + BOOT;
        let mut restarts = 0;
        loop {
            // The guest's first boot must reach the marker: a triple fault
            // on the way resets it, and the next boot's marker would hide
            // that.
            let seen = self.vmm.wait_until(0, Duration::from_secs(20), |t| {
                match (t.find(marker), t.find(TRIPLE_FAULT_RESET)) {
                    (m, Some(f)) if m.is_none_or(|m| m > f) => Some(false),
                    (Some(_), _) => Some(true),
                    _ => None,
                }
            });
            let triple_fault = match seen {
                Some(true) => return,
                Some(false) => true,
                None => false,
            };
            if triple_fault {
                assert!(
                    self.host.is_test_host(),
                    "the guest triple-faulted before {marker:?}\n{}",
                    self.report()
                );
            } else {
                assert!(
                    self.host.is_alive(),
                    "the test host died or hung before {marker:?} (its emulator's fault, \
                     docs/notes.md)\n{}",
                    self.report()
                );
                assert!(
                    self.vmm.is_alive(),
                    "the VMM exited before {marker:?}\n{}",
                    self.report()
                );
                assert!(
                    Instant::now() < deadline,
                    "{marker:?} not seen on the console within {BOOT:?}{}\n{}",
                    self.wedge_note(),
                    self.report()
                );
                if !self.wedged() {
                    continue;
                }
            }
            // In the test host, a boot that its emulator wedged, or that
            // triple-faulted before user space (the same fault's other
            // form, docs/notes.md; on hardware KVM it fails the test
            // above), starts again.
            restarts += 1;
            let what = if triple_fault {
                let rips: Vec<String> =
                    crate::testhost::wedge::triple_fault_rips(&self.vmm.stderr())
                        .iter()
                        .map(|r| format!("{r:#x}"))
                        .collect();
                format!("triple-faulted (rip {})", rips.join(", "))
            } else {
                "was wedged".to_string()
            };
            if restarts > RESTARTS {
                // Diagnosed all the same: the scenario runs again (`scenario`).
                EMULATOR_FAULT.with(|f| f.set(true));
                panic!(
                    "guest {} {what} on its way to {marker:?} {} times in a row\n{}",
                    self.spec.name,
                    RESTARTS + 1,
                    self.report()
                );
            }
            let note = format!(
                "guest {} {what} on its way to {marker:?} in the test host (QEMU TCG SVM \
                 fault, docs/notes.md); started again ({restarts}/{RESTARTS})",
                self.spec.name
            );
            eprintln!("NOTE: {note}");
            log_note(&note);
            let _ = self.vmm.child.kill();
            let _ = self.vmm.wait_exit(Duration::from_secs(10));
            self.vmm = Self::spawn_vmm(self.host, self.spec.netns.as_deref(), &self.args);
            // A fresh boot gets the whole boot time.
            deadline = Instant::now() + BOOT;
        }
    }

    /// Ends the VMM (SIGKILL) and hands back the guest's directory, so
    /// its images can be checked with no VMM holding them.
    pub fn into_dir(self) -> HostDir {
        let Guest { mut vmm, dir, .. } = self;
        let _ = vmm.child.kill();
        let _ = vmm.wait_exit(Duration::from_secs(30));
        dir
    }

    /// Ends this VMM (SIGKILL) and starts another with the same arguments
    /// plus `extra` (`--restore DIR`): the same directory, control socket
    /// and console log. Does not wait for the guest.
    pub fn restart_with(self, extra: &[&str]) -> Guest {
        let Guest {
            host,
            mut vmm,
            dir,
            sock,
            spec,
            mut args,
            seq,
        } = self;
        let _ = vmm.child.kill();
        let _ = vmm.wait_exit(Duration::from_secs(30));
        // A later restore replaces an earlier one.
        if let Some(i) = args.iter().position(|a| a == "--restore") {
            args.drain(i..(i + 2).min(args.len()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let vmm = Self::spawn_vmm(host, spec.netns.as_deref(), &args);
        Guest {
            host,
            vmm,
            dir,
            sock,
            spec,
            args,
            seq,
        }
    }

    /// A control-socket client.
    pub fn ctl(&self) -> Ctl {
        Ctl::connect_on(self.host, &self.sock)
    }

    /// Sends a `reboot` or `shutdown` request, which waits for the guest's
    /// own shutdown (up to its `timeout_s`), and returns the answer, which
    /// must be a success. In the test host the wait is watched: after
    /// every [`WATCH_SLICE`] of console silence the guest is checked for
    /// the emulator's wedge. The VMM's forced reset at the deadline ends a
    /// wedge, so once the answer ("forced") is in, nothing could tell the
    /// emulator's fault from a guest that ignored the request any more.
    pub fn graceful(&self, ctl: &mut Ctl, line: &str) -> serde_json::Value {
        let v = if self.host.is_test_host() {
            self.call_watched(ctl, line)
        } else {
            ctl.call(line)
        };
        assert_eq!(v["ok"], serde_json::Value::Bool(true), "{line} -> {v}");
        v
    }

    fn call_watched(&self, ctl: &mut Ctl, line: &str) -> serde_json::Value {
        use std::sync::mpsc::{channel, RecvTimeoutError};
        std::thread::scope(|s| {
            let (done, answered) = channel();
            let call = s.spawn(move || {
                let v = ctl.call(line);
                let _ = done.send(());
                v
            });
            let mut noted = false;
            loop {
                let len = self.vmm.len();
                match answered.recv_timeout(WATCH_SLICE) {
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if !noted && self.vmm.len() == len && self.wedged() {
                    noted = true;
                    EMULATOR_FAULT.with(|f| f.set(true));
                    eprintln!(
                        "NOTE: the test host's emulator wedged this guest while `{line}` \
                         waited for it (docs/notes.md), not the VMM: the VMM will force \
                         the request at its deadline"
                    );
                }
            }
            match call.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// For assertion messages.
    pub fn report(&self) -> String {
        format!("{}\n{}", self.vmm.report(), self.host.report())
    }

    /// Waits (at most `timeout`) until the console from byte `from` on
    /// satisfies `pred`, as [`VmmProcess::wait_until`]; but in the test
    /// host, after every [`WATCH_SLICE`] of console silence, gives up at
    /// once if the test host died or hung or its emulator wedged the guest
    /// (the caller's failure report then says which), instead of waiting
    /// out a long timeout for nothing.
    fn watch<T>(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let len = self.vmm.len();
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(WATCH_SLICE);
            if let Some(t) = self.vmm.wait_until(from, slice, &pred) {
                return Some(t);
            }
            if Instant::now() >= deadline {
                return None;
            }
            let silent = self.vmm.len() == len;
            if self.host.is_test_host() && silent && (!self.host.is_alive() || self.wedged()) {
                return None;
            }
            // A guest reset by a triple fault under the test will not print
            // what the test waits for (seen in the test host: mid-transfer,
            // then a 300 s wait for nothing). No test here makes one.
            if self.host.is_test_host() && self.vmm.output_from(from).contains(TRIPLE_FAULT_RESET) {
                return None;
            }
        }
    }

    /// Waits until `needle` was printed `count` times on the console.
    pub fn expect_count(&self, needle: &str, count: usize, timeout: Duration) {
        let seen = self.watch(0, timeout, |t| {
            (t.matches(needle).count() >= count).then_some(())
        });
        if seen.is_none() {
            panic!(
                "{needle:?} not seen {count} times on the console within {timeout:?}{}\n{}",
                self.wedge_note(),
                self.report()
            );
        }
    }

    /// Waits for `needle` on the console.
    pub fn expect(&self, needle: &str, timeout: Duration) {
        self.expect_from(0, needle, timeout);
    }

    /// Waits for `needle` on the console after byte `from`.
    pub fn expect_from(&self, from: usize, needle: &str, timeout: Duration) {
        if self
            .watch(from, timeout, |t| t.contains(needle).then_some(()))
            .is_none()
        {
            panic!(
                "{needle:?} not seen on the console within {timeout:?}{}\n{}",
                self.wedge_note(),
                self.report()
            );
        }
    }

    /// Waits for user space (`marker`, e.g. [`INIT_OK`]) and for the
    /// console shell to answer; makes the shell's lines long (no wrapping
    /// of typed commands) and keeps kernel messages below emergencies off
    /// the console while commands run.
    pub fn wait_shell(&mut self, marker: &str) {
        self.wait_boot(marker);
        // The shell may not be reading yet: ask until it answers.
        for _ in 0..60 {
            if self
                .try_run("stty cols 4000 rows 50; dmesg -n 1", Duration::from_secs(5))
                .is_some()
            {
                return;
            }
        }
        panic!(
            "the guest's console shell does not answer\n{}",
            self.report()
        );
    }

    /// Types `cmd` into the console shell and waits for it to finish:
    /// `None` if it did not within `timeout`, else its exit status and its
    /// output (stdout and stderr, `\r` removed).
    pub fn try_run(&mut self, cmd: &str, timeout: Duration) -> Option<(i32, String)> {
        self.seq += 1;
        let n = self.seq;
        let from = self.vmm.len();
        // The marker as typed ("@@E""ND") differs from what echo prints
        // (@@END), so the shell's echo of the typed line never matches.
        let typed_marker = format!("\"@@E\"\"ND-{n} $?@@\"");
        let sep = if cmd.trim_end().ends_with('&') {
            " "
        } else {
            "; "
        };
        self.vmm.send(&format!("{cmd}{sep}echo {typed_marker}\n"));
        let needle = format!("@@END-{n} ");
        let (at, code) = self.watch(from, timeout, |t| {
            let i = t.find(&needle)?;
            let rest = &t[i + needle.len()..];
            let j = rest.find("@@")?;
            Some((i, rest[..j].trim().parse::<i32>().ok()?))
        })?;
        let text = self.vmm.output_from(from);
        let text = &text[..at.min(text.len())];
        // Skip the echoed command line: echoed twice when it arrives before
        // the shell's line editor took the terminal (once by the kernel's
        // tty, once by the editor), so after the last echo.
        let start = text
            .rfind(&typed_marker)
            .and_then(|i| text[i..].find('\n').map(|j| i + j + 1))
            .unwrap_or(0);
        Some((code, text[start..].replace('\r', "")))
    }

    /// [`Guest::try_run`] that fails the test on a timeout.
    pub fn run_status(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        match self.try_run(cmd, timeout) {
            Some(r) => r,
            None => panic!(
                "`{cmd}` did not finish in the guest within {timeout:?}{}\n{}",
                self.wedge_note(),
                self.report()
            ),
        }
    }

    /// Runs `cmd` in the guest, asserting exit status 0; its output.
    pub fn run(&mut self, cmd: &str) -> String {
        let (code, out) = self.run_status(cmd, CMD);
        assert_eq!(
            code,
            0,
            "`{cmd}` failed in the guest:\n{out}\n{}",
            self.report()
        );
        out
    }
}

thread_local! {
    /// Set when this test thread diagnosed a fault of the test host's
    /// emulator (a wedged guest).
    static EMULATOR_FAULT: Cell<bool> = const { Cell::new(false) };
    /// The stderr of every VMM this scenario run started, for the
    /// post-mortem of a failure that no `Guest` method diagnosed.
    static VMM_STDERRS: std::cell::RefCell<Vec<Box<dyn Fn() -> String>>> =
        std::cell::RefCell::new(Vec::new());
}
