package mirror

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mirrord/mirrord/bitmap"
	"github.com/mirrord/mirrord/nbd"
	"github.com/mirrord/mirrord/wan"
)

// session is one authenticated connection to the peer. The primary side
// ships writes, resync data and verify requests and keeps a transfer log of
// everything not yet acknowledged; the secondary side applies in stream
// order and acknowledges. When the session ends, every unacknowledged write
// becomes a dirty bit: exactly the regions the peer may lack.
type session struct {
	l *link
	v *Volume
	// conn is the TCP connection (under the rate cap), closed to end the
	// session; r and w frame the stream over it (TLS, if on).
	conn net.Conn
	r    *wan.Reader
	w    *wan.Writer
	peer wan.Hello
	zstd bool // data frames are compressed both ways
	// polls: the receive loop polls the socket while frames flow
	// (busypoll), which keeps a P busy: no keepAwake (awake.go).
	polls bool

	// out carries every frame after the handshake, with group commit. In
	// sync mode the goroutine that has a frame writes it itself (no
	// hand-off to another goroutine). In async mode frames are encoded
	// (copied) into out and sendLoop does the writing, so that a slow link
	// never blocks the application.
	out *sendPath

	// qmu guards the transfer log and the state below.
	qmu     sync.Mutex
	seq     uint64
	tl      map[uint64]*tlEntry
	unacked int64 // async bytes sent or buffered, not acknowledged
	closed  bool
	err     error
	repl    ReplState
	kick    chan struct{}
	jkick   chan struct{} // the journal has records to send
	done    chan struct{}
	// room wakes the journal drainer when acknowledgements free window
	// space (L is qmu).
	room sync.Cond
	// lagq holds the write time of async writes in flight, in sequence
	// order (acks arrive in that order): its head is the age of the
	// oldest write the peer lacks.
	lagq     []lagMark
	lagFirst int

	// spos is the async stream position of the last write frame
	// sequenced (stream.go).
	spos uint64

	loops    sync.WaitGroup
	failOnce sync.Once

	lastRecv       atomic.Int64 // unix nanos
	lastAck        atomic.Int64 // unix nanos of the last acknowledgement (progress)
	lastCheckpoint atomic.Int64 // unix nanos of the target's last bitmap checkpoint
	// epoch changes whenever bits may be set for live writes during the
	// session (going Ahead); a resync ack only clears bits set before it.
	epoch   atomic.Uint64
	ahead   atomic.Bool
	awake   atomic.Bool   // keepAwake holds a P in a system call (awake.go)
	awakeMu sync.Mutex    // held by keepAwake while it may hold the P
	frames  atomic.Uint64 // frames received, for keepAwake

	// Secondary side.
	applying sync.WaitGroup
	syncing  atomic.Bool // we are the sync target of a running resync
	// held replies since the last flush, and when the first was held
	// (holdMode; the receive loop's own).
	held      int
	heldSince time.Time
	// fullSync: this session's resync rewrites the whole disk (unrelated
	// data, split-brain resolution), so no undo log: it would be as large
	// as the volume.
	fullSync bool
	// Stream position of the last async write applied, and whether this
	// disk is that prefix of the stream (stream.go); the receive loop's.
	rstream, rpos uint64
	rvalid        bool
	// streamed: both Hellos had HelloStream and positions were exchanged.
	streamed bool

	// burst: WriteAsync writes the receive loop answered while more
	// frames were buffered; their replies leave at the burst's end.
	burst []nbd.WriteDone

	incoming      *bitmap.Bitmap // on a sync target: what the source still sends
	resync        resyncProgress
	resyncRunning atomic.Bool // one resync loop per session
	verifyMu      sync.Mutex
	verify        *verifyRun
}

type entryKind uint8

const (
	entWrite entryKind = iota
	entFlush
	entResync
	entDigest
)

// tlEntry is one request in the transfer log.
type tlEntry struct {
	kind   entryKind
	off, n int64
	cost   int64  // writes: bytes in flight, held in the async window (op.cost)
	batch  uint64 // sendPath batch that carries the frame (sync writes)
	sent   time.Time
	done   chan error    // sync waiters; nil for async
	pw     *pendingWrite // a sync write from WriteAsync
	epoch  uint64
	digest [32]byte
	// journaled writes: the record's sequence in the journal; written is
	// when the application wrote it (unix nanos), for the lag.
	journaled bool
	jseq      uint64
	written   int64
	spos      uint64 // async writes: stream position (stream.go)
}

type lagMark struct {
	seq     uint64
	written int64
}

