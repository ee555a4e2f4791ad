package failover

// The Primary side: when to stop acknowledging writes, when to step down.

import (
	"fmt"
	"time"
)

// twoPrimaries: never two Primaries. The one with the older epoch steps
// down (it is the returning old Primary: the volume resyncs it from the
// newer one). Equal epochs only arise from forced promotions on both
// sides; the node with the greater name steps down, so exactly one does.
func (m *Machine) twoPrimaries() {
	if m.role != RolePrimary || m.lost || m.peer.Role != RolePrimary || m.demoting != 0 || m.sw != nil || m.isPending(opPromote) {
		return
	}
	pe := m.peer.Epoch
	if pe < m.epoch || (pe == m.epoch && m.cfg.Node < m.cfg.Peer) {
		m.note("primary", fmt.Sprintf("peer-older:%d", pe), KindDemote, false,
			fmt.Sprintf("peer %s is also Primary, at epoch %d (this node: %d): it must step down", m.cfg.Peer, pe, m.epoch))
		return
	}
	if m.now.Before(m.demoteRetry) {
		return
	}
	cause := fmt.Sprintf("peer %s is Primary at epoch %d, newer than this node's %d: stepping down (the volume resyncs from it)", m.cfg.Peer, pe, m.epoch)
	if pe == m.epoch {
		cause = fmt.Sprintf("SPLIT BRAIN: both nodes are Primary at epoch %d; %s steps down by name order; writes made here since the split need an operator's resolution", pe, m.cfg.Node)
	}
	if !m.auto("primary", "demote", KindDemote, cause) {
		return
	}
	// Fenced in error mode whatever failover.fencing says, and writes
	// already held fail now: the resources stop next, and an
	// application's shutdown or an unmount whose writes were held would
	// hang until the stop timed out, leaving the demotion stuck behind a
	// busy device. Failing them acknowledges nothing, and the node must
	// not acknowledge any write once it knows of a newer Primary; the
	// demotion would fail held writes anyway.
	if !m.fenced || m.fenceHow != FenceError {
		why := "stepping down for " + m.cfg.Peer + ": writes fail (EIO) so that stopping the resources cannot hang on them"
		m.fence(FenceError, why)
		m.recordTopic("fence", "step-down", KindFence, true, "fenced (error): "+why)
	}
	m.emit(StopResources{ID: m.id(opStop), Reason: "stepping down"})
	m.demoting = m.id(opDemote)
	m.emit(Demote{ID: m.demoting, Reason: cause})
	m.recordTopic("primary", "demote", KindDemote, true, cause)
}

func (m *Machine) primary() {
	if m.demoting != 0 {
		return
	}
	if m.cfg.Witness {
		if c := m.peerBehind(); c != m.claim {
			m.claim, m.claimAt, m.reqAt = c, m.now, time.Time{}
		}
		if m.reqAt.IsZero() || m.now.Sub(m.reqAt) >= m.cfg.HeartbeatInterval {
			// Renew even in maintenance: holding the vote is what keeps
			// the target from taking over.
			m.emit(RequestVote{Epoch: m.epoch, PeerOutdated: m.claim})
			m.reqAt = m.now
		}
		m.adoptGrantEpoch()
	}
	if m.sw != nil {
		m.driveSwitchover()
		return
	}
	if m.forced && m.holdsContinuousVote() {
		m.forced = false
		m.record(KindForce, false, "the witness grants this node the vote again: forced mode over, quorum rules apply")
	}
	code, why, how := m.fenceReason()
	switch {
	case code != "" && (!m.fenced || (how == FenceError && m.fenceHow != FenceError)):
		if !m.auto("fence", code, KindFence, "fence: "+why) {
			return
		}
		m.fence(how, why)
		m.recordTopic("fence", code, KindFence, true, "fenced ("+how.String()+"): "+why)
	case code != "":
		m.note("fence", code, KindFence, false, "still fenced: "+why)
	case m.fenced:
		if !m.auto("fence", "unfence", KindFence, "unfence: "+m.evidence()) {
			return
		}
		m.unfence(m.evidence())
		m.recordTopic("fence", "unfenced", KindFence, true, "unfenced: "+m.evidence())
	default:
		m.confirmed = true
		m.noteServing()
	}
	m.retryStart()
	m.failback()
}

