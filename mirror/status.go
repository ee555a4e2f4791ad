package mirror

import (
	"sync"
	"time"
)

// Status is a point-in-time view of the volume, shaped like drbdadm status.
type Status struct {
	Volume         string      `json:"volume"`
	Node           string      `json:"node"`
	Role           string      `json:"role"`
	Disk           string      `json:"disk"`
	SizeBytes      int64       `json:"size_bytes"`
	OutOfSyncBytes int64       `json:"out_of_sync_bytes"`
	Generations    string      `json:"generations,omitempty"`
	Peer           *PeerStatus `json:"peer,omitempty"`
	// UndoBytes is the undo log of a sync target whose last consistent
	// image is being overwritten by a resync: promoting rolls it back.
	UndoBytes int64 `json:"undo_bytes,omitempty"`
	// UndoLimitBytes is the undo log's cap (peer.undo-max-size), shown
	// while a log is open; a catch-up pauses rather than pass it.
	UndoLimitBytes int64 `json:"undo_limit_bytes,omitempty"`
	// Fence is the failover agent's write fence: suspend or error ("" when
	// writes pass).
	Fence string `json:"fence,omitempty"`
}

// PeerStatus describes the replication link.
type PeerStatus struct {
	Node           string        `json:"node"`
	Address        string        `json:"address,omitempty"`
	Mode           string        `json:"mode"`
	Connection     string        `json:"connection"`
	Replication    string        `json:"replication"`
	PeerRole       string        `json:"peer_role"`
	PeerDisk       string        `json:"peer_disk"`
	SplitBrain     bool          `json:"split_brain"`
	InFlightWrites int           `json:"in_flight_writes"`
	InFlightBytes  int64         `json:"in_flight_bytes"`
	SentBytes      uint64        `json:"sent_bytes"`
	ReceivedBytes  uint64        `json:"received_bytes"`
	ResyncBytes    uint64        `json:"resync_bytes"`
	Resync         *ResyncStatus `json:"resync,omitempty"`
	Reason         string        `json:"reason,omitempty"`
	// LagBytes and LagSeconds: how far the peer is behind this Primary
	// (see Volume.Lag).
	LagBytes   int64   `json:"lag_bytes"`
	LagSeconds float64 `json:"lag_seconds"`
	// MaxLagBytes, MaxLagSeconds and LagPolicy are the configured bound
	// (0: none); LagOverBound reports the last sample over it.
	MaxLagBytes   int64   `json:"max_lag_bytes,omitempty"`
	MaxLagSeconds float64 `json:"max_lag_seconds,omitempty"`
	LagPolicy     string  `json:"lag_policy,omitempty"`
	LagOverBound  bool    `json:"lag_over_bound,omitempty"`
	// JournalBytes is the async journal in use (records not yet
	// acknowledged), JournalCapacity its size (0: no journal).
	JournalBytes    int64          `json:"journal_bytes"`
	JournalCapacity int64          `json:"journal_capacity,omitempty"`
	Journal         *JournalStatus `json:"journal,omitempty"`
	Transport       Transport      `json:"transport"`
}

// JournalStatus describes the async journal.
type JournalStatus struct {
	// QueuedBytes is the data not yet sent (a trim or zero counts its
	// frame, not its range); HighWater the most of the ring ever in use.
	QueuedBytes   int64  `json:"queued_bytes"`
	Records       int    `json:"records"`
	HighWater     int64  `json:"high_water_bytes"`
	SpilledWrites uint64 `json:"spilled_writes"`
	SpilledBytes  uint64 `json:"spilled_bytes"`
	FullEvents    uint64 `json:"full_events"`
	// Kept: the peer is away and the journal keeps the stream for a
	// replay; Replays counts reconnects that replayed it instead of a
	// bitmap resync.
	Kept    bool   `json:"kept,omitempty"`
	Replays uint64 `json:"replays"`
}

// Transport describes the link's security, compression and bandwidth.
type Transport struct {
	TLS bool `json:"tls"`
	// Compression is "zstd" while the session compresses, else "off".
	Compression string `json:"compression"`
	// CompressionRatio is data bytes offered over bytes sent for them, over
	// the link's life (1: nothing saved); DataBytes and WireDataBytes are its
	// terms.
	CompressionRatio float64 `json:"compression_ratio"`
	DataBytes        uint64  `json:"data_bytes"`
	WireDataBytes    uint64  `json:"wire_data_bytes"`
	// RateLimit is the cap on what this node sends, bytes/s (0: none), and
	// ResyncShare resync's share of it while live writes flow.
	RateLimit   int64 `json:"rate_limit_bytes_per_s"`
	ResyncShare int   `json:"resync_share_percent"`
	// Rates over the last few seconds: everything on the wire (after TLS
	// and compression), and live and resync frames before compression.
	WireRate   float64 `json:"wire_rate_bytes_per_s"`
	LiveRate   float64 `json:"live_rate_bytes_per_s"`
	ResyncRate float64 `json:"resync_rate_bytes_per_s"`
}

