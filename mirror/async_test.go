package mirror

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// Stamped writes: block i holds i+1 in its first 8 bytes, written in
// order i = 0, 1, ... so that any prefix of the history is "blocks 0..k
// stamped, the rest zero".

func writeStamped(t *testing.T, v *Volume, from, to int) {
	t.Helper()
	buf := make([]byte, 4096)
	for i := from; i < to; i++ {
		binary.LittleEndian.PutUint64(buf, uint64(i+1))
		if err := v.WriteAt(buf, int64(i)*4096, false); err != nil {
			t.Fatalf("write block %d: %v", i, err)
		}
	}
}

// prefixLen checks that the image holds a prefix of the stamped history
// and returns its length. It reads the blocks last to first, so a live
// image (applied in stream order meanwhile) is checked correctly too:
// whatever was written before a block we saw stamped was applied before
// it, so is there when we read it later.
func prefixLen(t *testing.T, read func(p []byte, off int64) error, blocks int) int {
	t.Helper()
	buf := make([]byte, 8)
	n := -1
	for i := blocks - 1; i >= 0; i-- {
		if err := read(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		seq := binary.LittleEndian.Uint64(buf)
		switch {
		case seq == 0 && n >= 0:
			t.Fatalf("block %d is empty below stamped block %d: not a prefix", i, n-1)
		case seq != 0 && seq != uint64(i+1):
			t.Fatalf("block %d holds stamp %d", i, seq)
		case seq != 0 && n < 0:
			n = i + 1
		}
	}
	return max(n, 0)
}

func fileReader(t *testing.T, path string) func(p []byte, off int64) error {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return func(p []byte, off int64) error { _, err := f.ReadAt(p, off); return err }
}

// asyncPrimary starts a connected pair with a Primary.
func asyncPrimary(t testing.TB, po pairOpts) (a, b *node, fault *netFault) {
	t.Helper()
	a, b, fault = newPair(t, po)
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	return a, b, fault
}

func journalPeer(window, journal int64) func(*PeerConfig) {
	return func(pc *PeerConfig) {
		pc.AsyncWindow = window
		pc.JournalSize = journal
	}
}

// TestAsyncBurstSpillsToJournalAndDrains: a burst well above the link rate
// overflows the window into the journal; the target stays a prefix of the
// history at every moment, never goes Behind, and ends identical.
func TestAsyncBurstSpillsToJournalAndDrains(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(256<<10, 16<<20)})
	fault.slow.Store(rate.NewLimiter(8<<20, 64<<10)) // 8 MiB/s
	const blocks = 2000                              // 8 MiB: ~1 s of link
	stop := make(chan struct{})
	var checks atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		read := fileReader(t, filepath.Join(b.dir, "disk.img"))
		for {
			select {
			case <-stop:
				return
			default:
			}
			prefixLen(t, read, blocks)
			checks.Add(1)
		}
	}()
	start := time.Now()
	writeStamped(t, a.v, 0, blocks)
	wrote := time.Since(start)
	st := a.v.Status().Peer
	bytes, age := a.v.Lag()
	t.Logf("burst of %d writes took %v; then lag %d bytes / %v, journal %d of %d bytes", blocks, wrote, bytes, age, st.JournalBytes, st.JournalCapacity)
	if st.Journal == nil || st.Journal.SpilledWrites == 0 {
		t.Fatalf("nothing spilled to the journal: %+v", st)
	}
	if bytes < 1<<20 || age <= 0 || st.LagBytes < 1<<20 {
		t.Fatalf("lag right after the burst = %d bytes, %v (status %d): want the backlog", bytes, age, st.LagBytes)
	}
	waitFor(t, "drain", func() bool {
		n, _ := a.v.Lag()
		return n == 0 && established(a.v)
	})
	close(stop)
	wg.Wait()
	st = a.v.Status().Peer
	if st.Journal.FullEvents != 0 || st.JournalBytes != 0 || a.v.Status().OutOfSyncBytes != 0 {
		t.Fatalf("after the drain: %+v, out of sync %d", st.Journal, a.v.Status().OutOfSyncBytes)
	}
	if b.v.Status().UndoBytes != 0 || b.v.Disk() != DiskUpToDate {
		t.Fatal("target went through a resync: the journal should have carried the burst")
	}
	t.Logf("journal high water %d bytes, %d spilled writes, %d prefix checks of the live target", st.Journal.HighWater, st.Journal.SpilledWrites, checks.Load())
	assertIdentical(t, a, b)
}

