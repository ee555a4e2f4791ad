package tests

import (
	"encoding/json"
	"maps"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// Who may connect, split brain, and what operators see.

// TestSplitBrainRefusedAndResolved: both nodes write while the link is cut
// (alpha as the Primary, beta promoted meanwhile); at the heal both refuse
// to connect, say so in status and events, and sync nothing; after
// discard-my-data on beta and connect on alpha, beta's changes are gone and
// both replicas hold alpha's data.
func TestSplitBrainRefusedAndResolved(t *testing.T) {
	seed := mirrorSeed(t)
	rng := rand.New(rand.NewPCG(seed, 5))
	pr := startPrimary(t, pairOptions{mode: "sync"})
	ha := newHistory(seed)     // what alpha's applications wrote
	hb := newHistory(seed + 1) // what beta's wrote while it was Primary
	pr.alpha.writeBlocks(ha, randomBlocks(rng, 256, 0, pr.size))
	pr.waitInSync(stateTimeout)
	common := ha.versions()

	pr.proxy.cutLink()
	pr.alpha.waitDisconnected()
	if st := pr.beta.waitDisconnected(); st.Disk != "UpToDate" {
		t.Fatalf("beta after the cut: %s; want UpToDate (it may be promoted)", st.brief())
	}
	// Overlapping sets: some blocks written on both sides, some on one.
	pr.alpha.writeBlocks(ha, randomBlocks(rng, 256, 0, pr.size))
	pr.beta.promote()
	pr.beta.writeBlocks(hb, randomBlocks(rng, 256, 0, pr.size))
	pr.beta.mustCLI("demote")
	betaWant := maps.Clone(common)
	maps.Copy(betaWant, hb.versions())

	ev := pr.alpha.watchEvents()
	ev.waitEvent(t, `"exists"`, stateTimeout, func(e mirrorEvent) bool { return e.Type == "exists" })
	pr.proxy.healLink()
	splitBrain := func(s mirrorStatus) bool {
		return s.Peer != nil && s.Peer.SplitBrain && s.Peer.Connection == "StandAlone"
	}
	aSt := pr.alpha.waitStatus("split_brain true, connection StandAlone", stateTimeout, splitBrain)
	bSt := pr.beta.waitStatus("split_brain true, connection StandAlone", stateTimeout, splitBrain)
	e := ev.waitEvent(t, `"split-brain"`, stateTimeout, func(e mirrorEvent) bool { return e.Type == "split-brain" })
	if e.Status.Peer == nil || !e.Status.Peer.SplitBrain {
		t.Fatalf("split-brain event without split_brain in its status: %s", e.raw)
	}
	t.Logf("alpha: %s\nbeta: %s", aSt.brief(), bSt.brief())
	if human := pr.alpha.mustCLI("status"); !strings.Contains(human, "SPLIT-BRAIN") || !strings.Contains(human, "connection:StandAlone") {
		t.Fatalf("alpha's status does not show the split brain:\n%s", human)
	}

	// Nothing crossed: each side still holds exactly its own writes.
	requireExactly(t, "alpha in split brain", pr.alpha.readVolume(pr.size), ha.versions())
	requireExactly(t, "beta in split brain", pr.beta.readVolume(pr.size), betaWant)
	if a, b := pr.alpha.fileHash(pr.size), pr.beta.fileHash(pr.size); a == b {
		t.Fatal("replicas identical in split brain: something was synced")
	}
	if st := pr.alpha.status(); st.connection() != "StandAlone" || st.Role != "Primary" {
		t.Fatalf("alpha after the split brain checks: %s; want still StandAlone, Primary", st.brief())
	}

	// Resolution: beta's changes are discarded.
	pr.beta.mustCLI("discard-my-data")
	pr.alpha.mustCLI("connect")
	aSt, bSt = pr.waitInSync(resyncTimeout)
	if aSt.Peer.SplitBrain || bSt.Peer.SplitBrain {
		t.Fatalf("split brain still flagged after resolution:\nalpha: %s\nbeta: %s", aSt.brief(), bSt.brief())
	}
	aData := pr.alpha.readVolume(pr.size)
	requireExactly(t, "alpha after resolution", aData, ha.versions())
	requireExactly(t, "beta after resolution", pr.beta.readVolume(pr.size), ha.versions())
	if got, want := pr.stopAndCompare(t), sha256Bytes(aData); got != want {
		t.Fatalf("backing files (sha256 %s) differ from what alpha served (%s)", got, want)
	}
}

// TestWrongPeerRefused: a peer with another secret, volume name or size is
// refused at every attempt: it never connects, nothing is written to its
// disk, the refusal names the cause, and both nodes still stop cleanly.
func TestWrongPeerRefused(t *testing.T) {
	seed := mirrorSeed(t)
	for _, tc := range []struct {
		name     string
		o        pairOptions
		betaSize int64
		cause    string
	}{
		{"secret", pairOptions{betaSet: []string{"peer.secret=not-the-secret"}}, 64 << 20, "authentication"},
		{"volume-name", pairOptions{betaSet: []string{"volume.name=vol9"}}, 64 << 20, "wrong volume"},
		{"volume-size", pairOptions{betaSize: "32MiB"}, 32 << 20, "size mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			pr := startPair(t, tc.o)
			pr.alpha.promote()
			h := newHistory(seed)
			pr.alpha.writeBlocks(h, randomBlocks(rng, 256, 0, pr.size))
			// Several refused attempts, watching both sides meanwhile.
			deadline := time.Now().Add(stateTimeout)
			for {
				aSt, bSt := pr.alpha.status(), pr.beta.status()
				for _, st := range []mirrorStatus{aSt, bSt} {
					if st.connection() == "Connected" {
						t.Fatalf("a wrong peer connected: %s", st.brief())
					}
				}
				if strings.Count(pr.alpha.p.log(), "peer connection refused") >= 3 && pr.proxy.accepted.Load() >= 3 &&
					strings.Contains(aSt.Peer.Reason, tc.cause) && strings.Contains(bSt.Peer.Reason, tc.cause) {
					t.Logf("alpha: %s\nbeta: %s", aSt.brief(), bSt.brief())
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("after %v: want 3 refused attempts, each side's reason naming %q:\nalpha: %s\nbeta: %s",
						stateTimeout, tc.cause, aSt.brief(), bSt.brief())
				}
				time.Sleep(20 * time.Millisecond)
			}
			for _, n := range []*mirrorNode{pr.alpha, pr.beta} {
				if log := n.p.log(); strings.Contains(log, `"message":"peer connected"`) || !strings.Contains(log, tc.cause) {
					t.Fatalf("%s's log: want refusals naming %q and no connected peer:\n%s", n.name, tc.cause, log)
				}
			}
			requireExactly(t, "alpha", pr.alpha.readVolume(pr.size), h.versions())
			pr.alpha.p.stop()
			pr.beta.p.stop()
			if got, want := pr.beta.fileHash(tc.betaSize), sha256Zeroes(tc.betaSize); got != want {
				t.Fatalf("the refused peer's backing file was written: sha256 %s, want all zeroes (%s)", got, want)
			}
		})
	}
}

