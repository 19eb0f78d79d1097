//! The VM lifecycle: boots, resets, pauses and power-offs of one guest
//! inside this process, driven by events from vCPUs and devices and by
//! requests from the control socket.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::ib700::{IB700_BASE, IB700_LEN};
use devices::legacy::serial::SerialOutput;
use devices::ResetCause as DevResetCause;
use kvm_ioctls::Kvm;
use protocol::{
    ControlError, ErrorCode, Event, PanicAction, ResetCause, StopOutcome, StopResult, VmState,
    WatchdogAction,
};
use vmm_sys_util::timerfd::TimerFd;

pub use crate::lifecycle::StopKind;
use crate::lifecycle::{Action, Input, Lifecycle};

use crate::config::{ConfigError, KernelChoice, KernelSource, VmConfig};
use crate::cpu::CpuidPolicy;
use crate::events::VmEventQueue;
use crate::machine::{BootConfig, BootEnv, Machine, MachineError, PioDevice, VirtioSlot};
use crate::runtime::Subscriber;
use crate::watchdog::{GuestClock, Watchdog};
use devices::virtio::GuestMemoryHandle;

mod guest_events;
pub(crate) mod migration;
mod snapshot;
mod virtio;

pub use snapshot::SnapshotJob;
use virtio::create_virtio;
pub use virtio::{DiskSource, NetSource};

/// Why a lifecycle input was not carried out.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error("{0}")]
    Refused(crate::lifecycle::Refusal),
    #[error("{0}")]
    Boot(VmmError),
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("cannot boot: {0}")]
    Boot(#[from] MachineError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    DiskKernel(#[from] crate::disk_kernels::DiskKernelError),
    #[error("{0}")]
    Setup(String),
}

/// What the process should do after handling events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Exit(u8),
}

/// Answer to a graceful `shutdown`/`reboot` once it completes or times out.
pub type StopReply = Box<dyn FnOnce(Result<StopOutcome, ControlError>) + Send>;

/// The answer owed to a `shutdown`/`reboot` the lifecycle holds pending.
struct PendingStop {
    started: Instant,
    reply: StopReply,
}

/// Told of each boot: its number and a reason for the console log.
pub type BootHook = Box<dyn Fn(u64, &str) + Send>;

/// Broadcasts an event to the control socket's subscribers.
pub type Publish = Arc<dyn Fn(Event) + Send + Sync>;

/// Hooks the runtime plugs in: console, events.
pub struct VmHooks {
    /// A fresh writer for the UART of each boot.
    pub serial_out: Box<dyn Fn() -> SerialOutput + Send>,
    /// A boot started: mark it in the console log.
    pub on_boot: BootHook,
    /// Broadcast an event to subscribers (also from device threads).
    pub publish: Publish,
}

impl Default for VmHooks {
    fn default() -> Self {
        VmHooks {
            serial_out: Box::new(|| Box::new(std::io::stdout())),
            on_boot: Box::new(|_, _| {}),
            publish: Arc::new(|_| {}),
        }
    }
}

/// How long a `shutdown` waits on the ACPI power button before it also
/// presses Ctrl-Alt-Del: half its timeout, at most this. A systemd guest
/// needs a moment to turn the button into its irreversible poweroff job;
/// a Ctrl-Alt-Del before that would start a reboot instead (seen with 5 s
/// under the test host's emulation).
pub const SHUTDOWN_NUDGE: Duration = Duration::from_secs(30);

/// How soon a graceful stop's deadline that fell while a snapshot was being
/// written is looked at again.
const HELD_RETRY: Duration = Duration::from_millis(100);

