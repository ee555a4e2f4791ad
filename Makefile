# A newcomer's map: build, test, check, bench, demo.
.PHONY: build test unit e2e check bench demo fuzz

build:            ## the binary, into bin/
	go build -o bin/mirrord ./cmd/mirrord

test:             ## everything CI runs
	scripts/test.sh

unit:             ## fast: unit tests with the race detector
	go test -race ./bitmap/ ./nbd/ ./wan/ ./mirror/ ./failover/ ./cmd/...

e2e:              ## real clients, real processes, mounts (root)
	go test -count=1 ./tests/

check:            ## gofmt, vet, staticcheck
	test -z "$$(gofmt -l .)"
	go vet ./...
	go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

bench:            ## the comparison table (BENCHMARKS.md)
	scripts/bench.sh

demo:             ## two nodes on this host, ext4 mounted, replicas compared
	scripts/demo.sh

fuzz:             ## every fuzz target in the module for FUZZTIME each (default 60s)
	scripts/fuzz.sh
