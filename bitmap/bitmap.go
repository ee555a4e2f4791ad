// Package bitmap owns mirrord's dirty-region bitmap: one bit per fixed-size
// region of the mirrored volume, set on every application write, cleared once
// the peer is known to hold the region, and persisted and exchanged between
// peers in a run-length encoded form (see MarshalBinary).
//
// Set sits on the application write path, the hottest path in the product, so
// the bitmap is a flat slice of atomically updated words rather than anything
// guarded by a lock: an already-dirty region costs one atomic load, a clean one
// a single atomic OR plus a counter update. Every method is safe for
// concurrent use. Methods that read many words (Runs, NextDirty, Clone, Equal,
// MarshalBinary, Words) see each word at some instant during the call, not the
// whole bitmap at one instant, which is the most a lock-free writer allows and
// is all resync and persistence need: a write racing with them is recorded in
// the bitmap either way and is picked up by the next pass.
package bitmap

import (
	"errors"
	"fmt"
	"math/bits"
	"sync/atomic"
)

// DefaultRegionSize is the region size used unless configured otherwise. As
// in DRBD it costs 32 MiB of bitmap per TiB of volume while keeping a resync
// after a short outage proportional to what was actually written.
const DefaultRegionSize = 4096

const (
	// MinRegionSize is the sector size: nothing finer can be written.
	MinRegionSize = 512
	// MaxRegionSize keeps a single dirty bit from forcing an absurd resync.
	MaxRegionSize = 1 << 30
	// MaxRegions bounds the memory one Bitmap may take (4 GiB of words), which
	// also bounds what Decode can be made to allocate by a hostile encoding.
	// At DefaultRegionSize it covers 128 TiB; larger volumes need larger
	// regions.
	MaxRegions = 1 << 35
)

var (
	// ErrCorrupt is wrapped by every error that reports a malformed encoding
	// or malformed persisted words.
	ErrCorrupt = errors.New("bitmap: corrupt encoding")
	// ErrMismatch is wrapped when two bitmaps, or a bitmap and data meant for
	// it, disagree on volume size or region size.
	ErrMismatch = errors.New("bitmap: geometry mismatch")
)

const allOnes = ^uint64(0)

// Bitmap is a dirty-region bitmap. Create it with New; the zero value is an
// empty bitmap of a zero-sized volume that ignores every update.
type Bitmap struct {
	size       int64 // volume size in bytes
	regionSize int64
	regions    int64
	shift      uint // log2(regionSize)
	words      []atomic.Uint64

	// The counter is written on every clean-to-dirty transition, from every
	// writer; the padding keeps it off the cache line holding the read-only
	// fields above, which every Set reads.
	_     [64]byte
	count atomic.Int64
	_     [56]byte
}

// New returns a clean bitmap for a volume of size bytes with regions of
// regionSize bytes. The last region is short when size is not a multiple of
// regionSize.
func New(size, regionSize int64) (*Bitmap, error) {
	shift, regions, err := geometry(size, regionSize)
	if err != nil {
		return nil, fmt.Errorf("bitmap: %v", err)
	}
	return newBitmap(size, shift, regions), nil
}

// geometry validates size and regionSize and derives the rest of the layout.
// Decode relies on it to reject exactly what New rejects; its errors carry
// no prefix because each caller adds its own.
func geometry(size, regionSize int64) (shift uint, regions int64, err error) {
	if regionSize < MinRegionSize || regionSize > MaxRegionSize || regionSize&(regionSize-1) != 0 {
		return 0, 0, fmt.Errorf("regionSize %d is not a power of two in [%d, %d]",
			regionSize, MinRegionSize, MaxRegionSize)
	}
	if size <= 0 {
		return 0, 0, fmt.Errorf("size %d is not positive", size)
	}
	shift = uint(bits.TrailingZeros64(uint64(regionSize)))
	// Written without size+regionSize-1, which overflows near MaxInt64.
	regions = size >> shift
	if size&(regionSize-1) != 0 {
		regions++
	}
	if regions > MaxRegions {
		return 0, 0, fmt.Errorf("size %d needs %d regions of %d bytes, more than %d",
			size, regions, regionSize, int64(MaxRegions))
	}
	return shift, regions, nil
}

func newBitmap(size int64, shift uint, regions int64) *Bitmap {
	return &Bitmap{
		size:       size,
		regionSize: 1 << shift,
		regions:    regions,
		shift:      shift,
		words:      make([]atomic.Uint64, (regions+63)>>6),
	}
}

// Size returns the volume size in bytes.
func (b *Bitmap) Size() int64 { return b.size }

// RegionSize returns the number of bytes covered by one bit.
func (b *Bitmap) RegionSize() int64 { return b.regionSize }

