#!/usr/bin/env bash
# Installs the Debian packages the VMM, its tests and benchmarks need
# (once; a fast no-op afterwards). Run as root on Debian 12.
set -euo pipefail
need=(build-essential bc flex bison libelf-dev libssl-dev cpio busybox-static
      e2fsprogs xz-utils zstd kmod iproute2 socat util-linux procps lz4
      qemu-system-x86 debian-archive-keyring dmsetup nftables dnsmasq-base)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "==> installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
    echo "host-deps.sh: error: cargo (Rust 1.85 or newer) is not installed; see https://rustup.rs" >&2
    exit 1
fi
if [ ! -w /dev/kvm ]; then
    echo "host-deps.sh: error: /dev/kvm is missing or not writable by $(id -un)" >&2
    exit 1
fi
