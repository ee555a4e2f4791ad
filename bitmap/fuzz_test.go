package bitmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// FuzzDecode checks that Decode never panics, that it reports every
// rejection as ErrCorrupt, and that whatever it accepts re-encodes to the
// identical bytes (the encoding is canonical).
//
// A mutated input almost never carries a matching CRC, which would keep the
// fuzzer stuck at the checksum; so each input is also tried with its last
// four bytes replaced by the correct CRC, which lets it explore the header
// and run parsing behind the checksum.
func FuzzDecode(f *testing.F) {
	seed := func(size, rs int64, fill func(*Bitmap)) {
		b, err := New(size, rs)
		if err != nil {
			f.Fatal(err)
		}
		fill(b)
		data, err := b.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	seed(1, 512, func(*Bitmap) {})
	seed(1, 512, (*Bitmap).SetAll)
	seed(10000, 4096, func(b *Bitmap) { b.Set(9999, 1) })
	seed(200*512, 512, func(b *Bitmap) { b.Set(0, 1); b.Set(63*512, 3*512); b.Set(199*512, 1) })
	seed(1<<30+1, 1<<20, func(b *Bitmap) { b.Set(5<<20, 300<<20) })
	seed(1<<40, DefaultRegionSize, func(*Bitmap) {})
	seed(1<<40, 1<<30, (*Bitmap).SetAll)
	seed(1000*512, 512, func(b *Bitmap) {
		for r := int64(0); r < 1000; r += 7 {
			b.Set(r*512, 512*(r%5))
		}
	})
	f.Add([]byte{})
	f.Add([]byte("MRDB"))

	f.Fuzz(func(t *testing.T, data []byte) {
		// Longer inputs only go round the run loop more often, and Go's
		// minimizer spends tens of seconds on each long interesting input,
		// during which fuzzing stalls.
		if len(data) > maxFuzzLen {
			return
		}
		checkDecode(t, data)
		if len(data) < headerLen+crcLen || !smallGeometry(data) {
			return
		}
		resealed := seal(bytes.Clone(data[:len(data)-crcLen]))
		checkDecode(t, resealed)
	})
}

const maxFuzzLen = 1 << 10

// smallGeometry keeps resealed inputs from declaring bitmaps so large that
// allocating them would slow the fuzzer to a crawl; Decode's handling of
// large geometry is covered by the unit tests.
func smallGeometry(data []byte) bool {
	if data[5] > 30 {
		return true // rejected before any allocation
	}
	size := binary.LittleEndian.Uint64(data[6:])
	return size>>data[5] < 1<<18
}

func checkDecode(t *testing.T, data []byte) {
	b, err := Decode(data)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Decode error %v does not wrap ErrCorrupt", err)
		}
		if b != nil {
			t.Fatal("Decode returned a bitmap with an error")
		}
		return
	}
	out, err := b.MarshalBinary()
	if err != nil {
		t.Fatalf("re-encoding an accepted input: %v", err)
	}
	if !bytes.Equal(out, data) {
		t.Fatalf("accepted input re-encodes differently:\n  in %x\n out %x", data, out)
	}
	if b.Count() != popcount(b.Words()) {
		t.Fatalf("Count() = %d, words hold %d", b.Count(), popcount(b.Words()))
	}
	// Decoding into a live bitmap must agree with decoding afresh.
	o := newBitmap(b.size, b.shift, b.regions)
	o.Set(0, b.size/2)
	if err := o.UnmarshalBinary(data); err != nil || !o.Equal(b) || o.Count() != b.Count() {
		t.Fatalf("UnmarshalBinary disagrees with Decode: %v", err)
	}
}
