package failover

import "time"

// Event is an input to Machine.Step.
//
// Events that carry a Now are stamped by the runner from one clock, in the
// order it steps them; that clock should be monotonic (time.Now's
// monotonic reading), so that a wall-clock step never reaches the machine.
// A gap larger than Config.JumpThreshold is still treated as a jump (a
// stalled agent, a paused VM) and never by itself declares the peer lost.
type Event interface{ isEvent() }

// Tick advances time. The runner ticks every Config.TickInterval.
type Tick struct{ Now time.Time }

// Beacon is what a node tells its peer in every heartbeat; the runner gets
// it from Machine.Beacon and sends it on every path.
type Beacon struct {
	Node  string
	Role  Role
	Disk  DiskState
	Epoch uint64
	// InSync, from a Primary: its replication session to the receiver is
	// up and the receiver's disk is UpToDate, so the receiver holds every
	// write the Primary has acknowledged (sync) or all but the reported lag
	// (async).
	InSync bool
	// LagBytes and LagTime, from a Primary: how much acknowledged data the
	// receiver lacks and the age of the oldest such write.
	LagBytes int64
	LagTime  time.Duration
	// Hears: the sender has heard the receiver recently (within
	// FenceAfter - HeartbeatInterval). A Primary counts its peer's
	// heartbeats as quorum evidence only while they say so: after a
	// one-way loss the peer may be about to promote although the Primary
	// still hears it.
	Hears bool
}

// Heartbeat is a Beacon received from the peer on one path.
type Heartbeat struct {
	Path string
	Now  time.Time
	Beacon
}

// WitnessVote is the witness's answer to a RequestVote (see the witness
// contract in the package documentation).
type WitnessVote struct {
	Now time.Time
	// Granted: this node holds the vote (a lease of Config.LeaseTTL from
	// when the witness answered).
	Granted bool
	// Holder names the node holding the vote (this node when Granted).
	Holder string
	// Epoch is the witness's epoch counter after the request.
	Epoch uint64
	// Outdated: the holder recorded this node as lacking acknowledged
	// writes.
	Outdated bool
	// PeerOutdated: the witness records this node's peer as outdated (the
	// acknowledgement of RequestVote.PeerOutdated).
	PeerOutdated bool
}

// LocalState is the local volume's state, sent by the runner after every
// change (and at start, before anything else).
type LocalState struct {
	Role Role
	Disk DiskState
	// Async: the volume replicates asynchronously (protocol A).
	Async bool
	// Connected: the replication session to the peer is up.
	Connected bool
	// PeerDisk is the peer's disk as the replication session reports it.
	PeerDisk DiskState
	// LagBytes and LagTime: on a Primary, acknowledged data the peer lacks
	// and the age of the oldest such write; on a Secondary, what it knows
	// it lacks.
	LagBytes int64
	LagTime  time.Duration
	// Fenced: the volume's write path is fenced (suspended or failing).
	// A runner starts a Primary volume fenced and lets the machine unfence
	// it once it has quorum evidence.
	Fenced bool
}

// Switchover is the operator's planned role swap, given to the Primary.
type Switchover struct{}

// ForcePromote is the panic button: promote (or, on a fenced Primary,
// unfence) regardless of quorum. Without AcceptDataLoss it is refused with
// an estimate of what may be lost.
type ForcePromote struct{ AcceptDataLoss bool }

// Confirm answers an announced intent: go ahead.
type Confirm struct{}

// Deny answers an announced intent: do not.
type Deny struct{}

// SetMaintenance enters or leaves maintenance mode.
type SetMaintenance struct{ On bool }

// Handover is the peer's PeerPromote action, delivered: the peer has
// demoted in a planned switchover and asks this node to take over.
type Handover struct {
	From  string
	Epoch uint64
}

// ResourceCheck is one check of the running resource chain (each
// resource's monitor, LifeKeeper's quick check), in start order. The
// runner steps it only while the chain is up and only if no start, stop
// or recovery of the chain ran while it checked: an older check says
// nothing about the chain as it is now.
type ResourceCheck struct {
	Resources []ResourceHealth
}

// ResourceHealth is one resource's check.
type ResourceHealth struct {
	Name string `json:"name"`
	// Error is why the check failed ("": the resource looks alive).
	Error string `json:"error,omitempty"`
}

// ResourceStartFailed: the runner started the resource chain outside the
// machine (the operator promoted the volume directly) and the start
// failed and rolled back. The machine takes it as a failed start of its
// own StartResources: local recovery, then a handover or retries.
type ResourceStartFailed struct{ Err error }

// ResourceNamer is an error that names the resource at fault (the
// resource chain's start error does); the machine's decisions and status
// then name that resource rather than the whole chain.
type ResourceNamer interface{ FailedResource() string }

// ActionResult reports how an action with an ID went. The runner reports
// every such action exactly once.
type ActionResult struct {
	ID  ActionID
	Err error
}

func (Tick) isEvent()                {}
func (Heartbeat) isEvent()           {}
func (WitnessVote) isEvent()         {}
func (LocalState) isEvent()          {}
func (Switchover) isEvent()          {}
func (ForcePromote) isEvent()        {}
func (Confirm) isEvent()             {}
func (Deny) isEvent()                {}
func (SetMaintenance) isEvent()      {}
func (Handover) isEvent()            {}
func (ActionResult) isEvent()        {}
func (ResourceCheck) isEvent()       {}
func (ResourceStartFailed) isEvent() {}
