package mirror

import (
	"errors"
	"fmt"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// Protocol A's send side. A write goes, in order of preference:
//
//  1. straight into the in-flight window (copied into the send buffer);
//  2. when the window is full, into the on-disk journal, which the drainer
//     feeds into the window as acknowledgements free it: the stream stays
//     in write order, so the peer's disk is always a prefix of the history;
//  3. when the journal is full, into the bitmap only: the session goes
//     Ahead, the journal drains, and a catch-up resync follows (the peer
//     protects its last consistent image with an undo log meanwhile).
//
// Once one write has gone to the journal, every later one queues behind it
// until the drainer has sent the last record: a write that completed
// before another started is never sent after it.

// cost is what an async op counts against the in-flight window, the
// journal's queue and the lag: the data a write carries. A zero or trim
// carries none, only its frame (header and length), however large its
// range: counted at its length, one trim of the whole disk would fill the
// window, send the Primary into the journal or Ahead, and report a lag of
// gigabytes that costs 40 bytes to send.
func (o op) cost() int64 {
	if o.kind == opZero {
		return wan.HeaderSize + 8
	}
	return o.n
}

type spillResult uint8

const (
	spillNo     spillResult = iota // not spilling: use the window
	spillQueued                    // journaled, or recorded in the bitmap (Ahead)
	spillGone                      // the session is over
)

// replicateAsync ships o in protocol A and applies it locally. ok is false
// when the session closed before o was queued.
func (s *session) replicateAsync(o op) (ok bool, err error) {
	v, j := s.v, s.l.journal
	if j != nil {
		switch s.spill(o, false) {
		case spillGone:
			return false, nil
		case spillQueued:
			return true, v.apply(o)
		}
	} else if s.ahead.Load() {
		v.dirty.Set(o.off, o.n)
		return true, v.apply(o)
	}
	if cost := o.cost(); s.reserve(cost) {
		h, payload := writeFrame(o) // copied into the frame buffer before transmit returns
		if _, ok := s.transmit(h, payload, nil, &tlEntry{kind: entWrite, off: o.off, n: o.n, cost: cost}); !ok {
			s.release(cost)
			return false, nil
		}
		return true, v.apply(o)
	}
	if j == nil {
		s.goAhead("async window full")
		v.dirty.Set(o.off, o.n)
		return true, v.apply(o)
	}
	if s.spill(o, true) == spillGone {
		return false, nil
	}
	return true, v.apply(o)
}

// spill appends o to the journal if the stream is spilling (or force: the
// window is full). Its bits are set under the journal lock, right after
// the record is counted (which looks at them as they were), so that no
// acknowledgement can clear them in between; the local write follows.
func (s *session) spill(o op, force bool) spillResult {
	j := s.l.journal
	if !force && !s.ahead.Load() && !j.spillingHint.Load() {
		return spillNo // the common case takes no lock
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s {
		return spillGone
	}
	if s.ahead.Load() {
		s.v.dirty.Set(o.off, o.n)
		return spillQueued
	}
	if !j.spilling && !force {
		return spillNo
	}
	started := !j.spilling
	j.setSpilling(true)
	err := j.appendLocked(o, time.Now(), s.epoch.Load())
	s.v.dirty.Set(o.off, o.n)
	switch {
	case err == nil:
		if started {
			s.l.log.Debug().Msg("async window full: spilling to the journal")
		}
		select {
		case s.jkick <- struct{}{}:
		default:
		}
	case errors.Is(err, errJournalFull):
		j.stats.fullEvents++
		s.goAhead("async journal full")
	default:
		s.l.log.Error().Err(err).Msg("journal write failed")
		s.goAhead("journal write failed")
	}
	return spillQueued
}

// reserve accounts async bytes against the window; false means it is full.
func (s *session) reserve(n int64) bool {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.unacked > 0 && s.unacked+n > s.l.cfg.AsyncWindow {
		return false
	}
	s.unacked += n
	return true
}

// waitRoom blocks until n bytes fit in the window (or the window is empty)
// and reserves them; false when the session ended.
func (s *session) waitRoom(n int64) bool {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	for !s.closed && s.unacked > 0 && s.unacked+n > s.l.cfg.AsyncWindow {
		s.room.Wait()
	}
	if s.closed {
		return false
	}
	s.unacked += n
	return true
}

func (s *session) release(n int64) {
	s.qmu.Lock()
	s.unacked -= n
	s.room.Broadcast()
	drained := s.ahead.Load() && s.unacked == 0 && s.repl == ReplAhead
	s.qmu.Unlock()
	if drained && (s.l.journal == nil || s.l.journal.empty()) {
		s.catchUp()
	}
}

// goAhead stops shipping live writes: the bitmap carries them until the
// catch-up resync. Callers may hold the journal lock.
func (s *session) goAhead(why string) {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.ahead.Swap(true) {
		return
	}
	s.epoch.Add(1)
	s.repl = ReplAhead
	s.l.markBehind()
	s.l.log.Warn().Int64("unacked_bytes", s.unacked).Msg(why + ": Ahead, tracking writes in the bitmap")
	go func() { s.v.ev.emit("peer", s.v.Status()) }() // Status takes qmu
}

// catchUp starts the resync once the backlog (window and journal) is
// acknowledged.
func (s *session) catchUp() {
	s.qmu.Lock()
	start := s.ahead.Load() && s.unacked == 0 && s.repl == ReplAhead
	if start {
		s.repl = ReplSyncSource
	}
	s.qmu.Unlock()
	if !start {
		return
	}
	v := s.v
	total := v.dirty.DirtyBytes()
	s.l.log.Info().Int64("bytes", total).Msg("backlog drained: catching up from the bitmap")
	s.resync.start(total)
	if s.peer.Flags&wan.HelloCatchUp != 0 {
		// Before the first region, so that the target (Behind) counts
		// its progress against the whole.
		s.reply(wan.Header{Type: wan.FrameCatchUp}, wan.PutU64(uint64(total)))
	}
	// The peer starts its undo log at the first resync data; a live
	// write reaching it before that would be newer than regions it
	// still lacks. So the first region goes out while live writes still
	// go to the bitmap, and only then does live shipping resume.
	if off, n, ok := v.dirty.NextDirty(0, v.dirty.RegionSize()); ok && !s.sendResync(off, n) {
		return
	}
	unlock := func() {}
	if j := s.l.journal; j != nil {
		j.mu.Lock() // spill decides on ahead under it
		unlock = j.mu.Unlock
	}
	// A new epoch: bits set by writes since the first region was read
	// must survive its acknowledgement.
	s.epoch.Add(1)
	s.ahead.Store(false)
	unlock()
	go s.runResync()
}

// catchUpAnnounced runs on the target: the source went Ahead and its
// catch-up of total bytes follows; progress counts from here.
func (s *session) catchUpAnnounced(f wan.Frame) error {
	total, err := wan.GetU64(f.Payload)
	if err != nil {
		return err
	}
	if s.v.Role() == RolePrimary {
		return fmt.Errorf("%w: catch-up announced to a Primary", wan.ErrMalformed)
	}
	s.resync.start(int64(total))
	return nil
}

// clearSynced clears the bits of a range the peer acknowledged from a
// resync, except regions a queued journal record still covers: that
// record reaches the peer later, and if the session ends first the bit
// must still be there.
func (s *session) clearSynced(off, n int64, epoch uint64) {
	j := s.l.journal
	if j == nil {
		if epoch == s.epoch.Load() {
			s.v.dirty.ClearRegions(off, n)
		}
		return
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if epoch != s.epoch.Load() {
		return
	}
	if len(j.pending) == 0 {
		s.v.dirty.ClearRegions(off, n)
		return
	}
	rs := s.v.dirty.RegionSize()
	for r := off / rs; r <= (off+max(n, 1)-1)/rs; r++ {
		p, ok := j.pending[r]
		if !ok {
			s.v.dirty.ClearRegions(r*rs, rs)
			continue
		}
		// The peer has the whole region as of the resync's read; the
		// queued records bring it up to date, so their acknowledgement
		// may clear the bit.
		p.foreign = false
		j.pending[r] = p
	}
}

// drainLoop feeds journal records into the window in order.
func (s *session) drainLoop() {
	defer s.loops.Done()
	j := s.l.journal
	var buf []byte
	for {
		<-s.jkick // fail kicks it too
		if s.isClosed() {
			return
		}
		for {
			e, ok := j.next(s)
			if !ok {
				break
			}
			if !s.waitRoom(e.cost) {
				return
			}
			r, b, err := j.read(e, buf)
			buf = b
			if err != nil {
				s.release(e.cost)
				s.fail(fmt.Errorf("journal: %w", err))
				return
			}
			// Marked before it is sent: its acknowledgement may arrive
			// before transmit returns.
			j.markSent(s, e.seq)
			h, payload := writeFrame(r.op())
			te := &tlEntry{kind: entWrite, off: e.off, n: e.n, cost: e.cost, journaled: true, jseq: e.seq, written: e.time}
			if _, ok := s.transmit(h, payload, nil, te); !ok {
				s.release(e.cost)
				return
			}
		}
	}
}

// markBehind notes when the peer started lacking writes tracked only in
// the bitmap, for the lag's age.
func (l *link) markBehind() {
	l.behindSince.CompareAndSwap(0, time.Now().UnixNano())
}

// Lag reports how far the peer's disk is behind this Primary: the bytes
// written here that the peer has not acknowledged, and the age of the
// oldest of them (the recovery point objective a failover right now would
// miss). While writes are tracked in the bitmap (Ahead, catch-up,
// disconnected) bytes counts every out-of-sync region, an upper bound,
// and age runs from when the peer first fell behind. It is zero on a
// Secondary, a standalone volume, and a pair in sync.
//
// It is safe for concurrent use and cheap enough to poll (no I/O); the
// failover agent uses it to decide whether an async target may be
// promoted.
func (v *Volume) Lag() (bytes int64, age time.Duration) {
	if v.link == nil || v.Role() != RolePrimary {
		return 0, 0
	}
	return v.link.lagNow(time.Now())
}

func (l *link) lagNow(now time.Time) (int64, time.Duration) {
	var bytes, oldest int64
	older := func(t int64) {
		if t != 0 && (oldest == 0 || t < oldest) {
			oldest = t
		}
	}
	s := l.current()
	behind := s == nil
	if s != nil {
		s.qmu.Lock()
		bytes += s.unacked
		if s.lagFirst < len(s.lagq) {
			older(s.lagq[s.lagFirst].written)
		}
		behind = s.ahead.Load() || s.repl == ReplSyncSource
		s.qmu.Unlock()
	}
	if j := l.journal; j != nil {
		_, queued, t, _ := j.state()
		if !t.IsZero() {
			older(t.UnixNano())
		}
		if !behind {
			bytes += queued // while behind, the bitmap counts them
		}
	}
	if behind {
		if d := l.v.dirty.DirtyBytes(); d > 0 {
			bytes += d
			older(l.behindSince.Load())
		}
	}
	if oldest == 0 || bytes == 0 {
		return bytes, 0
	}
	return bytes, max(0, now.Sub(time.Unix(0, oldest)))
}
