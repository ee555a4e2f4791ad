#!/usr/bin/env bash
# Side-by-side NBD figures for mirrord and the peers a user would pick instead,
# every system measured with the same fio job (scripts/bench/job.fio) in one
# run, on fresh 1 GiB sparse scratch files in one temp dir (on $TMPDIR's disk):
#   nbdkit-file     nbdkit's file plugin: a bare NBD server, no mirroring
#   qemu-nbd        qemu's NBD server, no mirroring
#   mirrord         this repo's daemon, standalone (no peer), unix socket
#   qsd-syncmirror  qemu-storage-daemon exporting NBD with an active,
#                   write-blocking (synchronous) blockdev-mirror to a second
#                   qemu-nbd: the closest off-the-shelf synchronous mirror
#
# Adding a row (mirrord-sync, WAN variants, ...): write one start_* function
# (start the server(s) with spawn, wait until ready, register any extra
# teardown with at_stop, echo the NBD URI) and add one `system` line below it.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/bench.sh [--runtime N] [--json] [--only a,b] [--no-resync] [--help]

Runs scripts/bench/job.fio (4k randwrite QD1, 4k randwrite QD32, 1M seqwrite
QD8, 4k randread QD32) against each system's NBD export and prints one table,
rows = system x job, with each row's main metric (write IOPS, or read IOPS for
the read job) as a ratio to nbdkit-file's same job.

  --runtime N   seconds per fio job (default 8; 4 jobs per system)
  --json        print a JSON array of {"system","job","write_iops",
                "write_kib_s","write_lat_us","read_iops","read_kib_s"}
                instead of the table
  --only a,b    run only these systems (order stays fixed):
                nbdkit-file,qemu-nbd,mirrord,mirrord-sync,mirrord-async,
                qsd-syncmirror
  --no-resync   skip the resync-rate line (full 1 GiB resync, then the
                bytes resynced after touching 1% of the volume)
  --wan-bars    also measure async replication through an emulated WAN of
                50 ms RTT and 100 Mbit/s (TLS, zstd): 128 MiB of
                incompressible data, then an ext4 image of text files
                (Go's source tree, made with mkfs.ext4 -d, written with
                nbdcopy); each as data rate / link rate
  --help        this text

Installs missing tools with apt-get (fio nbdkit qemu-utils qemu-system-common
python3) and builds mirrord from this repo with go. Scratch files go in a temp
dir under $TMPDIR (default /tmp), removed on exit. Progress goes to stderr.
Exit status 1 if a system failed to start or fio failed against it (its rows
are marked FAILED).
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
jobfile=$repo/scripts/bench/job.fio
READY_TIMEOUT=30   # seconds for a server to come up
MIRROR_TIMEOUT=300 # seconds for qsd's mirror to reach READY
STOP_TIMEOUT=15    # seconds between SIGTERM and SIGKILL

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

# ---- systems registry -------------------------------------------------------
SYSTEMS=()        # run order
declare -A START  # system -> start function
declare -A NEEDS  # system -> tools it needs (besides fio)
system() { # system NAME START_FN TOOL...
	SYSTEMS+=("$1"); START[$1]=$2; shift 2; NEEDS[${SYSTEMS[-1]}]="$*"
}

