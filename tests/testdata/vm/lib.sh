# Sourced by the VM test scripts (/test/lib.sh): the helpers they share.
# Lines starting with "MARK " are read by the Go tests; "VM-FAIL" ends a run.
mkdir -p /tmp/v /etc/mirrord

fail() {
	echo "VM-FAIL $*"
	tail -20 /tmp/v/log* 2>/dev/null
	exit 1
}

# poll TENTHS COMMAND...: runs COMMAND every 0.1 s until it succeeds; false
# after TENTHS tries.
poll() {
	n=$1
	shift
	i=0
	until "$@"; do
		i=$((i + 1))
		[ $i -lt "$n" ] || return 1
		sleep 0.1
	done
}

attached() { [ "$(cat /sys/block/nbd0/size)" != 0 ]; }

# fsck_clean: e2fsck -fn on /dev/nbd0 (unmounted) finds nothing to fix.
fsck_clean() {
	e2fsck -fn /dev/nbd0 >/tmp/v/fsck.out 2>&1 || { cat /tmp/v/fsck.out; fail "e2fsck"; }
	echo "MARK fsck clean"
}

# sums_ok FILE: mounts /dev/nbd0, checks the sha256sum list FILE, unmounts.
sums_ok() {
	mount -t ext4 /dev/nbd0 /mnt || fail "mount to check sums"
	sha256sum -c "$1" >/dev/null || fail "checksums"
	umount /mnt || fail "umount after checking sums"
	echo "MARK sums ok"
}

# pair_config NODE PEER ADDR PEER-ADDR: the volume of one node of a
# synchronous pair, with /dev/nbd0 while Primary and the failover agent
# voting through the witness named in /test/witness.addr (the host's, at
# 10.0.2.2), with the secret in /test/witness.secret.
pair_config() {
	cat >/etc/mirrord/vol0.yaml <<YAML
node: {name: $1}
volume: {name: vol0, path: /var/lib/mirrord/vol0.img, size: 128MiB}
nbd: {device: /dev/nbd0, device-timeout: 10s}
peer: {node: $2, listen: $3:7788, address: $4:7788, secret: vm-site-test, mode: sync, timeout: 3s, ping-interval: 500ms}
failover:
  enabled: true
  witness: "$(cat /test/witness.addr)"
  witness-secret-file: /test/witness.secret
YAML
}

# run_node: starts mirrord with the pair config; alive fails the run once
# it has exited.
run_node() {
	mirrord run -c /etc/mirrord/vol0.yaml 2>/tmp/v/log &
	mpid=$!
}
alive() { kill -0 $mpid || fail "mirrord exited"; }

# status: mirrord status --json on one line without spaces, for grep.
status() { mirrord status --json "$@" 2>/dev/null | tr -d ' \n'; }
