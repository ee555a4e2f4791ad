package mirror

import "github.com/mirrord/mirrord/wan"

// Stream positions. A Primary numbers the write and zero frames it ships
// in async mode, 1, 2, ... in wire order, under a stream identifier that
// is fresh each time a node becomes Primary (wan.StreamPos). The Secondary
// applies them in that order, so while its disk is a prefix of the stream
// it knows exactly how much: the position of the last frame it applied.
// It keeps that across sessions in memory and, at an orderly close (the
// data synced first), in its metadata, so that after a restart it names
// the position its disk holds. After a crash it names none: the disk may
// hold writes past any position it could have kept (applied, not yet
// recorded), and a replay from an older position would write older
// versions over them, leaving the disk no prefix of the stream until the
// replay caught up.
//
// Both sides tell each other their position right after the handshake
// (wan.HelloStream, FrameStream): the Primary its last shipped, the
// Secondary its last applied. The Primary logs how much of its stream the
// peer holds, which is what a replay of the unacknowledged suffix after a
// disconnect needs to know.
//
// A Secondary's position is void (stream 0) while its disk is no prefix
// of the stream: from a connect that needs a resync until that resync is
// done, after an apply failed, and once it is promoted.

// streamState is the link's place in the async stream, guarded by l.mu.
type streamState struct {
	own     wan.StreamPos // as Primary: the stream shipped, Pos the last position (Stream 0 until the first use)
	applied wan.StreamPos // as Secondary: what this disk holds of its Primary's stream
	peer    wan.StreamPos // what the peer reported at the last connect
}

// ownStream is what this node reports on connect: its stream as Primary
// (given an identifier on first use), else the position it has applied.
func (l *link) ownStream(primary bool) wan.StreamPos {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !primary {
		return l.stream.applied
	}
	if l.stream.own.Stream == 0 {
		l.stream.own = wan.StreamPos{Stream: newGeneration(), Pos: l.stream.own.Pos}
	}
	p := l.stream.own
	if j := l.journal; j != nil {
		p.Replay = j.replayOffer(p.Stream)
	}
	return p
}

// ownStreamID is the identifier of the stream this node ships (0: none yet).
func (l *link) ownStreamID() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stream.own.Stream
}

// newStream forgets this node's stream positions: it is being promoted, so
// its disk will diverge from the stream it applied, and the stream it
// ships is a new one.
func (l *link) newStream() {
	l.mu.Lock()
	l.stream.own.Stream = 0
	l.stream.applied = wan.StreamPos{}
	l.mu.Unlock()
}

// peerStream is what the peer reported at the last connect.
func (l *link) peerStream() wan.StreamPos {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stream.peer
}

// appliedStream is the Secondary's position, for its metadata at close.
func (l *link) appliedStream() wan.StreamPos {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.stream.applied
}

// startStream sets the session's counters from the positions exchanged on
// connect (peer is zero when they were not). role is the session's
// replication state: a Secondary that needs a resync holds no prefix.
func (s *session) startStream(primary bool, peer wan.StreamPos, role ReplState) {
	l := s.l
	l.mu.Lock()
	l.stream.peer = peer
	own := l.stream.own
	l.mu.Unlock()
	if primary {
		s.spos = own.Pos
		if peer.Stream == 0 {
			l.log.Info().Msg("peer holds no position in this Primary's stream: what it lacks comes from the bitmap")
			return
		}
		if peer.Stream == own.Stream && peer.Pos <= own.Pos {
			l.log.Info().Uint64("peer_pos", peer.Pos).Uint64("shipped", own.Pos).Uint64("missing_writes", own.Pos-peer.Pos).
				Msg("peer holds this Primary's stream up to a position")
			return
		}
		l.log.Info().Uint64("peer_stream", peer.Stream).Uint64("own_stream", own.Stream).
			Msg("peer holds another stream (this Primary restarted or was promoted since)")
		return
	}
	s.rstream, s.rpos = peer.Stream, peer.Pos
	if s.rvalid = peer.Stream != 0 && role == ReplEstablished; !s.rvalid {
		l.voidApplied()
	}
}

// voidApplied forgets the Secondary's position, in memory and in its
// metadata: its disk is about to stop being a prefix of the stream it
// names (a resync, writes it cannot place, a failed apply).
func (l *link) voidApplied() {
	l.mu.Lock()
	l.stream.applied = wan.StreamPos{}
	l.mu.Unlock()
	if l.v.meta.snapshot().stream == (wan.StreamPos{}) {
		return
	}
	if err := l.v.meta.update(func(sb *superblock) { sb.stream = wan.StreamPos{} }); err != nil {
		l.log.Error().Err(err).Msg("clear stream position")
	}
}

// streamAnnounced runs on the Secondary when the peer, promoted during the
// session, starts its stream: frames after this one are numbered from
// p.Pos + 1. A disk in sync holds exactly what the new Primary held.
func (s *session) streamAnnounced(f wan.Frame) error {
	var p wan.StreamPos
	if err := p.UnmarshalBinary(f.Payload); err != nil {
		return err
	}
	s.qmu.Lock()
	inSync := s.repl == ReplEstablished
	s.qmu.Unlock()
	s.rstream, s.rpos = p.Stream, p.Pos
	if s.rvalid = p.Stream != 0 && inSync && !s.syncing.Load(); !s.rvalid {
		s.l.voidApplied()
	}
	return nil
}

// announceStream tells the peer, in stream order, that this node is now
// Primary and ships a new stream. It runs before the role changes, so no
// write of ours is numbered yet.
func (s *session) announceStream() {
	if !s.streamed {
		return
	}
	s.qmu.Lock()
	pos := s.spos
	s.qmu.Unlock()
	p := s.l.ownStream(true)
	p.Pos = pos
	s.l.mu.Lock()
	s.l.stream.own = p
	s.l.mu.Unlock()
	b, err := p.MarshalBinary()
	if err != nil {
		return
	}
	s.reply(wan.Header{Type: wan.FrameStream}, b)
}

// appliedStreamFrame counts an async write or zero frame the Secondary
// applied (err nil) or failed to apply (then its disk is no prefix).
func (s *session) appliedStreamFrame(err error) {
	if err != nil {
		if s.rvalid {
			s.rvalid = false
			s.l.voidApplied()
		}
		return
	}
	s.rpos++
}

// endStream keeps the session's positions on the link for the next one.
func (s *session) endStream() {
	s.qmu.Lock()
	spos := s.spos
	s.qmu.Unlock()
	l := s.l
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stream.own.Pos = spos
	if s.rvalid {
		l.stream.applied = wan.StreamPos{Stream: s.rstream, Pos: s.rpos}
	} else {
		l.stream.applied = wan.StreamPos{}
	}
}
