# Site A of the site-loss test (TestKernelDeviceSiteLoss), in a VM joined to
# site B's, the witness on the host: Primary with ext4 on /dev/nbd0 and a writer that prints
# "LOGGED name sha256" after each file it fsync'd. The test kills this VM's
# qemu mid-write.
set -u
. /test/lib.sh
pair_config alpha beta 10.0.3.21 10.0.3.22
run_node
established() {
	alive
	status | grep -q '"replication":"Established"'
}
poll 1800 established || fail "no replication with beta"
mirrord promote || fail "promote"
poll 300 attached || fail "nbd0 not attached"
# Writable once the agent has the witness's vote and unfences.
unfenced() { status | grep -q '"fenced":false'; }
poll 600 unfenced || fail "still fenced"
mkfs.ext4 -q /dev/nbd0 || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail mount
echo "MARK primary-writing"
n=0
while true; do
	n=$((n + 1))
	dd if=/dev/urandom of=/mnt/f$n bs=16k count=4 conv=fsync 2>/dev/null || fail "write f$n"
	echo "LOGGED f$n $(sha256sum </mnt/f$n | cut -d' ' -f1)"
done
