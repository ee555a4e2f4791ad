package failover

import (
	"errors"
	"testing"
	"time"
)

// startError is a chain's failed start that names the resource at fault,
// as resource.StartError does.
type startError struct{ name, msg string }

func (e startError) Error() string          { return e.msg }
func (e startError) FailedResource() string { return e.name }

// resourceKinds lists the actions but Record and RequestVote by type name.
func resourceKinds(acts []Action) string {
	var keep []Action
	for _, a := range acts {
		if _, ok := a.(RequestVote); !ok {
			keep = append(keep, a)
		}
	}
	return kinds(keep)
}

var (
	appRefuses = startError{"app", "start app: exit status 3; rolled back ip"}
	secondaryA = Beacon{Node: "a", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}
)

// promotedB is b after it took over a lost a, its chain failing to start
// with startErr: it has started it, then tried once more (the local
// recovery), and stays Primary. The witness grants b's own epoch from then
// on (a continuous vote).
func promotedB(t *testing.T, startErr error, tune func(*Config)) *harness {
	t.Helper()
	h := newTarget(t, tune)
	h.startErr = startErr
	h.local(upToDate)
	h.steady(primaryA, 3*time.Second)
	p, ok := find[Promote](h.ticks(h.m.cfg.TickInterval, 6*time.Second))
	if !ok {
		t.Fatalf("b did not promote\n%s", h.decisions())
	}
	h.vote = func(r RequestVote) *WitnessVote {
		return &WitnessVote{Granted: true, Holder: "b", Epoch: r.Epoch, PeerOutdated: r.PeerOutdated}
	}
	h.step(ActionResult{ID: p.ID})
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, PeerDisk: DiskDUnknown})
	return h
}

// A chain that fails to start after an automatic failover is not left
// down: the start is tried again (the local recovery); with the peer lost
// the node stays Primary, says why and starts it again every
// StartRetryInterval, recording the standing decision once, until it
// comes up.
func TestStartFailureRetries(t *testing.T) {
	h := promotedB(t, appRefuses, nil)
	for _, want := range []string{
		"resources failed to start: start app: exit status 3; rolled back ip",
		"local recovery 1 of 1: resource app failed to start (start app: exit status 3; rolled back ip): starting the resources again",
		"local recovery 1: starting the resources failed: start app: exit status 3",
		"resource app failed to start (start app: exit status 3; rolled back ip) after 1 local recoveries: staying Primary with the resources down (the volume still served), starting them again every 10s; no handover: peer a is lost",
	} {
		if !h.recorded(want) {
			t.Fatalf("not recorded: %q\n%s", want, h.decisions())
		}
	}
	failedAt := h.now
	s := h.m.Status()
	if rf := s.ResourceFailure; s.Role != RolePrimary || s.Fenced || rf == nil || rf.Resource != "app" || !rf.Down || rf.Recoveries != 1 || rf.Retries != 0 || rf.Recovering || !rf.NextRetry.Equal(failedAt.Add(10*time.Second)) {
		t.Fatalf("status: %+v %+v\n%s", s, s.ResourceFailure, h.decisions())
	}
	// Nothing until the retry is due; a late check changes nothing.
	T := h.m.cfg.TickInterval
	if acts := h.step(check("app")); resourceKinds(acts) != "" {
		t.Fatalf("late check: %v", acts)
	}
	if acts := h.ticks(T, failedAt.Sub(t0)+10*time.Second-T); resourceKinds(acts) != "" {
		t.Fatalf("before the retry: %v\n%s", resourceKinds(acts), h.decisions())
	}
	n := len(h.all)
	for i := 1; i <= 3; i++ {
		acts := h.ticks(T, failedAt.Sub(t0)+time.Duration(i)*10*time.Second)
		if resourceKinds(acts) != "StartResources" {
			t.Fatalf("retry %d: %v\n%s", i, resourceKinds(acts), h.decisions())
		}
		if rf := h.m.Status().ResourceFailure; rf == nil || rf.Retries != i {
			t.Fatalf("retry %d: %+v", i, rf)
		}
	}
	for _, ta := range h.all[n:] {
		if r, ok := ta.a.(Record); ok && r.Decision.Kind == KindResource {
			t.Fatalf("a failed retry recorded again: %s", r.Decision.Cause)
		}
	}
	// The cause goes away: the next retry brings the chain up.
	h.startErr = nil
	acts := h.ticks(T, failedAt.Sub(t0)+40*time.Second)
	if resourceKinds(acts) != "StartResources" || !h.recorded("the resources are up again: resource app failed to start (start app: exit status 3; rolled back ip) since 40s ago; 1 local recoveries, 4 retries") {
		t.Fatalf("%v\n%s", resourceKinds(acts), h.decisions())
	}
	if s := h.m.Status(); s.ResourceFailure != nil || s.Role != RolePrimary {
		t.Fatalf("after the chain came up: %+v", s)
	}
	// Up again, it is watched again: a failed check is a new episode.
	if acts := h.step(check("app")); !has[RecoverResources](acts) {
		t.Fatalf("check after the chain came up: %v", acts)
	}
}

