package failover

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// harness drives one Machine by hand: the test plays the peer, the witness
// and the volume. Times are offsets from t0.
type harness struct {
	t    *testing.T
	m    *Machine
	now  time.Time
	all  []timedAction
	vote func(RequestVote) *WitnessVote // answers RequestVote at once, if set
	// holdStop leaves StopResources unanswered (a slow stop): the test
	// steps its result.
	holdStop bool
	// startErr, if set, is the result of every StartResources (a chain
	// that fails to start).
	startErr error
}

func newHarness(t *testing.T, node, peer string, tune func(*Config)) *harness {
	t.Helper()
	cfg := DefaultLAN()
	cfg.Node, cfg.Peer, cfg.Witness = node, peer, true
	if tune != nil {
		tune(&cfg)
	}
	m, err := New(cfg, HardState{}, t0)
	if err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, m: m, now: t0}
}

// newTarget is node b, Secondary, whose witness grants every request.
func newTarget(t *testing.T, tune func(*Config)) *harness {
	h := newHarness(t, "b", "a", tune)
	h.vote = func(r RequestVote) *WitnessVote {
		return &WitnessVote{Granted: true, Epoch: r.Epoch + 1}
	}
	return h
}

func (h *harness) step(e Event) []Action {
	acts := h.m.Step(e)
	for _, a := range acts {
		h.all = append(h.all, timedAction{h.now, a})
	}
	// Acknowledge what a runner does at once; Promote and Demote are left
	// to the test.
	var more []Action
	for _, a := range acts {
		switch a := a.(type) {
		case Fence:
			more = append(more, h.step(ActionResult{ID: a.ID})...)
		case Unfence:
			more = append(more, h.step(ActionResult{ID: a.ID})...)
		case StartResources:
			more = append(more, h.step(ActionResult{ID: a.ID, Err: h.startErr})...)
		case StopResources:
			if !h.holdStop {
				more = append(more, h.step(ActionResult{ID: a.ID})...)
			}
		case RequestVote:
			if h.vote != nil {
				if v := h.vote(a); v != nil {
					v.Now = h.now
					more = append(more, h.step(*v)...)
				}
			}
		}
	}
	return append(acts, more...)
}

func (h *harness) at(d time.Duration) { h.now = t0.Add(d) }

func (h *harness) local(s LocalState) []Action { return h.step(s) }

// hb delivers b on every path at offset d.
func (h *harness) hb(d time.Duration, b Beacon) []Action {
	h.at(d)
	var acts []Action
	for _, p := range h.m.cfg.Paths {
		acts = append(acts, h.step(Heartbeat{Path: p, Now: h.now, Beacon: b})...)
	}
	return acts
}

func (h *harness) tick(d time.Duration) []Action {
	h.at(d)
	return h.step(Tick{Now: h.now})
}

// ticks ticks every `every` from now until offset `until`.
func (h *harness) ticks(every, until time.Duration) []Action {
	var acts []Action
	for d := h.now.Sub(t0) + every; d <= until; d += every {
		acts = append(acts, h.tick(d)...)
	}
	return acts
}

// steady plays a healthy Primary peer: heartbeats every interval and ticks
// every tick interval, from now until offset `until`.
func (h *harness) steady(b Beacon, until time.Duration) []Action {
	var acts []Action
	I, T := h.m.cfg.HeartbeatInterval, h.m.cfg.TickInterval
	for d := h.now.Sub(t0) + T; d <= until; d += T {
		acts = append(acts, h.tick(d)...)
		if d%I == 0 {
			acts = append(acts, h.hb(d, b)...)
		}
	}
	return acts
}

func (h *harness) recorded(s string) bool {
	for _, ta := range h.all {
		if r, ok := ta.a.(Record); ok && strings.Contains(r.Decision.Cause, s) {
			return true
		}
	}
	return false
}

func (h *harness) decisions() string {
	var b strings.Builder
	for _, ta := range h.all {
		switch a := ta.a.(type) {
		case Record:
			fmt.Fprintf(&b, "%8v %s: %s\n", ta.at.Sub(t0), a.Decision.Kind, a.Decision.Cause)
		default:
			fmt.Fprintf(&b, "%8v %T %+v\n", ta.at.Sub(t0), a, a)
		}
	}
	return b.String()
}

// firstAt is when h first emitted an action of type T.
func firstAt[T Action](h *harness) (time.Duration, bool) {
	for _, ta := range h.all {
		if _, ok := ta.a.(T); ok {
			return ta.at.Sub(t0), true
		}
	}
	return 0, false
}

func has[T Action](acts []Action) bool {
	_, ok := find[T](acts)
	return ok
}

func find[T Action](acts []Action) (T, bool) {
	for _, a := range acts {
		if x, ok := a.(T); ok {
			return x, true
		}
	}
	var zero T
	return zero, false
}

var (
	primaryA = Beacon{Node: "a", Role: RolePrimary, Disk: DiskUpToDate, InSync: true}
	upToDate = LocalState{Role: RoleSecondary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate}
)

