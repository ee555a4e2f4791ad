package failover

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// HardState is what the runner persists across restarts (raft's name for
// the same idea): the epoch from the last SaveEpoch.
type HardState struct {
	// Epoch counts promotions (a fencing token, issued by the witness when
	// there is one). A Primary that sees a Primary peer with a higher epoch
	// steps down. It is not mirror's generation identifier: those are
	// random and only say "same or different", not "newer".
	Epoch uint64
}

// Intent is a promotion announced in Confirm mode (or without a witness).
type Intent struct {
	Want      string
	Since     time.Time
	Deadline  time.Time // zero: no default action
	Reason    string
	Confirmed bool
}

type pathState struct {
	name string
	// armed is the loss detector's reference: the last heartbeat, or the
	// moment a clock jump re-armed the path.
	armed time.Time
	// recv is the last heartbeat actually received: evidence that the peer
	// was alive, which a clock jump must not refresh.
	recv time.Time
}

type op uint8

const (
	opPromote op = iota + 1
	opDemote
	opFence
	opUnfence
	opStart
	opStop
	opRelease
	opPeerPromote
	opRecover
)

type promoteKind uint8

const (
	pkFailover promoteKind = iota
	pkSwitchover
	pkForced
)

type swPhase uint8

// Switchover phases, in order.
const (
	swStop swPhase = iota
	swDrain
	swDemote
	swRelease
)

func (p swPhase) String() string {
	return [...]string{"stop-resources", "drain", "demote", "release-vote"}[p]
}

type switchover struct {
	phase    swPhase
	deadline time.Time
	id       ActionID
	why      string
	stopped  bool // resources were stopped: an abort restarts them
	// resource: a handover for a failed resource (see Config.HandoverHold).
	resource bool
}

// Machine is the failover agent's decision core. It is not safe for
// concurrent use: the runner steps it from one goroutine.
type Machine struct {
	cfg   Config
	start time.Time
	now   time.Time
	epoch uint64
	maint bool
	// confirm: announce and wait before promoting (ModeConfirm, and
	// ModeMaintenance once maintenance is switched off).
	confirm bool

	local     LocalState
	haveLocal bool
	role      Role
	fenced    bool
	fenceHow  FenceHow
	fencedAt  time.Time
	// confirmed: as Primary, this node has had quorum evidence since it
	// started (corosync's wait_for_all: a node that starts alone cannot
	// know whether its peer was promoted meanwhile).
	confirmed bool
	// forced: ForcePromote made this node serve regardless of quorum;
	// quorum fencing is off until the node holds the vote again.
	forced bool

	paths    []pathState
	peer     Beacon
	peerAt   time.Time
	peerSeen bool
	lost     bool
	lostAt   time.Time

	vote     WitnessVote
	voteAt   time.Time
	haveVote bool
	// lapsedAt is when the first grant with an epoch above ours arrived
	// (zero if the last grant continued our term).
	lapsedAt time.Time
	reqAt    time.Time
	claim    bool
	claimAt  time.Time

	intent      *Intent
	denied      bool
	promoting   ActionID
	promoteKind promoteKind
	// preEpoch is the epoch before a promotion in flight: a failed
	// promotion gives it back, since nothing was written under the new one
	// (a Secondary with an epoch above its Primary's would never vouch
	// for it again).
	preEpoch    uint64
	retryAt     time.Time
	demoting    ActionID
	demoteRetry time.Time

	sw *switchover
	// rf is the current failure of a resource check or start (nil: none).
	rf *resourceFailure
	// gaveUpAt is when this node last handed the service over because of
	// a resource failure (zero: never); see Config.HandoverHold.
	gaveUpAt       time.Time
	failedOverFrom string
	syncedSince    time.Time
	fbKey          string
	fbCount        int

	pending map[ActionID]op
	nextID  ActionID
	topics  map[string]string
	last    Decision
	out     []Action
}