pub struct Vm {
    kvm: Kvm,
    pub config: VmConfig,
    pub events: VmEventQueue,
    machine: Option<Machine>,
    /// The published state (`state_changed` events follow it).
    state: VmState,
    lifecycle: Lifecycle,
    pub boot_count: u64,
    pub last_reset: Option<ResetCause>,
    boot_started: Instant,
    pub process_start: Instant,
    cpuid: CpuidPolicy,
    pub watchdog: Watchdog,
    pub watchdog_action: WatchdogAction,
    pub panic_action: PanicAction,
    pub alert_hook: Option<crate::hooks::AlertHook>,
    /// The library entry chosen for the next boot (`set-kernel`).
    pub next_kernel: Option<String>,
    /// The VM's first disk, for the kernels in its `/boot` (`disk`,
    /// `disk:VERSION`).
    pub boot_disk: Option<crate::disk_kernels::BootDisk>,
    pub current_kernel: String,
    pub state_file: Option<PathBuf>,
    pub stop_timeout: Duration,
    pending_stop: Option<PendingStop>,
    /// A `shutdown`/`reboot` being admitted: (timeout, reply).
    stop_request: Option<(Duration, StopReply)>,
    stop_timer: TimerFd,
    /// A shutdown's second signal (Ctrl-Alt-Del), for guests the power button left cold.
    nudge_timer: TimerFd,
    /// Whether a guest poweroff ends the process.
    pub exit_on_poweroff: bool,
    pub hooks: VmHooks,
    /// Signalled by each boot's UART when the guest drained its input FIFO.
    pub serial_input_drained: Option<vmm_sys_util::eventfd::EventFd>,
    virtio: Vec<VirtioSlot>,
    /// The network interfaces, each served on an I/O thread of its own
    /// (see `runtime::spawn_io_threads`), with a name for it.
    pub net_subscribers: Vec<(String, Subscriber)>,
    /// The block devices, each served on an I/O thread of its own (see
    /// `runtime::spawn_io_threads`), with a name for it.
    pub disk_subscribers: Vec<(String, Subscriber)>,
    /// What `status` shows of each disk (read without the device's lock, which a
    /// stalled disk's thread may hold).
    pub disks: Vec<DiskSource>,
    /// What `status` shows of each network interface.
    pub nets: Vec<NetSource>,
    mem_handle: GuestMemoryHandle,
    /// The snapshot the first boot continues instead (`--restore`).
    pub restore: Option<crate::snapshot::RestoreSource>,
    /// KVM's MSR list, read at the first snapshot.
    msr_index: Option<Arc<Vec<u32>>>,
    /// A migration is running: the vhost-net instances it took away.
    migrating: Option<Vec<Vec<std::fs::File>>>,
    /// What `migrate-cancel` reaches; a new one for each migration.
    migration_cancel: Arc<crate::migration::flow::Cancel>,
    /// The snapshot just restored was of a paused VM.
    restored_paused: bool,
    /// The guest was migrated to another host: it never boots here again.
    migrated_away: bool,
}

pub fn dev_cause(c: DevResetCause) -> ResetCause {
    match c {
        DevResetCause::I8042 | DevResetCause::AcpiReset => ResetCause::Guest,
        DevResetCause::TripleFault => ResetCause::TripleFault,
        DevResetCause::Watchdog => ResetCause::Watchdog,
        DevResetCause::Panic => ResetCause::Panic,
        DevResetCause::Request => ResetCause::Command,
    }
}