func TestConfigDefaults(t *testing.T) {
	lan, wan := DefaultLAN(), DefaultWAN()
	for _, tc := range []struct {
		cfg                 Config
		detect, fence, tick time.Duration
	}{
		{lan, 2 * time.Second, 1400 * time.Millisecond, 50 * time.Millisecond},
		{wan, 20 * time.Second, 17600 * time.Millisecond, 200 * time.Millisecond},
	} {
		if tc.cfg.DetectTimeout() != tc.detect || tc.cfg.FenceAfter() != tc.fence || tc.cfg.TickInterval != tc.tick || tc.cfg.LeaseTTL() != tc.detect {
			t.Errorf("detect %v fence %v tick %v", tc.cfg.DetectTimeout(), tc.cfg.FenceAfter(), tc.cfg.TickInterval)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := DefaultLAN()
	ok.Node, ok.Peer = "a", "b"
	for _, tc := range []struct {
		field string
		edit  func(*Config)
	}{
		{"Node", func(c *Config) { c.Node = "" }},
		{"Peer", func(c *Config) { c.Peer = "a" }},
		{"Paths", func(c *Config) { c.Paths = nil }},
		{"Paths", func(c *Config) { c.Paths = []string{"x", "x"} }},
		{"MissCount", func(c *Config) { c.MissCount = 2 }},
		{"TickInterval", func(c *Config) { c.TickInterval = c.HeartbeatInterval }},
		{"SafetyMargin", func(c *Config) { c.SafetyMargin = c.HeartbeatInterval / 2 }},
		{"SafetyMargin", func(c *Config) { c.SafetyMargin = c.DetectTimeout() }},
		{"JumpThreshold", func(c *Config) { c.JumpThreshold = c.HeartbeatInterval }},
		{"Failback", func(c *Config) { c.Failback = Failback{Policy: FailbackWindow, StartHour: 3, EndHour: 3, Max: 1} }},
		{"Failback", func(c *Config) { c.Failback = Failback{Policy: FailbackWindow, StartHour: 3, EndHour: 24, Max: 1} }},
	} {
		c := ok
		tc.edit(&c)
		_, err := New(c, HardState{}, t0)
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%s: got %v", tc.field, err)
		}
	}
	if _, err := New(ok, HardState{}, t0); err != nil {
		t.Fatal(err)
	}
}

// Site loss, exact timing: heartbeats stop at 10 s (the udp path already
// at 3 s: one dead path changes nothing); the target asks for the vote and
// promotes at the first tick at or after 10 s + 4 x 500 ms, and does
// nothing before.
func TestPromotionTiming(t *testing.T) {
	h := newTarget(t, nil)
	h.local(upToDate)
	I, T := h.m.cfg.HeartbeatInterval, h.m.cfg.TickInterval
	for d := T; d <= 10*time.Second; d += T {
		h.tick(d)
		if d%I == 0 {
			h.at(d)
			h.step(Heartbeat{Path: PathReplication, Now: h.now, Beacon: primaryA})
			if d <= 3*time.Second {
				h.step(Heartbeat{Path: PathUDP, Now: h.now, Beacon: primaryA})
			}
		}
	}
	lostAt := 10*time.Second + h.m.cfg.DetectTimeout()
	h.ticks(T, 15*time.Second)
	for _, ta := range h.all {
		if _, ok := ta.a.(Record); !ok && ta.at.Sub(t0) < lostAt {
			t.Fatalf("%T at %v, before the peer was lost at %v\n%s", ta.a, ta.at.Sub(t0), lostAt, h.decisions())
		}
	}
	req, _ := firstAt[RequestVote](h)
	prom, ok := firstAt[Promote](h)
	if !ok || req != lostAt || prom != lostAt {
		t.Fatalf("vote asked at %v, promoted at %v (%v); want both at %v\n%s", req, prom, ok, lostAt, h.decisions())
	}
	if s := h.m.Status(); s.Peer.State != Lost || !h.recorded("udp lost 9s") || !h.recorded("replication lost 2s") {
		t.Fatalf("status %+v\n%s", s.Peer, h.decisions())
	}
}

// With a coarser tick, promotion happens at the first tick at or after the
// loss, never before.
func TestPromotionTimingCoarseTick(t *testing.T) {
	h := newTarget(t, nil)
	h.local(upToDate)
	h.ticks(300*time.Millisecond, 1200*time.Millisecond)
	h.hb(1234*time.Millisecond, primaryA)
	lostAt := 1234*time.Millisecond + h.m.cfg.DetectTimeout()
	for d := 1500 * time.Millisecond; d <= 6*time.Second; d += 300 * time.Millisecond {
		h.tick(d)
	}
	prom, ok := firstAt[Promote](h)
	if !ok || prom < lostAt || prom >= lostAt+300*time.Millisecond {
		t.Fatalf("promoted at %v, lost at %v\n%s", prom, lostAt, h.decisions())
	}
}

func TestClockJump(t *testing.T) {
	t.Run("forward with a live peer", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 10*time.Second)
		// The clock jumps an hour; heartbeats keep coming on the new base.
		h.tick(time.Hour + 10*time.Second)
		h.steady(primaryA, time.Hour+40*time.Second)
		if _, ok := firstAt[RequestVote](h); ok || h.recorded("lost") || !h.recorded("clock jumped forward by 1h0m0s") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("forward with a dead peer: a full timeout after the jump", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 10*time.Second)
		h.tick(11 * time.Second) // 1 s of silence
		jump := time.Hour
		h.tick(jump)
		if h.recorded("lost") {
			t.Fatal("lost on the jump itself")
		}
		h.ticks(50*time.Millisecond, jump+5*time.Second)
		prom, ok := firstAt[Promote](h)
		if !ok || prom != jump+h.m.cfg.DetectTimeout() {
			t.Fatalf("promoted at %v (%v), want %v\n%s", prom, ok, jump+h.m.cfg.DetectTimeout(), h.decisions())
		}
	})
	t.Run("backward with a live peer", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 10*time.Second)
		h.tick(10*time.Second - time.Hour)
		h.steady(primaryA, 60*time.Second-time.Hour)
		if _, ok := firstAt[RequestVote](h); ok || h.recorded("lost") || !h.recorded("clock jumped backward by 1h0m0s") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("backward with a dead peer: never shorter, not an hour longer", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 10*time.Second)
		h.tick(11 * time.Second)
		back := 11*time.Second - time.Hour
		h.tick(back)
		h.ticks(50*time.Millisecond, back+30*time.Second)
		prom, ok := firstAt[Promote](h)
		if !ok || prom != back+h.m.cfg.DetectTimeout() {
			t.Fatalf("promoted at %v (%v)\n%s", prom, ok, h.decisions())
		}
	})
	t.Run("small reordering is not a jump", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 5*time.Second)
		h.at(5*time.Second - 20*time.Millisecond)
		h.step(Heartbeat{Path: PathUDP, Now: h.now, Beacon: primaryA})
		if h.recorded("clock") {
			t.Fatal(h.decisions())
		}
	})
}

