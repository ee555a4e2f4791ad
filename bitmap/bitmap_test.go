package bitmap

import (
	"errors"
	"math"
	"math/bits"
	"slices"
	"strings"
	"testing"
)

func mustNew(t testing.TB, size, regionSize int64) *Bitmap {
	t.Helper()
	b, err := New(size, regionSize)
	if err != nil {
		t.Fatalf("New(%d, %d): %v", size, regionSize, err)
	}
	return b
}

// dirtyRegions lists the dirty region indices straight from the words, so
// it does not depend on the scanning code under test.
func dirtyRegions(b *Bitmap) []int64 {
	var out []int64
	for w, v := range b.Words() {
		for ; v != 0; v &= v - 1 {
			out = append(out, int64(w)*64+int64(bits.TrailingZeros64(v)))
		}
	}
	return out
}

func popcount(words []uint64) int64 {
	n := 0
	for _, w := range words {
		n += bits.OnesCount64(w)
	}
	return int64(n)
}

func span(lo, hi int64) []int64 { // regions lo..hi inclusive
	var out []int64
	for r := lo; r <= hi; r++ {
		out = append(out, r)
	}
	return out
}

func cat(parts ...[]int64) []int64 { return slices.Concat(parts...) }

// checkInvariants verifies what must hold whenever no update is in flight.
func checkInvariants(t *testing.T, b *Bitmap) {
	t.Helper()
	w := b.Words()
	if got := popcount(w); got != b.Count() {
		t.Fatalf("Count() = %d, popcount of words = %d", b.Count(), got)
	}
	if len(w) > 0 && w[len(w)-1]&^b.tailMask() != 0 {
		t.Fatalf("bits set past region %d: %#x", b.regions, w[len(w)-1])
	}
}

type rangeOp struct {
	off, length int64
}

func TestNewValidation(t *testing.T) {
	for _, tc := range []struct {
		size, regionSize int64
		errWord          string // word the error must name; empty for success
	}{
		{1, 512, ""},
		{10000, 4096, ""},
		{math.MaxInt64, MaxRegionSize, ""},
		{1 << 40, DefaultRegionSize, ""},
		{0, 4096, "size"},
		{-1, 4096, "size"},
		{math.MinInt64, 4096, "size"},
		{4096, 0, "regionSize"},
		{4096, -4096, "regionSize"},
		{4096, 256, "regionSize"},
		{4096, 511, "regionSize"},
		{4096, 513, "regionSize"},
		{4096, 3000, "regionSize"},
		{4096, MaxRegionSize * 2, "regionSize"},
		{math.MaxInt64, 512, "size"},
		{MaxRegions*512 + 1, 512, "size"},
	} {
		if tc.size == math.MaxInt64 && tc.errWord == "" {
			// 2^33 regions would allocate 1 GiB; only the validation is
			// exercised here.
			if _, _, err := geometry(tc.size, tc.regionSize); err != nil {
				t.Errorf("geometry(%d, %d): %v", tc.size, tc.regionSize, err)
			}
			continue
		}
		b, err := New(tc.size, tc.regionSize)
		if tc.errWord == "" {
			if err != nil {
				t.Errorf("New(%d, %d): %v", tc.size, tc.regionSize, err)
				continue
			}
			wantRegions := (tc.size + tc.regionSize - 1) / tc.regionSize
			if b.Size() != tc.size || b.RegionSize() != tc.regionSize || b.Regions() != wantRegions || b.Count() != 0 {
				t.Errorf("New(%d, %d) = size %d region %d regions %d count %d", tc.size, tc.regionSize,
					b.Size(), b.RegionSize(), b.Regions(), b.Count())
			}
			continue
		}
		if err == nil {
			t.Errorf("New(%d, %d) succeeded, want error naming %s", tc.size, tc.regionSize, tc.errWord)
			continue
		}
		if !strings.Contains(err.Error(), tc.errWord+" ") || !strings.HasPrefix(err.Error(), "bitmap: ") {
			t.Errorf("New(%d, %d) error %q does not name %s", tc.size, tc.regionSize, err, tc.errWord)
		}
	}
}

// Geometry used by most table tests: three regions, the last one short
// (0-4095, 4096-8191, 8192-9999).
const (
	shortSize = 10000
	shortRS   = 4096
)

