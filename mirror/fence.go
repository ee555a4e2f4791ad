package mirror

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// FenceMode is what a fenced volume does with writes. The failover agent
// fences a Primary that may no longer be the only one: from the moment
// Fence returns no further write is acknowledged.
type FenceMode uint32

// Fence modes.
const (
	// Unfenced: writes pass (the write path pays one atomic load).
	Unfenced FenceMode = iota
	// FenceHold holds writes until Unfence (they then complete) or Demote
	// (they fail with EPERM): nothing is lost if the node turns out to be
	// the rightful Primary after all.
	FenceHold
	// FenceFail fails writes with EIO, so that an application notices and
	// gives up instead of hanging.
	FenceFail
)

func (m FenceMode) String() string {
	switch m {
	case FenceHold:
		return "suspend"
	case FenceFail:
		return "error"
	}
	return "none"
}

// ErrFenced is returned for writes on a volume fenced with FenceFail (and
// for held writes when fencing switches to FenceFail).
var ErrFenced = fmt.Errorf("volume fenced: this node may not be the only Primary: %w", syscall.EIO)

// fence is the write path's gate for the failover agent. mode is read on
// every write; everything else only when fenced.
type fence struct {
	mode   atomic.Uint32 // FenceMode
	mu     sync.Mutex
	cond   sync.Cond
	reason string
	// holdOnDrop: fence (hold) the moment the replication session drops,
	// so that a sync Primary never acknowledges a write its peer lacks
	// before the failover agent decided it may (see Options).
	holdOnDrop bool
	dog        *time.Timer
	dogMode    FenceMode
}

// FenceState is the fence's current mode and why it was set.
func (v *Volume) FenceState() (FenceMode, string) {
	v.fc.mu.Lock()
	defer v.fc.mu.Unlock()
	return FenceMode(v.fc.mode.Load()), v.fc.reason
}

// Fence stops acknowledging writes with mode (FenceHold or FenceFail).
// Writes already past their local and remote I/O but not yet acknowledged
// are held or failed too.
func (v *Volume) Fence(mode FenceMode, reason string) {
	if mode == Unfenced {
		v.Unfence(reason)
		return
	}
	v.setFence(mode, reason)
}

// Unfence lets writes through again, and held writes complete.
func (v *Volume) Unfence(reason string) { v.setFence(Unfenced, reason) }

func (v *Volume) setFence(mode FenceMode, reason string) {
	f := &v.fc
	f.mu.Lock()
	old := FenceMode(f.mode.Load())
	f.mode.Store(uint32(mode))
	f.reason = reason
	f.cond.Broadcast()
	f.mu.Unlock()
	if old != mode {
		if mode == Unfenced {
			v.log.Info().Str("reason", reason).Msg("unfenced: writes acknowledged again")
		} else {
			v.log.Warn().Str("mode", mode.String()).Str("reason", reason).Msg("fenced: writes are no longer acknowledged")
		}
		v.ev.emit("fence", v.Status())
	}
}

// ArmWatchdog fences the volume with mode once d has passed without
// another ArmWatchdog or DisarmWatchdog. The failover agent re-arms it with
// its lease on every tick, so that a hung agent cannot leave a Primary
// acknowledging writes after its quorum ran out.
func (v *Volume) ArmWatchdog(d time.Duration, mode FenceMode) {
	f := &v.fc
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dogMode = mode
	if f.dog == nil {
		f.dog = time.AfterFunc(d, v.watchdogFired)
		return
	}
	f.dog.Reset(d)
}

// DisarmWatchdog stops the watchdog.
func (v *Volume) DisarmWatchdog() {
	f := &v.fc
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dog != nil {
		f.dog.Stop()
	}
}

func (v *Volume) watchdogFired() {
	f := &v.fc
	f.mu.Lock()
	mode := f.dogMode
	f.mu.Unlock()
	if v.Role() != RolePrimary || v.closed.Load() {
		return
	}
	v.Fence(mode, "watchdog: the failover agent did not renew its lease in time")
}

// fenced is the slow path of a write that found the fence set: it holds
// the write until Unfence, a role change or Close.
func (v *Volume) fenced() error {
	f := &v.fc
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		// Role first: a write held across a Demote must fail even if the
		// fence was lifted meanwhile.
		switch {
		case v.closed.Load():
			return ErrClosed
		case v.Role() != RolePrimary:
			return ErrNotPrimary
		}
		switch FenceMode(f.mode.Load()) {
		case Unfenced:
			return nil
		case FenceFail:
			return ErrFenced
		}
		f.cond.Wait()
	}
}

// wakeFenced re-evaluates held writes after a role change or Close.
func (v *Volume) wakeFenced() {
	f := &v.fc
	f.mu.Lock()
	f.cond.Broadcast()
	f.mu.Unlock()
}

// sessionDropped holds writes when the replication session ends, if
// Options.HoldOnDisconnect asked for it; called before the session's
// unacknowledged writes are released.
func (v *Volume) sessionDropped() {
	if v.fc.holdOnDrop && v.Role() == RolePrimary && FenceMode(v.fc.mode.Load()) == Unfenced {
		v.Fence(FenceHold, "replication session dropped: writes held until the failover agent decides")
	}
}

// promoteFence sets the fence a promotion starts with: held with
// Options.FencePromotions (the agent unfences), none otherwise. Called
// under the gate, before the role changes.
func (v *Volume) promoteFence() {
	if v.fencePro {
		v.Fence(FenceHold, "promoted: writes held until the failover agent confirms this node is the only Primary")
		return
	}
	v.fc.mu.Lock()
	v.fc.mode.Store(uint32(Unfenced))
	v.fc.mu.Unlock()
}

// SendBeacon sends a failover agent message to the peer over the
// replication link. It fails with ErrNotConnected when no session is up,
// and may block while the link's send buffer is full: callers send from
// a goroutine of their own.
func (v *Volume) SendBeacon(p []byte) error {
	if v.link == nil {
		return ErrNoPeer
	}
	s := v.link.current()
	if s == nil {
		return ErrNotConnected
	}
	if _, ok := s.direct(wan.Header{Type: wan.FrameBeacon}, p, nil, sendFlush); !ok {
		return ErrNotConnected
	}
	return nil
}

// DropSession ends the current replication session, if any, and lets the
// link reconnect as usual. The failover agent calls it before promoting a
// node whose peer it has declared lost on every path: a session that has
// not timed out yet would otherwise veto the promotion (the peer still
// looks Primary) and stall the new Primary's writes until it does.
func (v *Volume) DropSession(reason string) {
	if v.link == nil {
		return
	}
	if s := v.link.current(); s != nil {
		s.fail(errors.New(reason))
		<-s.done
	}
}