// stallAndOverflow pauses the link and writes blocks [from, to) so that
// the window and the journal overflow: the primary goes Ahead.
func stallAndOverflow(t *testing.T, a *node, fault *netFault, from, to int) {
	t.Helper()
	fault.paused.Store(true)
	writeStamped(t, a.v, from, to)
	st := a.v.Status().Peer
	if st.Replication != string(ReplAhead) || st.Journal.FullEvents == 0 {
		t.Fatalf("after overflowing the journal: replication %s, %+v; want Ahead", st.Replication, st.Journal)
	}
	if n, age := a.v.Lag(); n < int64(to-from)*4096/2 || age <= 0 {
		t.Fatalf("lag while Ahead = %d bytes, %v", n, age)
	}
}

// TestAsyncStallGoesJournalAheadCatchUp: a stalled link fills the window,
// then the journal, then goes Ahead; when it recovers the journal drains
// (the target a prefix throughout) and the catch-up resync runs under the
// target's undo log, ending identical with the undo log gone.
func TestAsyncStallGoesJournalAheadCatchUp(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(256<<10, 2<<20)})
	const blocks = 1500
	writeStamped(t, a.v, 0, 100)
	waitFor(t, "base in sync", func() bool { n, _ := a.v.Lag(); return n == 0 })
	stallAndOverflow(t, a, fault, 100, blocks)
	read := fileReader(t, filepath.Join(b.dir, "disk.img"))
	before := prefixLen(t, read, blocks)
	fault.paused.Store(false)
	sawUndo := false
	waitFor(t, "catch-up", func() bool {
		if b.v.Status().UndoBytes > 0 {
			sawUndo = true
		} else if b.v.Disk() == DiskUpToDate {
			prefixLen(t, read, blocks) // before the catch-up starts: a prefix
		}
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0 && b.v.Disk() == DiskUpToDate
	})
	if !sawUndo {
		t.Fatal("never saw the target's undo log during the catch-up")
	}
	if n := b.v.Status().UndoBytes; n != 0 {
		t.Fatalf("undo log still %d bytes after the catch-up", n)
	}
	if _, err := os.Stat(undoPath(b.opts.MetaPath)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("undo file after the catch-up: %v", err)
	}
	t.Logf("target held blocks 0..%d when the link recovered", before)
	assertIdentical(t, a, b)
}

// blocks is the history overflowThenRecover writes: blocks 0..300 in sync,
// then up to blocks while the link is stalled.
const blocks = 1500

// overflowThenRecover starts an async pair (resync at 1 MiB/s) with peer,
// stalls the link until the Primary is Ahead, and lets it flow again: the
// catch-up follows. read reads the target's disk.
func overflowThenRecover(t *testing.T, peer func(*PeerConfig)) (a, b *node, fault *netFault, read func(p []byte, off int64) error) {
	t.Helper()
	a, b, fault, read = overflowed(t, peer)
	fault.paused.Store(false)
	return a, b, fault, read
}

// overflowed is overflowThenRecover up to the recovery: the link is still
// paused.
func overflowed(t *testing.T, peer func(*PeerConfig)) (a, b *node, fault *netFault, read func(p []byte, off int64) error) {
	t.Helper()
	a, b, fault = asyncPrimary(t, pairOpts{mode: ModeAsync, resyncRate: 1 << 20, peer: peer})
	writeStamped(t, a.v, 0, 300)
	waitFor(t, "base in sync", func() bool { n, _ := a.v.Lag(); return n == 0 })
	stallAndOverflow(t, a, fault, 300, blocks)
	read = fileReader(t, filepath.Join(b.dir, "disk.img"))
	return a, b, fault, read
}

