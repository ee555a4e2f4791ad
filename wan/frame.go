// Package wan owns the peer replication protocol: one ordered, framed, authenticated
// stream per peer, used on LANs and WANs alike.
//
// A stream is a sequence of frames, each a fixed 32-byte header and a payload whose
// size the header gives. The package knows how to encode, decode and validate frames
// and their small binary payloads, and how to run the handshake that opens a stream;
// it knows nothing about volumes, bitmaps or resync policy, which belong to the
// replication engine.
//
// Decoding is strict. Every frame type has a payload limit and, where the payload is
// a fixed struct, an exact size; flags a frame type does not define are refused. A
// peer speaking a slightly different dialect is thus caught at the first frame, as a
// protocol error, instead of being half understood. The Writer applies the same rules
// before it sends, so a local bug surfaces as an error here rather than as a dropped
// connection on the peer.
//
// The handshake authenticates both peers with a shared secret; it does not encrypt
// or integrity-protect the frames that follow. Across an untrusted network the
// stream runs inside TLS 1.3 with mutual certificates (tls.go), and the handshake
// is then bound to that TLS session. Data frames may be zstd-compressed
// (compress.go) when both sides ask for it in their Hello.
package wan

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unicode/utf8"
)

// ProtocolVersion is the version this package speaks. It is carried in Hello; the
// layout of Hello and of every frame is fixed per version.
const ProtocolVersion = 1

// MaxData is the largest data payload in one frame. It matches the largest NBD
// request the Linux client sends (32 MiB), so one request never needs splitting.
const MaxData = 32 << 20

// Payload limits for frame types other than data frames.
const (
	// MaxControl bounds every payload that is not data or bitmap. It is also all an
	// unauthenticated peer can make us allocate during the handshake.
	MaxControl = 64 << 10
	// MaxBitmapChunk bounds one FrameBitmap chunk: 4 MiB of run-length encoding
	// covers any realistic bitmap in a handful of frames while keeping the receive
	// buffer small.
	MaxBitmapChunk = 4 << 20
)

// HeaderSize is the size of the fixed frame header.
const HeaderSize = 32

// Magic starts every frame header: "MRD1". It catches a desynchronized stream (a
// length bug, a stray writer) at the next frame rather than much later.
const Magic = 0x4d524431

// FrameType says what a frame carries.
type FrameType uint8

// Frame types. The comments give the header fields each type uses and its payload.
const (
	FrameHello      FrameType = 1  // payload: Hello (binary)
	FrameAuth       FrameType = 2  // payload: 32-byte HMAC
	FrameWrite      FrameType = 3  // Seq, Offset, payload = data; Flags may have FlagFUA, FlagSync
	FrameZero       FrameType = 4  // Seq, Offset, payload = u64 length; Flags FlagFUA, FlagSync, FlagUnmap
	FrameFlush      FrameType = 5  // Seq: barrier; the receiver makes everything before it stable, then acks Seq
	FrameAck        FrameType = 6  // Seq acknowledged; Errno 0 = ok
	FrameBitmap     FrameType = 7  // payload = a chunk of a bitmap encoding; Flags FlagLast on the final chunk
	FrameResyncData FrameType = 8  // Seq, Offset, payload = data (resync copy of a region run)
	FrameResyncReq  FrameType = 9  // Seq, Offset, payload = u64 length: ask the peer to send that range
	FrameDigestReq  FrameType = 10 // Seq, Offset, payload = u64 length: ask for a digest of the range
	FrameDigest     FrameType = 11 // Seq, Offset, payload = u64 length + 32-byte SHA-256 digest
	FramePing       FrameType = 12 // Seq = nonce
	FramePong       FrameType = 13 // Seq = echoed nonce
	FrameState      FrameType = 14 // payload = StateUpdate (binary)
	FrameClose      FrameType = 15 // payload = UTF-8 reason; the sender closes after it
	FrameResyncDone FrameType = 16 // Seq; payload = Generations (binary) the target adopts
	// FrameCatchUp announces a catch-up resync inside an established
	// session (the source was Ahead): payload = u64 bytes it will send, so
	// that the target (Behind) can show progress and an ETA. Sent only to
	// a peer whose Hello has HelloCatchUp.
	FrameCatchUp FrameType = 17
	// FrameStream is exchanged by both sides right after the handshake
	// when both Hellos carry HelloStream: payload = StreamPos, the
	// sender's position in the async write stream.
	FrameStream FrameType = 18
	// FrameBeacon carries the failover agent's heartbeat (an opaque,
	// self-authenticated message of package failover/agent) over the
	// replication link, one of the agent's heartbeat paths. Numbers 19-23 are
	// left to the replication protocol's own growth.
	FrameBeacon FrameType = 24 // payload: agent message, opaque here
)

