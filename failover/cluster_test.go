package failover

import (
	"fmt"
	"testing"
	"time"
)

func TestSteadyState(t *testing.T) {
	c := newCluster(t, 1, nil)
	c.run(10 * time.Second)
	a, b := c.n[0], c.n[1]
	if !a.writable || b.writable {
		c.fail("a writable %v, b writable %v", a.writable, b.writable)
	}
	if a.chain < 150 || b.hash != a.hash {
		t.Fatalf("writes: a %d b %d", a.chain, b.chain)
	}
	// Start-up: a is held until the witness grants it the vote, then
	// serves; nothing else happens.
	if heldSince(a, t0) != 0 || count[Fence](a, t0)+count[Fence](b, t0) != 0 || count[Unfence](a, t0) != 1 || count[RequestVote](b, t0) != 0 {
		c.fail("unexpected outcome")
	}
}

func TestSiteLossCluster(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		c := newCluster(t, seed, nil)
		c.run(5*time.Second + time.Duration(c.rng.Int63n(int64(time.Second))))
		a, b := c.n[0], c.n[1]
		kill := c.now
		c.crash(a)
		c.run(5 * time.Second)
		c.overlap()
		at, ok := first[Promote](b, kill)
		if !ok || !b.writable {
			c.fail("seed %d: b not promoted", seed)
		}
		D := b.cfg.DetectTimeout()
		d := at.Sub(kill)
		if d < D-b.cfg.HeartbeatInterval || d > D+b.cfg.TickInterval+4*c.lat {
			t.Fatalf("seed %d: promoted %v after the kill, want within [%v, %v]", seed, d, D-b.cfg.HeartbeatInterval, D+b.cfg.TickInterval+4*c.lat)
		}
		t.Logf("seed %d: kill -9 to promotion %v", seed, d)
	}
}

func TestWitnessLossAlone(t *testing.T) {
	c := newCluster(t, 2, nil)
	c.run(3 * time.Second)
	from := c.now
	c.cut("a-w", "b-w")
	c.run(30 * time.Second)
	a, b := c.n[0], c.n[1]
	if n := count[Fence](a, from) + count[Promote](b, from) + count[Demote](a, from); n != 0 {
		c.fail("%d actions after losing only the witness", n)
	}
	if !a.writable || !recorded(a, from, "peer b still heard: keep serving") {
		c.fail("a writable %v; want a record of keeping service", a.writable)
	}
	c.heal()
	c.run(5 * time.Second)
	if !a.writable || count[Fence](a, from) != 0 {
		t.Fatal("a fenced after the witness came back")
	}
}

// One path drops 30% of heartbeats for two simulated minutes: nothing may
// happen (the other path is fine, and even the flapping path rarely misses
// MissCount in a row).
func TestFlappingPath(t *testing.T) {
	for _, link := range []string{linkUDP, linkRepl} {
		c := newCluster(t, 3, nil)
		c.run(2 * time.Second)
		from := c.now
		c.drop[link] = 0.3
		c.run(2 * time.Minute)
		for _, n := range c.n {
			if k := count[Fence](n, from) + count[Promote](n, from) + count[Demote](n, from); k != 0 {
				c.fail("%s: %d actions while %s flaps", n.name, k, link)
			}
			if recorded(n, from, "lost") {
				t.Fatalf("%s: recorded a loss while %s flaps", n.name, link)
			}
		}
		if !c.n[0].writable {
			t.Fatal("a not writable")
		}
	}
}

