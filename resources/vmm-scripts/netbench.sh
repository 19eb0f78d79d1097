# vmm.run=netbench: the guest half of `scripts/bench.sh --testhost`'s network
# rows. The host (10.0.2.1, the TAP's other end) listens on 5001 (sink) and
# 5002 (sends VMM_NET_MIB MiB, default 64) before the guest boots. The guest
# sends, then receives, timing each on its own clock; then powers off.
mib=${VMM_NET_MIB:-64}
for arg in $(cat /proc/cmdline); do
	case "$arg" in vmm.net_mib=*) mib=${arg#vmm.net_mib=} ;; esac
done
ip addr add 10.0.2.2/24 dev eth0 && ip link set eth0 up
now() { cut -d' ' -f1 /proc/uptime; }
bytes=$((mib * 1048576))
# The host's listeners may start after the guest is up: a refused
# connection is tried again, and a half that moved less than it should
# says "failed" instead of a time (a refused nc once gave a bogus figure).
tries=0
while :; do
	t0=$(now)
	if dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null | nc 10.0.2.1 5001; then
		t1=$(now)
		echo "vmm-bench: net-tx $mib MiB $(awk "BEGIN { print $t1 - $t0 }") s"
		break
	fi
	tries=$((tries + 1))
	[ $tries -lt 10 ] || { echo "vmm-bench: net-tx failed"; break; }
	sleep 1
done
tries=0
while :; do
	t0=$(now)
	n=$(nc 10.0.2.1 5002 </dev/null | wc -c)
	t1=$(now)
	if [ "$n" = "$bytes" ]; then
		echo "vmm-bench: net-rx $mib MiB $(awk "BEGIN { print $t1 - $t0 }") s"
		break
	fi
	tries=$((tries + 1))
	[ $tries -lt 10 ] && [ "$n" = 0 ] || { echo "vmm-bench: net-rx failed ($n bytes)"; break; }
	sleep 1
done
echo "vmm-bench: done"
poweroff -f
