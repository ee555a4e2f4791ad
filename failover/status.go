package failover

import "time"

// Status is the machine's view, for `mirrord status` and the event stream.
type Status struct {
	Node        string
	Mode        Mode
	Maintenance bool
	Role        Role
	Disk        DiskState
	Epoch       uint64
	Fenced      bool
	// Forced: serving by ForcePromote, quorum rules suspended.
	Forced bool
	// ServeUntil is when a serving Primary fences if no further quorum
	// evidence arrives (zero: no deadline). The runner arms the volume's
	// watchdog with it, so that a hung agent cannot leave a Primary
	// writing after its lease ran out.
	ServeUntil time.Time
	Peer       PeerStatus
	Quorum     QuorumStatus
	Intent     *Intent
	// Switchover is the phase of a planned switchover ("" if none).
	Switchover string
	// ResourceFailure is a failed resource check being dealt with (local
	// recovery, handover, or neither and why: see Last and the history).
	ResourceFailure *ResourceFailure
	// Last is the last decision recorded.
	Last Decision
}

// PeerStatus is the peer as this node sees it.
type PeerStatus struct {
	Node  string
	State PathState
	// Seen: heard at least once since this node started.
	Seen     bool
	LastSeen time.Time
	LostAt   time.Time // zero unless lost
	Role     Role
	Disk     DiskState
	Epoch    uint64
	InSync   bool
	LagBytes int64
	LagTime  time.Duration
	Paths    []PathStatus
}

// PathStatus is one heartbeat path.
type PathStatus struct {
	Name     string
	State    PathState
	LastSeen time.Time // zero: never
	Silent   time.Duration
}

// QuorumStatus is the witness's last answer.
type QuorumStatus struct {
	Configured bool
	Answered   bool
	Holder     string
	Granted    bool
	Epoch      uint64
	At         time.Time
}

// Status reports the machine's state.
func (m *Machine) Status() Status {
	f := m.facts()
	s := Status{
		Node: m.cfg.Node, Mode: m.cfg.Mode, Maintenance: m.maint,
		Role: m.role, Disk: m.local.Disk, Epoch: m.epoch, Fenced: m.fenced, Forced: m.forced,
		Peer: PeerStatus{
			Node: m.cfg.Peer, Seen: m.peerSeen, LastSeen: m.lastRecv(),
			Role: m.peer.Role, Disk: m.peer.Disk, Epoch: m.peer.Epoch, InSync: m.peer.InSync,
			LagBytes: m.peer.LagBytes, LagTime: m.peer.LagTime, Paths: f.Paths,
		},
		Quorum: QuorumStatus{Configured: m.cfg.Witness, Answered: m.haveVote, Holder: m.vote.Holder,
			Granted: m.vote.Granted, Epoch: m.vote.Epoch, At: m.voteAt},
		Last: m.last, ResourceFailure: m.resourceStatus(),
	}
	s.Peer.State = Lost
	for _, p := range f.Paths {
		if p.State < s.Peer.State {
			s.Peer.State = p.State
		}
	}
	if m.lost {
		s.Peer.LostAt = m.lostAt
	}
	if m.intent != nil {
		in := *m.intent
		s.Intent = &in
	}
	if m.sw != nil {
		s.Switchover = m.sw.phase.String()
	}
	if m.role == RolePrimary && !m.fenced && !m.forced && m.cfg.Witness {
		var ev time.Time
		if m.holdsContinuousVote() {
			ev = m.voteAt
		}
		if m.vouched() {
			ev = later(ev, m.lastRecv())
		}
		if !ev.IsZero() {
			s.ServeUntil = ev.Add(m.cfg.FenceAfter())
		}
	}
	return s
}
