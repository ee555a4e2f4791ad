package failover

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"testing"
	"time"
)

// The simulated cluster: two Machines driven by a simulated runner, a
// witness that follows the contract in the package documentation, links
// that can be cut per path, volumes that model sync replication as a write
// lineage, and a clock. Everything is driven from one seeded RNG and an
// event queue, so a failing seed replays exactly.

var t0 = time.Date(2025, 3, 1, 10, 0, 0, 0, time.UTC)

const (
	linkRepl = "a-b:" + PathReplication
	linkUDP  = "a-b:" + PathUDP
)

type qitem struct {
	at  time.Time
	seq int
	fn  func()
}

type queue []*qitem

func (q queue) Len() int { return len(q) }
func (q queue) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q queue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *queue) Push(x any)   { *q = append(*q, x.(*qitem)) }
func (q *queue) Pop() any {
	old := *q
	it := old[len(old)-1]
	*q = old[:len(old)-1]
	return it
}

type span struct{ from, to time.Time }

type simNode struct {
	name, peer string
	cfg        Config
	m          *Machine
	up         bool
	inc        int // incarnation: deliveries to a previous one are dropped
	hs         HardState

	// The volume.
	role      Role
	disk      DiskState
	fenced    bool
	resources bool
	// appFault: the resource "app" fails its check; appBroken: and a
	// restart does not cure it.
	appFault, appBroken bool
	// startBroken: the chain fails to start (app refuses) and rolls back.
	startBroken bool
	chain       int    // writes applied
	hash        uint64 // lineage: hash of every write applied
	resyncing   bool
	resyncInc   int

	offset  time.Duration // local clock = simulated time + offset
	phase   time.Duration // tick phase
	hbPhase time.Duration
	sent    LocalState
	sentOK  bool

	writable bool
	since    time.Time
	spans    []span
	acts     []timedAction
}

type timedAction struct {
	at time.Time
	a  Action
}

type simWitness struct {
	holder, prev string
	expiry       time.Time
	epoch        uint64
	outdated     map[string]bool
}

func (w *simWitness) request(now time.Time, node, peer string, r RequestVote, ttl time.Duration) WitnessVote {
	if w.holder != "" && w.holder != node && now.Before(w.expiry) {
		return WitnessVote{Holder: w.holder, Epoch: w.epoch}
	}
	if w.prev != node {
		w.epoch = max(w.epoch, r.Epoch) + 1
	} else {
		w.epoch = max(w.epoch, r.Epoch)
	}
	w.holder, w.prev, w.expiry = node, node, now.Add(ttl)
	w.outdated[peer] = r.PeerOutdated
	return WitnessVote{Granted: true, Holder: node, Epoch: w.epoch, Outdated: w.outdated[node], PeerOutdated: w.outdated[peer]}
}

func (w *simWitness) release(now time.Time, node, to string, ttl time.Duration) error {
	if w.holder != node {
		return errors.New("not the holder")
	}
	w.holder, w.prev, w.expiry = to, to, now.Add(ttl)
	w.epoch++
	return nil
}

type cluster struct {
	t    testing.TB
	now  time.Time
	seq  int
	q    queue
	n    [2]*simNode
	up   map[string]bool
	drop map[string]float64 // heartbeat loss per link
	// oneway["a"]: every heartbeat from a is lost (a one-way partition;
	// the replication session, being TCP, is cut separately).
	oneway map[string]bool
	wUp    bool
	w      simWitness
	rng    *rand.Rand
	lat    time.Duration
	dirty  bool

	resyncDur time.Duration
	acked     struct {
		chain int
		hash  uint64
	}
	trace    []string
	onIntent func(n *simNode, a AnnounceIntent)
	noWrites bool
	verbose  bool
	// async: the volumes replicate asynchronously (shipping is instant
	// while connected); a promotion may then lose the writes made while
	// the peer was cut off, within the lag bound.
	async bool
}

func newCluster(t testing.TB, seed int64, tune func(*Config)) *cluster {
	return newClusterAt(t, seed, t0, tune)
}

