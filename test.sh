#!/usr/bin/env bash
# Every test: unit tests, tiny-guest tests, the control socket and shell
# end to end, `mini` reaching its init on this machine's /dev/kvm (the PVM
# compatibility layer where that is kvm_pvm), the user-space suite (real
# guests with real user space: in the test host where /dev/kvm cannot run
# guest user space, on /dev/kvm itself where it is hardware KVM), and the
# newcomer's demo.
# VMM_SLOW=1 adds Debian 6.1 and 6.12 booting to their init on /dev/kvm
# itself (10-20 minutes each under kvm_pvm). VMM_TESTHOST=1|0 forces where
# guests with user space run.
# Then every fuzz target runs for a few seconds (scripts/fuzz.sh; longer:
# scripts/fuzz.sh --seconds N); VMM_FUZZ_SECONDS=N changes that, 0 skips it.
set -euo pipefail
cd "$(dirname "$0")"
scripts/host-deps.sh
. scripts/testhost-needed.sh
# The test host is built even where guests run on this machine's own KVM:
# the systemd tests boot one with systemd as PID 1 (tests/tests/systemd_host.rs).
resources/build-kernels.sh mini disk debian-6.1 debian-6.12 modules server testhost
export VMM_REQUIRE_KERNELS=1
cargo build --workspace --all-targets
rm -f target/testhost-retries.log target/testhost-times.log
status=0
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}" || status=$?
if [ -s target/testhost-times.log ]; then
    echo "==> user-space scenarios, slowest first (seconds, retries included):"
    sort -rn target/testhost-times.log
fi
if [ -s target/testhost-retries.log ]; then
    echo "==> tests the test host ran twice (docs/notes.md, \"The test host\"):"
    cat target/testhost-retries.log
fi
[ "$status" = 0 ] || exit "$status"
if [ "${VMM_FUZZ_SECONDS:-2}" != 0 ]; then
    scripts/fuzz.sh --seconds "${VMM_FUZZ_SECONDS:-2}"
fi
if [ "${VMM_SLOW:-0}" = 1 ]; then
    cargo test -p tests --test debian_boot -- --ignored --test-threads=1
    cargo test -p tests --test userspace -- --ignored --test-threads=1
fi
