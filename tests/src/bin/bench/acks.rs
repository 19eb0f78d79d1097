//! Section 5, interrupt acknowledgements: what a virtio-mmio used-buffer
//! interrupt's InterruptACK write costs the guest.
//!
//! Linux's virtio-mmio handler reads INTERRUPT_STATUS and writes the bits
//! back to InterruptACK on every interrupt. Our VMM has KVM complete the
//! write of the used bit alone (1) in the kernel (an ioeventfd,
//! `Interrupt::absorb_used_acks`); any other value, and every write in
//! QEMU's virtio-mmio, exits to the VMM's vCPU thread. A tiny guest writes
//! each value `WRITES` times to its first virtio-mmio transport, between
//! console markers whose arrival the benchmark times. The value 2 (the
//! config bit, not set: a no-op for the device) is the same register
//! handled the usual way, measured in the same process.

use std::path::Path;
use std::time::Duration;

use tests::tiny::{write_guest, Asm};
use tests::tiny_virtio::{reg, slot_base};

use crate::launch::{Boot, Vmm, QEMU_EXIT_PORT, QEMU_EXIT_VALUE};
use crate::proc::Proc;
use crate::report::{ratio, stats, Table};
use crate::Ctx;

/// Writes of each value per run.
const WRITES: u32 = 100_000;
/// QEMU microvm's first virtio-mmio transport (`hw/i386/microvm.c`,
/// `VIRTIO_MMIO_BASE`): present with or without a device behind it.
const MICROVM_BASE: u32 = 0xfeb0_0000;

fn guest(dir: &Path, name: &str, base: u32) -> Result<std::path::PathBuf, String> {
    let path = dir.join(name);
    let mut a = Asm::new();
    a.print("ACK-GO\r\n")
        .mov_mem32_times(base + reg::INTERRUPT_ACK, 1, WRITES)
        .print("ACK-USED\r\n")
        .mov_mem32_times(base + reg::INTERRUPT_ACK, 2, WRITES)
        .print("ACK-CONFIG\r\n")
        .outb(QEMU_EXIT_PORT, QEMU_EXIT_VALUE)
        .outb(0x600, 0x34)
        .cli_hlt_forever();
    write_guest(&path, &a).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// µs per write of 1, then of 2, in one boot of `v`.
fn once(cx: &Ctx, v: &Vmm, kernel: &Path, disk: &Path) -> Result<(f64, f64), String> {
    let mut c = v.command(&Boot {
        kernel,
        memory_mib: cx.o.memory,
        serial: true,
        control: None,
        log_info: false,
    });
    if let Vmm::Ours(_) = v {
        // A device in slot 0, so that its registers are ours to time.
        c.arg("--disk").arg(format!("path={}", disk.display()));
    }
    let p = Proc::spawn(&mut c, &v.label())?;
    let wait = |marker: &str, from: usize| {
        p.out
            .wait_any(&[marker], from, Duration::from_secs(120))
            .ok_or_else(|| format!("{}: no {marker} on the console:\n{}", v.label(), p.ended()))
    };
    let (_, go, end) = wait("ACK-GO", 0)?;
    let (_, used, end) = wait("ACK-USED", end)?;
    let (_, config, _) = wait("ACK-CONFIG", end)?;
    p.wait_exit(Duration::from_secs(30));
    p.kill();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(WRITES);
    Ok((per(used - go), per(config - used)))
}

pub(super) fn acks(cx: &Ctx) -> Result<(), String> {
    let ours_guest = guest(&cx.tmp.0, "acks-ours.elf", slot_base(0))?;
    let qemu_guest = guest(&cx.tmp.0, "acks-microvm.elf", MICROVM_BASE)?;
    let disk = cx.tmp.0.join("acks.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).map_err(|e| format!("{}: {e}", disk.display()))?;
    let mut peers: Vec<(&Vmm, &Path)> = vec![(&cx.ours, &ours_guest)];
    if let Some(q) = &cx.qemu {
        peers.push((q, &qemu_guest));
    }
    let runs = cx.o.runs.clamp(1, 5);
    let mut res: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); peers.len()];
    for _ in 0..runs {
        for (i, (v, k)) in peers.iter().enumerate() {
            let (a, b) = once(cx, v, k, &disk)?;
            res[i].0.push(a);
            res[i].1.push(b);
        }
    }
    let mut t = Table::new(&[
        format!("µs per InterruptACK write ({WRITES} each, median of {runs})").as_str(),
        "1 (used bit: every interrupt)",
        "2 (config bit)",
        "1 vs vmm",
    ]);
    let base = stats(&res[0].0).map(|s| s.median);
    for (i, (v, _)) in peers.iter().enumerate() {
        let used = stats(&res[i].0).map(|s| s.median);
        let config = stats(&res[i].1).map(|s| s.median);
        t.row(vec![
            v.label(),
            used.map_or("-".into(), |x| format!("{x:.2}")),
            config.map_or("-".into(), |x| format!("{x:.2}")),
            ratio(used, base),
        ]);
    }
    t.print();
    println!(
        "  vmm: the used bit's acknowledgement is completed by KVM (an ioeventfd), the config bit's by the VMM's vCPU thread; QEMU handles both in its vCPU thread."
    );
    Ok(())
}
