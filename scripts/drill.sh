#!/usr/bin/env bash
# Failover drill: a primary, a target and a witness, each in its own network
# namespace, and a client that reaches the volume only through the floating
# IP. The primary is killed with SIGKILL; the drill prints how long it took
# until the target accepted a write at the floating IP.
#
# Usage: scripts/drill.sh            (as root; builds mirrord unless MIRRORD is set)
# Environment: MIRRORD=path/to/mirrord, DRILL_RUNS=N (default 1),
#              DRILL_BAR=seconds (default 3), DRILL_NO_BAR=1 prints without judging.
# Needs: ip (iproute2), qemu-io (qemu-utils); scripts/deps.sh test installs them.
set -euo pipefail

bar=${DRILL_BAR:-3}
runs=${DRILL_RUNS:-1}
[ "$(id -u)" = 0 ] || { echo "drill: run as root (network namespaces)" >&2; exit 1; }
for t in ip qemu-io; do
	command -v "$t" >/dev/null || { echo "drill: $t is missing (scripts/deps.sh test)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/mirrord-drill.XXXXXX)
p=drill$$
nss=("${p}hub" "${p}a" "${p}b" "${p}w" "${p}c")
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for ns in "${nss[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT

mirrord=${MIRRORD:-}
if [ -z "$mirrord" ]; then
	here=$(cd "$(dirname "$0")/.." && pwd)
	mirrord=$work/mirrord
	(cd "$here" && go build -o "$mirrord" ./cmd/mirrord)
fi

net=10.78.0
declare -A addr=([a]=$net.1 [b]=$net.2 [w]=$net.3 [c]=$net.10)
floating=$net.100

ip netns add "${p}hub"
ip -n "${p}hub" link add br0 type bridge
ip -n "${p}hub" link set br0 up
for n in a b w c; do
	ip netns add "$p$n"
	ip -n "$p$n" link set lo up
	ip -n "${p}hub" link add "v$n" type veth peer name eth0 netns "$p$n"
	ip -n "${p}hub" link set "v$n" master br0 up
	ip -n "$p$n" addr add "${addr[$n]}/24" dev eth0
	ip -n "$p$n" link set eth0 up
done

echo "drill-secret-0123456789abcdef0123" >"$work/secret"
config() { # node peer
	mkdir -p "$work/$1"
	cat >"$work/$1/mirrord.yaml" <<EOF
node: {name: $1}
volume: {name: vol0, path: $work/$1/vol.img, size: 64MiB}
nbd: {listen: ["tcp:0.0.0.0:10809"]}
peer: {node: $2, address: "${addr[$2]}:7789", listen: "0.0.0.0:7789", secret-file: $work/secret}
control: {socket: $work/$1/ctl.sock}
log: {level: info, format: json}
failover:
  enabled: true
  witness: "${addr[w]}:7700"
  witness-secret-file: $work/secret
  udp: ["${addr[$1]}:7790->${addr[$2]}:7790"]
  resources:
    - {type: ip, address: $floating/24, interface: eth0}
EOF
}
start() { # node
	ip netns exec "$p$1" "$mirrord" run -c "$work/$1/mirrord.yaml" 2>>"$work/$1/log" &
	pids+=($!)
	eval "pid_$1=$!"
}
status() { "$mirrord" status --json --control "$work/$1/ctl.sock" 2>/dev/null || true; }
wait_for() { # seconds description command...
	local until=$((SECONDS + $1)) what=$2
	shift 2
	until "$@"; do
		[ $SECONDS -lt $until ] || { echo "drill: timed out waiting for $what" >&2; tail -n 20 "$work"/*/log >&2; exit 1; }
		sleep 0.05
	done
}
in_sync() { status a | grep -q '"replication": "Established"' && status b | grep -q '"disk": "UpToDate"'; }
serving() { status "$1" | grep -q '"role": "Primary"' && ! status "$1" | grep -q '"fence": '; }
epoch_of() { status "$1" | tr -d ' \n' | grep -o '"failover":{"mode":"[a-z]*","maintenance":[a-z]*,"role":"[A-Za-z]*","epoch":[0-9]*' | grep -o '[0-9]*$'; }
# hears_primary target primary: the target hears the primary as an in-sync
# Primary and holds its epoch (a target behind the witness's epoch by more
# than one refuses to take over).
hears_primary() {
	local e
	e=$(epoch_of "$2")
	[ -n "$e" ] && [ "$(epoch_of "$1")" = "$e" ] &&
		status "$1" | tr -d ' \n' | grep -q "\"peer\":{\"node\":\"[a-z]*\",\"state\":\"alive\",\"role\":\"Primary\",\"disk\":\"UpToDate\",\"epoch\":$e,\"in_sync\":true"
}
client_write() { ip netns exec "${p}c" timeout 2 qemu-io -f raw -c "write -P 0x5a 0 4k" "nbd://$floating:10809/vol0" >/dev/null 2>&1; }

config a b
config b a
run=0
worst=0
while [ $run -lt "$runs" ]; do
	run=$((run + 1))
	# Every run is a new pair with a new witness.
	rm -rf "$work/a/vol.img"* "$work/b/vol.img"*
	ip netns exec "${p}w" "$mirrord" witness --secret-file "$work/secret" --listen "${addr[w]}:7700" \
		--state-dir "$work/witness$run" 2>>"$work/witness.log" &
	pid_w=$!
	pids+=($pid_w)
	start b
	start a
	wait_for 30 "a and b in sync" in_sync
	"$mirrord" promote --control "$work/a/ctl.sock" >/dev/null
	wait_for 30 "a serving" serving a
	wait_for 30 "b hearing a as in-sync Primary at its epoch" hears_primary b a
	wait_for 30 "a client write at the floating IP" client_write

	kill -9 "$pid_a"
	t0=$(date +%s%N)
	wait "$pid_a" 2>/dev/null || true
	wait_for 30 "the target accepting writes at the floating IP" client_write
	t1=$(date +%s%N)
	ms=$(((t1 - t0) / 1000000))
	serving b || { echo "drill: b is not the serving Primary after the failover" >&2; exit 1; }
	printf 'drill %d: kill -9 of the primary to the first write accepted at the floating IP: %d.%03d s\n' $run $((ms / 1000)) $((ms % 1000))
	[ $ms -gt $worst ] && worst=$ms
	kill -9 "$pid_b" "$pid_w" 2>/dev/null || true
	wait "$pid_b" "$pid_w" 2>/dev/null || true
	ip -n "${p}a" addr del "$floating/24" dev eth0 2>/dev/null || true
	ip -n "${p}b" addr del "$floating/24" dev eth0 2>/dev/null || true
done
printf 'drill: worst of %d: %d.%03d s (bar %s s)\n' "$runs" $((worst / 1000)) $((worst % 1000)) "$bar"
if [ "${DRILL_NO_BAR:-}" != 1 ] && [ $worst -gt $((bar * 1000)) ]; then
	echo "drill: MISSED the bar of $bar s" >&2
	exit 1
fi