// TestPromoteMidCatchUpRollsBack loses the primary at several points of
// the catch-up resync: the promoted target is the consistent image it held
// before (a prefix of the history), also after a restart of the target.
func TestPromoteMidCatchUpRollsBack(t *testing.T) {
	for _, tc := range []struct {
		name    string
		at      int64 // resync bytes the target has received
		restart bool
	}{
		{"first region", 1, false},
		{"a third", 1 << 20, false},
		{"most, after a target restart", 3 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, b, fault, read := overflowThenRecover(t, journalPeer(256<<10, 1<<20))
			var image int
			waitFor(t, "catch-up under way", func() bool {
				if b.v.Status().UndoBytes == 0 {
					image = prefixLen(t, read, blocks) // still the drain
					return false
				}
				return int64(b.v.link.stats.resyncBytes.Load()) >= tc.at
			})
			// The primary dies (as far as the target can tell).
			fault.setCut(true)
			resynced := b.v.link.stats.resyncBytes.Load()
			waitFor(t, "target sees the loss", func() bool { return b.v.Status().Peer.Connection != string(ConnConnected) })
			if b.v.Disk() != DiskInconsistent || b.v.Status().UndoBytes == 0 {
				t.Fatalf("mid catch-up: disk %s, undo %d", b.v.Disk(), b.v.Status().UndoBytes)
			}
			if tc.restart {
				if err := b.v.Close(); err != nil {
					t.Fatal(err)
				}
				b.reopen(t)
				if b.v.Disk() != DiskInconsistent || b.v.Status().UndoBytes == 0 {
					t.Fatalf("after restart: disk %s, undo %d", b.v.Disk(), b.v.Status().UndoBytes)
				}
			}
			if err := b.v.Promote(PromoteOptions{}); err != nil {
				t.Fatalf("promote mid catch-up: %v", err)
			}
			if b.v.Role() != RolePrimary || b.v.Disk() != DiskUpToDate || b.v.Status().UndoBytes != 0 {
				t.Fatalf("after promote: %s %s undo %d", b.v.Role(), b.v.Disk(), b.v.Status().UndoBytes)
			}
			got := prefixLen(t, read, blocks)
			if got < 300 || got < image {
				t.Fatalf("promoted image holds blocks 0..%d; the target had 0..%d before the catch-up", got, image)
			}
			t.Logf("killed after %d resync bytes; promoted image = blocks 0..%d", resynced, got)
		})
	}
}

