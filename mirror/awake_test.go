package mirror

import (
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/mirrord/mirrord/nbd"
)

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
	a, b, fault := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b kept awake, a not", func() bool { return keptAwake(b.v) && !keptAwake(a.v) })
	if spareP() {
		t.Fatal("a second P could be reserved with GOMAXPROCS 2")
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
