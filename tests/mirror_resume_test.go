package tests

import (
	"os"
	"strings"
	"testing"
)

// TestAsyncCatchUpTargetKilledResumes: kill -9 of the target in the middle
// of a catch-up after Ahead, with the Primary idle meanwhile (so both keep
// the same generation). The restarted target still holds its undo log and
// says so in its Hello; the catch-up resumes as a bitmap resync of what
// was left (not a full one: far less than the volume crosses the link),
// and ends with identical replicas holding every write.
func TestAsyncCatchUpTargetKilledResumes(t *testing.T) {
	set := []string{"peer.timeout=20s", "peer.ping-interval=500ms", "peer.async-window=32MiB", "peer.journal.size=4MiB"}
	pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB",
		alphaSet: append(set, "peer.resync-max-rate=2MiB"), betaSet: set})
	w := pr.aheadThenFlow(t, 48<<20) // about 12 MiB of it into the bitmap

	bSt := pr.beta.waitStatus("Behind, part of the catch-up applied", resyncTimeout, func(st mirrorStatus) bool {
		return st.Peer != nil && st.Peer.Replication == "Behind" && st.Peer.Resync != nil &&
			st.Peer.Resync.DoneBytes >= 2<<20 && st.UndoBytes > 0
	})
	pr.beta.p.kill()
	aSt := pr.alpha.waitDisconnected()
	left, gen := aSt.OutOfSyncBytes, aSt.Generations
	t.Logf("beta killed after %d of %d catch-up bytes; alpha has %d left", bSt.Peer.Resync.DoneBytes, bSt.Peer.Resync.TotalBytes, left)
	if left <= 0 || left >= bSt.Peer.Resync.TotalBytes {
		t.Fatalf("alpha after the kill mid catch-up: %s; want some, not all, of %d bytes left", aSt.brief(), bSt.Peer.Resync.TotalBytes)
	}

	pr.beta.restart()
	bSt = pr.beta.status()
	if bSt.Disk != "Inconsistent" || bSt.UndoBytes == 0 {
		t.Fatalf("beta restarted after kill -9 mid catch-up: %s undo %d; want Inconsistent with its undo log", bSt.brief(), bSt.UndoBytes)
	}
	undo := bSt.UndoBytes
	aSt2, _ := pr.waitInSync(resyncTimeout)
	if aSt2.Generations != gen {
		t.Fatalf("alpha's generations moved from %s to %s: the test needs it idle", gen, aSt2.Generations)
	}
	sent := aSt2.Peer.ResyncBytes - aSt.Peer.ResyncBytes
	t.Logf("resumed: %d bytes resynced after the restart (%d were left, volume %d); beta's undo log held %d bytes", sent, left, pr.size, undo)
	if sent > left || sent >= pr.size/4 {
		t.Fatalf("the resumed catch-up sent %d bytes with %d left of a %d-byte volume: a full resync, not a bitmap one", sent, left, pr.size)
	}
	if !strings.Contains(aSt2.Peer.Reason, "interrupted bitmap resync resumes") {
		t.Fatalf("alpha's reason for the resync: %q", aSt2.Peer.Reason)
	}
	if st := pr.beta.status(); st.UndoBytes != 0 {
		t.Fatalf("beta's undo log still %d bytes in sync", st.UndoBytes)
	}
	pr.stopAndCompare(t)
	data, err := os.ReadFile(pr.beta.path)
	if err != nil {
		t.Fatal(err)
	}
	if held := w.requirePrefix(t, "beta", data[:pr.size]); held != w.h.seq.Load() {
		t.Fatalf("beta holds versions 1..%d of %d", held, w.h.seq.Load())
	}
}
