package mirror

import (
	"sync"
	"sync/atomic"

	"github.com/mirrord/mirrord/nbd"
	"github.com/mirrord/mirrord/wan"
)

// The sync write path for the NBD server's reader (nbd.AsyncWriter). A
// sync write used to take a goroutine of its own, parked on a channel
// until the peer's acknowledgement woke it: a goroutine start and two
// wake-ups per write, and each write flushed to the socket alone because
// the goroutines ran one after another. Here the reader sequences the
// frame (held while the client's next request is already read, so a
// burst leaves in one syscall at Unplug), writes the local copy, and the
// receive loop answers the client when the acknowledgement arrives,
// holding replies for the burst of acknowledgements it read.
//
// Within a burst the local copies wait too: Unplug sends the burst's
// frames first and then writes the local copies, so that the peer applies
// the burst while this node writes it. Written before the frames left,
// the local copies of a 32-write burst delayed the peer's start by their
// whole time (about a hundred microseconds of pwrite) on every round.

// WriteAsync starts a write of p at off (nbd.AsyncWriter). Sync-mode writes
// with a live session go the way described above; anything else (async
// mode, no session, a fence, a lag hold, a pending role change, the first
// write of a pristine volume) is WriteAt on a goroutine, as the server
// would do without this method. Nothing here waits for another write:
// where a lock is taken, a wait falls back to the goroutine.
func (v *Volume) WriteAsync(p []byte, off int64, more bool, w nbd.WriteDone) {
	if !v.startAsync(p, off, more, w) {
		go func() {
			w.Done(v.WriteAt(p, off, false))
			w.SendHeld()
		}()
	}
}

// Unplug sends the sync writes WriteAsync held back and writes their
// local copies (nbd.AsyncWriter).
func (v *Volume) Unplug() {
	if v.link != nil {
		s := v.link.current()
		if s != nil {
			s.flushHeld()
		}
		v.writeHeld(s)
	}
}

func (v *Volume) startAsync(p []byte, off int64, more bool, w nbd.WriteDone) bool {
	l := v.link
	if l == nil || l.cfg.Mode != ModeSync || v.fc.mode.Load() != uint32(Unfenced) || l.holds() || v.pristine.Load() {
		return false
	}
	if !v.gate.TryRLock() {
		return false
	}
	s := l.current()
	n := int64(len(p))
	if s == nil || v.closed.Load() || Role(v.role.Load()) != RolePrimary || !v.al.tryBegin(off, n) {
		v.gate.RUnlock()
		return false
	}
	if !v.rl.tryLock(off, n) {
		v.al.end(off, n)
		v.gate.RUnlock()
		return false
	}
	o := op{kind: opWrite, p: p, off: off, n: n}
	pw := &pendingWrite{v: v, s: s, off: off, n: n, w: w}
	pw.left.Store(2)
	h, payload := writeFrame(o)
	h.Flags |= wan.FlagSync
	mode := sendFlush
	if more {
		mode = sendHold
	}
	e := &tlEntry{kind: entWrite, off: off, n: n, pw: pw}
	if _, ok := s.direct(h, payload, e, mode); !ok {
		// The session closed before the write was sequenced: the peer is
		// gone for it, as in replicate.
		pw.left.Store(1)
		pw.lerr = l.writeUnreplicated(o)
	} else {
		pw.batch, pw.inPlace = e.batch, len(payload) >= wan.ZeroCopyMin
		if more {
			pw.p = p
			v.held.add(pw)
			return true
		}
		pw.lerr = v.apply(o)
	}
	pw.finish(nil, fromReader)
	return true
}

// heldWrites are sync writes whose frames are held for the reader's burst
// and whose local copies are written at Unplug, after the frames left.
// Several connections may add and unplug at once: an Unplug writes every
// held write, whichever reader started it, and sends the replies it
// completes itself (the other reader may already be waiting for its
// client).
type heldWrites struct {
	mu    sync.Mutex
	q     []*pendingWrite
	spare []*pendingWrite
}

func (h *heldWrites) add(pw *pendingWrite) {
	h.mu.Lock()
	h.q = append(h.q, pw)
	h.mu.Unlock()
}

// take returns the held writes; the caller gives the slice back with
// giveBack once done with it.
func (h *heldWrites) take() []*pendingWrite {
	h.mu.Lock()
	defer h.mu.Unlock()
	q := h.q
	if len(q) == 0 {
		return nil
	}
	h.q, h.spare = h.spare[:0], nil
	return q
}