// The same events in the same order give the same actions.
func TestDeterministic(t *testing.T) {
	run := func() string {
		c := newCluster(t, 42, nil)
		c.run(3 * time.Second)
		c.cut(linkRepl, linkUDP, "a-w")
		c.run(5 * time.Second)
		c.heal()
		c.run(5 * time.Second)
		return strings.Join(c.trace, "\n")
	}
	if a, b := run(), run(); a != b {
		t.Fatal("two runs differ")
	}
}

func TestAsyncLagBound(t *testing.T) {
	asyncTarget := LocalState{Role: RoleSecondary, Disk: DiskUpToDate, Async: true, Connected: true, PeerDisk: DiskUpToDate}
	for _, tc := range []struct {
		name    string
		bytes   int64
		lag     time.Duration
		promote bool
		cause   string
	}{
		{"within", 1 << 20, time.Second, true, "async lag 1048576 bytes / 1s within 67108864 bytes / 10s"},
		{"bytes beyond", 200 << 20, time.Second, false, "async target was 209715200 bytes / 1s behind"},
		{"time beyond", 1 << 20, 30 * time.Second, false, "async target was 1048576 bytes / 30s behind"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newTarget(t, nil)
			h.local(asyncTarget)
			b := primaryA
			b.LagBytes, b.LagTime = tc.bytes, tc.lag
			h.steady(b, 5*time.Second)
			h.ticks(50*time.Millisecond, 10*time.Second)
			if _, ok := firstAt[Promote](h); ok != tc.promote || !h.recorded(tc.cause) {
				t.Fatalf("promoted %v\n%s", ok, h.decisions())
			}
		})
	}
}

func TestInconsistentNeverPromoted(t *testing.T) {
	for _, d := range []DiskState{DiskInconsistent, DiskOutdated, DiskFailed, DiskDUnknown} {
		h := newTarget(t, nil)
		h.local(LocalState{Role: RoleSecondary, Disk: d, Connected: true, PeerDisk: DiskUpToDate})
		h.steady(primaryA, 3*time.Second)
		h.ticks(50*time.Millisecond, 60*time.Second)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("local disk is "+d.String()) {
			t.Fatalf("%s: \n%s", d, h.decisions())
		}
		if _, ok := firstAt[RequestVote](h); ok {
			t.Fatalf("%s: asked for the vote", d)
		}
	}
	// In sync mode, a target the Primary did not report in sync is not
	// promoted either, even if its own disk says UpToDate.
	h := newTarget(t, nil)
	h.local(upToDate)
	b := primaryA
	b.InSync, b.LagBytes = false, 8192
	h.steady(b, 3*time.Second)
	h.ticks(50*time.Millisecond, 10*time.Second)
	if _, ok := firstAt[Promote](h); ok || !h.recorded("did not report this node in sync") {
		t.Fatal(h.decisions())
	}
}

