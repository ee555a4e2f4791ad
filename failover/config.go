package failover

import (
	"errors"
	"fmt"
	"time"
)

// ErrConfig is wrapped by every configuration error; the message names the
// field.
var ErrConfig = errors.New("failover config")

// Heartbeat path names the runner normally configures. LifeKeeper fails over
// only when every communication path is dead, so a pair should have at least
// two that do not share a failure (the replication TCP session and a UDP
// beacon on another interface).
const (
	PathReplication = "replication"
	PathUDP         = "udp"
)

// Defaults.
const (
	// DefaultLANHeartbeatInterval and DefaultLANMissCount declare a LAN
	// peer lost after 2 s of silence on every path: the product promises
	// writes on the target within 3 s of a primary's kill -9, and promotion
	// plus resource start need the remaining second. (Windows clusters use
	// 1 s x 5; Corosync raised its token to 3 s to stop false failovers;
	// requiring every path to be silent is what lets us go lower.)
	DefaultLANHeartbeatInterval = 500 * time.Millisecond
	DefaultLANMissCount         = 4
	// DefaultWANHeartbeatInterval and DefaultWANMissCount: 20 s, in the
	// range of cross-subnet cluster settings (1 s x 20), because a WAN has
	// routing hiccups of several seconds that must not cost a failover.
	DefaultWANHeartbeatInterval = 2 * time.Second
	DefaultWANMissCount         = 10
	// DefaultConfirmTimeout is how long Confirm mode waits for an answer.
	DefaultConfirmTimeout = 10 * time.Minute
	// DefaultMaxAsyncLagBytes equals mirror's default async window: a
	// target further behind than the send window was not keeping up.
	DefaultMaxAsyncLagBytes = 64 << 20
	// DefaultMaxAsyncLagTime bounds the age of the oldest write an async
	// target may lack and still be promoted automatically.
	DefaultMaxAsyncLagTime = 10 * time.Second
	// DefaultSwitchoverTimeout bounds the drain of a planned switchover.
	DefaultSwitchoverTimeout = 10 * time.Second
	// DefaultLocalRecovery is LifeKeeper's: one restart in place before a
	// failed resource moves the service to the peer, since most failures
	// (a crashed daemon) are cured by a restart, which is cheaper than a
	// switchover.
	DefaultLocalRecovery = 1
	// DefaultStartRetryInterval is how often a Primary whose resource
	// chain failed to start, and that cannot hand over, tries again: the
	// agent's default check interval, the same pace at which a running
	// chain is watched.
	DefaultStartRetryInterval = 10 * time.Second
	// DefaultHandoverHold is how long a node that handed the service over
	// because of a resource failure refuses a second such handover: if the
	// service came back, the peer's resources failed too, and handing it
	// over again would only bounce it between two broken nodes (Pacemaker
	// bans a failed node for its failure-timeout the same way). Long
	// enough for an operator to notice; short enough that a failure next
	// week is handled afresh.
	DefaultHandoverHold = 10 * time.Minute
)

// FailbackPolicy says whether a node that took over gives the volume back
// when the original Primary returns healthy.
type FailbackPolicy uint8

// Failback policies.
const (
	// FailbackNever is the default: moving back is another interruption,
	// so it is an operator's decision.
	FailbackNever FailbackPolicy = iota
	// FailbackImmediate switches back as soon as the original Primary has
	// been in sync for a detection timeout.
	FailbackImmediate
	// FailbackWindow switches back only inside the configured hours, at
	// most Max times per window.
	FailbackWindow
)

func (p FailbackPolicy) String() string {
	switch p {
	case FailbackImmediate:
		return "immediate"
	case FailbackWindow:
		return "window"
	}
	return "never"
}

// Failback configures failback.
type Failback struct {
	Policy FailbackPolicy
	// StartHour and EndHour (0-23, local time of the event times) bound
	// the window [StartHour, EndHour); a window may wrap midnight.
	StartHour, EndHour int
	// Max failbacks (attempts) per window; default 1.
	Max int
}