func TestSet(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
		rs   int64
		ops  []rangeOp
		want []int64
	}{
		{"first byte", shortSize, shortRS, []rangeOp{{0, 1}}, []int64{0}},
		{"last byte of region 0", shortSize, shortRS, []rangeOp{{4095, 1}}, []int64{0}},
		{"straddle 0/1", shortSize, shortRS, []rangeOp{{4095, 2}}, []int64{0, 1}},
		{"exact region 1", shortSize, shortRS, []rangeOp{{4096, 4096}}, []int64{1}},
		{"region 1 plus one byte", shortSize, shortRS, []rangeOp{{4096, 4097}}, []int64{1, 2}},
		{"last byte of volume", shortSize, shortRS, []rangeOp{{9999, 1}}, []int64{2}},
		{"short region past end", shortSize, shortRS, []rangeOp{{9000, 1 << 40}}, []int64{2}},
		{"at end", shortSize, shortRS, []rangeOp{{shortSize, 5}}, nil},
		{"past end", shortSize, shortRS, []rangeOp{{1 << 50, 5}}, nil},
		{"zero length", shortSize, shortRS, []rangeOp{{100, 0}}, nil},
		{"negative length", shortSize, shortRS, []rangeOp{{100, -1}}, nil},
		{"min length", shortSize, shortRS, []rangeOp{{100, math.MinInt64}}, nil},
		{"negative offset reaching 0", shortSize, shortRS, []rangeOp{{-5, 6}}, []int64{0}},
		{"negative offset ending at 0", shortSize, shortRS, []rangeOp{{-5, 5}}, nil},
		{"min offset max length", shortSize, shortRS, []rangeOp{{math.MinInt64, math.MaxInt64}}, nil},
		{"max offset max length", shortSize, shortRS, []rangeOp{{math.MaxInt64, math.MaxInt64}}, nil},
		{"whole volume", shortSize, shortRS, []rangeOp{{0, shortSize}}, []int64{0, 1, 2}},
		{"huge range", shortSize, shortRS, []rangeOp{{-100, math.MaxInt64}}, []int64{0, 1, 2}},
		{"from 0 max length", shortSize, shortRS, []rangeOp{{0, math.MaxInt64}}, []int64{0, 1, 2}},
		{"idempotent", shortSize, shortRS, []rangeOp{{0, 1}, {1, 1}, {0, 4096}}, []int64{0}},
		{"region 63", 200 * 512, 512, []rangeOp{{63 * 512, 512}}, []int64{63}},
		{"region 64", 200 * 512, 512, []rangeOp{{64 * 512, 512}}, []int64{64}},
		{"regions 63-64", 200 * 512, 512, []rangeOp{{63*512 + 511, 2}}, []int64{63, 64}},
		{"regions 62-65", 200 * 512, 512, []rangeOp{{62 * 512, 4 * 512}}, span(62, 65)},
		{"regions 0-128", 200 * 512, 512, []rangeOp{{0, 128*512 + 1}}, span(0, 128)},
		{"regions 1-191", 200 * 512, 512, []rangeOp{{600, 191*512 - 600}}, span(1, 190)},
		{"whole 64-region volume", 64 * 512, 512, []rangeOp{{0, 1 << 40}}, span(0, 63)},
		{"whole 65-region volume", 64*512 + 1, 512, []rangeOp{{0, 1 << 40}}, span(0, 64)},
		{"last of 65 regions", 64*512 + 1, 512, []rangeOp{{64 * 512, 1}}, []int64{64}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			for _, op := range tc.ops {
				b.Set(op.off, op.length)
			}
			if got := dirtyRegions(b); !slices.Equal(got, tc.want) {
				t.Fatalf("dirty = %v, want %v", got, tc.want)
			}
			checkInvariants(t, b)
		})
	}
}

