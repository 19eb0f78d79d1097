# vmm.run=panic: crash the kernel (sysrq 'c'). The kernel panics, pvpanic
# reports it to the VMM, and panic=1 reboots after 1 s.
echo "vmm-run: triggering a kernel panic"
echo 1 >/proc/sys/kernel/sysrq
echo c >/proc/sysrq-trigger
