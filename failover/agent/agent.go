// Package agent runs the failover state machine (package failover) in a
// real process: it owns the clock, the heartbeat paths, the calls to the
// witness, the volume and the resource chain, and carries out the
// machine's actions (see "What the runner must do" in package failover).
//
// One goroutine steps the machine; everything that may block (the
// witness, promotion and demotion, resources, sending on a path) runs
// beside it and reports back as an event, so that a slow disk or a dead
// witness never delays a tick, a heartbeat or a fence.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mirrord/mirrord/internal/atomicfile"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/mirror"
)

// Clock is the agent's one monotonic clock. Tests inject a fake.
type Clock interface {
	Now() time.Time
	// NewTicker ticks every d.
	NewTicker(d time.Duration) Ticker
}

// Ticker is a time.Ticker.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// RealClock is time.Now, whose readings carry the monotonic clock.
type RealClock struct{}

// Now returns time.Now().
func (RealClock) Now() time.Time { return time.Now() }

// NewTicker returns a time.Ticker.
func (RealClock) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTicker struct{ t *time.Ticker }

func (r realTicker) C() <-chan time.Time { return r.t.C }
func (r realTicker) Stop()               { r.t.Stop() }

// Volume is what the agent needs of a mirror.Volume. All methods may be
// called from any goroutine. Promote and Demote may block (they wait for
// writes in flight); Fence, Unfence and the watchdog do not.
type Volume interface {
	Role() mirror.Role
	Disk() mirror.DiskState
	Status() mirror.Status
	Promote(mirror.PromoteOptions) error
	Demote() error
	Fence(mode mirror.FenceMode, reason string)
	Unfence(reason string)
	FenceState() (mirror.FenceMode, string)
	ArmWatchdog(d time.Duration, mode mirror.FenceMode)
	DisarmWatchdog()
	Subscribe() (<-chan mirror.Event, func())
	// DropSession ends the replication session (the link reconnects).
	DropSession(reason string)
}

var _ Volume = (*mirror.Volume)(nil)

// Resources is the resource chain above the volume (floating IP, mount,
// scripts): started in order after a promotion, stopped in reverse before
// a demotion. An error means the chain is not (fully) up, resp. down; a
// failed Start has already rolled back what it started.
type Resources interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// Monitorer is a Resources that can check itself (LifeKeeper's quick
// "looks alive" check), one Health per resource in start order; the agent
// finds it by type assertion and runs it every Config.MonitorInterval
// while the chain is up, concurrently with Start, Stop and Restart. The
// result is shown in Status and stepped into the machine, which decides
// on local recovery or a handover.
type Monitorer interface {
	Monitor(ctx context.Context) []Health
}

// Recoverer is a Resources that can restart part of itself for local
// recovery: Restart stops the resource named from and every resource
// after it, in reverse, then starts them again in order, leaving those
// before it running. An error means they are not all up again.
type Recoverer interface {
	Restart(ctx context.Context, from string) error
}

// ErrNoRecovery: the resource chain cannot restart part of itself.
var ErrNoRecovery = errors.New("the resource chain cannot restart a resource in place")

// Health is one resource's last check.
type Health = failover.ResourceHealth

// Path is one heartbeat path to the peer. Send must not block for long
// (a path drops what it cannot send); received messages are handed to
// Agent.Receive by the path itself.
type Path interface {
	Name() string
	Send(msg []byte) error
	Close() error
}