func TestClear(t *testing.T) {
	const wsize = 200 * 512 // 200 regions of 512: words 0..3, the last partial
	for _, tc := range []struct {
		name    string
		size    int64
		rs      int64
		op      rangeOp
		cleared []int64 // starting from fully dirty
	}{
		{"exact region 0", shortSize, shortRS, rangeOp{0, 4096}, []int64{0}},
		{"region 0 minus a byte", shortSize, shortRS, rangeOp{0, 4095}, nil},
		{"region 0 from byte 1", shortSize, shortRS, rangeOp{1, 4095}, nil},
		{"unaligned over two regions", shortSize, shortRS, rangeOp{1, 8191}, []int64{1}},
		{"straddle covering neither", shortSize, shortRS, rangeOp{2048, 4096}, nil},
		{"short last region exactly", shortSize, shortRS, rangeOp{8192, 1808}, []int64{2}},
		{"short last region minus a byte", shortSize, shortRS, rangeOp{8192, 1807}, nil},
		{"short last region, range past end", shortSize, shortRS, rangeOp{8192, 1 << 40}, []int64{2}},
		{"short last region, max length", shortSize, shortRS, rangeOp{8192, math.MaxInt64}, []int64{2}},
		{"unaligned start to end", shortSize, shortRS, rangeOp{4097, 1 << 40}, []int64{2}},
		{"partial last region only", shortSize, shortRS, rangeOp{8193, 1 << 40}, nil},
		{"negative offset", shortSize, shortRS, rangeOp{-10, 4106}, []int64{0}},
		{"negative offset short", shortSize, shortRS, rangeOp{-10, 4105}, nil},
		{"whole volume", shortSize, shortRS, rangeOp{0, shortSize}, []int64{0, 1, 2}},
		{"huge range", shortSize, shortRS, rangeOp{math.MinInt64 / 2, math.MaxInt64}, []int64{0, 1, 2}},
		{"zero length", shortSize, shortRS, rangeOp{0, 0}, nil},
		{"negative length", shortSize, shortRS, rangeOp{0, -4096}, nil},
		{"at end", shortSize, shortRS, rangeOp{shortSize, 4096}, nil},
		{"max offset", shortSize, shortRS, rangeOp{math.MaxInt64, math.MaxInt64}, nil},
		{"regions 63-64", wsize, 512, rangeOp{63 * 512, 2 * 512}, []int64{63, 64}},
		{"region 64 from unaligned", wsize, 512, rangeOp{63*512 + 1, 2 * 512}, []int64{64}},
		{"regions 1-190 unaligned", wsize, 512, rangeOp{1, 191*512 - 1}, span(1, 190)},
		{"aligned full words", wsize, 512, rangeOp{64 * 512, 128 * 512}, span(64, 191)},
		{"whole 65-region volume", 64*512 + 1, 512, rangeOp{0, 64*512 + 1}, span(0, 64)},
		{"short 65th region", 64*512 + 1, 512, rangeOp{64 * 512, 1}, []int64{64}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			b.SetAll()
			b.Clear(tc.op.off, tc.op.length)
			var want []int64
			for r := range b.Regions() {
				if !slices.Contains(tc.cleared, r) {
					want = append(want, r)
				}
			}
			if got := dirtyRegions(b); !slices.Equal(got, want) {
				t.Fatalf("dirty = %v, want %v", got, want)
			}
			checkInvariants(t, b)
		})
	}
}

func TestClearRegions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		size    int64
		rs      int64
		op      rangeOp
		cleared []int64
	}{
		{"one byte", shortSize, shortRS, rangeOp{1, 1}, []int64{0}},
		{"straddle", shortSize, shortRS, rangeOp{4095, 2}, []int64{0, 1}},
		{"last byte", shortSize, shortRS, rangeOp{9999, 100}, []int64{2}},
		{"zero length", shortSize, shortRS, rangeOp{4096, 0}, nil},
		{"at end", shortSize, shortRS, rangeOp{shortSize, 1}, nil},
		{"negative offset", shortSize, shortRS, rangeOp{-1, 2}, []int64{0}},
		{"whole volume", shortSize, shortRS, rangeOp{0, math.MaxInt64}, []int64{0, 1, 2}},
		{"regions 63-65", 200 * 512, 512, rangeOp{63*512 + 511, 514}, span(63, 65)},
		{"regions 0-127", 200 * 512, 512, rangeOp{0, 128 * 512}, span(0, 127)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			b.SetAll()
			b.ClearRegions(tc.op.off, tc.op.length)
			var want []int64
			for r := range b.Regions() {
				if !slices.Contains(tc.cleared, r) {
					want = append(want, r)
				}
			}
			if got := dirtyRegions(b); !slices.Equal(got, want) {
				t.Fatalf("dirty = %v, want %v", got, want)
			}
			checkInvariants(t, b)
		})
	}
}