// TestInterruptedCatchUpResumesByBitmap: the target of a catch-up after
// Ahead restarts mid-way while the Primary writes nothing (so both still
// hold the same generation). Its Hello says it holds the undo log of an
// interrupted bitmap resync, and the catch-up resumes from the Primary's
// bitmap with that log kept, instead of a full resync; the image the log
// guards is still the one from before the catch-up.
func TestInterruptedCatchUpResumesByBitmap(t *testing.T) {
	a, b, fault, read := overflowThenRecover(t, journalPeer(256<<10, 1<<20))
	waitFor(t, "catch-up under way", func() bool {
		return b.v.Status().UndoBytes > 0 && b.v.link.stats.resyncBytes.Load() >= 1<<20
	})
	fault.setCut(true)
	waitFor(t, "both see the cut", func() bool {
		return a.v.link.current() == nil && b.v.link.current() == nil
	})
	left := a.v.Status().OutOfSyncBytes
	gen := a.v.Generations()
	addr := b.v.PeerListenAddr().String()
	if err := b.v.Close(); err != nil {
		t.Fatal(err)
	}
	b.opts.Peer.Listen = addr // where a dials
	b.reopen(t)
	undo := b.v.Status().UndoBytes
	if b.v.Disk() != DiskInconsistent || undo == 0 || !b.v.resyncHeld() {
		t.Fatalf("target restarted mid catch-up: disk %s, undo %d", b.v.Disk(), undo)
	}
	if b.v.Generations().Current != gen.Current {
		t.Fatalf("test setup: generations moved apart (%x, %x)", b.v.Generations().Current, gen.Current)
	}
	sentBefore := a.v.link.stats.resyncBytes.Load()
	fault.setCut(false)
	waitFor(t, "the catch-up resumed and finished", func() bool {
		if st := b.v.Status(); st.UndoBytes != 0 && st.UndoBytes < undo {
			t.Fatalf("undo log shrank from %d to %d bytes: restarted instead of kept", undo, st.UndoBytes)
		}
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0 && b.v.Disk() == DiskUpToDate
	})
	sent := int64(a.v.link.stats.resyncBytes.Load() - sentBefore)
	if sent > left || sent >= testSize/2 {
		t.Fatalf("resumed resync sent %d bytes with %d left (volume %d): not a bitmap resync", sent, left, int64(testSize))
	}
	if r := a.v.Status().Peer.Reason; !strings.Contains(r, "interrupted bitmap resync resumes") {
		t.Fatalf("Primary's reason for the resync: %q", r)
	}
	if st := b.v.Status(); st.UndoBytes != 0 {
		t.Fatalf("undo log still %d bytes after the resumed catch-up", st.UndoBytes)
	}
	if got := prefixLen(t, read, blocks); got != blocks {
		t.Fatalf("target holds blocks 0..%d of %d", got, blocks)
	}
	assertIdentical(t, a, b)
	t.Logf("%d bytes left at the cut, %d sent after the restart (undo log kept: %d bytes)", left, sent, undo)
}

// TestAsyncTrimCountsFrameSize: with the link stalled, trims of the whole
// disk count their 40-byte frames against the in-flight window and the
// lag, not their 16 MiB ranges: they neither spill to the journal nor send
// the Primary Ahead, and reach the target once the link flows.
func TestAsyncTrimCountsFrameSize(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, peer: journalPeer(256<<10, 2<<20)})
	writeStamped(t, a.v, 0, 100)
	waitFor(t, "base in sync", func() bool { n, _ := a.v.Lag(); return n == 0 })
	spilled := a.v.Status().Peer.Journal.SpilledWrites // the base overflowed the window
	fault.paused.Store(true)
	const trims = 10
	for range trims {
		if err := a.v.Trim(0, testSize, false); err != nil {
			t.Fatal(err)
		}
	}
	const frame = wanFrameCost * trims
	st := a.v.Status().Peer
	lag, _ := a.v.Lag()
	fault.paused.Store(false) // before any Fatal: a paused link holds the close
	if st.Replication != string(ReplEstablished) || st.Journal.SpilledWrites != spilled || st.Journal.QueuedBytes != 0 {
		t.Fatalf("trims while stalled: replication %s, journal %+v; want them all in the window", st.Replication, st.Journal)
	}
	if st.InFlightWrites != trims || st.InFlightBytes != frame {
		t.Fatalf("in flight: %d writes, %d bytes; want %d, %d", st.InFlightWrites, st.InFlightBytes, trims, frame)
	}
	if lag != frame {
		t.Fatalf("lag = %d bytes, want %d (the frames)", lag, frame)
	}
	waitFor(t, "trims acknowledged", func() bool { n, _ := a.v.Lag(); return n == 0 })
	assertIdentical(t, a, b)
}

// wanFrameCost is a trim's frame: header and u64 length.
const wanFrameCost = 32 + 8

