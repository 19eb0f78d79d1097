//! Detecting a known fault of the test host's emulator (QEMU's TCG
//! emulation of AMD SVM, seen in 7.2 and 10.0). Now and then a world
//! switch goes wrong:
//!
//! * a guest vCPU is entered at the *test host's own* VMRUN address
//!   (inside kvm_amd's `__svm_vcpu_run`), where the guest has nothing
//!   mapped: KVM then loops forever on a nested page fault, the emulation
//!   of the faulting instruction and the injection of a #PF into the guest.
//!   The guest is wedged, its console silent; the VMM still answers.
//! * or the test host's own kernel resumes with guest state and dies
//!   (`BUG: TASK stack guard page was hit` in `error_entry`).
//!
//! Hardware does neither (docs/notes.md, "The test host"). Enabling a
//! tracepoint in the test host seemed to make the second more likely, so
//! the check is passive: KVM's per-VM `pf_guest` counter (page faults KVM
//! itself injected into the guest, which a healthy guest on nested paging
//! almost never sees; a wedged one, thousands a second) read twice, half
//! a second apart, from debugfs (`/sys/kernel/debug/kvm/<pid>-<fd>/`).

use std::time::Duration;

use crate::host::Host;

/// More injected page faults than this in half a second is the loop.
const LOOP_RATE: u64 = 200;

const PROBE: &str = r#"snap() {
    for f in /sys/kernel/debug/kvm/*-*/pf_guest; do
        [ -r "$f" ] && echo "$f $(cat "$f")"
    done
}
a=$(snap); sleep 0.5; b=$(snap)
echo "$a" > /tmp/.wedge.a.$$; echo "$b" > /tmp/.wedge.b.$$
awk 'NR==FNR { before[$1] = $2; next }
     ($1 in before) && $2 - before[$1] > LIMIT { split($1, p, "/"); split(p[6], v, "-"); print v[1] }' \
    /tmp/.wedge.a.$$ /tmp/.wedge.b.$$ | sort -u
rm -f /tmp/.wedge.a.$$ /tmp/.wedge.b.$$"#;

/// Pids of the VMM processes in the test host whose vCPUs are wedged so.
pub fn wedged_vmms(host: &Host) -> Vec<u32> {
    if !host.is_test_host() || !host.is_alive() {
        return Vec::new();
    }
    let script = PROBE.replace("LIMIT", &LOOP_RATE.to_string());
    match host.try_sh(&script, Duration::from_secs(30)) {
        Ok(out) => out
            .stdout
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

const THREADS: &str = r#"p=PID
for t in /proc/$p/task/*; do
    echo "thread $(basename $t) $(cat $t/comm) state=$(awk '{print $3}' $t/stat) wchan=$(cat $t/wchan 2>/dev/null)"
    sed 's/^/    /' $t/stack 2>/dev/null | head -8
done
for d in /sys/kernel/debug/kvm/$p-*; do
    [ -d "$d" ] || continue
    a=$(cd $d && grep -H . exits halt_exits pf_guest pf_taken irq_injections io_exits mmio_exits signal_exits 2>/dev/null | tr '\n' ' ')
    sleep 1
    b=$(cd $d && grep -H . exits halt_exits pf_guest pf_taken irq_injections io_exits mmio_exits signal_exits 2>/dev/null | tr '\n' ' ')
    echo "kvm counters: $a"
    echo "one second later: $b"
done"#;

/// For a failure's report: the VMM's threads in the test host (state,
/// kernel wait channel and stack) and its KVM counters one second apart,
/// so a hang that is neither the known wedge nor the VMM's fault can be
/// told apart afterwards.
pub fn threads_report(host: &Host, pid: u32) -> String {
    if !host.is_test_host() || !host.is_alive() {
        return String::new();
    }
    match host.try_sh(
        &THREADS.replace("PID", &pid.to_string()),
        Duration::from_secs(30),
    ) {
        Ok(out) => format!("--- vmm threads in the test host ---\n{}", out.stdout),
        Err(e) => format!("--- vmm threads in the test host: {e}"),
    }
}

/// The test host's own VMRUN address (`__svm_vcpu_run` in kvm_amd), from
/// its /proc/kallsyms; `None` off the test host or if it cannot be read.
pub fn vmrun_address(host: &Host) -> Option<u64> {
    if !host.is_test_host() || !host.is_alive() {
        return None;
    }
    let out = host
        .try_sh(
            "grep -m1 ' __svm_vcpu_run' /proc/kallsyms",
            Duration::from_secs(30),
        )
        .ok()?;
    let addr = out.stdout.split_whitespace().next()?;
    u64::from_str_radix(addr, 16).ok().filter(|&a| a != 0)
}

/// The instruction pointers of the triple faults the VMM logged (its
/// `triple fault (KVM shutdown exit) at rip=0x...` lines).
pub fn triple_fault_rips(vmm_stderr: &str) -> Vec<u64> {
    vmm_stderr
        .lines()
        .filter(|l| l.contains("triple fault"))
        .filter_map(|l| {
            let hex = l.split("rip=0x").nth(1)?;
            let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
            u64::from_str_radix(&hex, 16).ok()
        })
        .collect()
}

/// Did one of those triple faults happen in the test host's own VMRUN
/// code (the first form of the fault above, ending in a triple fault
/// instead of the page-fault loop)? A guest never runs there.
pub fn triple_fault_at_vmrun(host: &Host, vmm_stderr: &str) -> bool {
    let rips = triple_fault_rips(vmm_stderr);
    if rips.is_empty() {
        return false;
    }
    vmrun_address(host)
        .is_some_and(|a| rips.iter().any(|&r| r >= a && r < a.saturating_add(0x1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triple_fault_lines_give_their_rip() {
        let err = "x\n2026 WARN vmm::vcpu: vCPU 0: triple fault (KVM shutdown exit) at rip=0xffffffffc0a1b2c3 rsp=0x10\n";
        assert_eq!(triple_fault_rips(err), vec![0xffff_ffff_c0a1_b2c3]);
        assert!(triple_fault_rips("vCPU 0: triple fault; registers: EIO").is_empty());
    }
}