// Frame flags.
const (
	FlagFUA   uint8 = 1 << 0
	FlagSync  uint8 = 1 << 1 // sender waits for the ack (protocol C)
	FlagUnmap uint8 = 1 << 2
	FlagLast  uint8 = 1 << 3
)

// Errors. Every error the package returns for bad input wraps one of these with
// context; test with errors.Is.
var (
	ErrBadMagic    = errors.New("wan: bad frame magic")
	ErrFrameTooBig = errors.New("wan: frame too large")
	ErrMalformed   = errors.New("wan: malformed frame")
	ErrAuth        = errors.New("wan: peer failed authentication")
	ErrVersion     = errors.New("wan: unsupported protocol version")
	// ErrPeerClosed means the peer sent FrameClose during the handshake; the
	// error text carries its reason.
	ErrPeerClosed = errors.New("wan: peer closed the connection")
	// ErrHelloRefused is ErrPeerClosed because the peer found our Hello
	// malformed: a build older than a flag we set, typically one of the
	// optional ones (flags.go), which such a build still refuses.
	ErrHelloRefused = fmt.Errorf("%w: it refused our hello", ErrPeerClosed)
	// ErrNoSecret means Handshake was called without a secret. Running
	// unauthenticated is never a silent default.
	ErrNoSecret = errors.New("wan: no shared secret")
)

// Header is the fixed 32-byte frame header. On the wire, big-endian:
//
//	offset  size  field
//	0       4     magic 0x4d524431 ("MRD1")
//	4       1     type
//	5       1     flags
//	6       2     reserved, must be 0
//	8       8     seq
//	16      8     offset
//	24      4     errno
//	28      4     length: payload bytes that follow
type Header struct {
	Type   FrameType
	Flags  uint8
	Seq    uint64
	Offset uint64
	Errno  uint32
	Length uint32
}

// Frame is a header plus payload. Payload aliasing rules are documented on Reader.
type Frame struct {
	Header
	Payload []byte
}

// rule is what one frame type allows. fixed < 0 means the payload size varies up
// to max.
type rule struct {
	name  string
	max   int
	fixed int
	flags uint8
	// span: the frame names a byte range (Offset plus a length), which must not
	// wrap around 2^64 — a wrapped range would slip past a receiver's bounds check.
	span spanKind
}

type spanKind uint8

const (
	spanNone    spanKind = iota
	spanPayload          // the range is Offset .. Offset+len(payload)
	spanU64              // the range is Offset .. Offset+u64 at the payload's start
)

// rules is indexed by FrameType. Flags a type does not list are refused: a receiver
// that ignored an unknown FUA or Unmap bit would silently weaken durability or
// change what lands on disk.
var rules = [...]rule{
	FrameHello:      {name: "Hello", max: MaxControl, fixed: -1},
	FrameAuth:       {name: "Auth", max: MaxControl, fixed: authSize},
	FrameWrite:      {name: "Write", max: MaxData, fixed: -1, flags: FlagFUA | FlagSync | FlagZstd, span: spanPayload},
	FrameZero:       {name: "Zero", max: MaxControl, fixed: 8, flags: FlagFUA | FlagSync | FlagUnmap, span: spanU64},
	FrameFlush:      {name: "Flush", max: MaxControl, fixed: 0},
	FrameAck:        {name: "Ack", max: MaxControl, fixed: 0},
	FrameBitmap:     {name: "Bitmap", max: MaxBitmapChunk, fixed: -1, flags: FlagLast},
	FrameResyncData: {name: "ResyncData", max: MaxData, fixed: -1, flags: FlagZstd, span: spanPayload},
	FrameResyncReq:  {name: "ResyncReq", max: MaxControl, fixed: 8, span: spanU64},
	FrameDigestReq:  {name: "DigestReq", max: MaxControl, fixed: 8, span: spanU64},
	FrameDigest:     {name: "Digest", max: MaxControl, fixed: digestSize, span: spanU64},
	FramePing:       {name: "Ping", max: MaxControl, fixed: 0},
	FramePong:       {name: "Pong", max: MaxControl, fixed: 0},
	FrameState:      {name: "State", max: MaxControl, fixed: stateUpdateSize},
	FrameClose:      {name: "Close", max: MaxControl, fixed: -1},
	FrameResyncDone: {name: "ResyncDone", max: MaxControl, fixed: generationsSize},
	FrameCatchUp:    {name: "CatchUp", max: MaxControl, fixed: 8},
	FrameStream:     {name: "Stream", max: MaxControl, fixed: streamPosSize},
	FrameBeacon:     {name: "Beacon", max: MaxBeacon, fixed: -1},
}

