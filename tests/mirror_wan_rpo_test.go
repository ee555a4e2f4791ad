package tests

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrord/mirrord/internal/wanproxy"
)

// Issue 6, part 7: async over the reference WAN (50 ms RTT, 100 Mbit/s)
// through internal/wanproxy, with real processes: the RPO bound under a
// load below the link rate, a burst above it spilling to the journal and
// draining with the target a write-order prefix throughout, and a long
// link cut going through journal, journal full, bitmap and catch-up.

// stall holds what alpha sends on the pair's link, whichever proxy carries it.
func (pr *mirrorPair) stall(on bool) {
	if pr.wan != nil {
		pr.wan.SetStalled(on)
		return
	}
	pr.proxy.stall(on)
}

// cut cuts (or heals) the pair's link, whichever proxy carries it.
func (pr *mirrorPair) cut(on bool) {
	if pr.wan != nil {
		pr.wan.SetCut(on)
		return
	}
	if on {
		pr.proxy.cutLink()
	} else {
		pr.proxy.healLink()
	}
}

// seqWriter writes runs of run blocks, each block once, in a random order
// of the runs over [0, span), one write at a time; block versions are
// numbered in write order, so that a replica's content tells which writes
// it holds.
type seqWriter struct {
	h     *blockHistory
	order []int // sequence k (from 1) writes block order[(k-1)/run]*run + (k-1)%run
	run   int
	done  chan error
	stop  atomic.Bool
}

// startSeqWriter starts the writer on node n; pace, if positive, spaces the
// writes to that many bytes per second.
func startSeqWriter(t *testing.T, n *mirrorNode, seed uint64, span int64, run int, pace float64) *seqWriter {
	t.Helper()
	w := &seqWriter{h: newHistory(seed), run: run, done: make(chan error, 1),
		order: rand.New(rand.NewPCG(seed, 7)).Perm(int(span / int64(run*mirrorBlock)))}
	c, err := dialNBD("unix", n.sock, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer func() { _ = c.disconnect() }()
		start := time.Now()
		for i, k := range w.order {
			if w.stop.Load() {
				break
			}
			if pace > 0 { // load generation, not a wait for a state
				due := start.Add(time.Duration(float64(i*run*mirrorBlock) / pace * float64(time.Second)))
				time.Sleep(time.Until(due))
			}
			if err := w.h.writeRun(c, int64(k*run)*mirrorBlock, run); err != nil {
				w.done <- err
				return
			}
		}
		w.done <- nil
	}()
	return w
}

func (w *seqWriter) wait(t *testing.T) {
	t.Helper()
	if err := <-w.done; err != nil {
		t.Fatalf("writer: %v", err)
	}
}

// offOf is the block that version seq wrote.
func (w *seqWriter) offOf(seq uint64) int64 {
	k := int(seq - 1)
	return int64(w.order[k/w.run]*w.run+k%w.run) * mirrorBlock
}

// requirePrefix fails unless data holds exactly the versions 1..held of
// the writer's history for some held (each block is written once), and
// returns held.
func (w *seqWriter) requirePrefix(t *testing.T, what string, data []byte) uint64 {
	t.Helper()
	sent := w.h.seq.Load() // read after data: nothing on the replica is newer
	present := make([]bool, sent+1)
	var held uint64
	for off := int64(0); off+mirrorBlock <= int64(len(data)); off += mirrorBlock {
		zero, s, soff, seq, ok := readStamp(data[off : off+mirrorBlock])
		switch {
		case zero:
			continue
		case !ok || s != w.h.seed || soff != off || seq == 0 || seq > sent || w.offOf(seq) != off:
			t.Fatalf("%s: block at %d holds a version never written there (valid=%v seed=%d off=%d seq=%d, %d sent)", what, off, ok, s, soff, seq, sent)
		}
		present[seq] = true
		held++
	}
	for k := uint64(1); k <= held; k++ {
		if !present[k] {
			t.Fatalf("%s: not a write-order prefix: lacks version %d (block %d) with %d versions held of %d sent", what, k, w.offOf(k), held, sent)
		}
	}
	return held
}

// quiescentImage stalls the link and reads beta's backing file until two
// reads agree (what was already delivered has been applied); the caller
// unstalls.
func (pr *mirrorPair) quiescentImage(t *testing.T) []byte {
	t.Helper()
	pr.stall(true)
	var prev, data []byte
	waitFor(t, stateTimeout, "beta's disk to settle under the stall", func() bool {
		var err error
		if data, err = os.ReadFile(pr.beta.path); err != nil {
			t.Fatal(err)
		}
		same := prev != nil && bytes.Equal(prev, data)
		prev = data
		return same
	})
	return data[:pr.size]
}

