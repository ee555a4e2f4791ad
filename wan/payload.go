package wan

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// Sizes of the fixed payloads.
const (
	authSize        = 32 // HMAC-SHA256
	DigestSize      = 32 // SHA-256, as carried in FrameDigest
	digestSize      = 8 + DigestSize
	generationsSize = 32
	stateUpdateSize = 2 + generationsSize
	streamPosSize   = 24
	helloFixedSize  = 102 // Hello v1 without its two strings
	maxName         = 255
)

// Roles as carried in Hello.Role and StateUpdate.Role.
const (
	RoleUnknown   uint8 = 0
	RolePrimary   uint8 = 1
	RoleSecondary uint8 = 2
)

// Replication modes as carried in Hello.Mode.
const (
	ModeSync  uint8 = 0
	ModeAsync uint8 = 1
)

// HelloNeverWritten is the Hello.Flags bit saying the volume has not been written
// since creation, so it is known to be all zeroes and an initial full sync between
// two such volumes can be skipped.
const HelloNeverWritten uint16 = 1 << 0

// PutU64 encodes v as an 8-byte big-endian payload (the length of a FrameZero,
// FrameResyncReq or FrameDigestReq).
func PutU64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v)
}

// GetU64 decodes an 8-byte payload written by PutU64.
func GetU64(p []byte) (uint64, error) {
	if len(p) != 8 {
		return 0, fmt.Errorf("%w: u64 payload of %d bytes", ErrMalformed, len(p))
	}
	return binary.BigEndian.Uint64(p), nil
}

// PutDigest encodes a FrameDigest payload: the u64 length of the range, then its
// SHA-256 digest.
func PutDigest(length uint64, sum [DigestSize]byte) []byte {
	p := make([]byte, 0, digestSize)
	p = binary.BigEndian.AppendUint64(p, length)
	return append(p, sum[:]...)
}

// GetDigest decodes a FrameDigest payload.
func GetDigest(p []byte) (length uint64, sum [DigestSize]byte, err error) {
	if len(p) != digestSize {
		return 0, sum, fmt.Errorf("%w: digest payload of %d bytes, want %d", ErrMalformed, len(p), digestSize)
	}
	copy(sum[:], p[8:])
	return binary.BigEndian.Uint64(p), sum, nil
}

// Generations are DRBD-style generation identifiers. On the wire, 32 bytes,
// big-endian: Current, Bitmap, History[0], History[1], each u64.
type Generations struct {
	Current uint64
	Bitmap  uint64
	History [2]uint64
}

func (g *Generations) put(b []byte) {
	_ = b[generationsSize-1]
	binary.BigEndian.PutUint64(b[0:], g.Current)
	binary.BigEndian.PutUint64(b[8:], g.Bitmap)
	binary.BigEndian.PutUint64(b[16:], g.History[0])
	binary.BigEndian.PutUint64(b[24:], g.History[1])
}

func (g *Generations) get(b []byte) {
	_ = b[generationsSize-1]
	g.Current = binary.BigEndian.Uint64(b[0:])
	g.Bitmap = binary.BigEndian.Uint64(b[8:])
	g.History[0] = binary.BigEndian.Uint64(b[16:])
	g.History[1] = binary.BigEndian.Uint64(b[24:])
}

// MarshalBinary encodes g in 32 bytes.
func (g Generations) MarshalBinary() ([]byte, error) {
	b := make([]byte, generationsSize)
	g.put(b)
	return b, nil
}

// UnmarshalBinary decodes exactly 32 bytes.
func (g *Generations) UnmarshalBinary(p []byte) error {
	if len(p) != generationsSize {
		return fmt.Errorf("%w: generations of %d bytes, want %d", ErrMalformed, len(p), generationsSize)
	}
	g.get(p)
	return nil
}

// StateUpdate tells the peer our role/disk/generations changed. On the wire, 34
// bytes: role u8 | disk u8 | Generations (32).
type StateUpdate struct {
	Role, Disk uint8
	Gen        Generations
}

// MarshalBinary encodes s; a role outside RoleUnknown..RoleSecondary is ErrMalformed.
func (s StateUpdate) MarshalBinary() ([]byte, error) {
	if s.Role > RoleSecondary {
		return nil, fmt.Errorf("%w: role %d", ErrMalformed, s.Role)
	}
	b := make([]byte, stateUpdateSize)
	b[0], b[1] = s.Role, s.Disk
	s.Gen.put(b[2:])
	return b, nil
}

