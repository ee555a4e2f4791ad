#!/usr/bin/env bash
# Installs the Debian packages a mirrord task needs, only when something is
# missing. Usage: scripts/deps.sh demo|test|bench
set -euo pipefail
declare -A pkg=(
	[nbdfuse]=libnbd-bin [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
	[fusermount3]=fuse3 [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [losetup]=mount
	[fio]=fio [nbdkit]=nbdkit [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
	[qemu-storage-daemon]=qemu-system-common [python3]=python3 [nft]=nftables [ip]=iproute2
	[etcd]=etcd-server
	[qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static [cpio]=cpio [nbd-client]=nbd-client
)
case "${1:-test}" in
demo) tools=(nbdfuse fusermount3 mkfs.ext4 e2fsck losetup) ;;
test) tools=(nbdfuse nbdinfo nbdcopy fusermount3 mkfs.ext4 e2fsck losetup fio nbdkit qemu-io qemu-nbd python3 etcd nft ip
	qemu-system-x86_64 busybox cpio nbd-client) ;;
bench) tools=(fio nbdkit qemu-nbd qemu-storage-daemon python3 qemu-system-x86_64 busybox cpio nbd-client) ;;
*) echo "usage: $0 demo|test|bench" >&2; exit 2 ;;
esac
command -v go >/dev/null || { echo "deps.sh: Go is required (https://go.dev/dl)" >&2; exit 1; }
missing=()
for t in "${tools[@]}"; do
	command -v "$t" >/dev/null 2>&1 || missing+=("${pkg[$t]}")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing: ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
# fuse needs its device node; in a container it may not be there yet.
[ -e /dev/fuse ] || mknod -m 666 /dev/fuse c 10 229 2>/dev/null || true