// TestStatusAndEventsShape checks what operators and scripts read: the
// human status (drbdadm-like), the JSON fields, and the event stream.
func TestStatusAndEventsShape(t *testing.T) {
	pr := startPrimary(t, pairOptions{mode: "sync"})
	pr.waitInSync(stateTimeout)
	ev := pr.alpha.watchEvents()
	first := ev.waitEvent(t, `"exists"`, stateTimeout, func(e mirrorEvent) bool { return e.Type == "exists" })
	if first.Status.Role != "Primary" || first.Status.Peer == nil || first.Status.Peer.Connection != "Connected" {
		t.Fatalf("first event: %s", first.raw)
	}

	for _, c := range []struct {
		n    *mirrorNode
		want []string
	}{
		{pr.alpha, []string{"vol0 role:Primary", "disk:UpToDate", "beta role:Secondary", "connection:Connected", "replication:Established", "peer-disk:UpToDate", "mode:sync"}},
		{pr.beta, []string{"vol0 role:Secondary", "disk:UpToDate", "alpha role:Primary", "connection:Connected", "replication:Established", "peer-disk:UpToDate"}},
	} {
		human := c.n.mustCLI("status")
		for _, w := range c.want {
			if !strings.Contains(human, w) {
				t.Errorf("%s: status lacks %q:\n%s", c.n.name, w, human)
			}
		}
	}

	out := pr.alpha.mustCLI("status", "--json")
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("status --json: %v:\n%s", err, out)
	}
	peer, _ := m["peer"].(map[string]any)
	if peer == nil {
		t.Fatalf("status --json has no peer object:\n%s", out)
	}
	if _, ok := m["nbd"].(map[string]any); !ok {
		t.Errorf("status --json: no nbd object")
	}
	for _, f := range []struct {
		obj  map[string]any
		key  string
		want any // a value, or a kind: "string", 0.0 (number)
	}{
		{m, "volume", "vol0"}, {m, "node", "alpha"}, {m, "role", "Primary"}, {m, "disk", "UpToDate"},
		{m, "size_bytes", float64(pr.size)}, {m, "out_of_sync_bytes", 0.0}, {m, "generations", kindString},
		{peer, "node", "beta"}, {peer, "mode", "sync"}, {peer, "connection", "Connected"},
		{peer, "replication", "Established"}, {peer, "peer_role", "Secondary"}, {peer, "peer_disk", "UpToDate"},
		{peer, "split_brain", false}, {peer, "in_flight_writes", 0.0}, {peer, "in_flight_bytes", 0.0},
		{peer, "sent_bytes", kindNumber}, {peer, "received_bytes", kindNumber}, {peer, "resync_bytes", 0.0},
	} {
		v, ok := f.obj[f.key]
		switch {
		case !ok:
			t.Errorf("status --json: no %q", f.key)
		case f.want == kindString:
			if s, ok := v.(string); !ok || s == "" {
				t.Errorf("status --json: %q = %v, want a non-empty string", f.key, v)
			}
		case f.want == kindNumber:
			if _, ok := v.(float64); !ok {
				t.Errorf("status --json: %q = %v, want a number", f.key, v)
			}
		case v != f.want:
			t.Errorf("status --json: %q = %#v, want %#v", f.key, v, f.want)
		}
	}
	if t.Failed() {
		t.Fatalf("status --json:\n%s", out)
	}

	// A state change shows in the stream, with the new state.
	pr.alpha.mustCLI("disconnect")
	ev.waitEvent(t, "StandAlone", stateTimeout, func(e mirrorEvent) bool {
		return e.Status.Peer != nil && e.Status.Peer.Connection == "StandAlone"
	})
	if human := pr.alpha.mustCLI("status"); !strings.Contains(human, "connection:StandAlone") {
		t.Fatalf("status after disconnect:\n%s", human)
	}
	pr.alpha.mustCLI("connect")
	pr.waitInSync(stateTimeout)
	ev.waitEvent(t, "Connected again", stateTimeout, func(e mirrorEvent) bool {
		return e.Type != "exists" && e.Status.Peer != nil && e.Status.Peer.Connection == "Connected"
	})
	lines := ev.snapshot()
	for _, l := range lines {
		parseEvent(t, l) // every line: JSON with time, type, status
	}
	t.Logf("%d event lines, e.g. %s", len(lines), lines[len(lines)-1])
}

// Kinds for TestStatusAndEventsShape's field table.
type fieldKind string

const (
	kindString fieldKind = "a string"
	kindNumber fieldKind = "a number"
)