// TestWANAsyncRPOWithinBound: a sustained load at about half the link rate
// over 50 ms / 100 Mbit/s keeps the lag (bytes and seconds, from status,
// polled throughout) under peer.max-lag, never over the bound; the
// replicas are identical at the end and hold every acknowledged write.
func TestWANAsyncRPOWithinBound(t *testing.T) {
	const boundBytes, boundTime = 4 << 20, time.Second
	pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB",
		alphaSet: []string{fmt.Sprintf("peer.max-lag.bytes=%d", boundBytes), "peer.max-lag.time=" + boundTime.String(), "peer.lag-policy=alert"},
		wan:      &wanproxy.Config{Up: wan100, Down: wan100, Seed: 3}})
	const rate = 6e6 // bytes/s, under the 12.5 MB/s link, with incompressible blocks
	w := startSeqWriter(t, pr.alpha, mirrorSeed(t), 64<<20, 16, rate)
	var maxBytes int64
	var maxSecs float64
	polls := 0
	for finished := false; !finished; {
		select {
		case err := <-w.done:
			if err != nil {
				t.Fatalf("writer: %v", err)
			}
			finished = true
		default:
		}
		st := pr.alpha.status()
		polls++
		if st.Peer == nil || st.Peer.Connection != "Connected" || st.Peer.Replication != "Established" {
			t.Fatalf("alpha left Established under a load below the link rate: %s", st.brief())
		}
		maxBytes, maxSecs = max(maxBytes, st.Peer.LagBytes), max(maxSecs, st.Peer.LagSeconds)
		if st.Peer.LagOverBound || st.Peer.LagBytes > boundBytes || st.Peer.LagSeconds > boundTime.Seconds() {
			t.Fatalf("lag %d bytes / %.3f s over the bound %d bytes / %v: %s", st.Peer.LagBytes, st.Peer.LagSeconds, boundBytes, boundTime, st.raw)
		}
	}
	t.Logf("%d writes at %.0f MB/s: %d status polls, lag at most %d bytes and %.3f s (bound %d bytes, %v)",
		w.h.acks.Load(), rate/1e6, polls, maxBytes, maxSecs, boundBytes, boundTime)
	if polls < 20 {
		t.Fatalf("only %d status polls during the load", polls)
	}
	pr.alpha.waitStatus("lag back to 0", stateTimeout, func(s mirrorStatus) bool { return s.Peer.LagBytes == 0 && s.inSync() })
	pr.stopAndCompare(t)
	data, err := os.ReadFile(pr.beta.path)
	if err != nil {
		t.Fatal(err)
	}
	w.h.requireMatches(t, "beta after the load", data[:pr.size])
}

// TestWANAsyncBurstSpillsToJournalAndDrains: a burst written faster than
// 100 Mbit/s with a small window spills to the journal (journal_bytes > 0
// in status) and drains (lag back to 0) without going Ahead; sampled twice
// during the drain (link stalled, beta settled) and at the end, beta holds a
// write-order prefix of the burst.
func TestWANAsyncBurstSpillsToJournalAndDrains(t *testing.T) {
	pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB",
		alphaSet: []string{"peer.async-window=32MiB", "peer.journal.size=128MiB", "peer.timeout=20s"},
		betaSet:  []string{"peer.timeout=20s"},
		wan:      &wanproxy.Config{Up: wan100, Down: wan100, Seed: 4}})
	w := startSeqWriter(t, pr.alpha, mirrorSeed(t), 96<<20, 16, 0)
	var maxJournal int64
	spilling := func(s mirrorStatus) bool {
		maxJournal = max(maxJournal, s.Peer.JournalBytes)
		return s.Peer.JournalBytes > 0
	}
	for i := range 2 {
		pr.alpha.waitStatus("the burst in the journal", stateTimeout, spilling)
		data := pr.quiescentImage(t)
		held := w.requirePrefix(t, fmt.Sprintf("beta during the drain (sample %d)", i+1), data)
		pr.stall(false)
		t.Logf("sample %d: beta holds versions 1..%d of %d written", i+1, held, w.h.seq.Load())
	}
	w.wait(t)
	st := pr.alpha.waitStatus("the journal drained, lag 0", resyncTimeout, func(s mirrorStatus) bool {
		spilling(s)
		return s.Peer.LagBytes == 0 && s.Peer.JournalBytes == 0 && s.inSync()
	})
	if j := st.Peer.Journal; j == nil || j.SpilledWrites == 0 || j.FullEvents != 0 {
		t.Fatalf("journal after the burst: want writes spilled and never full: %s", st.raw)
	}
	if n := pr.alpha.logCount("Ahead, tracking writes in the bitmap"); n != 0 {
		t.Fatalf("alpha went Ahead %d times with room in the journal", n)
	}
	t.Logf("%d writes (%d MiB), up to %d journal bytes, %d spilled", w.h.acks.Load(), len(w.order)*16*mirrorBlock>>20, maxJournal, st.Peer.Journal.SpilledWrites)
	data := pr.quiescentImage(t)
	if held := w.requirePrefix(t, "beta drained", data); held != w.h.seq.Load() {
		t.Fatalf("beta holds %d of %d versions after the drain", held, w.h.seq.Load())
	}
	pr.stall(false)
	pr.stopAndCompare(t)
}

