//! Section 2, memory: the resident memory of an idle tiny guest's VMM
//! process, against its guest RAM.

use std::time::Duration;

use crate::launch::Vmm;
use crate::procfs;
use crate::report::{mib, ratio, stats, Table};
use crate::{boot_idle, Ctx};

/// Selects one series of the memory samples.
type MemField = fn(&MemSamples) -> &Vec<f64>;

#[derive(Default)]
struct MemSamples {
    hwm: Vec<f64>,
    rss: Vec<f64>,
    anon: Vec<f64>,
    guest: Vec<f64>,
    overhead: Vec<f64>,
    private: Vec<f64>,
}

fn mem_once(cx: &Ctx, v: &Vmm, s: &mut MemSamples) -> Result<(), String> {
    let p = boot_idle(cx, v, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let hwm = procfs::status_kib(p.pid, "VmHWM")? as f64;
    let guest = procfs::guest_ram_rss_kib(p.pid, cx.o.memory)? as f64;
    s.hwm.push(hwm);
    s.rss.push(procfs::status_kib(p.pid, "VmRSS")? as f64);
    let anon = procfs::status_kib(p.pid, "RssAnon")? as f64;
    s.anon.push(anon);
    s.private.push(anon - guest);
    s.guest.push(guest);
    s.overhead.push(hwm - guest);
    p.kill();
    Ok(())
}

pub(super) fn memory(cx: &Ctx) -> Result<(), String> {
    let mut ours = MemSamples::default();
    let mut q = MemSamples::default();
    for _ in 0..cx.o.runs {
        mem_once(cx, &cx.ours, &mut ours)?;
        if let Some(v) = &cx.qemu {
            mem_once(cx, v, &mut q)?;
        }
    }
    let qlabel = cx.qemu.as_ref().map(Vmm::label).unwrap_or_default();
    let mut t = Table::new(&[
        "measurement (median)",
        "n",
        "vmm",
        qlabel.as_str(),
        "QEMU/vmm",
        "target",
    ]);
    let med = |v: &[f64]| stats(v).map(|s| s.median);
    let rows: [(&str, MemField); 6] = [
        ("peak RSS (VmHWM)", |s| &s.hwm),
        ("RSS now (VmRSS)", |s| &s.rss),
        ("anonymous RSS (RssAnon)", |s| &s.anon),
        ("guest RAM resident (smaps of the guest mapping)", |s| {
            &s.guest
        }),
        ("overhead = peak RSS - guest RAM resident", |s| &s.overhead),
        ("private overhead = RssAnon - guest RAM resident", |s| {
            &s.private
        }),
    ];
    for (label, f) in rows {
        let (a, b) = (med(f(&ours)), med(f(&q)));
        let fmt = |x: Option<f64>| x.map(mib).unwrap_or_else(|| "-".into());
        let target = if label.starts_with("overhead") {
            match a {
                Some(a) if a < 3.0 * 1024.0 => "< 3 MiB: met",
                Some(_) => "< 3 MiB: missed",
                None => "-",
            }
        } else {
            ""
        };
        t.row(vec![
            label.into(),
            f(&ours).len().to_string(),
            fmt(a),
            fmt(b),
            ratio(b, a),
            target.into(),
        ]);
    }
    t.print();
    println!("  The guest touches a few pages (ELF, boot tables); QEMU's guest RAM may be backed by a 2 MiB transparent huge page.");
    println!("  RSS includes file-backed pages of the binary and shared libraries (shared between processes); RssAnon is private memory.");
    Ok(())
}
