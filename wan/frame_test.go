package wan

import (
	"bytes"
	"errors"
	"io"
	"math"
	"slices"
	"testing"
)

func TestRoundTripEveryFrameType(t *testing.T) {
	frames := validFrames(t)
	seen := map[FrameType]bool{}
	for _, f := range frames {
		seen[f.Type] = true
	}
	for typ := FrameHello; typ <= FrameResyncDone; typ++ {
		if !seen[typ] {
			t.Errorf("validFrames lacks a %v frame", typ)
		}
	}

	wire := encode(t, frames...)
	r := NewReader(bytes.NewReader(wire))
	for i, want := range frames {
		got, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d (%v): %v", i, want.Type, err)
		}
		want.Length = uint32(len(want.Payload))
		if got.Header != want.Header {
			t.Errorf("frame %d: header %+v, want %+v", i, got.Header, want.Header)
		}
		if !bytes.Equal(got.Payload, want.Payload) {
			t.Errorf("frame %d (%v): payload differs", i, want.Type)
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("after the last frame: %v, want io.EOF", err)
	}
	// Sticky: a Reader at EOF stays there.
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("second read after the last frame: %v, want io.EOF", err)
	}
}

func TestFrameTypeString(t *testing.T) {
	for _, tc := range []struct {
		t    FrameType
		want string
	}{
		{FrameHello, "Hello"}, {FrameResyncData, "ResyncData"}, {FrameResyncDone, "ResyncDone"},
		{FrameCatchUp, "CatchUp"}, {FrameStream, "Stream"}, {0, "FrameType(0)"}, {19, "FrameType(19)"},
	} {
		if got := tc.t.String(); got != tc.want {
			t.Errorf("FrameType(%d).String() = %q, want %q", tc.t, got, tc.want)
		}
	}
	if MaxPayload(FrameWrite) != MaxData || MaxPayload(FrameBitmap) != 4<<20 || MaxPayload(FramePing) != 64<<10 || MaxPayload(0) != -1 {
		t.Error("MaxPayload disagrees with the documented limits")
	}
}

func TestReadFrameRejects(t *testing.T) {
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	good := rawHeader(FramePing, 0, 1, 0, 0, 0)
	badMagic := bytes.Clone(good)
	badMagic[0] = 'X'
	reserved := bytes.Clone(good)
	reserved[7] = 1

	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"bad magic", badMagic, ErrBadMagic},
		{"nonzero reserved", reserved, ErrMalformed},
		{"type 0", rawHeader(0, 0, 0, 0, 0, 0), ErrMalformed},
		{"type 17", rawHeader(17, 0, 0, 0, 0, 0), ErrMalformed},
		{"type 255", rawHeader(255, 0, 0, 0, 0, 0), ErrMalformed},
		{"undefined flag", rawHeader(FrameWrite, 1<<4, 0, 0, 0, 0), ErrMalformed},
		{"unmap on write", rawHeader(FrameWrite, FlagUnmap, 0, 0, 0, 0), ErrMalformed},
		{"last on write", rawHeader(FrameWrite, FlagLast, 0, 0, 0, 0), ErrMalformed},
		{"sync on resync data", rawHeader(FrameResyncData, FlagSync, 0, 0, 0, 0), ErrMalformed},
		{"fua on flush", rawHeader(FrameFlush, FlagFUA, 0, 0, 0, 0), ErrMalformed},
		{"flags on ack", rawHeader(FrameAck, FlagLast, 0, 0, 0, 0), ErrMalformed},
		{"write over MaxData", rawHeader(FrameWrite, 0, 0, 0, 0, MaxData+1), ErrFrameTooBig},
		{"resync data over MaxData", rawHeader(FrameResyncData, 0, 0, 0, 0, math.MaxUint32), ErrFrameTooBig},
		{"bitmap over 4 MiB", rawHeader(FrameBitmap, 0, 0, 0, 0, 4<<20+1), ErrFrameTooBig},
		{"hello over 64 KiB", rawHeader(FrameHello, 0, 0, 0, 0, 64<<10+1), ErrFrameTooBig},
		{"close over 64 KiB", rawHeader(FrameClose, 0, 0, 0, 0, 64<<10+1), ErrFrameTooBig},
		{"zero payload 7", rawHeader(FrameZero, 0, 0, 0, 0, 7), ErrMalformed},
		{"zero payload 9", rawHeader(FrameZero, 0, 0, 0, 0, 9), ErrMalformed},
		{"auth payload 31", rawHeader(FrameAuth, 0, 0, 0, 0, 31), ErrMalformed},
		{"digest payload 39", rawHeader(FrameDigest, 0, 0, 0, 0, 39), ErrMalformed},
		{"resync req payload 0", rawHeader(FrameResyncReq, 0, 0, 0, 0, 0), ErrMalformed},
		{"digest req payload 16", rawHeader(FrameDigestReq, 0, 0, 0, 0, 16), ErrMalformed},
		{"state payload 33", rawHeader(FrameState, 0, 0, 0, 0, 33), ErrMalformed},
		{"resync done payload 31", rawHeader(FrameResyncDone, 0, 0, 0, 0, 31), ErrMalformed},
		{"ping with payload", rawHeader(FramePing, 0, 0, 0, 0, 1), ErrMalformed},
		{"ack with payload", rawHeader(FrameAck, 0, 0, 0, 0, 4), ErrMalformed},
		{"write wraps", cat(rawHeader(FrameWrite, 0, 0, math.MaxUint64-10, 0, 11), make([]byte, 11)), ErrMalformed},
		{"zero wraps", cat(rawHeader(FrameZero, 0, 0, math.MaxUint64-10, 0, 8), PutU64(11)), ErrMalformed},
		{"digest wraps", cat(rawHeader(FrameDigest, 0, 0, 1, 0, 40), PutU64(math.MaxUint64), make([]byte, 32)), ErrMalformed},
		{"close not utf-8", cat(rawHeader(FrameClose, 0, 0, 0, 0, 2), []byte{0xff, 0xfe}), ErrMalformed},
		{"truncated header", good[:20], io.ErrUnexpectedEOF},
		{"truncated payload", cat(rawHeader(FrameWrite, 0, 0, 0, 0, 4096), make([]byte, 100)), io.ErrUnexpectedEOF},
		{"truncated fixed payload", cat(rawHeader(FrameZero, 0, 0, 0, 0, 8), make([]byte, 7)), io.ErrUnexpectedEOF},
		{"empty stream", nil, io.EOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.in))
			_, err := r.ReadFrame()
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadFrame: %v, want %v", err, tc.want)
			}
			// Sticky: the stream position is lost, so nothing more is decoded.
			if _, err2 := r.ReadFrame(); err2 != err {
				t.Fatalf("second ReadFrame: %v, want the same error %v", err2, err)
			}
		})
	}
}

