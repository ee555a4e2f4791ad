package witness

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// The wire format: one UDP datagram per request and one per reply, big
// endian, each closed by an HMAC-SHA256 over every byte before it, keyed with
// the shared secret.
//
//	request: "MWQ1" op:u8 flags:u8 nonce:[16] time:i64(unix ns) epoch:u64 ttl:u32(ms)
//	         volume node peer (each len:u8 bytes) mac:[32]
//	reply:   "MWR1" status:u8 flags:u8 nonce:[16] epoch:u64 time:i64(unix ns)
//	         holder message (each len:u8 bytes) mac:[32]
//
// The nonce and the time make a captured request useless later: the witness
// rejects a time outside Config.MaxSkew of its own wall clock and answers a
// repeated nonce inside that window with the reply it already sent (which is
// also how a client's retransmission after a lost reply stays harmless: a
// Release is not carried out twice). A reply echoes the request's nonce under
// its MAC, so a client accepts only the answer to its own request.

// Frame constants.
const (
	NonceSize = 16
	macSize   = sha256.Size
	// MaxName bounds a volume or node name (one length byte).
	MaxName = 255
	// MaxDatagram is larger than any valid frame.
	MaxDatagram = 4 + 2 + NonceSize + 8 + 8 + 8 + 4 + 3*(1+MaxName) + macSize
)

var (
	requestMagic = [4]byte{'M', 'W', 'Q', '1'}
	replyMagic   = [4]byte{'M', 'W', 'R', '1'}
)

// Op is what a request asks for.
type Op uint8

// Ops.
const (
	OpVote    Op = 1 // RequestVote
	OpRelease Op = 2 // ReleaseVote: Node hands the vote to Peer
)

func (o Op) String() string {
	switch o {
	case OpVote:
		return "vote"
	case OpRelease:
		return "release"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Status is a reply's outcome. A denied vote is StatusOK with Granted false.
type Status uint8

// Statuses.
const (
	StatusOK Status = iota
	// StatusNotHolder: a Release from a node that does not hold the vote.
	StatusNotHolder
	// StatusClockSkew: the request's time is outside the witness's window.
	StatusClockSkew
	// StatusBadRequest: authenticated but invalid (unknown op, a name
	// missing). The message says which.
	StatusBadRequest
	// StatusInternal: the witness could not persist its state; nothing was
	// granted.
	StatusInternal
)

// Decoding errors.
var (
	ErrShort    = errors.New("witness: frame too short")
	ErrMagic    = errors.New("witness: bad magic")
	ErrAuth     = errors.New("witness: message authentication failed")
	ErrTrailing = errors.New("witness: trailing bytes")
	// ErrFlags: a flag bit this version does not define; a newer peer
	// must bump the magic instead of sending it.
	ErrFlags = errors.New("witness: undefined flag bits")
)

// Request flags.
const flagPeerOutdated = 1

// Reply flags.
const (
	flagGranted = 1 << iota
	flagOutdated
	flagReplyPeerOutdated
)

// Request is one decoded request.
type Request struct {
	Op    Op
	Nonce [NonceSize]byte
	Time  time.Time
	Epoch uint64
	// TTL is the lease the client asks for (millisecond resolution; 0: the
	// witness's Config.LeaseTTL).
	TTL                time.Duration
	Volume, Node, Peer string
	PeerOutdated       bool
}

// Reply is one decoded reply.
type Reply struct {
	Status                          Status
	Granted, Outdated, PeerOutdated bool
	Nonce                           [NonceSize]byte
	Epoch                           uint64
	// Time is the witness's wall clock (for a StatusClockSkew diagnosis).
	Time    time.Time
	Holder  string
	Message string
}

// AppendRequest appends r's encoding, authenticated with secret.
func AppendRequest(b []byte, r *Request, secret []byte) ([]byte, error) {
	for _, s := range []string{r.Volume, r.Node, r.Peer} {
		if len(s) > MaxName {
			return nil, fmt.Errorf("witness: name of %d bytes exceeds %d", len(s), MaxName)
		}
	}
	ms := r.TTL.Milliseconds()
	if ms < 0 || ms > 1<<32-1 {
		return nil, fmt.Errorf("witness: TTL %v out of range", r.TTL)
	}
	start := len(b)
	b = append(b, requestMagic[:]...)
	var flags uint8
	if r.PeerOutdated {
		flags |= flagPeerOutdated
	}
	b = append(b, uint8(r.Op), flags)
	b = append(b, r.Nonce[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time.UnixNano()))
	b = binary.BigEndian.AppendUint64(b, r.Epoch)
	b = binary.BigEndian.AppendUint32(b, uint32(ms))
	b = appendName(b, r.Volume)
	b = appendName(b, r.Node)
	b = appendName(b, r.Peer)
	return appendMAC(b, b[start:], secret), nil
}

// DecodeRequest authenticates and decodes one request datagram. Nothing in it
// is trusted before the MAC checks out.
func DecodeRequest(p, secret []byte) (*Request, error) {
	body, err := verify(p, requestMagic, secret)
	if err != nil {
		return nil, err
	}
	d := decoder{b: body[4:]}
	r := &Request{}
	r.Op = Op(d.u8())
	flags := d.u8()
	r.PeerOutdated = flags&flagPeerOutdated != 0
	if flags&^flagPeerOutdated != 0 {
		return nil, fmt.Errorf("%w: %#x", ErrFlags, flags)
	}
	d.bytes(r.Nonce[:])
	r.Time = time.Unix(0, int64(d.u64()))
	r.Epoch = d.u64()
	r.TTL = time.Duration(d.u32()) * time.Millisecond
	r.Volume, r.Node, r.Peer = d.name(), d.name(), d.name()
	return r, d.finish()
}

// AppendReply appends r's encoding, authenticated with secret.
func AppendReply(b []byte, r *Reply, secret []byte) []byte {
	start := len(b)
	b = append(b, replyMagic[:]...)
	var flags uint8
	if r.Granted {
		flags |= flagGranted
	}
	if r.Outdated {
		flags |= flagOutdated
	}
	if r.PeerOutdated {
		flags |= flagReplyPeerOutdated
	}
	b = append(b, uint8(r.Status), flags)
	b = append(b, r.Nonce[:]...)
	b = binary.BigEndian.AppendUint64(b, r.Epoch)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time.UnixNano()))
	b = appendName(b, truncate(r.Holder))
	b = appendName(b, truncate(r.Message))
	return appendMAC(b, b[start:], secret)
}

