package failover

// A Primary whose resource fails its check: local recovery first (restart
// the resource and those after it, as LifeKeeper does), then a handover
// to the peer, when the peer could take the service without losing a
// write; otherwise the node stays as it is and says why.

import (
	"fmt"
	"time"
)

// resourceFailure is one episode of failed checks, from the first failed
// check to the first check in which every resource passes.
type resourceFailure struct {
	name, err string
	since     time.Time
	// attempts: local recoveries started in this episode.
	attempts int
	// recovering is the RecoverResources in flight (0: none).
	recovering ActionID
}

// ResourceFailure is a failed resource check being dealt with, for status.
type ResourceFailure struct {
	// Resource is the first resource in chain order that failed the last
	// check, Error why.
	Resource string
	Error    string
	Since    time.Time
	// Recoveries is how many local recoveries were started, of
	// MaxRecoveries allowed.
	Recoveries, MaxRecoveries int
	// Recovering: a local recovery is running.
	Recovering bool
}

func (m *Machine) onResourceCheck(c ResourceCheck) {
	var bad *ResourceHealth
	for i := range c.Resources {
		if c.Resources[i].Error != "" {
			bad = &c.Resources[i]
			break
		}
	}
	if m.role != RolePrimary {
		return // a Secondary runs no resources: a late check
	}
	if bad == nil {
		if rf := m.rf; rf != nil && rf.recovering == 0 {
			m.rf = nil
			delete(m.topics, "resource")
			m.record(KindResource, false, fmt.Sprintf("resource %s passes its check again (failing since %v, %d local recoveries)", rf.name, m.now.Sub(rf.since), rf.attempts))
		}
		return
	}
	if m.rf == nil {
		m.rf = &resourceFailure{since: m.now}
	}
	if m.rf.recovering != 0 {
		return // the recovery's result decides
	}
	// The earliest failing resource in chain order: restarting it
	// restarts every resource after it too.
	m.rf.name, m.rf.err = bad.Name, bad.Error
	m.resourceFailed()
}

// resourceBusy says why the chain is not in a state to act on a failed
// check ("" if it is): a role change or a switchover in progress will
// stop or start it anyway.
func (m *Machine) resourceBusy() string {
	switch {
	case m.sw != nil:
		return "a switchover is in progress (" + m.sw.phase.String() + ")"
	case m.demoting != 0 || m.promoting != 0:
		return "a role change is in progress"
	case m.isPending(opStart) || m.isPending(opStop):
		return "the resources are starting or stopping"
	}
	return ""
}

// resourceFailed decides what a failed check leads to: a local recovery
// while attempts are left, then a handover, or nothing, with the reason.
func (m *Machine) resourceFailed() {
	rf := m.rf
	peer := m.cfg.Peer
	failed := fmt.Sprintf("resource %s fails its check (%s)", rf.name, rf.err)
	if busy := m.resourceBusy(); busy != "" {
		m.note("resource", "busy", KindResource, false, failed+": not acting while "+busy)
		return
	}
	if m.fenced {
		_, why, _ := m.fenceReason()
		m.note("resource", "fenced", KindResource, false, failed+": this node is fenced ("+why+"): no local recovery (a stop would wait on held writes) and no handover")
		return
	}
	allowed := m.cfg.localRecoveries()
	if rf.attempts < allowed {
		n := rf.attempts + 1
		if !m.auto("resource", fmt.Sprintf("recover:%s:%d", rf.name, n), KindResource, fmt.Sprintf("restart %s and the resources after it (local recovery %d of %d): %s", rf.name, n, allowed, failed)) {
			return
		}
		rf.attempts = n
		rf.recovering = m.id(opRecover)
		m.emit(RecoverResources{ID: rf.recovering, From: rf.name, Attempt: n, Reason: failed})
		m.recordTopic("resource", fmt.Sprintf("recover:%s:%d", rf.name, n), KindResource, true,
			fmt.Sprintf("local recovery %d of %d: %s: restarting it and every resource after it", n, allowed, failed))
		return
	}
	cause := fmt.Sprintf("%s after %d local recoveries", failed, rf.attempts)
	if allowed == 0 {
		cause = failed + " (local recovery is off)"
	}
	if code, why := m.handoverBlocker(); code != "" {
		m.note("resource", "stay:"+code, KindResource, false, cause+": staying Primary with the resources as they are, no handover: "+why)
		return
	}
	if !m.auto("resource", "handover", KindResource, "hand over to "+peer+": "+cause) {
		return
	}
	m.recordTopic("resource", "handover", KindResource, true, cause+": handing over to "+peer+" (a switchover: stop resources, drain, demote, "+peer+" promotes)")
	m.startSwitchover("resource " + rf.name + " failed")
}

// handoverBlocker says why the peer cannot take over without losing a
// write or risking two Primaries ("" if it can): it must be heard as a
// Secondary, hold every acknowledged write (sync) or be within the lag
// bound (async), and this node must hold quorum.
func (m *Machine) handoverBlocker() (code, why string) {
	peer, l := m.cfg.Peer, m.local
	switch {
	case m.lost:
		return "peer-lost", fmt.Sprintf("peer %s is lost (%s)", peer, m.silences())
	case !m.peerSeen || m.peer.Role != RoleSecondary:
		return "peer-role", fmt.Sprintf("%s is %s, not a Secondary that could take over", peer, m.peer.Role)
	case !l.Connected:
		return "disconnected", fmt.Sprintf("replication to %s is down: it lacks writes this node acknowledged", peer)
	case l.PeerDisk != DiskUpToDate:
		return "peer-disk", fmt.Sprintf("%s's disk is %s, not UpToDate (lag %d bytes)", peer, l.PeerDisk, l.LagBytes)
	case l.Async && (l.LagBytes > m.cfg.MaxAsyncLagBytes || l.LagTime > m.cfg.MaxAsyncLagTime):
		return "lag", fmt.Sprintf("async target %s is %d bytes / %v behind, beyond the bound of %d bytes / %v", peer, l.LagBytes, l.LagTime, m.cfg.MaxAsyncLagBytes, m.cfg.MaxAsyncLagTime)
	case m.cfg.Witness && !m.holdsContinuousVote():
		return "quorum", "no quorum: " + m.witnessDesc()
	}
	return "", ""
}

// recovered takes a local recovery's result. A failed recovery counts as
// a failed check: the next attempt, or the handover, follows at once.
func (m *Machine) recovered(r ActionResult) {
	rf := m.rf
	if rf == nil || rf.recovering != r.ID {
		return
	}
	rf.recovering = 0
	if r.Err == nil {
		m.record(KindResource, true, fmt.Sprintf("local recovery %d: %s and the resources after it restarted; the next check tells whether it holds", rf.attempts, rf.name))
		return
	}
	rf.err = r.Err.Error()
	m.record(KindResource, false, fmt.Sprintf("local recovery %d of %s failed: %v", rf.attempts, rf.name, r.Err))
	if m.role == RolePrimary {
		m.resourceFailed()
	}
}

func (m *Machine) resourceStatus() *ResourceFailure {
	rf := m.rf
	if rf == nil {
		return nil
	}
	return &ResourceFailure{Resource: rf.name, Error: rf.err, Since: rf.since,
		Recoveries: rf.attempts, MaxRecoveries: m.cfg.localRecoveries(), Recovering: rf.recovering != 0}
}