// establish authenticates a fresh connection, compares generations and
// exchanges bitmaps. On success the returned session is ready to run.
func (l *link) establish(tcp net.Conn, dialed bool) (*session, error) {
	v := l.v
	if tc, ok := tcp.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	_ = tcp.SetDeadline(time.Now().Add(handshakeTimeout))
	c, stream, binding, err := l.secure(tcp, dialed)
	if err != nil {
		return nil, err
	}
	s := &session{
		l: l, v: v, conn: c, polls: c.polls(), r: wan.NewReader(stream), w: wan.NewWriter(stream),
		tl: make(map[uint64]*tlEntry), kick: make(chan struct{}, 1), jkick: make(chan struct{}, 1), done: make(chan struct{}),
	}
	s.resync.cond.L = &s.resync.mu
	s.room.L = &s.qmu
	own := v.hello()
	own.Flags |= wan.HelloCatchUp
	if l.cfg.Compress {
		own.Flags |= wan.HelloZstd
	}
	own.Flags |= wan.HelloStream
	if l.noOptional.Load() {
		own.Flags &^= wan.HelloOptional
	}
	peer, err := wan.HandshakeBound(s.r, s.w, own, l.cfg.Secret, binding)
	if err != nil {
		if errors.Is(err, wan.ErrHelloRefused) && own.Flags&wan.HelloOptional != 0 && !l.noOptional.Swap(true) {
			l.log.Warn().Uint16("flags", own.Flags).
				Msg("peer refused optional hello flags (an older build): sending none from now on; an interrupted resync restarts in full")
		}
		return nil, fmt.Errorf("handshake with %s: %w", c.RemoteAddr(), err)
	}
	s.peer = peer
	primary := v.Role() == RolePrimary
	var ownStream, peerStream wan.StreamPos
	if s.streamed = own.Flags&peer.Flags&wan.HelloStream != 0; s.streamed {
		ownStream = l.ownStream(primary)
		if peerStream, err = wan.ExchangeStream(s.r, s.w, ownStream); err != nil {
			return nil, fmt.Errorf("stream position exchange with %s: %w", c.RemoteAddr(), err)
		}
	}
	if s.zstd = l.cfg.Compress && peer.Flags&wan.HelloZstd != 0; s.zstd {
		s.r.EnableDecompression()
	}
	refuse := func(format string, a ...any) (*session, error) {
		msg := fmt.Sprintf(format, a...)
		_ = s.w.WriteFrame(wan.Header{Type: wan.FrameClose}, []byte(msg))
		_ = s.w.Flush()
		return nil, errors.New(msg)
	}
	switch {
	case peer.Node != l.cfg.Node:
		return refuse("peer calls itself %q, configured peer is %q", peer.Node, l.cfg.Node)
	case peer.Volume != v.name:
		return refuse("peer serves volume %q, this node %q: wrong volume", peer.Volume, v.name)
	case peer.Size != uint64(v.size):
		return refuse("peer volume is %d bytes, this node's %d: size mismatch", peer.Size, v.size)
	case peer.RegionSize != uint32(v.dirty.RegionSize()):
		return refuse("peer region size %d, this node's %d", peer.RegionSize, v.dirty.RegionSize())
	case Mode(peer.Mode) != l.cfg.Mode:
		return refuse("peer replicates in %s mode, this node in %s", Mode(peer.Mode), l.cfg.Mode)
	}
	local, remote := v.nodeState(), helloState(peer)
	d := decide(local, remote)
	l.log.Info().Str("decision", d.Action.String()).Bool("full", d.Full).Str("reason", d.Reason).
		Str("local_gen", genString(local.Gen)).Str("peer_gen", genString(remote.Gen)).Msg("peer connected")
	switch d.Action {
	case ActSplitBrain:
		l.enterSplitBrain(d.Reason)
		return refuse("split brain: %s", d.Reason)
	case ActUnrelated, ActNoSource, ActBothPrimary, ActPrimaryBehind, ActPeerPrimaryBehind:
		return refuse("%s: %s", d.Action, d.Reason)
	}
	peerBM, err := s.exchangeBitmaps()
	if err != nil {
		return nil, fmt.Errorf("bitmap exchange: %w", err)
	}
	replay := s.streamed && s.replayAgreed(d, primary, ownStream, peerStream, peerBM)
	if !replay && l.journal != nil && l.journal.dropRetained() {
		l.log.Info().Str("decision", d.Action.String()).Uint64("peer_pos", peerStream.Pos).Uint64("replay_from", ownStream.Replay).
			Msg("the journal does not continue the peer's stream: dropped, the bitmap carries it")
	}
	role := ReplEstablished
	switch {
	case replay:
		if err := s.startReplay(primary, ownStream, peerStream); err != nil {
			return refuse("replay: %v", err)
		}
		d.Reason = "the Primary replays its journal from the Secondary's stream position"
	case d.Action == ActSource || (d.Action == ActNone && primaryFirst(local, remote)):
		if d.Full {
			v.dirty.SetAll()
		} else if err := v.dirty.Merge(peerBM); err != nil {
			return nil, err
		}
		if d.Action == ActSource || v.dirty.Count() > 0 {
			role = ReplSyncSource
		}
	default: // target, or same generation with the peer as the source
		// The source owns the list of what to send. Here only a copy of
		// it lives, for progress, in the session: persisting it as ours
		// would make a target that crashes mid-resync ask for everything
		// again. Our own bits (changes the source never saw) went to the
		// source in the exchange and are cleared as their regions arrive.
		if d.Full {
			peerBM.SetAll()
		}
		if err := peerBM.Merge(v.dirty); err != nil {
			return nil, err
		}
		s.incoming = peerBM
		if d.Action == ActTarget || peerBM.Count() > 0 {
			role = ReplSyncTarget
			s.resync.start(peerBM.DirtyBytes())
			// Live writes may arrive before the first resync data and
			// are newer than what this disk lacks: protect the image
			// from the first frame.
			s.fullSync = d.Full
			if !d.Full {
				if err := v.beginUndo(); err != nil {
					return refuse("start undo log: %v", err)
				}
			}
			// An interrupted catch-up's log (the disk is Inconsistent,
			// so this resync is full) still guards the last image.
			if err := v.undoRoom(); err != nil {
				return refuse("%v", err)
			}
		}
	}
	if d.Action == ActNone && role == ReplEstablished && v.Role() == RoleSecondary {
		v.adoptGeneration(peer.Gen)
	}
	if d.Action == ActTarget || d.Action == ActSource || role != ReplEstablished {
		_ = v.clearSplitBrainFlag()
	}
	_ = c.SetDeadline(time.Time{})
	s.out = newSendPath(stream, l.cfg.Mode == ModeAsync)
	if s.zstd {
		s.out.enableCompression(l.zstd)
	}
	s.repl = role
	s.startStream(primary, peerStream, role)
	if replay {
		s.replayStream(primary, ownStream, peerStream)
	}
	s.lastRecv.Store(time.Now().UnixNano())
	s.lastAck.Store(s.lastRecv.Load())
	if role == ReplSyncSource {
		s.resync.start(v.dirty.DirtyBytes())
		l.markBehind()
	}
	l.mu.Lock()
	l.sess.Store(s)
	l.conn = ConnConnected
	l.reason = d.Reason
	p := peer
	l.peerHello = &p
	l.cond.Broadcast()
	l.mu.Unlock()
	return s, nil
}

