# Site A of the site-loss test (TestKernelDeviceSiteLoss), in a VM joined to
# site B's: Primary with ext4 on /dev/nbd0 and a writer that prints
# "LOGGED name sha256" after each file it fsync'd. The test kills this VM's
# qemu mid-write.
set -u
fail() { echo "VM-FAIL $*"; tail -20 /tmp/v/log; exit 1; }
mkdir -p /etc/mirrord /tmp/v
cat >/etc/mirrord/vol0.yaml <<'YAML'
node: {name: alpha}
volume: {name: vol0, path: /var/lib/mirrord/vol0.img, size: 128MiB}
nbd: {device: /dev/nbd0, device-timeout: 10s}
peer: {node: beta, listen: 10.0.2.21:7788, address: 10.0.2.22:7788, secret: vm-site-test, mode: sync}
YAML
mirrord run -c /etc/mirrord/vol0.yaml 2>/tmp/v/log &
i=0
until mirrord status --json 2>/dev/null | tr -d ' \n' | grep -q '"replication":"Established"'; do
	i=$((i + 1)); [ $i -lt 1800 ] || fail "no replication with beta"; sleep 0.1
done
mirrord promote || fail "promote"
i=0
until [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
	i=$((i + 1)); [ $i -lt 300 ] || fail "nbd0 not attached"; sleep 0.1
done
mkfs.ext4 -q /dev/nbd0 || fail mkfs
mount -t ext4 /dev/nbd0 /mnt || fail mount
echo "MARK primary-writing"
n=0
while true; do
	n=$((n + 1))
	dd if=/dev/urandom of=/mnt/f$n bs=16k count=4 conv=fsync 2>/dev/null || fail "write f$n"
	echo "LOGGED f$n $(sha256sum </mnt/f$n | cut -d' ' -f1)"
done
