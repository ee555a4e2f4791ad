package failover

import (
	"fmt"
	"strings"
	"time"
)

// Action is an output of Machine.Step. The runner carries out a batch in
// order. Actions with an ID are reported back with an ActionResult; a
// SaveEpoch must be durable before the runner carries out the next action.
type Action interface{ isAction() }

// ActionID correlates an action with its ActionResult.
type ActionID uint64

// Promote makes the local volume Primary and writable (the volume bumps its
// data generation itself). Force promotes a disk that is not UpToDate.
type Promote struct {
	ID     ActionID
	Force  bool
	Reason string
}

// Demote makes the local volume Secondary; writes held by a fence fail.
type Demote struct {
	ID     ActionID
	Reason string
}

// Fence stops acknowledging writes (suspend or fail them) until Unfence or
// Demote. The runner must fence before it reports the result: from then on
// no write is acknowledged.
type Fence struct {
	ID     ActionID
	How    FenceHow
	Reason string
}

// Unfence lets writes through again.
type Unfence struct {
	ID     ActionID
	Reason string
}

// StartResources starts the resource chain above the volume (mount,
// floating IP, application), in order, after a promotion.
type StartResources struct {
	ID     ActionID
	Reason string
}

// StopResources stops the resource chain, in reverse, before a demotion.
type StopResources struct {
	ID     ActionID
	Reason string
}

// RecoverResources is local recovery (LifeKeeper's): stop the resource
// From and every resource after it in the chain, in reverse, then start
// them again in order; the resources before From keep running. An error
// means they are not all up again.
type RecoverResources struct {
	ID      ActionID
	From    string
	Attempt int
	Reason  string
}

// RequestVote asks the witness for the vote (a Primary renews it every
// heartbeat interval). The answer comes back as a WitnessVote.
type RequestVote struct {
	// Epoch is this node's epoch; the witness raises its counter to it.
	Epoch uint64
	// PeerOutdated, from a Primary, claims that the peer lacks writes this
	// node acknowledged (false: the peer is in sync again). The witness
	// records the claim only with a grant.
	PeerOutdated bool
}

// ReleaseVote hands the vote to another node (a planned switchover).
type ReleaseVote struct {
	ID ActionID
	To string
}

// PeerPromote asks the peer to take over (the last step of a switchover);
// the peer's runner steps it as a Handover.
type PeerPromote struct {
	ID    ActionID
	Epoch uint64
}

// AnnounceIntent tells the operator what the agent wants to do and waits
// for Confirm or Deny. A zero Deadline waits for ever (no witness: the
// agent never proceeds on its own).
type AnnounceIntent struct {
	Want     string
	Deadline time.Time
	Reason   string
}

// WithdrawIntent cancels an announced intent.
type WithdrawIntent struct{ Reason string }

// SaveEpoch makes the epoch durable (beside the volume's metadata); the
// runner passes it back to New after a restart.
type SaveEpoch struct{ Epoch uint64 }

// Record logs a decision (and keeps it for status and the event stream).
type Record struct{ Decision Decision }

// DropReplication ends the replication session at once; the link
// reconnects by itself. A sync Primary whose peer is lost on every path
// would otherwise keep writes in flight waiting for the peer until the
// session's own timeout (peer.timeout, 6 s by default); dropped, the
// volume holds writes (with a witness) and the machine lets them through
// as soon as the witness has recorded the peer outdated.
type DropReplication struct{ Reason string }

func (DropReplication) isAction()  {}
func (Promote) isAction()          {}
func (Demote) isAction()           {}
func (Fence) isAction()            {}
func (Unfence) isAction()          {}
func (StartResources) isAction()   {}
func (StopResources) isAction()    {}
func (RecoverResources) isAction() {}
func (RequestVote) isAction()      {}
func (ReleaseVote) isAction()      {}
func (PeerPromote) isAction()      {}
func (AnnounceIntent) isAction()   {}
func (WithdrawIntent) isAction()   {}
func (SaveEpoch) isAction()        {}
func (Record) isAction()           {}

// Kind classifies a decision.
type Kind string

// Decision kinds.
const (
	KindPeer       Kind = "peer"       // peer lost / back
	KindWitness    Kind = "witness"    // witness lost / back, quorum held elsewhere
	KindPromote    Kind = "promote"    // promoted
	KindNoPromote  Kind = "no-promote" // did not promote, and why
	KindFence      Kind = "fence"      // fenced / unfenced / kept serving
	KindDemote     Kind = "demote"     // stepped down for a newer Primary
	KindIntent     Kind = "intent"     // announced / confirmed / denied / timed out
	KindForce      Kind = "force"      // ForcePromote accepted or refused
	KindSwitchover Kind = "switchover" // planned switchover progress
	KindFailback   Kind = "failback"
	KindClock      Kind = "clock"    // jump detected
	KindMode       Kind = "mode"     // maintenance on/off
	KindEpoch      Kind = "epoch"    // epoch adopted
	KindResource   Kind = "resource" // a failed resource check: local recovery, handover, or why neither
	KindIgnored    Kind = "ignored"
)

// Decision is one recorded decision and its cause.
type Decision struct {
	At   time.Time
	Kind Kind
	// Acted is false for a decision not to act ("did not promote because")
	// and for what Maintenance mode would have done.
	Acted bool
	// Cause explains the decision with its numbers.
	Cause string
	Facts Facts
}

func (d Decision) String() string {
	acted := "did not act"
	if d.Acted {
		acted = "acted"
	}
	return fmt.Sprintf("%s %s (%s): %s [%s]", d.At.Format(time.RFC3339Nano), d.Kind, acted, d.Cause, d.Facts)
}

// Facts is the state a decision was taken in.
type Facts struct {
	Role      Role
	Disk      DiskState
	Epoch     uint64
	Fenced    bool
	PeerRole  Role
	PeerDisk  DiskState
	PeerEpoch uint64
	// Paths: each path's state and how long it has been silent.
	Paths []PathStatus
	// QuorumHolder is who the witness last said holds the vote ("" if
	// never answered), VoteAge how long ago.
	QuorumHolder string
	VoteAge      time.Duration
	// LagBytes and LagTime: the target's last known lag.
	LagBytes int64
	LagTime  time.Duration
}

func (f Facts) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "local %s/%s epoch %d", f.Role, f.Disk, f.Epoch)
	if f.Fenced {
		b.WriteString(" fenced")
	}
	fmt.Fprintf(&b, "; peer %s/%s epoch %d", f.PeerRole, f.PeerDisk, f.PeerEpoch)
	for _, p := range f.Paths {
		fmt.Fprintf(&b, "; %s %s %v", p.Name, p.State, p.Silent)
	}
	if f.QuorumHolder != "" {
		fmt.Fprintf(&b, "; vote %s %v ago", f.QuorumHolder, f.VoteAge)
	}
	if f.LagBytes != 0 || f.LagTime != 0 {
		fmt.Fprintf(&b, "; lag %d B %v", f.LagBytes, f.LagTime)
	}
	return b.String()
}