// TestWANAsyncLinkCutJournalBitmapCatchUp: the link blackholes (stalled,
// connection kept), so the journal fills and the Primary goes Ahead; then it
// is cut outright for 20 s (3 minutes with E2E_SOAK set) with writes
// going on; healed, the Primary reconnects, catches up from the bitmap and
// the replicas end identical with every acknowledged write.
func TestWANAsyncLinkCutJournalBitmapCatchUp(t *testing.T) {
	cutFor := 20 * time.Second
	if os.Getenv("E2E_SOAK") != "" {
		cutFor = 3 * time.Minute // the soak run's "minutes"; E2E_SOAK counts other tests' iterations
	}
	set := []string{"peer.timeout=8s", "peer.ping-interval=500ms"}
	pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB",
		alphaSet: append(set, "peer.async-window=32MiB", "peer.journal.size=8MiB"), betaSet: set,
		wan: &wanproxy.Config{Up: wan100, Down: wan100, Seed: 5}})
	seed := mirrorSeed(t)
	h := newHistory(seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	c, err := dialNBD("unix", pr.alpha.sock, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	write := func(n int) {
		t.Helper()
		for range n {
			if err := h.writeRun(c, rng.Int64N(pr.size/(16*mirrorBlock))*16*mirrorBlock, 16); err != nil {
				t.Fatal(err)
			}
		}
	}

	pr.stall(true)
	write(768) // 48 MiB: past the window and the journal
	st := pr.alpha.waitStatus("Ahead", stateTimeout, func(s mirrorStatus) bool { return s.Peer.Replication == "Ahead" })
	if j := st.Peer.Journal; j == nil || j.SpilledWrites == 0 || j.FullEvents == 0 {
		t.Fatalf("Ahead without having filled the journal: %s", st.raw)
	}
	t.Logf("blackholed: Ahead with lag %d bytes / %.1f s, journal %d of %d bytes", st.Peer.LagBytes, st.Peer.LagSeconds, st.Peer.JournalBytes, st.Peer.JournalCapacity)

	pr.cut(true)
	cutAt := time.Now()
	pr.alpha.waitDisconnected()
	for time.Since(cutAt) < cutFor { // writes go on through the cut
		write(16)
		time.Sleep(250 * time.Millisecond) // pacing the load, not waiting for a state
	}
	st = pr.alpha.status()
	if st.Peer.LagBytes < 40<<20 || st.Peer.LagSeconds < cutFor.Seconds() {
		t.Fatalf("after a %v cut: lag %d bytes / %.1f s", cutFor, st.Peer.LagBytes, st.Peer.LagSeconds)
	}
	t.Logf("cut for %v: lag %d bytes / %.1f s, %d out of sync", cutFor, st.Peer.LagBytes, st.Peer.LagSeconds, st.OutOfSyncBytes)

	pr.stall(false)
	pr.cut(false)
	healed := time.Now()
	pr.alpha.waitStatus("catch-up from the bitmap", resyncTimeout, func(s mirrorStatus) bool {
		return s.Peer.Replication == "SyncSource" || s.inSync()
	})
	write(64) // live writes during the catch-up
	pr.waitInSync(resyncTimeout)
	t.Logf("caught up %v after the heal", time.Since(healed).Round(time.Millisecond))
	pr.alpha.waitStatus("lag 0", stateTimeout, func(s mirrorStatus) bool { return s.Peer.LagBytes == 0 })
	if err := c.disconnect(); err != nil {
		t.Fatal(err)
	}
	pr.stopAndCompare(t)
	data, err := os.ReadFile(pr.beta.path)
	if err != nil {
		t.Fatal(err)
	}
	h.requireMatches(t, "beta after the cut", data[:pr.size])
}
