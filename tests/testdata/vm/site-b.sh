# Site B of the site-loss test (TestKernelDeviceSiteLoss): Secondary in sync
# with site A until A's VM is killed; then promoted, it attaches /dev/nbd0,
# ext4 replays its journal and mounts, every file is listed as
# "FILE name sha256", and e2fsck finds the file system clean.
set -u
. /test/lib.sh
pair_config beta alpha 10.0.2.22 10.0.2.21
mirrord run -c /etc/mirrord/vol0.yaml 2>/tmp/v/log &
peer_primary() { status | grep -q '"peer_role":"Primary"'; }
poll 2400 peer_primary || fail "alpha never became Primary"
echo "MARK secondary-of-primary"
# Site A is lost: the link drops after peer.timeout.
peer_gone() { ! status | grep -q '"connection":"Connected"'; }
poll 3000 peer_gone || fail "alpha never went away"
echo "MARK peer-lost $(status | grep -o '"disk":"[A-Za-z]*"')"
mirrord promote || fail "promote"
poll 300 attached || fail "nbd0 not attached after promote"
echo "MARK promoted"
mount -t ext4 /dev/nbd0 /mnt || fail "mount (journal replay)"
for f in /mnt/f*; do
	echo "FILE ${f#/mnt/} $(sha256sum <$f | cut -d' ' -f1)"
done
umount /mnt || fail umount
fsck_clean