// Regions returns the number of regions, counting a short last region.
func (b *Bitmap) Regions() int64 { return b.regions }

// sameGeometry reports whether o describes the same volume layout as b.
func (b *Bitmap) sameGeometry(o *Bitmap) bool {
	return o != nil && b.size == o.size && b.shift == o.shift
}

// rangeMask returns the bits lo..hi (inclusive, 0 <= lo <= hi <= 63).
func rangeMask(lo, hi int64) uint64 {
	return (allOnes << uint(lo)) & (allOnes >> uint(63-hi))
}

// wordMask is the part of word w that regions first..last cover.
func wordMask(w, first, last int64) uint64 {
	lo, hi := int64(0), int64(63)
	if w == first>>6 {
		lo = first & 63
	}
	if w == last>>6 {
		hi = last & 63
	}
	return rangeMask(lo, hi)
}

// tailMask is the mask of bits in the last word that stand for real regions;
// the bits above it are kept zero so that whole-word popcounts and scans need
// no special case.
func (b *Bitmap) tailMask() uint64 {
	if n := b.regions & 63; n != 0 {
		return allOnes >> uint(64-n)
	}
	return allOnes
}

// overlapping converts a byte range into the inclusive range of regions it
// touches, after clipping to [0, Size).
func (b *Bitmap) overlapping(off, length int64) (first, last int64, ok bool) {
	// length is checked before it is adjusted so that a hugely negative length
	// cannot wrap around into a positive one.
	if length <= 0 || off >= b.size {
		return 0, 0, false
	}
	if off < 0 {
		length += off
		off = 0
		if length <= 0 {
			return 0, 0, false
		}
	}
	if length > b.size-off {
		length = b.size - off
	}
	return off >> b.shift, (off + length - 1) >> b.shift, true
}

// Set marks every region overlapping [off, off+length). The range is clipped
// to the volume; a non-positive length is a no-op.
func (b *Bitmap) Set(off, length int64) {
	first, last, ok := b.overlapping(off, length)
	if !ok {
		return
	}
	if w := first >> 6; w == last>>6 {
		// Fast path: the range lies in one word, which for 4 KiB regions is
		// any write up to 256 KiB, well aligned. Rewrites of already dirty
		// regions are the common case, and loading first keeps them from
		// taking the cache line exclusive and bouncing it between writers.
		mask := rangeMask(first&63, last&63)
		p := &b.words[w]
		if p.Load()&mask == mask {
			return
		}
		if n := bits.OnesCount64(mask &^ p.Or(mask)); n != 0 {
			b.count.Add(int64(n))
		}
		return
	}
	b.setRegions(first, last)
}

// setRegions sets regions first..last inclusive.
func (b *Bitmap) setRegions(first, last int64) {
	added := 0
	fw, lw := first>>6, last>>6
	for w := fw; w <= lw; w++ {
		mask := wordMask(w, first, last)
		p := &b.words[w]
		if p.Load()&mask == mask {
			continue
		}
		added += bits.OnesCount64(mask &^ p.Or(mask))
	}
	if added != 0 {
		b.count.Add(int64(added))
	}
}

// clearRegions clears regions first..last inclusive.
func (b *Bitmap) clearRegions(first, last int64) {
	removed := 0
	fw, lw := first>>6, last>>6
	for w := fw; w <= lw; w++ {
		mask := wordMask(w, first, last)
		p := &b.words[w]
		// Acks mostly land on regions already clean or are replays; a load
		// first spares the cache line as on the Set path.
		if p.Load()&mask == 0 {
			continue
		}
		removed += bits.OnesCount64(mask & p.And(^mask))
	}
	if removed != 0 {
		b.count.Add(-int64(removed))
	}
}

// Clear clears the regions fully contained in [off, off+length): an ack for
// part of a region says nothing about the rest of it, which may still hold
// bytes the peer has not seen. The last region, which may be short, counts
// as fully contained when the range reaches Size. The range is clipped to
// the volume; a non-positive length is a no-op.
//
// The bitmap cannot tell which write an ack is for: if a later write to the
// same region is still in flight, the caller must not clear the region, or
// that write is forgotten.
func (b *Bitmap) Clear(off, length int64) {
	if length <= 0 || off >= b.size {
		return
	}
	if off < 0 {
		length += off
		off = 0
		if length <= 0 {
			return
		}
	}
	end := b.size
	if length < b.size-off {
		end = off + length
	}
	// First region starting at or after off, computed without off+rs-1,
	// which could overflow.
	first := off >> b.shift
	if off&(b.regionSize-1) != 0 {
		first++
	}
	// Exclusive end: the region containing end is only partly covered,
	// unless end is the end of the volume.
	stop := end >> b.shift
	if end == b.size {
		stop = b.regions
	}
	if first >= stop {
		return
	}
	b.clearRegions(first, stop-1)
}

