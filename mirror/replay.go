package mirror

import (
	"errors"
	"fmt"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// Replay after a disconnect. When an async session ends, the journal
// keeps its records (the ones on the wire become unsent again) instead of
// emptying, and writes made while the peer is away append to it, as long
// as they fit and every dirty region is owed to a journaled write alone.
// Their bits are set as always, so a Primary restart or a full journal
// still falls back to the bitmap. On reconnect the peer names the stream
// position its disk holds (stream.go); if the journal continues from
// there, both sides agree on a replay: the Primary sends the records after
// that position in order and goes on live, no resync, no undo log, and the
// peer stays a crash-consistent prefix of the history throughout.
//
// Writes the window sent straight to the wire are not kept (their bytes
// live only in the send buffer until written: keeping a copy would cost
// the live path a second copy of every write). The replay needs the peer
// to have applied every one of them, which it has when the window was
// spilling to the journal at the disconnect (a link slower than the
// writes), and rarely otherwise.

// retainedStream is what the journal keeps across a disconnect.
type retainedStream struct {
	stream uint64
	// pos is the last position shipped before the disconnect; from the
	// lowest peer position the records continue (wan.StreamPos.Replay-1).
	pos, from uint64
	// direct holds the ranges of unacknowledged writes the window sent
	// without journaling them: a peer that can be replayed to has them.
	direct [][2]int64
}

// ownDirtyOnly reports that every dirty region is owed to journaled
// writes alone (counted, not foreign); mu is held.
func (j *journal) ownDirtyOnly() bool {
	rs := j.dirty.RegionSize()
	ok := true
	j.dirty.Runs(func(off, n int64) bool {
		for r := off / rs; r < (off+n+rs-1)/rs && ok; r++ {
			p, found := j.pending[r]
			ok = found && !p.foreign
		}
		return ok
	})
	return ok
}

// keepsStream reports, as the session ends and before its unacknowledged
// writes set their bits, whether the journal may keep the stream: this
// node ships a numbered async stream to a peer that can name its
// position, the session was in sync (not Ahead, not resyncing), and every
// dirty region is owed to a journaled write.
func (s *session) keepsStream() bool {
	l, j := s.l, s.l.journal
	if l.cfg.Mode != ModeAsync || s.v.Role() != RolePrimary || !s.streamed || l.ownStreamID() == 0 {
		return false
	}
	s.qmu.Lock()
	inSync := s.repl == ReplEstablished && !s.ahead.Load()
	s.qmu.Unlock()
	if !inSync {
		return false
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.owner == s && j.ownDirtyOnly()
}

// retain keeps the journal's records when session s ends: shipped is the
// last stream position it sent, sent the positions of the journaled
// records on the wire (by record sequence), direct the writes the window
// sent itself and the highest position among them. It returns false (and
// nothing is kept) when the records cannot continue the stream.
func (j *journal) retain(s *session, stream, shipped uint64, sent map[uint64]uint64, direct [][2]int64, maxDirect uint64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s || stream == 0 {
		return false
	}
	// Acknowledgements come in stream order: positions below the lowest
	// unacknowledged one are the peer's; a peer must hold the window's own
	// writes too, whose bytes are gone.
	low := shipped + 1
	for i := j.first; i < len(j.ents); i++ {
		e := &j.ents[i]
		e.spos = sent[e.seq] // 0: not on the wire
		if i < j.first+j.sent {
			j.queued += e.cost // unsent again
		}
		if e.spos != 0 {
			low = min(low, e.spos)
		}
		e.epoch = 0
	}
	from := max(low-1, maxDirect) // the lowest peer position the records continue
	j.retained = &retainedStream{stream: stream, pos: shipped, from: from, direct: direct}
	j.owner = nil
	j.sent = 0
	j.setSpilling(false)
	return true
}

// replayOffer is the Replay field of this Primary's stream position.
func (j *journal) replayOffer(stream uint64) uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	if r := j.retained; r != nil && r.stream == stream {
		return r.from + 1
	}
	return 0
}

// dropRetained empties a journal kept across a disconnect: the bitmap,
// whose bits every record set, carries what it held.
func (j *journal) dropRetained() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.dropRetainedLocked()
}

func (j *journal) dropRetainedLocked() bool {
	if j.retained == nil {
		return false
	}
	j.retained = nil
	j.ents, j.first, j.sent = j.ents[:0], 0, 0
	clear(j.pending)
	j.queued = 0
	j.tail = j.head
	_ = j.writeHeader(false) // the tail on disk only bounds a crash's fold
	return true
}

