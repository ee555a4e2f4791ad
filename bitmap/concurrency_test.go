package bitmap

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// Many writers setting disjoint and overlapping ranges, some sharing words,
// must leave exactly the union dirty and the counter exact.
func TestConcurrentSet(t *testing.T) {
	const (
		rs      = 512
		regions = 64*64 + 17
		writers = 16
	)
	b := mustNew(t, regions*rs-100, rs)
	want := make([]bool, regions)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			local := make([]bool, regions)
			for i := range 2000 {
				var first, n int64
				switch i % 3 {
				case 0: // disjoint: region r belongs to writer r%writers
					first, n = int64(rng.IntN(regions/writers))*writers+int64(g), 1
				case 1: // overlapping, many in the same few words
					first, n = int64(rng.IntN(256)), int64(1+rng.IntN(8))
				default: // overlapping, spanning words
					first, n = int64(rng.IntN(regions)), int64(1+rng.IntN(200))
				}
				n = min(n, regions-first)
				b.Set(first*rs+int64(rng.IntN(rs)), (n-1)*rs+1)
				for r := first; r < first+n; r++ {
					local[r] = true
				}
			}
			mu.Lock()
			for r, d := range local {
				want[r] = want[r] || d
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	var n int64
	for r, d := range want {
		if d {
			n++
		}
		if b.Test(int64(r)*rs, 1) != d {
			t.Fatalf("region %d dirty = %v, want %v", r, !d, d)
		}
	}
	if b.Count() != n {
		t.Fatalf("Count() = %d, want %d", b.Count(), n)
	}
	checkInvariants(t, b)
}

// Writers, clearers and every reader racing: the race detector must stay
// quiet, every encoding taken mid-flight must decode, and once quiet the
// counter must agree with the bits.
func TestConcurrentMixed(t *testing.T) {
	const rs = 512
	size := int64(50*64*rs + 300)
	b := mustNew(t, size, rs)
	var stop atomic.Bool
	var writers, readers sync.WaitGroup
	for g := range 6 {
		writers.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 99))
			for range 50000 {
				off, length := rng.Int64N(size), 1+rng.Int64N(40*rs)
				switch rng.IntN(6) {
				case 0, 1, 2:
					b.Set(off, length)
				case 3:
					b.Clear(off, length)
				case 4:
					b.ClearRegions(off, length)
				default:
					b.Set(off, 1)
				}
			}
		})
	}
	var encoded atomic.Int64
	readers.Go(func() {
		for !stop.Load() {
			encoded.Add(1)
			data, err := b.MarshalBinary()
			if err != nil {
				t.Error(err)
				return
			}
			d, err := Decode(data)
			if err != nil {
				t.Errorf("mid-flight encoding does not decode: %v", err)
				return
			}
			if d.Count() != popcount(d.Words()) {
				t.Error("decoded count disagrees with its words")
			}
		}
	})
	readers.Go(func() {
		for !stop.Load() {
			pos := int64(0)
			for {
				off, length, ok := b.NextDirty(pos, 64*rs)
				if !ok {
					break
				}
				// pos is always region aligned here, so the run may not
				// start before it.
				if length <= 0 || off < pos || off+length > size {
					t.Errorf("NextDirty(%d) = %d, %d", pos, off, length)
					return
				}
				pos = off + length
			}
			prev := int64(-1)
			b.Runs(func(off, length int64) bool {
				if length <= 0 || off <= prev {
					t.Errorf("run %d, %d after %d", off, length, prev)
				}
				prev = off + length
				return true
			})
		}
	})
	readers.Go(func() {
		for !stop.Load() {
			c := b.Clone()
			if c.Count() != popcount(c.Words()) {
				t.Error("clone count disagrees with its words")
			}
			if n := b.Count(); n < 0 || n > b.Regions() {
				t.Errorf("Count() = %d out of range", n)
			}
			if n := b.DirtyBytes(); n < 0 || n > size {
				t.Errorf("DirtyBytes() = %d out of range", n)
			}
			_ = b.Test(0, size)
			_ = b.Equal(c)
			_ = b.Merge(mustNew(t, size, rs))
		}
	})
	writers.Wait()
	stop.Store(true)
	readers.Wait()
	checkInvariants(t, b)
	t.Logf("%d encodings taken while writers ran", encoded.Load())

	// Whole-bitmap operations racing with each other keep the count exact.
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				switch (g + i) % 4 {
				case 0:
					b.SetAll()
				case 1:
					b.ClearAll()
				case 2:
					o := mustNew(t, size, rs)
					o.Set(int64(i)*rs, 100*rs)
					_ = b.Merge(o)
				default:
					_ = b.LoadWords(b.Clone().Words())
				}
			}
		})
	}
	wg.Wait()
	checkInvariants(t, b)
}
