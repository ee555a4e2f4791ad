#!/usr/bin/env bash
# Boots one test VM under QEMU TCG and runs a script in it as root.
#
# Usage: scripts/vm/run.sh [options] SCRIPT [FILE...]
#   -m MB        memory (default 512)
#   -c N         CPUs (default 1)
#   -t SECONDS   kill the VM after this long (default 300)
#   -i ADDR      the VM's eth0 address (default 10.0.2.15)
#   -n NETDEV    a QEMU -netdev argument (id is added); without it the VM
#                has user networking, where the host's loopback is 10.0.2.2
#   -b           boot the bench image (adds fio, nbd-client, nbdkit)
#   -p FILE      write qemu's pid to FILE (kill -9 it for a site loss)
#   -u           a second NIC (eth1) on user networking, 10.0.2.15, so a VM
#                on a -n segment still reaches the host at 10.0.2.2
#
# The NIC's MAC address ends in the address's last byte, so VMs joined on
# one segment (-n socket,listen=... / -n socket,connect=...) differ.
#
# SCRIPT runs as /test/script.sh; each FILE is copied into /test, which is
# on PATH (a static mirrord binary, say). The console streams to stdout;
# the script's lines are there verbatim, so a caller can put markers in
# them. The exit status is the script's, 124 on timeout, 125 when the VM
# died without reporting one (killed, say).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mem=512 cpus=1 limit=300 ip=10.0.2.15 netdev=user bench= pidfile= usernic=
while getopts m:c:t:i:n:bp:u o; do
	case $o in
	m) mem=$OPTARG ;; c) cpus=$OPTARG ;; t) limit=$OPTARG ;;
	i) ip=$OPTARG ;; n) netdev=$OPTARG ;; b) bench=--bench ;; p) pidfile=$OPTARG ;; u) usernic=1 ;;
	*) sed -n '2,25p' "$0" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n '2,25p' "$0" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "run.sh: qemu-system-x86_64 is missing (scripts/deps.sh test)" >&2; exit 1; }
img=$("$here/initrd.sh" $bench)

w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/r/test"
cp "$1" "$w/r/test/script.sh"
shift
for f in "$@"; do cp "$f" "$w/r/test/"; done
# The kernel unpacks concatenated archives in order: the cached image, then
# this run's files.
cp "$img/initrd.gz" "$w/initrd"
# cpio headers are 4-byte aligned from where an archive starts; zeros
# between archives are skipped, so pad to a 512-byte boundary.
truncate -s $((($(stat -c %s "$w/initrd") + 511) / 512 * 512)) "$w/initrd"
(cd "$w/r" && find . | cpio -o -H newc --quiet) >>"$w/initrd"

mac=$(printf '52:54:00:12:34:%02x' "${ip##*.}")
set +e
timeout --foreground "$limit" qemu-system-x86_64 -accel tcg -m "$mem" -smp "$cpus" \
	-display none -monitor none -serial stdio -no-reboot \
	-kernel "$img/vmlinuz" -initrd "$w/initrd" \
	-append "console=ttyS0 quiet panic=-1 mirrord.ip=$ip" \
	-netdev "$netdev,id=n0" -device e1000,netdev=n0,mac="$mac" ${pidfile:+-pidfile "$pidfile"} \
	${usernic:+-netdev user,id=n1 -device e1000,netdev=n1} </dev/null | tee "$w/console"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && { echo "run.sh: VM killed after ${limit}s" >&2; exit 124; }
status=$(tr -d '\r' <"$w/console" | awk '/^VM-EXIT /{print $2}' | tail -1)
[ -n "$status" ] || { echo "run.sh: the VM reported no exit status (qemu exit $rc)" >&2; exit 125; }
exit "$status"
