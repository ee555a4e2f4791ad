package agent

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/mirrord/mirrord/failover"
)

// The agent's messages travel on every heartbeat path: a UDP datagram
// each, or the payload of a FrameBeacon on the replication link. One
// format for both, authenticated on its own so that a path needs no
// security of its own. Big-endian:
//
//	offset  size  field
//	0       4     magic "MRDB"
//	4       1     version (1)
//	5       1     kind: 1 beacon, 2 peer-promote
//	6       1     flags: 1 InSync, 2 Hears
//	7       1     role
//	8       1     disk
//	9       1     length of the node name (1..64)
//	10      1     length of the volume name (1..64)
//	11      1     reserved, 0
//	12      8     boot: random, fixed for the sender's process lifetime
//	20      8     seq: increases with every message of that boot
//	28      8     epoch
//	36      8     lag bytes
//	44      8     lag time, nanoseconds
//	52      n     node name, then volume name
//	52+n    32    HMAC-SHA256 of everything before it
//
// The HMAC key is derived from the pair's secret, so a beacon can never
// pass for a replication handshake answer or the other way round.

// Message kinds.
const (
	KindBeacon      uint8 = 1
	KindPeerPromote uint8 = 2
)

const (
	msgMagic   = "MRDB"
	msgVersion = 1
	msgFixed   = 52
	macSize    = sha256.Size
	maxName    = 64
	// MaxMessage is the largest encoded message.
	MaxMessage = msgFixed + 2*maxName + macSize
)

const (
	flagInSync = 1 << 0
	flagHears  = 1 << 1
)

// Errors from Decode and the replay filter. A message that fails any check
// is dropped whole.
var (
	ErrMalformed = errors.New("agent message malformed")
	ErrAuth      = errors.New("agent message failed authentication")
	ErrReplay    = errors.New("agent message replayed or out of order")
)

// Message is one agent message.
type Message struct {
	Kind   uint8
	Volume string
	Boot   uint64
	Seq    uint64
	// Beacon: the sender's beacon (Node is the sender). For KindPeerPromote
	// only Node and Epoch are meaningful.
	failover.Beacon
}

// Key derives the message key from the pair's secret.
func Key(secret []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("mirrord failover agent message v1"))
	return m.Sum(nil)
}

// Encode appends the authenticated encoding of m to dst.
func Encode(dst []byte, m Message, key []byte) ([]byte, error) {
	if n := len(m.Node); n == 0 || n > maxName {
		return nil, fmt.Errorf("%w: node name of %d bytes (1..%d)", ErrMalformed, n, maxName)
	}
	if n := len(m.Volume); n == 0 || n > maxName {
		return nil, fmt.Errorf("%w: volume name of %d bytes (1..%d)", ErrMalformed, n, maxName)
	}
	start := len(dst)
	var h [msgFixed]byte
	copy(h[0:], msgMagic)
	h[4] = msgVersion
	h[5] = m.Kind
	if m.InSync {
		h[6] |= flagInSync
	}
	if m.Hears {
		h[6] |= flagHears
	}
	h[7] = uint8(m.Role)
	h[8] = uint8(m.Disk)
	h[9] = uint8(len(m.Node))
	h[10] = uint8(len(m.Volume))
	binary.BigEndian.PutUint64(h[12:], m.Boot)
	binary.BigEndian.PutUint64(h[20:], m.Seq)
	binary.BigEndian.PutUint64(h[28:], m.Epoch)
	binary.BigEndian.PutUint64(h[36:], uint64(m.LagBytes))
	binary.BigEndian.PutUint64(h[44:], uint64(m.LagTime))
	dst = append(dst, h[:]...)
	dst = append(dst, m.Node...)
	dst = append(dst, m.Volume...)
	mac := hmac.New(sha256.New, key)
	mac.Write(dst[start:])
	return mac.Sum(dst), nil
}

