#!/usr/bin/env bash
# Builds (once, then cached) what a test VM boots: Debian's kernel and an
# initramfs with busybox, the modules for nbd, ext4 and e1000, e2fsprogs, and
# with --bench also fio, nbd-client and nbdkit (file plugin).
#
# The kernel and its modules come from the linux-image-amd64 package
# (apt-get download, dpkg-deb -x); the tools are the host's Debian binaries
# with the libraries ldd names. The cache is keyed by the kernel package
# version, this script's and init's contents and the tool package versions,
# so an upgrade of any of them builds a new image.
#
# Usage: scripts/vm/initrd.sh [--bench]
# Prints the cache directory, which holds vmlinuz and initrd.gz.
# Cache root: $MIRRORD_VM_CACHE, else ${XDG_CACHE_HOME:-/var/cache}/mirrord-vm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
flavour=base
[ "${1:-}" = --bench ] && flavour=bench

# Modules in load order: ext4 needs crc16, crc32c, mbcache and jbd2 first.
mods="lib/crc16 crypto/crc32c_generic fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4
drivers/block/nbd drivers/net/ethernet/intel/e1000/e1000"
tools="/usr/bin/busybox /sbin/mke2fs /sbin/e2fsck"
pkgs="busybox-static e2fsprogs"
if [ $flavour = bench ]; then
	tools="$tools /usr/bin/fio /usr/sbin/nbd-client /usr/bin/nbdkit
/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-file-plugin.so"
	pkgs="$pkgs fio nbd-client nbdkit"
fi
for t in $tools; do
	[ -e "$t" ] || { echo "initrd.sh: $t is missing (run scripts/deps.sh test)" >&2; exit 1; }
done

kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
kpkg=$(kernel_pkg)
# A fresh container often ships without package lists.
[ -n "$kpkg" ] || { apt-get update -qq >/dev/null 2>&1 && kpkg=$(kernel_pkg); }
[ -n "$kpkg" ] || { echo "initrd.sh: apt-cache knows no linux-image-amd64 (apt-get update?)" >&2; exit 1; }
kver=${kpkg#linux-image-}
kpkgver=$(apt-cache policy "$kpkg" | awk '/Candidate:/{print $2}')
key=$( { echo "$kpkg $kpkgver $flavour"; cat "$0" "$here/init"; dpkg-query -W $pkgs; } | sha256sum | cut -c1-12)
root=${MIRRORD_VM_CACHE:-${XDG_CACHE_HOME:-/var/cache}/mirrord-vm}
out=$root/$kver-$flavour-$key
if [ -s "$out/initrd.gz" ]; then echo "$out"; exit 0; fi

mkdir -p "$root"
# Parallel tests may ask at once: one builds, the others wait for it.
exec 9>"$root/.lock"
flock 9
if [ -s "$out/initrd.gz" ]; then echo "$out"; exit 0; fi

w=$(mktemp -d "$root/.build.XXXXXX")
trap 'rm -rf "$w"' EXIT
(cd "$w" && apt-get download "$kpkg" >/dev/null 2>&1) ||
	{ echo "initrd.sh: apt-get download $kpkg failed" >&2; exit 1; }
dpkg-deb -x "$w"/"$kpkg"_*.deb "$w/k"
K=$w/k/lib/modules/$kver/kernel
r=$w/initrd
mkdir -p "$r"/{bin,sbin,proc,sys,dev,tmp,mnt,run,test,lib/modules,lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu/nbdkit/plugins}
: >"$r/lib/modules/order"
for m in $mods; do
	cp "$K/$m.ko" "$r/lib/modules/"
	basename "$m" >>"$r/lib/modules/order"
done
for t in $tools; do
	case $t in
	*.so) cp "$t" "$r$t" ;;
	*) cp "$t" "$r/bin/" ;;
	esac
done
ln -s mke2fs "$r/bin/mkfs.ext4"
# Every dynamic library the tools name, and the loader.
for l in $(ldd $tools 2>/dev/null | awk '/=> \//{print $3}' | sort -u); do
	cp -L "$l" "$r/lib/x86_64-linux-gnu/"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$r/lib64/"
cp "$here/init" "$r/init"
chmod +x "$r/init"
(cd "$r" && find . | cpio -o -H newc --quiet | gzip -1) >"$w/initrd.gz"
mkdir -p "$w/out"
mv "$w/initrd.gz" "$w/out/"
cp "$w/k/boot/vmlinuz-$kver" "$w/out/vmlinuz"
mv "$w/out" "$out"
# Images of older kernels or scripts are not booted again.
for d in "$root"/*-"$flavour"-*; do
	[ "$d" = "$out" ] || rm -rf "$d"
done
echo "$out"