func (h *heldWrites) giveBack(q []*pendingWrite) {
	clear(q)
	h.mu.Lock()
	if h.spare == nil {
		h.spare = q[:0]
	}
	h.mu.Unlock()
}

// writeHeld sends the held frames and writes the held writes' local
// copies, in the order they were started; flushed is a session whose
// held frames the caller has just sent (or nil).
func (v *Volume) writeHeld(flushed *session) {
	q := v.held.take()
	if q == nil {
		return
	}
	// Frames first. Usually every write belongs to the current session;
	// one whose session ended meanwhile flushes into the dead connection,
	// which fails its send path, so that finish need not wait for a batch
	// that will never be written.
	last := flushed
	for _, pw := range q {
		if pw.s != last {
			last = pw.s
			last.flushHeld()
		}
	}
	var burst []nbd.WriteDone
	for _, pw := range q {
		pw.lerr = v.apply(op{kind: opWrite, p: pw.p, off: pw.off, n: pw.n})
		pw.p = nil
		pw.finish(&burst, fromUnplug)
	}
	v.held.giveBack(q)
	for _, w := range burst {
		w.SendHeld()
	}
}

// pendingWrite is a sync write started by WriteAsync. It completes when
// both the local write and the peer's acknowledgement (or the session's
// end) are in, whichever comes last.
type pendingWrite struct {
	v      *Volume
	s      *session
	off, n int64
	w      nbd.WriteDone
	left   atomic.Int32
	// Set by the reader before its decrement: the local result, and the
	// send batch that carries a payload sent in place.
	lerr    error
	batch   uint64
	inPlace bool
	// p is the payload while the local copy waits for Unplug.
	p []byte
}

// Who completes a pendingWrite's side.
type finisher uint8

const (
	fromReader   finisher = iota // WriteAsync, on the NBD reader
	fromRecv                     // the receive loop, on the ack
	fromTeardown                 // the session's end
	fromUnplug                   // Unplug, after the held local copy
)

// finish counts one side in; the last releases the write's locks and
// answers. From the receive loop, burst collects the answers whose replies
// wait for the end of the burst; from the reader the server sends them
// itself; otherwise they leave at once.
//
// A payload sent in place is the server's again only once the batch that
// carried it has left: the ack proves the bytes arrived, but another
// goroutine's writev of the same batch may still be running (see
// sendPath.waitWritten). That rare wait gets a goroutine of its own, not
// the receive loop's time. At the session's end no flusher runs.
func (p *pendingWrite) finish(burst *[]nbd.WriteDone, by finisher) {
	if p.left.Add(-1) != 0 {
		return
	}
	if p.inPlace && by != fromTeardown && !p.s.out.hasWritten(p.batch) {
		go func() {
			p.s.out.waitWritten(p.batch)
			p.answer(nil, fromRecv) // no burst: the reply leaves at once
		}()
		return
	}
	p.answer(burst, by)
}

func (p *pendingWrite) answer(burst *[]nbd.WriteDone, by finisher) {
	v := p.v
	v.rl.unlock(p.off, p.n)
	v.al.end(p.off, p.n)
	v.gate.RUnlock()
	if p.lerr == nil && v.fc.mode.Load() != uint32(Unfenced) {
		// Fenced while in flight: not acknowledged until the fence lifts
		// (or fails), as in modify; that wait is no place for the
		// receive loop.
		go func() {
			p.w.Done(v.fenced())
			p.w.SendHeld()
		}()
		return
	}
	p.w.Done(p.lerr)
	switch {
	case burst != nil:
		*burst = append(*burst, p.w)
	case by != fromReader:
		p.w.SendHeld()
	}
}

// sendHeldReplies sends the replies the receive loop held for its burst.
func (s *session) sendHeldReplies() {
	for i, w := range s.burst {
		w.SendHeld()
		s.burst[i] = nil
	}
	s.burst = s.burst[:0]
}

// In async mode the application's writes are copied into the send batch
// and sendLoop is woken to write it. While the NBD server serves a burst
// of writes on its reader, the wake waits for the burst's end
// (nbd.Plugger): one wake-up and one send per burst instead of one per
// write. plugMaxHeld bounds what a plug may hold back.
const plugMaxHeld = 256 << 10

// PlugBurst defers sendLoop's wake-up for async writes (nbd.Plugger).
func (v *Volume) PlugBurst() { v.plugs.Add(1) }

// UnplugBurst ends a PlugBurst; the last one wakes sendLoop.
func (v *Volume) UnplugBurst() {
	if v.plugs.Add(-1) == 0 && v.link != nil {
		if s := v.link.current(); s != nil {
			s.wake()
		}
	}
}
