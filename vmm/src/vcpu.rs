//! The vCPU threads: `KVM_RUN`, exit dispatch to the buses, the PVM
//! emulation fallback, and the small run/pause/exit state machine driven by
//! the VMM thread (a signal plus `immediate_exit` kicks a vCPU out of the
//! guest).

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::virtio::GuestMemoryMmap;
use devices::{Bus, ResetCause};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::emulate;
use crate::events::{VmEvent, VmEventQueue};

/// How often a napping vCPU looks whether its throttle was lifted.
const NAP_STEP: Duration = Duration::from_millis(10);

/// What the VMM wants a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Exit,
}

/// Work for a parked vCPU's own thread (KVM's vCPU state is read and
/// written there: the thread owns the `VcpuFd`).
pub type Task = Box<dyn FnOnce(&VcpuFd) + Send>;

/// What a parked vCPU thread wakes up for.
enum Wake {
    Run,
    Exit,
    Task(Task),
}

/// Shared between a vCPU thread and the VMM thread.
pub struct VcpuControl {
    want: Mutex<(Want, bool /* parked */, Option<Task>)>,
    cv: Condvar,
}

impl VcpuControl {
    fn new(want: Want) -> Self {
        Self {
            want: Mutex::new((want, false, None)),
            cv: Condvar::new(),
        }
    }

    fn set(&self, w: Want) {
        lock(&self.want).0 = w;
        self.cv.notify_all();
    }

    /// Parks a running vCPU after a fatal exit; an `Exit` already asked
    /// for is kept.
    fn self_park(&self) {
        let mut g = lock(&self.want);
        if g.0 == Want::Run {
            g.0 = Want::Pause;
        }
    }

    /// Blocks while paused; returns `Wake::Exit` when the vCPU must exit,
    /// and a task handed to the parked vCPU (it stays parked meanwhile).
    /// `on_resume` runs when the vCPU leaves a pause.
    fn wait_runnable(&self, on_resume: impl FnOnce()) -> Wake {
        let mut g = lock(&self.want);
        let mut was_paused = false;
        loop {
            match g.0 {
                Want::Run => {
                    g.1 = false;
                    drop(g);
                    if was_paused {
                        on_resume();
                    }
                    return Wake::Run;
                }
                Want::Exit => {
                    g.1 = true;
                    self.cv.notify_all();
                    return Wake::Exit;
                }
                Want::Pause => {
                    was_paused = true;
                    if !g.1 {
                        g.1 = true;
                        self.cv.notify_all();
                    }
                    if let Some(task) = g.2.take() {
                        return Wake::Task(task);
                    }
                    g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Hands `task` to the vCPU thread, which runs it once parked.
    fn give_task(&self, task: Task) {
        lock(&self.want).2 = Some(task);
        self.cv.notify_all();
    }

    /// Keeps a running vCPU out of the guest for `d` (a migration's
    /// throttle); a pause or an exit asked for meanwhile ends it at once,
    /// and `over` (the throttle lifted), looked at every 10 ms, too: a nap
    /// at 99 % is most of a second.
    fn nap(&self, d: Duration, over: impl Fn() -> bool) {
        let until = Instant::now() + d;
        let mut g = lock(&self.want);
        while g.0 == Want::Run && !over() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = match self.cv.wait_timeout(g, left.min(NAP_STEP)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Waits until the vCPU sits outside `KVM_RUN` (paused or exiting).
    fn wait_parked(&self, timeout: Duration) -> bool {
        let g = lock(&self.want);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |s| !s.1)
            .unwrap_or_else(|e| e.into_inner());
        g.1
    }
}

/// Counters of one boot's PVM fallback work, shared by all vCPUs.
#[derive(Default)]
pub struct FallbackCounters {
    pub emulated: AtomicU64,
    pub injected: AtomicU64,
    pub kinds: Mutex<emulate::Stats>,
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run, set
            // by the vCPU thread before KVM_RUN and valid while it lives;
            // writing one byte is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Kicks thread `tid` of this process out of `KVM_RUN` (a throttled
/// vCPU's slice is over). A thread that is no vCPU, or one gone, is
/// unaffected: the handler does nothing outside `KVM_RUN`, `ESRCH` is
/// ignored.
pub fn kick_thread(tid: libc::pid_t) {
    // SAFETY: tgkill takes plain integers; the signal's handler is
    // installed (`init_kick_signal`) before any vCPU runs.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::c_long::from(tid),
            libc::c_long::from(kick_signal()),
        );
    }
}

/// Installs the kick handler once per process.
pub fn init_kick_signal() -> Result<(), String> {
    register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))
}

pub struct VcpuHandle {
    pub id: u8,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH once the thread is gone is fine.
            let _ = t.kill(kick_signal());
        }
    }

    pub fn pause(&self) {
        self.control.set(Want::Pause);
        self.kick();
    }

    pub fn resume(&self) {
        self.control.set(Want::Run);
    }

    pub fn wait_parked(&self, timeout: Duration) -> bool {
        self.control.wait_parked(timeout)
    }