func (m *Machine) fence(how FenceHow, why string) {
	m.forget(opFence, opUnfence)
	m.emit(Fence{ID: m.id(opFence), How: how, Reason: why})
	if !m.fenced {
		m.fencedAt = m.now
	}
	m.fenced, m.fenceHow = true, how
}

func (m *Machine) unfence(why string) {
	m.forget(opFence, opUnfence)
	m.emit(Unfence{ID: m.id(opUnfence), Reason: why})
	m.fenced, m.confirmed = false, true
}

// peerBehind: the peer lacks writes this node acknowledged (sync: the
// replication session is down or the peer is not UpToDate; async: beyond
// the lag bound).
func (m *Machine) peerBehind() bool {
	l := m.local
	if l.Async {
		return l.LagBytes > m.cfg.MaxAsyncLagBytes || l.LagTime > m.cfg.MaxAsyncLagTime
	}
	return !l.Connected || l.PeerDisk != DiskUpToDate
}

// freezing: in sync mode a Primary that lost its replication session
// holds writes until the witness has recorded the peer outdated (DRBD's
// resource-and-stonith fencing policy). Otherwise it could acknowledge
// writes the peer lacks, die, and let the peer be promoted without them:
// with the record, the peer refuses. It lasts one witness round trip.
func (m *Machine) freezing() bool {
	if !m.cfg.Witness || m.local.Async || m.local.Connected || !m.claim {
		return false
	}
	v := m.vote
	return !(m.haveVote && v.Granted && v.PeerOutdated && !m.voteAt.Before(m.claimAt))
}

// fenceReason says why a Primary must not acknowledge writes now ("" if it
// may), and how to fence.
func (m *Machine) fenceReason() (code, why string, how FenceHow) {
	if m.forced {
		return "", "", 0
	}
	how = m.cfg.Fencing
	peer := m.cfg.Peer
	if !m.cfg.Witness {
		if m.confirmed || m.vouched() {
			return "", "", 0
		}
		return "wait-for-all", fmt.Sprintf("started as Primary without having heard %s since: it may have been promoted meanwhile; waiting to hear it as Secondary (or ForcePromote)", peer), FenceSuspend
	}
	v := m.vote
	if m.haveVote && !v.Granted {
		return "denied", fmt.Sprintf("the witness says %s holds the vote (answered %v ago): %s may be Primary", v.Holder, m.now.Sub(m.voteAt), v.Holder), how
	}
	grant := m.haveVote && m.now.Sub(m.voteAt) < m.cfg.FenceAfter()
	if grant && v.Epoch > m.epoch {
		return "lapsed", fmt.Sprintf("the vote passed to another node since this node's epoch %d (witness epoch %d): %s may have been promoted and written; waiting to hear it as Secondary", m.epoch, v.Epoch, peer), how
	}
	switch {
	case !grant && !m.vouched() && !m.confirmed:
		return "startup", fmt.Sprintf("started as Primary: waiting for quorum evidence (a continuous witness grant, or %s heard as Secondary)", peer), FenceSuspend
	case !grant && !m.vouched():
		return "no-quorum", fmt.Sprintf("lost quorum: %s, and %s", m.witnessDesc(), m.peerDesc()), how
	case m.freezing():
		return "freeze", fmt.Sprintf("replication to %s is down: writes held until the witness records %s outdated", peer, peer), FenceSuspend
	}
	return "", "", 0
}

// peerDesc says why the peer does not vouch for this Primary.
func (m *Machine) peerDesc() string {
	peer := m.cfg.Peer
	switch {
	case !m.peerSeen:
		return fmt.Sprintf("%s not heard since this node started (%s)", peer, m.silences())
	case m.now.Sub(m.lastRecv()) >= m.cfg.FenceAfter():
		return fmt.Sprintf("%s not heard for %v on any path (%s)", peer, m.now.Sub(m.lastRecv()), m.silences())
	case m.peer.Role != RoleSecondary:
		return fmt.Sprintf("%s is heard but is %s", peer, m.peer.Role)
	case m.peer.Epoch > m.epoch:
		return fmt.Sprintf("%s is at epoch %d, newer than this node's %d", peer, m.peer.Epoch, m.epoch)
	case !m.peer.Hears:
		return fmt.Sprintf("%s is heard but does not hear this node (one-way loss): it may promote", peer)
	}
	return fmt.Sprintf("%s not heard as Secondary yet a full interval after this node fenced", peer)
}