// exchangeBitmaps sends our bitmap while reading the peer's (both at once,
// so that large bitmaps cannot deadlock on full socket buffers).
func (s *session) exchangeBitmaps() (*bitmap.Bitmap, error) {
	enc, err := s.v.dirty.MarshalBinary()
	if err != nil {
		return nil, err
	}
	sendErr := make(chan error, 1)
	go func() {
		for len(enc) > 0 {
			n := min(len(enc), wan.MaxBitmapChunk)
			var flags uint8
			if n == len(enc) {
				flags = wan.FlagLast
			}
			if err := s.w.WriteFrame(wan.Header{Type: wan.FrameBitmap, Flags: flags}, enc[:n]); err != nil {
				sendErr <- err
				return
			}
			enc = enc[n:]
		}
		sendErr <- s.w.Flush()
	}()
	var buf bytes.Buffer
	for {
		f, err := s.r.ReadFrame()
		if err != nil {
			return nil, err
		}
		if f.Type == wan.FrameClose {
			return nil, fmt.Errorf("peer refused: %s", f.Payload)
		}
		if f.Type != wan.FrameBitmap {
			return nil, fmt.Errorf("%w: %s during bitmap exchange", wan.ErrMalformed, f.Type)
		}
		if buf.Len()+len(f.Payload) > 64<<20 {
			return nil, fmt.Errorf("%w: bitmap larger than 64 MiB", wan.ErrMalformed)
		}
		buf.Write(f.Payload)
		if f.Flags&wan.FlagLast != 0 {
			break
		}
	}
	if err := <-sendErr; err != nil {
		return nil, err
	}
	bm, err := bitmap.Decode(buf.Bytes())
	if err != nil {
		return nil, err
	}
	if bm.Size() != s.v.size || bm.RegionSize() != s.v.dirty.RegionSize() {
		return nil, fmt.Errorf("%w: peer bitmap geometry", bitmap.ErrMismatch)
	}
	return bm, nil
}

