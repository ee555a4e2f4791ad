package failover

// A Primary whose resource fails its check: local recovery first (restart
// the resource and those after it, as LifeKeeper does), then a handover
// to the peer, when the peer could take the service without losing a
// write; otherwise the node stays as it is and says why.
//
// A chain that fails to start (after a promotion, the abort of a
// switchover, an operator's promotion) takes the same path: it rolled
// back, so nothing runs and no check will ever fail; local recovery
// starts it again, then the node hands over, or stays Primary (the
// volume still served, so no write is stranded) and starts it again
// every StartRetryInterval until it comes up or a handover becomes
// possible. A node that handed over for a resource failure hands over for
// one no more within HandoverHold, so that the service cannot bounce
// between two nodes whose resources both fail.

import (
	"errors"
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
	// recovering is the RecoverResources, or for a chain that is down
	// the StartResources, in flight (0: none).
	recovering ActionID
	// down: the chain failed to start and rolled back.
	down bool
	// retries: starts since the local recoveries ran out; retryAt: when
	// the next is due (zero: none planned).
	retries int
	retryAt time.Time
}

// desc says what failed, for decisions.
func (rf *resourceFailure) desc() string {
	if !rf.down {
		return fmt.Sprintf("resource %s fails its check (%s)", rf.name, rf.err)
	}
	if rf.name == "" {
		return fmt.Sprintf("the resources failed to start (%s)", rf.err)
	}
	return fmt.Sprintf("resource %s failed to start (%s)", rf.name, rf.err)
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
	// Recovering: a local recovery (or a retried start) is running.
	Recovering bool
	// Down: the chain failed to start and rolled back: none of it runs
	// (Resource is empty when the start error named no resource).
	Down bool
	// Retries counts the starts tried since the local recoveries ran
	// out; NextRetry is when the next one is due (zero: none planned).
	Retries   int
	NextRetry time.Time
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
	if m.rf != nil && m.rf.down {
		return // a chain that failed to start is not checked: a late check
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
	failed := rf.desc()
	if rf.down {
		// Whatever follows, a chain that is down is started again in
		// due course (say, once the node is unfenced) unless this
		// decision acts at once.
		rf.retryAt = m.now.Add(m.cfg.StartRetryInterval)
	}
	if busy := m.resourceBusy(); busy != "" {
		m.note("resource", "busy", KindResource, false, failed+": not acting while "+busy)
		return
	}
	if m.fenced {
		_, why, _ := m.fenceReason()
		if rf.down {
			m.note("resource", "fenced", KindResource, false, fmt.Sprintf("%s: this node is fenced (%s): the resources are started again once it is not, no handover", failed, why))
			return
		}
		m.note("resource", "fenced", KindResource, false, failed+": this node is fenced ("+why+"): no local recovery (a stop would wait on held writes) and no handover")
		return
	}
	allowed := m.cfg.localRecoveries()
	if rf.attempts < allowed {
		n := rf.attempts + 1
		what := fmt.Sprintf("restart %s and the resources after it", rf.name)
		if rf.down {
			what = "start the resources again"
		}
		if !m.auto("resource", fmt.Sprintf("recover:%s:%d", rf.name, n), KindResource, fmt.Sprintf("%s (local recovery %d of %d): %s", what, n, allowed, failed)) {
			return
		}
		rf.attempts = n
		if rf.down {
			rf.retryAt = time.Time{}
			rf.recovering = m.id(opStart)
			m.emit(StartResources{ID: rf.recovering, Reason: fmt.Sprintf("local recovery %d of %d: %s", n, allowed, failed)})
			m.recordTopic("resource", fmt.Sprintf("recover:%s:%d", rf.name, n), KindResource, true,
				fmt.Sprintf("local recovery %d of %d: %s: starting the resources again", n, allowed, failed))
			return
		}
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
	code, why := m.handoverBlocker()
	if code == "" {
		code, why = m.handoverHeld()
	}
	if code != "" {
		if rf.down {
			m.note("resource", "stay:"+code, KindResource, false, fmt.Sprintf("%s: staying Primary with the resources down (the volume still served), starting them again every %v; no handover: %s", cause, m.cfg.StartRetryInterval, why))
			return
		}
		m.note("resource", "stay:"+code, KindResource, false, cause+": staying Primary with the resources as they are, no handover: "+why)
		return
	}
	if !m.auto("resource", "handover", KindResource, "hand over to "+peer+": "+cause) {
		return
	}
	m.recordTopic("resource", "handover", KindResource, true, cause+": handing over to "+peer+" (a switchover: stop resources, drain, demote, "+peer+" promotes)")
	if m.startSwitchover("resource " + rf.name + " failed") {
		// Remembered once the service has moved (finishSwitchover): an
		// aborted handover moved nothing. A chain that is down keeps its
		// retry for that case.
		m.sw.resource = true
	}
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

// handoverHeld says why this node may not hand over for a resource
// failure because it already did so lately ("" if it may).
func (m *Machine) handoverHeld() (code, why string) {
	if m.gaveUpAt.IsZero() || m.now.Sub(m.gaveUpAt) >= m.cfg.HandoverHold {
		return "", ""
	}
	return "held", fmt.Sprintf("this node handed the service over to %s for a resource failure %v ago, and it came back: no second such handover within %v (HandoverHold), so that it does not bounce between two nodes whose resources fail; mirrord switchover moves it by hand", m.cfg.Peer, m.now.Sub(m.gaveUpAt), m.cfg.HandoverHold)
}

// started takes the result of a start of the chain: the machine's own
// after a promotion or an aborted switchover, or a local recovery or
// retry of a chain that is down.
func (m *Machine) started(r ActionResult) {
	rf := m.rf
	mine := rf != nil && rf.recovering == r.ID
	if mine {
		rf.recovering = 0
	}
	if r.Err == nil {
		if rf != nil && rf.down {
			m.rf = nil
			delete(m.topics, "resource")
			m.record(KindResource, true, fmt.Sprintf("the resources are up again: %s since %v ago; %d local recoveries, %d retries", rf.desc(), m.now.Sub(rf.since), rf.attempts, rf.retries))
		}
		return
	}
	switch {
	case !mine:
		m.record(KindPromote, false, fmt.Sprintf("resources failed to start: %v", r.Err))
	case rf.retries == 0:
		// A failed retry says nothing new: the standing decision to stay
		// is recorded once, and status counts the retries.
		m.record(KindResource, false, fmt.Sprintf("local recovery %d: starting the resources failed: %v", rf.attempts, r.Err))
	}
	m.startFailed(r.Err)
}

// startFailed takes a failed start of the chain: it rolled back, so
// nothing runs and no check will come. A node that is stepping down or
// handing over has nothing to start.
func (m *Machine) startFailed(err error) {
	if m.role != RolePrimary || m.demoting != 0 || m.sw != nil {
		return
	}
	rf := m.rf
	if rf == nil {
		rf = &resourceFailure{since: m.now}
		m.rf = rf
	}
	if rf.recovering != 0 {
		return // a local recovery in flight decides
	}
	rf.down = true
	rf.name, rf.err = "", err.Error()
	var n ResourceNamer
	if errors.As(err, &n) {
		rf.name = n.FailedResource()
	}
	m.resourceFailed()
}

// retryStart starts a chain that is down again once its retry is due;
// a local recovery that was put off (the start failed while the node was
// fenced, as a freshly promoted one is until the witness records its peer
// outdated) runs as soon as the node may act.
func (m *Machine) retryStart() {
	rf := m.rf
	if rf == nil || !rf.down || rf.recovering != 0 || rf.retryAt.IsZero() || m.fenced || m.resourceBusy() != "" {
		return
	}
	if rf.attempts < m.cfg.localRecoveries() {
		m.resourceFailed()
		return
	}
	if m.now.Before(rf.retryAt) {
		return
	}
	if !m.auto("resource", "retry", KindResource, "start the resources again: "+rf.desc()) {
		return
	}
	rf.retryAt = time.Time{}
	rf.retries++
	rf.recovering = m.id(opStart)
	m.emit(StartResources{ID: rf.recovering, Reason: fmt.Sprintf("retry %d: %s", rf.retries, rf.desc())})
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
		Recoveries: rf.attempts, MaxRecoveries: m.cfg.localRecoveries(), Recovering: rf.recovering != 0,
		Down: rf.down, Retries: rf.retries, NextRetry: rf.retryAt}
}
