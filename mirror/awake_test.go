package mirror

import (
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/nbd"
)

// cpuOver measures the process's CPU time over a window of wall time.
func cpuOver(t *testing.T, window time.Duration) (used, wall time.Duration) {
	t.Helper()
	cpu := func() time.Duration {
		var ru unix.Rusage
		if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
			t.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c0, t0 := cpu(), time.Now()
	<-time.After(window) // a measurement window, not a wait for an event
	return cpu() - c0, time.Since(t0)
}

func keptAwake(v *Volume) bool {
	s := v.link.current()
	return s != nil && s.awake.Load()
}

// spareP reports whether a P could still be reserved.
func spareP() bool {
	if !nbd.ReserveP() {
		return false
	}
	nbd.ReleaseP()
	return true
}

// The sync Secondary keeps a P in a system call, the Primary does not;
// the P follows a role swap, comes back when the session ends, and is
// never one the process cannot spare (nbd.ReserveP).
func TestKeepAwakeOnSyncSecondary(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2)) // exactly one P to spare
	a, b, fault := newPair(t, pairOpts{mode: ModeSync, peer: noPoll})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b kept awake, a not", func() bool { return keptAwake(b.v) && !keptAwake(a.v) })
	if spareP() {
		t.Fatal("a second P could be reserved with GOMAXPROCS 2")
	}
	// Kept awake is a timed wait every 5 ms, not a spin (ppoll writes the
	// time left into its argument: reused, it was zero after the first
	// wait and the loop took a whole CPU). Idle, this process uses a small
	// part of a CPU over a window of wall time.
	if used, wall := cpuOver(t, 400*time.Millisecond); used > wall/2 {
		t.Fatalf("idle pair with a kept-awake Secondary used %v of CPU in %v", used, wall)
	}
	rng := rand.New(rand.NewPCG(5, 8))
	randomWrites(t, a.v, rng, 200, 0, testSize)

	fault.setCut(true)
	waitFor(t, "the P back after the session's end", func() bool { return !keptAwake(b.v) && spareP() })
	fault.setCut(false)
	waitFor(t, "reconnection", func() bool {
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0
	})
	waitFor(t, "b kept awake again", func() bool { return keptAwake(b.v) })

	if err := a.v.Demote(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to see a demoted", func() bool { ph := b.v.link.peerState(); return ph != nil && Role(ph.Role) == RoleSecondary })
	if err := b.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a kept awake, b not", func() bool { return keptAwake(a.v) && !keptAwake(b.v) })
	randomWrites(t, b.v, rng, 200, 0, testSize)
	if err := b.v.Flush(); err != nil {
		t.Fatal(err)
	}
	assertIdentical(t, a, b)
}

// noPoll turns the link's busy polling off, as node.busy-poll: 0 does.
func noPoll(c *PeerConfig) { c.BusyPoll = -1 }

// A sync Secondary whose receive loop polls keeps no P in a system call:
// the poll keeps one busy while frames flow.
func TestKeepAwakeNotWhenPolling(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Fatal("needs 2 CPUs: on one the link never polls (TestSingleCPUNeverPolls)")
	}
	a, b, _ := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	randomWrites(t, a.v, rand.New(rand.NewPCG(2, 9)), 100, 0, testSize)
	s := b.v.link.current()
	if s == nil || !s.polls || s.wantAwake() || keptAwake(b.v) {
		t.Fatalf("polling sync Secondary: polls %v, kept awake %v", s != nil && s.polls, keptAwake(b.v))
	}
	assertIdentical(t, a, b)
}

// In async mode nothing is kept awake: the Secondary applies a stream
// that never waits for it.
func TestKeepAwakeNotInAsyncMode(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeAsync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	s := b.v.link.current()
	if s == nil || s.wantAwake() || keptAwake(b.v) {
		t.Fatal("async Secondary kept awake")
	}
}

// The P is released when either the frame rate or the byte rate is above
// a QD1 writer's: many small frames (4 KiB QD32) or a few large ones
// (1 MiB QD8, about 1000 frames a second).
func TestKeepAwakeBusy(t *testing.T) {
	for _, tc := range []struct {
		name          string
		frames, bytes uint64 // received in the span
		spans         uint64
		busy          bool
	}{
		{"QD1 4 KiB writes, one wait", 60, 60 << 12, 1, false},
		{"QD32 4 KiB writes, one wait", 300, 300 << 12, 1, true},
		{"1 MiB writes, one wait", 5, 5 << 20, 1, true},
		{"QD1 4 KiB writes, one check", 1200, 1200 << 12, 20, false},
		{"1 MiB writes, one check", 100, 100 << 20, 20, true},
		{"nothing", 0, 0, 20, false},
	} {
		s := session{l: &link{}}
		s.frames.Store(1000)
		s.l.stats.recvBytes.Store(1 << 30)
		f, b := s.recvd()
		s.frames.Add(tc.frames)
		s.l.stats.recvBytes.Add(tc.bytes)
		if got := s.busy(f, b, tc.spans); got != tc.busy {
			t.Errorf("%s: busy %v, want %v", tc.name, got, tc.busy)
		}
	}
}