// run starts the session's goroutines; done closes when it has ended and
// the transfer log has been folded into the bitmap.
func (s *session) run() {
	source := s.repl == ReplSyncSource // read before the loops may change it
	s.loops.Add(4)
	if j := s.l.journal; j != nil {
		j.attach(s)
		s.loops.Add(1)
		go s.drainLoop()
	}
	go s.sendLoop()
	go s.recvLoop()
	go s.watchdog()
	go s.keepAwake()
	s.v.ev.emit("peer", s.v.Status())
	if source {
		go s.runResync()
	}
}

func (s *session) errString() string {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	if s.err == nil {
		return ""
	}
	return s.err.Error()
}

// fail ends the session (once). It runs the teardown on its own goroutine
// so that the loops themselves may call it.
func (s *session) fail(err error) {
	s.failOnce.Do(func() {
		s.v.sessionDropped() // before any write learns the peer is gone
		s.qmu.Lock()
		s.closed = true
		s.err = err
		s.room.Broadcast()
		s.qmu.Unlock()
		_ = s.conn.Close()
		s.wake()
		select {
		case s.jkick <- struct{}{}:
		default:
		}
		go s.teardown()
	})
}

func (s *session) teardown() {
	s.loops.Wait()
	s.applying.Wait()
	s.out.idle()
	l, v := s.l, s.v
	l.mu.Lock()
	l.sess.CompareAndSwap(s, nil)
	if l.conn == ConnConnected {
		l.conn = ConnConnecting
	}
	l.reason = s.err.Error()
	l.mu.Unlock()
	// Everything the peer did not acknowledge is out of sync. Sync waiters
	// are released only now, after the sender is gone and can no longer
	// touch their buffers. The journal may keep its records for a replay
	// (replay.go) if, before these bits, the bitmap holds only its own.
	j := l.journal
	keep := j != nil && s.keepsStream()
	var (
		sent      map[uint64]uint64
		direct    [][2]int64
		maxDirect uint64
	)
	s.qmu.Lock()
	shipped := s.spos
	if keep {
		sent = make(map[uint64]uint64)
	}
	for seq, e := range s.tl {
		if e.kind == entWrite {
			v.dirty.Set(e.off, e.n)
			switch {
			case !keep || e.done != nil:
			case e.journaled:
				sent[e.jseq] = e.spos
			default:
				direct = append(direct, [2]int64{e.off, e.n})
				maxDirect = max(maxDirect, e.spos)
			}
		}
		if e.done != nil {
			e.done <- errDisconnected
		}
		if e.pw != nil {
			e.pw.finish(nil, fromTeardown)
		}
		delete(s.tl, seq)
	}
	s.lagq, s.lagFirst = nil, 0
	vr := s.verify
	s.qmu.Unlock()
	s.endStream()
	if j != nil {
		// Journaled writes set their bits when they were queued.
		if keep && j.retain(s, l.ownStreamID(), shipped, sent, direct, maxDirect) {
			l.log.Info().Int64("journal_bytes", j.usedBytes()).Msg("peer lost: the journal keeps the stream for a replay")
		} else if err := j.detach(s); err != nil {
			l.log.Error().Err(err).Msg("reset journal after disconnect")
		}
	}
	if v.dirty.Count() > 0 {
		l.markBehind()
	}
	s.resync.wakeAll()
	s.resync.stop()
	if vr != nil {
		vr.mu.Lock()
		vr.cond.Broadcast()
		vr.mu.Unlock()
	}
	if v.al != nil {
		if err := v.al.persistAll(); err != nil {
			l.log.Error().Err(err).Msg("persist bitmap after disconnect")
		}
	}
	l.mu.Lock()
	l.cond.Broadcast()
	l.mu.Unlock()
	close(s.done)
}

func (s *session) wake() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// transmit sends a frame (and, with e, records a transfer-log entry) under
// a new sequence number: written by the caller in sync mode, left for
// sendLoop in async mode. owned, if set, goes back to the pool once the
// frame no longer needs it.
func (s *session) transmit(h wan.Header, payload []byte, owned *[]byte, e *tlEntry) (uint64, bool) {
	mode := sendFlush
	switch {
	case s.l.cfg.Mode == ModeAsync:
		mode = sendHold // async writers copy: the buffer is free at once
	case owned != nil:
		mode = sendWait
	}
	seq, ok := s.direct(h, payload, e, mode)
	putOwned(owned)
	if mode == sendHold && (s.v.plugs.Load() == 0 || s.out.buffered() >= plugMaxHeld) {
		s.wake()
	}
	return seq, ok
}

