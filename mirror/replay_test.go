package mirror

import (
	"path/filepath"
	"testing"

	"golang.org/x/time/rate"
)

// watchPrefix polls the Secondary's image while the Primary catches it up
// and fails if it is ever no prefix of the stamped history (that is: not
// equal to the Primary's image at some point of its history), goes back,
// or turns Inconsistent or a resync target. It returns once it holds all
// blocks and the Primary has nothing unacknowledged.
func watchPrefix(t *testing.T, a, b *node, blocks int) {
	t.Helper()
	read := fileReader(t, filepath.Join(b.dir, "disk.img"))
	last := 0
	waitFor(t, "replay to the end", func() bool {
		if d := b.v.Disk(); d == DiskInconsistent {
			t.Fatalf("Secondary %s during the replay", d)
		}
		if st := b.v.Status(); st.Peer != nil && (st.Peer.Replication == string(ReplSyncTarget) || st.Peer.Replication == string(ReplBehind)) {
			t.Fatalf("Secondary is %s during the replay", st.Peer.Replication)
		}
		n := prefixLen(t, read, blocks)
		if n < last {
			t.Fatalf("Secondary went back from %d to %d blocks", last, n)
		}
		last = n
		lag, _ := a.v.Lag()
		return n == blocks && lag == 0 && established(a.v) && established(b.v)
	})
}

// windowAcked reports whether the Primary's peer acknowledged every write
// the window sent itself rather than from the journal: those bytes live
// only in the send buffer, so a replay can continue only past them.
func windowAcked(v *Volume) bool {
	s := v.link.current()
	if s == nil {
		return false
	}
	s.qmu.Lock()
	defer s.qmu.Unlock()
	for _, e := range s.tl {
		if e.kind == entWrite && !e.journaled {
			return false
		}
	}
	return true
}

// TestDisconnectReplaysJournal: the link drops while the window spills to
// the journal, the Primary writes on alone, and on reconnect it replays
// its journal from the Secondary's position: no resync, no undo log, the
// Secondary a prefix of the history throughout, identical at the end.
func TestDisconnectReplaysJournal(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(64<<10, 16<<20)})
	fault.slow.Store(rate.NewLimiter(2<<20, 64<<10)) // 2 MiB/s
	writeStamped(t, a.v, 0, 1000)                    // 4 MiB: spills
	if a.v.link.journal.usedBytes() == 0 {
		t.Fatal("test setup: nothing journaled")
	}
	waitFor(t, "the window's own writes acknowledged", func() bool { return windowAcked(a.v) })
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.link.current() == nil && b.v.link.current() == nil })
	writeStamped(t, a.v, 1000, 1500) // alone
	fault.slow.Store(nil)
	resyncBefore := a.v.link.stats.resyncBytes.Load()
	fault.setCut(false)
	watchPrefix(t, a, b, 1500)
	if got := a.v.link.stats.resyncBytes.Load() - resyncBefore; got != 0 {
		t.Fatalf("resync sent %d bytes; the journal should have carried everything", got)
	}
	if b.v.undo.Load() != nil {
		t.Fatal("Secondary started an undo log for a replay")
	}
	if n := a.v.Dirty().Count(); n != 0 {
		t.Fatalf("Primary still has %d dirty regions after the replay", n)
	}
	assertIdentical(t, a, b)
	if a.v.Generations().Current != b.v.Generations().Current || a.v.Generations().Bitmap != 0 {
		t.Fatalf("generations after the replay: a %s, b %s", genString(a.v.Generations()), genString(b.v.Generations()))
	}
}

// TestReplayGapFoldsToBitmap: writes while disconnected overflow the
// journal, so it no longer continues the stream: the reconnect catches up
// from the bitmap as before (resync data, undo log) and ends identical.
func TestReplayGapFoldsToBitmap(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(64<<10, MinJournalSize)})
	writeStamped(t, a.v, 0, 100)
	settled(t, a)
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.link.current() == nil && b.v.link.current() == nil })
	writeStamped(t, a.v, 100, 1000) // 3.6 MiB through a 1 MiB journal
	if a.v.link.journal.usedBytes() != 0 {
		t.Fatal("the journal kept a stream it cannot hold")
	}
	resyncBefore := a.v.link.stats.resyncBytes.Load()
	fault.setCut(false)
	waitFor(t, "catch-up", func() bool {
		lag, _ := a.v.Lag()
		return lag == 0 && established(a.v) && established(b.v)
	})
	if got := a.v.link.stats.resyncBytes.Load() - resyncBefore; got == 0 {
		t.Fatal("no resync after the journal overflowed")
	}
	assertIdentical(t, a, b)
	// The Secondary holds a position again once the resync is done.
	settled(t, a)
	reconnect(t, a, b, fault)
	if got, own := a.v.link.peerStream(), a.v.link.ownStream(true); got.Stream != own.Stream || got.Pos != own.Pos {
		t.Fatalf("after the catch-up the peer reports %+v, the Primary is at %+v", got, own)
	}
}

// TestReplayResumesAfterTargetRestart: the Secondary is restarted in the
// middle of a replay; it names the position it had reached, and the
// replay goes on from there: still no resync, a prefix throughout.
func TestReplayResumesAfterTargetRestart(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(64<<10, 16<<20)})
	fault.slow.Store(rate.NewLimiter(2<<20, 64<<10))
	writeStamped(t, a.v, 0, 1000)
	waitFor(t, "the window's own writes acknowledged", func() bool { return windowAcked(a.v) })
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.link.current() == nil && b.v.link.current() == nil })
	writeStamped(t, a.v, 1000, 1500)
	resyncBefore := a.v.link.stats.resyncBytes.Load()
	fault.setCut(false)
	read := fileReader(t, filepath.Join(b.dir, "disk.img"))
	var mid int
	waitFor(t, "the replay under way", func() bool {
		mid = prefixLen(t, read, 1500)
		return established(b.v) && mid > 1000 && mid < 1400
	})
	restart(t, b, false)
	if got := b.v.link.appliedStream(); got.Stream == 0 || got.Pos == 0 {
		t.Fatalf("restarted Secondary holds no position: %+v", got)
	}
	fault.slow.Store(nil)
	watchPrefix(t, a, b, 1500)
	if got := a.v.link.stats.resyncBytes.Load() - resyncBefore; got != 0 {
		t.Fatalf("resync sent %d bytes", got)
	}
	if n := a.v.link.journal.status().Replays; n != 2 {
		t.Fatalf("%d replays, want 2 (the reconnect, then the restart)", n)
	}
	assertIdentical(t, a, b)
	t.Logf("restarted the Secondary at block %d of the replay", mid)
}
