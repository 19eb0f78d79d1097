#!/usr/bin/env bash
# Every test: unit tests, tiny-guest tests, the control socket and shell
# end to end, the real-Linux (`mini`) boots, then Debian 6.1's own kernel
# booting to its init and rebooting in the same process (~10 minutes under
# this machine's software KVM; run alone so it has the CPUs to itself).
# VMM_SLOW=1 adds Debian 6.12 (another ~15 minutes); VMM_DEBIAN=0 skips the
# Debian boots.
set -euo pipefail
cd "$(dirname "$0")"
scripts/host-deps.sh
entries=(mini disk)
[ "${VMM_DEBIAN:-1}" = 1 ] && entries+=(debian-6.1)
[ "${VMM_SLOW:-0}" = 1 ] && entries+=(debian-6.12)
resources/build-kernels.sh "${entries[@]}"
export VMM_REQUIRE_KERNELS=1
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"
if [ "${VMM_SLOW:-0}" = 1 ]; then
    cargo test -p tests --test debian_boot -- --ignored --test-threads=1
elif [ "${VMM_DEBIAN:-1}" = 1 ]; then
    cargo test -p tests --test debian_boot -- --ignored --exact debian_6_1_boots_to_init_and_reboots_in_process
fi