func TestTest(t *testing.T) {
	b := mustNew(t, 200*512, 512)
	b.Set(64*512, 1)      // region 64
	b.Set(199*512+100, 1) // last region
	for _, tc := range []struct {
		op   rangeOp
		want bool
	}{
		{rangeOp{0, 64 * 512}, false},
		{rangeOp{0, 64*512 + 1}, true},
		{rangeOp{64*512 + 511, 1}, true},
		{rangeOp{63 * 512, 512}, false},
		{rangeOp{65 * 512, 512}, false},
		{rangeOp{65 * 512, 134 * 512}, false},
		{rangeOp{65 * 512, 134*512 + 1}, true},
		{rangeOp{199 * 512, 1}, true},
		{rangeOp{-100, 101}, false},
		{rangeOp{-100, math.MaxInt64}, true},
		{rangeOp{64 * 512, 0}, false},
		{rangeOp{64 * 512, -1}, false},
		{rangeOp{200 * 512, 1}, false},
		{rangeOp{math.MaxInt64, math.MaxInt64}, false},
	} {
		if got := b.Test(tc.op.off, tc.op.length); got != tc.want {
			t.Errorf("Test(%d, %d) = %v, want %v", tc.op.off, tc.op.length, got, tc.want)
		}
	}
}

func TestCountDirtyBytes(t *testing.T) {
	b := mustNew(t, shortSize, shortRS)
	check := func(count, bytes int64) {
		t.Helper()
		if b.Count() != count || b.DirtyBytes() != bytes {
			t.Fatalf("Count, DirtyBytes = %d, %d; want %d, %d", b.Count(), b.DirtyBytes(), count, bytes)
		}
	}
	check(0, 0)
	b.Set(9999, 1)
	check(1, 1808)
	b.Set(0, 1)
	check(2, 4096+1808)
	b.SetAll()
	check(3, shortSize)
	b.ClearRegions(9999, 1)
	check(2, 8192)
	b.SetAll()
	b.ClearAll()
	check(0, 0)

	// An exact multiple of the region size has no short region.
	b = mustNew(t, 8192, 4096)
	b.SetAll()
	if b.Count() != 2 || b.DirtyBytes() != 8192 {
		t.Fatalf("Count, DirtyBytes = %d, %d; want 2, 8192", b.Count(), b.DirtyBytes())
	}
}

func TestSetAllClearAllTail(t *testing.T) {
	for _, regions := range []int64{1, 63, 64, 65, 127, 128, 129} {
		b := mustNew(t, regions*512, 512)
		b.SetAll()
		checkInvariants(t, b)
		if b.Count() != regions || b.DirtyBytes() != regions*512 {
			t.Fatalf("%d regions: Count %d, DirtyBytes %d", regions, b.Count(), b.DirtyBytes())
		}
		b.SetAll()
		if b.Count() != regions {
			t.Fatalf("%d regions: second SetAll changed Count to %d", regions, b.Count())
		}
		b.ClearAll()
		checkInvariants(t, b)
		if b.Count() != 0 {
			t.Fatalf("%d regions: Count %d after ClearAll", regions, b.Count())
		}
	}
}