// Config configures an Agent.
type Config struct {
	// Machine configures the state machine. Machine.Paths must name the
	// Paths given to New.
	Machine failover.Config
	// Volume is the volume's name (carried in every message).
	Volume string
	// Secret is the pair's shared secret; messages are authenticated with
	// a key derived from it.
	Secret []byte
	// EpochFile holds the epoch (HardState) across restarts.
	EpochFile string
	// Voter is the witness (nil: no witness; Machine.Witness must agree).
	Voter failover.Voter
	// Resources is the resource chain (nil: none).
	Resources Resources
	// ResourceTimeout bounds a Start or Stop of the chain; default 30 s.
	ResourceTimeout time.Duration
	// MonitorInterval is how often a running chain is checked (when
	// Resources is a Monitorer); default 10 s, negative: never.
	MonitorInterval time.Duration
	// VoteTimeout bounds one call to the witness (with its
	// retransmissions); default half a heartbeat interval. A later answer
	// is dropped: the runner stamps a grant when it arrives, so a late one
	// would overstate the lease.
	VoteTimeout time.Duration
	// Clock defaults to RealClock.
	Clock Clock
	Log   zerolog.Logger
	// History is how many decisions Status keeps; default 32.
	History int
}

// Defaults.
const (
	DefaultResourceTimeout = 30 * time.Second
	DefaultMonitorInterval = 10 * time.Second
	DefaultHistory         = 32
	// handoverCopies: a PeerPromote is sent this many times on every path
	// (UDP may drop one); the receiver acts on the first.
	handoverCopies = 3
)

// ErrClosed is returned by commands after Close.
var ErrClosed = errors.New("failover agent stopped")

// Agent runs a failover.Machine.
type Agent struct {
	cfg   Config
	vol   Volume
	paths []Path
	key   []byte
	clock Clock
	log   zerolog.Logger
	m     *failover.Machine
	boot  uint64

	inbox   chan inMsg
	cmds    chan command
	votes   chan voteReply
	results chan failover.ActionResult
	work    chan job
	quit    chan struct{}
	wg      sync.WaitGroup

	// resUp: the resource chain started cleanly and has not been stopped
	// since (the monitor checks only then).
	resUp atomic.Bool
	// resGen counts starts, stops and restarts of the chain, before and
	// after each: a check that saw it change says nothing about the
	// chain as it is now.
	resGen atomic.Uint64
	checks chan failover.ResourceCheck
	// exiting: StopResourcesOnExit ran; no check reaches the machine and
	// no local recovery starts the chain again.
	exiting atomic.Bool

	// Loop-owned.
	seq      uint64
	lastBeat time.Time
	filters  map[string]*replayFilter
	// handed is 1 + the epoch of the last Handover stepped (0: none), so
	// that the copies of one handover are stepped once.
	handed    uint64
	voting    bool
	nextVote  *failover.RequestVote
	lastLocal failover.LocalState
	pending   []failover.ActionResult

	mu      sync.Mutex // guards what Status and subscribers read
	status  failover.Status
	history []failover.Decision
	subs    map[chan failover.Decision]struct{}
	health  []Health // the last resource check
}

type inMsg struct {
	path string
	msg  Message
}

type command struct {
	ev    failover.Event
	reply chan []failover.Decision
}

type voteReply struct {
	v   failover.WitnessVote
	err error
}

// New builds an agent over vol and paths. It reads the epoch file; Start
// runs it.
func New(cfg Config, vol Volume, paths []Path) (*Agent, error) {
	if cfg.Clock == nil {
		cfg.Clock = RealClock{}
	}
	if cfg.ResourceTimeout == 0 {
		cfg.ResourceTimeout = DefaultResourceTimeout
	}
	if cfg.MonitorInterval == 0 {
		cfg.MonitorInterval = DefaultMonitorInterval
	}
	if cfg.History == 0 {
		cfg.History = DefaultHistory
	}
	mc := cfg.Machine
	mc.Witness = cfg.Voter != nil
	cfg.Machine = mc
	if len(cfg.Secret) == 0 {
		return nil, fmt.Errorf("%w: Secret: empty", failover.ErrConfig)
	}
	names := map[string]bool{}
	for _, p := range paths {
		names[p.Name()] = true
	}
	for _, n := range mc.Paths {
		if !names[n] {
			return nil, fmt.Errorf("%w: Paths: %q configured but no such path given", failover.ErrConfig, n)
		}
	}
	hs, err := LoadEpoch(cfg.EpochFile)
	if err != nil {
		return nil, err
	}
	now := cfg.Clock.Now()
	m, err := failover.New(mc, hs, now)
	if err != nil {
		return nil, err
	}
	// Fill the machine's defaults into our copy for the timers.
	cfg.Machine = fillDefaults(mc)
	if cfg.VoteTimeout == 0 {
		cfg.VoteTimeout = cfg.Machine.HeartbeatInterval / 2
	}
	a := &Agent{
		cfg: cfg, vol: vol, paths: paths, key: Key(cfg.Secret), clock: cfg.Clock,
		log: cfg.Log.With().Str("component", "failover").Logger(), m: m, boot: randomBoot(),
		inbox: make(chan inMsg, 64), cmds: make(chan command), votes: make(chan voteReply, 1),
		results: make(chan failover.ActionResult, 16), work: make(chan job, 64),
		checks:  make(chan failover.ResourceCheck, 1),
		quit:    make(chan struct{}),
		filters: map[string]*replayFilter{}, subs: map[chan failover.Decision]struct{}{},
	}
	for _, p := range paths {
		a.filters[p.Name()] = &replayFilter{window: 2 * cfg.Machine.HeartbeatInterval}
	}
	a.status = m.Status()
	return a, nil
}

