package mirror

import (
	"io"
	"sync"

	"github.com/mirrord/mirrord/wan"
)

// sendPath writes frames to the peer with group commit: a goroutine that
// finds no write in progress becomes the flusher and writes the batch
// outside the lock; frames added meanwhile go into the other buffer and
// leave with the flusher's next write. Under load one syscall carries many
// frames; alone, a frame leaves at once. Measured: per-frame writes cost
// more CPU than everything else in the sync write path put together.
type sendPath struct {
	mu       sync.Mutex
	cond     sync.Cond
	cur, alt *wan.Writer
	flushing bool
	batch    uint64 // id of the batch cur is collecting
	written  uint64 // batches up to this id are on the wire
	err      error
}

// newSendPath returns a send path over w. With copying set every payload
// is copied into the batch (async writers return before it is written);
// otherwise large payloads are written in place and the caller keeps them
// valid until they are on the wire.
func newSendPath(w io.Writer, copying bool) *sendPath {
	if copying {
		w = plainWriter{w} // hides net.Conn, so wan.Writer copies everything
	}
	p := &sendPath{cur: wan.NewWriter(w), alt: wan.NewWriter(w), batch: 1}
	p.cond.L = &p.mu
	return p
}

// enableCompression makes both batch writers compress data frames; called
// before the first send.
func (p *sendPath) enableCompression(c *wan.Compressor) {
	p.cur.EnableCompression(c)
	p.alt.EnableCompression(c)
}

// sendMode says what send waits for.
type sendMode uint8

const (
	// sendFlush: the frame leaves now (this goroutine flushes, or the
	// current flusher will).
	sendFlush sendMode = iota
	// sendHold: leave it for a later frame's flush (the receiver batching
	// acks while more requests are buffered); the caller promises a
	// flushHeld.
	sendHold
	// sendWait: return only once the frame is on the wire, because the
	// caller reuses the payload (large payloads are not copied).
	sendWait
)

// send adds one frame and returns the batch that carries it (see
// waitWritten). before, if set, runs under the lock just before the frame
// is encoded (sequence numbers are assigned there so that stream order and
// sequence order agree).
func (p *sendPath) send(h wan.Header, payload []byte, mode sendMode, before func(*wan.Header) bool) (uint64, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return 0, false, p.err
	}
	if before != nil && !before(&h) {
		return 0, false, nil
	}
	if err := p.cur.WriteFrame(h, payload); err != nil {
		p.err = err
		return 0, true, err
	}
	id := p.batch
	switch {
	case mode == sendHold:
	case !p.flushing:
		p.flushLocked()
	case mode == sendWait:
		for p.written < id && p.err == nil {
			p.cond.Wait()
		}
	}
	return id, true, p.err
}

// waitWritten returns once batch id has left (or the path failed). A sync
// writer whose payload went out in place calls it before reusing the
// buffer: the peer's ack proves the bytes arrived, but another goroutine's
// writev of the same batch may still be running, and only this lock orders
// its end before the reuse (the race detector, rightly, sees no other).
func (p *sendPath) waitWritten(id uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.written < id && p.err == nil {
		p.cond.Wait()
	}
}

// flushHeld sends held frames unless a flusher is already at work.
func (p *sendPath) flushHeld() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.flushing && p.err == nil {
		p.flushLocked()
	}
	return p.err
}

// flushLocked writes batches until none is pending; mu is held on entry
// and exit, released around each write.
func (p *sendPath) flushLocked() {
	p.flushing = true
	for p.cur.Buffered() > 0 && p.err == nil {
		w, id := p.cur, p.batch
		p.cur, p.alt = p.alt, p.cur
		p.batch++
		p.mu.Unlock()
		err := w.Flush()
		p.mu.Lock()
		if err != nil {
			p.err = err
		}
		p.written = id
		p.cond.Broadcast()
	}
	p.flushing = false
	p.cond.Broadcast()
}

// idle waits until no flusher is writing (teardown: payloads referenced by
// a batch must not be released while it is being written).
func (p *sendPath) idle() {
	p.mu.Lock()
	for p.flushing {
		p.cond.Wait()
	}
	p.mu.Unlock()
}

type plainWriter struct{ io.Writer }