func TestTargetQuorum(t *testing.T) {
	t.Run("denied: the primary still holds the vote", func(t *testing.T) {
		h := newTarget(t, nil)
		h.vote = func(RequestVote) *WitnessVote { return &WitnessVote{Holder: "a", Epoch: 0} }
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		acts := h.ticks(50*time.Millisecond, 60*time.Second)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("the witness says a holds the vote") {
			t.Fatal(h.decisions())
		}
		// A standing condition is recorded once, not every tick, and the
		// witness is asked every interval once a lease has had time to
		// run out.
		records, asks := 0, 0
		for _, a := range acts {
			switch a.(type) {
			case Record:
				records++
			case RequestVote:
				asks++
			}
		}
		if records > 6 || asks > 50+57*2+6 {
			t.Fatalf("%d records, %d requests in a minute\n%s", records, asks, h.decisions())
		}
	})
	t.Run("witness silent", func(t *testing.T) {
		h := newTarget(t, nil)
		h.vote = nil
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		h.ticks(50*time.Millisecond, 20*time.Second)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("no vote from the witness since the peer was lost") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("a vote from before the loss does not count", func(t *testing.T) {
		h := newTarget(t, nil)
		h.vote = nil
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		h.step(WitnessVote{Now: h.now, Granted: true, Epoch: 1})
		h.ticks(50*time.Millisecond, 20*time.Second)
		if _, ok := firstAt[Promote](h); ok {
			t.Fatal(h.decisions())
		}
	})
	t.Run("outdated", func(t *testing.T) {
		h := newTarget(t, nil)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: 1, Outdated: true} }
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		h.ticks(50*time.Millisecond, 10*time.Second)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("the witness records this node as outdated") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("epoch skipped", func(t *testing.T) {
		h := newTarget(t, nil)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: 5} }
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		h.ticks(50*time.Millisecond, 10*time.Second)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("witness epoch 5 is more than one ahead") {
			t.Fatal(h.decisions())
		}
	})
}

func TestNoWitnessConfirmOnly(t *testing.T) {
	noWitness := func(c *Config) { c.Witness = false }
	h := newTarget(t, noWitness)
	h.local(upToDate)
	h.steady(primaryA, 3*time.Second)
	acts := h.ticks(50*time.Millisecond, 10*time.Second)
	acts = append(acts, h.ticks(10*time.Second, time.Hour)...)
	in, ok := find[AnnounceIntent](acts)
	if !ok || !in.Deadline.IsZero() || has[Promote](acts) || has[RequestVote](acts) {
		t.Fatalf("intent %+v\n%s", in, h.decisions())
	}
	if !h.recorded("no witness: automatic failover disabled (confirm-only)") {
		t.Fatal(h.decisions())
	}
	acts = h.step(Confirm{})
	if p, ok := find[Promote](acts); !ok || p.Force {
		t.Fatalf("after Confirm: %v", acts)
	}

	// Deny: nothing, for ever.
	h = newTarget(t, noWitness)
	h.local(upToDate)
	h.steady(primaryA, 3*time.Second)
	h.ticks(50*time.Millisecond, 10*time.Second)
	acts = h.step(Deny{})
	acts = append(acts, h.ticks(10*time.Second, 2*time.Hour)...)
	if !has[WithdrawIntent](acts) || has[Promote](acts) {
		t.Fatal(h.decisions())
	}
}

