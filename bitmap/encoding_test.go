package bitmap

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.hex (only for a deliberate format change, with a version bump)")

// seal appends the CRC-32C trailer, so tests can build encodings that get
// past the checksum and reach the structural checks.
func seal(body []byte) []byte {
	return binary.LittleEndian.AppendUint32(body, crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)))
}

// header builds the fixed 14-byte header by hand from the documented layout.
func header(ver, log2rs byte, size uint64) []byte {
	h := append([]byte("MRDB"), ver, log2rs)
	return binary.LittleEndian.AppendUint64(h, size)
}

func uvarints(vs ...uint64) []byte {
	var out []byte
	for _, v := range vs {
		out = binary.AppendUvarint(out, v)
	}
	return out
}

// goldenBitmap is small but covers a dirty region 0 (empty first run), a
// run across a word boundary, a multi-byte varint and a dirty short last
// region: 2 MiB + 1000 bytes in 4 KiB regions is 512 full regions and one of
// 1000 bytes.
func goldenBitmap(t *testing.T) *Bitmap {
	b := mustNew(t, 2<<20+1000, 4096)
	b.Set(0, 1)               // region 0
	b.Set(2*4096, 2*4096)     // regions 2-3
	b.Set(64*4096-1, 66*4096) // regions 63-129, across two word boundaries
	b.Set(2<<20, 1000)        // short region 512
	return b
}

