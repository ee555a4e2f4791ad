package wan

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// FuzzReadFrame feeds arbitrary bytes to a Reader. It must not panic, must fail only
// with the documented errors, must never hold a payload beyond its type's limit, and
// every frame it accepts must re-encode to exactly the bytes it was read from — so a
// decoded frame has one encoding, and the Writer accepts whatever the Reader does.
func FuzzReadFrame(f *testing.F) {
	frames := validFrames(f)
	for _, fr := range frames {
		if len(fr.Payload) <= 4096 {
			f.Add(encode(f, fr))
		}
	}
	f.Add(encode(f, frames[:8]...))
	f.Add(rawHeader(FrameWrite, 0, 1, 0, 0, MaxData))
	f.Add(rawHeader(FrameBitmap, FlagLast, 0, 0, 0, 16))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data))
		off := 0
		for i := 0; ; i++ {
			fr, err := r.ReadFrame()
			if err != nil {
				switch {
				case err == io.EOF:
					if off != len(data) {
						t.Fatalf("io.EOF at offset %d of %d", off, len(data))
					}
				case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, ErrBadMagic),
					errors.Is(err, ErrMalformed), errors.Is(err, ErrFrameTooBig):
				default:
					t.Fatalf("undocumented error: %v", err)
				}
				if cap(r.buf) > MaxData {
					t.Fatalf("Reader holds a %d-byte buffer", cap(r.buf))
				}
				return
			}
			if len(fr.Payload) != int(fr.Length) || len(fr.Payload) > MaxPayload(fr.Type) {
				t.Fatalf("%v frame: Length %d, payload %d bytes, limit %d", fr.Type, fr.Length, len(fr.Payload), MaxPayload(fr.Type))
			}
			n := HeaderSize + len(fr.Payload)
			if got := encode(t, fr); !bytes.Equal(got, data[off:off+n]) {
				t.Fatalf("frame %d (%v) re-encodes as\n%x\nread from\n%x", i, fr.Type, got, data[off:off+n])
			}
			off += n
			if i%2 == 1 {
				r.Detach() // exercise both buffer paths
			}
		}
	})
}

// FuzzHello checks that Hello.UnmarshalBinary never panics, fails only with the
// documented errors and that accepted input re-marshals byte for byte.
func FuzzHello(f *testing.F) {
	long := sampleHello()
	long.Node, long.Volume = strings.Repeat("n", 255), strings.Repeat("é", 127)
	catchUp := sampleHello()
	catchUp.Flags |= HelloCatchUp
	optional := sampleHello()
	optional.Flags |= HelloResyncHeld | 1<<14
	for _, h := range []Hello{sampleHello(), {Version: ProtocolVersion}, long, catchUp, optional} {
		f.Add(mustMarshal(f, h))
	}
	f.Add([]byte{0, 2, 1, 2, 3})
	f.Fuzz(func(t *testing.T, data []byte) {
		var h Hello
		if err := h.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("undocumented error: %v", err)
			}
			return
		}
		b, err := h.MarshalBinary()
		if err != nil {
			t.Fatalf("accepted hello does not marshal: %v", err)
		}
		if !bytes.Equal(b, data) {
			t.Fatalf("re-marshals as\n%x\nwas\n%x", b, data)
		}
	})
}

// FuzzStateUpdate: as FuzzHello, for StateUpdate.
func FuzzStateUpdate(f *testing.F) {
	f.Add(mustMarshal(f, StateUpdate{Role: RolePrimary, Disk: 9, Gen: Generations{Current: 1, Bitmap: 2, History: [2]uint64{3, 4}}}))
	f.Add(mustMarshal(f, StateUpdate{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		var s StateUpdate
		if err := s.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("undocumented error: %v", err)
			}
			return
		}
		b, err := s.MarshalBinary()
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("re-marshals as %x, %v; was %x", b, err, data)
		}
	})
}

// FuzzStreamPos: as FuzzHello, for StreamPos.
func FuzzStreamPos(f *testing.F) {
	f.Add(mustMarshal(f, StreamPos{Stream: 0x5eed, Pos: 1 << 33, Replay: 1 << 32}))
	f.Add(mustMarshal(f, StreamPos{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		var p StreamPos
		if err := p.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("undocumented error: %v", err)
			}
			return
		}
		b, err := p.MarshalBinary()
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("re-marshals as %x, %v; was %x", b, err, data)
		}
	})
}

// FuzzGenerations: as FuzzHello, for Generations.
func FuzzGenerations(f *testing.F) {
	f.Add(mustMarshal(f, sampleHello().Gen))
	f.Add(mustMarshal(f, Generations{}))
	f.Fuzz(func(t *testing.T, data []byte) {
		var g Generations
		if err := g.UnmarshalBinary(data); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("undocumented error: %v", err)
			}
			return
		}
		b, err := g.MarshalBinary()
		if err != nil || !bytes.Equal(b, data) {
			t.Fatalf("re-marshals as %x, %v; was %x", b, err, data)
		}
	})
}