// Config configures a Machine. Zero durations and counts take the LAN
// defaults in New; DefaultLAN and DefaultWAN spell them out.
type Config struct {
	// Node is this node's name, Peer the other's.
	Node, Peer string
	// Paths names the heartbeat paths. The peer is lost only when every
	// one is.
	Paths []string
	// HeartbeatInterval is how often the runner sends a heartbeat on each
	// path (and the Primary renews its witness lease).
	HeartbeatInterval time.Duration
	// MissCount intervals of silence on every path declare the peer lost.
	MissCount int
	// TickInterval is how often the runner must Tick the machine; default
	// HeartbeatInterval/10. Decisions happen on ticks, so it bounds their
	// lateness.
	TickInterval time.Duration
	// SafetyMargin is how much earlier a Primary without quorum fences
	// than its peer may promote; default HeartbeatInterval +
	// 2*TickInterval. It must cover the phase between the two nodes' last
	// heartbeats (one interval), the tick granularity on both sides and the
	// one-way latency to the witness.
	SafetyMargin time.Duration
	// JumpThreshold: a gap between timed events larger than this is a
	// clock jump or a stalled agent, not elapsed silence; default
	// 3*HeartbeatInterval.
	JumpThreshold time.Duration
	// Witness says a third vote is configured. Without one, two nodes
	// cannot tell a dead peer from a cut link, so promotion is never
	// automatic: the agent announces its intent and waits for Confirm (or
	// ForcePromote).
	Witness bool
	// Mode is ModeAuto, ModeConfirm or ModeMaintenance.
	Mode Mode
	// ConfirmTimeout and DefaultConfirmAction drive Confirm mode.
	ConfirmTimeout       time.Duration
	DefaultConfirmAction ConfirmAction
	// MaxAsyncLagBytes and MaxAsyncLagTime bound how far behind an async
	// target may be and still be promoted automatically.
	MaxAsyncLagBytes int64
	MaxAsyncLagTime  time.Duration
	// Fencing is what a Primary that loses quorum does with writes.
	Fencing FenceHow
	// Failback is the failback policy (default never).
	Failback Failback
	// SwitchoverTimeout bounds how long a planned switchover holds writes
	// waiting for the target to catch up.
	SwitchoverTimeout time.Duration
	// LocalRecovery is how many times a resource that fails its check is
	// restarted in place (with the resources after it) before the Primary
	// hands over to its peer; default DefaultLocalRecovery, negative:
	// never, hand over at the first failed check.
	LocalRecovery int
	// StartRetryInterval is how often a Primary whose resource chain
	// failed to start, with its local recoveries used up and no handover
	// possible, starts it again; default DefaultStartRetryInterval.
	StartRetryInterval time.Duration
	// HandoverHold is how long after handing the service over because of
	// a resource failure this node hands over for a resource failure no
	// more (it stays Primary, retrying); default DefaultHandoverHold.
	HandoverHold time.Duration
}

// DefaultLAN returns the LAN defaults with two heartbeat paths. The caller
// sets Node, Peer and Witness (without a witness, failover is
// confirm-only).
func DefaultLAN() Config {
	c := Config{
		Paths:             []string{PathReplication, PathUDP},
		HeartbeatInterval: DefaultLANHeartbeatInterval,
		MissCount:         DefaultLANMissCount,
	}
	c.fill()
	return c
}

// DefaultWAN returns the WAN defaults.
func DefaultWAN() Config {
	c := Config{
		Paths:             []string{PathReplication, PathUDP},
		HeartbeatInterval: DefaultWANHeartbeatInterval,
		MissCount:         DefaultWANMissCount,
	}
	c.fill()
	return c
}

// fill sets zero tunables to their defaults.
func (c *Config) fill() {
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultLANHeartbeatInterval
	}
	if c.MissCount == 0 {
		c.MissCount = DefaultLANMissCount
	}
	if c.TickInterval == 0 {
		c.TickInterval = c.HeartbeatInterval / 10
	}
	if c.SafetyMargin == 0 {
		c.SafetyMargin = c.HeartbeatInterval + 2*c.TickInterval
	}
	if c.JumpThreshold == 0 {
		c.JumpThreshold = 3 * c.HeartbeatInterval
	}
	if c.ConfirmTimeout == 0 {
		c.ConfirmTimeout = DefaultConfirmTimeout
	}
	if c.MaxAsyncLagBytes == 0 {
		c.MaxAsyncLagBytes = DefaultMaxAsyncLagBytes
	}
	if c.MaxAsyncLagTime == 0 {
		c.MaxAsyncLagTime = DefaultMaxAsyncLagTime
	}
	if c.SwitchoverTimeout == 0 {
		c.SwitchoverTimeout = DefaultSwitchoverTimeout
	}
	if c.Failback.Max == 0 {
		c.Failback.Max = 1
	}
	if c.LocalRecovery == 0 {
		c.LocalRecovery = DefaultLocalRecovery
	}
	if c.StartRetryInterval == 0 {
		c.StartRetryInterval = DefaultStartRetryInterval
	}
	if c.HandoverHold == 0 {
		c.HandoverHold = DefaultHandoverHold
	}
}

