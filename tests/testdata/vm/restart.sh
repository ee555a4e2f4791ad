# Runs inside a test VM (scripts/vm/run.sh) with a static mirrord in /test.
# mirrord is stopped and started again, then killed (-9) and started again,
# while ext4 on /dev/nbd0 is mounted and a writer fsyncs file after file:
# the kernel holds the I/O (nbd.device-dead-timeout), the new mirrord takes
# the device over, and the writer must see no error and every file it
# logged must check out.
# The config and the commands are the README's ("The volume as /dev/nbdX");
# TestREADMEKernelDevice checks they stay so. Lines starting with "MARK "
# are read by the Go test.
set -u
. /test/lib.sh
cat >/etc/mirrord/vol0.yaml <<'YAML'
volume: {name: vol0, path: /var/lib/mirrord/vol0.img, size: 128MiB}
nbd:
  device: /dev/nbd0           # or auto
  device-timeout: 10s         # request timeout; keep it above peer.timeout (6 s)
  device-dead-timeout: 2m     # how long the kernel holds I/O while mirrord restarts
YAML
start() {
	mirrord run -c /etc/mirrord/vol0.yaml &
	pid=$!
	connected() { mirrord status --json >/tmp/v/status 2>/dev/null && grep -q '"connected": *true' /tmp/v/status; }
	poll 300 connected || fail "mirrord did not attach"
}
logged() { wc -l </tmp/v/written; }
# wait_logged N: until the writer has logged N files.
wait_logged() {
	enough() { [ "$(logged)" -ge "$1" ]; }
	poll 1200 enough "$1" || fail "writer stalled at $(logged) files"
}
start
mkfs.ext4 -q /dev/nbd0 || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail mount
mirrord status --json         # "device": path, interface, connected; "nbd": flushes, fua_writes
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
	if [ $r = 1 ]; then
		kill -TERM $pid               # or systemctl restart
		wait $pid || fail "mirrord exit status $? on restart $r"
	else
		# A crash: requests read and not answered are lost with the
		# process; the kernel resends them after nbd.device-timeout.
		kill -KILL $pid
		wait $pid
	fi
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
fsck_clean
sums_ok /tmp/v/written
echo "MARK io-errors $(dmesg | grep -c 'I/O error')"
kill -TERM $pid; wait $pid || fail "mirrord exit status $?"
echo "MARK detached-size $(cat /sys/block/nbd0/size)"