// fillDefaults returns c with the machine's defaults (DefaultLAN's rules).
func fillDefaults(c failover.Config) failover.Config {
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = failover.DefaultLANHeartbeatInterval
	}
	if c.MissCount == 0 {
		c.MissCount = failover.DefaultLANMissCount
	}
	if c.TickInterval == 0 {
		c.TickInterval = c.HeartbeatInterval / 10
	}
	return c
}

// Start runs the agent until Close.
func (a *Agent) Start() {
	a.wg.Add(2)
	go a.worker()
	go a.loop()
	if _, ok := a.cfg.Resources.(Monitorer); ok && a.cfg.MonitorInterval > 0 {
		a.wg.Add(1)
		go a.monitorLoop()
	}
}

func (a *Agent) monitorLoop() {
	defer a.wg.Done()
	t := a.clock.NewTicker(a.cfg.MonitorInterval)
	defer t.Stop()
	for {
		select {
		case <-a.quit:
			return
		case <-t.C():
			a.checkResources()
		}
	}
}

// checkResources runs the chain's Monitor while it is up, keeps the result
// for Status, logs every change of a resource's health and hands the
// check to the loop for the machine.
func (a *Agent) checkResources() {
	m, ok := a.cfg.Resources.(Monitorer)
	gen := a.resGen.Load()
	if gen%2 == 1 {
		return // a start, stop or restart is running (one at a time)
	}
	up := ok && a.resUp.Load()
	var h []Health
	if up {
		ctx, cancel := context.WithTimeout(context.Background(), a.cfg.ResourceTimeout)
		h = m.Monitor(ctx)
		cancel()
	}
	if a.resGen.Load() != gen {
		return // the chain was started, stopped or restarted meanwhile
	}
	if up {
		// The loop takes the newest check; one it has not taken yet is
		// replaced.
		select {
		case <-a.checks:
		default:
		}
		a.checks <- failover.ResourceCheck{Resources: h}
	}
	a.mu.Lock()
	was := make(map[string]string, len(a.health))
	for _, x := range a.health {
		was[x.Name] = x.Error
	}
	a.health = h
	a.mu.Unlock()
	for _, x := range h {
		switch prev, seen := was[x.Name]; {
		case x.Error != "" && (!seen || prev != x.Error):
			a.log.Warn().Str("resource", x.Name).Str("error", x.Error).Msg("resource check failed")
		case x.Error == "" && seen && prev != "":
			a.log.Info().Str("resource", x.Name).Msg("resource check passes again")
		}
	}
}

// Close stops the agent (it does not touch the volume's role or fence:
// a Primary stays as it is, its watchdog disarmed by the caller closing
// the volume) and closes the paths and the voter.
func (a *Agent) Close() error {
	select {
	case <-a.quit:
		return nil
	default:
	}
	close(a.quit)
	a.wg.Wait()
	var errs []error
	for _, p := range a.paths {
		errs = append(errs, p.Close())
	}
	if a.cfg.Voter != nil {
		errs = append(errs, a.cfg.Voter.Close())
	}
	return errors.Join(errs...)
}

