package wan

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math"
	"strings"
	"testing"
)

func TestU64(t *testing.T) {
	for _, v := range []uint64{0, 1, 4096, 1 << 40, math.MaxUint64} {
		p := PutU64(v)
		if len(p) != 8 {
			t.Fatalf("PutU64(%d) is %d bytes", v, len(p))
		}
		if got, err := GetU64(p); err != nil || got != v {
			t.Fatalf("GetU64(PutU64(%d)) = %d, %v", v, got, err)
		}
	}
	for _, n := range []int{0, 7, 9} {
		if _, err := GetU64(make([]byte, n)); !errors.Is(err, ErrMalformed) {
			t.Fatalf("GetU64 of %d bytes: %v", n, err)
		}
	}
}

func TestDigest(t *testing.T) {
	sum := sha256.Sum256([]byte("region"))
	p := PutDigest(1<<20, sum)
	n, got, err := GetDigest(p)
	if err != nil || n != 1<<20 || got != sum {
		t.Fatalf("GetDigest: %d, %x, %v", n, got, err)
	}
	if _, _, err := GetDigest(p[:39]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("39-byte digest: %v", err)
	}
}

func TestGenerations(t *testing.T) {
	for _, g := range []Generations{
		{},
		{Current: 1, Bitmap: 2, History: [2]uint64{3, 4}},
		{Current: math.MaxUint64, Bitmap: math.MaxUint64, History: [2]uint64{math.MaxUint64, math.MaxUint64}},
	} {
		b := mustMarshal(t, g)
		if len(b) != 32 {
			t.Fatalf("%+v: %d bytes", g, len(b))
		}
		var got Generations
		if err := got.UnmarshalBinary(b); err != nil || got != g {
			t.Fatalf("round trip %+v: %+v, %v", g, got, err)
		}
	}
	var g Generations
	for _, n := range []int{0, 31, 33} {
		if err := g.UnmarshalBinary(make([]byte, n)); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%d bytes: %v", n, err)
		}
	}
}

func TestStreamPos(t *testing.T) {
	for _, p := range []StreamPos{{}, {Stream: 1}, {Stream: 1, Replay: 1}, {Stream: 2, Pos: 9, Replay: 4}, {Stream: math.MaxUint64, Pos: math.MaxUint64, Replay: math.MaxUint64}} {
		b := mustMarshal(t, p)
		if len(b) != 24 {
			t.Fatalf("%+v: %d bytes", p, len(b))
		}
		var got StreamPos
		if err := got.UnmarshalBinary(b); err != nil || got != p {
			t.Fatalf("round trip %+v: %+v, %v", p, got, err)
		}
	}
	for _, p := range []StreamPos{{Pos: 7}, {Replay: 1}, {Stream: 1, Pos: 3, Replay: 5}} {
		if _, err := p.MarshalBinary(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("marshal %+v: %v", p, err)
		}
	}
	kept := StreamPos{Stream: 3, Pos: 4}
	bad := make([]byte, 24)
	bad[15] = 7
	past := mustMarshal(t, StreamPos{Stream: 1, Pos: 3, Replay: 4})
	past[23] = 5
	for _, b := range [][]byte{bad, past, make([]byte, 23), make([]byte, 25), nil} {
		got := kept
		if err := got.UnmarshalBinary(b); !errors.Is(err, ErrMalformed) || got != kept {
			t.Fatalf("%x: %v, left %+v", b, err, got)
		}
	}
}

func TestStateUpdate(t *testing.T) {
	for _, s := range []StateUpdate{
		{},
		{Role: RolePrimary, Disk: 9, Gen: Generations{Current: 5}},
		{Role: RoleSecondary, Disk: 255, Gen: Generations{Current: 1, Bitmap: 2, History: [2]uint64{3, 4}}},
	} {
		b := mustMarshal(t, s)
		if len(b) != 34 {
			t.Fatalf("%+v: %d bytes", s, len(b))
		}
		var got StateUpdate
		if err := got.UnmarshalBinary(b); err != nil || got != s {
			t.Fatalf("round trip %+v: %+v, %v", s, got, err)
		}
	}
	if _, err := (StateUpdate{Role: 3}).MarshalBinary(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("marshal role 3: %v", err)
	}
	var s StateUpdate
	bad := make([]byte, 34)
	bad[0] = 3
	if err := s.UnmarshalBinary(bad); !errors.Is(err, ErrMalformed) {
		t.Fatalf("role 3: %v", err)
	}
	for _, n := range []int{0, 33, 35} {
		if err := s.UnmarshalBinary(make([]byte, n)); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%d bytes: %v", n, err)
		}
	}
}