func newClusterAt(t testing.TB, seed int64, start time.Time, tune func(*Config)) *cluster {
	c := &cluster{
		t: t, now: start, rng: rand.New(rand.NewSource(seed)), lat: 2 * time.Millisecond,
		up:   map[string]bool{linkRepl: true, linkUDP: true, "a-w": true, "b-w": true},
		drop: map[string]float64{}, wUp: true, oneway: map[string]bool{},
		w:         simWitness{outdated: map[string]bool{}},
		resyncDur: 300 * time.Millisecond,
	}
	names := [2][2]string{{"a", "b"}, {"b", "a"}}
	for i := range c.n {
		cfg := DefaultLAN()
		cfg.Node, cfg.Peer, cfg.Witness = names[i][0], names[i][1], true
		if tune != nil {
			tune(&cfg)
		}
		n := &simNode{name: cfg.Node, peer: cfg.Peer, cfg: cfg, up: true, disk: DiskUpToDate,
			phase:   time.Duration(c.rng.Int63n(int64(cfg.TickInterval/time.Millisecond))) * time.Millisecond,
			hbPhase: time.Duration(c.rng.Int63n(int64(cfg.HeartbeatInterval/time.Millisecond))) * time.Millisecond,
		}
		c.n[i] = n
	}
	a, b := c.n[0], c.n[1]
	a.role, b.role = RolePrimary, RoleSecondary
	// A runner starts a Primary fenced; the machine unfences it.
	a.fenced = true
	for _, n := range c.n {
		c.newMachine(n)
		c.loops(n)
	}
	c.settle()
	return c
}

func (c *cluster) newMachine(n *simNode) {
	m, err := New(n.cfg, n.hs, c.local(n))
	if err != nil {
		c.t.Fatal(err)
	}
	n.m = m
}

func (c *cluster) local(n *simNode) time.Time { return c.now.Add(n.offset) }
func (c *cluster) peerOf(n *simNode) *simNode {
	if n == c.n[0] {
		return c.n[1]
	}
	return c.n[0]
}
func wlink(n *simNode) string { return n.name + "-w" }

func (c *cluster) at(t time.Time, fn func()) {
	c.seq++
	heap.Push(&c.q, &qitem{at: t, seq: c.seq, fn: fn})
}
func (c *cluster) after(d time.Duration, fn func()) { c.at(c.now.Add(d), fn) }
func (c *cluster) latency() time.Duration {
	// Whole milliseconds keep the recorded causes readable.
	return c.lat + time.Duration(c.rng.Int63n(int64(c.lat/time.Millisecond)+1))*time.Millisecond
}

func (c *cluster) loops(n *simNode) {
	var tick, beat func()
	tick = func() {
		if n.up {
			c.step(n, Tick{Now: c.local(n)})
			c.write(n)
		}
		c.after(n.cfg.TickInterval, tick)
	}
	beat = func() {
		if n.up {
			c.heartbeat(n)
		}
		c.after(n.cfg.HeartbeatInterval, beat)
	}
	c.after(n.phase, tick)
	c.after(n.hbPhase, beat)
}

func (c *cluster) heartbeat(n *simNode) {
	p := c.peerOf(n)
	b := n.m.Beacon()
	for _, path := range n.cfg.Paths {
		link := "a-b:" + path
		if !c.up[link] || c.oneway[n.name] || c.rng.Float64() < c.drop[link] {
			continue
		}
		inc := p.inc
		c.after(c.latency(), func() {
			if p.up && p.inc == inc && c.up[link] {
				c.step(p, Heartbeat{Path: path, Now: c.local(p), Beacon: b})
			}
		})
	}
}

func (c *cluster) connected() bool {
	a, b := c.n[0], c.n[1]
	return a.up && b.up && c.up[linkRepl] && !(a.role == RolePrimary && b.role == RolePrimary)
}

// write is the application writing through a writable Primary. In sync
// mode the write is acknowledged once the peer has it, or locally when
// the replication session is down (degraded, standalone).
func (c *cluster) write(n *simNode) {
	if c.noWrites || !n.up || n.role != RolePrimary || n.fenced {
		return
	}
	p := c.peerOf(n)
	n.chain++
	n.hash = n.hash*1099511628211 + uint64(n.chain)*2654435761 + 1
	if c.connected() && p.role == RoleSecondary && p.disk == DiskUpToDate && !p.resyncing {
		p.chain, p.hash = n.chain, n.hash
	}
	c.acked.chain, c.acked.hash = n.chain, n.hash
	c.dirty = true
}

func (c *cluster) step(n *simNode, e Event) {
	if !n.up {
		return
	}
	c.apply(n, n.m.Step(e))
}

func (c *cluster) logf(format string, a ...any) {
	s := fmt.Sprintf("%8.3fs ", c.now.Sub(t0).Seconds()) + fmt.Sprintf(format, a...)
	c.trace = append(c.trace, s)
	if c.verbose {
		c.t.Log(s)
	}
}