// direct sends one frame from the calling goroutine. With e it takes a
// sequence number and a transfer-log entry.
func (s *session) direct(h wan.Header, payload []byte, e *tlEntry, mode sendMode) (uint64, bool) {
	var seq uint64
	batch, ok, err := s.out.send(h, payload, mode, func(h *wan.Header) bool {
		s.qmu.Lock()
		defer s.qmu.Unlock()
		if s.closed {
			return false
		}
		if e != nil {
			s.seq++
			h.Seq = s.seq
			seq = h.Seq
			e.sent = time.Now()
			s.tl[h.Seq] = e
			if e.kind == entWrite && e.done == nil && e.pw == nil {
				s.spos++
				e.spos = s.spos
				if e.written == 0 {
					e.written = e.sent.UnixNano()
				}
				s.lagq = append(s.lagq, lagMark{seq: seq, written: e.written})
			}
		}
		return true
	})
	if err != nil {
		s.fail(fmt.Errorf("send: %w", err))
	}
	if e != nil {
		e.batch = batch // read by this goroutine only (replicate)
	}
	if ok {
		s.l.stats.sentBytes.Add(uint64(len(payload) + wan.HeaderSize))
		s.l.shaper.note(h.Type, len(payload)+wan.HeaderSize)
	}
	return seq, ok
}

// flushHeld sends whatever held replies are buffered.
func (s *session) flushHeld() {
	if err := s.out.flushHeld(); err != nil {
		s.fail(fmt.Errorf("send: %w", err))
	}
}

// reply sends a frame that needs no acknowledgement (acks, pongs,
// digests, state); a closing session drops it. The receiver holds the
// flush while more frames are buffered, so acks of a burst share one
// syscall.
func (s *session) reply(h wan.Header, payload []byte) {
	s.direct(h, payload, nil, sendFlush)
}

func (s *session) replyHeld(h wan.Header, payload []byte) {
	s.direct(h, payload, nil, s.holdMode(false))
}

// Replies the receive loop holds for a burst leave after at most
// maxHeldReplies of them or maxReplyHold after the first. Unbounded, the
// first ack of a burst waited for the whole burst to be applied: over a
// WAN a QD32 window arrives in a few bursts (up to all 32 frames), and
// the time from a write frame's read to its ack's flush was 80-150 us on
// average, 150-310 us at p90 (in process, 10 ms RTT, QD32, two loaded
// cores); bounded, 30-57 us and 70-95 us, for the same CPU per write.
// Eight acks still share a syscall.
//
// Acks of stream frames (async writes, resync data) hold up nothing but
// the Primary's window, so up to maxHeldStreamReplies of them share a
// syscall (and, over TLS, a record). Fresh async pairs at 4 KiB QD32: the
// target made 3.4k ack writes a second against 11k with eight, receiving
// about 25 frames per read; IOPS moved within the noise.
const (
	maxHeldReplies       = 8
	maxHeldStreamReplies = 64
	maxReplyHold         = 100 * time.Microsecond
)

// holdMode lets the receiver batch replies while more frames are already
// buffered, within the bounds above (stream: the reply acknowledges a
// stream frame); it must only be called from the receive loop (held and
// heldSince are its own).
func (s *session) holdMode(stream bool) sendMode {
	limit := maxHeldReplies
	if stream {
		limit = maxHeldStreamReplies
	}
	if s.r.Buffered() > 0 && s.held < limit {
		now := time.Now()
		if s.held == 0 {
			s.heldSince = now
		}
		if now.Sub(s.heldSince) < maxReplyHold {
			s.held++
			return sendHold
		}
	}
	s.held = 0
	return sendFlush
}

// sendLoop writes what async writers left in out.
func (s *session) sendLoop() {
	defer s.loops.Done()
	for {
		select {
		case <-s.kick:
		case <-s.done:
			return
		}
		if s.isClosed() {
			return
		}
		s.flushHeld()
	}
}