func TestConfirmMode(t *testing.T) {
	confirm := func(def ConfirmAction) func(*Config) {
		return func(c *Config) {
			c.Mode, c.DefaultConfirmAction, c.ConfirmTimeout = ModeConfirm, def, time.Minute
		}
	}
	lose := func(h *harness) []Action {
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		return h.ticks(50*time.Millisecond, 6*time.Second)
	}
	t.Run("confirm", func(t *testing.T) {
		h := newTarget(t, confirm(Abandon))
		acts := lose(h)
		in, ok := find[AnnounceIntent](acts)
		if !ok || has[Promote](acts) || in.Deadline != t0.Add(5*time.Second+time.Minute) {
			t.Fatalf("%+v\n%s", in, h.decisions())
		}
		if s := h.m.Status(); s.Intent == nil || s.Intent.Want != "promote" {
			t.Fatalf("status intent %+v", s.Intent)
		}
		h.at(20 * time.Second)
		acts = h.step(Confirm{})
		if !has[Promote](acts) {
			t.Fatal(h.decisions())
		}
	})
	t.Run("deny", func(t *testing.T) {
		h := newTarget(t, confirm(Proceed))
		lose(h)
		acts := h.step(Deny{})
		acts = append(acts, h.ticks(100*time.Millisecond, 5*time.Minute)...)
		if !has[WithdrawIntent](acts) || has[Promote](acts) || !h.recorded("denied by the operator") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("timeout proceeds", func(t *testing.T) {
		h := newTarget(t, confirm(Proceed))
		lose(h)
		h.ticks(100*time.Millisecond, 2*time.Minute)
		prom, ok := firstAt[Promote](h)
		if !ok || prom != 5*time.Second+time.Minute || !h.recorded("default action proceed") {
			t.Fatalf("promoted at %v\n%s", prom, h.decisions())
		}
	})
	t.Run("timeout abandons", func(t *testing.T) {
		h := newTarget(t, confirm(Abandon))
		lose(h)
		h.ticks(100*time.Millisecond, 5*time.Minute)
		if _, ok := firstAt[Promote](h); ok || !h.recorded("default action abandon") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("peer returns: intent withdrawn", func(t *testing.T) {
		h := newTarget(t, confirm(Proceed))
		lose(h)
		acts := h.hb(7*time.Second, primaryA)
		acts = append(acts, h.step(Confirm{})...)
		if !has[WithdrawIntent](acts) || has[Promote](acts) {
			t.Fatal(h.decisions())
		}
	})
}

func TestMaintenance(t *testing.T) {
	t.Run("target", func(t *testing.T) {
		h := newTarget(t, func(c *Config) { c.Mode = ModeMaintenance })
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		acts := h.ticks(50*time.Millisecond, time.Minute)
		if has[Promote](acts) || has[RequestVote](acts) || has[AnnounceIntent](acts) {
			t.Fatal(h.decisions())
		}
		if !h.recorded("maintenance: would ask the witness for the vote and promote") {
			t.Fatal(h.decisions())
		}
		// Leaving maintenance: confirm mode.
		acts = h.step(SetMaintenance{On: false})
		acts = append(acts, h.ticks(50*time.Millisecond, 61*time.Second)...)
		if !has[AnnounceIntent](acts) || has[Promote](acts) {
			t.Fatal(h.decisions())
		}
	})
	t.Run("primary", func(t *testing.T) {
		h := newHarness(t, "a", "b", nil)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: r.Epoch} }
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
		b := Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}
		acts := h.steady(b, 3*time.Second)
		if !has[Unfence](acts) && h.m.Status().Fenced {
			t.Fatal(h.decisions())
		}
		h.step(SetMaintenance{On: true})
		h.vote = nil // witness and peer both gone
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate})
		acts = h.ticks(50*time.Millisecond, 20*time.Second)
		if has[Fence](acts) || !h.recorded("maintenance: would fence") {
			t.Fatal(h.decisions())
		}
	})
}

func TestForcePromote(t *testing.T) {
	lost := func(t *testing.T, ls LocalState, b Beacon) *harness {
		h := newTarget(t, func(c *Config) { c.Witness = false })
		h.local(ls)
		h.steady(b, 3*time.Second)
		h.ticks(50*time.Millisecond, 10*time.Second)
		return h
	}
	t.Run("refused without acknowledgement", func(t *testing.T) {
		h := lost(t, upToDate, primaryA)
		acts := h.step(ForcePromote{})
		if has[Promote](acts) || !h.recorded("ForcePromote refused without AcceptDataLoss: a was last heard 7s ago as Primary at epoch 0") ||
			!h.recorded("a reported this node in sync then; writes it acknowledged in the last 7s would be lost") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("async lag in the refusal", func(t *testing.T) {
		b := primaryA
		b.LagBytes, b.LagTime = 5<<20, 3*time.Second
		h := lost(t, LocalState{Role: RoleSecondary, Disk: DiskUpToDate, Async: true, Connected: true}, b)
		h.step(ForcePromote{})
		if !h.recorded("last reported lag 5242880 bytes / 3s, plus whatever a acknowledged in the last 7s") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("inconsistent in the refusal", func(t *testing.T) {
		h := lost(t, LocalState{Role: RoleSecondary, Disk: DiskInconsistent, Connected: true}, primaryA)
		h.step(ForcePromote{})
		if !h.recorded("the local disk is Inconsistent (resync incomplete)") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("accepted", func(t *testing.T) {
		h := lost(t, LocalState{Role: RoleSecondary, Disk: DiskInconsistent, Connected: true}, primaryA)
		acts := h.step(ForcePromote{AcceptDataLoss: true})
		p, ok := find[Promote](acts)
		if !ok || !p.Force || !h.recorded("FORCED PROMOTION by the operator") {
			t.Fatal(h.decisions())
		}
		acts = h.step(ActionResult{ID: p.ID})
		if !has[StartResources](acts) || !h.m.Status().Forced {
			t.Fatal(h.decisions())
		}
	})
	t.Run("refused while the peer is alive and Primary", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		acts := h.step(ForcePromote{AcceptDataLoss: true})
		if has[Promote](acts) || !h.recorded("a is alive and Primary") {
			t.Fatal(h.decisions())
		}
	})
	t.Run("fenced primary", func(t *testing.T) {
		h := newHarness(t, "a", "b", nil)
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Fenced: true})
		h.ticks(50*time.Millisecond, 5*time.Second)
		acts := h.step(ForcePromote{})
		if has[Unfence](acts) || !h.recorded("ForcePromote refused without AcceptDataLoss: this Primary is fenced because") {
			t.Fatal(h.decisions())
		}
		acts = h.step(ForcePromote{AcceptDataLoss: true})
		acts = append(acts, h.ticks(50*time.Millisecond, 30*time.Second)...)
		if !has[Unfence](acts) || has[Fence](acts) || !h.recorded("FORCED UNFENCE") {
			t.Fatal(h.decisions())
		}
	})
}

func TestReturningPrimaryDemotes(t *testing.T) {
	for _, tc := range []struct {
		name         string
		node, peer   string
		mine, theirs uint64
		demote       bool
	}{
		{"peer newer", "a", "b", 3, 4, true},
		{"peer older", "a", "b", 4, 3, false},
		{"split brain, greater name steps down", "b", "a", 4, 4, true},
		{"split brain, lesser name stays", "a", "b", 4, 4, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultLAN()
			cfg.Node, cfg.Peer, cfg.Witness = tc.node, tc.peer, true
			m, err := New(cfg, HardState{Epoch: tc.mine}, t0)
			if err != nil {
				t.Fatal(err)
			}
			h := &harness{t: t, m: m, now: t0}
			h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: r.Epoch} }
			h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
			if s := h.m.Status(); s.Fenced {
				t.Fatalf("not serving: %s", h.decisions())
			}
			acts := h.hb(100*time.Millisecond, Beacon{Node: tc.peer, Role: RolePrimary, Disk: DiskUpToDate, Epoch: tc.theirs})
			d, ok := find[Demote](acts)
			if ok != tc.demote {
				t.Fatal(h.decisions())
			}
			if !ok {
				return
			}
			// Fence first, in error mode (writes fail, none hangs the
			// stop), stop resources, demote: in that order.
			var order []string
			for _, a := range acts {
				switch a.(type) {
				case Fence, StopResources, Demote:
					order = append(order, fmt.Sprintf("%T", a))
				}
			}
			if strings.Join(order, " ") != "failover.Fence failover.StopResources failover.Demote" {
				t.Fatalf("order %v", order)
			}
			if f, _ := find[Fence](acts); f.How != FenceError {
				t.Fatalf("stepped down with %+v, want error mode", f)
			}
			h.step(ActionResult{ID: d.ID})
			if s := h.m.Status(); s.Role != RoleSecondary || s.Fenced {
				t.Fatalf("%+v", s)
			}
		})
	}
}