func (c *cluster) apply(n *simNode, acts []Action) {
	var results []ActionResult
	ok := func(id ActionID, err error) { results = append(results, ActionResult{ID: id, Err: err}) }
	p := c.peerOf(n)
	ttl := n.cfg.LeaseTTL()
	for _, a := range acts {
		n.acts = append(n.acts, timedAction{c.now, a})
		switch a := a.(type) {
		case Record:
			c.logf("%s: %s: %s", n.name, a.Decision.Kind, a.Decision.Cause)
			continue
		case RequestVote, SaveEpoch:
		default:
			c.logf("%s: %T %+v", n.name, a, a)
		}
		switch a := a.(type) {
		case SaveEpoch:
			n.hs.Epoch = a.Epoch
		case Promote:
			var err error
			switch {
			case n.role == RolePrimary:
			case !a.Force && n.disk != DiskUpToDate:
				err = errors.New("local disk is " + n.disk.String())
			case c.up[linkRepl] && p.up && p.role == RolePrimary:
				err = errors.New("peer is Primary")
			}
			if err == nil {
				if !a.Force && !c.async && n.hash != c.acked.hash {
					c.fail("%s promoted without acknowledged writes: has %d writes, %d acknowledged", n.name, n.chain, c.acked.chain)
				}
				n.role, n.fenced = RolePrimary, false
			}
			ok(a.ID, err)
		case Demote:
			n.role, n.fenced = RoleSecondary, false
			ok(a.ID, nil)
		case Fence:
			n.fenced = true
			ok(a.ID, nil)
		case Unfence:
			n.fenced = false
			ok(a.ID, nil)
		case StartResources:
			var err error
			if n.startBroken {
				err = startError{"app", "start app: exit status 3; rolled back ip"}
			}
			n.resources = err == nil
			ok(a.ID, err)
		case StopResources:
			n.resources = false
			ok(a.ID, nil)
		case RecoverResources:
			var err error
			if n.appBroken {
				err = errors.New("start app: exit status 3")
			} else {
				n.appFault = false
			}
			ok(a.ID, err)
		case RequestVote:
			if !c.up[wlink(n)] || !c.wUp {
				continue
			}
			inc, req := n.inc, a
			c.after(c.latency(), func() {
				if !c.up[wlink(n)] || !c.wUp {
					return
				}
				v := c.w.request(c.now, n.name, n.peer, req, ttl)
				c.after(c.latency(), func() {
					if n.up && n.inc == inc && c.up[wlink(n)] {
						v.Now = c.local(n)
						c.step(n, v)
					}
				})
			})
		case ReleaseVote:
			var err error
			if c.up[wlink(n)] && c.wUp {
				err = c.w.release(c.now, n.name, a.To, ttl)
			} else {
				err = errors.New("witness unreachable")
			}
			ok(a.ID, err)
		case PeerPromote:
			if !p.up || !(c.up[linkRepl] || c.up[linkUDP]) {
				ok(a.ID, errors.New("peer unreachable"))
				continue
			}
			inc, h := p.inc, Handover{From: n.name, Epoch: a.Epoch}
			c.after(c.latency(), func() {
				if p.up && p.inc == inc {
					c.step(p, h)
				}
			})
			ok(a.ID, nil)
		case AnnounceIntent:
			if c.onIntent != nil {
				c.onIntent(n, a)
			}
		}
		c.dirty = true
		c.checkWritable()
	}
	for _, r := range results {
		c.step(n, r)
	}
}

// settle brings the volumes' replication state and each machine's
// LocalState up to date.
func (c *cluster) settle() {
	for i := 0; i < 100; i++ {
		c.dirty = false
		c.refresh()
		if !c.dirty {
			return
		}
	}
	c.fail("replication state does not settle")
}

func (c *cluster) refresh() {
	a, b := c.n[0], c.n[1]
	conn := c.connected()
	for _, pr := range [][2]*simNode{{a, b}, {b, a}} {
		p, s := pr[0], pr[1]
		if !conn {
			if s.resyncing {
				s.resyncing = false // interrupted: stays Inconsistent
			}
			continue
		}
		if p.role != RolePrimary || s.role != RoleSecondary {
			continue
		}
		switch {
		case s.hash == p.hash && s.disk != DiskUpToDate && !s.resyncing:
			s.disk = DiskUpToDate
			c.dirty = true
		case s.hash != p.hash && !s.resyncing:
			s.resyncing, s.disk = true, DiskInconsistent
			s.resyncInc++
			inc := s.resyncInc
			c.logf("%s: resync from %s starts (%d writes behind)", s.name, p.name, p.chain-s.chain)
			c.after(c.resyncDur, func() {
				if s.resyncing && s.resyncInc == inc && c.connected() && p.role == RolePrimary && s.role == RoleSecondary {
					s.chain, s.hash, s.disk, s.resyncing = p.chain, p.hash, DiskUpToDate, false
					c.logf("%s: resync done", s.name)
					c.dirty = true
				}
			})
			c.dirty = true
		}
	}
	for _, n := range c.n {
		if !n.up {
			continue
		}
		p := c.peerOf(n)
		ls := LocalState{Role: n.role, Disk: n.disk, Connected: conn, Fenced: n.fenced, Async: c.async}
		if conn {
			ls.PeerDisk = p.disk
		}
		if n.role == RolePrimary && p.hash != n.hash {
			ls.LagBytes = int64(max(1, n.chain-p.chain)) * 4096
		}
		if !n.sentOK || ls != n.sent {
			n.sent, n.sentOK = ls, true
			c.step(n, ls)
		}
	}
}

