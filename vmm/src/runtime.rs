//! The VMM thread: one `event-manager` loop serving the VM's own events
//! (vCPU and device events, watchdog and shutdown timers), the control
//! socket, the console and the virtio devices.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::actions::{load_kernel_choice, VmControlHandler};
use crate::config::{ConsoleMode, VmConfig};
use crate::console::{ConsoleConfig, ConsoleHub, QuitRequested, StdioConsole};
use crate::control::{AccessPolicy, ControlConfig, ControlServer, EventBroadcaster};
use crate::sandbox::Plan;
use crate::vm::{Flow, Vm, VmHooks, VmmError};

pub type SharedVm = Arc<Mutex<Vm>>;
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Set when the process must end, with its exit code.
#[derive(Default)]
pub struct ExitFlag {
    requested: AtomicBool,
    code: Mutex<u8>,
}

impl ExitFlag {
    pub fn request(&self, code: u8) {
        *lock(&self.code) = code;
        self.requested.store(true, Ordering::SeqCst);
    }
    pub fn get(&self) -> Option<u8> {
        self.requested
            .load(Ordering::SeqCst)
            .then(|| *lock(&self.code))
    }
}

/// The longest a VMM asked to exit waits for a snapshot being written
/// (systemd's unit allows 120 s for the whole stop).
const SNAPSHOT_AT_EXIT: Duration = Duration::from_secs(60);

const TOKEN_EVENTS: u32 = 1;
const TOKEN_WATCHDOG: u32 = 2;
const TOKEN_STOP: u32 = 3;
const TOKEN_INPUT: u32 = 4;
const TOKEN_DRAINED: u32 = 5;
const TOKEN_QUIT: u32 = 6;
const TOKEN_SIGNAL: u32 = 7;
const TOKEN_NUDGE: u32 = 8;

/// The UART's output goes to the console hub.
struct HubWriter(ConsoleHub);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves the VM's own wake-ups and console input.
pub struct VmSubscriber {
    vm: SharedVm,
    exit: Arc<ExitFlag>,
    hub: ConsoleHub,
    /// Console input taken from the hub that the UART has not accepted yet.
    pending_input: Vec<u8>,
    input_drained: EventFd,
    quit: QuitRequested,
    signal: Arc<EventFd>,
}

impl VmSubscriber {
    fn feed_input(&mut self, vm: &Vm) {
        loop {
            if self.pending_input.is_empty() {
                self.pending_input = self.hub.take_input(64);
                if self.pending_input.is_empty() {
                    return;
                }
            }
            let n = vm.feed_console(&self.pending_input);
            self.pending_input.drain(..n.min(self.pending_input.len()));
            if n == 0 {
                // UART FIFO full: wait for the guest to drain it.
                return;
            }
        }
    }
}

impl MutEventSubscriber for VmSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let vm_arc = self.vm.clone();
        let mut vm = lock(&vm_arc);
        let flow = match events.data() {
            TOKEN_EVENTS => vm.handle_events(),
            TOKEN_WATCHDOG => vm.on_watchdog_timer(),
            TOKEN_STOP => vm.on_stop_timer(),
            TOKEN_NUDGE => vm.on_nudge_timer(),
            TOKEN_INPUT => {
                self.hub.ack_input_event();
                self.feed_input(&vm);
                Flow::Continue
            }
            TOKEN_DRAINED => {
                let _ = self.input_drained.read();
                self.feed_input(&vm);
                Flow::Continue
            }
            TOKEN_QUIT => Flow::Exit(0),
            TOKEN_SIGNAL => {
                let _ = self.signal.read();
                tracing::info!("terminating on signal");
                Flow::Exit(0)
            }
            _ => Flow::Continue,
        };
        drop(vm);
        if let Flow::Exit(code) = flow {
            self.exit.request(code);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let vm = lock(&self.vm);
        let fds = [
            (vm.events.wake_fd().as_raw_fd(), TOKEN_EVENTS),
            (vm.watchdog_timer_fd(), TOKEN_WATCHDOG),
            (vm.stop_timer_fd(), TOKEN_STOP),
            (vm.nudge_timer_fd(), TOKEN_NUDGE),
            (self.hub.input_eventfd().as_raw_fd(), TOKEN_INPUT),
            (self.input_drained.as_raw_fd(), TOKEN_DRAINED),
            (self.quit.eventfd().as_raw_fd(), TOKEN_QUIT),
            (self.signal.as_raw_fd(), TOKEN_SIGNAL),
        ];
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("cannot watch VM event source {token}: {e}");
            }
        }
    }
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd: RawFd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes from a local to an eventfd is
        // async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn install_signal_handlers(evt: &EventFd) -> Result<(), VmmError> {
    SIGNAL_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| VmmError::Setup(format!("signal handler: {e}")))?;
    }
    Ok(())
}