// Decode authenticates and decodes one message. Nothing of an invalid
// message is returned.
func Decode(b []byte, key []byte) (Message, error) {
	if len(b) < msgFixed+macSize {
		return Message{}, fmt.Errorf("%w: %d bytes, at least %d", ErrMalformed, len(b), msgFixed+macSize)
	}
	if len(b) > MaxMessage {
		return Message{}, fmt.Errorf("%w: %d bytes, at most %d", ErrMalformed, len(b), MaxMessage)
	}
	if string(b[0:4]) != msgMagic {
		return Message{}, fmt.Errorf("%w: bad magic", ErrMalformed)
	}
	nn, vn := int(b[9]), int(b[10])
	if len(b) != msgFixed+nn+vn+macSize {
		return Message{}, fmt.Errorf("%w: %d bytes for names of %d and %d", ErrMalformed, len(b), nn, vn)
	}
	body := b[:len(b)-macSize]
	mac := hmac.New(sha256.New, key)
	mac.Write(body)
	if !hmac.Equal(mac.Sum(nil), b[len(body):]) {
		return Message{}, ErrAuth
	}
	// Authenticated: the remaining checks catch a peer of another version
	// or a bug, not an attacker.
	switch {
	case b[4] != msgVersion:
		return Message{}, fmt.Errorf("%w: version %d, want %d", ErrMalformed, b[4], msgVersion)
	case b[5] != KindBeacon && b[5] != KindPeerPromote:
		return Message{}, fmt.Errorf("%w: kind %d", ErrMalformed, b[5])
	case b[6]&^(flagInSync|flagHears) != 0 || b[11] != 0:
		return Message{}, fmt.Errorf("%w: unknown flags %#x", ErrMalformed, b[6])
	case nn == 0 || nn > maxName || vn == 0 || vn > maxName:
		return Message{}, fmt.Errorf("%w: name lengths %d, %d", ErrMalformed, nn, vn)
	case b[7] > uint8(failover.RoleSecondary) || b[8] > uint8(failover.DiskFailed):
		return Message{}, fmt.Errorf("%w: role %d disk %d", ErrMalformed, b[7], b[8])
	}
	m := Message{Kind: b[5], Boot: binary.BigEndian.Uint64(b[12:]), Seq: binary.BigEndian.Uint64(b[20:])}
	m.InSync = b[6]&flagInSync != 0
	m.Hears = b[6]&flagHears != 0
	m.Role = failover.Role(b[7])
	m.Disk = failover.DiskState(b[8])
	m.Epoch = binary.BigEndian.Uint64(b[28:])
	m.LagBytes = int64(binary.BigEndian.Uint64(b[36:]))
	m.LagTime = time.Duration(binary.BigEndian.Uint64(b[44:]))
	if m.LagBytes < 0 || m.LagTime < 0 {
		return Message{}, fmt.Errorf("%w: negative lag", ErrMalformed)
	}
	m.Node = string(body[msgFixed : msgFixed+nn])
	m.Volume = string(body[msgFixed+nn:])
	return m, nil
}

// replayFilter accepts each message at most once and in order: per sender
// boot, seq must grow. A new boot is accepted only once the current one
// has been silent for window, so that a recorded message of an earlier
// boot cannot be replayed while the peer is alive. (A recorded old-boot
// message replayed after the peer died could make it look alive for a
// moment: that delays a failover, it never causes one.)
type replayFilter struct {
	window   time.Duration
	boot     uint64
	seq      uint64
	lastSeen time.Time
	have     bool
}

func (f *replayFilter) accept(boot, seq uint64, now time.Time) error {
	switch {
	case !f.have:
	case boot == f.boot && seq > f.seq:
	case boot == f.boot:
		return fmt.Errorf("%w: seq %d after %d", ErrReplay, seq, f.seq)
	case now.Sub(f.lastSeen) < f.window:
		return fmt.Errorf("%w: a new sender boot while the current one spoke %v ago", ErrReplay, now.Sub(f.lastSeen))
	}
	f.boot, f.seq, f.lastSeen, f.have = boot, seq, now, true
	return nil
}