func (c *cluster) checkWritable() {
	count := 0
	for _, n := range c.n {
		w := n.up && n.role == RolePrimary && !n.fenced
		if w != n.writable {
			if w {
				n.since = c.now
			} else {
				n.spans = append(n.spans, span{n.since, c.now})
			}
			n.writable = w
		}
		if w {
			count++
		}
	}
	if count > 1 {
		c.fail("two writable Primaries")
	}
}

func (c *cluster) fail(format string, a ...any) {
	c.t.Helper()
	tail := c.trace
	if len(tail) > 60 {
		tail = tail[len(tail)-60:]
	}
	c.t.Fatalf("at %v: %s\n%s", c.now.Sub(t0), fmt.Sprintf(format, a...), strings.Join(tail, "\n"))
}

// run advances simulated time by d.
func (c *cluster) run(d time.Duration) {
	until := c.now.Add(d)
	for c.q.Len() > 0 && !c.q[0].at.After(until) {
		it := heap.Pop(&c.q).(*qitem)
		c.now = it.at
		it.fn()
		c.settle()
		c.checkWritable()
	}
	c.now = until
}

// monitor checks n's running resource chain (a floating IP and an app),
// as the runner does every monitor interval.
func (c *cluster) monitor(n *simNode) {
	if !n.up || !n.resources {
		return
	}
	ck := ResourceCheck{Resources: []ResourceHealth{{Name: "ip"}, {Name: "app"}}}
	if n.appFault {
		ck.Resources[1].Error = "monitor app: exit status 1"
	}
	c.step(n, ck)
}

func (c *cluster) crash(n *simNode) {
	c.logf("%s: CRASH", n.name)
	n.up, n.m, n.resources, n.resyncing, n.sentOK = false, nil, false, false, false
	n.inc++
	c.dirty = true
	c.settle()
	c.checkWritable()
}

func (c *cluster) restart(n *simNode) {
	if n.up {
		return
	}
	c.logf("%s: RESTART as %s/%s epoch %d", n.name, n.role, n.disk, n.hs.Epoch)
	n.up = true
	n.inc++
	// The runner starts a Primary volume fenced.
	n.fenced = n.role == RolePrimary
	c.newMachine(n)
	c.dirty = true
	c.settle()
}

func (c *cluster) cut(links ...string) {
	for _, l := range links {
		c.up[l] = false
	}
	c.logf("cut %v", links)
	c.dirty = true
	c.settle()
}

func (c *cluster) heal() {
	for l := range c.up {
		c.up[l] = true
	}
	clear(c.oneway)
	c.wUp = true
	c.logf("heal")
	c.dirty = true
	c.settle()
}

func (c *cluster) writers() []*simNode {
	var w []*simNode
	for _, n := range c.n {
		if n.writable {
			w = append(w, n)
		}
	}
	return w
}

// first returns the time of the first action of type T at or after from.
func first[T Action](n *simNode, from time.Time) (time.Time, bool) {
	for _, ta := range n.acts {
		if _, ok := ta.a.(T); ok && !ta.at.Before(from) {
			return ta.at, true
		}
	}
	return time.Time{}, false
}

func count[T Action](n *simNode, from time.Time) int {
	k := 0
	for _, ta := range n.acts {
		if _, ok := ta.a.(T); ok && !ta.at.Before(from) {
			k++
		}
	}
	return k
}

// recorded reports whether a decision whose cause contains s was recorded
// since from.
func recorded(n *simNode, from time.Time, s string) bool {
	for _, ta := range n.acts {
		if r, ok := ta.a.(Record); ok && !ta.at.Before(from) && strings.Contains(r.Decision.Cause, s) {
			return true
		}
	}
	return false
}

// overlap checks the writable timelines: no instant with two.
func (c *cluster) overlap() {
	c.checkWritable()
	spans := [2][]span{}
	for i, n := range c.n {
		spans[i] = append(spans[i], n.spans...)
		if n.writable {
			spans[i] = append(spans[i], span{n.since, c.now.Add(time.Nanosecond)})
		}
	}
	for _, x := range spans[0] {
		for _, y := range spans[1] {
			if x.from.Before(y.to) && y.from.Before(x.to) {
				c.fail("writable spans overlap: a %v-%v, b %v-%v", x.from.Sub(t0), x.to.Sub(t0), y.from.Sub(t0), y.to.Sub(t0))
			}
		}
	}
}
