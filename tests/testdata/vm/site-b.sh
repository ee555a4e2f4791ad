# Site B of the site-loss test (TestKernelDeviceSiteLoss): Secondary in sync
# with site A until A's VM is killed; then its failover agent promotes it
# (the witness on the host votes), it attaches /dev/nbd0,
# ext4 replays its journal and mounts, every file is listed as
# "FILE name sha256", and e2fsck finds the file system clean.
set -u
. /test/lib.sh
pair_config beta alpha 10.0.3.22 10.0.3.21
run_node
peer_primary() {
	alive
	status | grep -q '"peer_role":"Primary"'
}
poll 2400 peer_primary || fail "alpha never became Primary"
echo "MARK secondary-of-primary"
# Site A is lost: the agent, with the witness's vote, promotes this node,
# and the kernel device comes up as its first resource.
poll 3000 attached || fail "nbd0 never attached (no failover)"
echo "MARK peer-lost $(status | grep -o '"role":"[A-Za-z]*","disk":"[A-Za-z]*"' | head -1)"
unfenced() { status | grep -q '"fenced":false'; }
poll 600 unfenced || fail "promoted but still fenced"
echo "MARK promoted"
mount -t ext4 /dev/nbd0 /mnt || fail "mount (journal replay)"
for f in /mnt/f*; do
	echo "FILE ${f#/mnt/} $(sha256sum <$f | cut -d' ' -f1)"
done
umount /mnt || fail umount
fsck_clean
