package wan

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
)

// textBlock is n bytes of log-like text, compressible as a filesystem of text
// files is.
func textBlock(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	words := []string{"replication", "volume", "primary", "secondary", "the", "of", "and", "write",
		"bitmap", "resync", "error", "connected", "timeout", "node", "peer", "generation", "disk"}
	var b bytes.Buffer
	for b.Len() < n {
		fmt.Fprintf(&b, "2026-11-22T03:%02d:%02d.%06dZ ", rng.IntN(60), rng.IntN(60), rng.IntN(1e6))
		for range 4 + rng.IntN(8) {
			b.WriteString(words[rng.IntN(len(words))])
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "offset=%d len=%d\n", rng.Uint64N(1<<30), 4096*(1+rng.IntN(256)))
	}
	return b.Bytes()[:n]
}

func randomBlock(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 2))
	p := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], rng.Uint64())
	}
	return p
}

// TestCompressionRoundTrip sends text, random data and small payloads through a
// compressing Writer and a decompressing Reader: frames arrive exactly as sent,
// text travels compressed and random data raw.
func TestCompressionRoundTrip(t *testing.T) {
	c := NewCompressor()
	var wire bytes.Buffer
	w := NewWriter(&wire)
	w.EnableCompression(c)
	frames := []Frame{
		{Header{Type: FrameWrite, Flags: FlagSync | FlagFUA, Seq: 1, Offset: 4096}, textBlock(64<<10, 1)},
		{Header{Type: FrameResyncData, Seq: 2, Offset: 1 << 20}, textBlock(1<<20, 2)},
		{Header{Type: FrameWrite, Seq: 3, Offset: 0}, randomBlock(64<<10, 3)},
		{Header{Type: FrameWrite, Seq: 4, Offset: 0}, textBlock(100, 4)}, // below compressMin
		{Header{Type: FrameAck, Seq: 5}, nil},
		{Header{Type: FrameWrite, Seq: 6, Offset: 8192}, textBlock(4096, 6)},
	}
	for _, f := range frames {
		if err := w.WriteFrame(f.Header, f.Payload); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	var sent int
	for _, f := range frames {
		sent += HeaderSize + len(f.Payload)
	}
	if wire.Len() >= sent*2/3 {
		t.Fatalf("wire carries %d bytes for %d sent: text was not compressed", wire.Len(), sent)
	}
	// The raw stream is not readable without negotiating compression.
	if _, err := NewReader(bytes.NewReader(wire.Bytes())).ReadFrame(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("compressed frame without negotiation: %v, want ErrMalformed", err)
	}
	r := NewReader(&wire)
	r.EnableDecompression()
	for i, want := range frames {
		got, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		want.Length = uint32(len(want.Payload))
		if got.Header != want.Header || !bytes.Equal(got.Payload, want.Payload) {
			t.Fatalf("frame %d: got %+v (%d bytes), want %+v", i, got.Header, len(got.Payload), want.Header)
		}
		if i == 1 {
			r.Detach()
		}
	}
	if _, err := r.ReadFrame(); err != io.EOF {
		t.Fatalf("after the last frame: %v", err)
	}
	st := c.Stats()
	if st.Incompressible != 1 || st.Ratio() < 2 {
		t.Fatalf("stats %+v ratio %.2f: want one incompressible payload and a ratio above 2", st, st.Ratio())
	}
}

// TestCompressionSkipsIncompressible: after random payloads the Compressor stops
// trying most of them, and returns to compressing when text comes back.
func TestCompressionSkipsIncompressible(t *testing.T) {
	c := NewCompressor()
	w := NewWriter(io.Discard)
	w.EnableCompression(c)
	for i := range 200 {
		if err := w.WriteFrame(Header{Type: FrameWrite, Seq: uint64(i)}, randomBlock(4096, uint64(i))); err != nil {
			t.Fatal(err)
		}
	}
	if st := c.Stats(); st.Tried > 20 || st.RawBytes != st.WireBytes {
		t.Fatalf("random data: %+v; want at most 20 of 200 tried, all sent raw", st)
	}
	before := c.Stats()
	for i := range 2 * maxSkip {
		if err := w.WriteFrame(Header{Type: FrameWrite, Seq: uint64(i)}, textBlock(4096, uint64(i))); err != nil {
			t.Fatal(err)
		}
	}
	st := c.Stats()
	if raw, wire := st.RawBytes-before.RawBytes, st.WireBytes-before.WireBytes; wire >= raw*3/4 {
		t.Fatalf("text after random data: %d raw bytes took %d on the wire", raw, wire)
	}
}

// TestDecompressRejects covers the checks made before and after inflating.
func TestDecompressRejects(t *testing.T) {
	c := NewCompressor()
	good := c.enc.EncodeAll(textBlock(8192, 1), nil)
	frame := func(off uint64, rawLen uint32, z []byte) []byte {
		p := binary.BigEndian.AppendUint32(nil, rawLen)
		p = append(p, z...)
		return append(rawHeader(FrameWrite, FlagZstd, 1, off, 0, uint32(len(p))), p...)
	}
	tests := []struct {
		name string
		data []byte
		want error
	}{
		{"claims more than MaxData", frame(0, MaxData+1, good), ErrFrameTooBig},
		{"length prefix too small", frame(0, 4096, good), ErrMalformed},
		{"length prefix too large", frame(0, 16384, good), ErrMalformed},
		{"garbage", frame(0, 8192, bytes.Repeat([]byte{0xaa}, 64)), ErrMalformed},
		{"range wraps", frame(1<<64-4096, 8192, good), ErrMalformed},
		{"no prefix", append(rawHeader(FrameWrite, FlagZstd, 1, 0, 0, 2), 0, 0), ErrMalformed},
		{"zstd on a zero frame", append(rawHeader(FrameZero, FlagZstd, 1, 0, 0, 8), PutU64(1)...), ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := NewReader(bytes.NewReader(tc.data))
			r.EnableDecompression()
			if _, err := r.ReadFrame(); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	w := NewWriter(io.Discard)
	if err := w.WriteFrame(Header{Type: FrameWrite, Flags: FlagZstd}, good); !errors.Is(err, ErrMalformed) {
		t.Fatalf("caller-set FlagZstd: %v, want ErrMalformed", err)
	}
}

// FuzzReadCompressed feeds arbitrary bytes to a decompressing Reader: no panic, only
// documented errors, no payload beyond its limit, and every frame handed out plain.
func FuzzReadCompressed(f *testing.F) {
	c := NewCompressor()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.EnableCompression(c)
	_ = w.WriteFrame(Header{Type: FrameWrite, Seq: 1}, textBlock(2048, 1))
	_ = w.WriteFrame(Header{Type: FrameResyncData, Seq: 2, Offset: 4096}, textBlock(1024, 2))
	_ = w.WriteFrame(Header{Type: FrameAck, Seq: 3}, nil)
	_ = w.Flush()
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data))
		r.EnableDecompression()
		for {
			fr, err := r.ReadFrame()
			if err != nil {
				switch {
				case err == io.EOF, errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, ErrBadMagic),
					errors.Is(err, ErrMalformed), errors.Is(err, ErrFrameTooBig):
				default:
					t.Fatalf("undocumented error: %v", err)
				}
				return
			}
			if fr.Flags&FlagZstd != 0 || len(fr.Payload) != int(fr.Length) || len(fr.Payload) > MaxPayload(fr.Type) {
				t.Fatalf("%v frame: flags %#x Length %d payload %d", fr.Type, fr.Flags, fr.Length, len(fr.Payload))
			}
		}
	})
}

// BenchmarkCompress measures the Writer's cost per 4 KiB and 1 MiB payload for
// text and for random data (the incompressible case must stay cheap).
func BenchmarkCompress(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		for _, kind := range []string{"text", "random"} {
			b.Run(fmt.Sprintf("%s-%d", kind, size), func(b *testing.B) {
				var ps [][]byte
				for i := range 64 {
					if kind == "text" {
						ps = append(ps, textBlock(size, uint64(i)))
					} else {
						ps = append(ps, randomBlock(size, uint64(i)))
					}
				}
				c := NewCompressor()
				w := NewWriter(io.Discard)
				w.EnableCompression(c)
				b.SetBytes(int64(size))
				i := 0
				for b.Loop() {
					if err := w.WriteFrame(Header{Type: FrameWrite}, ps[i%len(ps)]); err != nil {
						b.Fatal(err)
					}
					if err := w.Flush(); err != nil {
						b.Fatal(err)
					}
					i++
				}
				b.ReportMetric(c.Stats().Ratio(), "ratio")
			})
		}
	}
}
