#!/usr/bin/env bash
# The main job: build everything, boot the `mini` guest with its serial
# console on this terminal (Ctrl-A x quits) and its control socket at
# /run/vmm/demo/control.sock (try: build/release/vmm-shell --run-dir /run/vmm status).
set -euo pipefail
cd "$(dirname "$0")"
scripts/host-deps.sh
resources/build-kernels.sh mini disk
cargo build --release --workspace --bins
mkdir -p build/release
cp target/release/vmm target/release/vmm-shell build/release/
exec build/release/vmm --name demo \
    --kernel-dir build/kernels --kernel-name "${KERNEL:-mini}" \
    --vcpus 2 --memory 512 \
    --disk path=build/disks/rootfs.ext4,id=rootfs \
    --control /run/vmm/demo/control.sock \
    --console-log build/demo-console.log \
    --console stdio "$@"