// A Primary already holding writes (suspend: here it lost quorum) that
// hears a newer Primary switches the fence to error mode before it stops
// its resources: the held writes fail instead of hanging an unmount, and
// none is acknowledged.
func TestSteppingDownFailsHeldWrites(t *testing.T) {
	cfg := DefaultLAN()
	cfg.Node, cfg.Peer, cfg.Witness = "a", "b", true
	m, err := New(cfg, HardState{Epoch: 3}, t0)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, m: m, now: t0}
	h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: r.Epoch} }
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	h.steady(secondaryB, 2*time.Second)
	h.vote = nil // the witness goes silent, b too: quorum lost
	acts := h.ticks(50*time.Millisecond, 4*time.Second)
	if f, ok := find[Fence](acts); !ok || f.How != FenceSuspend || !h.m.Status().Fenced {
		t.Fatalf("not holding writes: %v\n%s", acts, h.decisions())
	}
	acts = h.hb(4100*time.Millisecond, Beacon{Node: "b", Role: RolePrimary, Disk: DiskUpToDate, Epoch: 4})
	var order []string
	for _, a := range acts {
		switch a := a.(type) {
		case Fence:
			order = append(order, "Fence:"+a.How.String())
		case StopResources, Demote:
			order = append(order, strings.TrimPrefix(fmt.Sprintf("%T", a), "failover."))
		}
	}
	if got := strings.Join(order, " "); got != "Fence:error StopResources Demote" {
		t.Fatalf("step-down order %q\n%s", got, h.decisions())
	}
}

