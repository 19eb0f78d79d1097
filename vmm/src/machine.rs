//! One boot of the guest: a KVM VM with its memory, devices and vCPU
//! threads. A reset tears the whole `Machine` down and builds a new one
//! (memory cleared, vCPUs and devices in their power-on state, kernel read
//! again from disk); what outlives a boot (console, control socket, config)
//! lives in the `Vmm`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use devices::legacy::acpi_pm::{ACPI_PM_BASE, ACPI_PM_LEN};
use devices::legacy::i8042::{I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_IRQ};
use devices::legacy::pvpanic::{PVPANIC_LEN, PVPANIC_PORT};
use devices::legacy::serial::{SerialOutput, COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::legacy::{
    AcpiPmDevice, EventFdTrigger, I8042Device, I8042Port, PvPanicDevice, SerialDevice,
};
use devices::virtio::GuestMemoryMmap;
use devices::virtio::{MmioTransport, ACK_OFFSET, INT_USED_RING, MMIO_SIZE, NOTIFY_OFFSET};
use devices::{Bus, BusDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, BootSpec};
use crate::cpu::{self, CpuidPolicy};
use crate::events::VmEventQueue;
use crate::layout;
use crate::snapshot::RestoreSource;
use crate::vcpu::{FallbackCounters, Vcpu, VcpuHandle};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory { mib: u64, detail: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("{0}")]
    Device(String),
    #[error("{0}")]
    Vcpu(String),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MachineError {
    move |source| MachineError::Kvm { what, source }
}

/// What a boot needs, resolved from the VM's config (the kernel may change
/// between boots).
#[derive(Clone, Debug)]
pub struct BootConfig {
    pub kernel: crate::boot::Image,
    pub initrd: Option<crate::boot::Image>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub cpuid: CpuidPolicy,
}

/// A device the VMM adds on top of the fixed platform ones, per boot.
pub struct PioDevice {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn BusDevice>>,
    /// (eventfd, gsi) pairs to register as irqfds.
    pub irqs: Vec<(Arc<EventFd>, u32)>,
}

/// A virtio-mmio device that lives across boots; each boot maps it at the
/// same address and GSI.
#[derive(Clone)]
pub struct VirtioSlot {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub base: u64,
    pub gsi: u32,
}

/// Receives each boot's new guest memory.
pub type MemoryHook = Box<dyn FnOnce(&GuestMemoryMmap) + Send>;

/// The PVM fallback's work in one boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FallbackSummary {
    pub emulated: u64,
    pub injected: u64,
    /// (mnemonic, count), most frequent first.
    pub kinds: Vec<(String, u64)>,
}

/// Fresh guest RAM of `mem_mib` MiB, laid out as every boot's, on huge
/// page boundaries (see `devices::virtio::guest_ram`).
pub fn guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MachineError> {
    devices::virtio::guest_ram(&layout::ram_regions(mem_mib << 20)).map_err(|e| {
        MachineError::Memory {
            mib: mem_mib,
            detail: e.to_string(),
        }
    })
}

/// Gives KVM the memory regions as slots 0, 1...; `dirty_log` asks it to
/// log the pages the vCPUs write.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<(), MachineError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MachineError::Memory {
                mib: region.len() >> 20,
                detail: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the
        // Machine keeps until after the VM fd is closed (field order); the
        // same slot, address and size at every call, only the flags change.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Long-lived things a boot plugs into.
pub struct BootEnv<'a> {
    pub events: &'a VmEventQueue,
    pub serial_out: SerialOutput,
    /// Signalled when the guest drained the UART's receive FIFO.
    pub serial_input_drained: Option<EventFd>,
    pub extra_pio: Vec<PioDevice>,
    pub virtio: Vec<VirtioSlot>,
    /// Called with the new guest memory before any device can run.
    pub set_memory: Option<MemoryHook>,
    /// Runs on vCPU 0's thread right before its first KVM_RUN.
    pub on_first_run: Option<Box<dyn FnOnce() + Send>>,
}