// Receive hands the agent a message that arrived on path. It may be
// called from any goroutine and never blocks: when the agent is behind,
// the message is dropped (the next heartbeat carries the same news).
func (a *Agent) Receive(path string, b []byte) {
	m, err := Decode(b, a.key)
	if err != nil {
		a.log.Debug().Err(err).Str("path", path).Msg("dropped a message")
		return
	}
	select {
	case a.inbox <- inMsg{path: path, msg: m}:
	default:
	}
}

// Do steps an operator command (Switchover, ForcePromote, Confirm, Deny,
// SetMaintenance) and returns the decisions it produced.
func (a *Agent) Do(ctx context.Context, ev failover.Event) ([]failover.Decision, error) {
	c := command{ev: ev, reply: make(chan []failover.Decision, 1)}
	select {
	case a.cmds <- c:
	case <-a.quit:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case d := <-c.reply:
		return d, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Resources starts (or stops) the resource chain for an operator's
// promotion (demotion) made outside the machine, e.g. the first `mirrord
// promote` of a new pair; it runs in order with the agent's other
// actions. A failed start is also handed to the machine, which deals with
// it as with a failed start after a failover: local recovery, then a
// handover or a retry every monitor interval.
func (a *Agent) Resources(ctx context.Context, start bool) error {
	if !start {
		return a.runJob(ctx, failover.StopResources{Reason: "operator demotion"})
	}
	err := a.runJob(ctx, failover.StartResources{Reason: "operator promotion"})
	if err != nil && a.cfg.Resources != nil && !errors.Is(err, ErrClosed) && ctx.Err() == nil {
		if _, derr := a.Do(ctx, failover.ResourceStartFailed{Err: err}); derr != nil {
			a.log.Warn().Err(derr).Msg("could not hand the failed start to the failover machine")
		}
	}
	return err
}

// StopResourcesOnExit stops the resource chain, in reverse, if this node
// is Primary: mirrord is stopping, and a mount must be unmounted and a
// floating IP removed while the volume (and its device) still serve. It
// runs in order with the agent's other actions; the chain is not watched
// afterwards. A Secondary runs no resources and is left alone.
func (a *Agent) StopResourcesOnExit(ctx context.Context) error {
	if a.cfg.Resources == nil || a.vol.Role() != mirror.RolePrimary {
		return nil
	}
	a.exiting.Store(true)
	a.log.Info().Msg("stopping the resources before exit")
	return a.runJob(ctx, failover.StopResources{Reason: "mirrord stopping"})
}

// runJob carries out act on the worker and waits for it.
func (a *Agent) runJob(ctx context.Context, act failover.Action) error {
	done := make(chan error, 1)
	select {
	case a.work <- job{act: act, done: done}:
	case <-a.quit:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// job is one action for the worker; done, if set, gets the outcome.
type job struct {
	act  failover.Action
	done chan error
	// peerLost: a Promote taking over a peer lost on every path, whose
	// replication session may not have timed out yet.
	peerLost bool
}

// Report is the agent's state for status displays.
type Report struct {
	failover.Status
	Witness bool                `json:"witness"`
	History []failover.Decision `json:"history"`
	// Resources is the last check of the running chain (empty while it
	// is down or cannot check itself).
	Resources []Health `json:"resources,omitempty"`
}

// Status returns the machine's last status and recent decisions, newest
// last.
func (a *Agent) Status() Report {
	a.mu.Lock()
	defer a.mu.Unlock()
	return Report{Status: a.status, Witness: a.cfg.Voter != nil, History: append([]failover.Decision(nil), a.history...),
		Resources: append([]Health(nil), a.health...)}
}

// Subscribe streams decisions as they are recorded. A slow subscriber
// loses decisions rather than stalling the agent.
func (a *Agent) Subscribe() (<-chan failover.Decision, func()) {
	c := make(chan failover.Decision, 64)
	a.mu.Lock()
	a.subs[c] = struct{}{}
	a.mu.Unlock()
	return c, func() {
		a.mu.Lock()
		if _, ok := a.subs[c]; ok {
			delete(a.subs, c)
			close(c)
		}
		a.mu.Unlock()
	}
}

func (a *Agent) loop() {
	defer a.wg.Done()
	events, cancel := a.vol.Subscribe()
	defer cancel()
	tick := a.clock.NewTicker(a.cfg.Machine.TickInterval)
	defer tick.Stop()
	a.handle(a.localState())
	a.beacons(true)
	for {
		select {
		case <-a.quit:
			return
		case <-tick.C():
			a.handle(failover.Tick{Now: a.clock.Now()})
			a.refreshLocal()
			a.beacons(false)
		case in := <-a.inbox:
			a.received(in)
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			a.refreshLocal()
		case c := <-a.cmds:
			// The machine judges a command on the volume as it is now
			// (an operator's promotion has just made it Primary).
			a.refreshLocal()
			c.reply <- a.handle(c.ev)
		case r := <-a.votes:
			a.voted(r)
		case r := <-a.results:
			a.handle(r)
			a.refreshLocal()
		case c := <-a.checks:
			a.checked(c)
		}
	}
}

// checked steps a check of the resource chain, unless the chain went down
// since (a stop queued after the check may have run) or mirrord is
// stopping.
func (a *Agent) checked(c failover.ResourceCheck) {
	if a.resUp.Load() && !a.exiting.Load() {
		a.handle(c)
	}
}

// voted steps the witness's answer, stamped now, and sends the request
// that waited for it.
func (a *Agent) voted(r voteReply) {
	a.voting = false
	if r.err != nil {
		a.log.Debug().Err(r.err).Msg("witness did not answer")
	} else {
		r.v.Now = a.clock.Now()
		a.handle(r.v)
	}
	if a.nextVote != nil {
		rv := *a.nextVote
		a.nextVote = nil
		a.requestVote(rv)
	}
}

// received authenticates the path's order and steps the message.
func (a *Agent) received(in inMsg) {
	m := in.msg
	peer := a.cfg.Machine.Peer
	if m.Node != peer || m.Volume != a.cfg.Volume {
		a.log.Debug().Str("node", m.Node).Str("volume", m.Volume).Str("path", in.path).Msg("message for another pair dropped")
		return
	}
	f := a.filters[in.path]
	if f == nil {
		return
	}
	// Stamped now, not when it arrived: every event reaches the machine
	// in the order of one clock.
	now := a.clock.Now()
	if err := f.accept(m.Boot, m.Seq, now); err != nil {
		a.log.Debug().Err(err).Str("path", in.path).Msg("dropped a message")
		return
	}
	switch m.Kind {
	case KindBeacon:
		a.handle(failover.Heartbeat{Path: in.path, Now: now, Beacon: m.Beacon})
	case KindPeerPromote:
		if m.Epoch+1 <= a.handed {
			return // another copy of a handover already stepped
		}
		a.handed = m.Epoch + 1
		a.handle(failover.Handover{From: m.Node, Epoch: m.Epoch})
	}
}

// beacons sends the machine's beacon on every path when it is due.
func (a *Agent) beacons(force bool) {
	now := a.clock.Now()
	if !force && now.Sub(a.lastBeat) < a.cfg.Machine.HeartbeatInterval {
		return
	}
	a.lastBeat = now
	a.broadcast(Message{Kind: KindBeacon, Beacon: a.m.Beacon()})
}

// broadcast sends m on every path and reports whether any took it.
func (a *Agent) broadcast(m Message) bool {
	m.Volume, m.Boot, m.Node = a.cfg.Volume, a.boot, a.cfg.Machine.Node
	sent := false
	for _, p := range a.paths {
		a.seq++
		m.Seq = a.seq
		b, err := Encode(nil, m, a.key)
		if err != nil {
			a.log.Error().Err(err).Msg("encode agent message")
			return false
		}
		if err := p.Send(b); err != nil {
			a.log.Debug().Err(err).Str("path", p.Name()).Msg("send failed")
			continue
		}
		sent = true
	}
	return sent
}

func (a *Agent) handover(epoch uint64) bool {
	sent := false
	for range handoverCopies {
		if a.broadcast(Message{Kind: KindPeerPromote, Beacon: failover.Beacon{Epoch: epoch}}) {
			sent = true
		}
	}
	return sent
}

// refreshLocal steps LocalState when the volume changed.
func (a *Agent) refreshLocal() {
	if ls := a.localState(); ls != a.lastLocal {
		a.handle(ls)
	}
}

func (a *Agent) localState() failover.LocalState {
	st := a.vol.Status()
	ls := failover.LocalState{Role: a.vol.Role(), Disk: a.vol.Disk(), PeerDisk: failover.DiskDUnknown}
	if mode, _ := a.vol.FenceState(); mode != mirror.Unfenced && ls.Role == mirror.RolePrimary {
		ls.Fenced = true
	}
	if p := st.Peer; p != nil {
		ls.Async = p.Mode == mirror.ModeAsync.String()
		ls.Connected = p.Connection == string(mirror.ConnConnected)
		if ls.Connected {
			ls.PeerDisk = parseDisk(p.PeerDisk)
		}
		if ls.Role == mirror.RolePrimary {
			// What the target lacks and the age of the oldest such write
			// (mirror's Volume.Lag: the journal, the window, the bitmap).
			ls.LagBytes = p.LagBytes
			ls.LagTime = time.Duration(p.LagSeconds * float64(time.Second))
		} else {
			ls.LagBytes = st.OutOfSyncBytes
		}
	}
	return ls
}

func parseDisk(s string) mirror.DiskState {
	for d := mirror.DiskState(0); d <= mirror.DiskFailed; d++ {
		if d.String() == s {
			return d
		}
	}
	return mirror.DiskDUnknown
}

// step steps the machine and carries out its actions, in order.
func (a *Agent) step(ev failover.Event) []failover.Decision {
	if ls, ok := ev.(failover.LocalState); ok {
		a.lastLocal = ls
	}
	var decisions []failover.Decision
	for _, act := range a.m.Step(ev) {
		switch act := act.(type) {
		case failover.Record:
			decisions = append(decisions, act.Decision)
			a.record(act.Decision)
		case failover.SaveEpoch:
			if err := SaveEpoch(a.cfg.EpochFile, act.Epoch); err != nil {
				// Not durable: a restart could reuse an epoch. Loud, but
				// the running agent keeps its word.
				a.log.Error().Err(err).Uint64("epoch", act.Epoch).Msg("could not persist the failover epoch")
			}
		case failover.Fence:
			// At once, never queued behind a slow action: from here on no
			// write is acknowledged.
			a.vol.Fence(fenceMode(act.How), act.Reason)
			a.result(act.ID, nil)
		case failover.Unfence:
			a.vol.Unfence(act.Reason)
			a.result(act.ID, nil)
		case failover.RequestVote:
			a.requestVote(act)
		case failover.PeerPromote:
			// Paths never block, so the handover goes out from here, a
			// few copies on every path; the peer acts on the first.
			var err error
			if !a.handover(act.Epoch) {
				err = errors.New("no heartbeat path could send the handover")
			}
			a.result(act.ID, err)
		case failover.DropReplication:
			// Beside the loop: it waits for the session's teardown.
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				a.vol.DropSession(act.Reason)
			}()
		case failover.AnnounceIntent:
			a.log.Warn().Str("want", act.Want).Time("deadline", act.Deadline).Str("reason", act.Reason).
				Msg("failover intent announced: answer with 'mirrord confirm' or 'mirrord deny'")
		case failover.WithdrawIntent:
			a.log.Info().Str("reason", act.Reason).Msg("failover intent withdrawn")
		default:
			j := job{act: act}
			if _, ok := act.(failover.Promote); ok {
				j.peerLost = !a.m.Status().Peer.LostAt.IsZero()
			}
			select {
			case a.work <- j:
			default:
				a.log.Error().Type("action", act).Msg("action queue full: action dropped")
				if id := actionID(act); id != 0 {
					a.result(id, errors.New("action queue full"))
				}
			}
		}
	}
	a.publish()
	return decisions
}

// result reports an action's outcome as a later event, never from inside
// the batch being carried out: settle steps it once the batch is done.
func (a *Agent) result(id failover.ActionID, err error) {
	a.pending = append(a.pending, failover.ActionResult{ID: id, Err: err})
}

// handle steps ev, then the results of the actions it caused that were
// carried out on the spot. An event that carries no time (the volume's
// state, a result, a command) is preceded by a Tick: the machine then
// judges it at the present, never at its last tick, so it cannot, say,
// unfence a volume whose watchdog has just fired on a lease that ran out
// since.
func (a *Agent) handle(ev failover.Event) []failover.Decision {
	switch ev.(type) {
	case failover.Tick, failover.Heartbeat, failover.WitnessVote:
	default:
		a.step(failover.Tick{Now: a.clock.Now()})
	}
	d := a.step(ev)
	for len(a.pending) > 0 {
		r := a.pending[0]
		a.pending = a.pending[1:]
		a.step(r)
	}
	return d
}

func actionID(act failover.Action) failover.ActionID {
	switch act := act.(type) {
	case failover.Promote:
		return act.ID
	case failover.Demote:
		return act.ID
	case failover.StartResources:
		return act.ID
	case failover.StopResources:
		return act.ID
	case failover.RecoverResources:
		return act.ID
	case failover.ReleaseVote:
		return act.ID
	}
	return 0
}

func fenceMode(h failover.FenceHow) mirror.FenceMode {
	if h == failover.FenceError {
		return mirror.FenceFail
	}
	return mirror.FenceHold
}

// requestVote asks the witness, one request at a time; a request made
// while one is out replaces any waiting one.
func (a *Agent) requestVote(rv failover.RequestVote) {
	if a.cfg.Voter == nil {
		return
	}
	if a.voting {
		a.nextVote = &rv
		return
	}
	a.voting = true
	mc := a.cfg.Machine
	req := failover.VoteRequest{Volume: a.cfg.Volume, Node: mc.Node, Peer: mc.Peer, Epoch: rv.Epoch, PeerOutdated: rv.PeerOutdated}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), a.cfg.VoteTimeout)
		defer cancel()
		v, err := a.cfg.Voter.Vote(ctx, req)
		select {
		case a.votes <- voteReply{v: v, err: err}:
		case <-a.quit:
		}
	}()
}