func TestHelloRoundTrip(t *testing.T) {
	full := sampleHello()
	long := sampleHello()
	long.Node, long.Volume = strings.Repeat("n", 255), strings.Repeat("v", 255)
	empty := Hello{Version: ProtocolVersion}
	utf := sampleHello()
	utf.Node, utf.Volume, utf.Role, utf.Mode, utf.Flags = "nœud-東京", "卷", RoleSecondary, ModeAsync, HelloDiscardMine

	for _, h := range []Hello{full, long, empty, utf} {
		b := mustMarshal(t, h)
		if want := 102 + len(h.Node) + len(h.Volume); len(b) != want {
			t.Fatalf("%q/%q: %d bytes, want %d", h.Node, h.Volume, len(b), want)
		}
		var got Hello
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatalf("%q/%q: %v", h.Node, h.Volume, err)
		}
		if got != h {
			t.Fatalf("round trip: %+v, want %+v", got, h)
		}
	}
}

// TestHelloOptionalFlags: a receiver keeps optional bits it does not know
// (the high byte) and decodes the rest as usual, so a newer peer's hint
// costs it nothing; the engine acts only on bits it knows.
func TestHelloOptionalFlags(t *testing.T) {
	h := sampleHello()
	h.Flags = HelloCatchUp | HelloResyncHeld | 1<<15
	b := mustMarshal(t, h)
	if got := b[2:4]; got[0] != 0x81 || got[1] != 0x08 {
		t.Fatalf("flags encode as %x, want 8108", got)
	}
	var got Hello
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatalf("hello with an unknown optional bit refused: %v", err)
	}
	if got != h {
		t.Fatalf("round trip: %+v, want %+v", got, h)
	}
	for bit := range 16 {
		h.Flags = 1 << bit
		_, err := h.MarshalBinary()
		required := bit < 8 && h.Flags&helloRequiredKnown == 0
		if required != (err != nil) {
			t.Errorf("flag bit %d: MarshalBinary error %v", bit, err)
		}
	}
}

func TestHelloMarshalRejects(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Hello)
		want error
	}{
		{"version 0", func(h *Hello) { h.Version = 0 }, ErrVersion},
		{"version 2", func(h *Hello) { h.Version = 2 }, ErrVersion},
		{"node too long", func(h *Hello) { h.Node = strings.Repeat("n", 256) }, ErrMalformed},
		{"volume too long", func(h *Hello) { h.Volume = strings.Repeat("v", 256) }, ErrMalformed},
		{"node not utf-8", func(h *Hello) { h.Node = "\xff" }, ErrMalformed},
		{"volume not utf-8", func(h *Hello) { h.Volume = "a\xc0" }, ErrMalformed},
		{"role 3", func(h *Hello) { h.Role = 3 }, ErrMalformed},
		{"mode 2", func(h *Hello) { h.Mode = 2 }, ErrMalformed},
		{"unknown required flag", func(h *Hello) { h.Flags = 16 }, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := sampleHello()
			tc.edit(&h)
			if _, err := h.MarshalBinary(); !errors.Is(err, tc.want) {
				t.Fatalf("MarshalBinary: %v, want %v", err, tc.want)
			}
		})
	}
}

func TestHelloUnmarshalRejects(t *testing.T) {
	good := mustMarshal(t, sampleHello()) // node "alpha" at 100, volume "vol0" at 106
	edit := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, ErrMalformed},
		{"one byte", good[:1], ErrMalformed},
		{"version 2", edit(func(b []byte) []byte { b[1] = 2; return b }), ErrVersion},
		{"version 0", edit(func(b []byte) []byte { b[1] = 0; return b }), ErrVersion},
		{"version only", good[:2], ErrMalformed},
		{"trailing byte", append(bytes.Clone(good), 0), ErrMalformed},
		{"reserved byte", edit(func(b []byte) []byte { b[7] = 1; return b }), ErrMalformed},
		{"unknown required flag", edit(func(b []byte) []byte { b[3] |= 0x80; return b }), ErrMalformed},
		{"role 3", edit(func(b []byte) []byte { b[4] = 3; return b }), ErrMalformed},
		{"mode 2", edit(func(b []byte) []byte { b[6] = 2; return b }), ErrMalformed},
		{"node length overruns", edit(func(b []byte) []byte { b[100] = 200; return b }), ErrMalformed},
		{"node length short", edit(func(b []byte) []byte { b[100] = 4; return b }), ErrMalformed},
		{"volume length long", edit(func(b []byte) []byte { b[106] = 5; return b }), ErrMalformed},
		{"node not utf-8", edit(func(b []byte) []byte { b[101] = 0xff; return b }), ErrMalformed},
		{"volume not utf-8", edit(func(b []byte) []byte { b[107] = 0xc3; return b }), ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := sampleHello()
			h.Node = "unchanged"
			before := h
			if err := h.UnmarshalBinary(tc.in); !errors.Is(err, tc.want) {
				t.Fatalf("UnmarshalBinary: %v, want %v", err, tc.want)
			}
			if h != before {
				t.Fatal("a failed UnmarshalBinary changed the Hello")
			}
		})
	}
	// Every proper prefix of a valid hello is refused.
	for n := range len(good) {
		var h Hello
		if err := h.UnmarshalBinary(good[:n]); err == nil {
			t.Fatalf("prefix of %d bytes accepted", n)
		}
	}
}
