#!/usr/bin/env bash
# Build the guest kernel library used by the VMM's tests.
#
#   resources/build-kernels.sh [mini] [debian-6.1] [debian-6.12] [modules] [disk] [server] [testhost]
#
# No argument builds everything. Output:
#   ${KERNEL_DIR:-<repo>/build/kernels}/<name>/{bzImage,vmlinux,initrd.img,cmdline,release,config}
#   (mini also has vmlinux, the ELF with the PVH note, and System.map)
#   <KERNEL_DIR>/modules.img (every Debian entry's modules, for the guests' /lib/modules)
#   <KERNEL_DIR>/../disks/rootfs.ext4
#   <KERNEL_DIR>/../disks/debian-server.ext4 (resources/build-image.sh; root's key: <KERNEL_DIR>/../keys/test_ed25519)
#   <KERNEL_DIR>/../testhost/ (the test host QEMU boots: resources/testhost/build.sh)
# Expensive inputs (compiled kernels, Debian packages, apt state) are cached in
# ${VMM_CACHE:-/var/cache/vmm-guest}, keyed by what they are built from, so a
# fresh clone on the same machine reuses them. Re-running is a fast no-op.
# Environment: KERNEL_DIR, VMM_CACHE, JOBS (make -j, default nproc),
#   VMM_REFRESH=1 (look up the newest Debian kernel packages again).
# Needs root (apt-get, mknod) only when something has to be built.
# See resources/README.md.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RES=$REPO/resources
KERNEL_DIR=${KERNEL_DIR:-$REPO/build/kernels}
DISK_DIR=$(dirname "$KERNEL_DIR")/disks
CACHE=${VMM_CACHE:-/var/cache/vmm-guest}
JOBS=${JOBS:-$(nproc)}
ALL_TARGETS=(mini debian-6.1 debian-6.12 modules disk server testhost)
# Bump when the way a kernel is built changes (invalidates cached kernels).
MINI_RECIPE=1
DISK_UUID=5f1c0de0-7e57-4b1d-9a11-00000000d15c
DISK_SIZE=64M

MINI_CMDLINE="console=ttyS0 reboot=k panic=1 pci=off tsc=reliable no_timer_check lpj=5000000 i8042.noaux i8042.nomux i8042.dumbkbd"
# loglevel=4: the kernel's console gets errors and worse, as with Debian's
# own default `quiet` (dmesg keeps everything). Each byte on the serial
# console is a trap to the VMM; in the test host the full log was 40% of a
# Debian boot (11 s against 6-7 s) and every exit a chance for its
# emulator's fault. Not `quiet`: that also hushes initramfs-tools and
# systemd, whose lines on the console the customer reads.
DEBIAN_CMDLINE="console=ttyS0 loglevel=4 reboot=k panic=1 rodata=off nowatchdog tsc=reliable no_timer_check i8042.noaux i8042.nomux i8042.dumbkbd"
# Modules the initramfs of a Debian kernel loads, in this order (each after
# its dependencies from modules.dep). crc32c_generic is a soft dependency of
# ext4/jbd2 (metadata_csum), so it is named explicitly.
DEBIAN_MODULES=(crc32c_generic virtio virtio_ring virtio_mmio virtio_blk failover net_failover virtio_net ib700wdt pvpanic pvpanic_mmio ext4)

say() { echo "==> $*"; }
die() { echo "build-kernels.sh: error: $*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

usage() {
	echo "usage: $0 [mini] [debian-6.1] [debian-6.12] [modules] [disk] [server] [testhost]   (no argument: all)"
}

# ---------------------------------------------------------------- arguments
TARGETS=()
for a in "$@"; do
	case "$a" in
	-h|--help) usage; exit 0 ;;
	mini|debian-6.1|debian-6.12|modules|disk|server|testhost) TARGETS+=("$a") ;;
	*) usage >&2; die "unknown target '$a'" ;;
	esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

# ---------------------------------------------------------------- packages
pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

