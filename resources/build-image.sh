#!/usr/bin/env bash
# Build a customer's Debian 12 server root disk: systemd, openssh-server,
# systemd-networkd, a serial getty on the console, an ext4 image made with
# `mkfs.ext4 -d` (no loop mounts, no root-owned mounts on the host).
#
#   resources/build-image.sh --out FILE [--hostname NAME] [--authorized-keys FILE]
#                            [--size SIZE] [--root-password-hash HASH]
#   resources/build-image.sh --base-only      # just fetch and cache the base tree
#
# The base tree (debootstrap of bookworm, the same for every customer) is
# cached in ${VMM_CACHE:-/var/cache/vmm-guest}/server/, keyed by its recipe;
# each image then costs an unpack and a mkfs (seconds). Per image: the
# hostname, root's authorized_keys, fresh SSH host keys and an empty
# machine-id (systemd makes one at first boot), so no two customers share
# keys or identities.
#
# Addresses: the guest takes its addresses the standard way, from the
# kernel command line's `ip=` (systemd-network-generator turns
# `ip=10.0.2.2::10.0.2.1:255.255.255.0:web1:eth0:off` into a networkd
# config), else by DHCP on every Ethernet interface.
# Needs root (debootstrap, file ownership in the image). See resources/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${VMM_CACHE:-/var/cache/vmm-guest}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bump when the base tree's recipe changes.
RECIPE=4
# initramfs-tools, linux-base and zstd: a Debian kernel package installs as on
# any Debian machine (`apt install linux-image-...` makes its initrd), for
# the VMM to boot from the disk (`--kernel-name disk`).
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,openssh-server,iproute2,iputils-ping,procps,netbase,less,ca-certificates,initramfs-tools,linux-base,zstd

say() { echo "==> $*"; }
die() { echo "build-image.sh: error: $*" >&2; exit 1; }

usage() {
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

out= hostname=vmm-server keys= size=2G pwhash= base_only=
while [ $# -gt 0 ]; do
	case "$1" in
	--out) out=${2:?--out needs a file}; shift ;;
	--hostname) hostname=${2:?--hostname needs a name}; shift ;;
	--authorized-keys) keys=${2:?--authorized-keys needs a file}; shift ;;
	--size) size=${2:?--size needs a size}; shift ;;
	--root-password-hash) pwhash=${2:?--root-password-hash needs a crypt(3) hash}; shift ;;
	--base-only) base_only=1 ;;
	-h|--help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument '$1'" ;;
	esac
	shift
done
[ -n "$out" ] || [ -n "$base_only" ] || { usage >&2; die "--out FILE is required"; }
case "$hostname" in
*[!a-zA-Z0-9-]*|-*|'') die "--hostname '$hostname': letters, digits and '-' only" ;;
esac
[ -z "$keys" ] || [ -r "$keys" ] || die "--authorized-keys $keys: cannot read it"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, and owners and modes inside the image)"

pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
missing=()
for p in debootstrap e2fsprogs openssh-client debian-archive-keyring; do
	pkg_installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	{ apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi

mkdir -p "$CACHE/server" "$CACHE/tmp" "$CACHE/logs"
key=$(echo "$RECIPE $SUITE $MIRROR $PACKAGES" | sha256sum | cut -c1-16)
base=$CACHE/server/base-$key.tar

# ------------------------------------------------------------ the base tree
build_base() {
	local tree log
	tree=$(mktemp -d "$CACHE/tmp/server-base.XXXXXX")
	log=$CACHE/logs/debootstrap-$key.log
	say "server image: debootstrap $SUITE ($PACKAGES), a few minutes"
	debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tree" "$MIRROR" >"$log" 2>&1 ||
		{ tail -5 "$log" >&2; rm -rf "$tree"; die "debootstrap failed (log: $log)"; }
	# Nothing that identifies one machine stays in the shared base.
	rm -f "$tree"/etc/ssh/ssh_host_* "$tree/var/lib/dbus/machine-id"
	: >"$tree/etc/machine-id"
	# networkd: ip= from the kernel command line first, DHCP otherwise.
	systemctl --root="$tree" enable systemd-networkd.service systemd-network-generator.service >/dev/null 2>&1 ||
		die "cannot enable systemd-networkd in the image"
	# An unconfigured interface must not hold boot for 2 minutes.
	systemctl --root="$tree" mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
	cat >"$tree/etc/systemd/network/99-vmm-dhcp.network" <<-'EOF'
		# Any Ethernet interface without an ip= configuration (the generator writes
		# 90-*.network, which sorts first): DHCP (and IPv6 RAs).
		[Match]
		Type=ether

		[Network]
		DHCP=yes
	EOF
	cat >"$tree/etc/fstab" <<-'EOF'
		LABEL=root  /  ext4  errors=remount-ro  0  1
	EOF
	# The customer logs in with their key; the console gets a getty too
	# (systemd starts serial-getty@ttyS0 for console=ttyS0).
	mkdir -p "$tree/etc/ssh/sshd_config.d"
	cat >"$tree/etc/ssh/sshd_config.d/50-vmm.conf" <<-'EOF'
		PermitRootLogin prohibit-password
		PasswordAuthentication no
	EOF
	# A kernel package's initrd holds the drivers this machine uses
	# (virtio-mmio, virtio-blk, ext4), not every storage driver Debian has:
	# a VM's devices do not change, and mkinitramfs takes a fraction of the
	# time (MODULES=most: 4.5 min in the test host).
	# The VM's root path is named too: `dep` looks at the running kernel,
	# and one with these built in would leave them out.
	mkdir -p "$tree/etc/initramfs-tools/conf.d"
	echo MODULES=dep >"$tree/etc/initramfs-tools/conf.d/vmm.conf"
	printf '%s\n' virtio_mmio virtio_blk ext4 >>"$tree/etc/initramfs-tools/modules"
	rm -rf "$tree"/var/cache/apt/*.bin "$tree"/var/lib/apt/lists/* "$tree"/var/log/*.log
	tar --numeric-owner --xattrs -C "$tree" -cf "$base.tmp" . || die "cannot archive the base tree"
	mv "$base.tmp" "$base"
	rm -rf "$tree"
	# Older recipes' bases are of no further use.
	find "$CACHE/server" -maxdepth 1 -name 'base-*.tar' ! -name "$(basename "$base")" -delete
	say "server image: base cached in $base"
}

exec 9>"$CACHE/server/.lock"
flock 9
[ -f "$base" ] || build_base
[ -z "$base_only" ] || { say "server image: base up to date ($base)"; exit 0; }

# ------------------------------------------------------------ one customer's image
stage=$(mktemp -d "$CACHE/tmp/server-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tar --numeric-owner --xattrs -C "$stage" -xf "$base" || die "cannot unpack $base"
echo "$hostname" >"$stage/etc/hostname"
cat >"$stage/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$hostname
::1		localhost ip6-localhost ip6-loopback
EOF
install -d -m 700 "$stage/root/.ssh"
if [ -n "$keys" ]; then
	install -m 600 "$keys" "$stage/root/.ssh/authorized_keys"
fi
ssh-keygen -q -A -f "$stage" || die "ssh-keygen (host keys) failed"
if [ -n "$pwhash" ]; then
	echo "root:$pwhash" | chpasswd -e -R "$stage" || die "cannot set root's password"
fi
mkdir -p "$(dirname "$out")"
rm -f "$out.tmp"
truncate -s "$size" "$out.tmp" || die "--size $size: cannot create $out"
mkfs.ext4 -q -F -t ext4 -L root -E root_owner=0:0 -d "$stage" "$out.tmp" ||
	die "mkfs.ext4 failed (is --size $size large enough? the base is $(du -sh "$stage" | cut -f1))"
mv "$out.tmp" "$out"
say "server image: $out (hostname $hostname${keys:+, keys from $keys})"