// A switchover stops the resources while writes are still acknowledged
// (an application's shutdown and an unmount write: held writes would hang
// them), then holds writes, drains and demotes. While the resources stop
// unfenced the quorum rules still apply.
func TestSwitchoverStopsResourcesBeforeHoldingWrites(t *testing.T) {
	b := Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}
	setup := func(t *testing.T) (*harness, StopResources) {
		h := newHarness(t, "a", "b", nil)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Holder: "a", Epoch: r.Epoch} }
		h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
		h.steady(b, 3*time.Second)
		if h.m.Status().Fenced {
			t.Fatal(h.decisions())
		}
		h.holdStop = true
		acts := h.step(Switchover{})
		st, ok := find[StopResources](acts)
		if !ok || has[Fence](acts) || has[Demote](acts) || h.m.Status().Switchover != "stop-resources" {
			t.Fatalf("switchover's first step: %v\n%s", acts, h.decisions())
		}
		return h, st
	}
	t.Run("in order", func(t *testing.T) {
		h, st := setup(t)
		// A slow stop: writes stay acknowledged all along.
		if acts := h.steady(b, 8*time.Second); has[Fence](acts) || h.m.Status().Fenced {
			t.Fatalf("fenced while the resources stop:\n%s", h.decisions())
		}
		acts := h.step(ActionResult{ID: st.ID})
		var order []string
		for _, a := range acts {
			switch a.(type) {
			case Fence, Demote, StartResources:
				order = append(order, fmt.Sprintf("%T", a))
			}
		}
		if strings.Join(order, " ") != "failover.Fence failover.Demote" {
			t.Fatalf("after the stop: %v\n%s", order, h.decisions())
		}
	})
	t.Run("quorum lost while stopping", func(t *testing.T) {
		h, st := setup(t)
		h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Holder: "b", Epoch: r.Epoch + 1} }
		acts := h.ticks(50*time.Millisecond, 4*time.Second) // b silent, the witness denies
		if f, ok := find[Fence](acts); !ok || !h.recorded("while the switchover stops resources: the witness says b holds the vote") {
			t.Fatalf("not fenced (%v) while stopping without quorum:\n%s", f, h.decisions())
		}
		acts = h.step(ActionResult{ID: st.ID})
		if !has[StartResources](acts) || has[Unfence](acts) || has[Demote](acts) || !h.recorded("switchover aborted: quorum lost") || !h.m.Status().Fenced {
			t.Fatalf("after the stop without quorum: %v\n%s", acts, h.decisions())
		}
	})
	t.Run("stop fails", func(t *testing.T) {
		h, st := setup(t)
		acts := h.step(ActionResult{ID: st.ID, Err: errors.New("unmount: busy")})
		if !has[StartResources](acts) || has[Fence](acts) || has[Demote](acts) || h.m.Status().Fenced ||
			!h.recorded("switchover aborted: stopping resources failed: unmount: busy") {
			t.Fatalf("after a failed stop: %v\n%s", acts, h.decisions())
		}
	})
}

func TestSwitchoverTimeout(t *testing.T) {
	h := newHarness(t, "a", "b", func(c *Config) { c.Witness = false })
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate, LagBytes: 4096})
	b := Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}
	h.steady(b, 3*time.Second)
	acts := h.step(Switchover{})
	f, ok := find[Fence](acts)
	if !ok || f.How != FenceSuspend {
		t.Fatal(h.decisions())
	}
	h.step(ActionResult{ID: f.ID})
	acts = h.steady(b, 20*time.Second)
	if !has[Unfence](acts) || has[Demote](acts) || has[StopResources](acts) || !h.recorded("switchover aborted: target not in sync after 10s") {
		t.Fatal(h.decisions())
	}
	if s := h.m.Status(); s.Fenced || s.Role != RolePrimary || s.Switchover != "" {
		t.Fatalf("%+v", s)
	}
}

func TestStatus(t *testing.T) {
	h := newTarget(t, nil)
	h.vote = func(RequestVote) *WitnessVote { return &WitnessVote{Holder: "a", Epoch: 3} }
	h.local(upToDate)
	h.steady(primaryA, 3*time.Second)
	h.at(3500 * time.Millisecond)
	h.step(Heartbeat{Path: PathReplication, Now: h.now, Beacon: primaryA})
	h.tick(4100 * time.Millisecond)
	s := h.m.Status()
	if s.Role != RoleSecondary || s.Peer.State != Alive || !s.Peer.Seen || s.Peer.Role != RolePrimary || !s.Peer.InSync {
		t.Fatalf("%+v", s)
	}
	want := map[string]PathState{PathReplication: Alive, PathUDP: Suspect}
	for _, p := range s.Peer.Paths {
		if p.State != want[p.Name] {
			t.Errorf("path %s %s, want %s", p.Name, p.State, want[p.Name])
		}
	}
	if s.Peer.Paths[0].LastSeen != t0.Add(3500*time.Millisecond) || s.Peer.Paths[1].Silent != 1100*time.Millisecond {
		t.Errorf("paths %+v", s.Peer.Paths)
	}
	h.ticks(50*time.Millisecond, 6*time.Second)
	s = h.m.Status()
	if s.Peer.State != Lost || s.Peer.LostAt != t0.Add(5500*time.Millisecond) || s.Quorum.Holder != "a" || s.Quorum.Granted || s.Quorum.Epoch != 3 {
		t.Fatalf("%+v", s)
	}
	if s.Last.Kind != KindNoPromote || !strings.Contains(s.Last.Cause, "the witness says a holds the vote") || s.Last.Facts.QuorumHolder != "a" {
		t.Fatalf("last %v", s.Last)
	}
	if s.Last.Facts.Paths[0].State != Lost || !strings.Contains(s.Last.String(), "replication lost") {
		t.Fatalf("facts %v", s.Last)
	}
}

// A serving Primary tells the runner when to fence on its own if the agent
// hangs: the last quorum evidence plus FenceAfter.
func TestServeUntil(t *testing.T) {
	h := newHarness(t, "a", "b", nil)
	h.vote = func(r RequestVote) *WitnessVote { return &WitnessVote{Granted: true, Epoch: r.Epoch} }
	h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate})
	h.steady(Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}, 2*time.Second)
	s := h.m.Status()
	if s.Fenced || s.ServeUntil != t0.Add(2*time.Second+h.m.cfg.FenceAfter()) {
		t.Fatalf("serve until %v", s.ServeUntil.Sub(t0))
	}
	if b := h.m.Beacon(); b.Role != RolePrimary || !b.InSync || !b.Hears || b.Node != "a" {
		t.Fatalf("beacon %+v", b)
	}
}