func TestLagPolicies(t *testing.T) {
	const bound = 1 << 20
	mk := func(t *testing.T, p LagPolicy) (a, b *node, fault *netFault) {
		t.Helper()
		return asyncPrimary(t, pairOpts{mode: ModeAsync, peer: func(pc *PeerConfig) {
			pc.AsyncWindow, pc.JournalSize = 256<<10, 8<<20
			pc.MaxLagBytes, pc.LagPolicy = bound, p
		}})
	}
	t.Run("alert", func(t *testing.T) {
		a, b, fault := mk(t, LagAlert)
		events, cancel := a.v.Subscribe()
		defer cancel()
		fault.paused.Store(true)
		writeStamped(t, a.v, 0, 2*bound/4096)
		waitEvent := func(over bool) {
			t.Helper()
			deadline := time.After(10 * time.Second)
			for {
				select {
				case e := <-events:
					if e.Type == "lag" && e.Status.Peer.LagOverBound == over {
						return
					}
				case <-deadline:
					t.Fatalf("no lag event with over=%v", over)
				}
			}
		}
		waitEvent(true)
		if n, _ := a.v.Lag(); n <= bound {
			t.Fatalf("lag %d not over the bound %d", n, bound)
		}
		fault.paused.Store(false)
		waitEvent(false)
		waitFor(t, "drain", func() bool { n, _ := a.v.Lag(); return n == 0 })
		assertIdentical(t, a, b)
	})
	t.Run("block", func(t *testing.T) {
		a, b, fault := mk(t, LagBlock)
		fault.paused.Store(true)
		var written atomic.Int64
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 4096)
			for i := range 3 * bound / 4096 {
				if err := a.v.WriteAt(buf, int64(i)*4096, false); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				written.Add(4096)
			}
		}()
		waitFor(t, "writes held", func() bool {
			w := written.Load()
			n, _ := a.v.Lag()
			return w > 0 && n >= bound && w < 3*bound
		})
		held := written.Load()
		// Held: nothing more completes while the link is stalled (give
		// the writer ten sampling periods to prove it).
		deadline := time.Now().Add(10 * lagSample)
		for time.Now().Before(deadline) {
			if n, _ := a.v.Lag(); n > bound+4096 {
				t.Fatalf("lag %d past the bound %d under the block policy", n, bound)
			}
			time.Sleep(lagSample)
		}
		if w := written.Load(); w > held+4096 {
			t.Fatalf("writes went on while held: %d then %d", held, w)
		}
		fault.paused.Store(false)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Fatal("held writes never resumed")
		}
		waitFor(t, "drain", func() bool { n, _ := a.v.Lag(); return n == 0 })
		assertIdentical(t, a, b)
	})
	t.Run("throttle", func(t *testing.T) {
		a, b, fault := mk(t, LagThrottle)
		buf := make([]byte, 4096)
		start := time.Now()
		writeStamped(t, a.v, 0, 50)
		free := time.Since(start)
		fault.paused.Store(true)
		// One write brings the lag to the bound.
		if err := a.v.WriteAt(make([]byte, bound), 0, false); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		for i := range 10 {
			if err := a.v.WriteAt(buf, int64(i)*4096, false); err != nil {
				t.Fatal(err)
			}
		}
		slowed := time.Since(start)
		fault.paused.Store(false)
		t.Logf("50 writes unthrottled: %v; 10 writes at the bound: %v", free, slowed)
		if slowed < 10*MaxThrottleDelay*8/10 {
			t.Fatalf("10 writes at the bound took %v, want about %v", slowed, 10*MaxThrottleDelay)
		}
		waitFor(t, "drain", func() bool { n, _ := a.v.Lag(); return n == 0 })
		assertIdentical(t, a, b)
	})
}