APT_UPDATED=
ensure_packages() {
	local missing=() p
	for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
	[ ${#missing[@]} -gt 0 ] || return 0
	need_root "install ${missing[*]}"
	if [ -z "$APT_UPDATED" ]; then
		say "apt-get update"
		apt-get update -q >/dev/null || die "apt-get update failed"
		APT_UPDATED=1
	fi
	say "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
}

need_root() {
	[ "$(id -u)" = 0 ] || die "must run as root to $1"
}

COMMON_PKGS=(busybox-static cpio coreutils)
MINI_PKGS=(linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev lz4 xz-utils kmod)
DEBIAN_PKGS=(xz-utils zstd kmod debian-archive-keyring)
DISK_PKGS=(e2fsprogs)

# ---------------------------------------------------------------- keys
# Everything that shapes the initramfs/rootfs contents, not the kernels.
userspace_key() {
	{
		cat "$RES/build-kernels.sh" "$RES"/initramfs/* "$RES"/rootfs/* "$RES"/vmm-scripts/*
		dpkg-query -W -f='${Version}' busybox-static
		cat "$CACHE/busybox-i386.pin" 2>/dev/null || true
	} | sha
}

mini_src_version() { dpkg-query -W -f='${Version}' linux-source-6.1; }
mini_kernel_key() {
	{ cat "$RES/mini.config"; mini_src_version; echo "recipe=$MINI_RECIPE"; } | sha
}

# Is <dir> an entry built with stamp <key>?
up_to_date() { [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]; }

# Replace directory $2 by staged directory $1 atomically enough.
publish_dir() {
	local tmp=$1 dst=$2
	rm -rf "$dst.old"
	[ ! -e "$dst" ] || mv "$dst" "$dst.old"
	mv "$tmp" "$dst"
	rm -rf "$dst.old"
}

# ---------------------------------------------------------------- userspace
DEBIAN_61_GLOB='linux-image-6\.1\.[0-9]+-[0-9]+-amd64'
BOOKWORM_SOURCES=(
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main"
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main"
)
DEBIAN_612_GLOB='linux-image-6\.12\.[0-9]+\+deb13-amd64'
TRIXIE_SOURCES=(
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-updates main"
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main"
)

# Debian's i386 busybox-static, for a 32-bit user space that enters the
# kernel by int $0x80 (initrd32.img + vdso32=0). Fetched once through a
# private i386 apt configuration, pinned in $CACHE/busybox-i386.pin.
BUSYBOX32=
ensure_busybox32() {
	local pin ver dir deb log
	pin=$(cat "$CACHE/busybox-i386.pin" 2>/dev/null || true)
	if [ -n "$pin" ] && [ -z "${VMM_REFRESH:-}" ] && [ -x "$CACHE/busybox-i386/${pin//:/_}/busybox" ]; then
		BUSYBOX32=$CACHE/busybox-i386/${pin//:/_}/busybox
		return
	fi
	need_root "download the i386 busybox-static"
	# busybox-static is not in bookworm-security; bookworm main has the
	# point-release version.
	APT_ARCH=i386 apt_setup bookworm-i386 "${BOOKWORM_SOURCES[0]}"
	log=$CACHE/logs/apt-bookworm-i386.log
	say "busybox32: apt-get update (private config, bookworm main i386)"
	apt-get "${APT_OPTS[@]}" -q update >"$log" 2>&1 ||
		{ tail -5 "$log" >&2; die "apt-get update for i386 busybox-static failed (private config $CACHE/apt/bookworm-i386)"; }
	ver=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions busybox-static 2>/dev/null | sed -n 's/^Version: //p' | head -1)
	[ -n "$ver" ] || die "no i386 busybox-static in bookworm"
	dir=$CACHE/busybox-i386/${ver//:/_}
	if [ ! -x "$dir/busybox" ]; then
		say "busybox32: apt-get download busybox-static:i386=$ver"
		rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/x"
		(cd "$dir.tmp" && apt-get "${APT_OPTS[@]}" -q download "busybox-static=$ver" >>"$log" 2>&1) ||
			{ tail -5 "$log" >&2; die "apt-get download busybox-static:i386=$ver failed"; }
		deb=$(ls "$dir.tmp"/busybox-static_*_i386.deb 2>/dev/null | head -1 || true)
		[ -n "$deb" ] || die "apt-get download busybox-static:i386 produced no i386 .deb"
		dpkg-deb -x "$deb" "$dir.tmp/x" || die "dpkg-deb -x $deb failed"
		cp "$dir.tmp/x/bin/busybox" "$dir.tmp/busybox"
		rm -rf "$dir.tmp/x" "$dir"
		mv "$dir.tmp" "$dir"
	fi
	echo "$ver" >"$CACHE/busybox-i386.pin"
	BUSYBOX32=$dir/busybox
}

# /bin32: the i386 busybox with one symlink per applet, all in one directory.
install_busybox32() {
	local root=$1 l
	mkdir -p "$root/bin32"
	cp "$BUSYBOX32" "$root/bin32/busybox"
	for l in $(/bin/busybox --list); do
		case "$l" in busybox|linuxrc) continue ;; esac
		ln -s busybox "$root/bin32/$l"
	done
}

# install_busybox <root> [<binary>]: busybox (default: the host's amd64 one)
# as /bin/busybox with its applet links.
install_busybox() {
	local root=$1 bin=${2:-/bin/busybox} l
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
	cp "$bin" "$root/bin/busybox"
	for l in $(/bin/busybox --list-full); do
		case "$l" in bin/busybox|linuxrc) continue ;; esac
		[ -e "$root/$l" ] || [ -L "$root/$l" ] || ln -s /bin/busybox "$root/$l"
	done
}

install_common_files() {
	local root=$1
	mkdir -p "$root"/{dev,proc,sys,tmp,run,root,mnt,etc/vmm}
	chmod 1777 "$root/tmp"
	chmod 700 "$root/root"
	mknod -m 600 "$root/dev/console" c 5 1
	mknod -m 666 "$root/dev/null" c 1 3
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
	printf 'export PS1='\''\\h:\\w# '\''\nexport PATH=${VMM_PATH:-/bin:/sbin:/usr/bin:/usr/sbin}\n' >"$root/etc/profile"
	cp "$RES"/vmm-scripts/* "$root/etc/vmm/"
}

# Build an uncompressed newc cpio from directory $1 into file $2.
make_cpio() {
	local dir=$1 out=$2
	find "$dir" -exec touch -h -d @0 {} +
	(cd "$dir" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) >"$out.tmp"
	mv "$out.tmp" "$out"
}

# make_initramfs <out-file> <busybox-binary> [<module-dir>]: module-dir holds
# <name>.ko files and an "order" file listing them.
make_initramfs() {
	local out=$1 busybox=$2 moddir=${3:-} stage
	stage=$(mktemp -d "$CACHE/tmp/initramfs.XXXXXX")
	install_busybox "$stage" "$busybox"
	install_common_files "$stage"
	mkdir -p "$stage/newroot" "$stage/lib/modules"
	cp "$RES/initramfs/init" "$stage/init"
	chmod 755 "$stage/init"
	if [ -n "$moddir" ]; then
		cp "$moddir"/*.ko "$stage/lib/modules/"
		cp "$moddir/order" "$stage/etc/modules"
	fi
	make_cpio "$stage" "$out"
	rm -rf "$stage"
}

# ---------------------------------------------------------------- mini
mini_source_tree() {
	local ver src tmp
	ver=$(mini_src_version)
	src=$CACHE/src/linux-source-6.1_$ver
	if [ ! -f "$src/Makefile" ]; then
		say "mini: unpacking /usr/src/linux-source-6.1.tar.xz ($ver)" >&2
		[ -f /usr/src/linux-source-6.1.tar.xz ] || die "/usr/src/linux-source-6.1.tar.xz missing (package linux-source-6.1)"
		tmp=$(mktemp -d "$CACHE/src/.unpack.XXXXXX")
		tar -xf /usr/src/linux-source-6.1.tar.xz -C "$tmp" || die "cannot unpack linux-source-6.1.tar.xz"
		rm -rf "$src"
		mv "$tmp/linux-source-6.1" "$src"
		rmdir "$tmp"
	fi
	echo "$src"
}

# Check every line of the fragment against the final .config.
verify_config() {
	local frag=$1 cfg=$2 line sym want bad=()
	while IFS= read -r line; do
		case "$line" in
		CONFIG_*=*) sym=${line%%=*}; want=$line ;;
		"# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}; want= ;;
		*) continue ;;
		esac
		if [ -n "$want" ]; then
			grep -qxF -- "$want" "$cfg" || bad+=("$want (got: $(grep -E "^(# )?$sym[= ]" "$cfg" || echo unset))")
		else
			! grep -q "^$sym=" "$cfg" || bad+=("$sym off (got: $(grep "^$sym=" "$cfg"))")
		fi
	done <"$frag"
	if [ ${#bad[@]} -gt 0 ]; then
		printf '    %s\n' "${bad[@]}" >&2
		die "mini: ${#bad[@]} option(s) of resources/mini.config did not survive olddefconfig: ${bad[*]%% *}"
	fi
}

build_mini_kernel() {
	local key=$1 out src obj log t0 release
	out=$CACHE/kernels/mini-$key
	[ -f "$out/.done" ] && { echo "$out"; return; }
	src=$(mini_source_tree)
	obj=$CACHE/obj/mini-$key
	log=$CACHE/logs/mini-$key.log
	mkdir -p "$CACHE/logs"
	rm -rf "$CACHE"/obj/mini-* && mkdir -p "$obj"
	local mk=(make -C "$src" O="$obj" ARCH=x86_64 LOCALVERSION=
		KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=vmm-guest
		"KBUILD_BUILD_TIMESTAMP=$(date -u -d @0)")
	say "mini: configuring (tinyconfig + resources/mini.config) in $obj" >&2
	{
		"${mk[@]}" tinyconfig &&
			(cd "$src" && scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$RES/mini.config") &&
			"${mk[@]}" olddefconfig
	} >"$log" 2>&1 || { tail -20 "$log" >&2; die "mini: configuration failed, see $log"; }
	verify_config "$RES/mini.config" "$obj/.config"
	say "mini: all $(grep -c '^CONFIG_\|^# CONFIG_' "$RES/mini.config") options of resources/mini.config verified in .config" >&2
	say "mini: building bzImage with -j$JOBS (several minutes; log: $log)" >&2
	t0=$SECONDS
	"${mk[@]}" -j"$JOBS" bzImage >>"$log" 2>&1 || { tail -30 "$log" >&2; die "mini: kernel build failed, see $log"; }
	release=$("${mk[@]}" -s kernelrelease 2>/dev/null | tail -1)
	say "mini: built $release in $((SECONDS - t0))s" >&2
	rm -rf "$out.tmp" && mkdir -p "$out.tmp"
	cp "$obj/arch/x86/boot/bzImage" "$obj/vmlinux" "$obj/System.map" "$out.tmp/"
	cp "$obj/.config" "$out.tmp/config"
	echo "$release" >"$out.tmp/release"
	echo "built in $((SECONDS - t0))s on $(date -u +%F)" >"$out.tmp/.done"
	rm -rf "$out" && mv "$out.tmp" "$out"
	rm -rf "$obj"
	echo "$out"
}

target_mini() {
	local kkey key dst kdir tmp
	ensure_packages "${COMMON_PKGS[@]}" "${MINI_PKGS[@]}"
	ensure_busybox32
	kkey=$(mini_kernel_key)
	key=$kkey-$(userspace_key)
	dst=$KERNEL_DIR/mini
	if up_to_date "$dst" "$key"; then say "mini: up to date ($dst)"; return; fi
	need_root "build the mini kernel and its initramfs"
	kdir=$(build_mini_kernel "$kkey")
	say "mini: kernel $(cat "$kdir/release") from cache $kdir"
	tmp=$KERNEL_DIR/.mini.tmp.$$
	rm -rf "$tmp" && mkdir -p "$tmp"
	cp "$kdir"/{bzImage,vmlinux,System.map,config,release} "$tmp/"
	echo "$MINI_CMDLINE" >"$tmp/cmdline"
	say "mini: building initrd.img and initrd32.img"
	make_initramfs "$tmp/initrd.img" /bin/busybox
	make_initramfs "$tmp/initrd32.img" "$BUSYBOX32"
	echo "$key" >"$tmp/.stamp"
	publish_dir "$tmp" "$dst"
	say "mini: done: $dst"
}

# ---------------------------------------------------------------- debian
# Private apt configuration for suite set $1 (never touches the host's sources).
APT_OPTS=()
apt_setup() {
	local name=$1 dir; shift
	dir=$CACHE/apt/$name
	mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/cache"
	printf '%s\n' "$@" >"$dir/sources.list"
	APT_OPTS=(${APT_ARCH:+-o APT::Architecture=$APT_ARCH -o APT::Architectures=$APT_ARCH}
		-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
		-o "Dir::Cache::Archives=$dir/archives" -o Dir::Etc::Preferences=/dev/null
		-o Dir::Etc::PreferencesParts=/dev/null -o APT::Get::List-Cleanup=0 -o Acquire::Retries=3)
}

# debian_pin <entry> <apt-name> <image-glob> <sources.list lines...>: the
# "package=version" an entry uses (pinned in $CACHE/debian/<entry>.pin; the
# first run, or VMM_REFRESH=1, resolves the newest through a private apt
# configuration).
debian_pin() {
	local entry=$1 aptname=$2 glob=$3; shift 3
	local APT_ARCH= pinf pin= pkg ver
	pinf=$CACHE/debian/$entry.pin
	[ -n "${VMM_REFRESH:-}" ] || pin=$(cat "$pinf" 2>/dev/null || true)
	if [ -z "$pin" ]; then
		need_root "resolve Debian kernel packages"
		apt_setup "$aptname" "$@"
		say "$entry: apt-get update (private config, $(sed -n 's/.* \([a-z-]*\) main$/\1/p' "$CACHE/apt/$aptname/sources.list" | tr '\n' ' '))" >&2
		apt-get "${APT_OPTS[@]}" -q update >"$CACHE/logs/apt-$aptname.log" 2>&1 ||
			{ tail -5 "$CACHE/logs/apt-$aptname.log" >&2; die "$entry: apt-get update failed (private config $CACHE/apt/$aptname)"; }
		# linux-image-amd64 depends on the newest generic image package.
		pkg=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions linux-image-amd64 2>/dev/null |
			sed -n 's/^Depends: //p' | tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep -E "^$glob\$" | head -1 || true)
		[ -n "$pkg" ] || die "$entry: no package matching $glob in linux-image-amd64's dependencies"
		ver=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$pkg" | sed -n 's/^Version: //p' | head -1)
		pin="$pkg=$ver"
		say "$entry: resolved $pin" >&2
	fi
	echo "$pin"
}

# debian_deb <entry> <apt-name> <pin> <sources.list lines...>: the path of
# the pinned package's .deb in $CACHE/debian/dl (downloaded once).
debian_deb() {
	local entry=$1 aptname=$2 pin=$3; shift 3
	local APT_ARCH= pkg=${pin%%=*} ver=${pin#*=} deb
	deb=$(ls "$CACHE/debian/dl/${pkg}_"*.deb 2>/dev/null | grep -F "_${ver//:/%3a}_" | head -1 || true)
	if [ -z "$deb" ]; then
		need_root "download Debian kernel packages"
		apt_setup "$aptname" "$@"
		say "$entry: apt-get download $pkg=$ver" >&2
		mkdir -p "$CACHE/debian/dl"
		if [ ! -f "$CACHE/apt/$aptname/lists/lock" ] || ! apt-cache "${APT_OPTS[@]}" show "$pkg=$ver" >/dev/null 2>&1; then
			apt-get "${APT_OPTS[@]}" -q update >"$CACHE/logs/apt-$aptname.log" 2>&1 || die "$entry: apt-get update failed"
		fi
		(cd "$CACHE/debian/dl" && apt-get "${APT_OPTS[@]}" -q download "$pkg=$ver" >"$CACHE/logs/apt-$aptname-download.log" 2>&1) ||
			{ tail -5 "$CACHE/logs/apt-$aptname-download.log" >&2; die "$entry: apt-get download $pkg=$ver failed"; }
		deb=$(ls "$CACHE/debian/dl/${pkg}_"*.deb | grep -F "_${ver//:/%3a}_" | head -1)
	fi
	echo "$deb"
}

# target_debian <entry> <apt-name> <image-glob> <sources.list lines...>
target_debian() {
	local entry=$1 aptname=$2 glob=$3; shift 3
	local dst pin key
	dst=$KERNEL_DIR/$entry
	ensure_packages "${COMMON_PKGS[@]}" "${DEBIAN_PKGS[@]}"
	ensure_busybox32
	mkdir -p "$CACHE/debian" 2>/dev/null || true
	pin=$(debian_pin "$entry" "$aptname" "$glob" "$@")
	key=$(echo "$pin" | sha)-$(userspace_key)
	if up_to_date "$dst" "$key"; then say "$entry: up to date ($pin, $dst)"; return; fi
	need_root "unpack Debian kernels"

	local pkg=${pin%%=*} ver=${pin#*=} deb
	local kdir=$CACHE/debian/${pkg}_$ver
	if [ ! -f "$kdir/.done" ]; then
		deb=$(debian_deb "$entry" "$aptname" "$pin" "$@")
		say "$entry: unpacking $(basename "$deb")"
		unpack_debian_kernel "$entry" "$deb" "$kdir"
	fi
	echo "$pin" >"$CACHE/debian/$entry.pin"

	local release tmp
	release=$(cat "$kdir/release")
	tmp=$KERNEL_DIR/.$entry.tmp.$$
	rm -rf "$tmp" && mkdir -p "$tmp"
	cp "$kdir/vmlinuz" "$tmp/bzImage"
	# The uncompressed ELF too (it has the PVH entry note): under a software
	# KVM the bzImage's own XZ/ZSTD decompressor runs emulated for minutes,
	# a PVH boot of the vmlinux skips it.
	if [ ! -s "$kdir/vmlinux" ]; then
		local extract
		extract="$(mini_source_tree)/scripts/extract-vmlinux"
		say "$entry: extracting vmlinux from the bzImage"
		"$extract" "$kdir/vmlinuz" >"$kdir/vmlinux.tmp" 2>/dev/null && mv "$kdir/vmlinux.tmp" "$kdir/vmlinux" ||
			{ rm -f "$kdir/vmlinux.tmp"; say "$entry: could not extract vmlinux (bzImage only)"; }
	fi
	[ -s "$kdir/vmlinux" ] && cp "$kdir/vmlinux" "$tmp/vmlinux"
	cp "$kdir/config" "$kdir/System.map" "$tmp/" 2>/dev/null || true
	echo "$release" >"$tmp/release"
	echo "$DEBIAN_CMDLINE" >"$tmp/cmdline"
	echo "$pin" >"$tmp/package"
	say "$entry: building initramfs with modules: $(tr '\n' ' ' <"$kdir/modules/order")"
	make_initramfs "$tmp/initrd.img" /bin/busybox "$kdir/modules"
	make_initramfs "$tmp/initrd32.img" "$BUSYBOX32" "$kdir/modules"
	echo "$key" >"$tmp/.stamp"
	publish_dir "$tmp" "$dst"
	say "$entry: done: $dst ($release)"
}

# unpack_debian_kernel <entry> <deb> <dir>: keep vmlinuz, config, System.map
# and the initramfs modules (decompressed, with their dependencies).
unpack_debian_kernel() {
	local entry=$1 deb=$2 dir=$3 x vmlinuz release moddir
	x=$(mktemp -d "$CACHE/tmp/deb.XXXXXX")
	dpkg-deb -x "$deb" "$x" || die "$entry: dpkg-deb -x $deb failed"
	vmlinuz=$(ls "$x"/boot/vmlinuz-* 2>/dev/null | head -1 || true)
	[ -n "$vmlinuz" ] || die "$entry: $(basename "$deb") has no /boot/vmlinuz-*"
	release=${vmlinuz##*/vmlinuz-}
	moddir=
	for d in "$x/lib/modules/$release" "$x/usr/lib/modules/$release"; do
		[ -f "$d/modules.dep" ] && moddir=$d
	done
	if [ -z "$moddir" ]; then
		# Packages ship modules.dep only if built; generate it.
		for d in "$x/lib/modules/$release" "$x/usr/lib/modules/$release"; do
			[ -d "$d" ] && moddir=$d
		done
		[ -n "$moddir" ] || die "$entry: $(basename "$deb") has no modules for $release"
		depmod -b "${moddir%/lib/modules/*}" "$release" || die "$entry: depmod failed"
	fi
	rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/modules"
	cp "$vmlinuz" "$dir.tmp/vmlinuz"
	cp "$x/boot/config-$release" "$dir.tmp/config" 2>/dev/null || true
	# Debian ships a stub System.map (the real one is in the -dbg package).
	if [ "$(stat -c %s "$x/boot/System.map-$release" 2>/dev/null || echo 0)" -gt 4096 ]; then
		cp "$x/boot/System.map-$release" "$dir.tmp/System.map"
	fi
	echo "$release" >"$dir.tmp/release"
	resolve_modules "$moddir" "${DEBIAN_MODULES[@]}" >"$dir.tmp/modlist"
	local name path
	: >"$dir.tmp/modules/order"
	while read -r name path; do
		case "$path" in
		builtin) echo "    $name: built in" >&2; continue ;;
		missing) echo "    $name: not in this kernel, skipped" >&2; continue ;;
		*.ko) cp "$moddir/$path" "$dir.tmp/modules/$name.ko" ;;
		*.ko.xz) xz -dc "$moddir/$path" >"$dir.tmp/modules/$name.ko" ;;
		*.ko.zst) zstd -qdc "$moddir/$path" >"$dir.tmp/modules/$name.ko" ;;
		*.ko.gz) gzip -dc "$moddir/$path" >"$dir.tmp/modules/$name.ko" ;;
		*) die "$entry: unexpected module file $path" ;;
		esac
		echo "$name" >>"$dir.tmp/modules/order"
	done <"$dir.tmp/modlist"
	touch "$dir.tmp/.done"
	rm -rf "$dir" && mv "$dir.tmp" "$dir"
	rm -rf "$x"
}