    /// Runs `f` with the vCPU's fd on its own thread, which must be paused
    /// (`pause` and `wait_parked` first); None when it does not answer
    /// within `timeout` (the task may still run later, its answer unread).
    pub fn with_parked_fd<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce(&VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.control.give_task(Box::new(move |fd| {
            let _ = tx.send(f(fd));
        }));
        rx.recv_timeout(timeout).ok()
    }

    /// Stops the thread and joins it.
    pub fn stop(&mut self) {
        self.control.set(Want::Exit);
        // The thread may be between the check and KVM_RUN: kick until parked.
        for _ in 0..200 {
            self.kick();
            if self.control.wait_parked(Duration::from_millis(10)) {
                break;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub events: VmEventQueue,
    pub fallback: Arc<FallbackCounters>,
    /// The machine's migration throttle (naps after kicks while above 0).
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Called on the vCPU thread right before its first KVM_RUN.
    pub on_first_run: Option<Box<dyn FnOnce() + Send>>,
}

enum Next {
    Continue,
    /// Port or MMIO I/O served: KVM completes the instruction next run.
    Io,
    Park,
}

impl Vcpu {
    /// Starts the vCPU's thread, running or (`paused`) parked until
    /// `resume`.
    pub fn spawn(self, paused: bool) -> Result<VcpuHandle, String> {
        let control = Arc::new(VcpuControl::new(if paused {
            Want::Pause
        } else {
            Want::Run
        }));
        let c = control.clone();
        let id = self.id;
        let thread = crate::spawner::spawn(format!("vcpu{id}"), move || self.run_loop(&c))
            .map_err(|e| format!("cannot start vCPU thread {id}: {e}"))?;
        Ok(VcpuHandle {
            id,
            control,
            thread: Some(thread),
        })
    }

    fn run_loop(mut self, control: &VcpuControl) {
        // Before the first guest instruction this thread runs.
        crate::seccomp::install(crate::seccomp::Kind::Vcpu);
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let _kicked = self.throttle.register();
        let mut first = self.on_first_run.take();
        crate::fatal::inject("vcpu");
        let mut parked = false;
        // The last exit was port or MMIO I/O, which KVM completes at the
        // next KVM_RUN (an IN's value, the instruction pointer moved on).
        let mut io_pending = false;
        loop {
            if parked {
                // Stay out of the guest until the VMM tears us down.
                control.self_park();
                parked = false;
            }
            let fd = &self.fd;
            match control.wait_runnable(|| {
                // Tell the guest's kvmclock it was stopped, so it does not
                // report soft lockups. EINVAL when the guest has no kvmclock.
                let _ = fd.kvmclock_ctrl();
            }) {
                Wake::Run => {}
                Wake::Exit => break,
                Wake::Task(task) => {
                    if std::mem::take(&mut io_pending) {
                        self.complete_pending_io();
                    }
                    task(&self.fd);
                    continue;
                }
            }
            if let Some(f) = first.take() {
                f();
            }
            io_pending = false;
            let next = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            data.fill(0xff);
                        }
                        Next::Io
                    }
                    VcpuExit::IoOut(port, data) => {
                        dispatch_write(&self.pio, u64::from(port), data);
                        Next::Io
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            data.fill(0xff);
                        }
                        Next::Io
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        dispatch_write(&self.mmio, addr, data);
                        Next::Io
                    }
                    VcpuExit::Shutdown => {
                        // Where it died, for whoever debugs the guest (or
                        // the hypervisor under us): one line.
                        match self.fd.get_regs() {
                            Ok(r) => devices::limited!(
                                warn,
                                "vCPU {}: triple fault (KVM shutdown exit) at rip={:#x} rsp={:#x}",
                                self.id,
                                r.rip,
                                r.rsp
                            ),
                            Err(e) => devices::limited!(
                                warn,
                                "vCPU {}: triple fault (KVM shutdown exit); registers: {e}",
                                self.id
                            ),
                        }
                        self.events.push(VmEvent::Guest(devices::GuestEvent::Reset(
                            ResetCause::TripleFault,
                        )));
                        Next::Park
                    }
                    VcpuExit::Hlt => {
                        // With the in-kernel LAPIC, HLT is handled by KVM;
                        // an HLT exit means the vCPU can never wake up.
                        self.events.push(VmEvent::VcpuFailed {
                            vcpu: self.id,
                            reason: "the vCPU halted with no way to wake it".into(),
                        });
                        Next::Park
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        let ev = match kind {
                            kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                                devices::GuestEvent::Reset(ResetCause::TripleFault)
                            }
                            _ => devices::GuestEvent::PowerOff,
                        };
                        self.events.push(VmEvent::Guest(ev));
                        Next::Park
                    }
                    VcpuExit::InternalError => self.internal_error(),
                    VcpuExit::Intr => Next::Continue,
                    VcpuExit::FailEntry(reason, cpu) => {
                        self.events.push(VmEvent::VcpuFailed {
                            vcpu: self.id,
                            reason: format!(
                                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                            ),
                        });
                        Next::Park
                    }
                    other => {
                        self.events.push(VmEvent::VcpuFailed {
                            vcpu: self.id,
                            reason: format!("unexpected KVM exit {other:?}"),
                        });
                        Next::Park
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    // A throttled vCPU's slice is over: its nap, unless a
                    // pause or an exit is what kicked it.
                    if let Some(d) = self.throttle.nap() {
                        let throttle = &self.throttle;
                        control.nap(d, || throttle.pct() == 0);
                    }
                    Next::Continue
                }
                Err(e) => {
                    self.events.push(VmEvent::VcpuFailed {
                        vcpu: self.id,
                        reason: format!("KVM_RUN failed: {e}"),
                    });
                    Next::Park
                }
            };
            match next {
                Next::Park => parked = true,
                Next::Io => io_pending = true,
                Next::Continue => {}
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Lets KVM finish the I/O instruction of the last exit without
    /// entering the guest (KVM_RUN with `immediate_exit`), so that the
    /// state read next is whole: an IN's value in its register, the
    /// instruction pointer past it.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        // A `rep ins`/`rep outs` past one batch, or an MMIO access KVM
        // splits, needs more of us before the instruction is whole: serve
        // those exits as `run_loop` does, until KVM says EINTR.
        for _ in 0..1024 {
            match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
                Err(e) => {
                    tracing::warn!("vCPU {}: completing its last I/O: {e}", self.id);
                    break;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => dispatch_write(&self.pio, u64::from(port), data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => dispatch_write(&self.mmio, addr, data),
                Ok(exit) => {
                    tracing::warn!(
                        "vCPU {}: completing its last I/O, KVM exited with {exit:?}",
                        self.id
                    );
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// KVM gave up on an instruction (PVM's emulator): emulate it here.
    fn internal_error(&mut self) -> Next {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
        // `internal` member of the union is the one KVM filled in.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            self.events.push(VmEvent::VcpuFailed {
                vcpu: self.id,
                reason: format!("KVM internal error, suberror {suberror}"),
            });
            return Next::Park;
        }
        match crate::fallback::emulate_at_rip(&self.fd, &self.mem, &self.fallback) {
            Ok(()) => Next::Continue,
            Err(reason) => {
                self.events.push(VmEvent::VcpuFailed {
                    vcpu: self.id,
                    reason,
                });
                Next::Park
            }
        }
    }
}

/// Port/MMIO writes: `rep outs` arrives as several elements in one exit.
fn dispatch_write(bus: &Bus, addr: u64, data: &[u8]) {
    if data.len() <= 8 {
        bus.write(addr, data);
    } else {
        for b in data.chunks(1) {
            bus.write(addr, b);
        }
    }
}

/// Reads guest-physical memory for diagnostics; never fails loudly.
pub fn read_phys(mem: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) -> bool {
    mem.read_slice(buf, GuestAddress(addr)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nap_ends_early_for_a_pause_or_a_lifted_throttle_and_runs_its_length_otherwise() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let c = Arc::new(VcpuControl::new(Want::Run));
        let t0 = Instant::now();
        c.nap(Duration::from_millis(30), || false);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        // A pause asked for meanwhile: the nap ends as it is asked.
        let c2 = c.clone();
        let pauser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            c2.set(Want::Pause);
        });
        let t0 = Instant::now();
        c.nap(Duration::from_secs(30), || false);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        pauser.join().unwrap();
        // The throttle lifted: seen within a step.
        c.set(Want::Run);
        let lifted = Arc::new(AtomicBool::new(false));
        let l2 = lifted.clone();
        let lifter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l2.store(true, Ordering::SeqCst);
        });
        let t0 = Instant::now();
        c.nap(Duration::from_secs(30), || lifted.load(Ordering::SeqCst));
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        lifter.join().unwrap();
    }

    #[test]
    fn control_parks_on_pause_and_releases_on_run() {
        let c = Arc::new(VcpuControl::new(Want::Run));
        c.set(Want::Pause);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let mut resumed = false;
            let r = matches!(c2.wait_runnable(|| resumed = true), Wake::Run);
            (r, resumed)
        });
        assert!(c.wait_parked(Duration::from_secs(5)));
        c.set(Want::Run);
        assert_eq!(t.join().unwrap(), (true, true));
    }

    #[test]
    fn control_exit_wins_over_pause() {
        let c = Arc::new(VcpuControl::new(Want::Run));
        c.set(Want::Pause);
        let c2 = c.clone();
        let t = std::thread::spawn(move || matches!(c2.wait_runnable(|| {}), Wake::Exit));
        assert!(c.wait_parked(Duration::from_secs(5)));
        c.set(Want::Exit);
        assert!(t.join().unwrap());
    }

    #[test]
    fn a_task_reaches_a_parked_vcpu_which_stays_parked() {
        let c = Arc::new(VcpuControl::new(Want::Run));
        c.set(Want::Pause);
        let c2 = c.clone();
        let t = std::thread::spawn(move || matches!(c2.wait_runnable(|| {}), Wake::Task(_)));
        assert!(c.wait_parked(Duration::from_secs(5)));
        c.give_task(Box::new(|_| {}));
        assert!(t.join().unwrap());
        assert!(c.wait_parked(Duration::from_millis(1)));
    }
}
