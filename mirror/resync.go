package mirror

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mirrord/mirrord/wan"
)

// resyncProgress is what status shows of a running resync.
type resyncProgress struct {
	mu       sync.Mutex
	cond     sync.Cond
	running  bool
	total    int64
	done     int64
	inflight int64
	started  time.Time
	// rate is an exponentially weighted bytes/s estimate for the ETA.
	rate     float64
	lastTick time.Time
	lastDone int64
}

func (p *resyncProgress) start(total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.running = true
	p.total, p.done, p.inflight = total, 0, 0
	p.started = time.Now()
	p.lastTick, p.lastDone, p.rate = p.started, 0, 0
}

func (p *resyncProgress) sent(n int64) {
	p.mu.Lock()
	p.inflight += n
	p.mu.Unlock()
}

func (p *resyncProgress) acked(n int64) {
	p.mu.Lock()
	p.inflight -= n
	p.done += n
	if now := time.Now(); now.Sub(p.lastTick) >= 500*time.Millisecond {
		r := float64(p.done-p.lastDone) / now.Sub(p.lastTick).Seconds()
		if p.rate == 0 {
			p.rate = r
		} else {
			p.rate = 0.7*p.rate + 0.3*r
		}
		p.lastTick, p.lastDone = now, p.done
	}
	p.cond.Broadcast()
	p.mu.Unlock()
}

// waitWindow blocks until n more bytes fit in the resync window, or the
// session ends.
func (p *resyncProgress) waitWindow(n, window int64, s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.inflight > 0 && p.inflight+n > window {
		if s.isClosed() {
			return false
		}
		p.cond.Wait()
	}
	return !s.isClosed()
}

func (p *resyncProgress) waitDrained(s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.inflight > 0 {
		if s.isClosed() {
			return false
		}
		p.cond.Wait()
	}
	return !s.isClosed()
}

func (p *resyncProgress) wakeAll() {
	p.mu.Lock()
	p.cond.Broadcast()
	p.mu.Unlock()
}

// ResyncStatus is a running resync's progress.
type ResyncStatus struct {
	Percent    float64 `json:"percent"`
	DoneBytes  int64   `json:"done_bytes"`
	TotalBytes int64   `json:"total_bytes"`
	RateBps    float64 `json:"rate_bytes_per_s"`
	ETASeconds float64 `json:"eta_s"`
}

func (p *resyncProgress) status(remaining int64) *ResyncStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.running {
		return nil
	}
	st := &ResyncStatus{DoneBytes: p.done, TotalBytes: max(p.total, p.done+remaining), RateBps: p.rate}
	if st.TotalBytes > 0 {
		st.Percent = 100 * float64(st.TotalBytes-remaining) / float64(st.TotalBytes)
	}
	if p.rate > 0 {
		st.ETASeconds = float64(remaining) / p.rate
	}
	return st
}

// left is what remains of the announced total.
func (p *resyncProgress) left() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return max(0, p.total-p.done)
}

func (p *resyncProgress) stop() {
	p.mu.Lock()
	p.running = false
	p.mu.Unlock()
}

func (s *session) isClosed() bool {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	return s.closed
}