// Once the peer is back as an in-sync Secondary and this node holds
// quorum, the next failed retry hands the service over to it.
func TestStartFailureHandsOverToReturningPeer(t *testing.T) {
	h := promotedB(t, appRefuses, func(c *Config) { c.StartRetryInterval = time.Second })
	h.holdStop = true
	from := h.now.Sub(t0)
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	var acts []Action
	for d := from; d <= from+2*time.Second && !has[StopResources](acts); d += 500 * time.Millisecond {
		acts = append(h.hb(d, secondaryA), h.ticks(h.m.cfg.TickInterval, d+450*time.Millisecond)...)
	}
	if !has[StopResources](acts) || h.m.Status().Switchover != "stop-resources" {
		t.Fatalf("no handover: %v\n%s", resourceKinds(acts), h.decisions())
	}
	if !h.recorded("resource app failed to start (start app: exit status 3; rolled back ip) after 1 local recoveries: handing over to a") {
		t.Fatal(h.decisions())
	}
}

// The operator promoted the volume by hand and the chain failed to start:
// the same path (here: the peer is in sync, so a handover after the local
// recovery). A manual demotion ends the episode.
func TestStartFailureAfterOperatorPromotion(t *testing.T) {
	t.Run("hands over", func(t *testing.T) {
		h := servingPrimary(t, nil)
		h.startErr, h.holdStop = appRefuses, true
		acts := h.step(ResourceStartFailed{Err: appRefuses})
		if resourceKinds(acts) != "StartResources StopResources" || !h.recorded("resources failed to start after the operator's promotion: start app") ||
			!h.recorded("after 1 local recoveries: handing over to b") {
			t.Fatalf("%v\n%s", resourceKinds(acts), h.decisions())
		}
	})
	t.Run("demoted by hand", func(t *testing.T) {
		h := servingPrimary(t, func(c *Config) { c.LocalRecovery = -1 })
		h.step(SetMaintenance{On: true})
		if acts := h.step(ResourceStartFailed{Err: errors.New("attach /dev/nbd0: busy")}); resourceKinds(acts) != "" ||
			!h.recorded("maintenance: would hand over to b: the resources failed to start (attach /dev/nbd0: busy) (local recovery is off)") {
			t.Fatalf("%v\n%s", resourceKinds(acts), h.decisions())
		}
		if rf := h.m.Status().ResourceFailure; rf == nil || rf.Resource != "" || !rf.Down {
			t.Fatalf("%+v", rf)
		}
		h.local(LocalState{Role: RoleSecondary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
		if rf := h.m.Status().ResourceFailure; rf != nil {
			t.Fatalf("a Secondary with a resource failure: %+v", rf)
		}
	})
}

// a handed the service over for a resource failure; it came back (b's
// chain failed too) and a's chain fails to start: a does not hand over
// again within HandoverHold, whatever the peer's state, but stays and
// retries; after the hold it may.
func TestStartFailureNoSecondHandover(t *testing.T) {
	h := servingPrimary(t, func(c *Config) { c.HandoverHold = time.Minute; c.StartRetryInterval = 5 * time.Second })
	rr, _ := find[RecoverResources](h.step(check("app")))
	h.step(ActionResult{ID: rr.ID})
	h.holdStop = true
	st, _ := find[StopResources](h.step(check("app")))
	d, _ := find[Demote](h.step(ActionResult{ID: st.ID}))
	rv, _ := find[ReleaseVote](h.step(ActionResult{ID: d.ID}))
	h.step(ActionResult{ID: rv.ID})
	h.holdStop = false
	if h.m.Status().Role != RoleSecondary {
		t.Fatal(h.decisions())
	}
	gaveUp := h.now
	h.local(upToDate)
	// b's chain failed too: it hands the service back a few seconds later.
	h.steady(Beacon{Node: "b", Role: RolePrimary, Disk: DiskUpToDate, InSync: true, Hears: true, Epoch: h.m.epoch + 1}, gaveUp.Sub(t0)+5*time.Second)
	p, ok := find[Promote](h.step(Handover{From: "b", Epoch: h.m.epoch + 1}))
	if !ok {
		t.Fatalf("no promotion on the handback\n%s", h.decisions())
	}
	h.startErr = appRefuses
	h.step(ActionResult{ID: p.ID})
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	// b is an in-sync Secondary all along: a stays and retries.
	bSec := Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true, Epoch: h.m.epoch}
	play := func(from, until time.Duration) (handedAt time.Duration) {
		for d := from; d <= until; d += 500 * time.Millisecond {
			acts := append(h.hb(d, bSec), h.ticks(h.m.cfg.TickInterval, d+450*time.Millisecond)...)
			if has[StopResources](acts) {
				return h.now.Sub(gaveUp)
			}
		}
		return 0
	}
	if at := play(h.now.Sub(t0), h.now.Sub(t0)+12*time.Second); at != 0 || h.m.Status().Role != RolePrimary ||
		!h.recorded("no handover: this node handed the service over to b for a resource failure ") ||
		!h.recorded("and it came back: no second such handover within 1m0s (HandoverHold)") {
		t.Fatalf("handed over %v after the first\n%s", at, h.decisions())
	}
	// Once the hold has run out, the next failed retry hands over.
	handedAt := play(h.now.Sub(t0)+500*time.Millisecond, h.now.Sub(t0)+70*time.Second)
	if handedAt < time.Minute || handedAt > time.Minute+6*time.Second || !h.recorded("after 1 local recoveries: handing over to b") {
		t.Fatalf("second handover %v after the first, want just after the 1m hold\n%s", handedAt, h.decisions())
	}
}

// On the simulated cluster: both nodes' chains fail to start. a's check
// fails and it hands over to b, whose start fails: b hands back to a,
// whose start fails too. a, having handed over already, stays and retries:
// the service bounces once, not for ever, and there is never more than one
// writable Primary.
func TestStartFailureBouncesOnce(t *testing.T) {
	c := newCluster(t, 7, func(cfg *Config) { cfg.StartRetryInterval = time.Second })
	c.run(2 * time.Second)
	a, b := c.n[0], c.n[1]
	a.resources = true
	a.appFault, a.appBroken, a.startBroken, b.startBroken = true, true, true, true
	from := c.now
	c.monitor(a)
	c.run(20 * time.Second)
	c.overlap()
	if n := count[PeerPromote](a, from) + count[PeerPromote](b, from); n != 2 {
		c.fail("%d handovers, want 2 (a to b, b back to a)", n)
	}
	if a.role != RolePrimary || !a.writable || a.resources || b.role != RoleSecondary {
		c.fail("a %s writable %v resources %v, b %s", a.role, a.writable, a.resources, b.role)
	}
	if !recorded(a, from, "no second such handover") || count[StartResources](a, from) < 10 {
		c.fail("a does not stay and retry (%d starts)", count[StartResources](a, from))
	}
	// The cause goes away: a's next retry brings the chain up.
	a.startBroken = false
	c.run(2 * time.Second)
	if !a.resources || a.m.Status().ResourceFailure != nil {
		c.fail("a's chain not up after the cause went away")
	}
}

// A handover that aborts moved nothing: it is not remembered, and the
// next failed check may hand over again.
func TestAbortedHandoverNotRemembered(t *testing.T) {
	h := servingPrimary(t, nil)
	h.holdStop = true
	rr, _ := find[RecoverResources](h.step(check("app")))
	h.step(ActionResult{ID: rr.ID})
	st, ok := find[StopResources](h.step(check("app")))
	if !ok {
		t.Fatal(h.decisions())
	}
	// The target falls behind while the resources stop: the drain times
	// out and the switchover aborts, restarting the resources.
	lagging := LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate, LagBytes: 4096}
	h.local(lagging)
	h.step(ActionResult{ID: st.ID})
	h.steady(secondaryB, h.now.Sub(t0)+h.m.cfg.SwitchoverTimeout+time.Second)
	if !h.recorded("switchover aborted: target not in sync") || h.m.Status().Switchover != "" {
		t.Fatalf("no abort\n%s", h.decisions())
	}
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	if acts := h.step(check("app")); !has[StopResources](acts) || h.recorded("no second such handover") {
		t.Fatalf("no second handover after an aborted one: %v\n%s", resourceKinds(acts), h.decisions())
	}
}