func TestGolden(t *testing.T) {
	got, err := goldenBitmap(t).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}

	// The layout spelled out independently of the encoder: runs of clean 0,
	// dirty 1, clean 1, dirty 2, clean 59, dirty 67, clean 382, dirty 1.
	want := seal(append(header(1, 12, 2<<20+1000), uvarints(0, 1, 1, 2, 59, 67, 382, 1)...))
	if !bytes.Equal(got, want) {
		t.Fatalf("encoding disagrees with the documented layout:\n got %x\nwant %x", got, want)
	}

	path := filepath.Join("testdata", "golden.hex")
	if *update {
		if err := os.WriteFile(path, []byte(hex.EncodeToString(got)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fixture, err := hex.DecodeString(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if !bytes.Equal(got, fixture) {
		t.Fatalf("encoding drifted from %s (a format change needs a new version):\n got %x\nwant %x", path, got, fixture)
	}
	d, err := Decode(fixture)
	if err != nil {
		t.Fatal(err)
	}
	if !d.Equal(goldenBitmap(t)) || d.Count() != 71 || d.DirtyBytes() != 70*4096+1000 {
		t.Fatalf("golden fixture decodes to %v", dirtyRegions(d))
	}
}

func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 300 {
		rs := int64(512) << rng.IntN(4)
		size := 1 + rng.Int64N(3000*rs)
		b := mustNew(t, size, rs)
		switch i % 4 {
		case 0: // sparse
			for range rng.IntN(20) {
				b.Set(rng.Int64N(size), rng.Int64N(3*rs))
			}
		case 1: // dense with holes
			b.SetAll()
			for range rng.IntN(20) {
				b.ClearRegions(rng.Int64N(size), rng.Int64N(3*rs))
			}
		case 2: // noise
			for r := range b.Regions() {
				if rng.IntN(2) == 0 {
					b.Set(r*rs, 1)
				}
			}
		}
		data, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		d, err := Decode(data)
		if err != nil {
			t.Fatalf("size %d rs %d: %v", size, rs, err)
		}
		if !d.Equal(b) || d.Count() != b.Count() || d.DirtyBytes() != b.DirtyBytes() {
			t.Fatalf("size %d rs %d: round trip differs", size, rs)
		}
		again, _ := d.MarshalBinary()
		if !bytes.Equal(again, data) {
			t.Fatalf("size %d rs %d: re-encoding differs", size, rs)
		}
	}
}

func TestEncodingLarge(t *testing.T) {
	const tib = int64(1) << 40
	for _, tc := range []struct {
		name     string
		size, rs int64
		fill     func(b *Bitmap)
		maxLen   int
	}{
		{"clean 1 TiB", tib, DefaultRegionSize, func(*Bitmap) {}, 32},
		{"dirty 1 TiB", tib, DefaultRegionSize, (*Bitmap).SetAll, 32},
		{"dirty 1 TiB + 1, 64 KiB regions", tib + 1, 64 << 10, (*Bitmap).SetAll, 32},
		{"sparse 1 TiB", tib, DefaultRegionSize, func(b *Bitmap) {
			for i := range int64(100) {
				b.Set(i*(tib/100), 1<<20)
			}
			b.Set(tib-1, 1)
		}, 22 + 201*8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			tc.fill(b)
			data, err := b.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if len(data) > tc.maxLen {
				t.Fatalf("encoding is %d bytes, want at most %d", len(data), tc.maxLen)
			}
			d, err := Decode(data)
			if err != nil {
				t.Fatal(err)
			}
			if !d.Equal(b) || d.Count() != b.Count() || d.DirtyBytes() != b.DirtyBytes() {
				t.Fatal("round trip differs")
			}
			t.Logf("%d bytes, %d dirty regions", len(data), b.Count())
		})
	}
}

func TestDecodeCorrupt(t *testing.T) {
	valid, err := goldenBitmap(t).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	expectCorrupt := func(name string, data []byte) {
		t.Helper()
		b, err := Decode(data)
		if !errors.Is(err, ErrCorrupt) || b != nil {
			t.Errorf("%s: Decode = %v, %v; want ErrCorrupt", name, b, err)
		}
	}

	// Any single flipped bit, anywhere, is caught (CRC-32C detects them all).
	for i := range valid {
		for bit := range 8 {
			data := bytes.Clone(valid)
			data[i] ^= 1 << bit
			expectCorrupt("flipped bit", data)
		}
	}
	for n := range len(valid) {
		expectCorrupt("truncated", valid[:n])
	}
	expectCorrupt("trailing byte after checksum", append(bytes.Clone(valid), 0))
	expectCorrupt("duplicated", append(bytes.Clone(valid), valid...))

	// Structurally wrong input with a valid checksum, as a buggy or hostile
	// peer would send.
	body := func(ver, log2rs byte, size uint64, runs ...uint64) []byte {
		return seal(append(header(ver, log2rs, size), uvarints(runs...)...))
	}
	const tib = 1 << 40
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"bad magic", seal(append([]byte("DRBD\x01\x0c"), valid[6:len(valid)-4]...))},
		{"version 0", body(0, 12, 8192, 2)},
		{"version 2", body(2, 12, 8192, 2)},
		{"region size 2^8", body(1, 8, 8192, 32)},
		{"region size 2^31", body(1, 31, 8192, 1)},
		{"region size 2^63", body(1, 63, 8192, 1)},
		{"region size 2^255", body(1, 255, 8192, 1)},
		{"size 0", body(1, 12, 0, 0)},
		{"size 2^63", body(1, 12, 1<<63, 1<<51)},
		{"size max uint64", body(1, 9, math.MaxUint64, 1)},
		{"huge declared size", body(1, 9, 1<<62, 1<<53)},
		{"just over MaxRegions", body(1, 9, (MaxRegions+1)*512, MaxRegions+1)},
		{"no runs", seal(header(1, 12, 8192))},
		{"runs short", body(1, 12, tib, 0, 1<<28-1)},
		{"runs long", body(1, 12, tib, 0, 1<<28+1)},
		{"run overflows uint64 sum", body(1, 12, 8192, 1, math.MaxUint64)},
		{"empty dirty run", body(1, 12, 8192, 0, 0, 2)},
		{"empty clean run", body(1, 12, 8192, 0, 1, 0, 1)},
		{"empty last run", body(1, 12, 8192, 2, 0)},
		{"trailing run", body(1, 12, 8192, 0, 2, 1)},
		{"trailing zero", body(1, 12, 8192, 0, 2, 0)},
		{"over-long varint", seal(append(header(1, 12, 8192), 0x82, 0x00))},
		{"over-long zero", seal(append(header(1, 12, 8192), 0x80, 0x00, 0x02))},
		{"varint over 64 bits", seal(append(header(1, 12, 8192), bytes.Repeat([]byte{0xff}, 10)...))},
		{"unterminated varint", seal(append(header(1, 12, 8192), 0x82))},
	} {
		expectCorrupt(tc.name, tc.data)
	}

	// The sealed helpers themselves must produce acceptable input.
	for _, data := range [][]byte{body(1, 12, 8192, 2), body(1, 12, 8192, 0, 2), body(1, 9, MaxRegions*512, MaxRegions)} {
		if _, _, _, _, err := parse(data); err != nil {
			t.Fatalf("control input rejected: %v", err)
		}
	}
}

func TestUnmarshalBinary(t *testing.T) {
	src := goldenBitmap(t)
	data, err := src.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	b := mustNew(t, src.Size(), src.RegionSize())
	b.Set(5*4096, 100*4096)
	if err := b.UnmarshalBinary(data); err != nil {
		t.Fatal(err)
	}
	if !b.Equal(src) || b.Count() != src.Count() {
		t.Fatalf("UnmarshalBinary gave %v", dirtyRegions(b))
	}

	for _, o := range []*Bitmap{mustNew(t, src.Size()+1, src.RegionSize()), mustNew(t, src.Size(), 2*src.RegionSize())} {
		o.Set(0, 1)
		if err := o.UnmarshalBinary(data); !errors.Is(err, ErrMismatch) {
			t.Fatalf("UnmarshalBinary into other geometry: %v, want ErrMismatch", err)
		}
		if o.Count() != 1 || !o.Test(0, 1) {
			t.Fatal("failed UnmarshalBinary changed the bitmap")
		}
	}
	bad := bytes.Clone(data)
	bad[len(bad)-5] ^= 1
	if err := b.UnmarshalBinary(bad); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("UnmarshalBinary of corrupt data: %v, want ErrCorrupt", err)
	}
	if !b.Equal(src) {
		t.Fatal("failed UnmarshalBinary changed the bitmap")
	}
}
