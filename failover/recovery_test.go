package failover

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

var secondaryB = Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}

// servingPrimary is node a, Primary and serving, its witness granting and
// b an in-sync Secondary, 3 s in.
func servingPrimary(t *testing.T, tune func(*Config)) *harness {
	t.Helper()
	h := newHarness(t, "a", "b", tune)
	h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Holder: "a", Epoch: r.Epoch} }
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	h.steady(secondaryB, 3*time.Second)
	if s := h.m.Status(); s.Fenced || s.Role != RolePrimary {
		t.Fatalf("not serving: %+v\n%s", s, h.decisions())
	}
	return h
}

func check(failing ...string) ResourceCheck {
	c := ResourceCheck{}
	for _, n := range []string{"mount", "ip", "app"} {
		r := ResourceHealth{Name: n}
		for _, f := range failing {
			if f == n {
				r.Error = "monitor " + n + ": exit status 1"
			}
		}
		c.Resources = append(c.Resources, r)
	}
	return c
}

// kinds lists the non-Record actions by type name.
func kinds(acts []Action) string {
	var ks []string
	for _, a := range acts {
		if _, ok := a.(Record); !ok {
			ks = append(ks, strings.TrimPrefix(fmt.Sprintf("%T", a), "failover."))
		}
	}
	return strings.Join(ks, " ")
}

// A failed check restarts the earliest failing resource and every one
// after it (local recovery); a passing check ends the episode.
func TestLocalRecoveryCures(t *testing.T) {
	h := servingPrimary(t, nil)
	acts := h.step(check("ip", "app"))
	rr, ok := find[RecoverResources](acts)
	if !ok || rr.From != "ip" || rr.Attempt != 1 || kinds(acts) != "RecoverResources" {
		t.Fatalf("first failed check: %v\n%s", acts, h.decisions())
	}
	if !h.recorded("local recovery 1 of 1: resource ip fails its check (monitor ip: exit status 1): restarting it and every resource after it") {
		t.Fatal(h.decisions())
	}
	if rf := h.m.Status().ResourceFailure; rf == nil || rf.Resource != "ip" || !rf.Recovering || rf.Recoveries != 1 || rf.MaxRecoveries != 1 {
		t.Fatalf("status while recovering: %+v", rf)
	}
	// A check that ran during the recovery changes nothing.
	if acts := h.step(check("app")); kinds(acts) != "" {
		t.Fatalf("check during the recovery: %v", acts)
	}
	h.step(ActionResult{ID: rr.ID})
	if acts := h.step(check()); kinds(acts) != "" || !h.recorded("resource ip passes its check again") || h.m.Status().ResourceFailure != nil {
		t.Fatalf("healthy check: %v %+v\n%s", acts, h.m.Status().ResourceFailure, h.decisions())
	}
	// A later failure is a new episode: local recovery again.
	if acts := h.step(check("app")); !has[RecoverResources](acts) {
		t.Fatalf("second episode: %v\n%s", acts, h.decisions())
	}
}