// New returns a machine for cfg, whose zero tunables take the LAN defaults,
// restarted with hs at now. The peer is presumed unseen: it is lost after a
// detection timeout without heartbeats, and a node that has not heard it
// since starting never promotes on its own.
func New(cfg Config, hs HardState, now time.Time) (*Machine, error) {
	cfg.fill()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Paths = slices.Clone(cfg.Paths)
	m := &Machine{
		cfg: cfg, start: now, now: now, epoch: hs.Epoch,
		maint:   cfg.Mode == ModeMaintenance,
		confirm: cfg.Mode != ModeAuto,
		pending: map[ActionID]op{}, topics: map[string]string{},
	}
	for _, p := range cfg.Paths {
		m.paths = append(m.paths, pathState{name: p, armed: now})
	}
	return m, nil
}

// Step advances the machine by one event and returns what the runner must
// do, in order.
func (m *Machine) Step(e Event) []Action {
	switch e := e.(type) {
	case Tick:
		m.advance(e.Now)
	case Heartbeat:
		m.advance(e.Now)
		m.onHeartbeat(e)
	case WitnessVote:
		m.advance(e.Now)
		m.onVote(e)
	case LocalState:
		m.onLocal(e)
	case Switchover:
		m.startSwitchover("operator request")
	case ForcePromote:
		m.onForce(e.AcceptDataLoss)
	case Confirm:
		m.onConfirm()
	case Deny:
		m.onDeny()
	case SetMaintenance:
		m.onMaintenance(e.On)
	case Handover:
		m.onHandover(e)
	case ActionResult:
		m.onResult(e)
	case ResourceCheck:
		m.onResourceCheck(e)
	case ResourceStartFailed:
		m.record(KindPromote, false, fmt.Sprintf("resources failed to start after the operator's promotion: %v", e.Err))
		m.startFailed(e.Err)
	}
	m.evaluate()
	out := m.out
	m.out = nil
	return out
}

// Beacon is what the runner sends the peer in every heartbeat.
func (m *Machine) Beacon() Beacon {
	b := Beacon{Node: m.cfg.Node, Role: m.role, Disk: m.local.Disk, Epoch: m.epoch,
		Hears: m.peerSeen && m.now.Sub(m.lastRecv()) < m.cfg.FenceAfter()-m.cfg.HeartbeatInterval}
	if m.role == RolePrimary {
		b.InSync = m.local.Connected && m.local.PeerDisk == DiskUpToDate
		b.LagBytes, b.LagTime = m.local.LagBytes, m.local.LagTime
	}
	return b
}

// ---- time ----

// advance moves the machine's clock to t. A gap larger than JumpThreshold
// (forward or back) is not trusted as elapsed silence: an agent that was
// stopped for ten seconds has not heard anything, but neither has it
// listened, so declaring the peer lost on the strength of it would be a
// false failover. The loss detector is re-armed instead, and needs a full
// detection timeout of silence measured from here.
func (m *Machine) advance(t time.Time) {
	d := t.Sub(m.now)
	switch {
	case d >= 0 && d <= m.cfg.JumpThreshold:
		m.now = t
	case d < 0 && -d <= m.cfg.TickInterval:
		// The runner's sources raced by less than a tick: keep our time.
	default:
		m.jump(t, d)
	}
}

func (m *Machine) jump(t time.Time, d time.Duration) {
	D := m.cfg.DetectTimeout()
	for i := range m.paths {
		p := &m.paths[i]
		if m.now.Sub(p.armed) >= D {
			// Already lost before the jump: stays lost.
			if d < 0 {
				p.armed = t.Add(-D)
				p.recv = earlier(p.recv, t)
			}
			continue
		}
		p.armed = t
		if d < 0 {
			p.recv = earlier(p.recv, t)
		}
	}
	if d < 0 {
		// Going back, whatever was stamped "in the future" happened an
		// instant ago in real time: clamp it. Evidence is never stretched
		// (a backward jump never shortens a timeout) and deadlines keep
		// their remaining time.
		for _, x := range []*time.Time{&m.start, &m.peerAt, &m.voteAt, &m.lapsedAt, &m.reqAt, &m.fencedAt, &m.lostAt, &m.syncedSince, &m.claimAt, &m.gaveUpAt} {
			*x = earlier(*x, t)
		}
	}
	// Going forward, received evidence keeps its age (a Primary must
	// re-prove its quorum after a stall: its lease may have run out) while
	// deadlines move with the clock.
	shift := func(x *time.Time) {
		if !x.IsZero() {
			*x = x.Add(d)
		}
	}
	if m.intent != nil {
		shift(&m.intent.Deadline)
	}
	if m.sw != nil {
		shift(&m.sw.deadline)
	}
	shift(&m.retryAt)
	shift(&m.demoteRetry)
	if m.rf != nil {
		shift(&m.rf.retryAt)
	}
	dir, abs := "forward", d
	if d < 0 {
		dir, abs = "backward", -d
	}
	m.now = t
	m.record(KindClock, false, fmt.Sprintf("clock jumped %s by %v with no event in between (agent stalled, VM paused or clock stepped): peer loss timers re-armed, %v of fresh silence needed", dir, abs, D))
}

