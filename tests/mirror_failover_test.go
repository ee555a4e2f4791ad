package tests

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// Failover after a crash of the Primary: kill -9 under load, then check
// what the survivor holds against every acknowledged write.

// TestSyncKillPrimaryLosesNoAckedWrite: in sync mode (protocol C) a write
// is acknowledged only once both disks hold it, so after kill -9 of the
// Primary at any moment the Secondary is UpToDate, can be promoted without
// --force, and holds every acknowledged write (or a newer version that was
// in flight).
func TestSyncKillPrimaryLosesNoAckedWrite(t *testing.T) {
	seed := mirrorSeed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	iters := soakIterations(t, 20)
	start := time.Now()
	for i := range iters {
		if !t.Run(fmt.Sprintf("iteration-%02d", i), func(t *testing.T) {
			syncKillIteration(t, rng, seed+uint64(i))
		}) {
			break
		}
	}
	t.Logf("%d iterations in %v", iters, time.Since(start).Round(time.Millisecond))
}

func syncKillIteration(t *testing.T, rng *rand.Rand, seed uint64) {
	pr := startPrimary(t, pairOptions{mode: "sync"})
	h := newHistory(seed)
	// 8 writers, 2048 blocks spread over the whole volume (every activity
	// log extent), each block owned by one writer.
	blocks := randomBlocks(rng, 2048, 0, pr.size)
	g := startWriters(t, pr.alpha.sock, h, partition(blocks, 8))
	waitAcks(t, h, 50)
	// The random moment of the crash (seeded): a delay, not a wait for a
	// state.
	delay := time.Duration(rng.Int64N(int64(300 * time.Millisecond)))
	time.Sleep(delay)
	pr.alpha.p.kill()
	g.wait()
	g.requireNoErrors(t, true)
	pr.alpha.requireNoPeerDrop()

	st := pr.beta.waitDisconnected()
	if st.Disk != "UpToDate" || st.Role != "Secondary" {
		t.Fatalf("beta after the Primary's crash: %s; want a Secondary with an UpToDate disk", st.brief())
	}
	pr.beta.promote() // without --force: an UpToDate disk must be promotable
	data := pr.beta.readVolume(pr.size)
	h.requireMatches(t, "beta after failover", data)

	h.mu.Lock()
	acked, inflight, landed := len(h.last), len(h.pending), 0
	for off, seq := range h.pending {
		if _, _, _, s, _ := readStamp(data[off : off+mirrorBlock]); s == seq {
			landed++
		}
	}
	h.mu.Unlock()
	t.Logf("killed alpha %v after 50 acks: %d acknowledged writes over %d blocks, %d in flight (%d of them on beta): beta holds every acknowledged write",
		delay.Round(time.Millisecond), h.acks.Load(), acked, inflight, landed)
	pr.beta.p.stop()
}

// TestAsyncKillPrimaryTargetIsPrefix: in async mode (protocol A) the
// Secondary may lack acknowledged writes, but what it holds is a prefix of
// the write history: one writer stamps each block with its sequence
// number, waiting for every reply before the next write, over a random
// permutation of the blocks (so that disk order is not write order); after
// kill -9 of the Primary, if the block of sequence k is on the Secondary,
// so is every block of a smaller sequence.
func TestAsyncKillPrimaryTargetIsPrefix(t *testing.T) {
	seed := mirrorSeed(t)
	rng := rand.New(rand.NewPCG(seed, 2))
	iters := soakIterations(t, 20)
	start := time.Now()
	for i := range iters {
		if !t.Run(fmt.Sprintf("iteration-%02d", i), func(t *testing.T) {
			asyncKillIteration(t, rng, seed+uint64(i))
		}) {
			break
		}
	}
	t.Logf("%d iterations in %v", iters, time.Since(start).Round(time.Millisecond))
}