// ClearRegions clears every region overlapping [off, off+length). Resync
// uses it because it copies whole regions, so it knows the peer has all of
// each one. The range is clipped to the volume; a non-positive length is a
// no-op.
func (b *Bitmap) ClearRegions(off, length int64) {
	first, last, ok := b.overlapping(off, length)
	if !ok {
		return
	}
	b.clearRegions(first, last)
}

// Test reports whether any region overlapping [off, off+length) is dirty.
func (b *Bitmap) Test(off, length int64) bool {
	first, last, ok := b.overlapping(off, length)
	if !ok {
		return false
	}
	fw, lw := first>>6, last>>6
	for w := fw; w <= lw; w++ {
		mask := wordMask(w, first, last)
		if b.words[w].Load()&mask != 0 {
			return true
		}
	}
	return false
}

// Count returns the number of dirty regions in O(1). It is exact whenever no
// update is in flight; while one is, it may lag that update.
func (b *Bitmap) Count() int64 {
	// Each update changes a word and then the counter, so a reader can see a
	// clear's decrement before the racing set's increment; clamp the
	// transient.
	c := b.count.Load()
	if c < 0 {
		return 0
	}
	if c > b.regions {
		return b.regions
	}
	return c
}

// DirtyBytes returns the number of bytes in dirty regions: Count regions,
// except that a dirty short last region counts only its real length.
func (b *Bitmap) DirtyBytes() int64 {
	c := b.Count()
	if c == 0 {
		return 0
	}
	lastStart := (b.regions - 1) << b.shift
	if b.words[len(b.words)-1].Load()&(1<<uint((b.regions-1)&63)) != 0 {
		return (c-1)<<b.shift + (b.size - lastStart)
	}
	// The last region is clean, so at most regions-1 are dirty; clamping
	// keeps a racing update from overflowing the shift.
	if c > b.regions-1 {
		c = b.regions - 1
	}
	return c << b.shift
}

// SetAll marks the whole volume dirty, e.g. when a peer's state is unknown
// and a full resync is required.
func (b *Bitmap) SetAll() {
	if b.regions > 0 {
		b.setRegions(0, b.regions-1)
	}
}

// ClearAll marks the whole volume clean.
func (b *Bitmap) ClearAll() {
	if b.regions > 0 {
		b.clearRegions(0, b.regions-1)
	}
}

// NextDirty returns the first dirty run containing a byte at or after from.
// off is region aligned, so it is below from when from is unaligned and its
// region is dirty. length covers a maximal run of consecutive dirty regions,
// clipped to Size, but if maxLen > 0 at most maxLen bytes rounded down to
// whole regions, and never less than one region. ok is false when there is
// no dirty region at or after from.
func (b *Bitmap) NextDirty(from, maxLen int64) (off, length int64, ok bool) {
	if from < 0 {
		from = 0
	}
	if from >= b.size {
		return 0, 0, false
	}
	r := from >> b.shift
	w := r >> 6
	v := b.words[w].Load() & (allOnes << uint(r&63))
	for v == 0 {
		w++
		if w >= int64(len(b.words)) {
			return 0, 0, false
		}
		v = b.words[w].Load()
	}
	start := w<<6 + int64(bits.TrailingZeros64(v))

	limit := b.regions
	if maxLen > 0 {
		n := maxLen >> b.shift
		if n < 1 {
			n = 1
		}
		if n < limit-start {
			limit = start + n
		}
	}
	// Keep using the value the start was found in: reloading the word could
	// see start cleared and yield an empty run. Bits above Regions are zero,
	// so the inverted word always ends the run by the end of the volume.
	stop := limit
	for x := ^v & (allOnes << uint(start&63)); ; {
		if x != 0 {
			if e := w<<6 + int64(bits.TrailingZeros64(x)); e < stop {
				stop = e
			}
			break
		}
		w++
		if w<<6 >= limit {
			break
		}
		x = ^b.words[w].Load()
	}
	return start << b.shift, b.regionEnd(stop) - start<<b.shift, true
}

// regionEnd returns the byte offset where region r starts, or Size for the
// end of the volume; it never overflows even when Size is near MaxInt64.
func (b *Bitmap) regionEnd(r int64) int64 {
	if r >= b.regions {
		return b.size
	}
	return r << b.shift
}

// Runs calls fn for each maximal dirty run in order, as byte offset and
// length clipped to Size, until fn returns false.
func (b *Bitmap) Runs(fn func(off, length int64) bool) {
	b.walk(func(dirty bool, start, n int64) bool {
		if !dirty {
			return true
		}
		off := start << b.shift
		return fn(off, b.regionEnd(start+n)-off)
	})
}