func TestNextDirty(t *testing.T) {
	type result struct {
		off, length int64
		ok          bool
	}
	for _, tc := range []struct {
		name      string
		size, rs  int64
		dirty     []int64
		from, max int64
		want      result
	}{
		{"empty", shortSize, shortRS, nil, 0, 0, result{}},
		{"run to short end", shortSize, shortRS, []int64{1, 2}, 0, 0, result{4096, 5904, true}},
		{"capped to a region", shortSize, shortRS, []int64{1, 2}, 0, 4096, result{4096, 4096, true}},
		{"cap below a region", shortSize, shortRS, []int64{1, 2}, 0, 100, result{4096, 4096, true}},
		{"cap rounds down", shortSize, shortRS, []int64{0, 1, 2}, 0, 8191, result{0, 4096, true}},
		{"cap at end", shortSize, shortRS, []int64{0, 1, 2}, 0, 3 * 4096, result{0, shortSize, true}},
		{"unaligned from in dirty region", shortSize, shortRS, []int64{1, 2}, 5000, 0, result{4096, 5904, true}},
		{"from in short region", shortSize, shortRS, []int64{1, 2}, 9999, 0, result{8192, 1808, true}},
		{"from at end", shortSize, shortRS, []int64{1, 2}, shortSize, 0, result{}},
		{"from past end", shortSize, shortRS, []int64{1, 2}, math.MaxInt64, 0, result{}},
		{"negative from", shortSize, shortRS, []int64{0}, -5, 0, result{0, 4096, true}},
		{"min from", shortSize, shortRS, []int64{2}, math.MinInt64, math.MaxInt64, result{8192, 1808, true}},
		{"nothing after", shortSize, shortRS, []int64{0}, 4096, 0, result{}},
		{"negative max is unlimited", shortSize, shortRS, []int64{0, 1}, 0, -1, result{0, 8192, true}},
		{"across words", 200 * 512, 512, span(60, 70), 0, 0, result{60 * 512, 11 * 512, true}},
		{"across words capped", 200 * 512, 512, span(60, 70), 0, 4*512 + 100, result{60 * 512, 4 * 512, true}},
		{"mid run", 200 * 512, 512, span(60, 70), 65 * 512, 0, result{65 * 512, 6 * 512, true}},
		{"run ends at word end", 200 * 512, 512, span(60, 63), 0, 0, result{60 * 512, 4 * 512, true}},
		{"run starts at word", 200 * 512, 512, span(64, 64), 1, 0, result{64 * 512, 512, true}},
		{"skips to later word", 200 * 512, 512, cat([]int64{1}, span(130, 199)), 2 * 512, 0, result{130 * 512, 70 * 512, true}},
		{"whole volume", 200 * 512, 512, span(0, 199), 0, 0, result{0, 200 * 512, true}},
		{"whole volume capped", 200 * 512, 512, span(0, 199), 0, 128 * 512, result{0, 128 * 512, true}},
		{"second run", 200 * 512, 512, cat(span(0, 3), span(10, 11)), 4 * 512, 0, result{10 * 512, 2 * 512, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			for _, r := range tc.dirty {
				b.Set(r*tc.rs, 1)
			}
			var got result
			got.off, got.length, got.ok = b.NextDirty(tc.from, tc.max)
			if got != tc.want {
				t.Fatalf("NextDirty(%d, %d) = %+v, want %+v", tc.from, tc.max, got, tc.want)
			}
		})
	}
}

func TestRuns(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size, rs int64
		dirty    []int64
		want     []rangeOp
	}{
		{"empty", shortSize, shortRS, nil, nil},
		{"full short", shortSize, shortRS, []int64{0, 1, 2}, []rangeOp{{0, shortSize}}},
		{"only short tail", shortSize, shortRS, []int64{2}, []rangeOp{{8192, 1808}}},
		{"two runs", shortSize, shortRS, []int64{0, 2}, []rangeOp{{0, 4096}, {8192, 1808}}},
		{"word boundary", 200 * 512, 512, span(63, 64), []rangeOp{{63 * 512, 2 * 512}}},
		{"split at word", 200 * 512, 512, []int64{63, 65}, []rangeOp{{63 * 512, 512}, {65 * 512, 512}}},
		{"full words", 256 * 512, 512, span(64, 191), []rangeOp{{64 * 512, 128 * 512}}},
		{"full volume 128", 128 * 512, 512, span(0, 127), []rangeOp{{0, 128 * 512}}},
		{"alternating", 130 * 512, 512, []int64{0, 2, 64, 66, 129},
			[]rangeOp{{0, 512}, {1024, 512}, {64 * 512, 512}, {66 * 512, 512}, {129 * 512, 512}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mustNew(t, tc.size, tc.rs)
			for _, r := range tc.dirty {
				b.Set(r*tc.rs, 1)
			}
			var got []rangeOp
			b.Runs(func(off, length int64) bool {
				got = append(got, rangeOp{off, length})
				return true
			})
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Runs = %v, want %v", got, tc.want)
			}
			// Stopping after the first run must report exactly one.
			n := 0
			b.Runs(func(off, length int64) bool { n++; return false })
			if want := min(1, len(tc.want)); n != want {
				t.Fatalf("Runs after stop reported %d runs, want %d", n, want)
			}
		})
	}
}

