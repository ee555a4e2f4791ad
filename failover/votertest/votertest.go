// Package votertest is the conformance suite for failover.Voter: every
// implementation (the mirrord witness, the etcd lease) runs Run, which
// checks each rule of the witness contract in package failover.
package votertest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mirrord/mirrord/failover"
)

// Backend is one Voter under test and the controls the suite needs.
type Backend struct {
	Voter failover.Voter
	// TTL is the lease a grant carries.
	TTL time.Duration
	// Advance moves the implementation's lease clock forward. Nil: leases
	// run in real time, and the suite waits for them (keep TTL short).
	Advance func(d time.Duration)
	// Restart stops the Voter and whatever serves it (kill -9 where it can),
	// starts both again from the durable state and returns the new Voter.
	Restart func(t *testing.T) failover.Voter
}

// Run runs the suite; newBackend gives each test a fresh, empty backend.
func Run(t *testing.T, newBackend func(t *testing.T) *Backend) {
	tests := []struct {
		name string
		f    func(t *testing.T, b *Backend)
	}{
		{"GrantFirstAsker", testGrantFirstAsker},
		{"FirstGrantOnEmptyLedgerIsOne", testFirstGrantIsOne},
		{"DenyOtherNamingHolder", testDenyOther},
		{"RenewKeepsEpochAndLease", testRenew},
		{"EpochRaisedToRequest", testEpochRaised},
		{"GrantAfterExpiryBumpsEpoch", testExpiry},
		{"OutdatedRecordedAndCleared", testOutdated},
		{"DeniedClaimNotRecorded", testDeniedClaim},
		{"ReleasePassesVote", testRelease},
		{"ReleaseByNonHolderFails", testReleaseNonHolder},
		{"VolumesIndependent", testVolumes},
		{"ConcurrentAskersOneGrant", testConcurrent},
		{"RejectsBadRequests", testBadRequests},
		{"SurvivesRestart", testRestart},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackend(t)
			if b.Restart == nil {
				t.Fatal("votertest: Backend.Restart is required")
			}
			t.Cleanup(func() {
				if err := b.Voter.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tc.f(t, b)
		})
	}
}

const vol = "vol0"

func req(node, peer string, epoch uint64) failover.VoteRequest {
	return failover.VoteRequest{Volume: vol, Node: node, Peer: peer, Epoch: epoch}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func vote(t *testing.T, v failover.Voter, r failover.VoteRequest) failover.WitnessVote {
	t.Helper()
	got, err := v.Vote(ctx(t), r)
	if err != nil {
		t.Fatalf("Vote(%+v): %v", r, err)
	}
	if !got.Now.IsZero() {
		t.Fatalf("Vote(%+v): Now = %v, want zero (the runner stamps it)", r, got.Now)
	}
	return got
}

func want(t *testing.T, what string, got, exp failover.WitnessVote) {
	t.Helper()
	if got != exp {
		t.Fatalf("%s: got %+v, want %+v", what, got, exp)
	}
}

func granted(node string, epoch uint64) failover.WitnessVote {
	return failover.WitnessVote{Granted: true, Holder: node, Epoch: epoch}
}

func denied(holder string, epoch uint64) failover.WitnessVote {
	return failover.WitnessVote{Holder: holder, Epoch: epoch}
}

// expire lets the current lease run out and then has r asked until granted;
// since is taken before the call that granted (or renewed) that lease, so a
// grant less than TTL after it came early.
func expire(t *testing.T, b *Backend, since time.Time, r failover.VoteRequest) failover.WitnessVote {
	t.Helper()
	if b.Advance != nil {
		b.Advance(b.TTL - b.TTL/20)
		if v := vote(t, b.Voter, r); v.Granted {
			t.Fatalf("%s granted %v before the lease of %v expired", r.Node, b.TTL/20, b.TTL)
		}
		b.Advance(b.TTL/20 + time.Millisecond)
		return vote(t, b.Voter, r)
	}
	deadline := since.Add(b.TTL + 10*time.Second)
	for {
		v := vote(t, b.Voter, r)
		if v.Granted {
			if age := time.Since(since); age < b.TTL {
				t.Fatalf("%s granted %v after the holder's last grant, inside its lease of %v", r.Node, age, b.TTL)
			}
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still denied %v after a lease of %v: %+v", r.Node, time.Since(since), b.TTL, v)
		}
		time.Sleep(b.TTL / 20)
	}
}

// An empty ledger has no last holder on record: it cannot vouch that
// nobody held the vote since the asker's epoch, so the first grant bumps.
func testGrantFirstAsker(t *testing.T, b *Backend) {
	want(t, "first asker", vote(t, b.Voter, req("a", "b", 3)), granted("a", 4))
	want(t, "first asker renews", vote(t, b.Voter, req("a", "b", 3)), granted("a", 4))
}

// Epoch 0 is never a token: a fresh node on a fresh witness gets 1, and
// keeps it across a restart of the witness (it is the last holder on
// record now, so the bump is not repeated).
func testFirstGrantIsOne(t *testing.T, b *Backend) {
	want(t, "fresh node, empty ledger", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	b.Voter = b.Restart(t)
	want(t, "a renews after a restart", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
}

func testDenyOther(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 1)), granted("a", 2))
	want(t, "b while a holds", vote(t, b.Voter, req("b", "a", 1)), denied("a", 2))
	// A higher epoch from the denied node changes nothing.
	want(t, "b with a higher epoch", vote(t, b.Voter, req("b", "a", 9)), denied("a", 2))
	want(t, "a renews", vote(t, b.Voter, req("a", "b", 2)), granted("a", 2))
}