// MaxBeacon bounds a FrameBeacon payload: an agent message is a few hundred
// bytes.
const MaxBeacon = 1 << 10

func (t FrameType) known() bool { return t != 0 && int(t) < len(rules) && rules[t].name != "" }

// String returns the type's name as used in this package, without the Frame prefix.
func (t FrameType) String() string {
	if t.known() {
		return rules[t].name
	}
	return fmt.Sprintf("FrameType(%d)", uint8(t))
}

// MaxPayload returns the largest payload a frame of type t may carry, or -1 for an
// unknown type.
func MaxPayload(t FrameType) int {
	if !t.known() {
		return -1
	}
	return rules[t].max
}

// checkHeader validates what can be known from the header alone, before any payload
// is read, so that a bad length never causes an allocation.
func checkHeader(h *Header) error {
	if !h.Type.known() {
		return fmt.Errorf("%w: unknown frame type %d", ErrMalformed, h.Type)
	}
	r := &rules[h.Type]
	if uint64(h.Length) > uint64(r.max) {
		return fmt.Errorf("%w: %s payload of %d bytes, limit %d", ErrFrameTooBig, r.name, h.Length, r.max)
	}
	if r.fixed >= 0 && int(h.Length) != r.fixed {
		return fmt.Errorf("%w: %s payload of %d bytes, want %d", ErrMalformed, r.name, h.Length, r.fixed)
	}
	if h.Flags&^r.flags != 0 {
		return fmt.Errorf("%w: flags %#x not allowed on %s", ErrMalformed, h.Flags, r.name)
	}
	if r.span == spanPayload && h.Offset > math.MaxUint64-uint64(h.Length) {
		return fmt.Errorf("%w: %s at offset %d length %d wraps", ErrMalformed, r.name, h.Offset, h.Length)
	}
	return nil
}

// checkPayload validates what depends on the payload's content.
func checkPayload(h *Header, p []byte) error {
	r := &rules[h.Type]
	if r.span == spanU64 {
		n := binary.BigEndian.Uint64(p)
		if h.Offset > math.MaxUint64-n {
			return fmt.Errorf("%w: %s at offset %d length %d wraps", ErrMalformed, r.name, h.Offset, n)
		}
	}
	if h.Type == FrameClose && !utf8.Valid(p) {
		// The reason ends up in logs and operator output; refuse rather than pass
		// on bytes that are not text.
		return fmt.Errorf("%w: Close reason is not UTF-8", ErrMalformed)
	}
	return nil
}

// putHeader encodes h into b[:HeaderSize].
func putHeader(b []byte, h *Header) {
	_ = b[HeaderSize-1]
	binary.BigEndian.PutUint32(b[0:], Magic)
	b[4] = uint8(h.Type)
	b[5] = h.Flags
	b[6], b[7] = 0, 0
	binary.BigEndian.PutUint64(b[8:], h.Seq)
	binary.BigEndian.PutUint64(b[16:], h.Offset)
	binary.BigEndian.PutUint32(b[24:], h.Errno)
	binary.BigEndian.PutUint32(b[28:], h.Length)
}

// parseHeader decodes and validates b[:HeaderSize].
func parseHeader(b []byte, h *Header) error {
	_ = b[HeaderSize-1]
	if m := binary.BigEndian.Uint32(b[0:]); m != Magic {
		return fmt.Errorf("%w: %#08x", ErrBadMagic, m)
	}
	if r := binary.BigEndian.Uint16(b[6:]); r != 0 {
		return fmt.Errorf("%w: reserved header field %#04x", ErrMalformed, r)
	}
	*h = Header{
		Type:   FrameType(b[4]),
		Flags:  b[5],
		Seq:    binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Errno:  binary.BigEndian.Uint32(b[24:]),
		Length: binary.BigEndian.Uint32(b[28:]),
	}
	return checkHeader(h)
}

// MarshalBinary encodes the header alone (32 bytes), after the same checks the
// Writer applies to a header. Length is taken as given.
func (h Header) MarshalBinary() ([]byte, error) {
	if err := checkHeader(&h); err != nil {
		return nil, err
	}
	b := make([]byte, HeaderSize)
	putHeader(b, &h)
	return b, nil
}

// UnmarshalBinary decodes and validates a 32-byte header. Checks that need the
// payload are left to the Reader.
func (h *Header) UnmarshalBinary(p []byte) error {
	if len(p) != HeaderSize {
		return fmt.Errorf("%w: header of %d bytes, want %d", ErrMalformed, len(p), HeaderSize)
	}
	return parseHeader(p, h)
}