// runResync copies every dirty region to the peer in disk order, then
// tells the peer it is UpToDate. It is resumable by construction: bits are
// cleared only as the peer acknowledges, and the bitmap is checkpointed to
// disk as it shrinks.
func (s *session) runResync() {
	// A running loop re-scans until the bitmap is clean, so a second
	// trigger (catch-up after Ahead, verify) has nothing to add; two loops
	// could announce the end while the other still sends.
	if !s.resyncRunning.CompareAndSwap(false, true) {
		return
	}
	defer func() {
		s.resyncRunning.Store(false)
		// Bits set after the loop decided it was done (going Ahead at that
		// moment) would otherwise wait for the next session.
		if !s.isClosed() && !s.ahead.Load() && s.v.dirty.Count() > 0 {
			s.qmu.Lock()
			s.repl = ReplSyncSource
			s.qmu.Unlock()
			s.resync.start(s.v.dirty.DirtyBytes())
			go s.runResync()
		}
	}()
	v, cfg := s.v, s.l.cfg
	log := s.l.log
	log.Info().Int64("bytes", v.dirty.DirtyBytes()).Msg("resync started")
	v.ev.emit("peer", v.Status())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-s.done
		cancel()
		s.resync.wakeAll()
	}()
	var limit *rate.Limiter
	if cfg.ResyncMaxRate > 0 {
		limit = rate.NewLimiter(rate.Limit(cfg.ResyncMaxRate), int(max(cfg.ResyncMaxRate/10, resyncChunk)))
	}
	slow := rate.NewLimiter(rate.Limit(cfg.ResyncMinRate), int(max(cfg.ResyncMinRate/10, resyncChunk)))
	checkpoint := time.Now()
	cursor := int64(0)
	sent := false // this pass
	for {
		off, n, ok := v.dirty.NextDirty(cursor, resyncChunk)
		if !ok {
			if !s.resync.waitDrained(s) {
				return
			}
			if v.dirty.Count() == 0 {
				break
			}
			if !sent && !s.waitJournal(ctx) {
				return
			}
			sent = false
			cursor = 0 // bits set again while we were Ahead: another pass
			continue
		}
		if j := s.l.journal; j != nil && j.covered(off, n) {
			cursor = off + n // queued journal records will carry it
			continue
		}
		sent = true
		if !s.resync.waitWindow(n, cfg.ResyncWindow, s) {
			return
		}
		// Yield to applications: while they write, resync keeps only its
		// minimum rate.
		if s.appBusy() {
			if err := slow.WaitN(ctx, int(n)); err != nil {
				return
			}
		} else if limit != nil {
			if err := limit.WaitN(ctx, int(n)); err != nil {
				return
			}
		}
		// On a capped link resync keeps to its share while live writes
		// flow, so that they are not queued behind resync data.
		if err := s.l.shaper.waitResync(ctx, n); err != nil {
			return
		}
		if !s.sendResync(off, n) {
			return
		}
		cursor = off + n
		if time.Since(checkpoint) > 5*time.Second {
			checkpoint = time.Now()
			if err := v.al.persistAll(); err != nil {
				s.fail(fmt.Errorf("checkpoint bitmap: %w", err))
				return
			}
		}
	}
	s.finishResync()
}

// waitJournal waits for the journal to retire a record: what is left dirty
// is all covered by queued records, and a pass now would send nothing.
func (s *session) waitJournal(ctx context.Context) bool {
	j := s.l.journal
	if j == nil {
		return true
	}
	t := time.NewTimer(100 * time.Millisecond) // the bits may also clear without a record
	defer t.Stop()
	select {
	case <-j.progress:
	case <-t.C:
	case <-ctx.Done():
		return false
	}
	return true
}

// appBusy reports application writes in flight on this session.
func (s *session) appBusy() bool {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	for _, e := range s.tl {
		if e.kind == entWrite {
			return true
		}
	}
	return false
}

// sendResync reads one run under the range lock, so that no live write to
// it can be sequenced in between, and queues it.
func (s *session) sendResync(off, n int64) bool {
	v := s.v
	v.rl.lock(off, n)
	defer v.rl.unlock(off, n)
	if !v.dirty.Test(off, n) {
		return true // cleared meanwhile
	}
	buf := dataPool.Get().(*[]byte)
	if int64(cap(*buf)) < n {
		*buf = make([]byte, n)
	}
	*buf = (*buf)[:n]
	if err := v.pread(*buf, off); err != nil {
		putOwned(buf)
		s.fail(fmt.Errorf("resync read at %d: %w", off, err))
		return false
	}
	e := &tlEntry{kind: entResync, off: off, n: n, epoch: s.epoch.Load()}
	s.resync.sent(n)
	if _, ok := s.transmit(wan.Header{Type: wan.FrameResyncData, Offset: uint64(off)}, *buf, buf, e); !ok {
		s.resync.acked(n)
		return false
	}
	s.l.stats.resyncBytes.Add(uint64(n))
	return true
}