// worker carries out the actions that may block, in order.
func (a *Agent) worker() {
	defer a.wg.Done()
	for {
		select {
		case <-a.quit:
			return
		case j := <-a.work:
			id, err := a.carryOut(j)
			if j.done != nil {
				j.done <- err
			}
			if id != 0 {
				select {
				case a.results <- failover.ActionResult{ID: id, Err: err}:
				case <-a.quit:
					return
				}
			}
		}
	}
}

func (a *Agent) carryOut(j job) (failover.ActionID, error) {
	switch act := j.act.(type) {
	case failover.Promote:
		if j.peerLost {
			a.vol.DropSession("failover: the peer is lost on every heartbeat path")
		}
		err := a.vol.Promote(mirror.PromoteOptions{Force: act.Force})
		if err == nil {
			// The machine counts a promoted node as serving; a volume
			// that promotes fenced (Options.FencePromotions) is unfenced
			// here.
			a.vol.Unfence("promoted by the failover agent: " + act.Reason)
		}
		return act.ID, err
	case failover.Demote:
		return act.ID, a.vol.Demote()
	case failover.StartResources:
		return act.ID, a.resources(true)
	case failover.StopResources:
		return act.ID, a.resources(false)
	case failover.RecoverResources:
		return act.ID, a.restart(act.From)
	case failover.ReleaseVote:
		if a.cfg.Voter == nil {
			return act.ID, nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), a.cfg.ResourceTimeout)
		defer cancel()
		return act.ID, a.cfg.Voter.Release(ctx, a.cfg.Volume, a.cfg.Machine.Node, act.To)
	}
	return 0, nil
}

