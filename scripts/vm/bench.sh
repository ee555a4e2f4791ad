#!/usr/bin/env bash
# The kernel path side by side: the same fio job on /dev/nbdN inside one
# QEMU TCG VM, served by
#   nbdkit-file  Debian's nbd-client (netlink, 4 connections, 4 KiB blocks)
#                against nbdkit's file plugin over a unix socket
#   mirrord      mirrord's own kernel attach (nbd.device, 4 connections),
#                standalone volume
# both on a 256 MiB file in the VM's tmpfs, so both pay the same emulated
# CPU and neither pays a disk. Each job runs on both systems back to back,
# ROUNDS times; the table shows each system's median (IOPS; KiB/s for the
# sequential job), mirrord's ratio to nbdkit-file, and each server's CPU
# time per fio I/O (utime+stime of the server process over the run, from
# /proc/PID/stat; medians), which the host's noise moves less.
#
# Usage: scripts/vm/bench.sh [--runtime N] [--rounds R] [--cpus C]
#   (seconds per fio run, default 5; rounds, default 5; the VM's CPUs,
#   default 1)
# Slow by nature (TCG): about 4 minutes with the defaults. Not a test: the
# figures move with the host's load, which the rounds only dampen (single
# 5 s runs of one system spread by a third here; five rounds, not three,
# keep the medians steady).
set -euo pipefail
cd "$(dirname "$0")/../.."
rt=5 rounds=5 cpus=1
while [ $# -gt 0 ]; do
	case $1 in
	--runtime) rt=$2; shift 2 ;;
	--rounds) rounds=$2; shift 2 ;;
	--cpus) cpus=$2; shift 2 ;;
	*) sed -n '2,20p' "$0" >&2; exit 2 ;;
	esac
done
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
CGO_ENABLED=0 go build -o "$w/mirrord" ./cmd/mirrord
cat >"$w/job.fio" <<JOB
[global]
ioengine=libaio
direct=1
filename=\${DEV}
size=256M
time_based=1
runtime=$rt
group_reporting=1

[randwrite-qd1]
rw=randwrite
bs=4k
iodepth=1
stonewall

[randwrite-qd32]
rw=randwrite
bs=4k
iodepth=32
stonewall

[seqwrite-1m]
rw=write
bs=1M
iodepth=8
stonewall

[randread-qd32]
rw=randread
bs=4k
iodepth=32
stonewall
JOB
cat >"$w/script.sh" <<'VM'
set -u
mkdir -p /tmp/b
truncate -s 256M /tmp/b/k.img
nbdkit -U /tmp/b/nbdkit.sock -P /tmp/b/nbdkit.pid file /tmp/b/k.img || { echo "VM-FAIL nbdkit"; exit 1; }
i=0; until [ -S /tmp/b/nbdkit.sock ] && [ -s /tmp/b/nbdkit.pid ]; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
nbd-client -u /tmp/b/nbdkit.sock /dev/nbd1 -N "" -b 4096 -C 4 >/dev/null || { echo "VM-FAIL nbd-client"; exit 1; }
mirrord run --path /tmp/b/vol.img --size 256MiB --listen unix:/tmp/b/m.sock \
	--set control.socket=/tmp/b/ctl.sock --set nbd.device=/dev/nbd0 >/tmp/b/log 2>&1 &
mpid=$!
i=0; until [ "$(cat /sys/block/nbd0/size)" != 0 ]; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/b/log; exit 1; }; sleep 0.1; done
npid=$(cat /tmp/b/nbdkit.pid)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime, in 1/100 s
# Job by job, the two systems back to back, so a change in the host's load
# hits both alike.
for job in randwrite-qd1 randwrite-qd32 seqwrite-1m randread-qd32; do
	for round in $(seq ROUNDS); do for sys in "nbdkit-file /dev/nbd1 $npid" "mirrord /dev/nbd0 $mpid"; do
		set -- $sys # name, device, server pid
		t0=$(ticks "$3")
		DEV=$2 fio --minimal --section=$job /test/job.fio >/tmp/b/out 2>&1 || { cat /tmp/b/out; echo "VM-FAIL fio $1"; exit 1; }
		t1=$(ticks "$3")
		# terse v3: 3 job name, 6/7/8 read KiB, KiB/s and IOPS,
		# 47/48/49 the same for writes; then the server's CPU ticks
		awk -F';' -v s="$1" -v t=$((t1 - t0)) '{print "BENCH", s, $3, $7, $8, $48, $49, t}' /tmp/b/out
	done; done
done
VM
sed -i "s/ROUNDS/$rounds/" "$w/script.sh"
scripts/vm/run.sh -b -c "$cpus" -m 1536 -t 900 "$w/script.sh" "$w/mirrord" "$w/job.fio" | tr -d '\r' >"$w/console" || { tail -40 "$w/console" >&2; exit 1; }
awk '
function median(list,   a, n, i, j, t) {
	n = split(list, a, " ")
	for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
	return n % 2 ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
}
/^BENCH/ {
	sys = $2; job = $3
	v = (job ~ /read/) ? $5 : $7; unit = (job ~ /read/) ? "read IOPS" : "write IOPS"
	ios = ($5 + $7) * '"$rt"'
	if (job ~ /seq/) { v = $6; unit = "write KiB/s" }
	val[sys, job] = val[sys, job] " " v; units[job] = unit
	cpu[sys, job] = cpu[sys, job] " " (ios > 0 ? $8 * 10000 / ios : 0)
	if (!(job in seen)) { seen[job] = 1; order[++n] = job }
}
END {
	if (n == 0) { print "bench: no results"; exit 1 }
	printf "%-16s %-12s %12s %12s %7s %14s %14s   (medians of %s)\n", "job", "metric", "nbdkit-file", "mirrord", "ratio", "nbdkit us/IO", "mirrord us/IO", "'"$rounds"' rounds, '"$cpus"' vCPU"
	for (i = 1; i <= n; i++) {
		j = order[i]; a = median(val["nbdkit-file", j]); b = median(val["mirrord", j])
		printf "%-16s %-12s %12d %12d %7.2f %14.0f %14.0f\n", j, units[j], a, b, (a > 0 ? b / a : 0), median(cpu["nbdkit-file", j]), median(cpu["mirrord", j])
	}
}' "$w/console"
