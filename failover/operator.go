package failover

// Operator commands (confirm, deny, maintenance, forced promotion), the
// planned switchover and failback.

import (
	"fmt"
	"strings"
	"time"
)

func (m *Machine) onConfirm() {
	if m.intent == nil {
		m.record(KindIntent, false, "Confirm: nothing pending")
		return
	}
	m.intent.Confirmed = true
	m.record(KindIntent, true, "operator confirmed: "+m.intent.Reason)
}

func (m *Machine) onDeny() {
	if m.intent == nil {
		m.record(KindIntent, false, "Deny: nothing pending")
		return
	}
	m.denied = true
	m.withdraw("denied by the operator")
}

func (m *Machine) onMaintenance(on bool) {
	if on == m.maint {
		m.record(KindMode, false, fmt.Sprintf("maintenance already %v", onOff(on)))
		return
	}
	m.maint = on
	m.topics = map[string]string{}
	m.record(KindMode, true, "maintenance "+onOff(on))
	if on && m.intent != nil {
		m.withdraw("maintenance mode")
	}
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func (m *Machine) onForce(accept bool) {
	if m.sw != nil {
		m.record(KindForce, false, "ForcePromote refused: a switchover is in progress ("+m.sw.phase.String()+")")
		return
	}
	switch m.role {
	case RoleSecondary:
		if m.promoting != 0 {
			m.record(KindForce, false, "ForcePromote refused: a promotion is already in progress")
			return
		}
		if !m.lost && m.peer.Role == RolePrimary {
			m.record(KindForce, false, fmt.Sprintf("ForcePromote refused: %s is alive and Primary (heard %v ago): two Primaries would diverge; switch over on %s instead", m.cfg.Peer, m.now.Sub(m.peerAt), m.cfg.Peer))
			return
		}
		if !accept {
			m.record(KindForce, false, "ForcePromote refused without AcceptDataLoss: "+m.lossEstimate())
			return
		}
		m.promote(pkForced, m.vote.Epoch+1, "FORCED PROMOTION by the operator, regardless of quorum and data: "+m.lossEstimate())
	case RolePrimary:
		if !m.fenced {
			m.record(KindForce, false, "ForcePromote: already a serving Primary")
			return
		}
		if !accept {
			_, why, _ := m.fenceReason()
			m.record(KindForce, false, "ForcePromote refused without AcceptDataLoss: this Primary is fenced because "+why)
			return
		}
		m.forced = true
		m.unfence("forced by the operator")
		m.record(KindForce, true, fmt.Sprintf("FORCED UNFENCE by the operator, regardless of quorum: if %s was promoted meanwhile the two copies now diverge", m.cfg.Peer))
	default:
		m.record(KindForce, false, "ForcePromote: local role unknown yet")
	}
}

// lossEstimate says how much data a forced promotion may lose, from the
// last known lag and disk state.
func (m *Machine) lossEstimate() string {
	peer := m.cfg.Peer
	var parts []string
	if !m.peerSeen {
		parts = append(parts, fmt.Sprintf("this node has not heard %s since it started %v ago: %s may hold any amount of newer data", peer, m.now.Sub(m.start), peer))
	} else {
		age := m.now.Sub(m.peerAt)
		parts = append(parts, fmt.Sprintf("%s was last heard %v ago as %s at epoch %d (this node: epoch %d)", peer, age, m.peer.Role, m.peer.Epoch, m.epoch))
		if m.peer.Role == RolePrimary {
			switch {
			case m.local.Async:
				b, t := m.lag()
				parts = append(parts, fmt.Sprintf("last reported lag %d bytes / %v, plus whatever %s acknowledged in the last %v", b, t, peer, age))
			case m.peer.InSync:
				parts = append(parts, fmt.Sprintf("%s reported this node in sync then; writes it acknowledged in the last %v would be lost", peer, age))
			default:
				parts = append(parts, fmt.Sprintf("%s did NOT report this node in sync (lag %d bytes / %v): everything it acknowledged since replication broke would be lost", peer, m.peer.LagBytes, m.peer.LagTime))
			}
		}
	}
	switch d := m.local.Disk; d {
	case DiskUpToDate:
	case DiskInconsistent:
		parts = append(parts, "the local disk is Inconsistent (resync incomplete): it mixes old and new blocks and a filesystem on it may be corrupt")
	default:
		parts = append(parts, "the local disk is "+d.String())
	}
	if m.haveVote && m.vote.Outdated {
		parts = append(parts, "the witness records this node as outdated")
	}
	return strings.Join(parts, "; ")
}

func (m *Machine) onHandover(h Handover) {
	switch {
	case h.From != m.cfg.Peer:
		m.record(KindIgnored, false, fmt.Sprintf("handover from unknown node %q ignored", h.From))
	case m.role != RoleSecondary || m.promoting != 0:
		m.record(KindSwitchover, false, fmt.Sprintf("handover from %s ignored: this node is %s", h.From, m.role))
	case m.local.Disk != DiskUpToDate:
		m.record(KindSwitchover, false, fmt.Sprintf("handover from %s refused: local disk is %s; no node is Primary now: promote %s back by hand", h.From, m.local.Disk, h.From))
	default:
		// The handover is the peer's word that it is now Secondary: it
		// vouches for this node until its next heartbeat says the same.
		m.peer.Role, m.peer.Epoch, m.peer.InSync = RoleSecondary, h.Epoch, false
		m.promote(pkSwitchover, h.Epoch+1, fmt.Sprintf("switchover: %s demoted and handed over", h.From))
	}
}

func (m *Machine) startSwitchover(why string) bool {
	refuse := func(s string) bool {
		m.record(KindSwitchover, false, "switchover ("+why+") refused: "+s)
		return false
	}
	l := m.local
	switch {
	case m.role != RolePrimary:
		return refuse(fmt.Sprintf("switchover runs on the Primary; this node is %s", m.role))
	case m.sw != nil:
		return refuse("already in progress (" + m.sw.phase.String() + ")")
	case m.demoting != 0 || m.promoting != 0:
		return refuse("a role change is in progress")
	case m.lost:
		return refuse(fmt.Sprintf("peer %s is lost (%s)", m.cfg.Peer, m.silences()))
	case !l.Connected:
		return refuse(fmt.Sprintf("target not in sync: replication to %s is down", m.cfg.Peer))
	case l.PeerDisk != DiskUpToDate:
		return refuse(fmt.Sprintf("target not in sync: %s's disk is %s (lag %d bytes)", m.cfg.Peer, l.PeerDisk, l.LagBytes))
	case m.fenced:
		_, r, _ := m.fenceReason()
		return refuse("this node is fenced: " + r)
	}
	// Resources stop first, while writes are still acknowledged (and
	// replicated): an application's shutdown and the unmount of its file
	// system write, and with writes held they would hang until the stop
	// timed out and the switchover aborted. Writes are held only after.
	m.sw = &switchover{phase: swStop, why: why}
	m.sw.id = m.id(opStop)
	m.emit(StopResources{ID: m.sw.id, Reason: "switchover"})
	m.record(KindSwitchover, true, fmt.Sprintf("switchover to %s (%s): stopping resources (writes still acknowledged and replicated)", m.cfg.Peer, why))
	return true
}

func (m *Machine) driveSwitchover() {
	sw := m.sw
	switch sw.phase {
	case swStop:
		// Unfenced while the resources stop, so the quorum rules still
		// apply: fence at once if they say so (the drain then aborts).
		if code, why, how := m.fenceReason(); code != "" && !m.fenced {
			m.fence(how, why)
			m.recordTopic("fence", code, KindFence, true, "fenced ("+how.String()+") while the switchover stops resources: "+why)
		}
		return
	case swDrain:
	default:
		return // waiting for an action's result
	}
	if code, why, _ := m.fenceReason(); code == "denied" || code == "lapsed" {
		m.abortSwitchover("quorum lost: " + why)
		return
	}
	l := m.local
	switch {
	case m.lost:
		m.abortSwitchover(fmt.Sprintf("peer %s lost during the drain", m.cfg.Peer))
	case l.Connected && l.PeerDisk == DiskUpToDate && l.LagBytes == 0:
		sw.phase, sw.id = swDemote, m.id(opDemote)
		m.emit(Demote{ID: sw.id, Reason: "switchover to " + m.cfg.Peer})
		m.record(KindSwitchover, true, fmt.Sprintf("%s has every write: demoting", m.cfg.Peer))
	case !m.now.Before(sw.deadline):
		m.abortSwitchover(fmt.Sprintf("target not in sync after %v: connected %v, %s's disk %s, lag %d bytes", m.cfg.SwitchoverTimeout, l.Connected, m.cfg.Peer, l.PeerDisk, l.LagBytes))
	}
}

func (m *Machine) switchoverResult(o op, err error) {
	sw := m.sw
	switch o {
	case opStop:
		sw.stopped = true
		if err != nil {
			m.abortSwitchover(fmt.Sprintf("stopping resources failed: %v", err))
			return
		}
		sw.phase, sw.deadline = swDrain, m.now.Add(m.cfg.SwitchoverTimeout)
		if !m.fenced {
			m.fence(FenceSuspend, "switchover: holding writes until "+m.cfg.Peer+" has them all")
		}
		m.record(KindSwitchover, true, fmt.Sprintf("resources stopped: writes held while %s catches up (lag %d bytes)", m.cfg.Peer, m.local.LagBytes))
	case opDemote:
		if err != nil {
			m.abortSwitchover(fmt.Sprintf("demotion failed: %v", err))
			return
		}
		m.stepDown()
		if m.cfg.Witness {
			sw.phase, sw.id = swRelease, m.id(opRelease)
			m.emit(ReleaseVote{ID: sw.id, To: m.cfg.Peer})
			return
		}
		m.finishSwitchover()
	case opRelease:
		if err != nil {
			m.record(KindSwitchover, false, fmt.Sprintf("could not hand the vote to %s: %v; it gets it when this node's lease runs out", m.cfg.Peer, err))
		}
		m.finishSwitchover()
	}
}

func (m *Machine) finishSwitchover() {
	if m.sw.resource {
		m.gaveUpAt = m.now
	}
	m.emit(PeerPromote{ID: m.id(opPeerPromote), Epoch: m.epoch})
	m.record(KindSwitchover, true, fmt.Sprintf("demoted (%s); asked %s to promote", m.sw.why, m.cfg.Peer))
	m.sw = nil
}

// abortSwitchover restarts the resources if they were stopped and lifts
// the switchover's hold on writes, unless the quorum rules want the node
// fenced anyway (then the next evaluation unfences it when they allow).
func (m *Machine) abortSwitchover(why string) {
	if m.sw.stopped {
		m.emit(StartResources{ID: m.id(opStart), Reason: "switchover aborted"})
	}
	m.sw = nil
	if code, _, _ := m.fenceReason(); m.fenced && code == "" {
		m.unfence("switchover aborted")
	}
	m.record(KindSwitchover, false, "switchover aborted: "+why)
}

// failback gives the volume back to the node this one took over from, as
// the policy allows, once that node has been in sync for a detection
// timeout (so that a node flapping back and forth is not chased).
func (m *Machine) failback() {
	fb := m.cfg.Failback
	if fb.Policy == FailbackNever || m.failedOverFrom != m.cfg.Peer || m.sw != nil || m.fenced {
		return
	}
	l := m.local
	if m.lost || m.peer.Role != RoleSecondary || !l.Connected || l.PeerDisk != DiskUpToDate || l.LagBytes != 0 {
		m.syncedSince = time.Time{}
		return
	}
	if m.syncedSince.IsZero() {
		m.syncedSince = m.now
	}
	if m.now.Sub(m.syncedSince) < m.cfg.DetectTimeout() {
		return
	}
	if fb.Policy == FailbackWindow {
		key, in := m.window()
		if !in {
			m.note("failback", "outside", KindFailback, false, fmt.Sprintf("%s is back in sync; failback waits for the window %02d:00-%02d:00", m.cfg.Peer, fb.StartHour, fb.EndHour))
			return
		}
		if key != m.fbKey {
			m.fbKey, m.fbCount = key, 0
		}
		if m.fbCount >= fb.Max {
			m.note("failback", "cap:"+key, KindFailback, false, fmt.Sprintf("failback cap of %d per window reached (window of %s)", fb.Max, key))
			return
		}
	}
	if !m.auto("failback", "go", KindFailback, "fail back to "+m.cfg.Peer) {
		return
	}
	m.fbCount++
	m.record(KindFailback, true, fmt.Sprintf("%s back in sync for %v: failing back (policy %s)", m.cfg.Peer, m.now.Sub(m.syncedSince), fb.Policy))
	// Should the switchover fail, the next attempt waits for another
	// detection timeout in sync.
	m.syncedSince = time.Time{}
	m.startSwitchover("failback to " + m.cfg.Peer)
}

// window reports whether now is inside the failback window, and names the
// window occurrence (the date it started).
func (m *Machine) window() (key string, in bool) {
	fb := m.cfg.Failback
	h := m.now.Hour()
	day := m.now
	if fb.StartHour < fb.EndHour {
		in = h >= fb.StartHour && h < fb.EndHour
	} else {
		in = h >= fb.StartHour || h < fb.EndHour
		if h < fb.EndHour {
			day = day.AddDate(0, 0, -1)
		}
	}
	return day.Format("2006-01-02"), in
}