// Local recovery used up (the check still fails, or the restart itself
// fails): the Primary hands over as a switchover would: stop resources,
// hold writes, demote, hand the vote and the role to the peer.
func TestResourceFailureHandsOver(t *testing.T) {
	for _, tc := range []struct {
		name     string
		recovery int
		// run drives the failure from the first failed check to the
		// handover's StopResources, which it returns.
		run func(t *testing.T, h *harness) []Action
		why string
	}{
		{"check still fails after the recovery", 0, func(t *testing.T, h *harness) []Action {
			rr, _ := find[RecoverResources](h.step(check("app")))
			h.step(ActionResult{ID: rr.ID})
			return h.step(check("app"))
		}, "resource app fails its check (monitor app: exit status 1) after 1 local recoveries: handing over to b"},
		{"the restart fails", 0, func(t *testing.T, h *harness) []Action {
			rr, _ := find[RecoverResources](h.step(check("app")))
			return h.step(ActionResult{ID: rr.ID, Err: errors.New("start app: exit status 3")})
		}, "resource app fails its check (start app: exit status 3) after 1 local recoveries: handing over to b"},
		{"two recoveries configured", 2, func(t *testing.T, h *harness) []Action {
			for i := 1; i <= 2; i++ {
				rr, ok := find[RecoverResources](h.step(check("app")))
				if !ok || rr.Attempt != i {
					t.Fatalf("recovery %d: %+v\n%s", i, rr, h.decisions())
				}
				h.step(ActionResult{ID: rr.ID})
			}
			return h.step(check("app"))
		}, "after 2 local recoveries: handing over to b"},
		{"local recovery off", -1, func(t *testing.T, h *harness) []Action {
			return h.step(check("app"))
		}, "resource app fails its check (monitor app: exit status 1) (local recovery is off): handing over to b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := servingPrimary(t, func(c *Config) { c.LocalRecovery = tc.recovery })
			h.holdStop = true
			acts := tc.run(t, h)
			st, ok := find[StopResources](acts)
			if !ok || kinds(acts) != "StopResources" || h.m.Status().Switchover != "stop-resources" || !h.recorded(tc.why) {
				t.Fatalf("no handover: %v\n%s", acts, h.decisions())
			}
			if !h.recorded("switchover to b (resource app failed)") {
				t.Fatal(h.decisions())
			}
			// The rest is the switchover: writes held once the
			// resources are down, b has them all, demote, vote to b.
			acts = h.step(ActionResult{ID: st.ID})
			d, ok := find[Demote](acts)
			if kinds(acts) != "Fence Demote" || !ok {
				t.Fatalf("after the stop: %v\n%s", acts, h.decisions())
			}
			acts = h.step(ActionResult{ID: d.ID})
			rv, ok := find[ReleaseVote](acts)
			if !ok || rv.To != "b" {
				t.Fatalf("after the demotion: %v", acts)
			}
			acts = h.step(ActionResult{ID: rv.ID})
			if !has[PeerPromote](acts) {
				t.Fatalf("after the release: %v", acts)
			}
			if s := h.m.Status(); s.Role != RoleSecondary || s.ResourceFailure != nil {
				t.Fatalf("after the handover: %+v", s)
			}
		})
	}
}

