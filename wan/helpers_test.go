package wan

import (
	"bytes"
	"crypto/sha256"
	"net"
	"testing"
)

// sampleHello is a fully populated Hello; its encoding is testdata/hello.hex.
func sampleHello() Hello {
	h := Hello{
		Version:    ProtocolVersion,
		Node:       "alpha",
		Volume:     "vol0",
		Size:       1 << 40,
		RegionSize: 4096,
		Role:       RolePrimary,
		Disk:       8,
		Mode:       ModeSync,
		Flags:      HelloNeverWritten,
		Gen:        Generations{Current: 0x1111111111111111, Bitmap: 0x2222222222222222, History: [2]uint64{0x3333333333333333, 0x4444444444444444}},
	}
	for i := range h.VolumeID {
		h.VolumeID[i] = byte(0xa0 + i)
	}
	for i := range h.Nonce {
		h.Nonce[i] = byte(i)
	}
	return h
}

func mustMarshal(t testing.TB, m interface{ MarshalBinary() ([]byte, error) }) []byte {
	t.Helper()
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("marshal %T: %v", m, err)
	}
	return b
}

func fill(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}

// validFrames holds one valid frame of every type, with every header field and
// allowed flag exercised somewhere.
func validFrames(t testing.TB) []Frame {
	gen := Generations{Current: 1, Bitmap: 2, History: [2]uint64{3, 4}}
	su := StateUpdate{Role: RoleSecondary, Disk: 4, Gen: gen}
	return []Frame{
		{Header{Type: FrameHello}, mustMarshal(t, sampleHello())},
		{Header{Type: FrameAuth}, fill(32, 1)},
		{Header{Type: FrameWrite, Flags: FlagFUA | FlagSync, Seq: 7, Offset: 4096}, fill(4096, 2)},
		{Header{Type: FrameWrite, Seq: 8, Offset: 1 << 40}, fill(1, 3)},
		{Header{Type: FrameZero, Flags: FlagFUA | FlagSync | FlagUnmap, Seq: 9, Offset: 1 << 30}, PutU64(1 << 20)},
		{Header{Type: FrameFlush, Seq: 10}, nil},
		{Header{Type: FrameAck, Seq: 10, Errno: 5}, nil},
		{Header{Type: FrameBitmap}, fill(100, 4)},
		{Header{Type: FrameBitmap, Flags: FlagLast}, nil},
		{Header{Type: FrameResyncData, Seq: 11, Offset: 8192}, fill(65536, 5)},
		{Header{Type: FrameResyncReq, Seq: 12, Offset: 4096}, PutU64(4096)},
		{Header{Type: FrameDigestReq, Seq: 13, Offset: 0}, PutU64(1 << 22)},
		{Header{Type: FrameDigest, Seq: 13, Offset: 0}, PutDigest(1<<22, sha256.Sum256([]byte("x")))},
		{Header{Type: FramePing, Seq: 0xdeadbeefcafe}, nil},
		{Header{Type: FramePong, Seq: 0xdeadbeefcafe}, nil},
		{Header{Type: FrameState}, mustMarshal(t, su)},
		{Header{Type: FrameClose}, []byte("shutting down — bye")},
		{Header{Type: FrameResyncDone, Seq: 14}, mustMarshal(t, gen)},
		{Header{Type: FrameCatchUp}, PutU64(48 << 20)},
		{Header{Type: FrameStream}, mustMarshal(t, StreamPos{Stream: 0x5eed, Pos: 1 << 33, Replay: 7})},
	}
}

// encode returns the wire bytes of frames.
func encode(t testing.TB, frames ...Frame) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, f := range frames {
		if err := w.WriteFrame(f.Header, f.Payload); err != nil {
			t.Fatalf("WriteFrame %v: %v", f.Type, err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rawHeader builds header bytes without any validation, for feeding bad frames.
func rawHeader(typ FrameType, flags uint8, seq, off uint64, errno, length uint32) []byte {
	b := make([]byte, HeaderSize)
	h := Header{Type: typ, Flags: flags, Seq: seq, Offset: off, Errno: errno, Length: length}
	putHeader(b, &h)
	return b
}

// countingWriter records every Write call.
type countingWriter struct {
	calls int
	buf   bytes.Buffer
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.calls++
	return c.buf.Write(p)
}

// fakeConn is a net.Conn that records writes; only Write is implemented, which is all
// a Writer uses. Embedding the interface makes the type assertion to net.Conn succeed.
type fakeConn struct {
	net.Conn
	countingWriter
}

func (c *fakeConn) Write(p []byte) (int, error) { return c.countingWriter.Write(p) }
