package bitmap

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"
)

const benchTiB = int64(1) << 40

// BenchmarkSet4KClean marks a fresh region on every call, the first write
// after a sync: the atomic OR and the counter update.
func BenchmarkSet4KClean(b *testing.B) {
	bm := mustNew(b, benchTiB, DefaultRegionSize)
	regions := bm.Regions()
	r := int64(0)
	for b.Loop() {
		if r == regions {
			b.StopTimer()
			bm.ClearAll()
			r = 0
			b.StartTimer()
		}
		bm.Set(r<<12, 4096)
		r++
	}
}

// BenchmarkSet4KDirty rewrites regions already dirty, the common case for a
// hot working set while the peer is away: a single atomic load.
func BenchmarkSet4KDirty(b *testing.B) {
	bm := mustNew(b, benchTiB, DefaultRegionSize)
	bm.Set(0, 1<<20)
	r := int64(0)
	for b.Loop() {
		bm.Set(r<<12, 4096)
		r = (r + 1) & 255
	}
}

// BenchmarkSetParallel is every CPU writing 4 KiB blocks at random into a
// 64 GiB volume that quickly becomes mostly dirty, so words are shared
// between writers.
func BenchmarkSetParallel(b *testing.B) {
	const size = 64 << 30
	bm := mustNew(b, size, DefaultRegionSize)
	var seed atomic.Uint64
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 1))
		for pb.Next() {
			bm.Set(rng.Int64N(size/4096)<<12, 4096)
		}
	})
}

// BenchmarkSet1M marks 256 fresh regions (four words) per call.
func BenchmarkSet1M(b *testing.B) {
	bm := mustNew(b, benchTiB, DefaultRegionSize)
	off := int64(0)
	for b.Loop() {
		if off == benchTiB {
			b.StopTimer()
			bm.ClearAll()
			off = 0
			b.StartTimer()
		}
		bm.Set(off, 1<<20)
		off += 1 << 20
	}
}

// BenchmarkNextDirty walks a 1 TiB bitmap with a 1 MiB dirty extent every
// 64 MiB, in resync-sized steps, as the resync loop does.
func BenchmarkNextDirty(b *testing.B) {
	bm := mustNew(b, benchTiB, DefaultRegionSize)
	for off := int64(0); off < benchTiB; off += 64 << 20 {
		bm.Set(off+12345, 1<<20)
	}
	pos := int64(0)
	for b.Loop() {
		off, length, ok := bm.NextDirty(pos, 256<<10)
		if !ok {
			pos = 0
			continue
		}
		pos = off + length
	}
}

// BenchmarkMarshal1TiBSparse encodes a 1 TiB bitmap with 1000 scattered
// dirty extents: the cost is dominated by scanning 32 MiB of clean words.
func BenchmarkMarshal1TiBSparse(b *testing.B) {
	bm := mustNew(b, benchTiB, DefaultRegionSize)
	rng := rand.New(rand.NewPCG(5, 6))
	for range 1000 {
		bm.Set(rng.Int64N(benchTiB), rng.Int64N(4<<20))
	}
	b.SetBytes(int64(len(bm.words)) * 8)
	b.ReportAllocs()
	var n int
	for b.Loop() {
		data, err := bm.MarshalBinary()
		if err != nil {
			b.Fatal(err)
		}
		n = len(data)
	}
	b.ReportMetric(float64(n), "encoded-bytes")
}
