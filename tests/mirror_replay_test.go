package tests

import (
	"os"
	"testing"
	"time"

	"github.com/mirrord/mirrord/internal/wanproxy"
)

// TestWANAsyncProxyKilledReplaysJournal: under an async load above the
// link rate (50 ms RTT, 100 Mbit/s) the window spills to the journal; the
// WAN proxy is then killed (every connection reset) for a few seconds
// while the writes go on, and started again on the same address. The
// reconnect replays the journal from beta's stream position: no resync
// data crosses the link, beta is never Inconsistent and holds a
// write-order prefix during the replay, and the replicas end identical
// with every acknowledged write.
func TestWANAsyncProxyKilledReplaysJournal(t *testing.T) {
	set := []string{"peer.timeout=20s", "peer.ping-interval=500ms"}
	pr := startPrimary(t, pairOptions{mode: "async", size: "256MiB",
		alphaSet: append(set, "peer.async-window=32MiB", "peer.journal.size=256MiB"), betaSet: set,
		wan: &wanproxy.Config{Up: wan100, Down: wan100, Seed: 8}})
	const rate = 20e6 // bytes/s, above the 12.5 MB/s link: about 10 s of writes over 200 MiB
	w := startSeqWriter(t, pr.alpha, mirrorSeed(t), 200<<20, 16, rate)
	established := func(s mirrorStatus) bool {
		return s.Peer != nil && s.Peer.Connection == "Connected" && s.Peer.Replication == "Established"
	}
	// The journal keeps only what it carries: the window must hold only
	// journaled writes, i.e. a window's worth of them has been sent since
	// the spill began (the writes before it went out without a copy).
	pr.alpha.waitStatus("a window of journaled writes in flight", resyncTimeout, func(s mirrorStatus) bool {
		j := s.Peer.Journal
		return j != nil && j.SpilledBytes-j.QueuedBytes >= 32<<20 && s.Peer.JournalBytes > 0 && established(s)
	})
	aResync, bResync := pr.alpha.status().Peer.ResyncBytes, pr.beta.status().Peer.ResyncBytes

	addr := pr.wan.Addr()
	if err := pr.wan.Close(); err != nil { // the proxy dies: connections reset
		t.Fatal(err)
	}
	killedAt := time.Now()
	st := pr.alpha.waitStatus("the journal kept across the disconnect", stateTimeout, func(s mirrorStatus) bool {
		return s.Peer.Connection != "Connected" && s.Peer.Journal != nil && s.Peer.Journal.Kept
	})
	t.Logf("proxy killed: alpha %s, journal %d bytes kept", st.brief(), st.Peer.JournalBytes)
	for time.Since(killedAt) < 3*time.Second { // the writer goes on meanwhile
		if s := pr.alpha.status(); s.Peer.Journal == nil || !s.Peer.Journal.Kept {
			t.Fatalf("alpha stopped keeping the journal while disconnected: %s", s.raw)
		}
		time.Sleep(200 * time.Millisecond) // pacing the checks, not waiting for a state
	}
	wp, err := wanproxy.Start(wanproxy.Config{Listen: addr, Target: pr.wan.Target(), Up: wan100, Down: wan100, Seed: 9})
	if err != nil {
		t.Fatalf("restart the proxy on %s: %v", addr, err)
	}
	pr.wan = wp
	t.Cleanup(func() { _ = wp.Close() })

	pr.alpha.waitStatus("the replay", stateTimeout, func(s mirrorStatus) bool {
		return s.Peer.Journal != nil && s.Peer.Journal.Replays == 1 && established(s)
	})
	// During the replay: beta in sync, a write-order prefix.
	for i := range 2 {
		bSt := pr.beta.status()
		if bSt.Disk == "Inconsistent" || bSt.UndoBytes != 0 || bSt.Peer.Replication != "Established" {
			t.Fatalf("beta during the replay: %s, undo %d", bSt.brief(), bSt.UndoBytes)
		}
		held := w.requirePrefix(t, "beta during the replay", pr.quiescentImage(t))
		pr.stall(false)
		t.Logf("replay sample %d: beta holds versions 1..%d of %d written", i+1, held, w.h.seq.Load())
	}
	w.wait(t)
	st = pr.alpha.waitStatus("the journal drained, lag 0", resyncTimeout, func(s mirrorStatus) bool {
		return s.Peer.LagBytes == 0 && s.Peer.JournalBytes == 0 && s.inSync()
	})
	if d := st.Peer.ResyncBytes - aResync; d != 0 {
		t.Fatalf("alpha sent %d resync bytes: the journal should have carried the gap", d)
	}
	if d := pr.beta.status().Peer.ResyncBytes - bResync; d != 0 {
		t.Fatalf("beta received %d resync bytes", d)
	}
	if n := pr.alpha.logCount("replaying the stream from its position"); n != 1 {
		t.Fatalf("alpha logged %d replays, want 1", n)
	}
	if n := pr.alpha.logCount("Ahead, tracking writes in the bitmap"); n != 0 {
		t.Fatalf("alpha went Ahead %d times with room in the journal", n)
	}
	t.Logf("%d writes (%d MiB) through a %v outage, %d spilled, no resync", w.h.acks.Load(), len(w.order)*16*mirrorBlock>>20,
		3*time.Second, st.Peer.Journal.SpilledWrites)
	pr.stopAndCompare(t)
	data, err := os.ReadFile(pr.beta.path)
	if err != nil {
		t.Fatal(err)
	}
	w.h.requireMatches(t, "beta after the replay", data[:pr.size])
}
