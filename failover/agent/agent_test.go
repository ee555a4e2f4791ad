package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/mirror"
)

// The runner, driven step by step: a fake clock, fake volumes, an
// in-memory witness and paths that deliver at once (or not at all when
// cut). No goroutine of the agent runs; the test ticks, delivers and
// carries out the queued actions itself, so every run is the same.

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func (c *fakeClock) NewTicker(time.Duration) Ticker { return nilTicker{} }

type nilTicker struct{}

func (nilTicker) C() <-chan time.Time { return nil }
func (nilTicker) Stop()               {}

// fakeVolume is a mirror.Volume's state; Promote leaves it fenced, as
// mirror.Options.FencePromotions does.
type fakeVolume struct {
	mu        sync.Mutex
	role      mirror.Role
	disk      mirror.DiskState
	fence     mirror.FenceMode
	connected bool
	peerDisk  mirror.DiskState
	dogArmed  bool
	dogAfter  time.Duration
	calls     []string
}

func (v *fakeVolume) Role() mirror.Role      { v.mu.Lock(); defer v.mu.Unlock(); return v.role }
func (v *fakeVolume) Disk() mirror.DiskState { v.mu.Lock(); defer v.mu.Unlock(); return v.disk }
func (v *fakeVolume) Status() mirror.Status {
	v.mu.Lock()
	defer v.mu.Unlock()
	conn := string(mirror.ConnConnecting)
	if v.connected {
		conn = string(mirror.ConnConnected)
	}
	return mirror.Status{Role: v.role.String(), Disk: v.disk.String(),
		Peer: &mirror.PeerStatus{Mode: "sync", Connection: conn, PeerDisk: v.peerDisk.String()}}
}
func (v *fakeVolume) Promote(o mirror.PromoteOptions) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, "promote")
	v.role, v.fence = mirror.RolePrimary, mirror.FenceHold
	return nil
}
func (v *fakeVolume) Demote() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, "demote")
	v.role = mirror.RoleSecondary
	return nil
}
func (v *fakeVolume) Fence(m mirror.FenceMode, reason string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, "fence:"+m.String())
	v.fence = m
}
func (v *fakeVolume) Unfence(reason string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls = append(v.calls, "unfence")
	v.fence = mirror.Unfenced
}
func (v *fakeVolume) FenceState() (mirror.FenceMode, string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.fence, ""
}
func (v *fakeVolume) ArmWatchdog(d time.Duration, m mirror.FenceMode) {
	v.mu.Lock()
	v.dogArmed, v.dogAfter = true, d
	v.mu.Unlock()
}
func (v *fakeVolume) DisarmWatchdog() { v.mu.Lock(); v.dogArmed = false; v.mu.Unlock() }
func (v *fakeVolume) DropSession(string) {
	v.mu.Lock()
	v.calls = append(v.calls, "drop-session")
	v.connected, v.peerDisk = false, mirror.DiskDUnknown
	v.mu.Unlock()
}
func (v *fakeVolume) Subscribe() (<-chan mirror.Event, func()) {
	return make(chan mirror.Event), func() {}
}

func (v *fakeVolume) writable() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.role == mirror.RolePrimary && v.fence == mirror.Unfenced
}

func (v *fakeVolume) set(f func(v *fakeVolume)) { v.mu.Lock(); f(v); v.mu.Unlock() }

// fakeWitness keeps the witness contract in memory.
type fakeWitness struct {
	mu       sync.Mutex
	clock    *fakeClock
	ttl      time.Duration
	holder   string
	last     string
	expires  time.Time
	counter  uint64
	outdated map[string]bool
}

func (w *fakeWitness) vote(req failover.VoteRequest) failover.WitnessVote {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := w.clock.Now()
	if w.holder != "" && w.holder != req.Node && now.Before(w.expires) {
		return failover.WitnessVote{Holder: w.holder, Epoch: w.counter, Outdated: w.outdated[req.Node], PeerOutdated: w.outdated[req.Peer]}
	}
	if w.last != req.Node {
		w.counter = max(w.counter, req.Epoch) + 1
	} else {
		w.counter = max(w.counter, req.Epoch)
	}
	w.holder, w.last, w.expires = req.Node, req.Node, now.Add(w.ttl)
	w.outdated[req.Peer] = req.PeerOutdated
	return failover.WitnessVote{Granted: true, Holder: req.Node, Epoch: w.counter, Outdated: w.outdated[req.Node], PeerOutdated: w.outdated[req.Peer]}
}

