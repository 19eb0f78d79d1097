# Sourced by resources/build-kernels.sh: the `testhost` target.
#
# The test host is Debian 12's own generic kernel (the package debian-6.1
# pins) booted by QEMU in software emulation (TCG, -cpu max: AMD SVM with
# nested paging), so that kvm_amd gives real hardware-virtualization
# semantics to the VMM running inside it. Output, in
# ${TESTHOST_DIR:-<repo>/build/testhost}:
#   vmlinuz      the kernel QEMU boots
#   initrd.img   busybox, the modules for virtio-pci, 9p and virtio-net,
#                /init (resources/testhost/init)
#   release      its `uname -r`
#   modules      the root of its whole module tree (ROOT/lib/modules/<release>,
#                unpacked in the cache, depmod run), for `modprobe -d ROOT`
#                inside
#   qemu         the root of the QEMU that boots it: bookworm-backports'
#                qemu-system-x86 (10.0), unpacked in the cache, never
#                installed; ROOT/usr/bin/qemu-system-x86_64 with
#                -L ROOT/usr/share/qemu -L ROOT/usr/share/seabios. Its TCG
#                runs a nested guest about twice as fast as bookworm's 7.2
#                (docs/notes.md); its libraries are those of bookworm's
#                qemu-system-x86, which scripts/host-deps.sh installs.
# See resources/README.md ("The test host").

TESTHOST_DIR=${TESTHOST_DIR:-$(dirname "$KERNEL_DIR")/testhost}
# Which of the library's Debian kernels the test host runs (its KVM).
TESTHOST_KERNEL=${TESTHOST_KERNEL:-debian-6.1}
# What the initramfs loads before it can reach the outer root; everything
# else is modprobe'd from the module tree over 9p.
TESTHOST_MODULES=(virtio_pci 9p 9pnet_virtio virtio_net)
TESTHOST_PKGS=(qemu-system-x86 qemu-utils)

