package mirror

import (
	"testing"

	"github.com/mirrord/mirrord/wan"
)

// reconnect cuts the link and heals it, and waits until both ends are
// connected and in sync again.
func reconnect(t *testing.T, a, b *node, fault *netFault) {
	t.Helper()
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.link.current() == nil && b.v.link.current() == nil })
	fault.setCut(false)
	waitFor(t, "reconnect", func() bool { return established(a.v) && established(b.v) })
}

// restart closes node n (or, with crash, drops it as kill -9 would: no
// final flush or metadata update) and opens it again on the same address.
func restart(t *testing.T, n *node, crash bool) {
	t.Helper()
	addr := n.v.PeerListenAddr().String()
	if crash {
		n.v.link.stop()
		_ = n.v.meta.close()
		_ = n.v.f.Close()
		n.v.closed.Store(true) // its cleanup must not close it again
	} else if err := n.v.Close(); err != nil {
		t.Fatal(err)
	}
	n.opts.Peer.Listen = addr
	n.reopen(t)
}

// settled flushes the Primary p and waits until its peer has acknowledged
// every write.
func settled(t *testing.T, p *node) {
	t.Helper()
	if err := p.v.Flush(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "peer to acknowledge everything", func() bool { n, _ := p.v.Lag(); return n == 0 })
}

// TestStreamPositionAcrossReconnectAndRestart: the Secondary tells its
// Primary exactly how much of the async stream it holds after a cut and
// after an orderly restart, none after a crash, and positions follow a
// role swap.
func TestStreamPositionAcrossReconnectAndRestart(t *testing.T) {
	a, b, fault := asyncPrimary(t, pairOpts{mode: ModeAsync})
	own := func(n *node) wan.StreamPos { return n.v.link.ownStream(true) }
	// a was promoted while connected: it announced its stream in the session.
	writeStamped(t, a.v, 0, 50)
	settled(t, a)
	reconnect(t, a, b, fault)
	stream := own(a).Stream
	if got, want := a.v.link.peerStream(), (wan.StreamPos{Stream: stream, Pos: 50}); got != want {
		t.Fatalf("after a cut the peer reports %+v, want %+v", got, want)
	}

	// An orderly restart keeps the exact position.
	writeStamped(t, a.v, 50, 80)
	settled(t, a)
	restart(t, b, false)
	waitFor(t, "reconnect after restart", func() bool { return established(a.v) && established(b.v) })
	if got, want := a.v.link.peerStream(), (wan.StreamPos{Stream: stream, Pos: 80}); got != want {
		t.Fatalf("after a restart the peer reports %+v, want %+v", got, want)
	}

	// A crash: no position (the disk may hold writes past the one kept
	// at the last close); in sync, the next session numbers from the
	// Primary's.
	writeStamped(t, a.v, 80, 90)
	waitFor(t, "peer to apply", func() bool { n, _ := a.v.Lag(); return n == 0 })
	restart(t, b, true)
	waitFor(t, "reconnect after crash", func() bool { return established(a.v) && established(b.v) })
	if got := a.v.link.peerStream(); got != (wan.StreamPos{}) {
		t.Fatalf("after a crash the peer reports %+v, want none", got)
	}
	reconnect(t, a, b, fault)
	if got := a.v.link.peerStream(); got != (wan.StreamPos{Stream: stream, Pos: 90}) {
		t.Fatalf("in sync after the crash the peer reports %+v, want position 90", got)
	}

	// Writes while cut off are journaled and replayed: they count.
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.link.current() == nil })
	writeStamped(t, a.v, 90, 95)
	fault.setCut(false)
	waitFor(t, "replay", func() bool { return established(a.v) && established(b.v) })
	if got := a.v.link.peerStream(); got.Stream != stream || got.Pos != 90 {
		t.Fatalf("before the replay the peer reports %+v", got)
	}
	settled(t, a)
	reconnect(t, a, b, fault)
	if got := a.v.link.peerStream(); got != (wan.StreamPos{Stream: stream, Pos: 95}) {
		t.Fatalf("after the replay the peer reports %+v, want position 95", got)
	}
	assertIdentical(t, a, b)

	// A role swap: the new Primary announces a new stream in the session.
	if err := a.v.Demote(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to see a demoted", func() bool { ph := b.v.link.peerState(); return ph != nil && Role(ph.Role) == RoleSecondary })
	if err := b.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	writeStamped(t, b.v, 100, 110)
	settled(t, b)
	reconnect(t, a, b, fault)
	bs := own(b)
	if bs.Stream == stream || bs.Stream == 0 {
		t.Fatalf("promoted node ships stream %x (old %x)", bs.Stream, stream)
	}
	if got := b.v.link.peerStream(); got != bs {
		t.Fatalf("after the swap the peer reports %+v, want %+v", got, bs)
	}
	if got := a.v.link.appliedStream(); got != bs {
		t.Fatalf("the demoted node holds %+v of the new stream, want %+v", got, bs)
	}
	assertIdentical(t, a, b)
}

// TestSuperblockStreamPosition: the position round-trips; a superblock
// an older build wrote (zeros there) or a damaged position reads as none,
// the rest of the superblock intact.
func TestSuperblockStreamPosition(t *testing.T) {
	sb := superblock{seq: 3, size: 1 << 20, regionSize: 4096, role: RoleSecondary, disk: DiskUpToDate,
		gen: Generations{Current: 8}, stream: wan.StreamPos{Stream: 0x5eed, Pos: 77}}
	b := sb.encode()
	got, err := decodeSuperblock(b)
	if err != nil || got != sb {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for name, damage := range map[string]func([]byte){
		"older build": func(b []byte) { clear(b[96:116]) },
		"damaged":     func(b []byte) { b[100] ^= 1 },
	} {
		c := append([]byte(nil), b...)
		damage(c)
		got, err := decodeSuperblock(c)
		want := sb
		want.stream = wan.StreamPos{}
		if err != nil || got != want {
			t.Fatalf("%s: %+v, %v", name, got, err)
		}
	}
}
