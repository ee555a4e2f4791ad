#!/usr/bin/env bash
# Every test mirrord has, as CI runs it: formatting, go vet, staticcheck,
# the unit tests under the race detector (fuzz seeds included), every fuzz
# target for a second, and the end-to-end tests with real NBD clients, real
# mirrord processes, loop devices and mounts (root). Installs what it
# needs. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh test

echo "== gofmt"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$bad" ] || { echo "gofmt wants to rewrite: $bad" >&2; exit 1; }
echo "== go vet"
go vet ./...
echo "== staticcheck"
go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...
echo "== unit tests (-race)"
go test -race -count=1 -timeout 15m ./bitmap/ ./nbd/ ./wan/ ./mirror/ ./failover/... ./internal/... ./cmd/...
echo "== fuzz targets, 1 s each (make fuzz runs them for a minute)"
FUZZTIME=1s scripts/fuzz.sh
echo "== end-to-end tests"
go test -count=1 -timeout 30m ./tests/