// UnmarshalBinary decodes exactly 34 bytes.
func (s *StateUpdate) UnmarshalBinary(p []byte) error {
	if len(p) != stateUpdateSize {
		return fmt.Errorf("%w: state update of %d bytes, want %d", ErrMalformed, len(p), stateUpdateSize)
	}
	if p[0] > RoleSecondary {
		return fmt.Errorf("%w: role %d", ErrMalformed, p[0])
	}
	s.Role, s.Disk = p[0], p[1]
	s.Gen.get(p[2:])
	return nil
}

// StreamPos is FrameStream's payload: a position in a Primary's async write
// stream. Stream is the Primary's identifier for the stream (random, fresh
// each time a node becomes Primary; 0: no position), Pos a count of the
// write and zero frames it has shipped. A Primary sends the last position it
// shipped; a Secondary the last it applied, whose disk then holds exactly
// the stream's first Pos writes. A Primary that kept the unacknowledged
// part of its stream across a disconnect sets Replay: it can bring a peer
// holding any position from Replay-1 to Pos up to date by sending the
// rest of the stream (0: it cannot). On the wire, 24 bytes: stream u64 |
// pos u64 | replay u64.
type StreamPos struct {
	Stream, Pos uint64
	Replay      uint64
}

func (p StreamPos) check() error {
	switch {
	case p.Stream == 0 && (p.Pos != 0 || p.Replay != 0):
		return fmt.Errorf("%w: stream position %d (replay %d) without a stream", ErrMalformed, p.Pos, p.Replay)
	case p.Replay > 0 && p.Replay-1 > p.Pos:
		return fmt.Errorf("%w: replay from %d past position %d", ErrMalformed, p.Replay, p.Pos)
	}
	return nil
}

// MarshalBinary encodes p; a position without a stream, or a replay past
// the position, is ErrMalformed.
func (p StreamPos) MarshalBinary() ([]byte, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	b := make([]byte, streamPosSize)
	binary.BigEndian.PutUint64(b, p.Stream)
	binary.BigEndian.PutUint64(b[8:], p.Pos)
	binary.BigEndian.PutUint64(b[16:], p.Replay)
	return b, nil
}

// UnmarshalBinary decodes exactly 24 bytes; on error p is unchanged.
func (p *StreamPos) UnmarshalBinary(b []byte) error {
	if len(b) != streamPosSize {
		return fmt.Errorf("%w: stream position of %d bytes, want %d", ErrMalformed, len(b), streamPosSize)
	}
	x := StreamPos{Stream: binary.BigEndian.Uint64(b), Pos: binary.BigEndian.Uint64(b[8:]), Replay: binary.BigEndian.Uint64(b[16:])}
	if err := x.check(); err != nil {
		return err
	}
	*p = x
	return nil
}

// Hello is the first frame each side sends.
//
// Layout, version 1, big-endian:
//
//	offset  size  field
//	0       2     version (1)
//	2       2     flags (bit 0 HelloNeverWritten, bit 1 HelloDiscardMine, bit 2 HelloZstd, bit 3 HelloCatchUp, bits 4-7 0;
//	              bits 8-15 optional: bit 8 HelloResyncHeld, bit 9 HelloStream, others ignored)
//	4       1     role (0..2)
//	5       1     disk
//	6       1     mode (0..1)
//	7       1     reserved, 0 (keeps the integers below naturally aligned)
//	8       4     region size
//	12      8     size
//	20      16    volume id
//	36      32    generations (Generations layout)
//	68      32    nonce
//	100     1     node name length n (0..255)
//	101     n     node name, UTF-8
//	101+n   1     volume name length m (0..255)
//	102+n   m     volume name, UTF-8
//
// Total 102+n+m bytes. The version comes first and is read before anything else, so
// a peer of another version is reported as ErrVersion, not as a malformed frame.
type Hello struct {
	Version    uint16
	Node       string   // node name, <= 255 bytes
	Volume     string   // volume name, <= 255 bytes
	VolumeID   [16]byte // random identity fixed at volume creation
	Size       uint64
	RegionSize uint32
	Role       uint8  // 0 Unknown, 1 Primary, 2 Secondary
	Disk       uint8  // disk state code (the engine defines the numbering)
	Mode       uint8  // 0 sync, 1 async
	Flags      uint16 // required bits 0-7, optional bits 8-15 (flags.go): unknown optional bits are kept, not refused
	Gen        Generations
	Nonce      [32]byte // fresh random challenge
}