// DecodeReply authenticates and decodes one reply datagram.
func DecodeReply(p, secret []byte) (*Reply, error) {
	body, err := verify(p, replyMagic, secret)
	if err != nil {
		return nil, err
	}
	d := decoder{b: body[4:]}
	r := &Reply{}
	r.Status = Status(d.u8())
	flags := d.u8()
	r.Granted, r.Outdated, r.PeerOutdated = flags&flagGranted != 0, flags&flagOutdated != 0, flags&flagReplyPeerOutdated != 0
	if flags&^(flagGranted|flagOutdated|flagReplyPeerOutdated) != 0 {
		return nil, fmt.Errorf("%w: %#x", ErrFlags, flags)
	}
	d.bytes(r.Nonce[:])
	r.Epoch = d.u64()
	r.Time = time.Unix(0, int64(d.u64()))
	r.Holder, r.Message = d.name(), d.name()
	return r, d.finish()
}

func truncate(s string) string {
	if len(s) > MaxName {
		return s[:MaxName]
	}
	return s
}

func appendName(b []byte, s string) []byte {
	b = append(b, uint8(len(s)))
	return append(b, s...)
}

func appendMAC(b, msg, secret []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write(msg)
	return m.Sum(b)
}

// verify checks the length, the magic and the MAC and returns the
// authenticated bytes.
func verify(p []byte, magic [4]byte, secret []byte) ([]byte, error) {
	if len(p) < len(magic)+macSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrShort, len(p))
	}
	if [4]byte(p[:4]) != magic {
		return nil, fmt.Errorf("%w: %q", ErrMagic, p[:4])
	}
	body, mac := p[:len(p)-macSize], p[len(p)-macSize:]
	m := hmac.New(sha256.New, secret)
	m.Write(body)
	if !hmac.Equal(m.Sum(nil), mac) {
		return nil, ErrAuth
	}
	return body, nil
}

// decoder reads fields and remembers the first shortfall.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < n {
		d.err = fmt.Errorf("%w: %d bytes left, %d needed", ErrShort, len(d.b), n)
		return nil
	}
	p := d.b[:n]
	d.b = d.b[n:]
	return p
}

func (d *decoder) u8() uint8 {
	if p := d.take(1); p != nil {
		return p[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if p := d.take(4); p != nil {
		return binary.BigEndian.Uint32(p)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if p := d.take(8); p != nil {
		return binary.BigEndian.Uint64(p)
	}
	return 0
}

func (d *decoder) bytes(dst []byte) { copy(dst, d.take(len(dst))) }

func (d *decoder) name() string { return string(d.take(int(d.u8()))) }

func (d *decoder) finish() error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d", ErrTrailing, len(d.b))
	}
	return d.err
}