// watchdog declares the peer lost when it has been silent, or has left a
// request unacknowledged, for longer than the timeout.
func (s *session) watchdog() {
	defer s.loops.Done()
	tick := time.NewTicker(s.l.cfg.PingInterval / 2)
	defer tick.Stop()
	var lastPing time.Time
	for {
		select {
		case <-s.done:
			return
		case <-tick.C:
		}
		if time.Since(lastPing) >= s.l.cfg.PingInterval {
			lastPing = time.Now()
			s.reply(wan.Header{Type: wan.FramePing, Seq: uint64(lastPing.UnixNano())}, nil)
		}
		s.qmu.Lock()
		closed := s.closed
		var oldest time.Time
		for _, e := range s.tl {
			if oldest.IsZero() || e.sent.Before(oldest) {
				oldest = e.sent
			}
		}
		s.qmu.Unlock()
		if closed {
			return
		}
		now := time.Now()
		if silent := now.Sub(time.Unix(0, s.lastRecv.Load())); silent > s.l.cfg.Timeout {
			s.fail(fmt.Errorf("peer silent for %v (timeout %v)", silent.Round(time.Millisecond), s.l.cfg.Timeout))
			return
		}
		// A request waits long when the link is slow (a bandwidth cap, a
		// WAN) and much is queued ahead of it; the peer is lost only when
		// acknowledgements stopped coming too.
		if !oldest.IsZero() && now.Sub(oldest) > s.l.cfg.Timeout && now.Sub(time.Unix(0, s.lastAck.Load())) > s.l.cfg.Timeout {
			s.fail(fmt.Errorf("peer left a request unacknowledged for %v (timeout %v)", now.Sub(oldest).Round(time.Millisecond), s.l.cfg.Timeout))
			return
		}
	}
}

func putOwned(b *[]byte) {
	if b != nil {
		dataPool.Put(b)
	}
}

// dataPool holds resync buffers between the read and the send.
var dataPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// replicate ships o and applies it locally. ok is false when the session
// closed before o was sequenced (the caller then treats the peer as gone).
func (s *session) replicate(o op) (ok bool, err error) {
	v := s.v
	if s.l.cfg.Mode == ModeAsync {
		return s.replicateAsync(o)
	}
	h, payload := writeFrame(o)
	h.Flags |= wan.FlagSync
	e := &tlEntry{kind: entWrite, off: o.off, n: o.n, cost: o.cost(), done: make(chan error, 1)}
	if _, ok := s.direct(h, payload, e, sendFlush); !ok {
		return false, nil
	}
	lerr := v.apply(o)
	if perr := <-e.done; perr != nil && !errors.Is(perr, errDisconnected) {
		s.l.log.Warn().Err(perr).Int64("offset", o.off).Msg("peer failed a write")
	}
	s.out.waitWritten(e.batch) // o.p is the caller's again on return
	return true, lerr
}

// writeFrame is the frame that carries o (payload aliases o.p).
func writeFrame(o op) (wan.Header, []byte) {
	h := wan.Header{Type: wan.FrameWrite, Offset: uint64(o.off)}
	payload := o.p
	if o.kind == opZero {
		h.Type = wan.FrameZero
		payload = wan.PutU64(uint64(o.n))
		if o.mayUnmap {
			h.Flags |= wan.FlagUnmap
		}
	}
	if o.fua {
		h.Flags |= wan.FlagFUA
	}
	return h, payload
}

func (s *session) flush() {
	e := &tlEntry{kind: entFlush}
	if s.l.cfg.Mode == ModeSync {
		e.done = make(chan error, 1)
	}
	if _, ok := s.transmit(wan.Header{Type: wan.FrameFlush}, nil, nil, e); !ok {
		return
	}
	if e.done != nil {
		<-e.done
	}
}

func (s *session) recvLoop() {
	defer s.loops.Done()
	defer s.sendHeldReplies()
	for {
		f, err := s.r.ReadFrame()
		if err != nil {
			if s.l.cfg.TLS != nil {
				err = wan.StreamError(err)
			}
			s.fail(fmt.Errorf("receive: %w", err))
			return
		}
		s.lastRecv.Store(time.Now().UnixNano())
		s.frames.Add(1)
		s.l.stats.recvBytes.Add(uint64(len(f.Payload) + wan.HeaderSize))
		if err := s.handle(f); err != nil {
			s.fail(err)
			return
		}
		if s.r.Buffered() == 0 {
			s.sendHeldReplies()
			s.held = 0
			s.flushHeld()
		}
	}
}

