# Runs inside a test VM (scripts/vm/run.sh) with a static mirrord in /test.
# The volume as /dev/nbd0: ext4 made, written with fsync, checked; the
# device's cache flags; demotion refused while mounted; the ioctl interface.
# Lines starting with "MARK " and "STATUS " are read by TestKernelDevice.
set -u
. /test/lib.sh
ctl=/tmp/v/ctl.sock
start() { # interface [run flags]
	iface=$1
	shift
	mirrord run "$@" --path /tmp/v/vol.img --size 128MiB --listen unix:/tmp/v/nbd.sock \
		--set volume.meta=/tmp/v/vol.meta --set control.socket=$ctl \
		--set nbd.device=${dev:-/dev/nbd0} --set nbd.device-interface=$iface 2>>/tmp/v/log.$iface &
	pid=$!
	running() { mirrord status --control $ctl >/dev/null 2>&1; }
	poll 300 running || fail "mirrord did not start"
	mirrord promote --control $ctl >/dev/null || fail "promote"
	poll 100 attached || fail "nbd0 not attached"
}
start netlink
echo "MARK write_cache $(tr ' ' _ </sys/block/nbd0/queue/write_cache)"
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
fsck_clean
sums_ok /tmp/v/sums
echo "STATUS $(status --control $ctl)"
mirrord demote --control $ctl >/dev/null || fail "demote after umount"
echo "MARK demoted-size $(cat /sys/block/nbd0/size)"
kill -TERM $pid
wait $pid || fail "mirrord exit status $?"

# The same data through the ioctl interface.
start ioctl
echo "MARK ioctl-pid $([ -s /sys/block/nbd0/pid ] && echo yes)"
sums_ok /tmp/v/sums
kill -TERM $pid
wait $pid || fail "mirrord (ioctl) exit status $?"
echo "MARK ioctl-detached-size $(cat /sys/block/nbd0/size)"

# --keep-device leaves even an unused device attached for the next mirrord.
start netlink --keep-device
kill -TERM $pid
wait $pid || fail "mirrord --keep-device exit status $?"
echo "MARK kept-size $(cat /sys/block/nbd0/size)"
# auto finds the device left connected to this volume (its backend name).
dev=auto start netlink
echo "MARK kept-reattached $(status --control $ctl | grep -o '"path":"[a-z0-9/]*","interface":"netlink","reattached":[a-z]*')"
sums_ok /tmp/v/sums
kill -TERM $pid
wait $pid || fail "mirrord exit status $?"
echo "MARK io-errors $(dmesg | grep -c 'I/O error')"
