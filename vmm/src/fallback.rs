//! Glue between a vCPU's emulation-failure exit and `emulate`: reads the
//! vCPU state and the instruction bytes, runs the emulator, writes back
//! what changed or injects the exception.

use devices::virtio::GuestMemoryMmap;
use kvm_bindings::kvm_vcpu_events;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::emulate::{self, CpuState, GuestMemory, MemFault, Outcome};
use crate::vcpu::FallbackCounters;

const PAGE: u64 = 4096;

/// Guest-virtual access through `KVM_TRANSLATE`, page by page.
struct VirtMem<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
}

impl VirtMem<'_> {
    fn translate(&self, gva: u64, len: usize, write: bool) -> Result<u64, MemFault> {
        let fault = |reason: String| MemFault {
            gva,
            len,
            write,
            reason,
        };
        let t = self
            .vcpu
            .translate_gva(gva)
            .map_err(|e| fault(format!("KVM_TRANSLATE: {e}")))?;
        if t.valid == 0 {
            return Err(fault("not mapped".into()));
        }
        if write && t.writeable == 0 {
            return Err(fault("not writable".into()));
        }
        Ok(t.physical_address)
    }

    fn access(
        &mut self,
        gva: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), String>,
    ) -> Result<(), MemFault> {
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let chunk = ((PAGE - (va % PAGE)) as usize).min(len - done);
            let pa = self.translate(va, chunk, write)?;
            f(pa, done, chunk).map_err(|reason| MemFault {
                gva: va,
                len: chunk,
                write,
                reason,
            })?;
            done += chunk;
        }
        Ok(())
    }
}

impl GuestMemory for VirtMem<'_> {
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let mem = self.mem;
        let len = buf.len();
        self.access(gva, len, false, |pa, off, n| {
            mem.read_slice(&mut buf[off..off + n], GuestAddress(pa))
                .map_err(|e| e.to_string())
        })
    }

    fn write_virt(&mut self, gva: u64, buf: &[u8]) -> Result<(), MemFault> {
        let mem = self.mem;
        self.access(gva, buf.len(), true, |pa, off, n| {
            mem.write_slice(&buf[off..off + n], GuestAddress(pa))
                .map_err(|e| e.to_string())
        })
    }
}

/// Emulates the instruction at the vCPU's RIP. Returns a message for the
/// VM's log when the VM must stop.
pub fn emulate_at_rip(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    counters: &FallbackCounters,
) -> Result<(), String> {
    let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let fpu = vcpu.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    let mut state = CpuState { regs, sregs, fpu };
    let mut vmem = VirtMem { vcpu, mem };

    // Fetch up to 15 bytes; a shorter fetch at the end of a mapping is fine.
    let rip = state.regs.rip.wrapping_add(if state.sregs.cs.l == 1 {
        0
    } else {
        state.sregs.cs.base
    });
    let mut code = [0u8; 15];
    let mut n = 15usize;
    while n > 0 && vmem.read_virt(rip, &mut code[..n]).is_err() {
        n = n.saturating_sub(((rip + n as u64) % PAGE).max(1) as usize);
    }
    if n == 0 {
        return Err(format!(
            "KVM could not emulate an instruction at RIP {rip:#x}, and its bytes are not readable"
        ));
    }

    let user_mode = state.sregs.cs.selector & 3 == 3 || state.sregs.cs.dpl == 3;
    // `int n` (CD ib): a software interrupt through the guest's IDT, with
    // the return address past the instruction.
    if n >= 2 && code[0] == 0xcd {
        let vector = code[1];
        state.regs.rip = state.regs.rip.wrapping_add(2);
        vcpu.set_regs(&state.regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        let mut ev = vcpu
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        ev.interrupt.injected = 1;
        ev.interrupt.nr = vector;
        ev.interrupt.soft = 1;
        vcpu.set_vcpu_events(&ev)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
        counters
            .injected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut kinds = devices::bus::lock(&counters.kinds);
        if kinds.record(iced_x86::Mnemonic::Int) {
            tracing::info!("PVM fallback: delivering `int {vector:#x}` as a software interrupt");
        }
        return Ok(());
    }
    let before = state;
    let result = emulate::emulate(&code[..n], &mut state, &mut vmem);
    {
        let mut kinds = devices::bus::lock(&counters.kinds);
        if kinds.record(result.mnemonic) {
            tracing::info!(
                "PVM fallback: emulating `{}` in userspace (first at RIP {:#x})",
                emulate::disassemble(&code[..n], &before),
                rip
            );
        }
    }
    match &result.outcome {
        Outcome::Emulated | Outcome::Inject { .. } => {
            if result.modified.regs {
                vcpu.set_regs(&state.regs)
                    .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            }
            if result.modified.sregs {
                vcpu.set_sregs(&state.sregs)
                    .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
            }
            if result.modified.fpu {
                vcpu.set_fpu(&state.fpu)
                    .map_err(|e| format!("KVM_SET_FPU: {e}"))?;
            }
        }
        _ => {}
    }
    match result.outcome {
        Outcome::Emulated => {
            counters
                .emulated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Outcome::Inject { vector, error_code } => {
            counters
                .injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut ev: kvm_vcpu_events = vcpu
                .get_vcpu_events()
                .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
            ev.exception.injected = 1;
            ev.exception.pending = 0;
            ev.exception.nr = vector;
            ev.exception.has_error_code = u8::from(error_code.is_some());
            ev.exception.error_code = error_code.unwrap_or(0);
            vcpu.set_vcpu_events(&ev)
                .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
        }
        Outcome::Unsupported { .. } | Outcome::Fault { .. } if user_mode => {
            // What KVM would have done for guest user code: #UD. A guest
            // process must not be able to stop its VM.
            let mut ev: kvm_vcpu_events = vcpu
                .get_vcpu_events()
                .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
            ev.exception.injected = 1;
            ev.exception.nr = emulate::vector::UD;
            ev.exception.has_error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
        }
        other => Err(format!(
            "stopping the VM: KVM could not emulate an instruction and neither can the VMM: {other}"
        )),
    }
}
