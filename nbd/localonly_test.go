package nbd

import (
	"bytes"
	"sync"
	"testing"
)

// localDevice declares LocalOnly, so lone requests are served on the
// connection's reader.
type localDevice struct{ *memDevice }

func (localDevice) LocalOnly() bool { return true }

func TestLocalOnlyDeviceServedInline(t *testing.T) {
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Name: "d", Device: localDevice{d}})
	c := ts.dialGo(t, "")
	for i, tc := range []struct{ off, n int }{{0, 4096}, {4095, 2}, {10000, 131072}, {txSize - 1, 1}} {
		p := pattern(byte(i+1), tc.n)
		c.writeAt(uint64(tc.off), p)
		if got := c.readAt(uint64(tc.off), uint32(tc.n)); !bytes.Equal(got, p) {
			t.Fatalf("off %d len %d: read back differs", tc.off, tc.n)
		}
		if got := d.contents(int64(tc.off), int64(tc.n)); !bytes.Equal(got, p) {
			t.Fatalf("off %d len %d: device differs", tc.off, tc.n)
		}
	}
	c.disconnect()

	// Many clients at once still mix inline and dispatched requests
	// correctly.
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := ts.dialGo(t, "")
			defer c.disconnect()
			for i := range 50 {
				off := uint64(g*64<<10 + i%16*4096)
				p := pattern(byte(g*50+i), 4096)
				c.writeAt(off, p)
				if got := c.readAt(off, 4096); !bytes.Equal(got, p) {
					t.Errorf("client %d: read back differs at %d", g, off)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// cachedDevice serves even offsets "from cache" and says odd pages would
// block, so both read paths run.
type cachedDevice struct {
	*memDevice
	cachedHits, misses atomicCounter
}

type atomicCounter struct {
	mu sync.Mutex
	n  int
}

func (a *atomicCounter) add()     { a.mu.Lock(); a.n++; a.mu.Unlock() }
func (a *atomicCounter) get() int { a.mu.Lock(); defer a.mu.Unlock(); return a.n }

func (d *cachedDevice) ReadCached(p []byte, off int64) (bool, error) {
	if (off/4096)%2 == 1 {
		d.misses.add()
		return false, nil
	}
	d.cachedHits.add()
	return true, d.ReadAt(p, off)
}

func TestCachedReadsInlineAndFallback(t *testing.T) {
	d := newMemDevice(t, txSize)
	cd := &cachedDevice{memDevice: d}
	ts := startServer(t, nil, Export{Name: "d", Device: cd})
	c := ts.dialGo(t, "")
	for i := range 16 {
		p := pattern(byte(i+1), 4096)
		c.writeAt(uint64(i)*4096, p)
		if got := c.readAt(uint64(i)*4096, 4096); !bytes.Equal(got, p) {
			t.Fatalf("page %d: read back differs", i)
		}
	}
	c.disconnect()
	if cd.cachedHits.get() != 8 || cd.misses.get() != 8 {
		t.Fatalf("cached hits %d, misses %d; want 8 and 8", cd.cachedHits.get(), cd.misses.get())
	}
}
