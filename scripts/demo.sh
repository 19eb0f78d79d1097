#!/usr/bin/env bash
# The main job, once everything is built (./run.sh builds, then runs this):
# boots the `mini` guest (KERNEL=... for another library entry) with its
# serial console on this terminal (Ctrl-A x quits) and its control socket at
# $VMM_RUN_DIR/demo/control.sock (default /run/vmm/demo/control.sock).
#
# On hardware KVM the guest runs right here. On a machine whose /dev/kvm
# cannot run guest user space (kvm_pvm, see README.md), it runs inside the
# test host (QEMU's software emulation of an AMD CPU with SVM, where our VMM
# gets real KVM; resources/README.md, "The test host"): same console, same
# control socket (forwarded here), about 10 s more to start, everything
# slower. VMM_TESTHOST=1|0 forces either.
#
# BIN: where vmm, vmm-shell and vmm-testhost are (default build/release).
# Extra arguments go to vmm.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
BIN=$(cd "${BIN:-build/release}" && pwd)
KERNEL=${KERNEL:-mini}
RUN_DIR=${VMM_RUN_DIR:-/run/vmm}
sock=$RUN_DIR/demo/control.sock
. scripts/testhost-needed.sh

vmm_args=(--name demo --kernel-dir "$repo/build/kernels" --kernel-name "$KERNEL"
	--vcpus 2 --memory 512 --control "$sock" --console stdio)

if [ -z "$in_testhost" ]; then
	exec "$BIN/vmm" "${vmm_args[@]}" \
		--disk path="$repo/build/disks/rootfs.ext4",id=rootfs \
		--console-log "$repo/build/demo-console.log" "$@"
fi

# Inside the test host the outer root is read-only: the disk is a copy in
# its memory, the console log goes to a writable share.
share=$repo/build/testhost-share
mkdir -p "$share"
script=$share/demo-$$.sh
trap 'rm -f "$script"' EXIT
{
	echo "mkdir -p /tmp/demo && cp '$repo/build/disks/rootfs.ext4' /tmp/demo/"
	printf 'exec %q' "$BIN/vmm"
	printf ' %q' "${vmm_args[@]}" --disk path=/tmp/demo/rootfs.ext4,id=rootfs \
		--console-log "$share/demo-console.log" "$@"
	echo
} >"$script"
echo "==> this machine's /dev/kvm cannot run guest user space: the guest runs inside the test host"
echo "==> (QEMU software emulation with AMD SVM; see README.md). Ctrl-A x quits; control socket: $sock"
exec "$BIN/vmm-testhost" run --share "$share" --forward "$sock" "$script"
