package failover

// The target side: when a Secondary takes over a lost Primary.

import (
	"fmt"
	"time"
)

// secondary: a Secondary in sync with its Primary holds the Primary's
// data, so it takes the Primary's epoch, lower or higher: a Secondary left
// above its Primary (it crashed between SaveEpoch and Promote) would
// otherwise never vouch for it.
func (m *Machine) secondary() {
	if !m.lost && m.peer.Role == RolePrimary && m.peer.InSync && m.local.Disk == DiskUpToDate && m.peer.Epoch != m.epoch {
		m.setEpoch(m.peer.Epoch, fmt.Sprintf("adopted epoch %d: in sync with Primary %s", m.peer.Epoch, m.cfg.Peer))
	}
	if m.promoting != 0 {
		return
	}
	if !m.lost {
		if m.intent != nil {
			m.withdraw("peer " + m.cfg.Peer + " is back")
		}
		return
	}
	m.candidate()
}

// candidate decides whether a Secondary whose peer is lost takes over.
func (m *Machine) candidate() {
	if code, why := m.ineligible(); code != "" {
		if m.intent != nil {
			m.withdraw(why)
		}
		m.note("promote", code, KindNoPromote, false, "did not promote: "+why)
		return
	}
	if !m.cfg.Witness {
		m.note("promote", "no-witness", KindNoPromote, false, fmt.Sprintf("no witness: automatic failover disabled (confirm-only): peer %s lost (%s) but this node cannot tell a dead peer from a cut link", m.cfg.Peer, m.silences()))
		if m.maint {
			m.note("intent", "maint", KindIntent, false, "maintenance: would announce an intent to promote")
			return
		}
		if m.decideIntent(time.Time{}, fmt.Sprintf("promote %s: %s lost on every path and no witness; confirm only if %s is down or fenced", m.cfg.Node, m.cfg.Peer, m.cfg.Peer)) {
			m.promote(pkFailover, 0, fmt.Sprintf("operator confirmed: promoting (peer %s lost: %s; no witness)", m.cfg.Peer, m.silences()))
		}
		return
	}
	if m.maint {
		m.note("promote", "maint", KindNoPromote, false, fmt.Sprintf("maintenance: would ask the witness for the vote and promote (peer %s lost: %s; disk %s)", m.cfg.Peer, m.silences(), m.local.Disk))
		return
	}
	// Ask every tick while a dead Primary's lease may be running out (the
	// first answer is often "still held"), then every interval: a target
	// cut off from a live Primary asks for hours.
	every := m.cfg.HeartbeatInterval
	if m.now.Sub(m.lostAt) < m.cfg.LeaseTTL()+m.cfg.HeartbeatInterval && !(m.haveVote && m.vote.Granted && !m.voteAt.Before(m.lostAt)) {
		every = m.cfg.TickInterval
	}
	if m.reqAt.IsZero() || m.now.Sub(m.reqAt) >= every {
		m.emit(RequestVote{Epoch: m.epoch})
		m.reqAt = m.now
	}
	if code, why := m.quorum(); code == "asking" {
		m.note("promote", code, KindNoPromote, false, why)
		return
	} else if code != "" {
		m.note("promote", code, KindNoPromote, false, "did not promote: "+why)
		return
	}
	cause := fmt.Sprintf("peer %s lost on every path (%s); the witness granted this node the vote %v ago (epoch %d); disk %s%s", m.cfg.Peer, m.silences(), m.now.Sub(m.voteAt), m.vote.Epoch, m.local.Disk, m.lagDesc())
	if m.confirm && !m.decideIntent(m.now.Add(m.cfg.ConfirmTimeout), "promote "+m.cfg.Node+": "+cause) {
		return
	}
	m.promote(pkFailover, m.vote.Epoch, "promoting: "+cause)
}

// ineligible lists what rules a promotion out before quorum is asked.
func (m *Machine) ineligible() (code, why string) {
	peer := m.cfg.Peer
	switch {
	case m.now.Before(m.retryAt):
		return "retry", fmt.Sprintf("the last promotion failed; retrying at %s", m.retryAt.Format(time.RFC3339Nano))
	case !m.peerSeen:
		return "wait-for-all", fmt.Sprintf("this node has not heard %s since it started %v ago: peer may hold newer data; use ForcePromote", peer, m.now.Sub(m.start))
	case m.peer.Role != RolePrimary:
		return "peer-not-primary", fmt.Sprintf("%s was %s when last heard: there is no Primary to replace", peer, m.peer.Role)
	case m.peer.Epoch > m.epoch:
		return "stale-epoch", fmt.Sprintf("%s was Primary at epoch %d but this node holds epoch %d: peer may hold newer data; use ForcePromote", peer, m.peer.Epoch, m.epoch)
	}
	switch d := m.local.Disk; {
	case d == DiskInconsistent:
		return "inconsistent", "local disk is Inconsistent (a resync did not finish): an Inconsistent disk is never promoted; use ForcePromote only to salvage data"
	case d == DiskUpToDate, d == DiskConsistent && m.local.Async:
	default:
		return "disk", fmt.Sprintf("local disk is %s, not UpToDate", d)
	}
	if !m.local.Async && !m.peer.InSync {
		return "not-in-sync", fmt.Sprintf("%s did not report this node in sync at its last heartbeat (%v ago, lag %d bytes): writes it acknowledged may be missing here; use ForcePromote", peer, m.now.Sub(m.peerAt), m.peer.LagBytes)
	}
	if m.local.Async {
		b, t := m.lag()
		if b > m.cfg.MaxAsyncLagBytes || t > m.cfg.MaxAsyncLagTime {
			return "lag", fmt.Sprintf("async target was %d bytes / %v behind at %s's last heartbeat (%v ago), beyond the bound of %d bytes / %v; use ForcePromote to accept the loss", b, t, peer, m.now.Sub(m.peerAt), m.cfg.MaxAsyncLagBytes, m.cfg.MaxAsyncLagTime)
		}
	}
	return "", ""
}