/// Serves each disk and each network interface on a thread of its own,
/// with its own event manager (its queues' eventfds, and a TAP's queues,
/// are all it waits on). Block I/O can be synchronous
/// (`preadv`/`pwritev`/`fdatasync`), so on the event loop a slow or stalled
/// image would stall the console, the control socket and SIGTERM with it;
/// here it stalls only its own disk. A network interface moves whatever
/// the guest and the TAP's peers send, as fast as they send it: on its own
/// thread that traffic neither delays the control socket and the console
/// nor waits behind them, and two interfaces, or an interface and a disk,
/// are served on two host CPUs at once. The threads live as long as the
/// process: the devices outlive guest resets.
fn spawn_io_threads(
    devices: Vec<(String, Subscriber)>,
    kind: crate::seccomp::Kind,
) -> Result<(), VmmError> {
    for (name, sub) in devices {
        let mut em: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| VmmError::Setup(format!("{name} event manager: {e}")))?;
        em.add_subscriber(sub);
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // Before the first request or frame this thread reads.
                crate::seccomp::install(kind);
                loop {
                    if let Err(e) = em.run() {
                        tracing::error!("{}: event loop: {e}", name);
                    }
                }
            })
            .map_err(|e| VmmError::Setup(format!("cannot start an I/O thread: {e}")))?;
    }
    Ok(())
}

fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

