//! The VM lifecycle: boots, resets and power-offs of one guest inside this
//! process, driven by events from vCPUs, devices and the control socket.

use std::time::Instant;

use devices::{GuestEvent, ResetCause};
use kvm_ioctls::Kvm;

use crate::config::VmConfig;
use crate::cpu::CpuidPolicy;
use crate::events::{VmEvent, VmEventQueue};
use crate::machine::{BootConfig, BootEnv, Machine, MachineError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and do you have permission on /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("cannot boot: {0}")]
    Boot(#[from] MachineError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

pub struct Vm {
    kvm: Kvm,
    pub config: VmConfig,
    pub events: VmEventQueue,
    machine: Option<Machine>,
    pub state: RunState,
    pub boot_count: u64,
    pub last_reset: Option<ResetCause>,
    pub process_start: Instant,
    cpuid: CpuidPolicy,
}

impl Vm {
    pub fn new(config: VmConfig) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        crate::vcpu::init_kick_signal().map_err(VmmError::Setup)?;
        let events = VmEventQueue::new().map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
        Ok(Vm {
            kvm,
            config,
            events,
            machine: None,
            state: RunState::Stopped,
            boot_count: 0,
            last_reset: None,
            process_start: Instant::now(),
            cpuid: CpuidPolicy {
                pvm_compat: crate::platform::pvm_detected(),
            },
        })
    }

    pub fn boot(&mut self) -> Result<(), VmmError> {
        if let Some(m) = self.machine.take() {
            m.shutdown();
        }
        let choice = self.config.kernel_choice(None)?;
        let cfg = BootConfig {
            kernel: choice.kernel,
            initrd: choice.initrd,
            cmdline: choice.cmdline,
            mem_mib: self.config.mem_mib,
            vcpus: self.config.vcpus,
            cpuid: self.cpuid,
        };
        let start = self.process_start;
        let env = BootEnv {
            events: &self.events,
            serial_out: Box::new(std::io::stdout()),
            serial_input_drained: None,
            extra_pio: Vec::new(),
            on_first_run: Some(Box::new(move || {
                tracing::info!("first KVM_RUN {:?} after process start", start.elapsed());
            })),
        };
        let m = Machine::boot(&self.kvm, &cfg, env)?;
        self.machine = Some(m);
        self.boot_count += 1;
        self.state = RunState::Running;
        Ok(())
    }

    /// Handles queued events; returns Some(exit code) when the process must end.
    pub fn handle_events(&mut self) -> Option<u8> {
        for ev in self.events.drain() {
            tracing::debug!("vm event: {ev:?}");
            match ev {
                VmEvent::Guest(GuestEvent::Reset(cause)) => {
                    self.last_reset = Some(cause);
                    if let Err(e) = self.boot() {
                        eprintln!("vmm: reboot failed: {e}");
                        self.state = RunState::Stopped;
                        return Some(1);
                    }
                }
                VmEvent::Guest(GuestEvent::PowerOff) => {
                    if let Some(m) = self.machine.take() {
                        m.shutdown();
                    }
                    self.state = RunState::Stopped;
                    return Some(0);
                }
                VmEvent::Guest(GuestEvent::Panic(_)) | VmEvent::Guest(GuestEvent::WatchdogExpired) => {}
                VmEvent::VcpuFailed { vcpu, reason } => {
                    eprintln!("vmm: vCPU {vcpu}: {reason}");
                    if let Some(m) = self.machine.take() {
                        let (emu, inj, kinds) = m.fallback_summary();
                        eprintln!("vmm: PVM fallback: {emu} emulated, {inj} exceptions injected: {kinds:?}");
                        m.shutdown();
                    }
                    self.state = RunState::Stopped;
                    return Some(1);
                }
                VmEvent::Timer => {}
            }
        }
        None
    }
}

/// Runs the VM until it powers off or fails; returns the exit status.
pub fn run(config: VmConfig) -> Result<u8, VmmError> {
    let mut vm = Vm::new(config)?;
    vm.boot()?;
    loop {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(vm.events.wake_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, -1) };
        if let Some(code) = vm.handle_events() {
            return Ok(code);
        }
    }
}
