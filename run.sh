#!/usr/bin/env bash
# The main job: build everything, boot the `mini` guest with its serial
# console on this terminal (Ctrl-A x quits) and its control socket at
# /run/vmm/demo/control.sock (try: build/release/vmm-shell --run-dir /run/vmm status).
# Where this machine's /dev/kvm cannot run guest user space, the guest runs
# inside the test host (scripts/demo.sh says so when it starts).
set -euo pipefail
cd "$(dirname "$0")"
scripts/host-deps.sh
. scripts/testhost-needed.sh
resources/build-kernels.sh mini disk ${in_testhost:+testhost}
cargo build --release --workspace --bins
mkdir -p build/release
cp target/release/vmm target/release/vmm-shell target/release/vmm-testhost build/release/
exec scripts/demo.sh "$@"