// quorum: does this node hold a vote granted after the peer was lost?
func (m *Machine) quorum() (code, why string) {
	v := m.vote
	switch {
	case (!m.haveVote || m.voteAt.Before(m.lostAt)) && m.now.Sub(m.lostAt) < m.cfg.FenceAfter():
		return "asking", fmt.Sprintf("peer %s lost: asking the witness for the vote", m.cfg.Peer)
	case !m.haveVote || m.voteAt.Before(m.lostAt):
		return "no-vote", fmt.Sprintf("no vote from the witness since the peer was lost %v ago: no quorum", m.now.Sub(m.lostAt))
	case !v.Granted:
		return "denied:" + v.Holder, fmt.Sprintf("the witness says %s holds the vote: it still reaches the witness, so it keeps serving", v.Holder)
	case m.now.Sub(m.voteAt) >= m.cfg.FenceAfter():
		return "vote-stale", fmt.Sprintf("the witness last answered %v ago: no quorum", m.now.Sub(m.voteAt))
	case v.Outdated:
		return "outdated", fmt.Sprintf("the witness records this node as outdated: %s acknowledged writes it lacks; use ForcePromote to accept the loss", m.cfg.Peer)
	case v.Epoch > m.epoch+1:
		return "epoch", fmt.Sprintf("witness epoch %d is more than one ahead of this node's %d: a Primary this node never synced with may exist; use ForcePromote", v.Epoch, m.epoch)
	}
	return "", ""
}

// decideIntent announces an intent once and reports whether it has been
// confirmed (or timed out with Proceed).
func (m *Machine) decideIntent(deadline time.Time, reason string) bool {
	if m.denied {
		m.note("promote", "denied", KindNoPromote, false, "did not promote: the operator denied it (or it timed out with default action abandon)")
		return false
	}
	if m.intent == nil {
		m.intent = &Intent{Want: "promote", Since: m.now, Deadline: deadline, Reason: reason}
		m.emit(AnnounceIntent{Want: "promote", Deadline: deadline, Reason: reason})
		def := "no default action: without a witness the agent never proceeds on its own"
		if !deadline.IsZero() {
			def = fmt.Sprintf("default action %s in %v", m.cfg.DefaultConfirmAction, m.cfg.ConfirmTimeout)
		}
		m.record(KindIntent, true, fmt.Sprintf("announced intent: %s; Confirm or Deny (%s)", reason, def))
		return false
	}
	if m.intent.Confirmed {
		return true
	}
	if !m.intent.Deadline.IsZero() && !m.now.Before(m.intent.Deadline) {
		if m.cfg.DefaultConfirmAction == Proceed {
			m.record(KindIntent, true, fmt.Sprintf("no answer within %v: default action proceed", m.cfg.ConfirmTimeout))
			return true
		}
		m.denied = true
		m.withdraw(fmt.Sprintf("no answer within %v: default action abandon", m.cfg.ConfirmTimeout))
	}
	return false
}

func (m *Machine) withdraw(why string) {
	m.intent = nil
	m.emit(WithdrawIntent{Reason: why})
	m.record(KindIntent, false, "intent withdrawn: "+why)
}

// promote emits the promotion. The new epoch is above anything this node
// knows of, and equals the witness's token when a vote was granted.
func (m *Machine) promote(kind promoteKind, minEpoch uint64, cause string) {
	e := max(m.epoch+1, minEpoch, m.peer.Epoch+1)
	m.preEpoch, m.epoch = m.epoch, e
	m.emit(SaveEpoch{Epoch: e})
	m.promoting = m.id(opPromote)
	m.promoteKind = kind
	m.emit(Promote{ID: m.promoting, Force: kind == pkForced, Reason: cause})
	m.intent = nil
	k := KindPromote
	if kind == pkForced {
		k = KindForce
	}
	m.record(k, true, cause+fmt.Sprintf(" (epoch %d)", e))
}