func testRenew(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 1)), granted("a", 2))
	want(t, "a again", vote(t, b.Voter, req("a", "b", 2)), granted("a", 2))
	// Renewals keep the vote past the first lease's end.
	step := b.TTL / 3
	start := time.Now()
	for i := 0; i < 6; i++ {
		if b.Advance != nil {
			b.Advance(step)
		} else {
			time.Sleep(step)
		}
		want(t, fmt.Sprintf("a renews (%d)", i), vote(t, b.Voter, req("a", "b", 2)), granted("a", 2))
		want(t, fmt.Sprintf("b (%d)", i), vote(t, b.Voter, req("b", "a", 2)), denied("a", 2))
	}
	if b.Advance == nil && time.Since(start) < b.TTL*3/2 {
		t.Fatalf("renewal loop ran %v, shorter than 1.5 leases", time.Since(start))
	}
}

func testEpochRaised(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	want(t, "a at 7", vote(t, b.Voter, req("a", "b", 7)), granted("a", 7))
	want(t, "a at 2: the counter never goes down", vote(t, b.Voter, req("a", "b", 2)), granted("a", 7))
}

func testExpiry(t *testing.T, b *Backend) {
	since := time.Now()
	want(t, "a", vote(t, b.Voter, req("a", "b", 3)), granted("a", 4))
	want(t, "b after a's lease ran out", expire(t, b, since, req("b", "a", 4)), granted("b", 5))
	want(t, "a while b holds", vote(t, b.Voter, req("a", "b", 4)), denied("b", 5))
	// b renews: still its vote, same epoch.
	since = time.Now()
	want(t, "b renews", vote(t, b.Voter, req("b", "a", 5)), granted("b", 5))
	// Back to a after b's lease: another bump, from max(counter, request).
	want(t, "a after b's lease ran out", expire(t, b, since, req("a", "b", 9)), granted("a", 10))
}

func testOutdated(t *testing.T, b *Backend) {
	r := req("a", "b", 0)
	r.PeerOutdated = true
	got := vote(t, b.Voter, r)
	want(t, "a claims b outdated", got, failover.WitnessVote{Granted: true, Holder: "a", Epoch: 1, PeerOutdated: true})
	want(t, "b asks: denied, and told it is outdated", vote(t, b.Voter, req("b", "a", 1)), failover.WitnessVote{Holder: "a", Epoch: 1, Outdated: true})
	since := time.Now()
	want(t, "a renews with the claim", vote(t, b.Voter, r), failover.WitnessVote{Granted: true, Holder: "a", Epoch: 1, PeerOutdated: true})
	// b stays outdated when a's lease runs out: it must not promote.
	want(t, "b after expiry", expire(t, b, since, req("b", "a", 1)), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 2, Outdated: true})
	// b, now holder, says a is in sync: recorded; b's own mark stays
	// until a (b's peer) clears it.
	want(t, "b holds", vote(t, b.Voter, req("b", "a", 2)), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 2, Outdated: true})
	r = req("b", "a", 2)
	r.PeerOutdated = true
	want(t, "b claims a outdated", vote(t, b.Voter, r), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 2, Outdated: true, PeerOutdated: true})
	since = time.Now()
	want(t, "b clears the claim", vote(t, b.Voter, req("b", "a", 2)), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 2, Outdated: true})
	want(t, "a back, clears b", expire(t, b, since, req("a", "b", 2)), granted("a", 3))
	want(t, "b in sync again", vote(t, b.Voter, req("b", "a", 3)), denied("a", 3))
}

func testDeniedClaim(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	r := req("b", "a", 1)
	r.PeerOutdated = true
	want(t, "b (denied) claims a outdated", vote(t, b.Voter, r), denied("a", 1))
	want(t, "a is not outdated", vote(t, b.Voter, req("a", "b", 1)), granted("a", 1))
}

