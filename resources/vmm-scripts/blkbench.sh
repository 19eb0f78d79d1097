# vmm.run=blkbench: the guest half of `scripts/bench.sh --devices --guest`
# and of `scripts/bench.sh --testhost`'s disk rows.
# Sequential 1 MiB O_DIRECT reads, then writes, over all of /dev/vda (a
# scratch disk the benchmark attached), each printed as bytes and seconds; then power off.
dev=/dev/vda
mib=$(( $(cat /sys/block/vda/size) / 2048 ))
echo "vmm-bench: disk $dev $mib MiB"
# Debian's busybox dd prints no throughput line: time it from /proc/uptime.
up() { cut -d' ' -f1 /proc/uptime; }
timed() {
	name=$1; shift
	t0=$(up); "$@" 2>/dev/null; t1=$(up)
	echo "vmm-bench: $name $((mib * 1048576)) bytes copied, $(awk "BEGIN { print $t1 - $t0 }") seconds"
}
timed seq-read dd if=$dev of=/dev/null bs=1M count=$mib iflag=direct
timed seq-write dd if=/dev/zero of=$dev bs=1M count=$mib oflag=direct conv=fsync
echo "vmm-bench: done"
poweroff -f
