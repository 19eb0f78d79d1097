# vmm.run=blkbench: the guest half of `scripts/bench.sh --devices --guest`
# and of `scripts/bench.sh --testhost`'s disk rows.
# Sequential 1 MiB O_DIRECT reads, then writes, over all of /dev/vda (a
# scratch disk the benchmark attached), each printed as bytes and seconds;
# then 4 KiB O_DIRECT reads one at a time (QD1: one dd) and 32 at a time
# (QD32: 32 dd processes, each over its own 32nd of the disk), printed as
# reads and seconds; then power off.
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
blocks=$((mib * 256))
t0=$(up)
dd if=$dev of=/dev/null bs=4k count=8192 iflag=direct 2>/dev/null
t1=$(up)
echo "vmm-bench: qd1-read 8192 reads, $(awk "BEGIN { print $t1 - $t0 }") seconds"
t0=$(up)
i=0
while [ $i -lt 32 ]; do
	dd if=$dev of=/dev/null bs=4k count=512 skip=$((i * blocks / 32)) iflag=direct 2>/dev/null &
	i=$((i + 1))
done
wait
t1=$(up)
echo "vmm-bench: qd32-read 16384 reads, $(awk "BEGIN { print $t1 - $t0 }") seconds"
echo "vmm-bench: done"
poweroff -f
