#!/usr/bin/env bash
# Runs every fuzz target in the module (each Fuzz function `go test -list`
# finds, so a new decoder's fuzzer is never left out) for FUZZTIME each,
# default 60s. What a run finds new stays in Go's cache
# ($(go env GOCACHE)/fuzz); a crasher is written to the package's
# testdata/fuzz and fails the run. Usage: scripts/fuzz.sh [--list]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v go >/dev/null || { echo "fuzz.sh: Go is required (https://go.dev/dl)" >&2; exit 1; }
targets=()
for pkg in $(go list ./...); do
	for f in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		targets+=("$f:$pkg")
	done
done
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 1; }
if [ "${1:-}" = --list ]; then
	printf '%s\n' "${targets[@]}"
	exit 0
fi
for t in "${targets[@]}"; do
	echo "== ${t%%:*} (${t##*:}, ${FUZZTIME:-60s})"
	go test -run='^$' -fuzz="^${t%%:*}\$" -fuzztime="${FUZZTIME:-60s}" "${t##*:}"
done
echo "fuzz.sh: ${#targets[@]} targets, no crashers"