func (a *Agent) resources(start bool) error {
	if a.cfg.Resources == nil {
		return nil
	}
	a.resGen.Add(1)
	defer a.resGen.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.ResourceTimeout)
	defer cancel()
	var err error
	if start {
		err = a.cfg.Resources.Start(ctx)
	} else {
		err = a.cfg.Resources.Stop(ctx)
	}
	// Up only after a clean start; a failed start rolled back, a stop
	// (even a failed one) leaves nothing to check.
	a.resUp.Store(start && err == nil)
	if !a.resUp.Load() {
		a.mu.Lock()
		a.health = nil
		a.mu.Unlock()
	}
	return err
}

// restart is local recovery: the resource from and those after it are
// restarted. The chain stays watched whatever the outcome (those before
// from still run; the next check shows what is down), so a failed
// restart leaves the machine to hand over.
func (a *Agent) restart(from string) error {
	r, ok := a.cfg.Resources.(Recoverer)
	if !ok {
		return ErrNoRecovery
	}
	if a.exiting.Load() {
		return ErrClosed // mirrord is stopping: the chain stays down
	}
	a.resGen.Add(1)
	defer a.resGen.Add(1)
	// Two timeouts: a stop and a start.
	ctx, cancel := context.WithTimeout(context.Background(), 2*a.cfg.ResourceTimeout)
	defer cancel()
	a.log.Warn().Str("resource", from).Msg("local recovery: restarting the resource and those after it")
	err := r.Restart(ctx, from)
	a.mu.Lock()
	a.health = nil
	a.mu.Unlock()
	return err
}

