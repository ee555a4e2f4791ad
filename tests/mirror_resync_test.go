package tests

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// Resync: after a link cut only the regions written meanwhile cross the
// link, and an interrupted resync resumes where it stopped, whichever side
// was interrupted.

// TestLinkCutResyncsOnlyDirty cuts the link under load, writes a known set
// of blocks while cut, and checks that the Primary counts exactly those
// bytes out of sync and that the resync after the heal moves exactly them.
func TestLinkCutResyncsOnlyDirty(t *testing.T) {
	seed := mirrorSeed(t)
	rng := rand.New(rand.NewPCG(seed, 3))
	pr := startPrimary(t, pairOptions{mode: "sync"})
	h := newHistory(seed)
	// The known set: 1024 distinct blocks (4 MiB) over the whole volume.
	// The writers write only these, so whatever was in flight at the cut
	// is in the set too, and after the cut each writer writes every block
	// of its share once more: all of the set, and nothing else, is dirty.
	known := randomBlocks(rng, 1024, 0, pr.size)
	dirty := int64(len(known)) * mirrorBlock
	g := startWriters(t, pr.alpha.sock, h, partition(known, 4))
	waitAcks(t, h, 300)
	pr.proxy.cutLink()
	g.finishWithPass()
	g.requireNoErrors(t, false) // the Primary keeps serving while cut

	aSt := pr.alpha.waitDisconnected()
	if aSt.OutOfSyncBytes != dirty {
		t.Fatalf("alpha while cut: out_of_sync_bytes %d, want the %d bytes written (%d blocks); %s", aSt.OutOfSyncBytes, dirty, len(known), aSt.brief())
	}
	if aSt.Role != "Primary" || aSt.Disk != "UpToDate" {
		t.Fatalf("alpha while cut: %s", aSt.brief())
	}
	bSt := pr.beta.waitDisconnected()
	toBefore := pr.proxy.toTarget.Load()

	pr.proxy.healLink()
	aSt2, bSt2 := pr.waitInSync(resyncTimeout)
	link := pr.proxy.toTarget.Load() - toBefore
	sent := aSt2.Peer.ResyncBytes - aSt.Peer.ResyncBytes
	received := bSt2.Peer.ResyncBytes - bSt.Peer.ResyncBytes
	t.Logf("dirty %d bytes; resync sent %d, received %d; %d bytes alpha->beta on the link", dirty, sent, received, link)
	if sent != dirty || received != dirty {
		t.Fatalf("resync moved %d bytes (beta received %d), want exactly the %d dirty bytes", sent, received, dirty)
	}
	if limit := dirty + dirty/20; link < dirty || link > limit {
		t.Fatalf("%d bytes crossed the link alpha->beta during the resync, want between %d and %d (dirty + 5%%)", link, dirty, limit)
	}

	// Online verify agrees: nothing differs.
	out := pr.alpha.mustCLI("verify", "--json")
	var res struct {
		CheckedBytes    int64 `json:"checked_bytes"`
		MismatchedBytes int64 `json:"mismatched_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("verify --json: %v: %q", err, out)
	}
	if res.CheckedBytes != pr.size || res.MismatchedBytes != 0 {
		t.Fatalf("verify after the resync: %s; want %d bytes checked, none mismatched", strings.TrimSpace(out), pr.size)
	}

	data := pr.alpha.readVolume(pr.size)
	h.requireMatches(t, "alpha", data)
	if got, want := pr.stopAndCompare(t), sha256Bytes(data); got != want {
		t.Fatalf("backing files (sha256 %s) differ from what alpha served (%s)", got, want)
	}
}

// TestResyncInterruptedEitherSide interrupts a rate-limited 48 MiB resync
// three ways: (a) a link cut, (b) kill -9 of the target, (c) kill -9 of
// the source (the Primary). The target stays Inconsistent (its last
// consistent image kept in the undo log) until the resync completes; each
// resync resumes rather than starting over; the replicas end identical.
func TestResyncInterruptedEitherSide(t *testing.T) {
	seed := mirrorSeed(t)
	pr := startPrimary(t, pairOptions{mode: "sync", alphaSet: []string{"peer.resync-max-rate=8MiB"}})
	h := newHistory(seed)

	// makeDirty cuts the link and writes 48 MiB (activity-log extents 2 to
	// 13) on alpha: a resync of about 6 s at 8 MiB/s.
	makeDirty := func() int64 {
		t.Helper()
		pr.proxy.cutLink()
		pr.alpha.waitDisconnected()
		pr.beta.waitDisconnected()
		c, err := dialNBD("unix", pr.alpha.sock, "vol0")
		if err != nil {
			t.Fatal(err)
		}
		const lo, hi, run = 2 * alExtent, 14 * alExtent, 64 // 256 KiB writes
		for off := int64(lo); off < hi; off += run * mirrorBlock {
			if err := h.writeRun(c, off, run); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.disconnect(); err != nil {
			t.Fatal(err)
		}
		if st := pr.alpha.status(); st.OutOfSyncBytes != hi-lo {
			t.Fatalf("alpha after writing %d bytes while cut: %s", hi-lo, st.brief())
		}
		return hi - lo
	}
	// waitProgress waits until n's resync counter passed base+min.
	waitProgress := func(n *mirrorNode, base, min, dirty int64) mirrorStatus {
		t.Helper()
		st := n.waitStatus("resync progress", resyncTimeout, func(s mirrorStatus) bool {
			return s.Peer != nil && s.Peer.ResyncBytes-base >= min
		})
		if st.Peer.ResyncBytes-base >= dirty {
			t.Fatalf("resync already done before the interruption; slow it down: %s", st.brief())
		}
		return st
	}
	// refusePromote checks that an interrupted target is Inconsistent
	// with its last consistent image in the undo log (a promotion would
	// roll back to it: TestAsyncCatchUpKillPrimaryPromotesConsistentExt4).
	refusePromote := func(n *mirrorNode) {
		t.Helper()
		if st := n.status(); st.Role != "Secondary" || st.Disk != "Inconsistent" || st.UndoBytes == 0 {
			t.Fatalf("%s interrupted mid-resync: %s undo %d; want Secondary, Inconsistent, its old image in the undo log", n.name, st.brief(), st.UndoBytes)
		}
	}
	// checkReplicas compares alpha's content with the history and beta's
	// backing file with alpha's content (both idle and in sync).
	checkReplicas := func(what string) {
		t.Helper()
		data := pr.alpha.readVolume(pr.size)
		h.requireMatches(t, what+": alpha", data)
		if a, b := sha256Bytes(data), pr.beta.fileHash(pr.size); a != b {
			t.Fatalf("%s: beta's backing file (sha256 %s) differs from alpha's volume (%s)", what, b, a)
		}
	}
	start := time.Now()

	// (a) Cut mid-resync.
	dirty := makeDirty()
	base := pr.alpha.status().Peer.ResyncBytes
	pr.proxy.healLink()
	waitProgress(pr.alpha, base, dirty/4, dirty)
	pr.proxy.cutLink()
	aSt := pr.alpha.waitDisconnected()
	bSt := pr.beta.waitDisconnected()
	left := aSt.OutOfSyncBytes
	if left <= 0 || left >= dirty {
		t.Fatalf("(a) alpha after the cut mid-resync: %s; want some, not all, of %d bytes left", aSt.brief(), dirty)
	}
	if bSt.Disk != "Inconsistent" {
		t.Fatalf("(a) beta cut mid-resync: %s; want disk Inconsistent", bSt.brief())
	}
	refusePromote(pr.beta)
	pr.proxy.healLink()
	aSt2, _ := pr.waitInSync(resyncTimeout)
	after, total := aSt2.Peer.ResyncBytes-aSt.Peer.ResyncBytes, aSt2.Peer.ResyncBytes-base
	t.Logf("(a) link cut: %d dirty, %d sent before the cut, %d left; %d sent after the heal, %d in all", dirty, aSt.Peer.ResyncBytes-base, left, after, total)
	if after > left || total > 2*dirty {
		t.Errorf("(a) resync after the heal moved %d bytes (%d in all) with %d left of %d: it started over instead of resuming", after, total, left, dirty)
	}
	checkReplicas("(a)")

	// (b) kill -9 of the target mid-resync.
	dirty = makeDirty()
	base = pr.alpha.status().Peer.ResyncBytes
	pr.proxy.healLink()
	waitProgress(pr.alpha, base, dirty/4, dirty)
	pr.beta.p.kill()
	aSt = pr.alpha.waitDisconnected()
	left = aSt.OutOfSyncBytes
	if left <= 0 || left >= dirty {
		t.Fatalf("(b) alpha after beta's crash mid-resync: %s; want some, not all, of %d bytes left", aSt.brief(), dirty)
	}
	pr.beta.restart()
	if st := pr.beta.waitStatus("status after restart", stateTimeout, func(mirrorStatus) bool { return true }); st.Disk != "Inconsistent" {
		t.Fatalf("(b) beta restarted mid-resync: %s; want disk Inconsistent", st.brief())
	}
	refusePromote(pr.beta)
	aSt2, _ = pr.waitInSync(resyncTimeout)
	after, total = aSt2.Peer.ResyncBytes-aSt.Peer.ResyncBytes, aSt2.Peer.ResyncBytes-base
	t.Logf("(b) target killed: %d dirty, %d sent before, %d left; %d sent after the restart, %d in all", dirty, aSt.Peer.ResyncBytes-base, left, after, total)
	if after > left || total > 2*dirty {
		t.Errorf("(b) resync after beta's restart moved %d bytes (%d in all) with %d left of %d: it started over instead of resuming", after, total, left, dirty)
	}
	checkReplicas("(b)")

	// (c) kill -9 of the source, the Primary, mid-resync. The restarted
	// node also resyncs its activity log (the extents written), so only
	// the 2x bound applies.
	dirty = makeDirty()
	base = pr.beta.status().Peer.ResyncBytes // beta keeps running: count there
	pr.proxy.healLink()
	waitProgress(pr.beta, base, dirty/4, dirty)
	pr.alpha.p.kill()
	bSt = pr.beta.waitDisconnected()
	if bSt.Disk != "Inconsistent" {
		t.Fatalf("(c) beta after the source's crash mid-resync: %s; want disk Inconsistent", bSt.brief())
	}
	// The failover case: the survivor is half-synced; only its undo log
	// makes it promotable.
	refusePromote(pr.beta)
	pr.alpha.restart()
	pr.alpha.promote()
	_, bSt2 := pr.waitInSync(resyncTimeout)
	total = bSt2.Peer.ResyncBytes - base
	t.Logf("(c) source killed: %d dirty, %d received before, %d after the restart, %d in all", dirty, bSt.Peer.ResyncBytes-base, bSt2.Peer.ResyncBytes-bSt.Peer.ResyncBytes, total)
	if total > 2*dirty {
		t.Errorf("(c) resync moved %d bytes in all for %d dirty: more than twice", total, dirty)
	}
	checkReplicas("(c)")
	t.Logf("three interrupted resyncs in %v", time.Since(start).Round(time.Millisecond))
	pr.stopAndCompare(t)
}