# resolve_modules <moddir> <names...>: print "name path" in load order
# (dependencies first); path is "builtin" or "missing" when not a module.
resolve_modules() {
	local moddir=$1; shift
	awk -v want="$*" -v builtin="$moddir/modules.builtin" '
	function norm(p,  n) { n = p; sub(/.*\//, "", n); sub(/\.ko(\.(xz|zst|gz))?$/, "", n); gsub(/-/, "_", n); return n }
	function visit(n,  a, k, i) {
		if (n in seen) return
		seen[n] = 1
		if (!(n in path)) { print n, ((n in bi) ? "builtin" : "missing"); return }
		k = split(deps[n], a, " ")
		for (i = k; i >= 1; i--) visit(a[i])
		print n, path[n]
	}
	BEGIN { while ((getline l < builtin) > 0) bi[norm(l)] = 1 }
	{ p = $1; sub(/:$/, "", p); n = norm(p); path[n] = p; d = ""
	  for (i = 2; i <= NF; i++) d = d " " norm($i); deps[n] = d }
	END { k = split(want, w, " "); for (i = 1; i <= k; i++) { x = w[i]; gsub(/-/, "_", x); visit(x) } }
	' "$moddir/modules.dep"
}

# ---------------------------------------------------------------- disk
target_disk() {
	local dst key stage
	dst=$DISK_DIR/rootfs.ext4
	ensure_packages "${COMMON_PKGS[@]}" "${DISK_PKGS[@]}"
	ensure_busybox32
	key=$({ userspace_key; echo "$DISK_UUID $DISK_SIZE"; dpkg-query -W -f='${Version}' e2fsprogs; } | sha)
	if [ -f "$dst" ] && [ "$(cat "$dst.stamp" 2>/dev/null)" = "$key" ]; then
		say "disk: up to date ($dst)"; return
	fi
	need_root "build the root file system image"
	say "disk: building $dst ($DISK_SIZE ext4, UUID $DISK_UUID)"
	stage=$(mktemp -d "$CACHE/tmp/rootfs.XXXXXX")
	install_busybox "$stage"
	install_busybox32 "$stage"
	install_common_files "$stage"
	rm -f "$stage/sbin/init"
	cp "$RES/rootfs/init" "$stage/sbin/init"
	cp "$RES/rootfs/init32" "$stage/sbin/init32"
	chmod 755 "$stage/sbin/init" "$stage/sbin/init32"
	find "$stage" -exec touch -h -d @0 {} +
	mkdir -p "$DISK_DIR"
	rm -f "$dst.tmp"
	truncate -s "$DISK_SIZE" "$dst.tmp"
	E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -t ext4 -L vmm-root -U "$DISK_UUID" \
		-E "root_owner=0:0,hash_seed=$DISK_UUID" -d "$stage" "$dst.tmp" ||
		die "disk: mkfs.ext4 failed"
	# mkfs copies ctime/atime from the staging tree: pin them for a
	# byte-reproducible image.
	(cd "$stage" && find . | sed 's|^\.||; s|^$|/|' | LC_ALL=C sort; echo /lost+found) |
		awk '{ for (f = 1; f <= 4; f++) print "sif \"" $0 "\" " substr("atimectimemtimecrtime", (f-1)*5+1, f==4?6:5) " 0" }' |
		E2FSPROGS_FAKE_TIME=1 debugfs -w -f - "$dst.tmp" >/dev/null 2>&1 || die "disk: debugfs (pinning timestamps) failed"
	mv "$dst.tmp" "$dst"
	echo "$key" >"$dst.stamp"
	rm -rf "$stage"
	say "disk: done: $dst"
}

# ---------------------------------------------------------------- modules
# One read-only ext4 with every Debian entry's modules tree at /<release>/:
# the VMM attaches <library>/modules.img to each guest (serial vmm-modules)
# and the initramfs mounts the booted kernel's tree on the guest's
# /lib/modules/<release>, so `modprobe` works in a customer's system and
# switching kernels (set-kernel) never leaves it without its modules.
target_modules() {
	local dst=$KERNEL_DIR/modules.img key pins=() e entry pin deb x moddir stage rel mib
	for e in "$KERNEL_DIR"/*/package; do
		[ -f "$e" ] || continue
		pins+=("$(basename "$(dirname "$e")") $(cat "$e")")
	done
	[ ${#pins[@]} -gt 0 ] || { say "modules: no Debian entries built yet, skipped"; return; }
	key=$(printf '%s\n' "${pins[@]}" "recipe 1" | sha)
	if [ -f "$dst" ] && [ "$(cat "$dst.stamp" 2>/dev/null)" = "$key" ]; then
		say "modules: up to date ($dst)"; return
	fi
	need_root "build the modules image"
	ensure_packages e2fsprogs kmod
	stage=$(mktemp -d "$CACHE/tmp/modules.XXXXXX")
	for e in "${pins[@]}"; do
		entry=${e%% *} pin=${e#* }
		deb=$(ls "$CACHE/debian/dl/${pin%%=*}_"*.deb 2>/dev/null | grep -F "_$(echo "${pin#*=}" | sed 's/:/%3a/g')_" | head -1 || true)
		[ -n "$deb" ] || die "modules: $entry: $pin is not in $CACHE/debian/dl (run resources/build-kernels.sh $entry)"
		x=$(mktemp -d "$CACHE/tmp/deb.XXXXXX")
		dpkg-deb -x "$deb" "$x" || die "modules: dpkg-deb -x $deb failed"
		rel=$(cat "$KERNEL_DIR/$entry/release")
		moddir=
		for d in "$x/lib/modules/$rel" "$x/usr/lib/modules/$rel"; do [ -d "$d" ] && moddir=$d; done
		[ -n "$moddir" ] || die "modules: $entry: $(basename "$deb") has no modules for $rel"
		[ -f "$moddir/modules.dep" ] || depmod -b "${moddir%/lib/modules/*}" "$rel" || die "modules: depmod $rel failed"
		mv "$moddir" "$stage/$rel"
		rm -rf "$x"
		say "modules: $entry ($rel): $(du -sh "$stage/$rel" | cut -f1)"
	done
	mib=$(( $(du -sm "$stage" | cut -f1) * 115 / 100 + 64 ))
	rm -f "$dst.tmp"
	truncate -s "${mib}M" "$dst.tmp"
	mkfs.ext4 -q -F -t ext4 -L vmm-modules -E root_owner=0:0 -d "$stage" "$dst.tmp" ||
		die "modules: mkfs.ext4 failed"
	mv "$dst.tmp" "$dst"
	echo "$key" >"$dst.stamp"
	rm -rf "$stage"
	say "modules: done: $dst (${mib} MiB)"
}

# ---------------------------------------------------------------- server
# The Debian server image the tests boot (hostname web1, root's key the
# tests' own): resources/build-image.sh, rebuilt when its inputs change.
target_server() {
	local dst keydir key
	dst=$DISK_DIR/debian-server.ext4
	keydir=$(dirname "$KERNEL_DIR")/keys
	mkdir -p "$keydir" "$DISK_DIR"
	if [ ! -f "$keydir/test_ed25519" ]; then
		ensure_packages openssh-client
		ssh-keygen -q -t ed25519 -N '' -C vmm-tests -f "$keydir/test_ed25519" || die "server: ssh-keygen failed"
	fi
	key=$(cat "$RES/build-image.sh" "$keydir/test_ed25519.pub" | sha)
	if [ -f "$dst" ] && [ "$(cat "$dst.stamp" 2>/dev/null)" = "$key" ]; then
		say "server: up to date ($dst)"; return
	fi
	need_root "build the Debian server image"
	"$RES/build-image.sh" --out "$dst" --hostname web1 --authorized-keys "$keydir/test_ed25519.pub" ||
		die "server: resources/build-image.sh failed"
	echo "$key" >"$dst.stamp"
}

# ---------------------------------------------------------------- testhost
# shellcheck source=testhost/build.sh
. "$RES/testhost/build.sh"

# ---------------------------------------------------------------- main
run_targets() {
	local t
	for t in "${TARGETS[@]}"; do
		case "$t" in
		mini) target_mini ;;
		disk) target_disk ;;
		modules) target_modules ;;
		server) target_server ;;
		debian-6.1) target_debian debian-6.1 bookworm "$DEBIAN_61_GLOB" "${BOOKWORM_SOURCES[@]}" ;;
		testhost) target_testhost ;;
		debian-6.12) target_debian debian-6.12 trixie "$DEBIAN_612_GLOB" "${TRIXIE_SOURCES[@]}" ;;
		esac
	done
}

if [ -w "$CACHE" ] || { [ ! -e "$CACHE" ] && [ "$(id -u)" = 0 ]; }; then
	mkdir -p "$CACHE/tmp" "$CACHE/logs" "$CACHE/src" "$CACHE/kernels" "$CACHE/debian"
	mkdir -p "$KERNEL_DIR" || die "cannot create $KERNEL_DIR"
	# One builder at a time per cache (parallel test runs may all call us).
	exec 9>"$CACHE/.lock"
	if ! flock -n 9; then
		say "waiting for another build-kernels.sh (lock $CACHE/.lock)"
		flock 9
	fi
fi
run_targets