func (s *session) handle(f wan.Frame) error {
	switch f.Type {
	case wan.FrameAck:
		s.acked(f.Seq, f.Errno)
	case wan.FramePing:
		s.replyHeld(wan.Header{Type: wan.FramePong, Seq: f.Seq}, nil)
	case wan.FramePong:
	case wan.FrameWrite, wan.FrameZero, wan.FrameResyncData:
		return s.applyRemote(f)
	case wan.FrameFlush:
		s.applying.Wait()
		errno := uint32(0)
		if err := s.v.syncData(); err != nil {
			errno = 5
		}
		s.replyHeld(wan.Header{Type: wan.FrameAck, Seq: f.Seq, Errno: errno}, nil)
	case wan.FrameResyncDone:
		var g wan.Generations
		if err := g.UnmarshalBinary(f.Payload); err != nil {
			return err
		}
		return s.resyncDone(f.Seq, g)
	case wan.FrameDigestReq:
		return s.digestReq(f)
	case wan.FrameDigest:
		s.digestReply(f)
	case wan.FrameState:
		var st wan.StateUpdate
		if err := st.UnmarshalBinary(f.Payload); err != nil {
			return err
		}
		s.peerState(st)
	case wan.FrameCatchUp:
		return s.catchUpAnnounced(f)
	case wan.FrameStream:
		return s.streamAnnounced(f)
	case wan.FrameBeacon:
		if s.v.onBeacon != nil {
			s.v.onBeacon(f.Payload)
		}
	case wan.FrameClose:
		return fmt.Errorf("peer closed: %s", f.Payload)
	default:
		return fmt.Errorf("%w: unexpected %s", wan.ErrMalformed, f.Type)
	}
	return nil
}

// acked retires a transfer-log entry.
func (s *session) acked(seq uint64, errno uint32) {
	s.lastAck.Store(time.Now().UnixNano())
	s.qmu.Lock()
	e := s.tl[seq]
	delete(s.tl, seq)
	s.qmu.Unlock()
	if e == nil {
		return
	}
	if errno != 0 && e.kind != entDigest {
		// The peer's disk failed the request: out of sync, and the peer's
		// disk is not to be trusted further in this session.
		if e.kind == entWrite || e.kind == entResync {
			s.v.dirty.Set(e.off, e.n)
		}
		s.fail(fmt.Errorf("peer disk error %d at offset %d", errno, e.off))
	}
	switch e.kind {
	case entWrite:
		if e.done != nil {
			e.done <- nil
			break
		}
		if e.pw != nil {
			e.pw.finish(&s.burst, fromRecv)
			break
		}
		s.qmu.Lock()
		for s.lagFirst < len(s.lagq) && s.lagq[s.lagFirst].seq <= seq {
			s.lagFirst++
		}
		if s.lagFirst == len(s.lagq) {
			s.lagq, s.lagFirst = s.lagq[:0], 0
		} else if s.lagFirst > 4096 && 2*s.lagFirst > len(s.lagq) {
			s.lagq = append(s.lagq[:0], s.lagq[s.lagFirst:]...)
			s.lagFirst = 0
		}
		s.qmu.Unlock()
		if e.journaled {
			s.l.journal.ack(s, e.jseq)
		}
		s.release(e.cost)
	case entFlush:
		if e.done != nil {
			e.done <- nil
		}
	case entResync:
		if errno == 0 {
			s.clearSynced(e.off, e.n, e.epoch)
		}
		s.resync.acked(e.n)
	}
}

// applyRemote writes a frame from the Primary onto the local disk. Sync
// writes may be applied concurrently (the Primary never has two
// overlapping ones in flight); everything else is applied in stream order.
func (s *session) applyRemote(f wan.Frame) error {
	v := s.v
	if v.Role() == RolePrimary {
		return errors.New("peer sent writes to a Primary")
	}
	o := op{kind: opWrite, p: f.Payload, off: int64(f.Offset), n: int64(len(f.Payload)), fua: f.Flags&wan.FlagFUA != 0}
	if f.Type == wan.FrameZero {
		n, err := wan.GetU64(f.Payload)
		if err != nil {
			return err
		}
		o = op{kind: opZero, off: int64(f.Offset), n: int64(n), fua: o.fua, mayUnmap: f.Flags&wan.FlagUnmap != 0}
	}
	if o.off < 0 || o.n < 0 || o.off+o.n > v.size {
		return fmt.Errorf("%w: %s past the end (%d+%d > %d)", wan.ErrMalformed, f.Type, o.off, o.n, v.size)
	}
	if f.Type == wan.FrameResyncData && !s.syncing.Load() {
		// The first resync data makes this disk Inconsistent until the
		// source says the resync is done: a half-copied disk must never
		// be promoted as it is. The undo log keeps the image it held
		// before recoverable.
		if !s.fullSync {
			if err := v.beginUndo(); err != nil {
				return err
			}
		}
		if err := v.setDisk(DiskInconsistent); err != nil {
			return err
		}
		s.rvalid = false
		s.l.voidApplied()
		s.syncing.Store(true)
		s.qmu.Lock()
		if s.repl == ReplEstablished {
			// Resync data in an established session: the source went
			// Ahead and is catching up (DRBD's Behind on this side).
			s.repl = ReplBehind
		} else {
			s.repl = ReplSyncTarget
		}
		s.qmu.Unlock()
		go v.ev.emit("peer", v.Status())
	}
	if f.Type == wan.FrameResyncData {
		s.l.stats.resyncBytes.Add(uint64(o.n))
		// Applied in stream order, so the region is current here: forget
		// it, or the next connect (after a cut or a crash) would hand the
		// source the whole original set and restart the resync from zero.
		err := v.applyResync(o, s.incoming)
		if errors.Is(err, ErrUndoFull) {
			return s.pauseCatchUp(err)
		}
		if err == nil {
			v.dirty.ClearRegions(o.off, o.n)
			if s.incoming != nil {
				s.incoming.ClearRegions(o.off, o.n)
			}
			s.resync.acked(o.n)
			s.checkpointTarget()
		}
		s.ackApply(f.Seq, err, s.holdMode(true))
		return nil
	}
	// Small buffered writes are applied here, their acks held for the
	// burst: a page-cache write costs less than the goroutine start, the
	// wake-up and the fresh receive buffer a hand-off needs (measured at
	// 4 KiB QD32: 58 against 30 us of CPU per sync write, both daemons).
	// FUA and large writes, with more frames waiting, run concurrently so
	// that the next frame is read while the disk works.
	if f.Type == wan.FrameWrite && f.Flags&wan.FlagSync != 0 && s.r.Buffered() > 0 &&
		(f.Flags&wan.FlagFUA != 0 || len(f.Payload) > inlineApplyMax) {
		o.p = s.r.Detach()
		s.applying.Add(1)
		go func() {
			defer s.applying.Done()
			s.ackApply(f.Seq, v.applyRemote(o), sendFlush)
		}()
		return nil
	}
	err := v.applyRemote(o)
	if errors.Is(err, ErrUndoFull) {
		return s.pauseCatchUp(err)
	}
	stream := f.Flags&wan.FlagSync == 0
	if stream {
		s.appliedStreamFrame(err)
	}
	s.ackApply(f.Seq, err, s.holdMode(stream))
	return nil
}

