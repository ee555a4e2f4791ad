# Runs inside a test VM (scripts/vm/run.sh) with a static mirrord in /test.
# The volume as /dev/nbd0: ext4 made, written with fsync, checked; the
# device's cache flags; demotion refused while mounted; the ioctl interface.
# Lines starting with "MARK " and "STATUS " are read by the Go test.
set -u
fail() { echo "VM-FAIL $*"; cat /tmp/v/log* 2>/dev/null | tail -30; exit 1; }
mkdir -p /tmp/v
ctl=/tmp/v/ctl.sock
start() { # interface
	mirrord run --path /tmp/v/vol.img --size 128MiB --listen unix:/tmp/v/nbd.sock \
		--set volume.meta=/tmp/v/vol.meta --set control.socket=$ctl \
		--set nbd.device=/dev/nbd0 --set nbd.device-interface=$1 --set log.format=console >>/tmp/v/log.$1 2>&1 &
	pid=$!
	i=0
	until mirrord status --control $ctl >/dev/null 2>&1; do
		i=$((i + 1)); [ $i -lt 300 ] || fail "mirrord did not start"; sleep 0.1
	done
	mirrord promote --control $ctl >/dev/null || fail "promote"
	attached || fail "nbd0 not attached"
}
attached() { # waits up to 10 s for nbd0 to have a size
	i=0
	while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
		i=$((i + 1)); [ $i -lt 100 ] || return 1; sleep 0.1
	done
}
start netlink
echo "MARK write_cache $(cat /sys/block/nbd0/queue/write_cache | tr ' ' _)"
echo "MARK fua $(cat /sys/block/nbd0/queue/fua)"
echo "MARK backend $(cat /sys/block/nbd0/backend 2>/dev/null)"
mkfs.ext4 -q /dev/nbd0 || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail mount
n=0
while [ $n -lt 20 ]; do
	n=$((n + 1))
	dd if=/dev/urandom of=/mnt/f$n bs=64k count=4 conv=fsync 2>/dev/null || fail "write f$n"
	sha256sum /mnt/f$n >>/tmp/v/sums
done
echo "MARK written $n"
# Demotion must be refused while ext4 is mounted, and say why.
if mirrord demote --control $ctl >/tmp/v/demote.out 2>&1; then fail "demote succeeded while mounted"; fi
echo "MARK demote-refused $(grep -c 'mounted on /mnt' /tmp/v/demote.out)"
umount /mnt || fail umount
e2fsck -fn /dev/nbd0 >/tmp/v/fsck.out 2>&1 || { cat /tmp/v/fsck.out; fail "e2fsck"; }
echo "MARK fsck clean"
mount -t ext4 /dev/nbd0 /mnt || fail "mount again"
sha256sum -c /tmp/v/sums >/dev/null || fail "checksums"
echo "MARK sums ok"
umount /mnt
echo "STATUS $(mirrord status --json --control $ctl | tr -d ' \n')"
mirrord demote --control $ctl >/dev/null || fail "demote after umount"
echo "MARK demoted-size $(cat /sys/block/nbd0/size)"
kill -TERM $pid; wait $pid || fail "mirrord exit status $?"

# The same data through the ioctl interface.
start ioctl
echo "MARK ioctl-pid $([ -s /sys/block/nbd0/pid ] && echo yes)"
mount -t ext4 /dev/nbd0 /mnt || fail "mount over ioctl"
sha256sum -c /tmp/v/sums >/dev/null || fail "checksums over ioctl"
umount /mnt
kill -TERM $pid; wait $pid || fail "mirrord (ioctl) exit status $?"
echo "MARK ioctl-detached-size $(cat /sys/block/nbd0/size)"
echo "MARK io-errors $(dmesg | grep -c 'I/O error')"