func testRelease(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 5)), granted("a", 6))
	if err := b.Voter.Release(ctx(t), vol, "a", "b"); err != nil {
		t.Fatalf("Release a->b: %v", err)
	}
	want(t, "a after the release", vote(t, b.Voter, req("a", "b", 6)), denied("b", 7))
	want(t, "b takes the released vote", vote(t, b.Voter, req("b", "a", 6)), granted("b", 7))
	want(t, "b renews at 7", vote(t, b.Voter, req("b", "a", 7)), granted("b", 7))
	// And back.
	if err := b.Voter.Release(ctx(t), vol, "b", "a"); err != nil {
		t.Fatalf("Release b->a: %v", err)
	}
	want(t, "a takes it back", vote(t, b.Voter, req("a", "b", 7)), granted("a", 8))
}

func testReleaseNonHolder(t *testing.T, b *Backend) {
	want(t, "a", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	err := b.Voter.Release(ctx(t), vol, "b", "a")
	if !errors.Is(err, failover.ErrNotHolder) {
		t.Fatalf("Release by b while a holds: %v, want ErrNotHolder", err)
	}
	want(t, "a still holds", vote(t, b.Voter, req("a", "b", 1)), granted("a", 1))
	err = b.Voter.Release(ctx(t), "other", "a", "b")
	if !errors.Is(err, failover.ErrNotHolder) {
		t.Fatalf("Release on a volume nobody holds: %v, want ErrNotHolder", err)
	}
}

func testVolumes(t *testing.T, b *Backend) {
	want(t, "a on vol0", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	r := req("b", "a", 4)
	r.Volume = "vol1"
	want(t, "b on vol1", vote(t, b.Voter, r), granted("b", 5))
	want(t, "b on vol0", vote(t, b.Voter, req("b", "a", 1)), denied("a", 1))
}

func testConcurrent(t *testing.T, b *Backend) {
	// Several nodes race for an empty volume: exactly one wins, and the
	// others name it.
	nodes := []string{"n1", "n2", "n3", "n4", "n5", "n6"}
	votes := make([]failover.WitnessVote, len(nodes))
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			votes[i], errs[i] = b.Voter.Vote(ctx(t), req(n, "peer-of-"+n, 2))
		}()
	}
	wg.Wait()
	winner := ""
	for i, v := range votes {
		if errs[i] != nil {
			t.Fatalf("%s: %v", nodes[i], errs[i])
		}
		if v.Granted {
			if winner != "" {
				t.Fatalf("both %s and %s granted: %+v", winner, nodes[i], votes)
			}
			winner = nodes[i]
		}
	}
	if winner == "" {
		t.Fatalf("nobody granted: %+v", votes)
	}
	for i, v := range votes {
		if !v.Granted && v.Holder != winner {
			t.Fatalf("%s told holder %q, want %q", nodes[i], v.Holder, winner)
		}
	}
}

func testRestart(t *testing.T, b *Backend) {
	r := req("a", "b", 3)
	r.PeerOutdated = true
	want(t, "a claims b outdated", vote(t, b.Voter, r), failover.WitnessVote{Granted: true, Holder: "a", Epoch: 4, PeerOutdated: true})
	since := time.Now()
	b.Voter = b.Restart(t)
	// The restarted voter does not know how much of a's lease is left, so
	// it keeps it for b...
	want(t, "b right after the restart", vote(t, b.Voter, req("b", "a", 4)), failover.WitnessVote{Holder: "a", Epoch: 4, Outdated: true})
	// ...and remembers the epoch, last holder and the outdated set.
	want(t, "b after the lease", expire(t, b, since, req("b", "a", 4)), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 5, Outdated: true})
	b.Voter = b.Restart(t)
	want(t, "b renews after another restart: same epoch", vote(t, b.Voter, req("b", "a", 5)), failover.WitnessVote{Granted: true, Holder: "b", Epoch: 5, Outdated: true})
}

func testBadRequests(t *testing.T, b *Backend) {
	for _, r := range []failover.VoteRequest{
		{Node: "a", Peer: "b"},
		{Volume: vol, Peer: "b"},
		{Volume: vol, Node: "a"},
		{Volume: vol, Node: "a", Peer: "a"},
	} {
		if v, err := b.Voter.Vote(ctx(t), r); err == nil {
			t.Errorf("Vote(%+v) = %+v, want an error", r, v)
		}
	}
	want(t, "a", vote(t, b.Voter, req("a", "b", 0)), granted("a", 1))
	if err := b.Voter.Release(ctx(t), vol, "a", "a"); err == nil {
		t.Error("Release to the holder itself succeeded")
	}
	if err := b.Voter.Release(ctx(t), vol, "a", ""); err == nil {
		t.Error("Release to nobody succeeded")
	}
	want(t, "a still holds at the same epoch", vote(t, b.Voter, req("a", "b", 1)), granted("a", 1))
}