// record logs a decision and keeps it for Status and subscribers.
func (a *Agent) record(d failover.Decision) {
	ev := a.log.Info()
	if d.Kind == failover.KindFence || d.Kind == failover.KindPromote || d.Kind == failover.KindDemote || d.Kind == failover.KindForce {
		ev = a.log.Warn()
	}
	ev.Str("kind", string(d.Kind)).Bool("acted", d.Acted).Str("facts", d.Facts.String()).Msg(d.Cause)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.history = append(a.history, d)
	if len(a.history) > a.cfg.History {
		a.history = a.history[len(a.history)-a.cfg.History:]
	}
	for c := range a.subs {
		select {
		case c <- d:
		default:
		}
	}
}

// publish refreshes the status snapshot and the volume's watchdog.
func (a *Agent) publish() {
	st := a.m.Status()
	a.mu.Lock()
	a.status = st
	a.mu.Unlock()
	if st.ServeUntil.IsZero() {
		a.vol.DisarmWatchdog()
		return
	}
	a.vol.ArmWatchdog(st.ServeUntil.Sub(a.clock.Now()), fenceMode(a.cfg.Machine.Fencing))
}

// ---- the epoch file ----

// LoadEpoch reads the epoch file; a missing file is epoch 0 (a new pair).
func LoadEpoch(path string) (failover.HardState, error) {
	if path == "" {
		return failover.HardState{}, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return failover.HardState{}, nil
	}
	if err != nil {
		return failover.HardState{}, fmt.Errorf("failover epoch file: %w", err)
	}
	e, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return failover.HardState{}, fmt.Errorf("failover epoch file %s: %q is not an epoch: %w", path, b, err)
	}
	return failover.HardState{Epoch: e}, nil
}

// SaveEpoch replaces the epoch file atomically and durably: written to a
// temporary file, synced, renamed over, and the directory synced.
func SaveEpoch(path string, epoch uint64) error {
	if path == "" {
		return nil
	}
	if err := atomicfile.Write(path, []byte(fmt.Sprintf("%d\n", epoch))); err != nil {
		return fmt.Errorf("save epoch: %w", err)
	}
	return nil
}
