#!/bin/sh
# Inside a test host: boots of the library's mini in fresh `vmm` processes,
# to VMM-INIT-OK, a round of MODES at a time, and what became of each.
# For measuring the test host emulator's fault (docs/notes.md, "The test
# host"), not a test. From this machine:
#   target/debug/vmm-testhost run --share "$PWD/build/exp" "$PWD/scripts/testhost-bootloop.sh"
# (N, MODES, OUT from the environment where `vmm-testhost exec` runs it).
# MODES:
#   wait      the guest powers off; the next starts once its vmm exited
#   kill      at the marker the vmm is SIGKILLed and the next starts at once
#   killwait  SIGKILL, then the next once it exited
#   noise     as wait, with netns add/del and tmpfs writes meanwhile
#   netns     as wait, a namespace with a TAP made and deleted just before
#             (what a scenario's clean-up and the next one's set-up do)
# A boot that is not at the marker in 30 s is `loop` when KVM injects
# page faults into it by the thousand (the fault's wedge), else `stuck`.
set -u
R=$(cd "$(dirname "$0")/.." && pwd)
K=$R/build/kernels
VMM=${VMM:-$R/target/debug/vmm}
OUT=${OUT:-$R/build/exp}
N=${N:-30}
MODES=${MODES:-"kill wait"}
mkdir -p "$OUT"
: >"$OUT/bootloop.txt"
pfsum() { cat /sys/kernel/debug/kvm/"$1"-*/pf_guest 2>/dev/null | awk '{s+=$1} END{print s+0}'; }
i=0
while [ "$i" -lt "$N" ]; do
	i=$((i + 1))
	for mode in $MODES; do
		cmd=$(cat "$K/mini/cmdline")
		case $mode in wait | noise | netns) cmd="$cmd vmm.run=poweroff" ;; esac
		if [ "$mode" = netns ]; then
			ip netns add bl$$ && ip -n bl$$ tuntap add dev tap0 mode tap multi_queue &&
				ip -n bl$$ link set tap0 up && ip netns del bl$$
		fi
		log=/tmp/bootloop.$i.$mode.log
		noise=
		if [ "$mode" = noise ]; then
			(while :; do
				ip netns add bl$$ && ip netns del bl$$
				dd if=/dev/zero of=/tmp/bl.noise bs=1M count=16 2>/dev/null
				rm -f /tmp/bl.noise
			done) &
			noise=$!
		fi
		t0=$(date +%s.%N)
		"$VMM" --kernel-dir "$K" --kernel-name mini --memory 256 --cmdline "$cmd" \
			--console none --console-log "$log" --exit-on-poweroff \
			>/dev/null 2>/tmp/bootloop.err </dev/null &
		pid=$!
		n=0
		res=
		while [ $n -lt 300 ]; do
			if grep -q VMM-INIT-OK "$log" 2>/dev/null; then res=ok; break; fi
			kill -0 $pid 2>/dev/null || break
			sleep 0.1
			n=$((n + 1))
		done
		t1=$(date +%s.%N)
		if [ -z "$res" ]; then
			if kill -0 $pid 2>/dev/null; then
				a=$(pfsum $pid); sleep 0.5; b=$(pfsum $pid)
				if [ $((b - a)) -gt 200 ]; then res=loop; else res=stuck; fi
			elif grep -qi triple /tmp/bootloop.err; then res=triple
			else res=exited; fi
			kill -9 $pid 2>/dev/null
			wait $pid 2>/dev/null
		else
			case $mode in
			wait | noise | netns) wait $pid ;;
			kill) kill -9 $pid ;;
			killwait) kill -9 $pid; wait $pid 2>/dev/null ;;
			esac
		fi
		[ -n "$noise" ] && { kill $noise; wait $noise 2>/dev/null; }
		rm -f "$log"
		line="$i $mode $res $(echo "$t1 - $t0" | bc)"
		echo "$line"
		echo "$line" >>"$OUT/bootloop.txt"
	done
done
for m in $MODES; do
	echo "$m: $(awk -v m="$m" '$2 == m { n++; c[$3]++ } END { printf "%d boots", n; for (k in c) printf ", %s %d", k, c[k] }' "$OUT/bootloop.txt")"
done