/// Runs the VM until it exits; returns the process exit status.
pub fn run(config: VmConfig) -> Result<u8, VmmError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| VmmError::Setup(format!("{what}: {e}"));
    // Resolved now: the user database is out of reach once confined.
    let plan = Plan::for_config(&config).map_err(|e| setup("sandbox", &e))?;
    if let Some(dir) = &config.state_dir {
        crate::sandbox::make_state_dir(dir, plan.identity.as_ref())
            .map_err(|e| setup(&format!("state directory {}", dir.display()), &e))?;
    }
    // First, while this is the only thread: the hook launcher (hooks.rs).
    if let Some(cmd) = &config.alert_hook {
        if let Err(e) = crate::hooks::start_launcher(cmd, &config.name, &plan) {
            tracing::warn!("alert hooks run in the VMM's process: {e}");
        }
    }
    let hub = ConsoleHub::new(ConsoleConfig {
        log_path: config.console_log.clone(),
        log_limits: config.console_log_limits,
        // Its thread starts once the process is confined.
        defer_log_thread: true,
        ..Default::default()
    })
    .map_err(|e| setup("console", &e))?;
    let broadcaster = EventBroadcaster::new(config.name.clone());

    let h1 = hub.clone();
    let h2 = hub.clone();
    let b = broadcaster.clone();
    let hooks = VmHooks {
        serial_out: Box::new(move || Box::new(HubWriter(h1.clone()))),
        on_boot: Box::new(move |n, reason| h2.mark_boot(n, reason)),
        publish: Arc::new(move |ev| {
            b.publish(ev);
        }),
    };
    let mut vm = Vm::new(config.clone(), hooks)?;
    if let (Some(addr), Some(token)) = (&config.incoming, &config.incoming_token) {
        // Before the sandbox: the listening socket, the waiting.
        let expect = crate::migration::target::Expect {
            token,
            mem_mib: config.mem_mib,
            vcpus: config.vcpus,
            virtio: vm.virtio_count(),
            disks: vm
                .disks
                .iter()
                .map(|d| crate::migration::target::TargetDisk {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    size: d.copy.size(),
                    lock: Some(d.image.clone()),
                })
                .collect(),
        };
        let r = crate::migration::target::receive(&config, addr, &expect)
            .map_err(|e| VmmError::Setup(format!("migration: {e}")))?;
        vm.restore = Some(r);
    } else if let Some(dir) = &config.restore {
        // Read now: the snapshot's directory is not the confined VMM's.
        let r = crate::snapshot::RestoreSource::open(dir)
            .map_err(|e| VmmError::Setup(format!("--restore: {e}")))?;
        r.check_shape(config.mem_mib, config.vcpus, vm.virtio_count())
            .map_err(VmmError::Setup)?;
        vm.restore = Some(r);
    }
    if let Some(p) = &plan.state_file {
        vm.next_kernel = load_kernel_choice(p);
    }
    vm.state_file = plan.state_file.clone();
    let input_drained =
        EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| setup("eventfd", &e))?;
    vm.serial_input_drained = Some(
        input_drained
            .try_clone()
            .map_err(|e| setup("eventfd", &e))?,
    );
    let vm: SharedVm = Arc::new(Mutex::new(vm));

    let exit = Arc::new(ExitFlag::default());
    let quit = QuitRequested::new().map_err(|e| setup("eventfd", &e))?;
    let signal =
        Arc::new(EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| setup("eventfd", &e))?);
    install_signal_handlers(&signal)?;

    let mut em: EventManager<Subscriber> =
        EventManager::new().map_err(|e| setup("event manager", &e))?;
    em.add_subscriber(Arc::new(Mutex::new(VmSubscriber {
        vm: vm.clone(),
        exit: exit.clone(),
        hub: hub.clone(),
        pending_input: Vec::new(),
        input_drained,
        quit: quit.clone(),
        signal,
    })));
    let stdio = match config.console {
        ConsoleMode::Stdio => true,
        ConsoleMode::None => false,
        ConsoleMode::Auto => stdin_is_tty(),
    };
    if stdio {
        let c = StdioConsole::new(hub.clone(), quit).map_err(|e| setup("console", &e))?;
        em.add_subscriber(Arc::new(Mutex::new(c)));
    }
    if let Some(path) = &config.control {
        let policy = AccessPolicy::resolve(&config.allow_users, &config.allow_groups)
            .map_err(|e| setup("control socket", &e))?;
        let server = ControlServer::new(
            ControlConfig::new(path.clone(), policy),
            Box::new(VmControlHandler { vm: vm.clone() }),
            &broadcaster,
            Some(hub.clone()),
        )
        .map_err(|e| VmmError::Setup(e.to_string()))?;
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }

    // Start-up is done: everything root had to open is open. The process
    // confines itself while it has a single thread, so that every thread
    // started from here on inherits it (sandbox.rs).
    // Read through a descriptor opened now (procfs entries are not stable
    // inodes for Landlock).
    crate::actions::open_net_dev();
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    match plan.apply().map_err(|e| setup("sandbox", &e))? {
        Some(landlock) => tracing::info!("{}; Landlock {landlock:?}", plan.describe()),
        None => tracing::info!("{}", plan.describe()),
    }
    crate::sandbox::probe_open_for_tests();
    hub.start_log().map_err(|e| setup("console", &e))?;
    spawn_io_threads(
        lock(&vm).disk_subscribers.clone(),
        crate::seccomp::Kind::Disk,
    )?;
    spawn_io_threads(lock(&vm).net_subscribers.clone(), crate::seccomp::Kind::Net)?;
    // From here on every thread is filtered (seccomp.rs), the event loop's
    // own before the first boot.
    crate::spawner::start().map_err(|e| setup("spawner thread", &e))?;
    crate::seccomp::install(crate::seccomp::Kind::EventLoop);
    lock(&vm).power_on()?;
    crate::service::notify_ready(&config.name);
    loop {
        if let Err(e) = em.run() {
            tracing::error!("event loop: {e}");
        }
        if let Some(code) = exit.get() {
            crate::service::notify_stopping();
            // A snapshot being written is finished first (its thread ends it
            // under the VM's lock; the loop serves the control socket
            // meanwhile), or its directory would be left as `NAME.part`.
            let since = Instant::now();
            let mut waited = false;
            while lock(&vm).snapshotting() && since.elapsed() < SNAPSHOT_AT_EXIT {
                waited = true;
                let _ = em.run_with_timeout(100);
            }
            if waited {
                // The snapshot's answer, on its way to its client.
                let _ = em.run_with_timeout(50);
            }
            lock(&vm).teardown();
            if stdio {
                // Let the stdio console flush what the guest printed last.
                let _ = em.run_with_timeout(50);
            }
            return Ok(code);
        }
    }
}