func (w *fakeWitness) release(from, to string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.holder != from || !w.clock.Now().Before(w.expires) {
		return failover.ErrNotHolder
	}
	w.counter++
	w.holder, w.last, w.expires = to, to, w.clock.Now().Add(w.ttl)
	return nil
}

// nodeVoter is one node's line to the witness, which the test may cut.
type nodeVoter struct {
	w   *fakeWitness
	cut *bool
}

var errCut = errors.New("cut")

func (v nodeVoter) Vote(ctx context.Context, req failover.VoteRequest) (failover.WitnessVote, error) {
	if *v.cut {
		return failover.WitnessVote{}, errCut
	}
	return v.w.vote(req), nil
}

func (v nodeVoter) Release(ctx context.Context, volume, from, to string) error {
	if *v.cut {
		return errCut
	}
	return v.w.release(from, to)
}

func (v nodeVoter) Close() error { return nil }

type fakeResources struct {
	started, stopped int
	broken           string // what Monitor reports for "app" ("": healthy)
	// restarts lists Restart's from arguments; a restart cures broken
	// unless sticky.
	restarts []string
	sticky   bool
	// startErr is what Start returns (a chain that fails to start).
	startErr error
}

func (r *fakeResources) Restart(_ context.Context, from string) error {
	r.restarts = append(r.restarts, from)
	if !r.sticky {
		r.broken = ""
	}
	return nil
}

func (r *fakeResources) Monitor(context.Context) []Health {
	return []Health{{Name: "ip"}, {Name: "app", Error: r.broken}}
}

func (r *fakeResources) Start(context.Context) error { r.started++; return r.startErr }
func (r *fakeResources) Stop(context.Context) error  { r.stopped++; return nil }

// fakePath delivers to the peer's agent at once, unless cut.
type fakePath struct {
	name string
	to   **testNode
	cut  *bool
}

func (p fakePath) Name() string { return p.name }
func (p fakePath) Send(b []byte) error {
	if *p.cut || (*p.to).dead {
		return nil // sent into the void
	}
	(*p.to).a.Receive(p.name, b)
	return nil
}
func (p fakePath) Close() error { return nil }

type testNode struct {
	name      string
	a         *Agent
	vol       *fakeVolume
	res       *fakeResources
	epochFile string
	dead      bool
	// cutWitness and cutPaths isolate the node (both directions for the
	// paths: the peer's paths check the same flags).
	cutWitness bool
}

type cluster struct {
	t       *testing.T
	clock   *fakeClock
	witness *fakeWitness
	nodes   map[string]*testNode
	cutLink bool // every heartbeat path between the two
	tick    time.Duration
}

func newCluster(t *testing.T) *cluster {
	clock := &fakeClock{now: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)}
	mc := failover.DefaultLAN()
	c := &cluster{t: t, clock: clock, nodes: map[string]*testNode{}, tick: mc.TickInterval,
		witness: &fakeWitness{clock: clock, ttl: mc.LeaseTTL(), outdated: map[string]bool{}}}
	for _, pair := range [][2]string{{"a", "b"}, {"b", "a"}} {
		name, peer := pair[0], pair[1]
		n := &testNode{name: name, vol: &fakeVolume{role: mirror.RoleSecondary, disk: mirror.DiskUpToDate, connected: true, peerDisk: mirror.DiskUpToDate},
			res: &fakeResources{}, epochFile: filepath.Join(t.TempDir(), "epoch")}
		c.nodes[name] = n
		to := new(*testNode)
		paths := []Path{fakePath{name: failover.PathReplication, to: to, cut: &c.cutLink}, fakePath{name: failover.PathUDP, to: to, cut: &c.cutLink}}
		cfg := Config{Machine: mc, Volume: "vol0", Secret: []byte("secret"), EpochFile: n.epochFile,
			Voter: nodeVoter{w: c.witness, cut: &n.cutWitness}, Resources: n.res, Clock: clock,
			Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel).With().Str("node", name).Logger()}
		cfg.Machine.Node, cfg.Machine.Peer = name, peer
		a, err := New(cfg, n.vol, paths)
		if err != nil {
			t.Fatal(err)
		}
		n.a = a
		defer func(peer string) { *to = c.nodes[peer] }(peer)
	}
	for _, n := range c.nodes {
		n.a.handle(n.a.localState())
	}
	return c
}