func TestMergeCloneEqual(t *testing.T) {
	a := mustNew(t, 200*512, 512)
	b := mustNew(t, 200*512, 512)
	a.Set(0, 10*512)
	b.Set(5*512, 100*512)
	c := a.Clone()
	if !c.Equal(a) || c.Count() != a.Count() {
		t.Fatal("clone differs from original")
	}
	if err := c.Merge(b); err != nil {
		t.Fatal(err)
	}
	if want := span(0, 104); !slices.Equal(dirtyRegions(c), want) || c.Count() != 105 {
		t.Fatalf("merged = %v (count %d)", dirtyRegions(c), c.Count())
	}
	if c.Equal(a) || a.Count() != 10 {
		t.Fatal("merge into clone changed the original")
	}
	if err := c.Merge(c); err != nil || c.Count() != 105 {
		t.Fatalf("self merge: %v, count %d", err, c.Count())
	}
	checkInvariants(t, c)

	for _, o := range []*Bitmap{nil, mustNew(t, 200*512+1, 512), mustNew(t, 200*512, 1024)} {
		err := a.Merge(o)
		if !errors.Is(err, ErrMismatch) {
			t.Errorf("Merge(%v) error = %v, want ErrMismatch", o, err)
		}
		if a.Equal(o) {
			t.Errorf("Equal(%v) = true for a different geometry", o)
		}
	}
	if !a.Equal(a) {
		t.Error("a bitmap is not equal to itself")
	}
}

func TestWordsLoadWords(t *testing.T) {
	b := mustNew(t, 130*512, 512) // 3 words, 2 bits used in the last
	b.Set(0, 1)
	b.Set(129*512, 1)
	w := b.Words()
	if want := []uint64{1, 0, 2}; !slices.Equal(w, want) {
		t.Fatalf("Words = %#x, want %#x", w, want)
	}
	w[0] = 0 // a copy: must not affect b
	if !b.Test(0, 1) {
		t.Fatal("Words returned an alias")
	}

	c := mustNew(t, 130*512, 512)
	c.Set(64*512, 64*512)
	if err := c.LoadWords(b.Words()); err != nil {
		t.Fatal(err)
	}
	if !c.Equal(b) || c.Count() != 2 {
		t.Fatalf("after LoadWords: %v count %d", dirtyRegions(c), c.Count())
	}

	before := c.Words()
	if err := c.LoadWords([]uint64{1, 2}); !errors.Is(err, ErrMismatch) {
		t.Fatalf("short LoadWords error = %v, want ErrMismatch", err)
	}
	if err := c.LoadWords([]uint64{1, 2, 4}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("LoadWords with a bit past the end error = %v, want ErrCorrupt", err)
	}
	if !slices.Equal(c.Words(), before) || c.Count() != 2 {
		t.Fatal("failed LoadWords changed the bitmap")
	}
	if err := c.LoadWords([]uint64{allOnes, allOnes, 3}); err != nil || c.Count() != 130 {
		t.Fatalf("full LoadWords: %v, count %d", err, c.Count())
	}
}

// The zero value must not panic, whatever is called on it.
func TestZeroValue(t *testing.T) {
	var b Bitmap
	b.Set(0, 100)
	b.Clear(0, 100)
	b.ClearRegions(0, 100)
	b.SetAll()
	b.ClearAll()
	if b.Test(0, 100) || b.Count() != 0 || b.DirtyBytes() != 0 {
		t.Fatal("zero Bitmap reports dirty data")
	}
	if _, _, ok := b.NextDirty(0, 0); ok {
		t.Fatal("zero Bitmap has a dirty run")
	}
	b.Runs(func(off, length int64) bool { t.Fatal("zero Bitmap has a run"); return false })
	if _, err := b.MarshalBinary(); err == nil {
		t.Fatal("MarshalBinary of the zero Bitmap succeeded")
	}
	if !b.Clone().Equal(&b) || len(b.Words()) != 0 || b.LoadWords(nil) != nil {
		t.Fatal("zero Bitmap clone, words or load failed")
	}
}