func TestReadFrameLimitsAccepted(t *testing.T) {
	// The limits are inclusive.
	frames := []Frame{
		{Header{Type: FrameWrite}, make([]byte, MaxData)},
		{Header{Type: FrameBitmap}, make([]byte, MaxBitmapChunk)},
		{Header{Type: FrameClose}, bytes.Repeat([]byte("a"), MaxControl)},
		{Header{Type: FrameWrite, Offset: math.MaxUint64 - 1}, make([]byte, 1)},
		{Header{Type: FrameZero, Offset: 1}, PutU64(math.MaxUint64 - 1)},
	}
	r := NewReader(bytes.NewReader(encode(t, frames...)))
	for _, want := range frames {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("%v of %d bytes: %v", want.Type, len(want.Payload), err)
		}
		if len(f.Payload) != len(want.Payload) {
			t.Fatalf("%v: payload of %d bytes, want %d", want.Type, len(f.Payload), len(want.Payload))
		}
	}
}

func TestWriterRejects(t *testing.T) {
	tests := []struct {
		name    string
		h       Header
		payload []byte
		want    error
	}{
		{"unknown type", Header{Type: 0}, nil, ErrMalformed},
		{"type 17", Header{Type: 17}, nil, ErrMalformed},
		{"write too big", Header{Type: FrameWrite}, make([]byte, MaxData+1), ErrFrameTooBig},
		{"bitmap too big", Header{Type: FrameBitmap}, make([]byte, MaxBitmapChunk+1), ErrFrameTooBig},
		{"ping too big", Header{Type: FramePing}, make([]byte, MaxControl+1), ErrFrameTooBig},
		{"zero short", Header{Type: FrameZero}, make([]byte, 4), ErrMalformed},
		{"auth short", Header{Type: FrameAuth}, make([]byte, 16), ErrMalformed},
		{"flush with payload", Header{Type: FrameFlush}, []byte{1}, ErrMalformed},
		{"bad flag", Header{Type: FrameZero, Flags: FlagLast}, PutU64(1), ErrMalformed},
		{"write wraps", Header{Type: FrameWrite, Offset: math.MaxUint64}, []byte{1}, ErrMalformed},
		{"zero wraps", Header{Type: FrameZero, Offset: 2}, PutU64(math.MaxUint64 - 1), ErrMalformed},
		{"close not utf-8", Header{Type: FrameClose}, []byte{0xc0}, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var cw countingWriter
			w := NewWriter(&cw)
			if err := w.WriteFrame(tc.h, tc.payload); !errors.Is(err, tc.want) {
				t.Fatalf("WriteFrame: %v, want %v", err, tc.want)
			}
			// A refused frame leaves the Writer usable and empty.
			if w.Buffered() != 0 {
				t.Fatalf("Buffered = %d after a refused frame", w.Buffered())
			}
			if err := w.WriteFrame(Header{Type: FramePing, Seq: 1}, nil); err != nil {
				t.Fatalf("WriteFrame after a refused frame: %v", err)
			}
			if err := w.Flush(); err != nil || cw.buf.Len() != HeaderSize {
				t.Fatalf("Flush: %v, %d bytes written, want %d", err, cw.buf.Len(), HeaderSize)
			}
		})
	}
}

