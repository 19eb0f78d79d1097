//! A real Linux guest from the kernel library, started by `vmm` on the
//! test process's [`Host`], whose shell on the serial console the tests
//! type into and read from as a person would.

use std::cell::Cell;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::Ctl;
use crate::host::{host, Host};
use crate::testhost::wedge::wedged_vmms;
use crate::VmmProcess;

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

/// A scratch directory on a host, removed on drop.
pub struct HostDir {
    host: &'static Host,
    path: PathBuf,
}

impl HostDir {
    pub fn new(host: &'static Host, tag: &str) -> HostDir {
        let out = host
            .sh(&format!("mktemp -d /tmp/vmm-e2e-{tag}-XXXXXX"))
            .ok("mktemp");
        HostDir {
            host,
            path: PathBuf::from(out.trim()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside it, as a string for command lines.
    pub fn join(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!("rm -rf '{}'", self.path.display()),
            Duration::from_secs(60),
        );
    }
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    /// Library entry (`build/kernels/<kernel>`).
    pub kernel: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the entry's command line.
    pub cmdline: String,
    /// More `vmm` arguments (disks, nets, actions).
    pub args: Vec<String>,
    /// Run the VMM in this network namespace (see [`NetNs`]).
    pub netns: Option<String>,
    /// Pass the library's own command line of each entry (no `--cmdline`):
    /// for a guest that switches kernels.
    pub entry_cmdline: bool,
    /// `--kernel-name` when it is not `kernel` (e.g. `disk`: the kernel in
    /// the guest's own /boot; `kernel` then still gives the command line).
    pub kernel_name: Option<String>,
}

impl Spec {
    pub fn new(kernel: &str) -> Spec {
        Spec {
            name: format!("g-{kernel}"),
            kernel: kernel.to_string(),
            vcpus: 1,
            memory_mib: 256,
            cmdline: String::new(),
            args: Vec::new(),
            netns: None,
            entry_cmdline: false,
            kernel_name: None,
        }
    }

    /// Boots `name` (`--kernel-name`) with `kernel`'s command line.
    pub fn kernel_name(mut self, name: &str) -> Spec {
        self.kernel_name = Some(name.to_string());
        self
    }

    pub fn name(mut self, name: &str) -> Spec {
        self.name = name.to_string();
        self
    }

    /// Runs the VMM inside `ns` (its TAPs are there).
    pub fn netns(mut self, ns: &NetNs) -> Spec {
        self.netns = Some(ns.name.clone());
        self
    }

    /// Each library entry boots with its own command line (no extra words).
    pub fn entry_cmdline(mut self) -> Spec {
        self.entry_cmdline = true;
        self
    }

    pub fn vcpus(mut self, n: u32) -> Spec {
        self.vcpus = n;
        self
    }

    pub fn memory(mut self, mib: u32) -> Spec {
        self.memory_mib = mib;
        self
    }

    pub fn cmdline(mut self, extra: &str) -> Spec {
        if !self.cmdline.is_empty() {
            self.cmdline.push(' ');
        }
        self.cmdline.push_str(extra);
        self
    }

    pub fn arg(mut self, a: &str) -> Spec {
        self.args.push(a.to_string());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Spec {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

/// The kernel library (`build/kernels`), by its path on every host.
pub fn kernel_dir() -> PathBuf {
    crate::kernel_dir()
}

/// A file of a library entry (`cmdline`, `release`), trimmed.
fn entry_file(kernel: &str, name: &str) -> String {
    let p = kernel_dir().join(kernel).join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run resources/build-kernels.sh {kernel})",
                p.display()
            )
        })
        .trim()
        .to_string()
}

/// The default command line of a library entry.
pub fn entry_cmdline(kernel: &str) -> String {
    entry_file(kernel, "cmdline")
}

/// The `uname -r` of a library entry.
pub fn entry_release(kernel: &str) -> String {
    entry_file(kernel, "release")
}

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

/// Did a VMM of this scenario run log a triple fault in the test host?
/// No user-space scenario makes its guest triple-fault, and in the test
/// host every one so far was the emulator fault's other form, at any
/// point of a run (docs/notes.md, "Left to do" (d)): the reading
/// `Guest::wedge_note` gives a timeout, here for a failure that no
/// `Guest` method diagnosed (a reboot test's boot count one too high).
/// On hardware KVM it fails the test.
fn emulator_triple_fault_in_run(h: &Host) -> bool {
    if !h.is_test_host() {
        return false;
    }
    VMM_STDERRS.with(|v| {
        v.borrow()
            .iter()
            .any(|f| !crate::testhost::wedge::triple_fault_rips(&f()).is_empty())
    })
}

/// Waits (at most 30 s) until no KVM VM of the test host belongs to a
/// process that is gone or a zombie: a VM torn down while another boots
/// is the test host emulator's fault's surest trigger measured
/// (`scripts/testhost-bootloop.sh`: a boot started at once after a SIGKILL
/// of the previous VMM wedged 4 times in 32, one started after it exited
/// none in the 31 beside them; docs/notes.md, "The test host"). Waiting
/// for the VMM's exit covers most of it; a VM whose last reference goes
/// later (or a wait that timed out) is what this catches.
pub(crate) fn settle_vms(host: &Host) {
    const SETTLE: &str = r#"n=0
while [ $n -lt 300 ]; do
    busy=
    for d in /sys/kernel/debug/kvm/*-*; do
        [ -d "$d" ] || continue
        p=${d##*/}; p=${p%%-*}
        case $(awk '{print $3}' /proc/$p/stat 2>/dev/null) in ''|Z|X) busy=$p ;; esac
    done
    [ -z "$busy" ] && { echo $n; exit 0; }
    sleep 0.1; n=$((n+1))
