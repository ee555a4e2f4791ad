package wan

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
)

// Compression of data frames.
//
// Only FrameWrite and FrameResyncData payloads are compressed, each on its own
// (one zstd frame per payload): a frame stays self-contained, so the group-commit
// writer, the zero-copy path for raw payloads and the strict per-frame checks all
// keep working, and a lost connection loses no compression state. Measured at
// zstd's fastest level (BENCHMARKS.md): log text compresses 2.9x in 4 KiB
// frames and 3.8x in 1 MiB frames, an ext4 image of source files 12.5x; a
// shared stream context would gain a little on 4 KiB writes and cost a flush
// per batch.
//
// A compressed frame has FlagZstd set and the payload
//
//	u32 big-endian: length of the payload before compression (<= MaxData)
//	a zstd frame of exactly that many bytes
//
// The length comes first so that the receiver checks the byte range and sizes its
// buffer before it decompresses anything: a peer cannot make it inflate more than
// MaxData. The Reader hands callers the decompressed frame with FlagZstd cleared,
// so nothing above this package sees compression.

// FlagZstd marks a compressed data payload (FrameWrite, FrameResyncData).
const FlagZstd uint8 = 1 << 4

// HelloZstd is the Hello.Flags bit saying the sender wants compressed data frames
// and can decode them. Both sides must set it; then each compresses what it sends.
// A peer of an older build refuses the bit as a malformed hello (it names the
// flag), which is the clear refusal an operator needs to upgrade both nodes.
const HelloZstd uint16 = 1 << 2

// compressMin is the smallest payload worth compressing: below it the zstd frame
// header and the length prefix eat most of the gain.
const compressMin = 512

// zstdPrefix is the size of the raw-length prefix of a compressed payload.
const zstdPrefix = 4

// maxSkip bounds how many data frames are sent raw, untried, after incompressible
// ones. Trying costs about as much as compressing; after a run of failures only one
// frame in maxSkip+1 is tried, so incompressible data costs ~3% of the trial CPU,
// and a switch back to compressible data is noticed within maxSkip frames.
const maxSkip = 31

// Compressor compresses the data frames of the Writers it is given to. Its counters
// may be read at any time; Writers using it must not call WriteFrame concurrently
// (they share the skip state), which the one-writer-at-a-time rule of a stream
// already gives.
type Compressor struct {
	enc  *zstd.Encoder
	skip int // frames left to send raw without trying
	run  int // current skip length, doubled on each failure

	raw, wire     atomic.Uint64
	tried, failed atomic.Uint64
}

// NewCompressor returns a Compressor at zstd's fastest level, the one that keeps up
// with a 10 Gbit link on one core; higher levels gain a few percent on a WAN and cost
// latency on every write.
func NewCompressor() *Compressor {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1), zstd.WithZeroFrames(true))
	if err != nil {
		panic(fmt.Sprintf("wan: zstd encoder: %v", err)) // only bad options fail
	}
	return &Compressor{enc: enc}
}

// CompressionStats are a Compressor's counters: RawBytes of data payloads offered,
// WireBytes they took on the wire (compressed or not), and how many payloads were
// tried and found incompressible.
type CompressionStats struct {
	RawBytes, WireBytes   uint64
	Tried, Incompressible uint64
}

// Ratio is RawBytes/WireBytes, 1 before any data.
func (s CompressionStats) Ratio() float64 {
	if s.WireBytes == 0 {
		return 1
	}
	return float64(s.RawBytes) / float64(s.WireBytes)
}

// Stats returns the counters.
func (c *Compressor) Stats() CompressionStats {
	return CompressionStats{RawBytes: c.raw.Load(), WireBytes: c.wire.Load(), Tried: c.tried.Load(), Incompressible: c.failed.Load()}
}

func compressible(t FrameType) bool { return t == FrameWrite || t == FrameResyncData }

// appendFrame appends the compressed frame (header and payload) to buf and returns
// it, or returns buf unchanged and false when the payload is not worth sending
// compressed. h is valid for the raw payload.
func (c *Compressor) appendFrame(buf []byte, h Header, payload []byte) ([]byte, bool) {
	n := len(payload)
	if n < compressMin {
		c.account(n, n)
		return buf, false
	}
	if c.skip > 0 {
		c.skip--
		c.account(n, n)
		return buf, false
	}
	c.tried.Add(1)
	start := len(buf)
	buf = append(buf, make([]byte, HeaderSize+zstdPrefix)...)
	buf = c.enc.EncodeAll(payload, buf)
	z := len(buf) - start - HeaderSize
	// Keep it only when it saves at least 1/8: below that (fio's scrambled
	// buffers save 11%) both ends spend more CPU and latency than the bytes
	// are worth on links of 100 Mbit/s and up.
	if z >= n-n/8 {
		c.failed.Add(1)
		c.run = min(2*c.run+1, maxSkip)
		c.skip = c.run
		c.account(n, n)
		return buf[:start], false
	}
	c.run = 0
	h.Flags |= FlagZstd
	h.Length = uint32(z)
	putHeader(buf[start:], &h)
	binary.BigEndian.PutUint32(buf[start+HeaderSize:], uint32(n))
	c.account(n, z)
	return buf, true
}

func (c *Compressor) account(raw, wire int) {
	c.raw.Add(uint64(raw))
	c.wire.Add(uint64(wire))
}

// newDecoder returns the decoder a Reader uses; it refuses to produce more than
// MaxData bytes whatever the frame claims.
func newDecoder() *zstd.Decoder {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxMemory(MaxData), zstd.WithDecoderMaxWindow(MaxData))
	if err != nil {
		panic(fmt.Sprintf("wan: zstd decoder: %v", err)) // only bad options fail
	}
	return d
}

// decompress turns the compressed payload z of the frame h into dst (whose capacity
// is reused when large enough) and fixes h up as the raw frame it stands for.
func decompress(d *zstd.Decoder, h *Header, z, dst []byte) ([]byte, error) {
	if len(z) < zstdPrefix {
		return nil, fmt.Errorf("%w: compressed %v payload of %d bytes", ErrMalformed, h.Type, len(z))
	}
	n := binary.BigEndian.Uint32(z)
	if n > MaxData {
		return nil, fmt.Errorf("%w: compressed %v expands to %d bytes, limit %d", ErrFrameTooBig, h.Type, n, MaxData)
	}
	raw := *h
	raw.Flags &^= FlagZstd
	raw.Length = n
	if err := checkHeader(&raw); err != nil {
		return nil, err
	}
	if cap(dst) < int(n) {
		dst = make([]byte, 0, n)
	}
	out, err := d.DecodeAll(z[zstdPrefix:], dst[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: %v payload does not decompress: %v", ErrMalformed, h.Type, err)
	}
	if len(out) != int(n) {
		return nil, fmt.Errorf("%w: %v payload decompresses to %d bytes, prefix says %d", ErrMalformed, h.Type, len(out), n)
	}
	*h = raw
	return out, nil
}