func asyncKillIteration(t *testing.T, rng *rand.Rand, seed uint64) {
	// 2 ms each way: the Primary acknowledges writes its peer does not
	// have yet, which a crash then loses, within the prefix rule.
	pr := startPrimary(t, pairOptions{mode: "async", linkLatency: 2 * time.Millisecond})
	h := newHistory(seed)
	nblocks := int(pr.size / mirrorBlock)
	perm := rng.Perm(nblocks) // sequence k+1 writes block perm[k]
	c, err := dialNBD("unix", pr.alpha.sock, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	writerDone := make(chan error, 1)
	go func() {
		for _, b := range perm {
			if err := h.write(c, int64(b)*mirrorBlock); err != nil {
				_ = c.Close()
				writerDone <- err
				return
			}
		}
		writerDone <- c.disconnect()
	}()
	waitAcks(t, h, 100)
	delay := time.Duration(rng.Int64N(int64(400 * time.Millisecond)))
	time.Sleep(delay)
	pr.alpha.p.kill()
	pr.alpha.requireNoPeerDrop()
	werr := <-writerDone
	if _, ok := werr.(*errnoError); ok {
		t.Fatalf("writer: %v", werr)
	}
	sent, acked := h.seq.Load(), uint64(h.acks.Load())

	st := pr.beta.waitDisconnected()
	if st.Disk != "UpToDate" {
		t.Fatalf("beta after the Primary's crash: %s; want an UpToDate (write-order consistent) disk", st.brief())
	}
	data := pr.beta.readVolume(pr.size)
	present := make([]bool, sent+1)
	var held uint64
	for off := int64(0); off < pr.size; off += mirrorBlock {
		zero, s, soff, seq, ok := readStamp(data[off : off+mirrorBlock])
		switch {
		case zero:
			continue
		case !ok || s != seed || soff != off || seq == 0 || seq > sent || int64(perm[seq-1])*mirrorBlock != off:
			t.Fatalf("beta block at %d holds a version never written there (valid=%v seed=%d off=%d seq=%d, %d sent)", off, ok, s, soff, seq, sent)
		}
		present[seq] = true
		held++
	}
	// held blocks must be exactly sequences 1..held.
	for k := uint64(1); k <= held; k++ {
		if !present[k] {
			var later uint64
			for j := k + 1; j <= sent; j++ {
				if present[j] {
					later = j
					break
				}
			}
			t.Fatalf("beta is not a write-order prefix: it lacks sequence %d (block %d) but holds sequence %d (block %d); %d blocks held, %d writes sent, %d acknowledged",
				k, int64(perm[k-1])*mirrorBlock, later, int64(perm[later-1])*mirrorBlock, held, sent, acked)
		}
	}
	if held > sent {
		t.Fatalf("beta holds %d writes, only %d were sent", held, sent)
	}
	t.Logf("killed alpha %v after 100 acks: %d writes sent, %d acknowledged, beta holds the prefix 1..%d (%d acknowledged writes lost, as async allows)",
		delay.Round(time.Millisecond), sent, acked, held, int64(acked)-int64(held))
	// Failover to the consistent prefix is an ordinary promotion.
	pr.beta.promote()
	pr.beta.p.stop()
}

// TestPrimaryKillRestartPartialResync: kill -9 of the Primary while it
// writes to two activity-log extents; restarted with the same
// configuration it comes back Secondary, marks exactly its hot extents out
// of sync (not the volume), resyncs them to beta, is promoted again, and
// both replicas end identical with every acknowledged write.
func TestPrimaryKillRestartPartialResync(t *testing.T) {
	seed := mirrorSeed(t)
	rng := rand.New(rand.NewPCG(seed, 4))
	pr := startPrimary(t, pairOptions{mode: "sync"})
	h := newHistory(seed)
	// 2 MiB of distinct blocks in [8 MiB, 16 MiB): activity-log extents 2
	// and 3 of the 16.
	blocks := randomBlocks(rng, 512, 2*alExtent, 4*alExtent)
	g := startWriters(t, pr.alpha.sock, h, partition(blocks, 4))
	waitAcks(t, h, 200)
	time.Sleep(time.Duration(rng.Int64N(int64(200 * time.Millisecond))))
	pr.alpha.p.kill()
	g.wait()
	g.requireNoErrors(t, true)
	pr.alpha.requireNoPeerDrop()
	pr.beta.waitDisconnected()
	betaResyncBefore := pr.beta.status().Peer.ResyncBytes
	// The hot extents: at least those of acknowledged writes, at most
	// those of every write sent.
	ackedExt, sentExt := map[int64]bool{}, map[int64]bool{}
	for off := range h.versions() {
		ackedExt[off/alExtent] = true
	}
	for _, off := range h.touched() {
		sentExt[off/alExtent] = true
	}

	toBefore, fromBefore := pr.proxy.toTarget.Load(), pr.proxy.fromTarget.Load()
	pr.alpha.restart()
	// The restarted node names what the crash costs: its hot extents.
	v, ok := logValue(t, pr.alpha.p, "unclean shutdown", "out_of_sync_bytes")
	if !ok {
		t.Fatalf("restarted alpha logged no unclean-shutdown line with out_of_sync_bytes:\n%s", pr.alpha.p.log())
	}
	f, _ := v.(float64)
	alBytes := int64(f)
	if alBytes%alExtent != 0 || alBytes < int64(len(ackedExt))*alExtent || alBytes > int64(len(sentExt))*alExtent {
		t.Fatalf("restarted alpha: out_of_sync_bytes %v after the crash, want the hot extents: %d to %d extents of %d bytes",
			v, len(ackedExt), len(sentExt), alExtent)
	}
	if st := pr.alpha.waitStatus("status after restart", stateTimeout, func(mirrorStatus) bool { return true }); st.Role != "Secondary" {
		t.Fatalf("restarted alpha: %s; a node with a peer must start Secondary", st.brief())
	}
	aSt, bSt := pr.waitInSync(resyncTimeout)
	moved := max(aSt.Peer.ResyncBytes, bSt.Peer.ResyncBytes-betaResyncBefore)
	link := pr.proxy.toTarget.Load() - toBefore + pr.proxy.fromTarget.Load() - fromBefore
	t.Logf("crash cost: %d hot extents (%d bytes); resync moved %d bytes (alpha counted %d, beta %d); %d bytes crossed the link",
		alBytes/alExtent, alBytes, moved, aSt.Peer.ResyncBytes, bSt.Peer.ResyncBytes-betaResyncBefore, link)
	if moved != alBytes || alBytes > 2*alExtent {
		t.Fatalf("resync after the crash moved %d bytes, want the hot extents only: %d bytes, at most 2 extents (the volume is %d)", moved, alBytes, pr.size)
	}
	if limit := alBytes + alBytes/20; link > limit {
		t.Fatalf("%d bytes crossed the link for a %d-byte resync (limit %d)", link, alBytes, limit)
	}

	pr.alpha.promote()
	aData := pr.alpha.readVolume(pr.size)
	h.requireMatches(t, "alpha after restart", aData)
	bData := pr.beta.readVolume(pr.size)
	if !bytes.Equal(aData, bData) {
		bad, msgs := h.check(bData)
		t.Fatalf("replicas differ after the resync (%d blocks of beta disagree with the history): %v", bad, msgs)
	}
	pr.stopAndCompare(t)
}
