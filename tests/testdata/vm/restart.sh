# Runs inside a test VM (scripts/vm/run.sh) with a static mirrord in /test.
# mirrord is stopped and started again twice while ext4 on /dev/nbd0 is
# mounted and a writer fsyncs file after file: the kernel holds the I/O
# (nbd.device-dead-timeout), the new mirrord takes the device over, and the
# writer must see no error and every file it logged must check out.
# Lines starting with "MARK " are read by the Go test.
set -u
fail() { echo "VM-FAIL $*"; tail -30 /tmp/v/log; exit 1; }
mkdir -p /tmp/v
ctl=/tmp/v/ctl.sock
start() {
	mirrord run --path /tmp/v/vol.img --size 128MiB --listen unix:/tmp/v/nbd.sock \
		--set control.socket=$ctl --set nbd.device=/dev/nbd0 \
		--set nbd.device-timeout=5s --set nbd.device-dead-timeout=60s >>/tmp/v/log 2>&1 &
	pid=$!
	i=0
	until mirrord status --json --control $ctl >/tmp/v/status 2>/dev/null && grep -q '"connected": *true' /tmp/v/status; do
		i=$((i + 1)); [ $i -lt 300 ] || fail "mirrord did not attach"; sleep 0.1
	done
}
logged() { wc -l </tmp/v/written; }
wait_logged() { # until the writer has logged $1 files
	i=0
	while [ "$(logged)" -lt "$1" ]; do
		i=$((i + 1)); [ $i -lt 1200 ] || fail "writer stalled at $(logged) files"; sleep 0.1
	done
}
start
mkfs.ext4 -q /dev/nbd0 || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail mount
: >/tmp/v/written
(
	n=0
	while [ ! -e /tmp/v/stop ]; do
		n=$((n + 1))
		dd if=/dev/urandom of=/mnt/f$n bs=16k count=16 conv=fsync 2>/dev/null || { echo "MARK writer-error f$n"; exit 1; }
		echo "$(sha256sum /mnt/f$n)" >>/tmp/v/written
	done
) &
wpid=$!
for r in 1 2; do
	wait_logged $((r * 10))
	t0=$(date +%s)
	kill -TERM $pid
	wait $pid || fail "mirrord exit status $? on restart $r"
	[ "$(cat /sys/block/nbd0/size)" != 0 ] || fail "nbd0 detached on restart $r"
	start
	grep -q '"reattached": *true' /tmp/v/status || fail "restart $r: device not reattached"
	before=$(logged)
	wait_logged $((before + 3))
	echo "MARK restart$r resumed-after-$(($(date +%s) - t0))s"
done
touch /tmp/v/stop
wait $wpid || fail "writer failed"
echo "MARK files $(logged)"
umount /mnt || fail umount
e2fsck -fn /dev/nbd0 >/tmp/v/fsck.out 2>&1 || { cat /tmp/v/fsck.out; fail "e2fsck"; }
echo "MARK fsck clean"
mount -t ext4 /dev/nbd0 /mnt || fail "mount again"
sha256sum -c /tmp/v/written >/dev/null || fail "checksums"
echo "MARK sums ok"
umount /mnt
echo "MARK io-errors $(dmesg | grep -c 'I/O error')"
kill -TERM $pid; wait $pid || fail "mirrord exit status $?"
echo "MARK detached-size $(cat /sys/block/nbd0/size)"