// When the peer could not take over without losing writes, or this node
// lacks quorum, a Primary whose resource still fails stays as it is and
// says why, once per reason; it hands over as soon as that changes.
func TestResourceFailureStays(t *testing.T) {
	for _, tc := range []struct {
		name  string
		tune  func(*Config)
		setup func(h *harness) // after the recovery, before the failing check
		why   string
	}{
		{"peer not UpToDate", nil, func(h *harness) {
			h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskInconsistent, LagBytes: 1 << 20})
		}, "b's disk is Inconsistent, not UpToDate (lag 1048576 bytes)"},
		{"replication down", func(c *Config) { c.Witness = false }, func(h *harness) {
			h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, PeerDisk: DiskDUnknown})
		}, "replication to b is down: it lacks writes this node acknowledged"},
		{"async beyond the lag bound", func(c *Config) { c.MaxAsyncLagBytes = 1 << 20 }, func(h *harness) {
			h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Async: true, Connected: true, PeerDisk: DiskUpToDate, LagBytes: 2 << 20, LagTime: time.Second})
		}, "async target b is 2097152 bytes / 1s behind, beyond the bound of 1048576 bytes / 10s"},
		{"peer lost", nil, func(h *harness) {
			h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Holder: "a", Epoch: r.Epoch} }
			h.ticks(50*time.Millisecond, h.now.Sub(t0)+2100*time.Millisecond)
		}, "peer b is lost (replication lost"},
		{"no quorum", nil, func(h *harness) {
			// The witness stops answering; b still vouches, so the node
			// serves, but cannot hand the vote over.
			h.vote = nil
			h.steady(secondaryB, h.now.Sub(t0)+2*time.Second)
		}, "no quorum: the witness's last grant is"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := servingPrimary(t, tc.tune)
			rr, _ := find[RecoverResources](h.step(check("app")))
			h.step(ActionResult{ID: rr.ID})
			tc.setup(h)
			if s := h.m.Status(); s.Fenced || s.Role != RolePrimary {
				t.Fatalf("setup fenced the node: %+v\n%s", s, h.decisions())
			}
			acts := h.step(check("app"))
			if kinds(acts) != "" || !h.recorded("after 1 local recoveries: staying Primary with the resources as they are, no handover: "+tc.why) {
				t.Fatalf("%v\n%s", acts, h.decisions())
			}
			if rf := h.m.Status().ResourceFailure; rf == nil || rf.Resource != "app" || rf.Recovering {
				t.Fatalf("status: %+v", rf)
			}
			// A standing condition is recorded once.
			if acts := h.step(check("app")); len(acts) != 0 {
				t.Fatalf("second check recorded again: %v", acts)
			}
		})
	}
	t.Run("hands over once the peer is back in sync", func(t *testing.T) {
		h := servingPrimary(t, nil)
		rr, _ := find[RecoverResources](h.step(check("app")))
		h.step(ActionResult{ID: rr.ID})
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskInconsistent})
		if acts := h.step(check("app")); kinds(acts) != "" {
			t.Fatal(acts)
		}
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
		if acts := h.step(check("app")); !has[StopResources](acts) {
			t.Fatalf("%v\n%s", acts, h.decisions())
		}
	})
}

// Maintenance mode watches and records what it would do; a fenced node,
// a Secondary and a chain in the middle of a switchover do nothing.
func TestResourceFailureNoAction(t *testing.T) {
	t.Run("maintenance", func(t *testing.T) {
		h := servingPrimary(t, nil)
		h.step(SetMaintenance{On: true})
		acts := h.step(check("app"))
		if kinds(acts) != "" || !h.recorded("maintenance: would restart app and the resources after it (local recovery 1 of 1)") {
			t.Fatalf("%v\n%s", acts, h.decisions())
		}
		h.step(SetMaintenance{On: false})
		if acts := h.step(check("app")); !has[RecoverResources](acts) {
			t.Fatalf("after maintenance: %v", acts)
		}
	})
	t.Run("maintenance with recovery used up", func(t *testing.T) {
		h := servingPrimary(t, func(c *Config) { c.LocalRecovery = -1 })
		h.step(SetMaintenance{On: true})
		acts := h.step(check("app"))
		if kinds(acts) != "" || !h.recorded("maintenance: would hand over to b: resource app fails its check") {
			t.Fatalf("%v\n%s", acts, h.decisions())
		}
	})
	t.Run("fenced", func(t *testing.T) {
		h := servingPrimary(t, nil)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Holder: "b", Epoch: r.Epoch + 1} }
		h.steady(secondaryB, 4*time.Second)
		if !h.m.Status().Fenced {
			t.Fatal(h.decisions())
		}
		acts := h.step(check("app"))
		if kinds(acts) != "" || !h.recorded("this node is fenced (the witness says b holds the vote") {
			t.Fatalf("%v\n%s", acts, h.decisions())
		}
	})
	t.Run("secondary", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		if acts := h.step(check("app")); len(acts) != 0 {
			t.Fatal(acts)
		}
	})
	t.Run("during a switchover", func(t *testing.T) {
		h := servingPrimary(t, nil)
		h.holdStop = true
		h.step(Switchover{})
		acts := h.step(check("app"))
		if kinds(acts) != "" || !h.recorded("not acting while a switchover is in progress (stop-resources)") {
			t.Fatalf("%v\n%s", acts, h.decisions())
		}
	})
}