func earlier(x, t time.Time) time.Time {
	if x.After(t) {
		return t
	}
	return x
}

func later(x, t time.Time) time.Time {
	if t.After(x) {
		return t
	}
	return x
}

// ---- inputs ----

func (m *Machine) onHeartbeat(h Heartbeat) {
	if h.Node != m.cfg.Peer {
		m.note("ignored:"+h.Node, "node", KindIgnored, false, fmt.Sprintf("heartbeat from unknown node %q on path %q ignored", h.Node, h.Path))
		return
	}
	var p *pathState
	for i := range m.paths {
		if m.paths[i].name == h.Path {
			p = &m.paths[i]
		}
	}
	if p == nil {
		m.note("ignored:"+h.Path, "path", KindIgnored, false, fmt.Sprintf("heartbeat on unconfigured path %q ignored", h.Path))
		return
	}
	p.armed = later(p.armed, m.now)
	p.recv = later(p.recv, m.now)
	m.peer = h.Beacon
	m.peerAt = m.now
	m.peerSeen = true
}

func (m *Machine) onVote(v WitnessVote) {
	if v.Granted {
		v.Holder = m.cfg.Node
	}
	m.vote, m.voteAt, m.haveVote = v, m.now, true
	switch {
	case v.Granted && v.Epoch > m.epoch && m.lapsedAt.IsZero():
		m.lapsedAt = m.now
	case v.Granted && v.Epoch <= m.epoch:
		m.lapsedAt = time.Time{}
	}
	if v.Granted {
		m.note("witness", "granted", KindWitness, false, fmt.Sprintf("the witness grants this node the vote (epoch %d)", v.Epoch))
	} else {
		m.note("witness", "denied:"+v.Holder, KindWitness, false, fmt.Sprintf("the witness says %s holds the vote (epoch %d)", v.Holder, v.Epoch))
	}
}

func (m *Machine) onLocal(s LocalState) {
	first := !m.haveLocal
	m.local, m.haveLocal = s, true
	if !m.isPending(opPromote) && !m.isPending(opDemote) {
		m.role = s.Role
	}
	if m.role != RolePrimary {
		m.rf = nil // demoted by hand: a Secondary runs no resources
	}
	if !m.isPending(opFence) && !m.isPending(opUnfence) && m.sw == nil {
		if s.Fenced && (!m.fenced || first) {
			m.fencedAt = m.now
			m.fenceHow = FenceSuspend
		}
		m.fenced = s.Fenced
	}
}

