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

fuzz:             ## each decoder's fuzzer for FUZZTIME (default 60s)
	for t in FuzzDecode:./bitmap/ FuzzHandshake:./nbd/ FuzzRequest:./nbd/ FuzzReadFrame:./wan/ FuzzReadCompressed:./wan/ FuzzHello:./wan/ FuzzMessageWire:./failover/agent/ FuzzMessageBody:./failover/agent/ FuzzJournalRecord:./mirror/ FuzzJournalHeader:./mirror/ FuzzUndoRecord:./mirror/; do \
		go test -run='^$$' -fuzz=$${t%%:*} -fuzztime=$${FUZZTIME:-60s} $${t##*:} || exit 1; done
