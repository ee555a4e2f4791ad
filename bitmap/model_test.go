package bitmap

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// model is the obviously correct reference: one bool per region, every
// operation a loop over regions and their byte extents.
type model struct {
	size, rs int64
	dirty    []bool
}

func newModel(size, rs int64) *model {
	return &model{size: size, rs: rs, dirty: make([]bool, (size+rs-1)/rs)}
}

// extent returns region r's bytes, the last one cut short at size.
func (m *model) extent(r int64) (lo, hi int64) {
	return r * m.rs, min((r+1)*m.rs, m.size)
}

// clip intersects [off, off+length) with the volume, saturating instead of
// overflowing for the extreme ranges the tests generate.
func (m *model) clip(off, length int64) (lo, hi int64, ok bool) {
	if length <= 0 {
		return 0, 0, false
	}
	lo = max(off, 0)
	end := off + length
	if off > 0 && end < off { // overflow: the range runs past everything
		end = math.MaxInt64
	}
	hi = min(end, m.size)
	return lo, hi, lo < hi
}

func (m *model) set(off, length int64, v bool) {
	lo, hi, ok := m.clip(off, length)
	if !ok {
		return
	}
	for r := range m.dirty {
		a, b := m.extent(int64(r))
		if a < hi && b > lo {
			m.dirty[r] = v
		}
	}
}

func (m *model) clear(off, length int64) {
	lo, hi, ok := m.clip(off, length)
	if !ok {
		return
	}
	for r := range m.dirty {
		a, b := m.extent(int64(r))
		if a >= lo && b <= hi {
			m.dirty[r] = false
		}
	}
}

func (m *model) test(off, length int64) bool {
	lo, hi, ok := m.clip(off, length)
	if !ok {
		return false
	}
	for r := range m.dirty {
		a, b := m.extent(int64(r))
		if a < hi && b > lo && m.dirty[r] {
			return true
		}
	}
	return false
}

func (m *model) count() (n, bytes int64) {
	for r, d := range m.dirty {
		if d {
			a, b := m.extent(int64(r))
			n++
			bytes += b - a
		}
	}
	return n, bytes
}

func (m *model) runs() []rangeOp {
	var out []rangeOp
	for r := 0; r < len(m.dirty); {
		if !m.dirty[r] {
			r++
			continue
		}
		e := r
		for e < len(m.dirty) && m.dirty[e] {
			e++
		}
		lo, _ := m.extent(int64(r))
		_, hi := m.extent(int64(e - 1))
		out = append(out, rangeOp{lo, hi - lo})
		r = e
	}
	return out
}

func (m *model) nextDirty(from, maxLen int64) (off, length int64, ok bool) {
	if from >= m.size {
		return 0, 0, false
	}
	for r := max(from, 0) / m.rs; r < int64(len(m.dirty)); r++ {
		if !m.dirty[r] {
			continue
		}
		limit := int64(len(m.dirty))
		if maxLen > 0 {
			limit = min(limit, r+max(maxLen/m.rs, 1))
		}
		e := r
		for e < limit && m.dirty[e] {
			e++
		}
		lo, _ := m.extent(r)
		_, hi := m.extent(e - 1)
		return lo, hi - lo, true
	}
	return 0, 0, false
}

// randRange favours the interesting cases: region and word boundaries, the
// ends of the volume, empty and negative ranges, and extreme values.
func randRange(rng *rand.Rand, size, rs int64) (off, length int64) {
	switch rng.IntN(10) {
	case 0:
		return rng.Int64N(size+2*rs) - rs, rng.Int64N(size+2*rs) - rs // anything, incl. negative
	case 1:
		return rng.Int64N(size/rs+2) * rs, rng.Int64N(4) * rs // aligned
	case 2:
		r := rng.Int64N(size/rs + 1)
		return r*rs + rng.Int64N(3) - 1, rs + rng.Int64N(3) - 1 // just around boundaries
	case 3:
		return rng.Int64N(size), math.MaxInt64 - rng.Int64N(2) // to the end and far beyond
	case 4:
		return []int64{math.MinInt64, -1, 0, size - 1, size, math.MaxInt64}[rng.IntN(6)],
			[]int64{math.MinInt64, -1, 0, 1, size, math.MaxInt64}[rng.IntN(6)]
	case 5:
		return rng.Int64N(size), rng.Int64N(size - rng.Int64N(size) + 1) // up to the end exactly
	default:
		return rng.Int64N(size), rng.Int64N(5 * rs)
	}
}

func TestModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	geometries := []struct{ size, rs int64 }{
		{10000, 4096},
		{64 * 512, 512},
		{65*512 - 1, 512},
		{129*512 + 7, 512},
		{300 * 1024, 1024},
		{1, 512},
		{511, 512},
		{513, 512},
	}
	for _, g := range geometries {
		for range 3 {
			size := g.size
			if rng.IntN(2) == 0 {
				size = 1 + rng.Int64N(400*g.rs)
			}
			runModel(t, rng, size, g.rs, 3000)
		}
	}
}

func runModel(t *testing.T, rng *rand.Rand, size, rs int64, steps int) {
	t.Helper()
	b := mustNew(t, size, rs)
	m := newModel(size, rs)
	for step := range steps {
		off, length := randRange(rng, size, rs)
		op := rng.IntN(100)
		switch {
		case op < 40:
			b.Set(off, length)
			m.set(off, length, true)
		case op < 65:
			b.Clear(off, length)
			m.clear(off, length)
		case op < 85:
			b.ClearRegions(off, length)
			m.set(off, length, false)
		case op < 87:
			b.SetAll()
			m.set(0, size, true)
		case op < 89:
			b.ClearAll()
			m.set(0, size, false)
		case op < 92:
			// Merge with a random other bitmap, built through the model.
			o := mustNew(t, size, rs)
			for range rng.IntN(5) {
				off, length := randRange(rng, size, rs)
				o.Set(off, length)
				m.set(off, length, true)
			}
			if err := b.Merge(o); err != nil {
				t.Fatal(err)
			}
		case op < 94:
			// Round trip through every external form.
			data, err := b.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			d, err := Decode(data)
			if err != nil {
				t.Fatalf("step %d: decoding own encoding: %v", step, err)
			}
			if !d.Equal(b) || d.Count() != b.Count() {
				t.Fatalf("step %d: decoded bitmap differs", step)
			}
			o := mustNew(t, size, rs)
			o.SetAll()
			if err := o.UnmarshalBinary(data); err != nil || !o.Equal(b) || o.Count() != b.Count() {
				t.Fatalf("step %d: UnmarshalBinary: %v", step, err)
			}
			c := b.Clone()
			if !c.Equal(b) || c.Count() != b.Count() {
				t.Fatalf("step %d: clone differs", step)
			}
			o.ClearAll()
			if err := o.LoadWords(b.Words()); err != nil || !o.Equal(b) || o.Count() != b.Count() {
				t.Fatalf("step %d: LoadWords: %v", step, err)
			}
		default:
			// Reads only; checked below like after every step.
		}
		checkModel(t, rng, step, b, m)
	}
}

func checkModel(t *testing.T, rng *rand.Rand, step int, b *Bitmap, m *model) {
	t.Helper()
	n, bytes := m.count()
	if b.Count() != n || b.DirtyBytes() != bytes {
		t.Fatalf("step %d: Count, DirtyBytes = %d, %d; model %d, %d", step, b.Count(), b.DirtyBytes(), n, bytes)
	}
	checkInvariants(t, b)
	var runs []rangeOp
	b.Runs(func(off, length int64) bool {
		runs = append(runs, rangeOp{off, length})
		return true
	})
	if want := m.runs(); !slices.Equal(runs, want) {
		t.Fatalf("step %d: Runs = %v, model %v", step, runs, want)
	}
	for range 4 {
		off, length := randRange(rng, m.size, m.rs)
		if got, want := b.Test(off, length), m.test(off, length); got != want {
			t.Fatalf("step %d: Test(%d, %d) = %v, model %v", step, off, length, got, want)
		}
		maxLen := []int64{0, -1, 1, m.rs, m.rs + 1, 3 * m.rs, 100 * m.rs, math.MaxInt64}[rng.IntN(8)]
		o1, l1, ok1 := b.NextDirty(off, maxLen)
		o2, l2, ok2 := m.nextDirty(off, maxLen)
		if o1 != o2 || l1 != l2 || ok1 != ok2 {
			t.Fatalf("step %d: NextDirty(%d, %d) = %d, %d, %v; model %d, %d, %v",
				step, off, maxLen, o1, l1, ok1, o2, l2, ok2)
		}
	}
	// Walking the volume with NextDirty must visit exactly the runs.
	var walked []rangeOp
	for pos := int64(0); ; {
		off, length, ok := b.NextDirty(pos, 0)
		if !ok {
			break
		}
		walked = append(walked, rangeOp{off, length})
		pos = off + length
	}
	if !slices.Equal(walked, runs) {
		t.Fatalf("step %d: NextDirty walk = %v, Runs %v", step, walked, runs)
	}
}