// vouched: the peer, heard recently, is a Secondary at an epoch no newer
// than ours, so it has not been promoted. After a fence (or at start, or
// after the vote lapsed) only a heartbeat received a full interval later
// counts: one sent before a promotion could still be in flight.
func (m *Machine) vouched() bool {
	if m.peer.Role != RoleSecondary || m.peer.Epoch > m.epoch || !m.peerSeen || !m.peer.Hears {
		return false
	}
	recv := m.lastRecv()
	if m.now.Sub(recv) >= m.cfg.FenceAfter() {
		return false
	}
	var since time.Time
	if m.fenced {
		since = m.fencedAt.Add(m.cfg.HeartbeatInterval)
	}
	if !m.confirmed {
		since = later(since, m.start.Add(m.cfg.HeartbeatInterval))
	}
	if m.haveVote && m.vote.Granted && m.vote.Epoch > m.epoch {
		since = later(since, m.lapsedAt.Add(m.cfg.HeartbeatInterval))
	}
	return !recv.Before(since)
}

// adoptGrantEpoch: the vote lapsed and came back with a higher epoch, but
// the peer vouches that it was not promoted: this node's term continues
// under the new epoch.
func (m *Machine) adoptGrantEpoch() {
	v := m.vote
	if !m.haveVote || !v.Granted || v.Epoch <= m.epoch || m.now.Sub(m.voteAt) >= m.cfg.FenceAfter() || !m.vouched() {
		return
	}
	m.setEpoch(v.Epoch, fmt.Sprintf("adopted witness epoch %d: the vote lapsed but %s is Secondary at epoch %d", v.Epoch, m.cfg.Peer, m.peer.Epoch))
}

func (m *Machine) setEpoch(e uint64, why string) {
	m.epoch, m.lapsedAt = e, time.Time{}
	m.emit(SaveEpoch{Epoch: e})
	m.record(KindEpoch, true, why)
}

func (m *Machine) holdsContinuousVote() bool {
	return m.haveVote && m.vote.Granted && m.vote.Epoch <= m.epoch && m.now.Sub(m.voteAt) < m.cfg.FenceAfter()
}

// evidence says why a Primary may serve.
func (m *Machine) evidence() string {
	switch {
	case m.forced:
		return "forced by the operator"
	case m.cfg.Witness && m.holdsContinuousVote():
		return fmt.Sprintf("the witness grants this node the vote (epoch %d)", m.vote.Epoch)
	case m.vouched():
		return fmt.Sprintf("%s is Secondary at epoch %d", m.cfg.Peer, m.peer.Epoch)
	}
	return "quorum"
}

func (m *Machine) noteServing() {
	witnessSilent := m.cfg.Witness && m.now.Sub(later(m.voteAt, m.start)) >= m.cfg.FenceAfter()
	switch {
	case m.lost && m.cfg.Witness:
		m.note("serving", "peer-lost", KindFence, false, fmt.Sprintf("peer %s lost (%s) but the witness grants this node the vote: keep serving", m.cfg.Peer, m.silences()))
	case m.lost:
		m.note("serving", "peer-lost-no-witness", KindFence, false, fmt.Sprintf("peer %s lost (%s); no witness: keep serving (%s can only be promoted by an operator, who must make sure this node is down)", m.cfg.Peer, m.silences(), m.cfg.Peer))
	case witnessSilent:
		m.note("serving", "witness-lost", KindWitness, false, fmt.Sprintf("%s; peer %s still heard: keep serving", m.witnessDesc(), m.cfg.Peer))
	default:
		m.note("serving", "ok", KindFence, false, "")
	}
}