done
echo 300"#;
    if !host.is_test_host() {
        return;
    }
    let Ok(out) = host.try_sh(SETTLE, Duration::from_secs(60)) else {
        return;
    };
    let tenths: u32 = out.stdout.trim().parse().unwrap_or(0);
    if tenths > 0 {
        let note = format!(
            "waited {:.1} s for a VM of an exited VMM to be torn down before starting a guest",
            f64::from(tenths) / 10.0
        );
        eprintln!("NOTE: {note}");
        log_note(&note);
    }
}

/// Runs a test's body on the current host. If the body fails *and* the
/// failure is the test host emulator's (a guest diagnosed as wedged by it,
/// or the test host itself died or hung: see `testhost::wedge`), the body
/// runs again, on a test host that is alive (until the run's retry time is
/// spent, [`retry_budget`], at most 16 runs),
/// and the output says so. In the test host an undiagnosed failure also
/// gets one more run; on hardware KVM it fails the test. Every retry is
/// also appended to `target/testhost-retries.log`, which `./test.sh`
/// prints at the end (a passing retry's output is otherwise swallowed by
/// the test harness).
///
/// In the test host, scenarios run one at a time whatever the test harness'
/// thread count: two busy guests at once made its emulator's fault kill the
/// test host itself every minute or two (docs/notes.md).
pub fn scenario(body: impl Fn(&'static Host)) {
    /// Runs of one scenario at most. A boot in the test host meets the
    /// emulator's fault now and then (Debian's early boot more often than
    /// mini's), a scenario boots up to four times, and the faults come in
    /// clusters: a CI run and a run here each lost four runs in a row of
    /// one Debian scenario to test hosts that died, later CI runs all six
    /// of one (stop 20) and all eight of three (stop 21), in stretches
    /// where test hosts died every minute or two. So a scenario may run
    /// until the run's whole retry time ([`retry_budget`]) is spent,
    /// which keeps `./test.sh` inside CI's time on a bad day.
    const MAX_RUNS: u32 = 16;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = host()
        .is_test_host()
        .then(|| ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()));
    let mut undiagnosed_retried = false;
    let first_started = Instant::now();
    for attempt in 1..=MAX_RUNS {
        EMULATOR_FAULT.with(|f| f.set(false));
        VMM_STDERRS.with(|v| v.borrow_mut().clear());
        let started = Instant::now();
        let h = host();
        let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| body(h))) else {
            log_time(first_started.elapsed(), started.elapsed(), attempt);
            return;
        };
        let last = attempt == MAX_RUNS;
        let fault =
            EMULATOR_FAULT.with(|f| f.get()) || !h.is_alive() || emulator_triple_fault_in_run(h);
        let spent = if fault {
            spend_retry_time(started.elapsed())
        } else {
            Duration::ZERO
        };
        if fault && !last && spent > retry_budget() {
            log_retry("emulator fault (diagnosed), retry time spent", &*panic);
            eprintln!(
                "NOTE: the failure above is the test host emulator's, but this run of the \
                 suite has spent its {} minutes of retries (VMM_TESTHOST_RETRY_MINUTES)",
                retry_budget().as_secs() / 60
            );
            std::panic::resume_unwind(panic);
        }
        if fault && !last {
            log_retry("emulator fault (diagnosed)", &*panic);
            eprintln!(
                "NOTE: the failure above is the test host emulator's (docs/notes.md, \
                 \"The test host\"), not the VMM's: running the test again"
            );
            continue;
        }
        // In software emulation a rare failure is not diagnosed as the
        // emulator's yet still goes away (docs/notes.md, "Left to do"):
        // once, said loudly, with the first failure's report above. A
        // failure that repeats fails.
        if h.is_test_host() && !undiagnosed_retried && !last {
            undiagnosed_retried = true;
            log_retry("UNDIAGNOSED failure", &*panic);
            eprintln!(
                "NOTE: UNDIAGNOSED failure in the test host (report above, whole \
                 console saved): running the test once more; a second failure fails it"
            );
            continue;
        }
        std::panic::resume_unwind(panic);
    }
}

