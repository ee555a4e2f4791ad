package wan

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
)

// readBufferSize is the bufio buffer under a Reader. 256 KiB holds dozens of small
// frames, so a burst of acks or 4 KiB writes costs one read syscall, not one per frame.
const readBufferSize = 256 << 10

// retainMax is the largest payload buffer a Reader keeps for reuse: a resync frame
// (4 MiB) reuses one buffer instead of a fresh allocation each. Larger payloads get
// a buffer of their own that is dropped after use, so one 32 MiB write does not pin
// 32 MiB per peer for the life of the connection.
const retainMax = 4 << 20

// Reader decodes frames from a stream.
//
// ReadFrame returns a frame whose Payload aliases an internal buffer valid until the
// next ReadFrame call, unless the caller takes ownership with Detach, which returns
// the payload slice and makes the Reader allocate a fresh buffer next time (lets the
// engine hand write data to another goroutine without a copy).
//
// Limits: data frames (FrameWrite, FrameResyncData) carry at most MaxData bytes,
// FrameBitmap at most MaxBitmapChunk, all others at most MaxControl; more is
// ErrFrameTooBig. An unknown type, a nonzero reserved field, an undefined flag, a
// wrong size for a fixed payload or a byte range that wraps past 2^64 is
// ErrMalformed. Errors are sticky: once ReadFrame fails the stream position is lost
// and every later call returns the same error. A clean end of stream at a frame
// boundary is io.EOF, unwrapped; anywhere else it is io.ErrUnexpectedEOF.
//
// A Reader is not safe for concurrent use.
type Reader struct {
	br  *bufio.Reader
	hdr [HeaderSize]byte
	// buf is the reusable payload buffer; payload is the last payload returned.
	buf []byte
	// zbuf holds a compressed payload while it is decompressed into buf; dec is
	// set once compression is negotiated.
	zbuf    []byte
	dec     *zstd.Decoder
	payload []byte
	err     error
	// handshake restricts the accepted types to those of the handshake, checked
	// before the payload is read: an unauthenticated peer must not be able to make
	// us allocate a 32 MiB data buffer.
	handshake bool
}

// NewReader returns a Reader that decodes frames from r, buffering 256 KiB.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, readBufferSize)}
}

// ReadFrame reads and validates the next frame.
func (r *Reader) ReadFrame() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.readFrame()
	if err != nil {
		r.err = err
		r.payload = nil
		return Frame{}, err
	}
	return f, nil
}

func (r *Reader) readFrame() (Frame, error) {
	r.payload = nil
	if cap(r.buf) > retainMax {
		r.buf = nil
	}
	if cap(r.zbuf) > retainMax {
		r.zbuf = nil
	}
	if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		if err == io.EOF {
			return Frame{}, io.EOF
		}
		return Frame{}, fmt.Errorf("wan: read frame header: %w", err)
	}
	var f Frame
	if err := parseHeader(r.hdr[:], &f.Header); err != nil {
		if r.handshake && looksLikeTLS(r.hdr[:]) {
			return Frame{}, fmt.Errorf("%w: the peer speaks TLS, this node plaintext (enable peer.tls here): %w", ErrTLSMismatch, err)
		}
		return Frame{}, err
	}
	if r.handshake && f.Type != FrameHello && f.Type != FrameAuth && f.Type != FrameClose {
		return Frame{}, fmt.Errorf("%w: %v frame during the handshake", ErrMalformed, f.Type)
	}
	zipped := f.Flags&FlagZstd != 0
	if zipped && r.dec == nil {
		return Frame{}, fmt.Errorf("%w: compressed %v frame, but compression was not negotiated", ErrMalformed, f.Type)
	}
	n := int(f.Length)
	if n > 0 {
		dst := &r.buf
		if zipped {
			dst = &r.zbuf
		}
		if cap(*dst) < n {
			// Exact size: a detached buffer should not carry slack the engine then
			// holds on to while the data waits for the disk.
			*dst = make([]byte, n)
		}
		p := (*dst)[:n]
		if _, err := io.ReadFull(r.br, p); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Frame{}, fmt.Errorf("wan: read %v payload of %d bytes: %w", f.Type, n, err)
		}
		f.Payload = p
	}
	if zipped {
		p, err := decompress(r.dec, &f.Header, f.Payload, r.buf)
		if err != nil {
			return Frame{}, err
		}
		r.buf, f.Payload = p, p
	}
	if err := checkPayload(&f.Header, f.Payload); err != nil {
		return Frame{}, err
	}
	r.payload = f.Payload
	return f, nil
}

// Detach hands the caller the payload of the last frame ReadFrame returned; it stays
// valid for good, and the Reader will not write into it again. It returns nil when
// there is nothing to detach (no frame yet, an empty payload, or already detached).
func (r *Reader) Detach() []byte {
	p := r.payload
	if p == nil {
		return nil
	}
	r.payload = nil
	r.buf = nil
	return p[:len(p):len(p)]
}

// EnableDecompression makes the Reader accept compressed data frames from now on
// (after a handshake in which both sides set HelloZstd); before, one is
// ErrMalformed. Decompressed frames are returned as if sent raw.
func (r *Reader) EnableDecompression() {
	if r.dec == nil {
		r.dec = newDecoder()
	}
}

// Buffered returns the number of bytes already read from the stream but not yet
// decoded; a caller can use it to tell whether another frame is immediately at hand
// (and, for instance, delay a flush of acks until it is not).
func (r *Reader) Buffered() int { return r.br.Buffered() }