// TestJournalDuringResyncKeepsForeignBits: while a resync after a cut is
// running, partial-region writes to regions still out of sync spill to the
// journal. Their acknowledgement must not clear those regions' bits (the
// rest of each region is still stale on the peer): the replicas end
// identical.
func TestJournalDuringResyncKeepsForeignBits(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync, resyncRate: 2 << 20, peer: journalPeer(4096, 8<<20)})
	fault.slow.Store(rate.NewLimiter(4<<20, 64<<10))
	fault.setCut(true)
	waitFor(t, "cut", func() bool { return a.v.Status().Peer.Connection != string(ConnConnected) })
	writeStamped(t, a.v, 0, 1024) // 4 MiB out of sync
	// The journal kept these for a replay (replay.go); this test is about
	// a bitmap resync, which is what a journal that cannot continue the
	// stream leaves.
	if !a.v.link.journal.dropRetained() {
		t.Fatal("test setup: the journal kept nothing while cut off")
	}
	fault.setCut(false)
	waitFor(t, "resync", func() bool { return a.v.Status().Peer.Replication == string(ReplSyncSource) })
	buf := make([]byte, 512)
	for i := range 1024 {
		buf[0] = byte(i) | 1
		if err := a.v.WriteAt(buf, int64(i)*4096+1024, false); err != nil {
			t.Fatal(err)
		}
	}
	if st := a.v.Status().Peer; st.Journal.SpilledWrites == 0 {
		t.Fatalf("test setup: nothing spilled during the resync: %+v", st.Journal)
	}
	waitFor(t, "in sync", func() bool {
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0 && a.v.Status().Peer.JournalBytes == 0
	})
	assertIdentical(t, a, b)
}

// TestCatchUpPausesAtUndoCap: the target of a catch-up after Ahead is
// Behind with the total its source announced; with the undo log capped
// below the catch-up it stops there (nothing past the cap overwritten),
// refuses its source while the log is full, and promoted is the prefix it
// held before the catch-up.
func TestCatchUpPausesAtUndoCap(t *testing.T) {
	const undoCap = 512 << 10
	_, b, fault, read := overflowed(t, func(pc *PeerConfig) {
		journalPeer(256<<10, 1<<20)(pc)
		pc.UndoMaxSize = undoCap
	})
	// The Behind state can be shorter than a poll: its events say it too.
	events, cancel := b.v.Subscribe()
	defer cancel()
	fault.paused.Store(false)
	var image int
	var behind *ResyncStatus
	sawBehind := func(st Status) {
		if st.Peer.Replication == string(ReplBehind) && st.Peer.Resync != nil && (behind == nil || st.Peer.Resync.TotalBytes > behind.TotalBytes) {
			behind = st.Peer.Resync
		}
	}
	waitFor(t, "the catch-up paused at the cap", func() bool {
		for len(events) > 0 {
			sawBehind((<-events).Status)
		}
		st := b.v.Status()
		if st.UndoBytes == 0 {
			image = prefixLen(t, read, blocks) // still the drain
		}
		sawBehind(st)
		return strings.Contains(st.Peer.Reason, ErrUndoFull.Error()) && st.Peer.Connection != string(ConnConnected)
	})
	for len(events) > 0 {
		sawBehind((<-events).Status)
	}
	if behind == nil || behind.TotalBytes < undoCap {
		t.Fatalf("the target was never Behind with the announced total: %+v", behind)
	}
	if err := b.v.undoRoom(); !errors.Is(err, ErrUndoFull) {
		t.Fatalf("undoRoom after the pause: %v", err)
	}
	st := b.v.Status()
	if st.UndoBytes == 0 || st.UndoBytes > undoCap || st.UndoLimitBytes != undoCap || b.v.Disk() != DiskInconsistent {
		t.Fatalf("paused: disk %s, undo %d of %d", b.v.Disk(), st.UndoBytes, st.UndoLimitBytes)
	}
	fault.setCut(true)
	waitFor(t, "no session", func() bool { return b.v.link.current() == nil })
	if err := b.v.Promote(PromoteOptions{}); err != nil {
		t.Fatalf("promote at the cap: %v", err)
	}
	if got := prefixLen(t, read, blocks); got < 300 || got < image {
		t.Fatalf("promoted image holds blocks 0..%d; the target had 0..%d before the catch-up", got, image)
	}
	t.Logf("Behind %d of %d bytes; paused with %d undo bytes (cap %d); promoted to the prefix 0..%d", behind.DoneBytes, behind.TotalBytes, st.UndoBytes, undoCap, image)
}