// Status reports the volume's state.
func (v *Volume) Status() Status {
	st := Status{
		Volume: v.name, Node: v.node, Role: v.Role().String(), Disk: v.Disk().String(),
		SizeBytes: v.size, OutOfSyncBytes: v.dirty.DirtyBytes(),
	}
	if m := FenceMode(v.fc.mode.Load()); m != Unfenced {
		st.Fence = m.String()
	}
	if v.meta != nil {
		st.Generations = genString(v.meta.snapshot().gen)
	}
	st.UndoBytes = v.undoBytes()
	if v.undo.Load() != nil {
		st.UndoLimitBytes = max(0, v.undoLimit())
	}
	if v.link == nil {
		return st
	}
	l := v.link
	ps := &PeerStatus{Node: l.cfg.Node, Address: l.cfg.Address, Mode: l.cfg.Mode.String(),
		PeerRole: RoleUnknown.String(), PeerDisk: DiskDUnknown.String(), Replication: string(ReplOff),
		SentBytes: l.stats.sentBytes.Load(), ReceivedBytes: l.stats.recvBytes.Load(), ResyncBytes: l.stats.resyncBytes.Load(),
	}
	l.mu.Lock()
	ps.Connection = string(l.conn)
	ps.SplitBrain = l.splitBrain
	ps.Reason = l.reason
	s := l.sess.Load()
	if s != nil && l.peerHello != nil {
		ps.PeerRole = Role(l.peerHello.Role).String()
		ps.PeerDisk = DiskState(l.peerHello.Disk).String()
	}
	l.mu.Unlock()
	if s != nil {
		if s.incoming != nil && s.replState() == ReplSyncTarget {
			// What this disk still lacks is the source's list, not ours.
			st.OutOfSyncBytes = s.incoming.DirtyBytes()
		}
		s.qmu.Lock()
		ps.Replication = string(s.repl)
		for _, e := range s.tl {
			if e.kind == entWrite {
				ps.InFlightWrites++
				ps.InFlightBytes += e.cost
			}
		}
		s.qmu.Unlock()
		switch ReplState(ps.Replication) {
		case ReplSyncSource, ReplSyncTarget:
			ps.Resync = s.resync.status(st.OutOfSyncBytes)
		case ReplBehind:
			// Counted against the total the source announced
			// (FrameCatchUp); none from an older source.
			ps.Resync = s.resync.status(s.resync.left())
		}
		// The target learns its peer is UpToDate from the resync's end.
		if ps.Replication == string(ReplSyncSource) {
			ps.PeerDisk = DiskInconsistent.String()
		}
	}
	bytes, age := v.Lag()
	ps.LagBytes, ps.LagSeconds = bytes, age.Seconds()
	if l.bounded() {
		ps.MaxLagBytes, ps.MaxLagSeconds = l.cfg.MaxLagBytes, l.cfg.MaxLagTime.Seconds()
		ps.LagPolicy = l.cfg.LagPolicy.String()
		ps.LagOverBound = l.lagOver()
	}
	if j := l.journal; j != nil {
		ps.Journal = j.status()
		ps.JournalBytes, ps.JournalCapacity = j.usedBytes(), j.capacity
	}
	ps.Transport = l.transport(s)
	st.Peer = ps
	return st
}

func (l *link) transport(s *session) Transport {
	z := l.zstd.Stats()
	t := Transport{
		TLS: l.cfg.TLS != nil, Compression: "off",
		CompressionRatio: z.Ratio(), DataBytes: z.RawBytes, WireDataBytes: z.WireBytes,
		RateLimit: l.shaper.limit.Load(), ResyncShare: int(l.shaper.share.Load()),
		WireRate: l.shaper.wire.rate(), LiveRate: l.shaper.live.rate(), ResyncRate: l.shaper.resyncM.rate(),
	}
	if s != nil && s.zstd {
		t.Compression = "zstd"
	}
	return t
}

// Event is one state change, as a JSON line in `mirrord events`.
type Event struct {
	Time   time.Time `json:"time"`
	Type   string    `json:"type"` // volume, peer, split-brain, ...
	Status Status    `json:"status"`
}

// eventBus fans state changes out to subscribers. A slow subscriber loses
// events rather than stalling the volume.
type eventBus struct {
	mu     sync.Mutex
	subs   map[chan Event]struct{}
	closed bool
}

func (b *eventBus) emit(typ string, st Status) {
	e := Event{Time: time.Now().UTC(), Type: typ, Status: st}
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := range b.subs {
		select {
		case c <- e:
		default:
		}
	}
}

// Subscribe returns a channel of events and a cancel function. The channel
// closes when the volume closes.
func (v *Volume) Subscribe() (<-chan Event, func()) {
	b := &v.ev
	c := make(chan Event, 256)
	b.mu.Lock()
	if b.subs == nil {
		b.subs = make(map[chan Event]struct{})
	}
	if b.closed {
		close(c)
	} else {
		b.subs[c] = struct{}{}
	}
	b.mu.Unlock()
	return c, func() {
		b.mu.Lock()
		if _, ok := b.subs[c]; ok {
			delete(b.subs, c)
			close(c)
		}
		b.mu.Unlock()
	}
}

func (b *eventBus) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for c := range b.subs {
		delete(b.subs, c)
		close(c)
	}
}