// walk calls fn with the maximal runs of equal state, in regions, covering
// the whole bitmap; the first run is clean and may be empty, every other run
// is non-empty. Each word is loaded exactly once, so a concurrent writer can
// change which runs are reported but never make them overlap, leave gaps or
// come out empty, which the encoding relies on.
func (b *Bitmap) walk(fn func(dirty bool, start, n int64) bool) {
	dirty := false
	runStart := int64(0)
	for w := range b.words {
		v := b.words[w].Load()
		if (!dirty && v == 0) || (dirty && v == allOnes) {
			continue
		}
		base := int64(w) << 6
		nbits := b.regions - base
		if nbits > 64 {
			nbits = 64
		}
		for pos := int64(0); pos < nbits; {
			x := v
			if dirty {
				x = ^v
			}
			x >>= uint(pos)
			if x == 0 {
				break
			}
			pos += int64(bits.TrailingZeros64(x))
			if pos >= nbits {
				break
			}
			if !fn(dirty, runStart, base+pos-runStart) {
				return
			}
			dirty = !dirty
			runStart = base + pos
		}
	}
	if b.regions > runStart {
		fn(dirty, runStart, b.regions-runStart)
	}
}

// Merge ORs o into b, e.g. to combine the bitmap a peer sends after a split
// brain with the local one. It returns an error wrapping ErrMismatch if the
// geometries differ.
func (b *Bitmap) Merge(o *Bitmap) error {
	if !b.sameGeometry(o) {
		return b.mismatch(o)
	}
	added := 0
	for w := range b.words {
		m := o.words[w].Load()
		if m == 0 {
			continue
		}
		p := &b.words[w]
		if p.Load()&m == m {
			continue
		}
		added += bits.OnesCount64(m &^ p.Or(m))
	}
	if added != 0 {
		b.count.Add(int64(added))
	}
	return nil
}

func (b *Bitmap) mismatch(o *Bitmap) error {
	if o == nil {
		return fmt.Errorf("%w: nil bitmap", ErrMismatch)
	}
	return fmt.Errorf("%w: size %d, region size %d vs size %d, region size %d",
		ErrMismatch, b.size, b.regionSize, o.size, o.regionSize)
}

// Clone returns a copy of b. Sets racing with the clone may or may not be
// included.
func (b *Bitmap) Clone() *Bitmap {
	c := newBitmap(b.size, b.shift, b.regions)
	c.regionSize = b.regionSize // differs from 1<<shift only for the zero value
	n := 0
	for w := range b.words {
		v := b.words[w].Load()
		c.words[w].Store(v)
		n += bits.OnesCount64(v)
	}
	// Counted from the copied words rather than taken from b's counter,
	// which may disagree with them while updates are in flight.
	c.count.Store(int64(n))
	return c
}

// Equal reports whether o has the same geometry and the same dirty regions.
func (b *Bitmap) Equal(o *Bitmap) bool {
	if b == o {
		return true
	}
	if !b.sameGeometry(o) {
		return false
	}
	for w := range b.words {
		if b.words[w].Load() != o.words[w].Load() {
			return false
		}
	}
	return true
}

// Words returns a copy of the raw words for persistence: bit i of word w
// stands for region w*64+i, and bits past Regions are zero.
func (b *Bitmap) Words() []uint64 {
	out := make([]uint64, len(b.words))
	for w := range b.words {
		out[w] = b.words[w].Load()
	}
	return out
}

// LoadWords replaces the contents of b with words in the layout Words
// returns. It returns an error wrapping ErrMismatch if the length does not
// match the geometry and one wrapping ErrCorrupt if bits past Regions are
// set; b is unchanged on error. Sets racing with LoadWords may be lost, so it
// belongs in startup and recovery, not alongside live writes.
func (b *Bitmap) LoadWords(words []uint64) error {
	if len(words) != len(b.words) {
		return fmt.Errorf("%w: %d words for %d regions, want %d",
			ErrMismatch, len(words), b.regions, len(b.words))
	}
	if len(words) > 0 {
		if extra := words[len(words)-1] &^ b.tailMask(); extra != 0 {
			return fmt.Errorf("%w: bits set past region %d", ErrCorrupt, b.regions)
		}
	}
	delta := 0
	for w, v := range words {
		// Swap returns what was really replaced, which keeps the counter
		// exact even against racing writers.
		if old := b.words[w].Swap(v); old != v {
			delta += bits.OnesCount64(v) - bits.OnesCount64(old)
		}
	}
	if delta != 0 {
		b.count.Add(int64(delta))
	}
	return nil
}
