# vmm.run=blkbench: the guest half of `scripts/bench.sh --devices --guest`
# and of `scripts/bench.sh --testhost`'s disk rows.
# Sequential 1 MiB O_DIRECT reads, then writes, over all of /dev/vda (a
# scratch disk the benchmark attached), each printed as busybox dd's summary
# line; then power off.
dev=/dev/vda
mib=$(( $(cat /sys/block/vda/size) / 2048 ))
echo "vmm-bench: disk $dev $mib MiB"
echo "vmm-bench: seq-read $(dd if=$dev of=/dev/null bs=1M count=$mib iflag=direct 2>&1 | tail -n 1)"
echo "vmm-bench: seq-write $(dd if=/dev/zero of=$dev bs=1M count=$mib oflag=direct conv=fsync 2>&1 | tail -n 1)"
echo "vmm-bench: done"
poweroff -f