func TestWriterSetsLength(t *testing.T) {
	wire := encode(t, Frame{Header{Type: FrameWrite, Length: 999}, make([]byte, 10)})
	var h Header
	if err := h.UnmarshalBinary(wire[:HeaderSize]); err != nil {
		t.Fatal(err)
	}
	if h.Length != 10 {
		t.Fatalf("Length = %d, want 10", h.Length)
	}
}

func TestWriterBatchesUntilFlush(t *testing.T) {
	frames := validFrames(t)
	var cw countingWriter
	w := NewWriter(&cw)
	want := 0
	for _, f := range frames {
		if err := w.WriteFrame(f.Header, f.Payload); err != nil {
			t.Fatal(err)
		}
		want += HeaderSize + len(f.Payload)
		if cw.calls != 0 {
			t.Fatalf("after %v: %d writes reached the stream before Flush", f.Type, cw.calls)
		}
		if w.Buffered() != want {
			t.Fatalf("Buffered = %d, want %d", w.Buffered(), want)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if cw.calls != 1 || cw.buf.Len() != want {
		t.Fatalf("Flush made %d writes of %d bytes in all, want 1 of %d", cw.calls, cw.buf.Len(), want)
	}
	if w.Buffered() != 0 {
		t.Fatalf("Buffered = %d after Flush", w.Buffered())
	}
	if err := w.Flush(); err != nil || cw.calls != 1 {
		t.Fatalf("empty Flush: %v, %d writes", err, cw.calls)
	}
}

func TestWriterZeroCopyOnConn(t *testing.T) {
	small := fill(100, 1)
	large := fill(zeroCopyMin, 2)
	c := &fakeConn{}
	w := NewWriter(c)
	frames := []Frame{
		{Header{Type: FrameWrite, Seq: 1}, small},
		{Header{Type: FrameWrite, Seq: 2}, large},
		{Header{Type: FrameWrite, Seq: 3}, large},
		{Header{Type: FrameFlush, Seq: 4}, nil},
	}
	for _, f := range frames {
		if err := w.WriteFrame(f.Header, f.Payload); err != nil {
			t.Fatal(err)
		}
	}
	if c.calls != 0 {
		t.Fatalf("%d writes before Flush", c.calls)
	}
	// The large payload is referenced, not copied: a change made before Flush is
	// what gets sent. (This is the contract: do not do this.)
	large[0] ^= 0xff
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	r := NewReader(&c.buf)
	for _, want := range frames {
		f, err := r.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if f.Seq != want.Seq || !bytes.Equal(f.Payload, want.Payload) {
			t.Fatalf("frame seq %d: seq %d, payload equal %v", want.Seq, f.Seq, bytes.Equal(f.Payload, want.Payload))
		}
	}
	if len(w.large) != 0 || len(w.vec) != 0 {
		t.Fatal("Writer still references payloads after Flush")
	}
}

func TestWriterCopiesOffConn(t *testing.T) {
	large := fill(zeroCopyMin, 2)
	orig := bytes.Clone(large)
	var cw countingWriter
	w := NewWriter(&cw)
	if err := w.WriteFrame(Header{Type: FrameWrite}, large); err != nil {
		t.Fatal(err)
	}
	large[0] ^= 0xff // allowed off a net.Conn: the payload was copied
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(cw.buf.Bytes()[HeaderSize:], orig) {
		t.Fatal("payload changed after WriteFrame reached the stream")
	}
}

type failingWriter struct{ n int }

func (f *failingWriter) Write(p []byte) (int, error) {
	f.n++
	return len(p) / 2, io.ErrClosedPipe
}

func TestWriterErrorIsSticky(t *testing.T) {
	fw := &failingWriter{}
	w := NewWriter(fw)
	if err := w.WriteFrame(Header{Type: FramePing}, nil); err != nil {
		t.Fatal(err)
	}
	err := w.Flush()
	if !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("Flush: %v", err)
	}
	if err2 := w.WriteFrame(Header{Type: FramePing}, nil); err2 != err {
		t.Fatalf("WriteFrame after a failed Flush: %v", err2)
	}
	if err2 := w.Flush(); err2 != err || fw.n != 1 {
		t.Fatalf("second Flush: %v after %d writes", err2, fw.n)
	}
}

func TestDetach(t *testing.T) {
	a, b := fill(4096, 1), fill(4096, 9)
	wire := encode(t,
		Frame{Header{Type: FrameWrite, Seq: 1}, a},
		Frame{Header{Type: FrameWrite, Seq: 2}, b},
		Frame{Header{Type: FrameWrite, Seq: 3}, a},
		Frame{Header{Type: FramePing, Seq: 4}, nil},
		Frame{Header{Type: FrameWrite, Seq: 5}, b},
	)
	r := NewReader(bytes.NewReader(wire))
	if p := r.Detach(); p != nil {
		t.Fatal("Detach before any frame returned a payload")
	}

	// Without Detach the payload aliases the Reader's buffer: the next frame
	// overwrites it.
	f1, _ := r.ReadFrame()
	kept := f1.Payload
	f2, _ := r.ReadFrame()
	if &kept[0] != &f2.Payload[0] || !bytes.Equal(kept, b) {
		t.Fatal("undetached payloads do not share the Reader's buffer")
	}

	// With Detach the payload is the caller's for good.
	own := r.Detach()
	if !bytes.Equal(own, b) || cap(own) != len(own) {
		t.Fatalf("Detach returned %d bytes (cap %d)", len(own), cap(own))
	}
	if p := r.Detach(); p != nil {
		t.Fatal("second Detach returned a payload")
	}
	f3, _ := r.ReadFrame()
	if &f3.Payload[0] == &own[0] || !bytes.Equal(own, b) || !bytes.Equal(f3.Payload, a) {
		t.Fatal("Reader wrote into a detached payload")
	}

	// Nothing to detach from a frame without payload.
	if f, err := r.ReadFrame(); err != nil || f.Type != FramePing {
		t.Fatal(f.Type, err)
	}
	if p := r.Detach(); p != nil {
		t.Fatal("Detach of an empty payload returned bytes")
	}
	if f, err := r.ReadFrame(); err != nil || !bytes.Equal(f.Payload, b) {
		t.Fatal("frame after detaching nothing", err)
	}
}

func TestReaderDropsHugeBuffers(t *testing.T) {
	wire := encode(t,
		Frame{Header{Type: FrameWrite}, make([]byte, 2<<20)},
		Frame{Header{Type: FrameWrite}, make([]byte, 4096)},
		Frame{Header{Type: FrameWrite}, make([]byte, 512<<10)},
		Frame{Header{Type: FrameWrite}, make([]byte, 4096)},
	)
	r := NewReader(bytes.NewReader(wire))
	caps := []int{}
	for range 4 {
		if _, err := r.ReadFrame(); err != nil {
			t.Fatal(err)
		}
		caps = append(caps, cap(r.buf))
	}
	if want := []int{2 << 20, 4096, 512 << 10, 512 << 10}; !slices.Equal(caps, want) {
		t.Fatalf("buffer capacities %v, want %v", caps, want)
	}
}

func TestReaderBuffered(t *testing.T) {
	wire := encode(t, Frame{Header{Type: FramePing, Seq: 1}, nil}, Frame{Header{Type: FramePing, Seq: 2}, nil})
	r := NewReader(bytes.NewReader(wire))
	if r.Buffered() != 0 {
		t.Fatal("Buffered before any read")
	}
	if _, err := r.ReadFrame(); err != nil {
		t.Fatal(err)
	}
	if r.Buffered() != HeaderSize {
		t.Fatalf("Buffered = %d, want %d (the second ping)", r.Buffered(), HeaderSize)
	}
	if _, err := r.ReadFrame(); err != nil {
		t.Fatal(err)
	}
	if r.Buffered() != 0 {
		t.Fatalf("Buffered = %d at the end", r.Buffered())
	}
}

func TestHeaderMarshalRoundTrip(t *testing.T) {
	h := Header{Type: FrameZero, Flags: FlagUnmap, Seq: 1, Offset: 2, Errno: 3, Length: 8}
	b := mustMarshal(t, h)
	var got Header
	if err := got.UnmarshalBinary(b); err != nil || got != h {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if err := got.UnmarshalBinary(b[:31]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("31-byte header: %v", err)
	}
	if _, err := (Header{Type: FrameZero, Length: 7}).MarshalBinary(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("marshal bad header: %v", err)
	}
}