// check applies the rules both directions share, so that whatever MarshalBinary
// produces UnmarshalBinary accepts and the other way round.
func (h *Hello) check() error {
	switch {
	case len(h.Node) > maxName:
		return fmt.Errorf("%w: hello node name of %d bytes, limit %d", ErrMalformed, len(h.Node), maxName)
	case len(h.Volume) > maxName:
		return fmt.Errorf("%w: hello volume name of %d bytes, limit %d", ErrMalformed, len(h.Volume), maxName)
	case !utf8.ValidString(h.Node):
		return fmt.Errorf("%w: hello node name is not UTF-8", ErrMalformed)
	case !utf8.ValidString(h.Volume):
		return fmt.Errorf("%w: hello volume name is not UTF-8", ErrMalformed)
	case h.Role > RoleSecondary:
		return fmt.Errorf("%w: hello role %d", ErrMalformed, h.Role)
	case h.Mode > ModeAsync:
		return fmt.Errorf("%w: hello mode %d", ErrMalformed, h.Mode)
	case h.Flags&^(helloRequiredKnown|HelloOptional) != 0:
		return fmt.Errorf("%w: hello flags %#04x: unknown required bits %#04x", ErrMalformed, h.Flags, h.Flags&^(helloRequiredKnown|HelloOptional))
	}
	return nil
}

// MarshalBinary encodes h in the layout of its Version, which must be
// ProtocolVersion (ErrVersion otherwise). Out-of-range fields are ErrMalformed.
func (h Hello) MarshalBinary() ([]byte, error) {
	if h.Version != ProtocolVersion {
		return nil, fmt.Errorf("%w: cannot encode hello version %d", ErrVersion, h.Version)
	}
	if err := h.check(); err != nil {
		return nil, err
	}
	b := make([]byte, helloFixedSize+len(h.Node)+len(h.Volume))
	binary.BigEndian.PutUint16(b[0:], h.Version)
	binary.BigEndian.PutUint16(b[2:], h.Flags)
	b[4], b[5], b[6], b[7] = h.Role, h.Disk, h.Mode, 0
	binary.BigEndian.PutUint32(b[8:], h.RegionSize)
	binary.BigEndian.PutUint64(b[12:], h.Size)
	copy(b[20:36], h.VolumeID[:])
	h.Gen.put(b[36:68])
	copy(b[68:100], h.Nonce[:])
	b[100] = uint8(len(h.Node))
	i := 101 + copy(b[101:], h.Node)
	b[i] = uint8(len(h.Volume))
	copy(b[i+1:], h.Volume)
	return b, nil
}

// UnmarshalBinary decodes a Hello strictly: a version other than ProtocolVersion is
// ErrVersion; a wrong length, a nonzero reserved byte or any out-of-range field is
// ErrMalformed. On error h is unchanged.
func (h *Hello) UnmarshalBinary(p []byte) error {
	if len(p) < 2 {
		return fmt.Errorf("%w: hello of %d bytes", ErrMalformed, len(p))
	}
	if v := binary.BigEndian.Uint16(p); v != ProtocolVersion {
		return fmt.Errorf("%w: peer speaks version %d, we speak %d", ErrVersion, v, ProtocolVersion)
	}
	if len(p) < helloFixedSize {
		return fmt.Errorf("%w: hello of %d bytes, at least %d", ErrMalformed, len(p), helloFixedSize)
	}
	if p[7] != 0 {
		return fmt.Errorf("%w: hello reserved byte %#02x", ErrMalformed, p[7])
	}
	n := int(p[100])
	if 101+n >= len(p) {
		return fmt.Errorf("%w: hello node name of %d bytes overruns %d-byte hello", ErrMalformed, n, len(p))
	}
	m := int(p[101+n])
	if want := helloFixedSize + n + m; len(p) != want {
		return fmt.Errorf("%w: hello of %d bytes, names say %d", ErrMalformed, len(p), want)
	}
	var x Hello
	x.Version = binary.BigEndian.Uint16(p[0:])
	x.Flags = binary.BigEndian.Uint16(p[2:])
	x.Role, x.Disk, x.Mode = p[4], p[5], p[6]
	x.RegionSize = binary.BigEndian.Uint32(p[8:])
	x.Size = binary.BigEndian.Uint64(p[12:])
	copy(x.VolumeID[:], p[20:36])
	x.Gen.get(p[36:68])
	copy(x.Nonce[:], p[68:100])
	x.Node = string(p[101 : 101+n])
	x.Volume = string(p[102+n:])
	if err := x.check(); err != nil {
		return err
	}
	*h = x
	return nil
}
