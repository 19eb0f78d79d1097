#!/usr/bin/env bash
# Every test: unit tests, tiny-guest tests, the control socket and shell
# end to end, and the real-Linux (`mini`) boots. VMM_SLOW=1 adds the
# Debian-kernel suite (it takes tens of minutes under a software KVM).
set -euo pipefail
cd "$(dirname "$0")"
scripts/host-deps.sh
entries=(mini disk)
[ "${VMM_SLOW:-0}" = 1 ] && entries+=(debian-6.1 debian-6.12)
resources/build-kernels.sh "${entries[@]}"
export VMM_REQUIRE_KERNELS=1
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
if [ "${VMM_SLOW:-0}" = 1 ]; then
    cargo test -p tests --test debian_boot -- --ignored --test-threads=1
fi