impl Vm {
    pub fn new(config: VmConfig, hooks: VmHooks) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        crate::vcpu::init_kick_signal().map_err(VmmError::Setup)?;
        let setup = |what: &str, e: std::io::Error| VmmError::Setup(format!("{what}: {e}"));
        let events = VmEventQueue::new().map_err(|e| setup("eventfd", e))?;
        let clock = Arc::new(GuestClock::new());
        let watchdog = Watchdog::new(clock, events.sink()).map_err(|e| setup("timerfd", e))?;
        let stop_timer = crate::timer::nonblocking_timer()
            .map_err(|e| VmmError::Setup(format!("timerfd: {e}")))?;
        let nudge_timer = crate::timer::nonblocking_timer()
            .map_err(|e| VmmError::Setup(format!("timerfd: {e}")))?;
        let exit_on_poweroff = config.exit_on_poweroff || config.control.is_none();
        let (watchdog_action, panic_action) = (config.watchdog_action, config.panic_action);
        let alert_hook = config
            .alert_hook
            .as_deref()
            .map(|cmd| crate::hooks::AlertHook::new(cmd, &config.name));
        let mem_handle = GuestMemoryHandle::empty();
        let (virtio, net_subscribers, disk_subscribers, disks, nets) =
            create_virtio(&config, &mem_handle)?;
        let boot_disk = match config.disks.first() {
            Some(d) => Some(crate::disk_kernels::BootDisk::open(&d.path).map_err(|e| {
                VmmError::Setup(format!("{} (for its kernels): {e}", d.path.display()))
            })?),
            None => None,
        };
        Ok(Vm {
            kvm,
            current_kernel: String::new(),
            config,
            events,
            machine: None,
            state: VmState::Stopped,
            lifecycle: Lifecycle::new(),
            boot_count: 0,
            last_reset: None,
            boot_started: Instant::now(),
            process_start: Instant::now(),
            cpuid: CpuidPolicy {
                pvm_compat: crate::platform::pvm_detected(),
            },
            watchdog,
            watchdog_action,
            panic_action,
            alert_hook,
            next_kernel: None,
            boot_disk,
            state_file: None,
            stop_timeout: Duration::from_secs(60),
            pending_stop: None,
            stop_request: None,
            stop_timer,
            nudge_timer,
            exit_on_poweroff,
            hooks,
            serial_input_drained: None,
            virtio,
            net_subscribers,
            disk_subscribers,
            disks,
            nets,
            mem_handle,
            restore: None,
            msr_index: None,
            migrating: None,
            migration_cancel: Arc::default(),
            restored_paused: false,
            migrated_away: false,
        })
    }

    pub fn watchdog_timer_fd(&self) -> RawFd {
        self.watchdog.timer_fd()
    }

    pub fn stop_timer_fd(&self) -> RawFd {
        self.stop_timer.as_raw_fd()
    }

    pub fn nudge_timer_fd(&self) -> RawFd {
        self.nudge_timer.as_raw_fd()
    }

    /// A shutdown the power button did not finish yet: Ctrl-Alt-Del too, for guests that do
    /// not listen to the button (busybox init maps it to a poweroff with `vmm.cad`; a guest
    /// whose systemd is already powering off refuses the reboot it would start).
    pub fn on_nudge_timer(&mut self) -> Flow {
        if !crate::timer::take_expiry(&mut self.nudge_timer) || self.pending_stop.is_none() {
            return Flow::Continue;
        }
        if let Some(m) = &self.machine {
            if let Err(e) = lock(&m.i8042).trigger_ctrl_alt_del() {
                tracing::info!("Ctrl-Alt-Del not delivered ({e})");
            }
        }
        Flow::Continue
    }

    fn set_state(&mut self, state: VmState) {
        if self.state != state {
            let previous = self.state;
            self.state = state;
            (self.hooks.publish)(Event::StateChanged { state, previous });
        }
    }

    pub fn uptime(&self) -> Duration {
        if self.state == VmState::Stopped {
            Duration::ZERO
        } else {
            self.boot_started.elapsed()
        }
    }

    /// Carries out what the lifecycle decides for `input`, in order, then
    /// publishes the resulting state. A refusal changes nothing; a boot
    /// that fails leaves the VM stopped.
    fn apply(&mut self, input: Input) -> Result<(), ApplyError> {
        let actions = self.lifecycle.on(input).map_err(ApplyError::Refused)?;
        let mut result = Ok(());
        for action in actions {
            match action {
                Action::Boot(cause) => {
                    if let Some(cause) = cause {
                        self.last_reset = Some(cause);
                        (self.hooks.publish)(Event::Reset { cause });
                    }
                    if let Err(e) = self.boot(cause) {
                        self.halt_machine();
                        self.lifecycle.boot_failed();
                        (self.hooks.publish)(Event::BootFailed {
                            error: e.to_string(),
                        });
                        result = Err(ApplyError::Boot(e));
                    }
                }
                Action::Halt => {
                    self.halt_machine();
                    self.watchdog.reset();
                }
                Action::Pause => {
                    if let Some(m) = &self.machine {
                        m.pause();
                    }
                    self.watchdog.pause();
                }
                Action::Resume => {
                    self.watchdog.resume();
                    if let Some(m) = &self.machine {
                        m.resume();
                    }
                }
                Action::AskGuest(kind) => self.ask_guest(kind),
                Action::Settle(result) => self.settle(result),
            }
        }
        self.set_state(self.lifecycle.state());
        result
    }

    /// Graceful stop, first half: to the guest, Ctrl-Alt-Del for a reboot;
    /// for a shutdown the ACPI power button, and Ctrl-Alt-Del only
    /// [`SHUTDOWN_NUDGE`] later if the guest is still up (a systemd guest
    /// told both at once would race a reboot against the poweroff); and the
    /// deadline armed.
    fn ask_guest(&mut self, kind: StopKind) {
        let Some((timeout, reply)) = self.stop_request.take() else {
            return;
        };
        if let Some(m) = &self.machine {
            match kind {
                StopKind::Reboot => {
                    if let Err(e) = lock(&m.i8042).trigger_ctrl_alt_del() {
                        tracing::info!("Ctrl-Alt-Del not delivered ({e})");
                    }
                }
                StopKind::Shutdown => {
                    if let Err(e) = m.power_button.write(1) {
                        tracing::info!("power button not delivered ({e})");
                    }
                    let nudge = SHUTDOWN_NUDGE
                        .min(timeout / 2)
                        .max(Duration::from_millis(1));
                    if let Err(e) = self.nudge_timer.reset(nudge, None) {
                        tracing::warn!("cannot arm the shutdown's Ctrl-Alt-Del: {e}");
                    }
                }
            }
        }
        if let Err(e) = self
            .stop_timer
            .reset(timeout.max(Duration::from_millis(1)), None)
        {
            tracing::warn!("cannot arm the shutdown timer: {e}");
        }
        self.pending_stop = Some(PendingStop {
            started: Instant::now(),
            reply,
        });
    }

    /// Graceful stop, second half: the answer, and the deadline disarmed.
    fn settle(&mut self, result: StopResult) {
        if let Err(e) = self.stop_timer.clear() {
            tracing::warn!("cannot disarm the shutdown timer: {e}");
        }
        if let Err(e) = self.nudge_timer.clear() {
            tracing::warn!("cannot disarm the shutdown's Ctrl-Alt-Del: {e}");
        }
        if let Some(p) = self.pending_stop.take() {
            (p.reply)(Ok(StopOutcome {
                result,
                elapsed_ms: u64::try_from(p.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            }));
        }
    }

    /// The first boot of the process.
    pub fn power_on(&mut self) -> Result<(), VmmError> {
        match self.apply(Input::Start) {
            Err(ApplyError::Boot(e)) => Err(e),
            Err(ApplyError::Refused(r)) => Err(VmmError::Setup(r.to_string())),
            Ok(()) if std::mem::take(&mut self.restored_paused) => {
                // Its vCPUs never ran here; the lifecycle and the watchdog
                // learn that it is paused.
                self.pause()
                    .map_err(|e| VmmError::Setup(format!("cannot pause: {e}")))
            }
            Ok(()) => Ok(()),
        }
    }

    /// Hard reset now (works whatever the guest is doing).
    pub fn reset(&mut self, cause: ResetCause) -> Result<(), ControlError> {
        self.apply(Input::Reset(cause)).map_err(apply_error)
    }

    /// Hard power-off: the VM is stopped, the process stays.
    pub fn poweroff(&mut self) {
        // Refused only while a snapshot holds the machine, where nothing
        // inside the VMM powers it off (its vCPUs and watchdog are paused).
        let _ = self.apply(Input::Poweroff);
    }

    /// `poweroff` from the control socket: as [`Vm::poweroff`], but a
    /// refusal (a snapshot being written) is the client's answer.
    pub fn poweroff_request(&mut self) -> Result<(), ControlError> {
        self.apply(Input::Poweroff).map_err(apply_error)
    }

    pub fn start(&mut self) -> Result<(), ControlError> {
        self.apply(Input::Start).map_err(apply_error)
    }

    pub fn pause(&mut self) -> Result<(), ControlError> {
        self.apply(Input::Pause).map_err(apply_error)
    }

    pub fn resume(&mut self) -> Result<(), ControlError> {
        self.apply(Input::Resume).map_err(apply_error)
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    /// The virtio devices (disks, the modules disk, network interfaces).
    pub fn virtio_count(&self) -> usize {
        self.virtio.len()
    }

    /// The kernel the next boot loads: the customer's choice, else the
    /// configured one; a library entry, or a kernel from the VM's disk.
    fn kernel_for_boot(&mut self) -> Result<KernelChoice, VmmError> {
        let name = self
            .next_kernel
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| match &self.config.kernel {
                KernelSource::Library { name, .. } => Some(name.clone()),
                KernelSource::Path { .. } => None,
            });
        let disk_version = name.as_deref().and_then(crate::disk_kernels::parse_name);
        let Some(disk) = &mut self.boot_disk else {
            if disk_version.is_some() {
                return Err(ConfigError::DiskKernelWithoutDisk(name.unwrap_or_default()).into());
            }
            return Ok(self.config.kernel_choice(self.next_kernel.as_deref())?);
        };
        match disk_version {
            Some(version) => {
                let cmdline = self
                    .config
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
                Ok(disk.choice(version, &cmdline, self.config.mem_mib << 20)?)
            }
            None => {
                // What `kernel list` shows of the disk stays current.
                disk.refresh();
                Ok(self.config.kernel_choice(self.next_kernel.as_deref())?)
            }
        }
    }

    /// Tears down the current boot (if any) and boots again: memory
    /// cleared, devices and vCPUs fresh, kernel and initrd read from disk.
    fn boot(&mut self, cause: Option<ResetCause>) -> Result<(), VmmError> {
        if self.migrated_away {
            // Its disks are another VMM's now.
            return Err(VmmError::Setup(
                "this VM has migrated to another host: this VMM will not boot it".into(),
            ));
        }
        self.halt_machine();
        // The devices stop before the disk's /boot is read: no write of
        // the old boot lands while it is, and a boot that fails leaves
        // them stopped (no disk I/O, no vhost-net into the old memory).
        for slot in &self.virtio {
            lock(&slot.transport).reset();
        }
        if let Some(r) = self.restore.take() {
            return self.continue_snapshot(r);
        }
        let choice = self.kernel_for_boot()?;
        let cfg = BootConfig {
            kernel: choice.kernel,
            initrd: choice.initrd,
            cmdline: choice.cmdline,
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            cpuid: self.cpuid,
        };
        self.watchdog.reset();
        // A fresh boot starts running: the guest clock must not be paused.
        self.watchdog.resume();
        let start = self.process_start;
        let boot_no = self.boot_count.saturating_add(1);
        let env = self.boot_env(Some(Box::new(move || {
            if boot_no == 1 {
                tracing::info!("first KVM_RUN {:?} after process start", start.elapsed());
            }
        })));
        let reason = match cause {
            Some(c) => format!("reset: {c}, kernel {}", choice.label),
            None if boot_no > 1 => format!("start, kernel {}", choice.label),
            None => format!("power-on, kernel {}", choice.label),
        };
        (self.hooks.on_boot)(boot_no, &reason);
        let m = Machine::boot(&self.kvm, &cfg, env, None)?;
        self.machine = Some(m);
        self.boot_count = boot_no;
        self.boot_started = Instant::now();
        self.current_kernel = choice.label.clone();
        (self.hooks.publish)(Event::Boot {
            boot_count: boot_no,
            kernel: choice.label,
        });
        Ok(())
    }

    /// What each new machine (a boot, or a restore) plugs into.
    fn boot_env(&self, on_first_run: Option<Box<dyn FnOnce() + Send>>) -> BootEnv<'_> {
        let handle = self.mem_handle.clone();
        BootEnv {
            events: &self.events,
            serial_out: (self.hooks.serial_out)(),
            serial_input_drained: self
                .serial_input_drained
                .as_ref()
                .and_then(|e| e.try_clone().ok()),
            extra_pio: vec![PioDevice {
                base: IB700_BASE,
                len: IB700_LEN,
                device: self.watchdog.device.clone(),
                irqs: Vec::new(),
            }],
            virtio: self.virtio.clone(),
            set_memory: Some(Box::new(move |mem| handle.set(Arc::new(mem.clone())))),
            on_first_run,
        }
    }

    fn halt_machine(&mut self) {
        if let Some(m) = self.machine.take() {
            let f = m.fallback_summary();
            if f.emulated + f.injected > 0 {
                devices::limited!(
                    info,
                    "PVM fallback this boot: {} emulated, {} injected: {:?}",
                    f.emulated,
                    f.injected,
                    f.kinds
                );
            }
            m.shutdown();
            // Whatever the old machine queued is stale now.
            let _ = self.events.drain();
        }
    }

    pub fn sysrq(&mut self, key: &str) -> Result<(), ControlError> {
        let mut chars = key.chars();
        let (Some(k), None) = (chars.next(), chars.next()) else {
            return Err(ControlError::bad_request(format!(
                "sysrq key must be one letter, not '{key}'"
            )));
        };
        match (&self.machine, self.state) {
            (Some(m), VmState::Running) => lock(&m.i8042)
                .trigger_sysrq(k)
                .map_err(|e| ControlError::bad_request(e.to_string())),
            (_, s) => Err(ControlError::invalid_state(format!(
                "the VM is {s}, not running"
            ))),
        }
    }

    /// Graceful shutdown or reboot: Ctrl-Alt-Del to the guest, then the
    /// hard action after `timeout`. `reply` is called when it is settled:
    /// by the guest, by the deadline, or by a later power action.
    pub fn graceful_stop(&mut self, kind: StopKind, timeout: Duration, reply: StopReply) {
        self.stop_request = Some((timeout, reply));
        let r = self.apply(Input::Graceful(kind));
        if let Some((_, reply)) = self.stop_request.take() {
            // Refused: the request was not admitted.
            let e = match r {
                Err(e) => apply_error(e),
                Ok(()) => ControlError::invalid_state(format!("the VM is {}", self.state)),
            };
            reply(Err(e));
        }
    }

    /// The graceful-stop deadline fired: take the hard action.
    pub fn on_stop_timer(&mut self) -> Flow {
        if !crate::timer::take_expiry(&mut self.stop_timer) {
            return Flow::Continue;
        }
        if self.lifecycle.is_held() {
            // A snapshot is being written: the hard action waits for it,
            // looked at again shortly (not lost, not taken under it).
            if let Err(e) = self.stop_timer.reset(HELD_RETRY, None) {
                tracing::warn!("cannot re-arm the shutdown timer: {e}");
            }
            return Flow::Continue;
        }
        let r = self.apply(Input::StopDeadline);
        self.flow_after(r)
    }

    /// A hard power-off decided by the VMM (panic or watchdog action): the
    /// process ends too when it would on a guest power-off.
    fn poweroff_flow(&mut self) -> Flow {
        self.poweroff();
        if self.exit_on_poweroff {
            Flow::Exit(0)
        } else {
            Flow::Continue
        }
    }

    /// The guest powered itself off (or reset itself: `cause`). A pending
    /// shutdown/reboot decides what that means.
    fn guest_power(&mut self, input: Input) -> Flow {
        let r = self.apply(input);
        if r.is_ok() && self.state == VmState::Stopped && self.exit_on_poweroff {
            return Flow::Exit(0);
        }
        self.flow_after(r)
    }

    fn flow_after(&mut self, r: Result<(), ApplyError>) -> Flow {
        match r {
            Ok(()) | Err(ApplyError::Refused(_)) => Flow::Continue,
            Err(ApplyError::Boot(e)) => {
                tracing::error!("boot failed: {e}");
                eprintln!("vmm: {e}");
                if self.exit_on_poweroff {
                    Flow::Exit(1)
                } else {
                    Flow::Continue
                }
            }
        }
    }

    /// Feeds console input to the UART; returns how many bytes it took.
    pub fn feed_console(&self, bytes: &[u8]) -> usize {
        match &self.machine {
            Some(m) => m.feed_serial(bytes),
            None => bytes.len(), // no guest: input goes nowhere
        }
    }

    pub fn fallback_summary(&self) -> Option<crate::machine::FallbackSummary> {
        self.machine.as_ref().map(|m| m.fallback_summary())
    }

    /// Stops everything before the process exits.
    pub fn teardown(&mut self) {
        self.halt_machine();
    }
}

/// What a control client is told when the lifecycle refused a request
/// (the state does not allow it) or its boot failed (the host's fault).
fn apply_error(e: ApplyError) -> ControlError {
    match e {
        ApplyError::Refused(r) => ControlError::invalid_state(r.to_string()),
        e @ ApplyError::Boot(_) => ControlError::new(ErrorCode::HostError, e.to_string()),
    }
}
