// Package failover owns the decisions of the failover agent: when a
// Secondary takes over a lost Primary, when a Primary stops acknowledging
// writes because it may no longer be the only one, when a returning node
// steps down, and how planned switchovers, forced promotions and failback
// proceed.
//
// It is a pure state machine in the manner of etcd-io/raft: a [Machine] is
// advanced by [Machine.Step] with events (heartbeats, witness votes, the
// local volume's state, operator commands, ticks carrying the time) and
// returns the actions the runner must carry out. It does no I/O, starts no
// goroutines and never reads the clock, so the hard cases (site loss, a
// flapping link, a second failure during resync, a clock jump) are
// deterministic unit tests: the same events in the same order give the same
// actions.
//
// Every decision, including each decision not to act, is returned as a
// [Record] action with its cause: which paths were silent and for how long,
// who held the vote, how far behind the target was, the disk state. A
// standing condition is recorded when it starts, not on every tick.
//
// The package does not import package mirror: the runner converts the
// volume's state into [LocalState] (the Role and DiskState values equal
// mirror's, so the conversion is a cast) and carries out [Promote],
// [Demote] and [Fence] on the volume.
//
// # Timing
//
// Let I be Config.HeartbeatInterval, M Config.MissCount, D = I*M the
// detection timeout and S Config.SafetyMargin (I plus two ticks by
// default). A heartbeat path is Suspect once a heartbeat is half an
// interval overdue and Lost after D of silence; the peer is lost only when
// every configured path is Lost, so one flapping path changes nothing.
//
// A Secondary promotes no earlier than D after the last heartbeat it
// received, and only with the witness's vote granted after that moment.
// A Primary renews its vote every I (a lease of D at the witness) and
// fences itself when it has had no quorum evidence for D-S: neither a
// grant from the witness nor a heartbeat from a Secondary peer that still
// hears it. So the Primary stops acknowledging writes at least S before the
// target may promote, and S covers the phase between the two nodes' last
// heartbeats (one interval), the tick granularity on both sides and the
// latency to the witness: there is no instant with two writable Primaries.
//
// With the LAN defaults (500 ms x 4, 50 ms ticks) the target promotes at
// most 2 s + one tick + one witness round trip after the Primary's last
// heartbeat, about 2.1 s after a kill -9, leaving 0.9 s of the 3 s budget
// for the promotion and the resource chain; a cut-off Primary fences after
// 1.4 s. WAN defaults: 2 s x 10, promotion after about 20.2 s, fence after
// 17.6 s.
//
// # Data safety
//
// Promotion is data-aware: never an Inconsistent disk; in sync mode only a
// target its Primary reported in sync at its last heartbeat; in async mode
// only within Config.MaxAsyncLagBytes and MaxAsyncLagTime. In sync mode a
// Primary that loses its replication session holds writes until the
// witness has recorded the peer outdated (DRBD's resource-and-stonith
// fencing policy); an outdated target refuses to promote, so no
// acknowledged write is lost by a failover. A session that is silent but
// not yet timed out would hold writes in flight until its own timeout
// (peer.timeout, 6 s by default): a sync Primary that declares its peer
// lost on every path drops it ([DropReplication]), so writes wait D plus
// one witness round trip instead. A node that has not heard its
// peer since it started never promotes on its own (corosync's
// wait_for_all): both sites died and only one came back, and it cannot
// know whether the other holds newer data.
//
// Epochs (see HardState) order the Primaries: a Primary that hears a
// Primary peer with a higher epoch steps down.
//
// # The witness contract
//
// The third vote (the mirrord witness or an etcd lease) keeps, per volume,
// a holder with a lease expiry, the node that held the vote last, an epoch
// counter (a fencing token) and a set of outdated nodes.
//
//   - [RequestVote] from node N: if another node holds an unexpired lease,
//     deny and name the holder. Otherwise grant: if the last holder was
//     not N (a different node, or none recorded: an empty ledger cannot
//     vouch that nobody held the vote, since it may be a witness that was
//     replaced or lost its state), the counter becomes
//     max(counter, request epoch)+1, else max(counter, request epoch); so
//     the first grant on an empty ledger is at least 1 and epoch 0 is
//     never a token; N becomes holder and last holder
//     with a lease of Config.LeaseTTL from now; record N's claim about its
//     peer (outdated or not). Reply with the counter, whether N itself is
//     recorded outdated and whether N's peer is.
//   - [ReleaseVote] from the holder: the vote passes to the named node
//     (counter+1, fresh lease), as if that node had asked.
//
// A grant whose epoch equals the node's own therefore means nobody else
// held the vote in between; a larger one means another node did (or the
// witness cannot tell) and may have been promoted, so a Primary waits to
// hear its peer as Secondary before it serves again. A Primary that meets
// an empty ledger (a new witness) thus serves again once its peer vouches
// for it, or when the operator forces it.
//
// # What the runner must do
//
//   - Step LocalState at start and after every change of the volume; start
//     a Primary volume fenced and let the machine unfence it.
//   - Tick every Config.TickInterval; stamp every event from one monotonic
//     clock; send Machine.Beacon on every path every HeartbeatInterval and
//     step received ones as Heartbeat.
//   - Carry out each batch in order, make SaveEpoch durable before the next
//     action, and step an ActionResult for every action with an ID.
//   - Arm a watchdog in the volume with Status().ServeUntil, so that a hung
//     agent cannot leave a Primary acknowledging writes past its lease.
//   - In sync mode with a witness, have the volume hold writes itself the
//     moment its replication session drops, until the machine's Unfence:
//     the machine's Fence comes one event later.
//   - Deliver the peer's PeerPromote as a Handover, and operator commands
//     as events.
//   - Carry out DropReplication beside the loop (ending a session waits
//     for its teardown).
//   - While the resource chain is up, check it periodically and step each
//     check as a ResourceCheck (never one that overlapped a start, stop or
//     restart of the chain); carry out RecoverResources by restarting the
//     named resource and those after it. The machine decides between
//     local recovery and a handover to the peer (see recovery.go).
//   - Report a failed start of the chain as StartResources' error (one
//     that names the resource, a ResourceNamer, for status), and one made
//     outside the machine (an operator's promotion) as ResourceStartFailed:
//     the machine starts it again, hands over or retries.
package failover