// drain carries out everything a node has queued: received messages,
// blocking actions (in order) and witness answers.
func (c *cluster) drain(n *testNode) {
	a := n.a
	for {
		select {
		case in := <-a.inbox:
			a.received(in)
			continue
		case j := <-a.work:
			id, err := a.carryOut(j)
			if id != 0 {
				a.handle(failover.ActionResult{ID: id, Err: err})
			}
			a.refreshLocal()
			continue
		case ck := <-a.checks:
			a.checked(ck)
			continue
		default:
		}
		if a.voting {
			a.voted(<-a.votes) // the fake witness answers at once
			continue
		}
		return
	}
}

// run advances time by d in ticks, checking after each that at most one
// node is writable.
func (c *cluster) run(d time.Duration, each func()) {
	for end := c.clock.Now().Add(d); c.clock.Now().Before(end); {
		c.clock.advance(c.tick)
		for _, name := range []string{"a", "b"} {
			n := c.nodes[name]
			if n.dead {
				continue
			}
			n.a.refreshLocal()
			n.a.handle(failover.Tick{Now: c.clock.Now()})
			n.a.beacons(false)
			c.drain(n)
		}
		for _, n := range c.nodes {
			if !n.dead {
				c.drain(n)
			}
		}
		if a, b := c.nodes["a"], c.nodes["b"]; !a.dead && !b.dead && a.vol.writable() && b.vol.writable() {
			c.t.Fatalf("two writable Primaries at %v", c.clock.Now())
		}
		if each != nil {
			each()
		}
	}
}

// up makes a the serving Primary (an operator's promote, then its agent
// unfences it) with b hearing it in sync.
func (c *cluster) up() (a, b *testNode) {
	a, b = c.nodes["a"], c.nodes["b"]
	a.vol.set(func(v *fakeVolume) { v.role, v.fence = mirror.RolePrimary, mirror.FenceHold })
	c.run(3*time.Second, nil)
	if !a.vol.writable() {
		c.t.Fatalf("a not serving after 3 s: %+v", a.a.Status().Status)
	}
	if st := b.a.Status(); st.Peer.Role != mirror.RolePrimary || !st.Peer.InSync {
		c.t.Fatalf("b does not hear a as in-sync Primary: %+v", st.Peer)
	}
	return a, b
}

func hasDecision(r Report, kind failover.Kind, acted bool, substr string) bool {
	for _, d := range r.History {
		if d.Kind == kind && d.Acted == acted && strings.Contains(d.Cause, substr) {
			return true
		}
	}
	return false
}

func TestAgentSiteLossPromotesTarget(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	a.vol.mu.Lock()
	armed := a.vol.dogArmed
	a.vol.mu.Unlock()
	if !armed {
		t.Fatal("a serving Primary without an armed watchdog")
	}
	a.dead = true
	b.vol.set(func(v *fakeVolume) { v.connected, v.peerDisk = false, mirror.DiskDUnknown })
	killed := c.clock.Now()
	var promotedAt time.Time
	c.run(4*time.Second, func() {
		if promotedAt.IsZero() && b.vol.writable() {
			promotedAt = c.clock.Now()
		}
	})
	if promotedAt.IsZero() {
		t.Fatalf("b never served; last decision: %v", b.a.Status().Last)
	}
	mc := failover.DefaultLAN()
	if took := promotedAt.Sub(killed); took > mc.DetectTimeout()+mc.HeartbeatInterval {
		t.Fatalf("b served %v after a died, want within %v", took, mc.DetectTimeout()+mc.HeartbeatInterval)
	}
	if b.res.started != 1 {
		t.Fatalf("b resources started %d times, want 1", b.res.started)
	}
	hs, err := LoadEpoch(b.epochFile)
	if err != nil || hs.Epoch != b.a.Status().Epoch || hs.Epoch < 2 {
		t.Fatalf("b's epoch file: %+v %v, status epoch %d", hs, err, b.a.Status().Epoch)
	}
	if !hasDecision(b.a.Status(), failover.KindPromote, true, "peer a lost on every path") {
		t.Fatalf("no recorded promotion with its cause: %v", b.a.Status().History)
	}
}