// The two nodes are cut apart but both still reach the witness: the
// witness arbitrates for the current Primary, which keeps serving (after a
// freeze of one witness round trip to record its peer outdated); the
// target does not promote.
func TestCutApartWitnessSeesBoth(t *testing.T) {
	c := newCluster(t, 4, nil)
	c.run(3 * time.Second)
	a, b := c.n[0], c.n[1]
	from := c.now
	c.cut(linkRepl, linkUDP)
	c.run(20 * time.Second)
	if count[Promote](b, from) != 0 || b.writable {
		c.fail("b promoted")
	}
	if !a.writable {
		c.fail("a not serving")
	}
	if held := heldSince(a, from); held > 50*time.Millisecond {
		t.Fatalf("a's writes held %v", held)
	}
	if !recorded(b, from, "the witness says a holds the vote") {
		c.fail("b did not record why it did not promote")
	}
	// a kept writing alone; b is outdated at the witness. Kill a: b must
	// still not promote, it lacks a's writes.
	c.crash(a)
	c.run(10 * time.Second)
	if count[Promote](b, from) != 0 {
		c.fail("outdated b promoted")
	}
	if !recorded(b, from, "outdated") {
		c.fail("b did not record that it is outdated")
	}
}

// The Primary is cut from both its peer and the witness: it fences itself,
// and only then does the target get the vote and promote.
func TestPrimaryIsolated(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		c := newCluster(t, seed, nil)
		c.async = seed%2 == 0 // async: no freeze, the quorum fence is what stops a
		c.run(4*time.Second + time.Duration(c.rng.Int63n(int64(time.Second))))
		a, b := c.n[0], c.n[1]
		from := c.now
		c.cut(linkRepl, linkUDP, "a-w")
		c.run(6 * time.Second)
		c.overlap()
		fenced, ok1 := first[Fence](a, from)
		promoted, ok2 := first[Promote](b, from)
		if !ok1 || !ok2 || !b.writable || a.writable {
			c.fail("seed %d: fence %v promote %v", seed, ok1, ok2)
		}
		// In sync mode the freeze on losing replication stops a at once;
		// in async mode the quorum fence does, and the promotion comes
		// later by about the safety margin.
		stopped := a.spans[len(a.spans)-1].to
		gap := promoted.Sub(stopped)
		if gap < b.cfg.SafetyMargin-b.cfg.HeartbeatInterval-b.cfg.TickInterval {
			t.Fatalf("seed %d: b promoted only %v after a stopped writing", seed, gap)
		}
		t.Logf("seed %d async %v: a fenced at +%v, stopped writing at +%v, b promoted at +%v (gap %v)", seed, c.async, fenced.Sub(from), stopped.Sub(from), promoted.Sub(from), gap)
		// Heal: a sees b Primary at a newer epoch and steps down.
		c.heal()
		c.run(5 * time.Second)
		if a.role != RoleSecondary || a.hash != b.hash || !b.writable {
			c.fail("seed %d: after heal a is %s (same data %v)", seed, a.role, a.hash == b.hash)
		}
	}
}

// A second failure during resync: the target is Inconsistent while it
// catches up and the Primary dies. It must not be promoted.
func TestSecondFailureDuringResync(t *testing.T) {
	c := newCluster(t, 5, nil)
	c.resyncDur = 20 * time.Second
	c.run(3 * time.Second)
	a, b := c.n[0], c.n[1]
	c.cut(linkRepl)
	c.run(5 * time.Second) // a writes alone
	c.heal()
	c.run(3 * time.Second) // b resyncing
	if b.disk != DiskInconsistent || !b.resyncing {
		t.Fatalf("b is %s, resyncing %v", b.disk, b.resyncing)
	}
	from := c.now
	c.crash(a)
	c.run(30 * time.Second)
	if count[Promote](b, from) != 0 || count[RequestVote](b, from) != 0 {
		c.fail("inconsistent b promoted or asked for the vote")
	}
	if !recorded(b, from, "Inconsistent") {
		c.fail("no record of why")
	}
}