func (m *Machine) onResult(r ActionResult) {
	o, ok := m.pending[r.ID]
	if !ok {
		return
	}
	delete(m.pending, r.ID)
	if m.sw != nil && r.ID == m.sw.id {
		m.switchoverResult(o, r.Err)
		return
	}
	switch o {
	case opPromote:
		m.promoting = 0
		if r.Err != nil {
			m.retryAt = m.now.Add(m.cfg.DetectTimeout())
			if m.role != RolePrimary {
				m.epoch = m.preEpoch
				m.emit(SaveEpoch{Epoch: m.epoch})
			}
			m.record(KindNoPromote, false, fmt.Sprintf("promotion failed: %v; back to epoch %d; retrying after %v", r.Err, m.epoch, m.cfg.DetectTimeout()))
			return
		}
		m.role, m.fenced, m.confirmed = RolePrimary, false, true
		m.forced = m.promoteKind == pkForced
		if m.promoteKind != pkSwitchover {
			m.failedOverFrom = m.cfg.Peer
		}
		m.syncedSince, m.rf = time.Time{}, nil
		m.reqAt = time.Time{} // register the new epoch with the witness now
		id := m.id(opStart)
		m.emit(StartResources{ID: id, Reason: "promoted"})
		m.record(KindPromote, true, fmt.Sprintf("promoted to Primary at epoch %d; starting resources", m.epoch))
	case opDemote:
		m.demoting = 0
		if r.Err != nil {
			m.demoteRetry = m.now.Add(m.cfg.HeartbeatInterval)
			m.record(KindDemote, false, fmt.Sprintf("demotion failed: %v (writes stay fenced); retrying", r.Err))
			return
		}
		m.stepDown()
		m.record(KindDemote, true, "demoted to Secondary; the volume resyncs from the peer")
	case opFence:
		if r.Err != nil {
			m.fenced = false
			m.record(KindFence, false, fmt.Sprintf("FENCE FAILED: %v: the volume may still acknowledge writes; retrying (the runner's watchdog must fence it)", r.Err))
		}
	case opUnfence:
		if r.Err != nil {
			m.fenced = true
			m.record(KindFence, false, fmt.Sprintf("unfence failed: %v; still fenced", r.Err))
		}
	case opStart:
		m.started(r)
	case opStop:
		if r.Err != nil {
			m.record(KindDemote, false, fmt.Sprintf("resources failed to stop: %v", r.Err))
		}
	case opRecover:
		m.recovered(r)
	case opPeerPromote:
		if r.Err != nil {
			m.record(KindSwitchover, false, fmt.Sprintf("could not ask %s to promote: %v: no node is Primary; promote %s by hand", m.cfg.Peer, r.Err, m.cfg.Peer))
		}
	}
}

// stepDown resets what only a Primary has.
func (m *Machine) stepDown() {
	m.role, m.fenced, m.forced, m.confirmed = RoleSecondary, false, false, false
	m.failedOverFrom, m.syncedSince, m.claim = "", time.Time{}, false
	m.rf = nil
}

// ---- evaluation ----

func (m *Machine) evaluate() {
	m.detect()
	if !m.haveLocal {
		return
	}
	m.twoPrimaries()
	switch m.role {
	case RolePrimary:
		m.primary()
	case RoleSecondary:
		m.secondary()
	}
}

// detect updates the peer's loss: lost only when every path is Lost.
func (m *Machine) detect() {
	lost := true
	for i := range m.paths {
		if st, _ := m.pathState(&m.paths[i]); st != Lost {
			lost = false
		}
	}
	switch {
	case lost && !m.lost:
		m.lost, m.lostAt, m.denied = true, m.now, false
		cause := fmt.Sprintf("peer %s lost: no heartbeat on any path for %v (%d x %v): %s", m.cfg.Peer, m.cfg.DetectTimeout(), m.cfg.MissCount, m.cfg.HeartbeatInterval, m.silences())
		if !m.peerSeen {
			cause += "; not heard since this node started"
		}
		m.record(KindPeer, false, cause)
		delete(m.topics, "promote")
		if m.role == RolePrimary && m.local.Connected && !m.local.Async {
			why := fmt.Sprintf("replication session to %s still up but silent: dropped now, not after its own timeout, so that writes wait only until the witness records %s outdated", m.cfg.Peer, m.cfg.Peer)
			m.emit(DropReplication{Reason: "failover: " + why})
			m.record(KindPeer, true, why)
		}
	case !lost && m.lost:
		m.lost = false
		m.record(KindPeer, false, fmt.Sprintf("peer %s back after %v: %s", m.cfg.Peer, m.now.Sub(m.lostAt), m.silences()))
		if m.intent != nil {
			m.withdraw("peer " + m.cfg.Peer + " is back")
		}
		delete(m.topics, "promote")
		delete(m.topics, "serving")
	}
}

// ---- helpers ----

func (m *Machine) id(o op) ActionID {
	m.nextID++
	m.pending[m.nextID] = o
	return m.nextID
}

