# Site B of the site-loss test (TestKernelDeviceSiteLoss): Secondary in sync
# with site A until A's VM is killed; then promoted, it attaches /dev/nbd0,
# ext4 replays its journal and mounts, every file is listed as
# "FILE name sha256", and e2fsck finds the file system clean.
set -u
fail() { echo "VM-FAIL $*"; tail -20 /tmp/v/log; exit 1; }
mkdir -p /etc/mirrord /tmp/v
cat >/etc/mirrord/vol0.yaml <<'YAML'
node: {name: beta}
volume: {name: vol0, path: /var/lib/mirrord/vol0.img, size: 128MiB}
nbd: {device: /dev/nbd0, device-timeout: 10s}
peer: {node: alpha, listen: 10.0.2.22:7788, address: 10.0.2.21:7788, secret: vm-site-test, mode: sync}
YAML
mirrord run -c /etc/mirrord/vol0.yaml 2>/tmp/v/log &
st() { mirrord status --json 2>/dev/null | tr -d ' \n'; }
i=0
until st | grep -q '"peer_role":"Primary"'; do
	i=$((i + 1)); [ $i -lt 2400 ] || fail "alpha never became Primary"; sleep 0.1
done
echo "MARK secondary-of-primary"
# Site A is lost: the link drops after peer.timeout.
i=0
while st | grep -q '"connection":"Connected"'; do
	i=$((i + 1)); [ $i -lt 3000 ] || fail "alpha never went away"; sleep 0.1
done
echo "MARK peer-lost $(st | grep -o '"disk":"[A-Za-z]*"')"
mirrord promote || fail "promote"
i=0
until [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
	i=$((i + 1)); [ $i -lt 300 ] || fail "nbd0 not attached after promote"; sleep 0.1
done
echo "MARK promoted"
mount -t ext4 /dev/nbd0 /mnt || fail "mount (journal replay)"
for f in /mnt/f*; do
	echo "FILE ${f#/mnt/} $(sha256sum <$f | cut -d' ' -f1)"
done
umount /mnt || fail umount
e2fsck -fn /dev/nbd0 >/tmp/v/fsck.out 2>&1 || { cat /tmp/v/fsck.out; fail "e2fsck"; }
echo "MARK fsck clean"