// Both sites go down; only one comes back.
func TestBothSitesDownStaleReturns(t *testing.T) {
	t.Run("old secondary returns alone", func(t *testing.T) {
		c := newCluster(t, 6, nil)
		c.run(3 * time.Second)
		a, b := c.n[0], c.n[1]
		c.crash(b)
		c.run(5 * time.Second) // a writes without b
		c.crash(a)
		c.run(time.Second)
		from := c.now
		c.restart(b)
		c.run(30 * time.Second)
		if count[Promote](b, from) != 0 || b.writable {
			c.fail("stale b promoted")
		}
		if !recorded(b, from, "peer may hold newer data; use ForcePromote") {
			c.fail("no record of why")
		}
	})
	t.Run("old secondary returns alone, peer seen Primary at a newer epoch", func(t *testing.T) {
		// b hears a once (Primary, newer epoch, b not in sync), then a dies.
		m := newTarget(t, nil)
		m.local(LocalState{Role: RoleSecondary, Disk: DiskUpToDate})
		m.hb(0, Beacon{Node: "a", Role: RolePrimary, Disk: DiskUpToDate, Epoch: 7})
		acts := m.ticks(100*time.Millisecond, 5*time.Second)
		if has[Promote](acts) || has[RequestVote](acts) {
			t.Fatalf("promoted: %v", acts)
		}
		if !m.recorded("peer may hold newer data; use ForcePromote") {
			t.Fatal(m.decisions())
		}
	})
	t.Run("newest primary returns alone", func(t *testing.T) {
		c := newCluster(t, 7, nil)
		c.run(3 * time.Second)
		a, b := c.n[0], c.n[1]
		c.crash(b)
		c.run(5 * time.Second)
		c.crash(a)
		c.run(time.Second)
		c.restart(a)
		c.run(5 * time.Second)
		// Nobody else held the vote since a did: a's term is continuous
		// and it may serve; b, when it returns, resyncs from it.
		if !a.writable {
			c.fail("a not serving")
		}
		c.restart(b)
		c.run(5 * time.Second)
		if !a.writable || b.role != RoleSecondary || b.hash != a.hash {
			c.fail("after b's return")
		}
	})
}

func TestSwitchover(t *testing.T) {
	for _, witness := range []bool{true, false} {
		t.Run(fmt.Sprintf("witness=%v", witness), func(t *testing.T) {
			c := newCluster(t, 8, func(cfg *Config) { cfg.Witness = witness })
			c.run(3 * time.Second)
			a, b := c.n[0], c.n[1]
			from := c.now
			c.step(a, Switchover{})
			c.run(5 * time.Second)
			c.overlap()
			if a.role != RoleSecondary || !b.writable || !b.resources || a.resources {
				c.fail("after switchover: a %s, b writable %v", a.role, b.writable)
			}
			// Planned: nothing lost (the simulated volume checks every
			// promotion), and a's writes were held only briefly.
			stop, _ := first[Fence](a, from)
			start, _ := first[Promote](b, from)
			if d := start.Sub(stop); d > 50*time.Millisecond {
				t.Fatalf("writes held %v", d)
			}
			// The roles stay swapped: b keeps the vote, a does not fence
			// or promote.
			c.run(10 * time.Second)
			if !b.writable || count[Fence](b, from) != 0 || count[Promote](a, from) != 0 {
				c.fail("after settling")
			}
			// And back.
			c.step(b, Switchover{})
			c.run(5 * time.Second)
			if !a.writable || b.role != RoleSecondary {
				c.fail("switch back")
			}
		})
	}
	t.Run("refused when not in sync", func(t *testing.T) {
		c := newCluster(t, 9, nil)
		c.run(3 * time.Second)
		a := c.n[0]
		c.cut(linkRepl)
		c.run(time.Second)
		from := c.now
		c.step(a, Switchover{})
		c.run(3 * time.Second)
		if !a.writable || count[Fence](a, from) != 0 || !recorded(a, from, "refused: target not in sync: replication to b is down") {
			c.fail("unexpected outcome")
		}
		c.step(c.n[1], Switchover{})
		if !recorded(c.n[1], from, "switchover runs on the Primary") {
			t.Fatal("switchover on the Secondary not refused")
		}
	})
}