// finishResync retires the bitmap generation and hands the peer the
// generation it now holds.
func (s *session) finishResync() {
	v := s.v
	if err := v.finishAsSource(); err != nil {
		s.fail(fmt.Errorf("persist resync completion: %w", err))
		return
	}
	g := v.wanGen()
	b, _ := g.MarshalBinary()
	s.qmu.Lock()
	if s.repl == ReplSyncSource {
		s.repl = ReplEstablished
	}
	s.qmu.Unlock()
	s.resync.stop()
	s.l.behindSince.Store(0)
	s.reply(wan.Header{Type: wan.FrameResyncDone}, b)
	s.l.log.Info().Msg("resync finished: peer is UpToDate")
	v.ev.emit("peer", v.Status())
}

// resyncDone runs on the target: every dirty region has arrived.
func (s *session) resyncDone(_ uint64, g wan.Generations) error {
	v := s.v
	s.applying.Wait()
	if err := v.syncData(); err != nil {
		return err
	}
	if err := v.finishAsTarget(g); err != nil {
		return err
	}
	// The new generation is durable: the old image is history.
	if err := v.discardUndo(); err != nil {
		s.l.log.Error().Err(err).Msg("discard undo log")
	}
	s.syncing.Store(false)
	s.rvalid = s.rstream != 0 // equal to the source as of this point in its stream
	s.resync.stop()
	s.qmu.Lock()
	s.repl = ReplEstablished
	s.qmu.Unlock()
	s.l.log.Info().Msg("resync finished: local disk UpToDate")
	v.ev.emit("peer", v.Status())
	return nil
}

// verifyRun is one online verify pass.
type verifyRun struct {
	mu         sync.Mutex
	cond       sync.Cond
	total      int64
	checked    int64
	mismatched int64
	ranges     [][2]int64
	inflight   int
}

// VerifyResult reports an online verify.
type VerifyResult struct {
	CheckedBytes    int64      `json:"checked_bytes"`
	MismatchedBytes int64      `json:"mismatched_bytes"`
	Mismatches      [][2]int64 `json:"mismatches"` // [offset, length]
	Seconds         float64    `json:"seconds"`
}

// Verify compares SHA-256 digests of every chunk with the peer's, marks
// mismatching chunks out of sync (a resync follows) and reports them. Only
// digests cross the link.
func (v *Volume) Verify(ctx context.Context, progress func(done, total int64)) (VerifyResult, error) {
	if v.link == nil {
		return VerifyResult{}, ErrNoPeer
	}
	s := v.link.current()
	if s == nil {
		return VerifyResult{}, ErrNotConnected
	}
	if v.Role() != RolePrimary {
		return VerifyResult{}, fmt.Errorf("verify runs on the Primary: %w", ErrNotPrimary)
	}
	return s.runVerify(ctx, progress)
}

