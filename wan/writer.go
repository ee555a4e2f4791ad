package wan

import (
	"fmt"
	"io"
	"net"
)

// zeroCopyMin is the payload size from which a Writer over a net.Conn stops copying
// payloads into its buffer and hands them to the kernel in place (writev). Below it
// the copy is cheaper than an extra iovec.
const zeroCopyMin = 64 << 10

// ZeroCopyMin is the payload size from which a Writer over a net.Conn sends the
// payload in place: the caller's buffer is read until the Flush that writes it
// returns.
const ZeroCopyMin = zeroCopyMin

// keepMax is the largest encode buffer a Writer keeps between batches; a rare huge
// batch should not pin its memory for the life of the connection.
const keepMax = 4 << 20

// Writer encodes frames into a buffer; nothing reaches the stream until Flush, so a
// sender can batch many frames into one syscall.
//
// When the underlying writer is a net.Conn, payloads of 64 KiB or more are not
// copied: the Writer keeps a reference and Flush writes them with net.Buffers
// (writev). The caller must therefore leave a payload passed to WriteFrame
// untouched until the next Flush returns. Smaller payloads, and all payloads on
// other writers, are copied and may be reused as soon as WriteFrame returns.
//
// A write error is sticky: the stream may hold a partial frame, so every later call
// returns the same error. A Writer is not safe for concurrent use.
type Writer struct {
	w      io.Writer
	isConn bool
	buf    []byte
	// large lists payloads not copied into buf, each to be sent after buf[:at].
	large []largePayload
	n     int // bytes pending: len(buf) plus the large payloads
	vec   [][]byte
	nb    net.Buffers // a field so that (&nb).WriteTo does not allocate
	err   error
	z     *Compressor // nil: data frames go raw
}

// BuffersWriter is implemented by a net.Conn wrapper that can pass a vector
// of buffers on in one writev (net.Buffers finds writev only on the
// standard library's own connections). It consumes b as net.Buffers.WriteTo
// does.
type BuffersWriter interface {
	WriteBuffers(b *net.Buffers) (int64, error)
}

type largePayload struct {
	at int
	p  []byte
}

// NewWriter returns a Writer that encodes frames to w.
func NewWriter(w io.Writer) *Writer {
	_, isConn := w.(net.Conn)
	return &Writer{w: w, isConn: isConn}
}

// WriteFrame validates and buffers one frame. It sets h.Length to len(payload); an
// invalid frame (see Reader for the rules) is refused with an error wrapping
// ErrMalformed or ErrFrameTooBig and leaves the Writer unchanged.
func (w *Writer) WriteFrame(h Header, payload []byte) error {
	if w.err != nil {
		return w.err
	}
	if h.Type.known() && len(payload) > rules[h.Type].max {
		return fmt.Errorf("%w: %v payload of %d bytes, limit %d", ErrFrameTooBig, h.Type, len(payload), rules[h.Type].max)
	}
	h.Length = uint32(len(payload))
	if err := checkHeader(&h); err != nil {
		return err
	}
	if err := checkPayload(&h, payload); err != nil {
		return err
	}
	if h.Flags&FlagZstd != 0 {
		return fmt.Errorf("%w: FlagZstd on %v: the Writer sets it when it compresses", ErrMalformed, h.Type)
	}
	if w.z != nil && compressible(h.Type) {
		if buf, ok := w.z.appendFrame(w.buf, h, payload); ok {
			w.n += len(buf) - len(w.buf)
			w.buf = buf
			return nil
		}
	}
	start := len(w.buf)
	w.buf = append(w.buf, make([]byte, HeaderSize)...)
	putHeader(w.buf[start:], &h)
	if w.isConn && len(payload) >= zeroCopyMin {
		w.large = append(w.large, largePayload{at: len(w.buf), p: payload})
	} else {
		w.buf = append(w.buf, payload...)
	}
	w.n += HeaderSize + len(payload)
	return nil
}

// EnableCompression makes the Writer compress data frames with c from now on (after
// a handshake in which both sides set HelloZstd). Several Writers of one stream may
// share c.
func (w *Writer) EnableCompression(c *Compressor) { w.z = c }

// Buffered returns the number of bytes waiting for Flush.
func (w *Writer) Buffered() int { return w.n }

// Flush writes every buffered frame to the stream.
func (w *Writer) Flush() error {
	if w.err != nil {
		return w.err
	}
	if w.n == 0 {
		return nil
	}
	var err error
	if len(w.large) == 0 {
		var n int
		n, err = w.w.Write(w.buf)
		if err == nil && n != len(w.buf) {
			err = io.ErrShortWrite
		}
	} else {
		vec := w.vec[:0]
		prev := 0
		for _, l := range w.large {
			if l.at > prev {
				vec = append(vec, w.buf[prev:l.at])
			}
			vec = append(vec, l.p)
			prev = l.at
		}
		if prev < len(w.buf) {
			vec = append(vec, w.buf[prev:])
		}
		w.nb = vec
		if bw, ok := w.w.(BuffersWriter); ok {
			_, err = bw.WriteBuffers(&w.nb)
		} else {
			_, err = w.nb.WriteTo(w.w)
		}
		// Drop references to caller payloads so they can be collected.
		clear(vec)
		w.vec = vec[:0]
		w.nb = nil
		clear(w.large)
		w.large = w.large[:0]
	}
	w.n = 0
	if cap(w.buf) > keepMax {
		w.buf = nil
	} else {
		w.buf = w.buf[:0]
	}
	if err != nil {
		w.err = fmt.Errorf("wan: flush: %w", err)
		return w.err
	}
	return nil
}