func TestEpochs(t *testing.T) {
	t.Run("a Secondary in sync takes its Primary's epoch", func(t *testing.T) {
		for _, mine := range []uint64{2, 9} {
			cfg := DefaultLAN()
			cfg.Node, cfg.Peer, cfg.Witness = "b", "a", true
			m, err := New(cfg, HardState{Epoch: mine}, t0)
			if err != nil {
				t.Fatal(err)
			}
			h := &harness{t: t, m: m, now: t0}
			h.local(upToDate)
			b := primaryA
			b.Epoch = 5
			acts := h.hb(100*time.Millisecond, b)
			if e, ok := find[SaveEpoch](acts); !ok || e.Epoch != 5 || h.m.Beacon().Epoch != 5 {
				t.Fatalf("from %d: %v", mine, acts)
			}
			// Not while resyncing.
			h.local(LocalState{Role: RoleSecondary, Disk: DiskInconsistent, Connected: true})
			b.Epoch = 6
			if acts := h.hb(600*time.Millisecond, b); has[SaveEpoch](acts) {
				t.Fatalf("adopted while Inconsistent: %v", acts)
			}
		}
	})
	t.Run("a failed promotion gives the epoch back", func(t *testing.T) {
		h := newTarget(t, nil)
		h.local(upToDate)
		h.steady(primaryA, 3*time.Second)
		acts := h.ticks(50*time.Millisecond, 6*time.Second)
		p, ok := find[Promote](acts)
		if e, _ := find[SaveEpoch](acts); !ok || e.Epoch != 1 {
			t.Fatal(h.decisions())
		}
		acts = h.step(ActionResult{ID: p.ID, Err: errors.New("disk went away")})
		if e, ok := find[SaveEpoch](acts); !ok || e.Epoch != 0 || !h.recorded("promotion failed: disk went away; back to epoch 0") {
			t.Fatal(h.decisions())
		}
		// It retries after a detection timeout.
		acts = h.ticks(50*time.Millisecond, 9*time.Second)
		if !has[Promote](acts) {
			t.Fatal(h.decisions())
		}
	})
}

// A sync Primary that keeps the vote but loses its target on every path
// while the replication session still looks up drops the session at the
// detection timeout instead of waiting for the session's own timeout; the
// volume then holds writes, the machine claims the target outdated, and
// lets writes through once the witness has recorded it.
func TestPrimaryDropsSilentSessionAtDetection(t *testing.T) {
	h := newHarness(t, "a", "b", nil)
	h.vote = func(r RequestVote) *WitnessVote {
		return &WitnessVote{Granted: true, Holder: "a", Epoch: r.Epoch, PeerOutdated: r.PeerOutdated}
	}
	connected := LocalState{Role: RolePrimary, Disk: DiskUpToDate, Connected: true, PeerDisk: DiskUpToDate}
	h.local(connected)
	b := Beacon{Node: "b", Role: RoleSecondary, Disk: DiskUpToDate, Hears: true}
	h.steady(b, 3*time.Second)
	if h.m.Status().Fenced {
		t.Fatal(h.decisions())
	}
	// b falls silent on every path; the session is not torn down yet.
	acts := h.ticks(50*time.Millisecond, 3*time.Second+h.m.cfg.DetectTimeout()-50*time.Millisecond)
	if has[DropReplication](acts) {
		t.Fatalf("dropped before the detection timeout:\n%s", h.decisions())
	}
	acts = h.ticks(50*time.Millisecond, 3*time.Second+h.m.cfg.DetectTimeout()+50*time.Millisecond)
	if !has[DropReplication](acts) || !h.recorded("dropped now, not after its own timeout") {
		t.Fatalf("no early drop at the detection timeout:\n%s", h.decisions())
	}
	// The volume dropped the session and holds writes (HoldOnDisconnect).
	acts = h.local(LocalState{Role: RolePrimary, Disk: DiskUpToDate, Fenced: true, PeerDisk: DiskDUnknown})
	acts = append(acts, h.tick(3*time.Second+h.m.cfg.DetectTimeout()+100*time.Millisecond)...)
	var claimed bool
	for _, ta := range h.all {
		if r, ok := ta.a.(RequestVote); ok && r.PeerOutdated {
			claimed = true
		}
	}
	if !claimed || !has[Unfence](acts) || h.m.Status().Fenced {
		t.Fatalf("claimed b outdated %v; writes let through: %v\n%s", claimed, has[Unfence](acts), h.decisions())
	}
	// Only once per loss.
	if acts := h.ticks(50*time.Millisecond, 8*time.Second); has[DropReplication](acts) {
		t.Fatalf("dropped again:\n%s", h.decisions())
	}
}