// localRecoveries is how many local recoveries a failure gets.
func (c Config) localRecoveries() int { return max(c.LocalRecovery, 0) }

// DetectTimeout is how long every path must be silent before the peer is
// lost: HeartbeatInterval * MissCount.
func (c Config) DetectTimeout() time.Duration {
	return c.HeartbeatInterval * time.Duration(c.MissCount)
}

// LeaseTTL is the lease the witness must give a granted vote: the detection
// timeout, so that a dead Primary's lease runs out when its peer notices.
func (c Config) LeaseTTL() time.Duration { return c.DetectTimeout() }

// FenceAfter is how long a Primary may go without quorum evidence (a
// granting witness or a vouching peer) before it fences:
// DetectTimeout - SafetyMargin.
func (c Config) FenceAfter() time.Duration { return c.DetectTimeout() - c.SafetyMargin }

// Validate reports the first invalid field.
func (c Config) Validate() error {
	bad := func(field, format string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrConfig, field, fmt.Sprintf(format, a...))
	}
	switch {
	case c.Node == "":
		return bad("Node", "empty")
	case c.Peer == "":
		return bad("Peer", "empty")
	case c.Node == c.Peer:
		return bad("Peer", "equals Node %q", c.Node)
	case len(c.Paths) == 0:
		return bad("Paths", "at least one heartbeat path is needed")
	case c.HeartbeatInterval <= 0:
		return bad("HeartbeatInterval", "%v is not positive", c.HeartbeatInterval)
	case c.MissCount < 3:
		return bad("MissCount", "%d: at least 3 (one interval to suspect, one of margin, one to confirm)", c.MissCount)
	case c.TickInterval <= 0 || c.TickInterval > c.HeartbeatInterval/2:
		return bad("TickInterval", "%v: must be positive and at most half of HeartbeatInterval %v", c.TickInterval, c.HeartbeatInterval)
	case c.SafetyMargin < c.HeartbeatInterval:
		return bad("SafetyMargin", "%v: at least one HeartbeatInterval (%v)", c.SafetyMargin, c.HeartbeatInterval)
	case c.FenceAfter() < c.HeartbeatInterval:
		return bad("SafetyMargin", "%v leaves a Primary less than one interval (%v) before it fences; raise MissCount", c.SafetyMargin, c.FenceAfter())
	case c.JumpThreshold < 2*c.HeartbeatInterval:
		return bad("JumpThreshold", "%v: at least two heartbeat intervals", c.JumpThreshold)
	case c.Mode > ModeMaintenance:
		return bad("Mode", "unknown mode %d", c.Mode)
	case c.DefaultConfirmAction > Abandon:
		return bad("DefaultConfirmAction", "unknown action %d", c.DefaultConfirmAction)
	case c.Fencing > FenceError:
		return bad("Fencing", "unknown method %d", c.Fencing)
	case c.ConfirmTimeout <= 0:
		return bad("ConfirmTimeout", "%v is not positive", c.ConfirmTimeout)
	case c.MaxAsyncLagBytes < 0:
		return bad("MaxAsyncLagBytes", "%d is negative", c.MaxAsyncLagBytes)
	case c.MaxAsyncLagTime < 0:
		return bad("MaxAsyncLagTime", "%v is negative", c.MaxAsyncLagTime)
	case c.SwitchoverTimeout <= 0:
		return bad("SwitchoverTimeout", "%v is not positive", c.SwitchoverTimeout)
	case c.StartRetryInterval < 0:
		return bad("StartRetryInterval", "%v is negative", c.StartRetryInterval)
	case c.HandoverHold < 0:
		return bad("HandoverHold", "%v is negative", c.HandoverHold)
	case c.Failback.Policy > FailbackWindow:
		return bad("Failback.Policy", "unknown policy %d", c.Failback.Policy)
	case c.Failback.Max < 1:
		return bad("Failback.Max", "%d: at least 1", c.Failback.Max)
	}
	seen := map[string]bool{}
	for _, p := range c.Paths {
		if p == "" {
			return bad("Paths", "empty path name")
		}
		if seen[p] {
			return bad("Paths", "%q listed twice", p)
		}
		seen[p] = true
	}
	if w := c.Failback; w.Policy == FailbackWindow {
		if w.StartHour < 0 || w.StartHour > 23 || w.EndHour < 0 || w.EndHour > 23 {
			return bad("Failback", "hours %d-%d: must be 0-23", w.StartHour, w.EndHour)
		}
		if w.StartHour == w.EndHour {
			return bad("Failback", "empty window %d-%d", w.StartHour, w.EndHour)
		}
	}
	return nil
}