/// How long this test process may spend in scenario runs lost to the
/// emulator's fault, all scenarios together (a test host's replacement
/// included): 30 minutes (`VMM_TESTHOST_RETRY_MINUTES`). CI's cold
/// `./test.sh` takes 40-50 minutes without lost runs (kernel library and
/// build ~15, the suite with its in-run restarts), so even a run that
/// spends it all (and one run more, the one that crosses it) stays inside
/// CI's 90.
pub fn retry_budget() -> Duration {
    let minutes = std::env::var("VMM_TESTHOST_RETRY_MINUTES")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(30);
    Duration::from_secs(minutes.saturating_mul(60))
}

/// Adds a lost run's time to this process' total; the total so far.
fn spend_retry_time(d: Duration) -> Duration {
    static SPENT: std::sync::Mutex<Duration> = std::sync::Mutex::new(Duration::ZERO);
    let mut spent = SPENT.lock().unwrap_or_else(|e| e.into_inner());
    *spent = spent.saturating_add(d);
    *spent
}

/// The name of the running test (its thread's), for the logs below.
fn test_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// Appends `line` to `target/<log>`, for `./test.sh` to print at the end.
fn append_to_log(log: &str, line: &str) {
    let path = crate::repo_root().join("target").join(log);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Appends a line to `target/testhost-retries.log` (what `./test.sh`
/// prints at the end).
pub fn log_note(line: &str) {
    append_to_log("testhost-retries.log", &format!("{}: {line}", test_name()));
}

/// Appends a passed scenario's time to `target/testhost-times.log`, which
/// `./test.sh` prints slowest first: where the suite's time goes, and
/// what the emulator's faults cost (`total` against `last`).
fn log_time(total: Duration, last: Duration, runs: u32) {
    append_to_log(
        "testhost-times.log",
        &format!(
            "{:6.0} s  {} (passing run {:.0} s, runs {runs})",
            total.as_secs_f64(),
            test_name(),
            last.as_secs_f64()
        ),
    );
}

/// Appends a retried failure to `target/testhost-retries.log`.
fn log_retry(kind: &str, panic: &(dyn std::any::Any + Send)) {
    let msg = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    // A passing rerun swallows the failure's output: an undiagnosed one
    // keeps its whole message here (a stalled transfer's `status`, with
    // the rings, is in it), which `./test.sh` prints at the end.
    let shown = if kind.starts_with("UNDIAGNOSED") {
        msg
    } else {
        msg.lines().next().unwrap_or_default()
    };
    log_note(&format!("{kind}, ran again: {shown}"));
}

/// A network namespace on a host with a TAP (`tap0`, 10.0.2.1/24 on the
/// host side) for a guest's `--net tap=tap0`; removed on drop.
pub struct NetNs {
    host: &'static Host,
    pub name: String,
}

/// The host side of a [`NetNs`]'s TAP.
pub const HOST_IP: &str = "10.0.2.1";
/// What tests give the guest's eth0.
pub const GUEST_IP: &str = "10.0.2.2";
/// The host side's IPv6 address in a [`NetNs::bridged`].
pub const HOST_IP6: &str = "fd00:2::1";

impl NetNs {
    pub fn new(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a TAP",
            &format!(
                "ip -n $ns tuntap add dev tap0 mode tap multi_queue; \
                 ip -n $ns addr add {HOST_IP}/24 dev tap0; ip -n $ns link set tap0 up"
            ),
        )
    }

    /// As [`NetNs::new`] with a single-queue TAP: QEMU with one queue pair
    /// opens its TAP without `IFF_MULTI_QUEUE`, which the kernel refuses
    /// on a multi-queue TAP (the side-by-side benchmarks; our VMM takes
    /// either).
    pub fn single_queue(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a TAP",
            &format!(
                "ip -n $ns tuntap add dev tap0 mode tap; \
                 ip -n $ns addr add {HOST_IP}/24 dev tap0; ip -n $ns link set tap0 up"
            ),
        )
    }

    /// A namespace standing for a host whose VMs are on a bridge: `br0`
    /// with [`HOST_IP`]/24 and [`HOST_IP6`]/64, no TAP (`vmm net up`
    /// makes the VMs' TAPs).
    pub fn bridged(host: &'static Host, tag: &str) -> NetNs {
        Self::create(
            host,
            tag,
            "a bridge",
            &format!(
                "ip -n $ns link add br0 type bridge; \
                 ip -n $ns addr add {HOST_IP}/24 dev br0; \
                 ip -n $ns addr add {HOST_IP6}/64 dev br0 nodad; ip -n $ns link set br0 up"
            ),
        )
    }

    /// A fresh namespace with its loopback up, then `setup` (a shell
    /// script, the namespace's name in `$ns`) to give it `what`.
    fn create(host: &'static Host, tag: &str, what: &str, setup: &str) -> NetNs {
        let name = format!("vmm-{tag}-{}", crate::rand_u64() % 1_000_000);
        host.sh(&format!(
            "set -e; ns={name}; ip netns add $ns; ip -n $ns link set lo up; {setup}"
        ))
        .ok(&format!("create a network namespace with {what}"));
        NetNs { host, name }
    }

    /// Runs `script` inside the namespace.
    pub fn sh(&self, script: &str) -> crate::host::Output {
        self.host.sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            script.replace('\'', "'\\''")
        ))
    }

    /// Starts `argv` inside the namespace, in the background.
    pub fn spawn(&self, argv: &[&str]) -> std::io::Result<crate::host::Proc> {
        let prefix = self.exec_prefix();
        let full: Vec<&str> = prefix
            .iter()
            .map(String::as_str)
            .chain(argv.iter().copied())
            .collect();
        self.host.spawn(&full, &[])
    }

    /// A command line prefix that runs inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.host.try_sh(
            &format!("ip netns del {}", self.name),
            Duration::from_secs(60),
        );
    }
}