// forget drops pending results of superseded actions: only the latest
// fence or unfence matters.
func (m *Machine) forget(ops ...op) {
	for id, p := range m.pending {
		for _, o := range ops {
			if p == o {
				delete(m.pending, id)
			}
		}
	}
}

func (m *Machine) isPending(o op) bool {
	for _, p := range m.pending {
		if p == o {
			return true
		}
	}
	return false
}

func (m *Machine) emit(a Action) { m.out = append(m.out, a) }

// auto reports whether the machine may act on its own; in maintenance it
// records what it would have done instead.
func (m *Machine) auto(topic, key string, kind Kind, would string) bool {
	if !m.maint {
		return true
	}
	m.note(topic, "maint:"+key, kind, false, "maintenance: would "+would)
	return false
}

func (m *Machine) record(kind Kind, acted bool, cause string) {
	d := Decision{At: m.now, Kind: kind, Acted: acted, Cause: cause, Facts: m.facts()}
	m.last = d
	m.emit(Record{Decision: d})
}

// note records a decision unless the topic's last one had the same key, so
// that a standing condition ("did not promote: no quorum") is recorded when
// it starts, not on every tick. An empty cause only sets the key.
func (m *Machine) note(topic, key string, kind Kind, acted bool, cause string) {
	if m.topics[topic] == key {
		return
	}
	m.topics[topic] = key
	if cause != "" {
		m.record(kind, acted, cause)
	}
}

func (m *Machine) recordTopic(topic, key string, kind Kind, acted bool, cause string) {
	m.topics[topic] = key
	m.record(kind, acted, cause)
}

func (m *Machine) pathState(p *pathState) (PathState, time.Duration) {
	silent := m.now.Sub(p.armed)
	switch {
	case silent >= m.cfg.DetectTimeout():
		return Lost, silent
	case silent > m.cfg.HeartbeatInterval*3/2:
		// One heartbeat is overdue by half an interval: missed.
		return Suspect, silent
	}
	return Alive, silent
}

func (m *Machine) lastRecv() time.Time {
	var t time.Time
	for _, p := range m.paths {
		t = later(t, p.recv)
	}
	return t
}

func (m *Machine) silences() string {
	var b strings.Builder
	for i := range m.paths {
		p := &m.paths[i]
		if i > 0 {
			b.WriteString(", ")
		}
		st, s := m.pathState(p)
		fmt.Fprintf(&b, "%s %s %v", p.name, st, s)
	}
	return b.String()
}

func (m *Machine) witnessDesc() string {
	if !m.haveVote {
		return fmt.Sprintf("the witness has not answered since this node started %v ago", m.now.Sub(m.start))
	}
	if m.vote.Granted {
		return fmt.Sprintf("the witness's last grant is %v old", m.now.Sub(m.voteAt))
	}
	return fmt.Sprintf("the witness last answered %v ago (holder %s)", m.now.Sub(m.voteAt), m.vote.Holder)
}

// lag is the target's last known lag: the Primary's report or its own,
// whichever is worse.
func (m *Machine) lag() (int64, time.Duration) {
	return max(m.peer.LagBytes, m.local.LagBytes), max(m.peer.LagTime, m.local.LagTime)
}

func (m *Machine) lagDesc() string {
	if !m.local.Async {
		return ""
	}
	b, t := m.lag()
	return fmt.Sprintf("; async lag %d bytes / %v within %d bytes / %v", b, t, m.cfg.MaxAsyncLagBytes, m.cfg.MaxAsyncLagTime)
}

func (m *Machine) facts() Facts {
	f := Facts{Role: m.role, Disk: m.local.Disk, Epoch: m.epoch, Fenced: m.fenced,
		PeerRole: m.peer.Role, PeerDisk: m.peer.Disk, PeerEpoch: m.peer.Epoch}
	for i := range m.paths {
		st, s := m.pathState(&m.paths[i])
		f.Paths = append(f.Paths, PathStatus{Name: m.paths[i].name, State: st, LastSeen: m.paths[i].recv, Silent: s})
	}
	if m.haveVote {
		f.QuorumHolder, f.VoteAge = m.vote.Holder, m.now.Sub(m.voteAt)
	}
	if m.role != RolePrimary {
		f.LagBytes, f.LagTime = m.lag()
	}
	return f
}