# ---- process handling -------------------------------------------------------
stop_cmds=() # teardown of the running system, run in reverse order
logs=()      # names of the running system's server logs ($w/NAME.log)
at_stop() { stop_cmds+=("$*"); }
stop_system() {
	local i
	for ((i = ${#stop_cmds[@]} - 1; i >= 0; i--)); do eval "${stop_cmds[i]}" || true; done
	stop_cmds=() logs=()
}

show_logs() { # the running system's server logs, tail, to stderr
	local n
	for n in "${logs[@]}"; do
		log "--- $n log (last 20 lines)"
		tail -n 20 "$w/$n.log" >&2 || true
	done
}

alive() { # alive PID: running and not a zombie
	local st
	{ read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
	st=${st##*) }
	[[ ${st%% *} != Z ]]
}

stop_pid() { # SIGTERM, SIGKILL after STOP_TIMEOUT, reap
	local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT))
	kill -TERM "$pid" 2>/dev/null || true
	while alive "$pid" && ((SECONDS < deadline)); do sleep 0.05; done
	if alive "$pid"; then
		log "pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s, killing"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

spawn() { # spawn NAME CMD...: run CMD in the background, output to $w/NAME.log; sets spawned
	local name=$1
	shift
	"$@" </dev/null >"$w/$name.log" 2>&1 &
	spawned=$!
	logs+=("$name")
	at_stop stop_pid "$spawned"
}

# wait_ready PID NAME SOCK [PATTERN]: poll until SOCK is a socket (and PATTERN
# is in $w/NAME.log); fail early if PID exits, or after READY_TIMEOUT.
wait_ready() {
	local pid=$1 name=$2 sock=$3 pat=${4:-} deadline=$((SECONDS + READY_TIMEOUT))
	while :; do
		if [[ -S $sock ]] && { [[ -z $pat ]] || grep -q -- "$pat" "$w/$name.log"; }; then
			return 0
		fi
		if ! alive "$pid"; then
			log "$name exited before $sock was ready; its log:"
			tail -n 20 "$w/$name.log" >&2 || true
			return 1
		fi
		if ((SECONDS >= deadline)); then
			log "$name: $sock not ready after ${READY_TIMEOUT}s; its log:"
			tail -n 20 "$w/$name.log" >&2 || true
			return 1
		fi
		sleep 0.05
	done
}

scratch() { # scratch NAME: a fresh 1 GiB sparse file $w/NAME, identical for every system
	rm -f "$w/$1"
	truncate -s 1G "$w/$1"
}

# ---- systems ----------------------------------------------------------------
# Each start_* runs in the main shell with stdout to a file (not in a
# subshell, so spawn's teardown registration sticks), and must `|| return 1`
# every step that can fail: it is called in an `if`, where set -e is off.
# $img is the system's fresh 1 GiB scratch file.

start_nbdkit_file() {
	spawn nbdkit nbdkit -f -U "$w/k.sock" file "$img"
	wait_ready "$spawned" nbdkit "$w/k.sock" || return 1
	echo "nbd+unix:///?socket=$w/k.sock"
}
system nbdkit-file start_nbdkit_file nbdkit

start_qemu_nbd() {
	spawn qemu-nbd qemu-nbd -f raw -t -k "$w/q.sock" --cache=writeback "$img"
	wait_ready "$spawned" qemu-nbd "$w/q.sock" || return 1
	echo "nbd+unix:///?socket=$w/q.sock"
}
system qemu-nbd start_qemu_nbd qemu-nbd

start_mirrord() {
	spawn mirrord "$mirrord_bin" run --path "$img" --size 1GiB \
		--listen "unix:$w/m.sock" --set log.format=json
	wait_ready "$spawned" mirrord "$w/m.sock" serving || return 1
	echo "nbd+unix:///?socket=$w/m.sock"
}
system mirrord start_mirrord mirrord

# mirrord with a peer: the Primary serves NBD on a unix socket, the target
# is a second mirrord on this host over TCP loopback (both disks on the same
# filesystem, so every write is written twice here).
peer_port=${BENCH_PEER_PORT:-17788}
start_mirrord_pair() { # start_mirrord_pair MODE [RTT_MS [RATE]]
	local mode=$1 rtt=${2:-} rate=${3:-0} n peer listen dial wan=()
	head -c 32 /dev/urandom | base64 >"$w/secret"
	# A WAN row: alpha reaches beta through wanproxy (delay each way, and a
	# bandwidth if RATE is not 0), and both run as WAN peers: TLS 1.3 with
	# the pair's certificates, zstd.
	if [[ -n $rtt ]]; then
		[[ -f $w/keys/ca.crt ]] || "$mirrord_bin" keygen --out "$w/keys" --nodes alpha,beta >/dev/null || return 1
		spawn wanproxy "$wanproxy_bin" -listen 127.0.0.1:$((peer_port + 2)) -target 127.0.0.1:$((peer_port + 1)) -rtt "${rtt}ms" -rate "$rate"
		wait_log wanproxy "listening" || return 1
	fi
	# mirrord creates both stores itself, sparse: it knows they are zeroes,
	# so the pair starts in sync (an existing disk would need an initial
	# full sync, started by "mirrord promote --force" on the good side).
	rm -f "$w/a.img" "$w/b.img"
	for n in alpha beta; do
		if [[ $n == alpha ]]; then peer=beta listen=$peer_port dial=$((peer_port + 1)); else peer=alpha listen=$((peer_port + 1)) dial=$peer_port; fi
		if [[ -n $rtt ]]; then
			[[ $n == alpha ]] && dial=$((peer_port + 2))
			wan=(--set peer.profile="${BENCH_WAN_PROFILE:-wan}")
			[[ ${BENCH_WAN_PROFILE:-wan} == lan ]] ||
				wan+=(--set peer.tls.ca="$w/keys/ca.crt" --set peer.tls.cert="$w/keys/$n.crt" --set peer.tls.key="$w/keys/$n.key")
		fi
		spawn "mirrord-$n" "$mirrord_bin" run --set node.name=$n --set volume.path="$w/$([[ $n == alpha ]] && echo a || echo b).img" \
			--set volume.size=1GiB --set nbd.listen="unix:$w/$n.sock" --set control.socket="$w/$n.ctl" \
			--set peer.node=$peer --set peer.listen=127.0.0.1:$listen --set peer.address=127.0.0.1:$dial \
			--set peer.secret-file="$w/secret" --set peer.mode="$mode" --set log.format=json "${wan[@]}"
		wait_ready "$spawned" "mirrord-$n" "$w/$n.ctl" serving || return 1
	done
	wait_status alpha '"replication": "Established"' || return 1
	"$mirrord_bin" promote --control "$w/alpha.ctl" >/dev/null || return 1
	echo "nbd+unix:///?socket=$w/alpha.sock"
}
wait_status() { # wait_status NODE PATTERN: poll mirrord status --json for PATTERN
	local deadline=$((SECONDS + READY_TIMEOUT))
	until "$mirrord_bin" status --control "$w/$1.ctl" --json 2>/dev/null | grep -q -- "$2"; do
		((SECONDS < deadline)) || { log "$1: no '$2' after ${READY_TIMEOUT}s"; show_logs; return 1; }
		sleep 0.05
	done
}
wait_log() { # wait_log NAME PATTERN: poll $w/NAME.log for PATTERN
	local deadline=$((SECONDS + READY_TIMEOUT))
	until grep -q -- "$2" "$w/$1.log"; do
		((SECONDS < deadline)) || { log "$1: no '$2' after ${READY_TIMEOUT}s"; show_logs; return 1; }
		sleep 0.05
	done
}
start_mirrord_sync() { start_mirrord_pair sync; }
start_mirrord_async() { start_mirrord_pair async; }
system mirrord-sync start_mirrord_sync mirrord
system mirrord-async start_mirrord_async mirrord
# WAN rows: the same pairs as WAN peers (TLS, zstd) with 1, 10 and 50 ms
# added RTT (internal/wanproxy; no bandwidth limit, so the RTT is what
# differs). fio's buffers are random: zstd finds nothing to compress.
for rtt in 1 10 50; do
	for mode in sync async; do
		eval "start_mirrord_${mode}_rtt$rtt() { start_mirrord_pair $mode $rtt; }"
		system "mirrord-$mode-rtt$rtt" "start_mirrord_${mode}_rtt$rtt" mirrord wanproxy
	done
done

# Synchronous mirror, as shared/bench/peers.sh sets it up: the source exports
# NBD and every write also goes to the target (a second qemu-nbd) before it
# completes. Ready once the mirror job reports BLOCK_JOB_READY.
start_qsd_syncmirror() {
	scratch b.img
	spawn qsd-target qemu-nbd -f raw -t -k "$w/t.sock" --cache=writeback "$w/b.img"
	wait_ready "$spawned" qsd-target "$w/t.sock" || return 1
	spawn qsd qemu-storage-daemon \
		--blockdev driver=file,node-name=file0,filename="$img" \
		--blockdev driver=raw,node-name=src,file=file0 \
		--blockdev driver=nbd,node-name=tgt,server.type=unix,server.path="$w/t.sock" \
		--nbd-server addr.type=unix,addr.path="$w/s.sock" \
		--export type=nbd,id=exp0,node-name=src,writable=on \
		--chardev socket,path="$w/qmp.sock",server=on,wait=off,id=qmp0 --monitor chardev=qmp0
	wait_ready "$spawned" qsd "$w/qmp.sock" || return 1
	wait_ready "$spawned" qsd "$w/s.sock" || return 1
	python3 - "$w/qmp.sock" "$MIRROR_TIMEOUT" <<'PY' >&2 || return 1
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(float(sys.argv[2])); s.connect(sys.argv[1]); f = s.makefile('rw')
def send(c, **a):
    f.write(json.dumps({'execute': c, 'arguments': a}) + '\n'); f.flush()
f.readline(); send('qmp_capabilities')
send('blockdev-mirror', **{'job-id': 'm0', 'device': 'src', 'target': 'tgt', 'sync': 'full', 'copy-mode': 'write-blocking'})
while True:
    line = f.readline()
    if not line: sys.exit('qmp: connection closed before BLOCK_JOB_READY')
    m = json.loads(line)
    if 'error' in m: sys.exit('qmp: %s' % m['error'])
    if m.get('event') == 'BLOCK_JOB_READY': break
PY
	echo "nbd+unix:///src?socket=$w/s.sock"
}
system qsd-syncmirror start_qsd_syncmirror qemu-nbd qemu-storage-daemon python3

# ---- arguments --------------------------------------------------------------
rt=8 json=0 only= resync=1 wanbars=0
while (($#)); do
	case $1 in
	--runtime) (($# >= 2)) || die "--runtime needs a value"; rt=$2; shift 2 ;;
	--runtime=*) rt=${1#*=}; shift ;;
	--json) json=1; shift ;;
	--only) (($# >= 2)) || die "--only needs a value"; only=$2; shift 2 ;;
	--only=*) only=${1#*=}; shift ;;
	--no-resync) resync=0; shift ;;
	--wan-bars) wanbars=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
[[ $rt =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive whole number of seconds, not '$rt'"
selected=("${SYSTEMS[@]}")
if [[ -n $only ]]; then
	declare -A want=()
	IFS=, read -ra names <<<"$only"
	for n in "${names[@]}"; do
		[[ -n ${START[$n]:-} ]] || die "--only: unknown system '$n' (known: $(IFS=,; echo "${SYSTEMS[*]}"))"
		want[$n]=1
	done
	selected=()
	for s in "${SYSTEMS[@]}"; do [[ -n ${want[$s]:-} ]] && selected+=("$s"); done
fi
((${#selected[@]})) || die "--only selects no system"
[[ -f $jobfile ]] || die "missing $jobfile"

# ---- tools ------------------------------------------------------------------
declare -A PKG=([fio]=fio [nbdkit]=nbdkit [qemu-nbd]=qemu-utils [nbdcopy]=libnbd-bin [mkfs.ext4]=e2fsprogs
	[qemu-storage-daemon]=qemu-system-common [python3]=python3)
tools=(fio) build_mirrord=0 build_wanproxy=0
for s in "${selected[@]}"; do
	for t in ${NEEDS[$s]}; do
		case $t in
		mirrord) build_mirrord=1 ;;
		wanproxy) build_wanproxy=1 ;;
		*) tools+=("$t") ;;
		esac
	done
done
((wanbars)) && tools+=(nbdcopy mkfs.ext4)
declare -A pkgs=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || pkgs[${PKG[$t]}]=1; done
if ((${#pkgs[@]})); then
	sudo=()
	((EUID == 0)) || sudo=(sudo)
	log "installing ${!pkgs[*]}"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${!pkgs[@]}" >&2
fi
for t in "${tools[@]}"; do command -v "$t" >/dev/null || die "$t still missing after install"; done
engines=$(fio --enghelp 2>&1 || true)
[[ $engines =~ [[:space:]]nbd[[:space:]] ]] || die "this fio has no nbd ioengine (needs fio built with libnbd)"

# ---- work dir, cleanup ------------------------------------------------------
w=$(mktemp -d "${TMPDIR:-/tmp}/mirrord-bench.XXXXXX")
fio_pid=
cleanup() {
	[[ -z $fio_pid ]] || stop_pid "$fio_pid"
	stop_system
	rm -rf "$w"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

((resync)) && build_mirrord=1
((wanbars)) && build_mirrord=1 build_wanproxy=1
if ((build_mirrord)); then
	command -v go >/dev/null || die "go is needed to build mirrord"
	log "building mirrord"
	(cd "$repo" && go build -o "$w/mirrord" ./cmd/mirrord)
	mirrord_bin=$w/mirrord
fi
if ((build_wanproxy)); then
	(cd "$repo" && go build -o "$w/wanproxy" ./internal/wanproxy/cmd/wanproxy)
	wanproxy_bin=$w/wanproxy
fi

# ---- run --------------------------------------------------------------------
jobs=$(awk '/^\[/ && $0 != "[global]" { gsub(/[][]/, ""); printf "%s ", $0 }' "$jobfile")
results=$w/results.tsv # system job wiops wkib wlat riops rkib rio_kib wio_kib error
: >"$results"
failed=0
fail() { # fail SYSTEM WHY: one FAILED row per job
	local j
	failed=1
	log "$1: $2"
	for j in $jobs; do printf '%s\t%s\t\t\t\t\t\t\t\t%s\n' "$1" "$j" "$2" >>"$results"; done
}
start_all=$SECONDS
read -r load_start _ </proc/loadavg
for s in "${selected[@]}"; do
	rm -f "$w"/*.img "$w"/*.sock
	img=$w/a.img
	scratch a.img
	log "$s: starting"
	t0=$SECONDS
	if "${START[$s]}" >"$w/uri" && uri=$(<"$w/uri") && [[ -n $uri ]]; then
		log "$s: ready at $uri; fio: ${jobs}(${rt} s each)"
		# In the background so that a SIGTERM to this script is handled now,
		# not when fio ends; cleanup stops a fio still running.
		URI="$uri" RT="$rt" fio "$jobfile" --output-format=terse --terse-version=3 \
			>"$w/$s.fio" 2>"$w/$s.fio.err" &
		fio_pid=$!
		fio_ok=1
		wait "$fio_pid" || fio_ok=0
		fio_pid=
		if ((fio_ok)); then
			# terse v3: $3 job, $6 read IO KiB, $7 read KiB/s, $8 read IOPS,
			# $47 write IO KiB, $48 write KiB/s, $49 write IOPS, $81 mean write
			# total latency (slat+clat) in us ($57 would be clat only).
			awk -F';' -v s="$s" 'NF > 80 {
				printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s, $3, $49, $48, $81, $8, $7, $6, $47
			}' "$w/$s.fio" >>"$results"
			grep -q "^$s	" "$results" || fail "$s" "no fio results"
		else
			log "--- fio stderr (last 20 lines)"
			tail -n 20 "$w/$s.fio.err" >&2 || true
			show_logs
			fail "$s" "fio failed"
		fi
	else
		fail "$s" "failed to start"
	fi
	stop_system
	log "$s: done in $((SECONDS - t0)) s"
done
log "all systems done in $((SECONDS - start_all)) s"

# Resync: a 1 GiB volume written in full while the target is down, then the
# target started: time to UpToDate. Then 1% of the volume touched while the
# target is down again: bytes the resync sends.
resync_line=""
if ((resync)); then
	rm -f "$w"/*.img "$w"/*.sock
	scratch a.img
	img=$w/a.img
	if start_mirrord_pair sync >"$w/uri"; then
		uri=$(<"$w/uri")
		stop_target() { "$mirrord_bin" disconnect --control "$w/alpha.ctl" >/dev/null; }
		stop_target
		fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=1G >/dev/null
		t0=$(date +%s.%N)
		"$mirrord_bin" connect --control "$w/alpha.ctl" >/dev/null
		wait_status alpha '"out_of_sync_bytes": 0,' && wait_status alpha '"replication": "Established"'
		t1=$(date +%s.%N)
		full=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 1024 / (b - a) }')
		before=$("$mirrord_bin" status --control "$w/alpha.ctl" --json | awk -F'[:,]' '/"resync_bytes"/ { print $2 + 0 }')
		stop_target
		fio --name=touch --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 --size=1G \
			--number_ios=2621 --randrepeat=0 >/dev/null
		"$mirrord_bin" connect --control "$w/alpha.ctl" >/dev/null
		wait_status alpha '"out_of_sync_bytes": 0,' && wait_status alpha '"replication": "Established"'
		after=$("$mirrord_bin" status --control "$w/alpha.ctl" --json | awk -F'[:,]' '/"resync_bytes"/ { print $2 + 0 }')
		part=$(awk -v a="$before" -v b="$after" 'BEGIN { printf "%.2f", 100 * (b - a) / 1073741824 }')
		resync_line="resync over loopback: 1 GiB fully dirty in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s = $full MiB/s; after touching 1% of the volume (2621 random 4 KiB writes) the resync sent $part% of it"
		log "$resync_line"
	else
		log "resync measurement: pair failed to start"
		failed=1
	fi
	stop_system
fi
# WAN bars: async through 50 ms RTT and 100 Mbit/s, time from the first write
# until the Primary has nothing in flight nor out of sync; the data rate over
# that time against the link's 12.5 MB/s.
wan_lines=()
received() { # received NODE: the bytes of frames NODE has received from its peer
	"$mirrord_bin" status --control "$w/$1.ctl" --json | awk -F'[:,]' '/"received_bytes"/ { print $2 + 0 }'
}
wan_bar() { # wan_bar WHAT BYTES T0: append a line, BYTES of data shipped since T0
	local t1 st ratio
	wait_status alpha '"in_flight_writes": 0,' && wait_status alpha '"out_of_sync_bytes": 0,' &&
		wait_status alpha '"replication": "Established"' || return 1
	t1=$(date +%s.%N)
	st=$("$mirrord_bin" status --control "$w/alpha.ctl" --json)
	ratio=$(awk -F'[:,]' '/"compression_ratio"/ { print $2 + 0 }' <<<"$st")
	wan_lines+=("$(awk -v what="$1" -v b="$2" -v a="$3" -v c="$t1" -v r="$ratio" 'BEGIN {
		rate = b / (c - a); printf "async over 50 ms RTT, 100 Mbit/s, TLS+zstd: %s: %.0f MiB in %.1f s = %.2f MB/s = %.2fx the link rate (compression ratio %.2f)", what, b / 1048576, c - a, rate / 1e6, rate / 12.5e6, r }')")
	log "${wan_lines[-1]}"
}
if ((wanbars)); then
	READY_TIMEOUT=600 # wait_status also waits for the link to drain
	rm -f "$w"/*.img "$w"/*.sock
	if start_mirrord_pair async 50 100M >"$w/uri"; then
		uri=$(<"$w/uri")
		t0=$(date +%s.%N)
		fio --name=incompressible --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=256M \
			--refill_buffers=1 >/dev/null &
		fio_pid=$!
		# The sustained rate: data the target received between 4 s and 16 s
		# (the whole run, ~21 s, also counts the start and the drain).
		sleep 4
		r0=$(received beta) s0=$(date +%s.%N)
		sleep 12
		r1=$(received beta) s1=$(date +%s.%N)
		wait "$fio_pid" && fio_pid= && wan_bar "incompressible (fio, refilled random buffers)" $((256 << 20)) "$t0" || failed=1
		fio_pid=
		wan_lines+=("$(awk -v a="$r0" -v b="$r1" -v s="$s0" -v e="$s1" 'BEGIN {
			rate = (b - a) / (e - s); printf "async over 50 ms RTT, 100 Mbit/s, TLS+zstd: incompressible, sustained (4 s to 16 s): %.2f MB/s received = %.2fx the link rate", rate / 1e6, rate / 12.5e6 }')")
		log "${wan_lines[-1]}"
	else
		failed=1
	fi
	stop_system
	rm -f "$w"/*.img "$w"/*.sock
	src=$(go env GOROOT)/src
	truncate -s 400M "$w/text.ext4"
	mkfs.ext4 -q -F -d "$src" "$w/text.ext4" >&2
	data=$(du -B1 "$w/text.ext4" | cut -f1)
	if start_mirrord_pair async 50 100M >"$w/uri"; then
		uri=$(<"$w/uri")
		t0=$(date +%s.%N)
		nbdcopy "$w/text.ext4" "$uri" && wan_bar "ext4 of text files ($src)" "$data" "$t0" || failed=1
	else
		failed=1
	fi
	stop_system
	rm -f "$w/text.ext4"
	READY_TIMEOUT=30
fi
read -r load_end _ </proc/loadavg

# ---- output -----------------------------------------------------------------
if ((json)); then
	awk -F'\t' '
	function num(v) { return v ~ /^-?[0-9]+(\.[0-9]+)?$/ ? v : "null" }
	function str(v) { gsub(/["\\]/, "", v); gsub(/[[:cntrl:]]/, " ", v); return "\"" v "\"" }
	BEGIN { print "[" }
	{
		printf "%s  {\"system\": %s, \"job\": %s, \"write_iops\": %s, \"write_kib_s\": %s, \"write_lat_us\": %s, \"read_iops\": %s, \"read_kib_s\": %s",
			(NR > 1 ? ",\n" : ""), str($1), str($2), num($3), num($4), num($5), num($6), num($7)
		if ($10 != "") printf ", \"error\": %s", str($10)
		printf "}"
	}
	END { if (NR) print ""; print "]" }' "$results"
else
	rev=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
	printf '# %s  host: %s CPUs, Linux %s, load %s->%s  runtime: %s s per fio job  %s  mirrord %s\n' \
		"$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" "$(uname -r)" "$load_start" "$load_end" \
		"$rt" "$(fio --version)" "$rev"
	# Main metric: read IOPS for a job that only reads, else write IOPS;
	# "vs nbdkit" divides it by nbdkit-file's for the same job.
	awk -F'\t' '
	function main(r) { return (r[9] + 0 == 0 && r[8] + 0 > 0) ? r[6] : r[3] }
	function cell(io, v, fmt) { return io + 0 > 0 ? sprintf(fmt, v) : "-" }
	NR == FNR { if ($1 == "nbdkit-file" && $10 == "") { split($0, b, "\t"); base[$2] = main(b) }; next }
	FNR == 1 {
		printf "%-15s %-15s %11s %11s %12s %11s %11s %9s\n", "system", "job", "write IOPS", "write MiB/s", "write lat us", "read IOPS", "read MiB/s", "vs nbdkit"
	}
	{
		if ($10 != "") { printf "%-15s %-15s %11s %11s %12s %11s %11s %9s  %s\n", $1, $2, "FAILED", "-", "-", "-", "-", "-", $10; next }
		split($0, r, "\t"); m = main(r)
		vs = ($2 in base && base[$2] > 0) ? sprintf("%.2f", m / base[$2]) : "-"
		printf "%-15s %-15s %11s %11s %12s %11s %11s %9s\n", $1, $2,
			cell($9, $3, "%d"), cell($9, $4 / 1024, "%.1f"), cell($9, $5, "%.1f"),
			cell($8, $6, "%d"), cell($8, $7 / 1024, "%.1f"), vs
	}' "$results" "$results"
	[[ -z $resync_line ]] || echo "$resync_line"
	for l in "${wan_lines[@]}"; do echo "$l"; done
fi
exit "$failed"