import (
	"fmt"

	"github.com/mirrord/mirrord/mirror"
)

// Role and DiskState are the volume's own, so that the runner passes them
// through unchanged. Only these types come from package mirror: the
// machine does no I/O.
type (
	Role      = mirror.Role
	DiskState = mirror.DiskState
)

// Roles and disk states, as DRBD names them.
const (
	RoleUnknown   = mirror.RoleUnknown
	RolePrimary   = mirror.RolePrimary
	RoleSecondary = mirror.RoleSecondary

	DiskDUnknown     = mirror.DiskDUnknown
	DiskInconsistent = mirror.DiskInconsistent
	DiskOutdated     = mirror.DiskOutdated
	DiskConsistent   = mirror.DiskConsistent
	DiskUpToDate     = mirror.DiskUpToDate
	DiskFailed       = mirror.DiskFailed
)

// Mode is how much the agent may do on its own.
type Mode uint8

// Modes.
const (
	// ModeAuto promotes a target as soon as the peer is lost on every path and
	// the witness grants the vote.
	ModeAuto Mode = iota
	// ModeConfirm is LifeKeeper's confirm-failover: with the vote in hand the
	// agent announces its intent and waits for Confirm or Deny, taking
	// Config.DefaultConfirmAction after Config.ConfirmTimeout.
	ModeConfirm
	// ModeMaintenance watches and records what it would have done, but never
	// acts on its own. Operator commands still work. SetMaintenance{On:
	// false} leaves it for ModeConfirm.
	ModeMaintenance
)

func (m Mode) String() string {
	switch m {
	case ModeAuto:
		return "auto"
	case ModeConfirm:
		return "confirm"
	case ModeMaintenance:
		return "maintenance"
	}
	return fmt.Sprintf("Mode(%d)", uint8(m))
}

// ConfirmAction is what Confirm mode does when nobody answers in time.
type ConfirmAction uint8

// Confirm-mode default actions.
const (
	// Proceed is LifeKeeper's default: a site loss at night still fails
	// over; the operator had ConfirmTimeout to veto it.
	Proceed ConfirmAction = iota
	// Abandon leaves the target Secondary.
	Abandon
)

func (a ConfirmAction) String() string {
	if a == Abandon {
		return "abandon"
	}
	return "proceed"
}

// FenceHow is what a fenced volume does with writes.
type FenceHow uint8

// Fencing methods.
const (
	// FenceSuspend holds writes (the application stalls) until Unfence or
	// Demote; nothing is lost if the node turns out to be the rightful
	// Primary after all.
	FenceSuspend FenceHow = iota
	// FenceError fails writes with an I/O error, so that an application can
	// notice and give up instead of hanging.
	FenceError
)

func (f FenceHow) String() string {
	if f == FenceError {
		return "error"
	}
	return "suspend"
}

// PathState is the health of one heartbeat path, or of the peer as a whole.
type PathState uint8

// Path states.
const (
	Alive PathState = iota
	// Suspect: a heartbeat is overdue by half an interval (one missed).
	// Shown in Status, never acted upon.
	Suspect
	// Lost: silent for the whole detection timeout.
	Lost
)

func (s PathState) String() string {
	switch s {
	case Suspect:
		return "suspect"
	case Lost:
		return "lost"
	}
	return "alive"
}
