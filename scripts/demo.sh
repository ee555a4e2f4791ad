#!/usr/bin/env bash
# The main job on one host: a mirrored volume with a Primary ("alpha") and
# its synchronous target ("beta"), ext4 mounted on it through nbdfuse and a
# loop device, files written, status from both nodes, an online verify, and
# the two replicas shown byte-identical. Needs root; installs what it needs.
#
# Usage: scripts/demo.sh [--keep]   (--keep leaves the work dir for a look)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
keep=0
[ "${1:-}" = "--keep" ] && keep=1

"$here/deps.sh" demo

work=$(mktemp -d /tmp/mirrord-demo.XXXXXX)
pids=()
mnt=$work/mnt loopdev=""
cleanup() {
	set +e
	mountpoint -q "$mnt" && umount "$mnt"
	[ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
	mountpoint -q "$work/fuse" && fusermount3 -u "$work/fuse"
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
	[ "$keep" = 1 ] && echo "work dir kept: $work" || rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
waitfor() { # waitfor SECONDS CMD...: poll until CMD succeeds
	local deadline=$((SECONDS + $1)); shift
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $deadline ]; then
			echo "timed out: $*" >&2
			for l in "$work"/*.log; do echo "--- $l" >&2; tail -n 5 "$l" >&2; done
			return 1
		fi
		sleep 0.1
	done
}

say "building mirrord"
(cd "$repo" && go build -o "$work/mirrord" ./cmd/mirrord)
m=$work/mirrord
"$m" version

head -c 32 /dev/urandom | base64 > "$work/secret"
port_a=${DEMO_PEER_PORT:-7788}
port_b=$((port_a + 1))
for n in alpha beta; do
	if [ $n = alpha ]; then peer=beta listen=$port_a dial=$port_b; else peer=alpha listen=$port_b dial=$port_a; fi
	cat > "$work/$n.yaml" <<EOF
node: {name: $n}
volume: {name: vol0, path: $work/$n.img, size: 256MiB}
nbd: {listen: ["unix:$work/$n.sock"]}
control: {socket: $work/$n.ctl}
peer: {node: $peer, listen: 127.0.0.1:$listen, address: 127.0.0.1:$dial, secret-file: $work/secret, mode: sync}
log: {format: json}
EOF
done

say "starting two nodes: alpha and beta (sync mode, protocol C)"
for n in alpha beta; do
	"$m" run -c "$work/$n.yaml" 2>"$work/$n.log" &
	pids+=($!)
done
connected() { "$m" status --control "$work/$1.ctl" --json | grep -q '"replication": "Established"'; }
waitfor 20 connected alpha
waitfor 20 connected beta
"$m" promote --control "$work/alpha.ctl"

say "ext4 on the mirrored volume (nbdfuse + loop), files written"
mkdir -p "$work/fuse" "$mnt"
nbdfuse "$work/fuse/nbd" --unix "$work/alpha.sock" &
pids+=($!)
waitfor 20 test -s "$work/fuse/nbd"
loopdev=$(losetup -f --show "$work/fuse/nbd")
mkfs.ext4 -q "$loopdev"
mount "$loopdev" "$mnt"
for i in $(seq 1 20); do
	head -c $((i * 100 * 1024)) /dev/urandom > "$mnt/file$i.bin"
done
cp -r /usr/share/common-licenses "$mnt/" 2>/dev/null || true
(cd "$mnt" && sha256sum file*.bin > "$work/files.sha256")
sync
df -h "$mnt" | tail -1
ls "$mnt" | head -5

say "status on both nodes"
"$m" status --control "$work/alpha.ctl"
"$m" status --control "$work/beta.ctl"

say "unmount, fsck, and an online verify (digests only cross the link)"
umount "$mnt"
e2fsck -fn "$loopdev" >/dev/null && echo "e2fsck: clean"
losetup -d "$loopdev"; loopdev=""
fusermount3 -u "$work/fuse"
"$m" verify --control "$work/alpha.ctl"

say "the two replicas"
a=$(sha256sum < "$work/alpha.img" | cut -d' ' -f1)
b=$(sha256sum < "$work/beta.img" | cut -d' ' -f1)
echo "alpha.img sha256 $a"
echo "beta.img  sha256 $b"
[ "$a" = "$b" ] || { echo "REPLICAS DIFFER" >&2; exit 1; }
echo "REPLICAS IDENTICAL"