# unpack_module_tree <deb> <dir>: vmlinuz, release and the whole module
# tree (root/lib/modules/<release>, with modules.dep) of a kernel package.
unpack_module_tree() {
	local deb=$1 dir=$2 x vmlinuz release mods
	x=$dir.tmp
	rm -rf "$x" && mkdir -p "$x/deb"
	dpkg-deb -x "$deb" "$x/deb" || die "testhost: dpkg-deb -x $deb failed"
	vmlinuz=$(ls "$x"/deb/boot/vmlinuz-* 2>/dev/null | head -1 || true)
	[ -n "$vmlinuz" ] || die "testhost: $(basename "$deb") has no /boot/vmlinuz-*"
	release=${vmlinuz##*/vmlinuz-}
	# Trixie's packages keep modules under /usr (merged /usr).
	mods=$x/deb/lib/modules/$release
	[ -d "$mods" ] || mods=$x/deb/usr/lib/modules/$release
	[ -d "$mods" ] || die "testhost: $(basename "$deb") has no modules for $release"
	mkdir -p "$x/root/lib/modules"
	mv "$mods" "$x/root/lib/modules/"
	depmod -b "$x/root" "$release" || die "testhost: depmod failed"
	mv "$vmlinuz" "$x/vmlinuz"
	echo "$release" >"$x/release"
	rm -rf "$x/deb"
	touch "$x/.done"
	rm -rf "$dir" && mv "$x" "$dir"
}

BACKPORTS_SOURCES=(
	"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
)
TESTHOST_QEMU_DEBS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

# testhost_qemu: prints the root of the unpacked backports QEMU (pinned in
# $CACHE/testhost/qemu.pin; VMM_REFRESH=1 looks again).
testhost_qemu() {
	local APT_ARCH= pinf pin= dir log p v ver
	pinf=$CACHE/testhost/qemu.pin
	mkdir -p "$CACHE/testhost"
	[ -n "${VMM_REFRESH:-}" ] || pin=$(cat "$pinf" 2>/dev/null || true)
	if [ -n "$pin" ] && [ -x "$CACHE/testhost/qemu-$pin/usr/bin/qemu-system-x86_64" ]; then
		echo "$CACHE/testhost/qemu-$pin"
		return
	fi
	need_root "download QEMU from bookworm-backports"
	apt_setup bookworm-backports "${BACKPORTS_SOURCES[@]}"
	log=$CACHE/logs/apt-bookworm-backports.log
	say "testhost: apt-get update (private config, bookworm-backports)" >&2
	apt-get "${APT_OPTS[@]}" -q update >"$log" 2>&1 ||
		{ tail -5 "$log" >&2; die "apt-get update for bookworm-backports failed (private config $CACHE/apt/bookworm-backports)"; }
	ver=$(apt-cache "${APT_OPTS[@]}" show qemu-system-x86 2>/dev/null | sed -n 's/^Version: //p' | grep bpo | head -1)
	[ -n "$ver" ] || die "testhost: no qemu-system-x86 in bookworm-backports"
	pin=${ver//[:~+]/_}
	dir=$CACHE/testhost/qemu-$pin
	rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/debs"
	say "testhost: apt-get download ${TESTHOST_QEMU_DEBS[*]} (bookworm-backports, qemu $ver)" >&2
	for p in "${TESTHOST_QEMU_DEBS[@]}"; do
		# The backports version of each (seabios too: QEMU 10 wants >= 1.16.3).
		v=$(apt-cache "${APT_OPTS[@]}" show "$p" 2>/dev/null | sed -n 's/^Version: //p' | grep bpo | head -1)
		[ -n "$v" ] || die "testhost: no $p in bookworm-backports"
		(cd "$dir.tmp/debs" && apt-get "${APT_OPTS[@]}" -q download "$p=$v" >>"$log" 2>&1) ||
			{ tail -5 "$log" >&2; die "testhost: apt-get download $p=$v failed"; }
	done
	for p in "$dir.tmp"/debs/*.deb; do
		dpkg-deb -x "$p" "$dir.tmp" || die "testhost: dpkg-deb -x $p failed"
	done
	rm -rf "$dir.tmp/debs"
	"$dir.tmp/usr/bin/qemu-system-x86_64" --version >/dev/null 2>"$log.run" ||
		{ cat "$log.run" >&2; die "testhost: the backports QEMU does not run here (missing libraries? scripts/host-deps.sh installs qemu-system-x86 for them)"; }
	rm -rf "$dir" && mv "$dir.tmp" "$dir"
	echo "$pin" >"$pinf"
	echo "$dir"
}

target_testhost() {
	local pin deb tree key dst tmp stage name path moddir qemu dist glob sources
	ensure_packages "${COMMON_PKGS[@]}" "${DEBIAN_PKGS[@]}" "${TESTHOST_PKGS[@]}"
	case $TESTHOST_KERNEL in
	debian-6.1) dist=bookworm glob=$DEBIAN_61_GLOB sources=("${BOOKWORM_SOURCES[@]}") ;;
	debian-6.12) dist=trixie glob=$DEBIAN_612_GLOB sources=("${TRIXIE_SOURCES[@]}") ;;
	*) die "testhost: TESTHOST_KERNEL=$TESTHOST_KERNEL: debian-6.1 or debian-6.12" ;;
	esac
	pin=$(debian_pin "$TESTHOST_KERNEL" "$dist" "$glob" "${sources[@]}")
	echo "$pin" >"$CACHE/debian/$TESTHOST_KERNEL.pin"
	qemu=$(testhost_qemu)
	key=$({ echo "$pin $qemu"; cat "$RES/build-kernels.sh" "$RES"/testhost/*; echo "${TESTHOST_MODULES[*]}";
		dpkg-query -W -f='${Version}' busybox-static; } | sha)
	dst=$TESTHOST_DIR
	if up_to_date "$dst" "$key"; then say "testhost: up to date ($pin, $dst)"; return; fi
	need_root "build the test host"
	tree=$CACHE/testhost/${pin//[=:]/_}-1
	if [ ! -f "$tree/.done" ]; then
		deb=$(debian_deb "$TESTHOST_KERNEL" "$dist" "$pin" "${sources[@]}")
		say "testhost: unpacking the whole module tree of $(basename "$deb")"
		mkdir -p "$CACHE/testhost"
		unpack_module_tree "$deb" "$tree"
	fi
	moddir=$tree/root/lib/modules/$(cat "$tree/release")
	tmp=$(dirname "$dst")/.testhost.tmp.$$
	rm -rf "$tmp" && mkdir -p "$tmp"
	cp "$tree/vmlinuz" "$tree/release" "$tmp/"
	echo "$tree/root" >"$tmp/modules"
	echo "$qemu" >"$tmp/qemu"
	say "testhost: building initrd.img ($(cat "$tree/release"); modules: ${TESTHOST_MODULES[*]} and what they need)"
	stage=$(mktemp -d "$CACHE/tmp/testhost.XXXXXX")
	install_busybox "$stage"
	mkdir -p "$stage"/{dev,proc,sys,tmp,host,lib/modules,etc}
	mknod -m 600 "$stage/dev/console" c 5 1
	mknod -m 666 "$stage/dev/null" c 1 3
	cp "$RES/testhost/init" "$stage/init"
	cp "$RES/testhost/modprobe-host" "$stage/sbin/modprobe-host"
	chmod 755 "$stage/init" "$stage/sbin/modprobe-host"
	: >"$stage/etc/modules"
	while read -r name path; do
		case "$path" in
		builtin) continue ;;
		missing) die "testhost: module $name is not in $(cat "$tree/release")" ;;
		*.ko) cp "$moddir/$path" "$stage/lib/modules/$name.ko" ;;
		*.ko.xz) xz -dc "$moddir/$path" >"$stage/lib/modules/$name.ko" ;;
		*.ko.zst) zstd -qdc "$moddir/$path" >"$stage/lib/modules/$name.ko" ;;
		*) die "testhost: unexpected module file $path" ;;
		esac
		echo "$name" >>"$stage/etc/modules"
	done < <(resolve_modules "$moddir" "${TESTHOST_MODULES[@]}")
	make_cpio "$stage" "$tmp/initrd.img"
	rm -rf "$stage"
	echo "$key" >"$tmp/.stamp"
	publish_dir "$tmp" "$dst"
	say "testhost: done: $dst"
}