func (s *session) runVerify(ctx context.Context, progress func(done, total int64)) (VerifyResult, error) {
	v := s.v
	s.verifyMu.Lock()
	defer s.verifyMu.Unlock()
	vr := &verifyRun{total: v.size}
	vr.cond.L = &vr.mu
	s.qmu.Lock()
	s.verify = vr
	prev := s.repl
	if prev == ReplEstablished {
		s.repl = ReplVerifyS
	}
	s.qmu.Unlock()
	defer func() {
		s.qmu.Lock()
		s.verify = nil
		if s.repl == ReplVerifyS {
			s.repl = prev
		}
		s.qmu.Unlock()
	}()
	start := time.Now()
	buf := make([]byte, verifyChunk)
	for off := int64(0); off < v.size; off += verifyChunk {
		n := min(int64(verifyChunk), v.size-off)
		vr.mu.Lock()
		for vr.inflight >= 16 && !s.isClosed() {
			vr.cond.Wait()
		}
		vr.mu.Unlock()
		if err := ctx.Err(); err != nil {
			return VerifyResult{}, err
		}
		v.rl.lock(off, n)
		err := v.pread(buf[:n], off)
		var ok bool
		if err == nil {
			e := &tlEntry{kind: entDigest, off: off, n: n, digest: sha256.Sum256(buf[:n])}
			vr.mu.Lock()
			vr.inflight++
			vr.mu.Unlock()
			_, ok = s.transmit(wan.Header{Type: wan.FrameDigestReq, Offset: uint64(off)}, wan.PutU64(uint64(n)), nil, e)
		}
		v.rl.unlock(off, n)
		if err != nil {
			return VerifyResult{}, err
		}
		if !ok {
			return VerifyResult{}, ErrNotConnected
		}
		if progress != nil {
			progress(off+n, v.size)
		}
	}
	vr.mu.Lock()
	for vr.inflight > 0 && !s.isClosed() {
		vr.cond.Wait()
	}
	res := VerifyResult{CheckedBytes: vr.checked, MismatchedBytes: vr.mismatched, Mismatches: vr.ranges, Seconds: time.Since(start).Seconds()}
	vr.mu.Unlock()
	if s.isClosed() {
		return res, ErrNotConnected
	}
	if res.MismatchedBytes > 0 {
		s.l.log.Warn().Int64("mismatched_bytes", res.MismatchedBytes).Msg("verify found differences; resyncing them")
		s.qmu.Lock()
		start := s.repl != ReplSyncSource
		if start {
			s.repl = ReplSyncSource
			prev = ReplSyncSource
		}
		s.qmu.Unlock()
		if start {
			s.resync.start(v.dirty.DirtyBytes())
			go s.runResync()
		}
	}
	return res, nil
}

// digestReq answers the Primary's verify request from the local disk, in
// stream order.
func (s *session) digestReq(f wan.Frame) error {
	n, err := wan.GetU64(f.Payload)
	if err != nil {
		return err
	}
	if f.Offset+n > uint64(s.v.size) || n > verifyChunk {
		return fmt.Errorf("%w: digest request out of range", wan.ErrMalformed)
	}
	s.applying.Wait()
	buf := make([]byte, n)
	errno := uint32(0)
	var d [32]byte
	if err := s.v.pread(buf, int64(f.Offset)); err != nil {
		errno = 5
	} else {
		d = sha256.Sum256(buf)
	}
	payload := append(wan.PutU64(n), d[:]...)
	s.reply(wan.Header{Type: wan.FrameDigest, Seq: f.Seq, Offset: f.Offset, Errno: errno}, payload)
	return nil
}

func (s *session) digestReply(f wan.Frame) {
	s.lastAck.Store(time.Now().UnixNano())
	s.qmu.Lock()
	e := s.tl[f.Seq]
	delete(s.tl, f.Seq)
	vr := s.verify
	s.qmu.Unlock()
	if e == nil || vr == nil || e.kind != entDigest {
		return
	}
	differs := f.Errno != 0 || len(f.Payload) != 40 || [32]byte(f.Payload[8:40]) != e.digest
	if differs {
		// A new epoch: no in-flight acknowledgement may clear this bit.
		s.epoch.Add(1)
		s.v.dirty.Set(e.off, e.n)
	}
	vr.mu.Lock()
	vr.inflight--
	vr.checked += e.n
	if differs {
		vr.mismatched += e.n
		if len(vr.ranges) < 1000 {
			vr.ranges = append(vr.ranges, [2]int64{e.off, e.n})
		}
	}
	vr.cond.Broadcast()
	vr.mu.Unlock()
}