pub struct Machine {
    // Field order matters for drop: vCPU threads stop before the VM and
    // memory go away.
    vcpus: Vec<VcpuHandle>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042Device>>,
    pub acpi_pm: Arc<Mutex<AcpiPmDevice>>,
    pub pvpanic: Arc<Mutex<PvPanicDevice>>,
    /// One edge = the ACPI power button pressed.
    pub power_button: EventFd,
    pub fallback: Arc<FallbackCounters>,
    /// A migration's throttle of the vCPUs (`auto_converge`).
    pub throttle: Arc<crate::throttle::Throttle>,
    pub started: Instant,
    pub mem: GuestMemoryMmap,
    /// The CPUID each vCPU was given (a snapshot keeps it).
    cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub vm: VmFd,
}

impl Machine {
    /// A new machine: booting `cfg`'s kernel, or, given `restore`, the
    /// snapshot's memory, vCPUs and devices, with its vCPUs left paused
    /// (the VMM restores the virtio devices, then resumes them).
    pub fn boot(
        kvm: &Kvm,
        cfg: &BootConfig,
        env: BootEnv,
        mut restore: Option<&mut RestoreSource>,
    ) -> Result<Machine, MachineError> {
        let started = Instant::now();
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        if cfg.cpuid.pvm_compat {
            // Under kvm_pvm, instructions its emulator cannot run in guest
            // user mode (e.g. `int $0x80`, the 32-bit system call) would
            // become #UD; with this cap they come to us instead.
            let cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            if let Err(e) = vm.enable_cap(&cap) {
                devices::limited!(info, "KVM_CAP_EXIT_ON_EMULATION_FAILURE unavailable: {e}");
            }
        }
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // A migration's target received the memory already.
        let mem = match restore.as_deref_mut().and_then(RestoreSource::take_memory) {
            Some(m) => m,
            None => guest_memory(cfg.mem_mib)?,
        };
        register_memory(&vm, &mem, false)?;

        let rsdp = GuestAddress(layout::ACPI_START);
        let entry = match restore.as_deref_mut() {
            Some(r) => {
                r.read_memory(&mem)
                    .map_err(|e| MachineError::Restore(e.to_string()))?;
                None
            }
            None => Some(Self::load_boot(cfg, &env, &mem, rsdp)?),
        };
        if let Some(set) = env.set_memory {
            set(&mem);
        }

        // Port I/O devices.
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| MachineError::Device(format!("serial eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(serial_irq),
            env.serial_out,
            env.serial_input_drained,
        )));
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(|e| MachineError::Device(format!("serial: {e}")))?;
        let dev_err =
            |what: &str, e: devices::bus::BusError| MachineError::Device(format!("{what}: {e}"));
        let kbd_irq = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| MachineError::Device(format!("i8042 eventfd: {e}")))?;
        vm.register_irqfd(&kbd_irq, I8042_IRQ)
            .map_err(kvm_err("KVM_IRQFD (i8042)"))?;
        let i8042 = Arc::new(Mutex::new(I8042Device::new(
            EventFdTrigger::new(kbd_irq),
            env.events.sink(),
        )));
        pio.insert(
            Arc::new(Mutex::new(I8042Port::data(i8042.clone()))),
            I8042_DATA_PORT,
            1,
        )
        .map_err(|e| dev_err("i8042", e))?;
        pio.insert(
            Arc::new(Mutex::new(I8042Port::command(i8042.clone()))),
            I8042_COMMAND_PORT,
            1,
        )
        .map_err(|e| dev_err("i8042", e))?;
        let acpi_pm = Arc::new(Mutex::new(AcpiPmDevice::new(env.events.sink())));
        pio.insert(acpi_pm.clone(), ACPI_PM_BASE, ACPI_PM_LEN)
            .map_err(|e| dev_err("ACPI PM", e))?;
        let pvpanic = Arc::new(Mutex::new(PvPanicDevice::new(env.events.sink())));
        pio.insert(pvpanic.clone(), PVPANIC_PORT, PVPANIC_LEN)
            .map_err(|e| dev_err("pvpanic", e))?;
        if let Some(r) = restore.as_deref() {
            // Before any vCPU exists: the devices are as the guest left them.
            // The interrupt controllers first, so that an interrupt a
            // device raises again lands in the restored ones.
            crate::snapshot::kvm_state::restore_vm(&vm, &r.snapshot.kvm)
                .map_err(|e| MachineError::Restore(e.to_string()))?;
            let d = &r.snapshot.devices;
            let restored = lock(&serial)
                .restore_state(&d.serial)
                .and_then(|()| lock(&i8042).restore_state(&d.i8042))
                .and_then(|()| lock(&acpi_pm).restore_state(&d.acpi_pm))
                .and_then(|()| lock(&pvpanic).restore_state(&d.pvpanic));
            restored.map_err(|e| MachineError::Restore(e.to_string()))?;
        }
        let power_button = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| MachineError::Device(format!("power button eventfd: {e}")))?;
        vm.register_irqfd(&power_button, crate::platform::POWER_BUTTON_GSI)
            .map_err(kvm_err("KVM_IRQFD (power button)"))?;
        for d in env.extra_pio {
            for (evt, gsi) in &d.irqs {
                vm.register_irqfd(evt, *gsi).map_err(kvm_err("KVM_IRQFD"))?;
            }
            pio.insert(d.device, d.base, d.len)
                .map_err(|e| MachineError::Device(format!("port {:#x}: {e}", d.base)))?;
        }
        let pio = Arc::new(pio);
        let mut mmio = Bus::new();
        for slot in &env.virtio {
            let t = lock(&slot.transport);
            for (i, evt) in t.queue_events().iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD (virtio queue)"))?;
            }
            vm.register_irqfd(t.interrupt_event(), slot.gsi)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            // The guest's acknowledgement of a used-buffer interrupt is
            // completed in the kernel: see `Interrupt::absorb_used_acks`.
            vm.register_ioevent(
                t.interrupt().ack_event(),
                &IoEventAddress::Mmio(slot.base + ACK_OFFSET),
                INT_USED_RING,
            )
            .map_err(kvm_err("KVM_IOEVENTFD (virtio interrupt ack)"))?;
            t.interrupt().absorb_used_acks();
            drop(t);
            mmio.insert(slot.transport.clone(), slot.base, MMIO_SIZE)
                .map_err(|e| dev_err("virtio-mmio", e))?;
        }
        let mmio = Arc::new(mmio);

        let supported = cpu::supported_cpuid(kvm)?;
        let fallback = Arc::new(FallbackCounters::default());
        let throttle = crate::throttle::Throttle::new();
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        let mut cpuids = Vec::with_capacity(usize::from(cfg.vcpus));
        let mut first_run = env.on_first_run;
        for id in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            match (restore.as_deref(), entry) {
                (Some(r), _) => {
                    let state = r.snapshot.cpus.get(usize::from(id)).ok_or_else(|| {
                        MachineError::Restore(format!("the snapshot has no vCPU {id}"))
                    })?;
                    // Against what this host would give the vCPU at boot.
                    let mut here = supported.clone();
                    cpu::filter_cpuid(&mut here, id, cfg.vcpus, cfg.cpuid);
                    let missing = crate::snapshot::kvm_state::missing_cpu_features(
                        &state.cpuid,
                        here.as_slice(),
                    );
                    if !missing.is_empty() {
                        return Err(MachineError::Restore(format!(
                            "this host's CPU lacks features the guest saw: {}",
                            missing.join(", ")
                        )));
                    }
                    crate::snapshot::kvm_state::restore_vcpu(&fd, id, state)
                        .map_err(|e| MachineError::Restore(e.to_string()))?;
                    cpuids.push(state.cpuid.clone());
                }
                (None, Some(entry)) => {
                    let mut cpuid = supported.clone();
                    cpu::filter_cpuid(&mut cpuid, id, cfg.vcpus, cfg.cpuid);
                    cpu::configure_vcpu(&fd, id, &cpuid, (id == 0).then_some(entry))?;
                    cpuids.push(cpuid.as_slice().to_vec());
                }
                (None, None) => return Err(MachineError::Vcpu("no boot entry".into())),
            }
            let v = Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                events: env.events.clone(),
                fallback: fallback.clone(),
                throttle: throttle.clone(),
                on_first_run: if id == 0 { first_run.take() } else { None },
            };
            // A restored machine waits for its virtio devices.
            vcpus.push(v.spawn(restore.is_some()).map_err(MachineError::Vcpu)?);
        }
        Ok(Machine {
            vcpus,
            serial,
            i8042,
            acpi_pm,
            pvpanic,
            power_button,
            fallback,
            throttle,
            started,
            mem,
            cpuids,
            vm,
        })
    }

    /// Loads the kernel, initrd and command line and writes the ACPI
    /// tables: a fresh boot's memory.
    fn load_boot(
        cfg: &BootConfig,
        env: &BootEnv,
        mem: &GuestMemoryMmap,
        rsdp: GuestAddress,
    ) -> Result<boot::BootEntry, MachineError> {
        let mem_bytes = cfg.mem_mib << 20;
        let mut cmdline = cfg.cmdline.clone();
        for slot in &env.virtio {
            // For kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; ACPI
            // kernels find the same devices in the DSDT.
            cmdline.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                layout::VIRTIO_MMIO_SIZE >> 10,
                slot.base,
                slot.gsi
            ));
        }
        if cfg.cpuid.pvm_compat {
            cmdline.push(' ');
            cmdline.push_str(cpu::PVM_CMDLINE);
        }
        let entry = boot::load(
            mem,
            &BootSpec {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_ref(),
                cmdline: &cmdline,
                mem_bytes,
                rsdp,
            },
        )?;
        let acpi_slots: Vec<crate::acpi::VirtioMmioSlot> = env
            .virtio
            .iter()
            .map(|s| crate::acpi::VirtioMmioSlot {
                base: s.base,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: s.gsi,
            })
            .collect();
        crate::platform::write_acpi(mem, cfg.vcpus, &acpi_slots, rsdp)?;
        Ok(entry)
    }

    /// Turns KVM's dirty-page log of guest memory on or off (a migration
    /// copies what the vCPUs wrote since its last pass).
    pub fn set_dirty_log(&self, on: bool) -> Result<(), MachineError> {
        register_memory(&self.vm, &self.mem, on)
    }

    /// KVM's dirty-page bitmaps since the last call, one per memory region
    /// in order (bit i: the region's 4 KiB page i); KVM clears them.
    pub fn take_kvm_dirty_log(&self) -> Result<Vec<Vec<u64>>, MachineError> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let len = usize::try_from(region.len()).map_err(|_| MachineError::Memory {
                    mib: region.len() >> 20,
                    detail: "region too large".into(),
                })?;
                self.vm
                    .get_dirty_log(slot as u32, len)
                    .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
            })
            .collect()
    }

    pub fn pause(&self) {
        for v in &self.vcpus {
            v.pause();
        }
        for v in &self.vcpus {
            if !v.wait_parked(Duration::from_secs(5)) {
                tracing::warn!("vCPU {} did not pause within 5 s", v.id);
            }
        }
    }

    pub fn resume(&self) {
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Every vCPU's state, read on its own thread; the machine must be
    /// paused.
    pub fn save_vcpus(
        &self,
        msr_index: &Arc<Vec<u32>>,
    ) -> Result<Vec<crate::snapshot::kvm_state::VcpuState>, String> {
        let mut out = Vec::with_capacity(self.vcpus.len());
        for (v, cpuid) in self.vcpus.iter().zip(&self.cpuids) {
            let index = msr_index.clone();
            let cpuid = cpuid.clone();
            let got = v
                .with_parked_fd(Duration::from_secs(5), move |fd| {
                    crate::snapshot::kvm_state::save_vcpu(fd, &index, cpuid)
                })
                .ok_or_else(|| format!("vCPU {} did not answer within 5 s", v.id))?;
            out.push(got.map_err(|e| format!("vCPU {}: {e}", v.id))?);
        }
        Ok(out)
    }

    /// Stops every vCPU; the VM and its memory go away when dropped.
    pub fn shutdown(mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
    }

    /// Feeds held-back console input to the UART; returns bytes taken.
    pub fn feed_serial(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_input(bytes)
    }

    pub fn fallback_summary(&self) -> FallbackSummary {
        FallbackSummary {
            emulated: self.fallback.emulated.load(Ordering::Relaxed),
            injected: self.fallback.injected.load(Ordering::Relaxed),
            kinds: lock(&self.fallback.kinds).summary(),
        }
    }
}
