#!/usr/bin/env bash
# Benchmark (not a test): the VMM's own costs against QEMU on this host with
# tiny guests — start-up, memory overhead, idle host CPU, control-socket
# round trips, interrupt acknowledgements — and, with --linux, a real `mini`
# boot (cold vs reset).
#   scripts/bench.sh                 # all tiny-guest figures (~1 minute)
#   scripts/bench.sh --linux         # + mini Linux boot (minutes under kvm_pvm)
#   scripts/bench.sh --help          # every option
#   scripts/bench.sh --devices       # virtio-blk/net device path vs the host
#                                    # doing the same I/O (root; --help for more)
#   scripts/bench.sh --testhost      # real guests, ours vs QEMU -enable-kvm side by
#                                    # side: boot, the Debian server to sshd, guest dd,
#                                    # TCP (in the test host
#                                    # without hardware KVM; --help for more)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--devices" ]; then
    shift
    cargo build --release -q -p vmm -p tests --bin vmm --bin devbench
    target="${CARGO_TARGET_DIR:-target}/release"
    exec "$target/devbench" --vmm "$target/vmm" "$@"
fi

if [ "${1:-}" = "--testhost" ]; then
    shift
    scripts/host-deps.sh
    . scripts/testhost-needed.sh
    resources/build-kernels.sh mini debian-6.1 modules server ${in_testhost:+testhost}
    cargo build --release -q -p vmm -p tests --bin vmm --bin vmm-testhost --bin testhost-bench --bin devbench
    exec "${CARGO_TARGET_DIR:-target}/release/testhost-bench" "$@"
fi

if ! command -v qemu-system-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing qemu-system-x86 (the reference VMM)" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -q && apt-get install -y -q --no-install-recommends qemu-system-x86; } >&2 ||
            echo "bench.sh: warning: could not install qemu-system-x86; QEMU figures will be skipped" >&2
    else
        echo "bench.sh: warning: qemu-system-x86_64 not found (install qemu-system-x86 as root); QEMU figures will be skipped" >&2
    fi
fi

cargo build --release -q -p vmm -p tests --bin vmm --bin bench
target="${CARGO_TARGET_DIR:-target}/release"
exec "$target/bench" --vmm "$target/vmm" "$@"
