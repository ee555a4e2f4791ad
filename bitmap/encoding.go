package bitmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Encoding, version 1. Multi-byte integers are little-endian.
//
//	offset   size  field
//	0        4     magic "MRDB"
//	4        1     version, 1
//	5        1     log2(region size), 9..30
//	6        8     volume size in bytes, u64, 1..MaxInt64
//	14       n     runs
//	14+n     4     CRC-32C (Castagnoli) of bytes [0, 14+n), u32
//
// The runs are lengths in regions, each an unsigned varint as written by
// binary.PutUvarint, alternately clean and dirty and starting with a clean
// run. Only that first clean run may be zero (when region 0 is dirty); the
// runs sum to exactly the number of regions. Every bitmap therefore has
// exactly one encoding: Decode rejects empty runs, over-long varints and
// trailing bytes, so a decoded bitmap re-encodes byte for byte. A clean
// bitmap is one run and a fully dirty one two, so either encodes in about
// two dozen bytes whatever the volume size.
const (
	magic     = "MRDB"
	version   = 1
	headerLen = 14
	crcLen    = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// MarshalBinary returns the encoding described above. Sets racing with it
// may or may not be included, but the output is always a valid encoding.
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	if b.regions == 0 {
		return nil, errors.New("bitmap: cannot encode a bitmap without geometry; use New")
	}
	out := make([]byte, headerLen, 64)
	copy(out, magic)
	out[4] = version
	out[5] = byte(b.shift)
	binary.LittleEndian.PutUint64(out[6:], uint64(b.size))
	b.walk(func(_ bool, _, n int64) bool {
		out = binary.AppendUvarint(out, uint64(n))
		return true
	})
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli)), nil
}

// Decode parses the output of MarshalBinary into a new Bitmap. Every
// malformed input yields an error wrapping ErrCorrupt, and nothing is
// allocated until the whole input has been validated, and then only what its
// declared geometry implies, at most MaxRegions/8 bytes. A receiver that
// knows the geometry to expect should prefer UnmarshalBinary, which rejects
// a foreign geometry before allocating anything.
func Decode(data []byte) (*Bitmap, error) {
	size, shift, regions, runs, err := parse(data)
	if err != nil {
		return nil, err
	}
	b := newBitmap(size, shift, regions)
	b.apply(runs, false)
	return b, nil
}

// UnmarshalBinary replaces the contents of b, which must have been created
// by New, with the decoded data. Malformed data yields an error wrapping
// ErrCorrupt, a valid encoding of another geometry one wrapping ErrMismatch;
// b is unchanged on error. Like LoadWords it can lose racing Sets.
func (b *Bitmap) UnmarshalBinary(data []byte) error {
	size, shift, _, runs, err := parse(data)
	if err != nil {
		return err
	}
	if size != b.size || shift != b.shift {
		return fmt.Errorf("%w: encoding has size %d, region size %d; bitmap has size %d, region size %d",
			ErrMismatch, size, int64(1)<<shift, b.size, b.regionSize)
	}
	b.apply(runs, true)
	return nil
}

// parse validates data completely and returns the geometry and the run
// bytes, which apply can then consume without further checks.
func parse(data []byte) (size int64, shift uint, regions int64, runs []byte, err error) {
	if len(data) < headerLen+1+crcLen {
		return 0, 0, 0, nil, fmt.Errorf("%w: %d bytes is shorter than any encoding", ErrCorrupt, len(data))
	}
	if !bytes.Equal(data[:4], []byte(magic)) {
		return 0, 0, 0, nil, fmt.Errorf("%w: bad magic %q", ErrCorrupt, data[:4])
	}
	// The version is checked before the checksum so that input from a newer
	// peer is reported as such rather than as damage.
	if data[4] != version {
		return 0, 0, 0, nil, fmt.Errorf("%w: unsupported version %d", ErrCorrupt, data[4])
	}
	body := data[:len(data)-crcLen]
	want := binary.LittleEndian.Uint32(data[len(data)-crcLen:])
	if got := crc32.Checksum(body, castagnoli); got != want {
		return 0, 0, 0, nil, fmt.Errorf("%w: checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	// The checksum only proves the bytes arrived as sent; the sender may
	// still be buggy or hostile, so everything below is validated as well.
	if data[5] > 62 {
		// Would not even fit an int64; geometry rejects the rest.
		return 0, 0, 0, nil, fmt.Errorf("%w: region size 2^%d", ErrCorrupt, data[5])
	}
	u := binary.LittleEndian.Uint64(data[6:])
	if u > 1<<63-1 {
		return 0, 0, 0, nil, fmt.Errorf("%w: size %d overflows int64", ErrCorrupt, u)
	}
	size = int64(u)
	shift, regions, err = geometry(size, int64(1)<<data[5])
	if err != nil {
		return 0, 0, 0, nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	runs = body[headerLen:]
	sum := int64(0)
	for i, p := 0, runs; len(p) > 0; i++ {
		if sum == regions {
			return 0, 0, 0, nil, fmt.Errorf("%w: %d trailing bytes after the runs", ErrCorrupt, len(p))
		}
		v, n := binary.Uvarint(p)
		if n <= 0 {
			return 0, 0, 0, nil, fmt.Errorf("%w: bad varint for run %d", ErrCorrupt, i)
		}
		if n > 1 && p[n-1] == 0 {
			return 0, 0, 0, nil, fmt.Errorf("%w: over-long varint for run %d", ErrCorrupt, i)
		}
		if v == 0 && i > 0 {
			return 0, 0, 0, nil, fmt.Errorf("%w: empty run %d", ErrCorrupt, i)
		}
		if v > uint64(regions-sum) {
			return 0, 0, 0, nil, fmt.Errorf("%w: run %d of %d regions overruns the %d regions left",
				ErrCorrupt, i, v, regions-sum)
		}
		sum += int64(v)
		p = p[n:]
	}
	if sum != regions {
		return 0, 0, 0, nil, fmt.Errorf("%w: runs cover %d of %d regions", ErrCorrupt, sum, regions)
	}
	return size, shift, regions, runs, nil
}

// apply writes validated runs into b. replace means b is live: its clean
// runs must be cleared too, and every update has to be an atomic
// read-modify-write. Otherwise b is freshly allocated and not yet shared, so
// each word can simply be stored, which makes decoding a mostly dirty
// bitmap several times faster.
func (b *Bitmap) apply(runs []byte, replace bool) {
	r := int64(0)
	total := int64(0)
	for dirty := false; len(runs) > 0; dirty = !dirty {
		v, n := binary.Uvarint(runs)
		runs = runs[n:]
		if v == 0 {
			continue
		}
		first, last := r, r+int64(v)-1
		r += int64(v)
		switch {
		case dirty && replace:
			b.setRegions(first, last)
		case replace:
			b.clearRegions(first, last)
		case dirty:
			fw, lw := first>>6, last>>6
			for w := fw; w <= lw; w++ {
				b.words[w].Store(b.words[w].Load() | wordMask(w, first, last))
			}
			total += int64(v)
		}
	}
	if total != 0 {
		b.count.Store(total)
	}
}
