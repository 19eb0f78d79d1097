//! The VMM thread: one `event-manager` loop serving the VM's own events
//! (vCPU and device events, watchdog and shutdown timers), the control
//! socket, the console and the virtio devices.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::config::VmConfig;
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

const TOKEN_EVENTS: u32 = 1;
const TOKEN_WATCHDOG: u32 = 2;
const TOKEN_STOP: u32 = 3;

/// Serves the VM's own wake-ups.
pub struct VmSubscriber {
    vm: SharedVm,
    exit: Arc<ExitFlag>,
}

impl VmSubscriber {
    fn apply(&self, flow: Flow) {
        if let Flow::Exit(code) = flow {
            self.exit.request(code);
        }
    }
}

impl MutEventSubscriber for VmSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut vm = lock(&self.vm);
        let flow = match events.data() {
            TOKEN_EVENTS => vm.handle_events(),
            TOKEN_WATCHDOG => vm.on_watchdog_timer(),
            TOKEN_STOP => vm.on_stop_timer(),
            _ => Flow::Continue,
        };
        drop(vm);
        self.apply(flow);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let vm = lock(&self.vm);
        let fds = [
            (vm.events.wake_fd().as_raw_fd_compat(), TOKEN_EVENTS),
            (vm.watchdog_timer_fd(), TOKEN_WATCHDOG),
            (vm.stop_timer_fd(), TOKEN_STOP),
        ];
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("cannot watch VM event source {token}: {e}");
            }
        }
    }
}

trait AsRawFdCompat {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd;
}
impl<T: std::os::fd::AsRawFd> AsRawFdCompat for T {
    fn as_raw_fd_compat(&self) -> std::os::fd::RawFd {
        self.as_raw_fd()
    }
}

/// Runs the VM until it exits; returns the process exit status.
pub fn run(config: VmConfig) -> Result<u8, VmmError> {
    let vm = Vm::new(config, VmHooks::default())?;
    let vm: SharedVm = Arc::new(Mutex::new(vm));
    let exit = Arc::new(ExitFlag::default());
    let mut em: EventManager<Subscriber> =
        EventManager::new().map_err(|e| VmmError::Setup(format!("event manager: {e}")))?;
    em.add_subscriber(Arc::new(Mutex::new(VmSubscriber {
        vm: vm.clone(),
        exit: exit.clone(),
    })));
    for sub in lock(&vm).virtio_subscribers.clone() {
        em.add_subscriber(sub);
    }
    lock(&vm).boot()?;
    loop {
        if let Err(e) = em.run() {
            tracing::error!("event loop: {e}");
        }
        if let Some(code) = exit.get() {
            lock(&vm).teardown();
            return Ok(code);
        }
    }
}