func TestAgentIsolatedPrimaryFencesBeforeTargetPromotes(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	c.cutLink, a.cutWitness = true, true
	b.vol.set(func(v *fakeVolume) { v.connected, v.peerDisk = false, mirror.DiskDUnknown })
	a.vol.set(func(v *fakeVolume) { v.connected, v.peerDisk = false, mirror.DiskDUnknown })
	var fencedAt, promotedAt time.Time
	c.run(4*time.Second, func() {
		if fencedAt.IsZero() && !a.vol.writable() {
			fencedAt = c.clock.Now()
		}
		if promotedAt.IsZero() && b.vol.writable() {
			promotedAt = c.clock.Now()
		}
	})
	if fencedAt.IsZero() || promotedAt.IsZero() || !fencedAt.Before(promotedAt) {
		t.Fatalf("a fenced at %v, b promoted at %v: want a fenced first", fencedAt, promotedAt)
	}
	// Heal: a sees the newer Primary and steps down.
	c.cutLink, a.cutWitness = false, false
	c.run(3*time.Second, nil)
	if a.vol.Role() != mirror.RoleSecondary || a.res.stopped == 0 {
		t.Fatalf("a after heal: role %v, resources stopped %d", a.vol.Role(), a.res.stopped)
	}
	if !b.vol.writable() {
		t.Fatal("b stopped serving after the heal")
	}
}

func TestAgentSwitchoverThereAndBack(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	for _, step := range []struct{ from, to *testNode }{{a, b}, {b, a}} {
		c.run(2*time.Second, nil) // the new Primary's peer hears it
		ds := step.from.a.handle(failover.Switchover{})
		if !hasAny(ds, failover.KindSwitchover, true) {
			t.Fatalf("switchover %s->%s refused: %v", step.from.name, step.to.name, ds)
		}
		c.run(2*time.Second, nil)
		if !step.to.vol.writable() || step.from.vol.Role() != mirror.RoleSecondary {
			t.Fatalf("after switchover %s->%s: %s writable %v, %s role %v", step.from.name, step.to.name,
				step.to.name, step.to.vol.writable(), step.from.name, step.from.vol.Role())
		}
		if c.witness.holder != step.to.name {
			t.Fatalf("witness holder %q after switchover to %s", c.witness.holder, step.to.name)
		}
	}
}

func hasAny(ds []failover.Decision, kind failover.Kind, acted bool) bool {
	for _, d := range ds {
		if d.Kind == kind && d.Acted == acted {
			return true
		}
	}
	return false
}

func TestAgentForcePromoteNeedsAcknowledgement(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	a.dead, a.cutWitness = true, true
	b.cutWitness = true // no quorum: the automation cannot decide
	b.vol.set(func(v *fakeVolume) { v.connected, v.peerDisk = false, mirror.DiskDUnknown })
	c.run(4*time.Second, nil)
	if b.vol.writable() {
		t.Fatal("b promoted without quorum")
	}
	ds := b.a.handle(failover.ForcePromote{})
	if hasAny(ds, failover.KindForce, true) || len(ds) == 0 || !strings.Contains(ds[0].Cause, "AcceptDataLoss") {
		t.Fatalf("ForcePromote without acknowledgement: %v", ds)
	}
	ds = b.a.handle(failover.ForcePromote{AcceptDataLoss: true})
	if !hasAny(ds, failover.KindForce, true) {
		t.Fatalf("ForcePromote with acknowledgement: %v", ds)
	}
	c.run(time.Second, nil)
	if !b.vol.writable() {
		t.Fatal("b not serving after a forced promotion")
	}
}

func TestEpochFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "epoch")
	if hs, err := LoadEpoch(path); err != nil || hs.Epoch != 0 {
		t.Fatalf("missing file: %+v %v", hs, err)
	}
	for _, e := range []uint64{1, 7, 1 << 40} {
		if err := SaveEpoch(path, e); err != nil {
			t.Fatal(err)
		}
		if hs, err := LoadEpoch(path); err != nil || hs.Epoch != e {
			t.Fatalf("saved %d, loaded %+v %v", e, hs, err)
		}
	}
	if err := os.WriteFile(path, []byte("seven\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadEpoch(path); err == nil || !strings.Contains(err.Error(), "not an epoch") {
		t.Fatalf("garbage epoch file: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
}

// The volume's watchdog fires on a lease that ran out between two ticks;
// the agent, learning the volume is fenced, must not unfence it on the
// strength of its last tick's evidence.
func TestAgentNeverUnfencesPastTheLease(t *testing.T) {
	c := newCluster(t)
	a, _ := c.up()
	c.cutLink, a.cutWitness = true, true
	for a.a.Status().ServeUntil.After(c.clock.Now().Add(c.tick)) {
		c.run(c.tick, nil)
	}
	// Between ticks, past the lease: the watchdog fences the volume.
	until := a.a.Status().ServeUntil
	c.clock.advance(until.Sub(c.clock.Now()) + time.Millisecond)
	a.vol.Fence(mirror.FenceHold, "watchdog")
	a.a.refreshLocal()
	c.drain(a)
	if a.vol.writable() {
		t.Fatalf("the agent unfenced a volume whose lease ran out at %v (now %v)", until, c.clock.Now())
	}
}

// The running chain is checked (Monitor) and its health shown in Status;
// a stopped chain is not checked.
func TestAgentMonitorsRunningResources(t *testing.T) {
	c := newCluster(t)
	a, _ := c.up()
	a.a.checkResources()
	if h := a.a.Status().Resources; len(h) != 0 {
		t.Fatalf("a chain never started was checked: %+v", h)
	}
	if err := a.a.resources(true); err != nil || a.res.started != 1 {
		t.Fatalf("start: %v, started %d times", err, a.res.started)
	}
	a.res.broken = "exit status 7"
	a.a.checkResources()
	h := a.a.Status().Resources
	if len(h) != 2 || h[0] != (Health{Name: "ip"}) || h[1] != (Health{Name: "app", Error: "exit status 7"}) {
		t.Fatalf("health after a failed check: %+v", h)
	}
	a.res.broken = ""
	a.a.checkResources()
	if h := a.a.Status().Resources; len(h) != 2 || h[1].Error != "" {
		t.Fatalf("health after the check passes again: %+v", h)
	}
	if err := a.a.resources(false); err != nil {
		t.Fatal(err)
	}
	a.res.broken = "not running"
	a.a.checkResources()
	if h := a.a.Status().Resources; len(h) != 0 {
		t.Fatalf("a stopped chain was checked: %+v", h)
	}
}

// A failed check restarts the resource in place (local recovery); when
// the restart does not cure it, the Primary hands over to its peer, which
// starts the chain.
func TestAgentLocalRecoveryThenHandover(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	if err := a.a.resources(true); err != nil {
		t.Fatal(err)
	}
	a.res.broken = "exit status 1"
	a.a.checkResources()
	c.drain(a)
	if strings.Join(a.res.restarts, " ") != "app" || a.res.broken != "" {
		t.Fatalf("restarts %v, broken %q", a.res.restarts, a.res.broken)
	}
	if !hasDecision(a.a.Status(), failover.KindResource, true, "local recovery 1 of 1: resource app fails its check (exit status 1)") {
		t.Fatalf("no local recovery recorded: %+v", a.a.Status().History)
	}
	a.a.checkResources()
	c.drain(a)
	if !hasDecision(a.a.Status(), failover.KindResource, false, "resource app passes its check again") || a.a.Status().ResourceFailure != nil {
		t.Fatalf("recovery not seen: %+v", a.a.Status())
	}

	// Broken for good: one more restart, then the handover.
	a.res.broken, a.res.sticky = "exit status 1", true
	a.a.checkResources()
	c.drain(a)
	a.a.checkResources()
	c.drain(a)
	if len(a.res.restarts) != 2 || !hasDecision(a.a.Status(), failover.KindResource, true, "after 1 local recoveries: handing over to b") {
		t.Fatalf("restarts %v; decisions %+v", a.res.restarts, a.a.Status().History)
	}
	c.run(time.Second, nil)
	if !b.vol.writable() || a.vol.Role() != mirror.RoleSecondary || a.res.stopped != 1 || b.res.started != 1 {
		t.Fatalf("after the handover: b writable %v, a %v, a stopped %d, b started %d", b.vol.writable(), a.vol.Role(), a.res.stopped, b.res.started)
	}
}

// On exit a Primary stops its chain (once, in order with the agent's
// actions), and no check starts it again; a Secondary's is left alone.
func TestAgentStopResourcesOnExit(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	if err := a.a.resources(true); err != nil {
		t.Fatal(err)
	}
	a.a.Start()
	b.a.Start()
	defer a.a.Close()
	defer b.a.Close()
	ctx := context.Background()
	if err := b.a.StopResourcesOnExit(ctx); err != nil || b.res.stopped != 0 {
		t.Fatalf("Secondary: %v, stopped %d", err, b.res.stopped)
	}
	if err := a.a.StopResourcesOnExit(ctx); err != nil || a.res.stopped != 1 {
		t.Fatalf("Primary: %v, stopped %d", err, a.res.stopped)
	}
	a.a.checked(failover.ResourceCheck{Resources: []Health{{Name: "app", Error: "down"}}})
	if err := a.a.restart("app"); !errors.Is(err, ErrClosed) || len(a.res.restarts) != 0 {
		t.Fatalf("restart while exiting: %v, restarts %v", err, a.res.restarts)
	}
}

// startError names the resource that failed, as resource.StartError does.
type startError struct{ name, msg string }

func (e startError) Error() string          { return e.msg }
func (e startError) FailedResource() string { return e.name }

// b takes over a dead a but its chain fails to start: the agent starts it
// once more (local recovery), then, a being lost, keeps b Primary with the
// volume served and starts the chain again every monitor interval; once
// the cause is gone the chain comes up and is checked again.
func TestAgentStartFailureRetried(t *testing.T) {
	c := newCluster(t)
	_, b := c.up()
	c.nodes["a"].dead = true
	b.vol.set(func(v *fakeVolume) { v.connected, v.peerDisk = false, mirror.DiskDUnknown })
	b.res.startErr = startError{"app", "start app: exit status 3; rolled back ip"}
	c.run(4*time.Second, nil)
	st := b.a.Status()
	if rf := st.ResourceFailure; !b.vol.writable() || b.res.started != 2 || rf == nil || !rf.Down || rf.Resource != "app" || rf.Retries != 0 {
		t.Fatalf("b writable %v, started %d times, resource failure %+v; decisions %+v", b.vol.writable(), b.res.started, st.ResourceFailure, st.History)
	}
	if !hasDecision(st, failover.KindResource, false, "staying Primary with the resources down (the volume still served), starting them again every 10s; no handover: peer a is lost") {
		t.Fatalf("no decision to stay: %+v", st.History)
	}
	c.run(DefaultMonitorInterval, nil)
	if rf := b.a.Status().ResourceFailure; b.res.started != 3 || rf == nil || rf.Retries != 1 || b.a.resUp.Load() {
		t.Fatalf("after one monitor interval: started %d times, %+v", b.res.started, rf)
	}
	b.res.startErr = nil
	c.run(DefaultMonitorInterval, nil)
	if st := b.a.Status(); b.res.started != 4 || st.ResourceFailure != nil || !b.a.resUp.Load() || !hasDecision(st, failover.KindResource, true, "the resources are up again") {
		t.Fatalf("after the cause went away: started %d times, %+v", b.res.started, st.ResourceFailure)
	}
}

// The operator promoted the volume by hand and the chain failed to start:
// the agent hands the failure to the machine, which starts the chain once
// more and then, b being in sync, hands over to it.
func TestAgentOperatorPromotionStartFailure(t *testing.T) {
	c := newCluster(t)
	a, b := c.up()
	a.res.startErr = startError{"app", "start app: exit status 3"}
	a.a.Start()
	b.a.Start()
	defer a.a.Close()
	defer b.a.Close()
	if err := a.a.Resources(context.Background(), true); err == nil {
		t.Fatal("a failed start reported no error")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !hasDecision(a.a.Status(), failover.KindResource, true, "after 1 local recoveries: handing over to b") {
		if time.Now().After(deadline) {
			t.Fatalf("no handover within 10 s: %+v", a.a.Status().History)
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := a.a.Status()
	if a.res.started != 2 || !hasDecision(st, failover.KindPromote, false, "resources failed to start after the operator's promotion: start app: exit status 3") ||
		!hasDecision(st, failover.KindResource, true, "local recovery 1 of 1: resource app failed to start (start app: exit status 3)") {
		t.Fatalf("started %d times; decisions %+v", a.res.started, st.History)
	}
}