// kill -9 of the Primary, it comes back: with policy never nothing moves.
func TestFailback(t *testing.T) {
	failover := func(c *cluster) {
		c.run(3 * time.Second)
		c.crash(c.n[0])
		c.run(5 * time.Second)
		if !c.n[1].writable {
			c.fail("b did not take over")
		}
		c.restart(c.n[0])
	}
	t.Run("never", func(t *testing.T) {
		c := newCluster(t, 10, nil)
		failover(c)
		c.run(time.Minute)
		a, b := c.n[0], c.n[1]
		if !b.writable || a.role != RoleSecondary || a.hash != b.hash {
			c.fail("unexpected outcome")
		}
	})
	t.Run("immediate", func(t *testing.T) {
		c := newCluster(t, 11, func(cfg *Config) { cfg.Failback.Policy = FailbackImmediate })
		failover(c)
		from := c.now
		c.run(10 * time.Second)
		c.overlap()
		a, b := c.n[0], c.n[1]
		if !a.writable || b.role != RoleSecondary || !recorded(b, from, "failing back (policy immediate)") {
			c.fail("unexpected outcome")
		}
		// a did not take over by failover, so it never fails back.
		c.run(time.Minute)
		if !a.writable {
			t.Fatal("moved again")
		}
	})
	t.Run("window", func(t *testing.T) {
		// 01:59:00; the window is 02:00-04:00, once.
		start := time.Date(2025, 3, 1, 1, 59, 0, 0, time.UTC)
		c := newClusterAt(t, 12, start, func(cfg *Config) {
			cfg.Failback = Failback{Policy: FailbackWindow, StartHour: 2, EndHour: 4, Max: 1}
		})
		a, b := c.n[0], c.n[1]
		failover(c)
		c.run(30 * time.Second) // 01:59:41: a in sync, outside the window
		if !b.writable || !recorded(b, start, "failback waits for the window 02:00-04:00") {
			c.fail("unexpected outcome")
		}
		c.run(30 * time.Second) // 02:00:11
		if !a.writable || b.role != RoleSecondary {
			c.fail("no failback in the window")
		}
		// Again, in the same window: a fails, b takes over, a returns:
		// the cap of one per window holds b.
		c.run(3 * time.Second)
		c.crash(a)
		c.run(5 * time.Second)
		c.restart(a)
		from := c.now
		c.run(time.Minute)
		if !b.writable || !recorded(b, from, "failback cap of 1 per window reached") {
			c.fail("unexpected outcome")
		}
	})
}

// Clock jumps on either node, forward and backward, with everything
// healthy: no failover, no demotion; the Primary may hold writes for a
// witness round trip while it re-proves its quorum after a forward jump.
func TestClockJumpCluster(t *testing.T) {
	for _, tc := range []struct {
		node int
		by   time.Duration
	}{{0, time.Hour}, {0, -time.Hour}, {1, time.Hour}, {1, -time.Hour}, {0, 5 * time.Second}, {1, 5 * time.Second}} {
		c := newCluster(t, 13, nil)
		c.run(3 * time.Second)
		from := c.now
		n := c.n[tc.node]
		n.offset += tc.by
		c.logf("%s: clock jumps %v", n.name, tc.by)
		c.run(20 * time.Second)
		a, b := c.n[0], c.n[1]
		if count[Promote](b, from) != 0 || count[Demote](a, from) != 0 || !a.writable || !recorded(n, from, "clock jumped") {
			c.fail("%s jumps %v", n.name, tc.by)
		}
		held := heldSince(a, from)
		if held > 50*time.Millisecond {
			c.fail("%s jumps %v: writes held %v", n.name, tc.by, held)
		}
		if testing.Verbose() {
			t.Logf("%s jumps %v: a's writes held %v in total", n.name, tc.by, held)
		}
	}
}

// heldSince sums the gaps between n's writable spans since from.
func heldSince(n *simNode, from time.Time) time.Duration {
	spans := append([]span(nil), n.spans...)
	if n.writable {
		spans = append(spans, span{n.since, time.Time{}})
	}
	var held time.Duration
	for i := 1; i < len(spans); i++ {
		if !spans[i].from.Before(from) {
			held += spans[i].from.Sub(spans[i-1].to)
		}
	}
	return held
}