// resume hands the kept records to session s, which replays them to a
// peer holding position pos: records at or below it are retired as if
// acknowledged, the window's own writes are the peer's, and every dirty
// region is owed to the records left.
func (j *journal) resume(s *session, pos uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	r := j.retained
	if r == nil {
		return errors.New("the journal dropped its stream during the handshake")
	}
	for j.first < len(j.ents) && j.ents[j.first].spos != 0 && j.ents[j.first].spos <= pos {
		e := j.ents[j.first]
		j.first++
		j.queued -= e.cost
		rs := j.dirty.RegionSize()
		for _, reg := range j.countRegions(e.off, e.n, -1) {
			j.dirty.ClearRegions(reg*rs, rs)
		}
	}
	if j.first == len(j.ents) {
		j.ents, j.first = j.ents[:0], 0
		j.tail = j.head
	} else {
		j.tail = j.ents[j.first].pos
	}
	rs := j.dirty.RegionSize()
	for _, d := range r.direct {
		for reg := d[0] / rs; reg <= (d[0]+max(d[1], 1)-1)/rs; reg++ {
			if _, ok := j.pending[reg]; !ok {
				j.dirty.ClearRegions(reg*rs, rs)
			}
		}
	}
	for reg, p := range j.pending {
		p.foreign = false
		j.pending[reg] = p
	}
	j.retained = nil
	j.stats.replays++
	j.owner = s
	j.setSpilling(len(j.ents) > j.first)
	select {
	case s.jkick <- struct{}{}:
	default:
	}
	return nil
}

// appendDetached journals a write made while no session ships them: the
// peer is away and the journal keeps the stream, or a session is just
// starting or ending. false means the caller records it in the bitmap.
func (j *journal) appendDetached(o op, log func(string)) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	s := j.owner
	if j.retained == nil && s == nil {
		return false
	}
	var epoch uint64
	if s != nil {
		epoch = s.epoch.Load()
	}
	err := j.appendLocked(o, time.Now(), epoch)
	j.dirty.Set(o.off, o.n)
	switch {
	case err != nil && s != nil:
		s.goAhead(fmt.Sprintf("async journal: %v", err))
	case err != nil:
		j.dropRetainedLocked()
		log(fmt.Sprintf("async journal while disconnected: %v: the reconnect catches up from the bitmap", err))
	case s != nil:
		j.setSpilling(true)
		select {
		case s.jkick <- struct{}{}:
		default:
		}
	}
	return true
}

func (l *link) warn(msg string) { l.log.Warn().Msg(msg) }

// replayAgreed decides on connect whether the Primary replays its journal
// to the Secondary; both ends reach the same answer from what they
// exchanged.
func (s *session) replayAgreed(d decision, primary bool, own, peer wan.StreamPos, peerBM interface{ Count() int64 }) bool {
	if primary == (Role(s.peer.Role) == RolePrimary) {
		return false
	}
	if primary {
		return replayAgreed(d, true, own, peer, peerBM.Count())
	}
	return replayAgreed(d, false, peer, own, s.v.dirty.Count())
}

// startReplay settles the generations for a replay: the Primary's bitmap
// base becomes history, as at the end of a resync, and the Secondary
// adopts the result, so that a Primary writing alone again later starts a
// generation the Secondary's is the base of.
func (s *session) startReplay(primary bool, own, peer wan.StreamPos) error {
	if primary {
		if err := s.v.finishAsSource(); err != nil {
			return err
		}
		return s.l.journal.resume(s, peer.Pos)
	}
	s.v.adoptGeneration(afterSource(s.peer.Gen))
	return nil
}

// replayStream sets the stream counters from the Secondary's position and
// hands the kept records to this session, whose drainer sends them.
func (s *session) replayStream(primary bool, own, peer wan.StreamPos) {
	if !primary {
		s.rpos, s.rvalid = own.Pos, true
		s.l.log.Info().Uint64("pos", own.Pos).Uint64("peer_pos", peer.Pos).Msg("peer replays its stream from our position")
		return
	}
	s.qmu.Lock()
	s.spos = peer.Pos
	s.qmu.Unlock()
	s.l.log.Info().Uint64("peer_pos", peer.Pos).Uint64("shipped", own.Pos).Int64("journal_bytes", s.l.journal.usedBytes()).
		Msg("peer reconnected within the journal: replaying the stream from its position, no resync")
}

// replayAgreed is the replay decision, the same on both sides: the peers'
// generations call for a bitmap resync from the Primary (or none), the
// Secondary has nothing dirty of its own, and the Primary's kept stream
// continues from the Secondary's position. prim and sec are the two
// positions exchanged on connect.
func replayAgreed(d decision, fromPrimary bool, prim, sec wan.StreamPos, secDirty int64) bool {
	want := ActTarget
	if fromPrimary {
		want = ActSource
	}
	return (d.Action == want || d.Action == ActNone) && !d.Full && secDirty == 0 &&
		prim.Replay != 0 && sec.Stream == prim.Stream && prim.Replay-1 <= sec.Pos && sec.Pos <= prim.Pos
}

// afterSource is g once a sync source has finished (finishAsSource): the
// bitmap's base becomes history.
func afterSource(g wan.Generations) wan.Generations {
	if g.Bitmap != 0 {
		g.History[1], g.History[0], g.Bitmap = g.History[0], g.Bitmap, 0
	}
	return g
}