// inlineApplyMax is the largest sync write the receive loop applies
// itself while more frames wait.
const inlineApplyMax = 64 << 10

// pauseCatchUp ends the session on a sync target whose undo log is full,
// telling the source why; nothing of the refused write was applied, and
// the next connection is refused until the log has room.
func (s *session) pauseCatchUp(err error) error {
	s.l.log.Warn().Err(err).Int64("undo_bytes", s.v.undoBytes()).Msg("catch-up paused")
	s.reply(wan.Header{Type: wan.FrameClose}, []byte(err.Error()))
	go s.v.ev.emit("undo", s.v.Status())
	return err
}

// checkpointTarget persists the target's shrinking bitmap now and then,
// so that a target crash resumes the resync instead of repeating it.
func (s *session) checkpointTarget() {
	now := time.Now().UnixNano()
	last := s.lastCheckpoint.Load()
	if now-last < int64(5*time.Second) || !s.lastCheckpoint.CompareAndSwap(last, now) {
		return
	}
	if err := s.v.al.persistAll(); err != nil {
		s.l.log.Error().Err(err).Msg("checkpoint bitmap on the sync target")
	}
}

func (s *session) ackApply(seq uint64, err error, mode sendMode) {
	errno := uint32(0)
	if err != nil {
		errno = 5
		s.l.log.Error().Err(err).Msg("applying peer write failed")
	}
	s.direct(wan.Header{Type: wan.FrameAck, Seq: seq, Errno: errno}, nil, nil, mode)
}

func (s *session) peerState(st wan.StateUpdate) {
	l := s.l
	l.mu.Lock()
	if l.peerHello != nil {
		l.peerHello.Role = st.Role
		l.peerHello.Disk = st.Disk
		l.peerHello.Gen = st.Gen
	}
	l.mu.Unlock()
	s.qmu.Lock()
	established := s.repl == ReplEstablished
	s.qmu.Unlock()
	// A Secondary in sync follows the Primary's generation (a pristine
	// pair's first promotion, say).
	if established && Role(st.Role) == RolePrimary && s.v.Role() == RoleSecondary && st.Gen.Bitmap == 0 {
		s.v.adoptGeneration(st.Gen)
	}
	s.v.ev.emit("peer", s.v.Status())
}

// sendState tells the peer about a role or generation change.
func (s *session) sendState() {
	st := wan.StateUpdate{Role: uint8(s.v.Role()), Disk: uint8(s.v.Disk()), Gen: s.v.wanGen()}
	b, err := st.MarshalBinary()
	if err != nil {
		return
	}
	s.reply(wan.Header{Type: wan.FrameState}, b)
}

func (s *session) replState() ReplState {
	s.qmu.Lock()
	defer s.qmu.Unlock()
	return s.repl
}
