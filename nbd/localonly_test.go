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

// A burst of large writes sent in one piece lies whole in the reader's
// buffer: inline writes are served from it without a copy (peekPayload).
// Mixed with a FUA write (copied and dispatched), a refused write (its
// payload drained) and small writes, every reply comes back and the device
// holds every payload.
func TestLocalOnlyBurstOfLargeWrites(t *testing.T) {
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Name: "d", Device: localDevice{d}})
	c := ts.dialGo(t, "")
	type w struct {
		off   uint64
		n     int
		flags uint16
		errno uint32
	}
	ws := []w{
		{0, directPayload, 0, 0},
		{64 << 10, 64 << 10, 0, 0},
		{160 << 10, 100_000, 0, 0},
		{300 << 10, 4096, 0, 0},
		{320 << 10, 128 << 10, wireFlagFUA, 0},
		{txSize - 1000, 64 << 10, 0, wireENOSPC}, // past the end: refused
		{512 << 10, 128 << 10, 0, 0},
		{700 << 10, directPayload - 1, 0, 0},
	}
	var burst [][]byte
	cookies := map[uint64]w{}
	for i, x := range ws {
		ck := c.nextCookie()
		cookies[ck] = x
		burst = append(burst, encRequest(x.flags, wireCmdWrite, ck, x.off, uint32(x.n)), pattern(byte(i+1), x.n))
	}
	c.write(burst...)
	for range ws {
		errno, ck := c.simpleReply()
		x, ok := cookies[ck]
		if !ok {
			t.Fatalf("reply for unknown cookie %#x", ck)
		}
		delete(cookies, ck)
		if errno != x.errno {
			t.Fatalf("write at %d: errno %d, want %d", x.off, errno, x.errno)
		}
	}
	for i, x := range ws {
		if x.errno != 0 {
			continue
		}
		if got := d.contents(int64(x.off), int64(x.n)); !bytes.Equal(got, pattern(byte(i+1), x.n)) {
			t.Fatalf("write %d (%d bytes at %d): device differs", i, x.n, x.off)
		}
	}
	// The stream is still in step.
	p := pattern(0x77, 4096)
	c.writeAt(900<<10, p)
	if got := c.readAt(900<<10, 4096); !bytes.Equal(got, p) {
		t.Fatal("read after the burst differs")
	}
	c.disconnect()
}

// splitDevice records the ranges WriteAt is called with.
type splitDevice struct {
	localDevice
	mu    sync.Mutex
	calls [][2]int64 // off, len
}

func (d *splitDevice) SplitWrites() bool { return true }

func (d *splitDevice) WriteAt(p []byte, off int64, fua bool) error {
	d.mu.Lock()
	d.calls = append(d.calls, [2]int64{off, int64(len(p))})
	d.mu.Unlock()
	return d.localDevice.WriteAt(p, off, fua)
}

// A large write whose payload is only partly in the read buffer is served
// in two parts, the head straight from the buffer: the device gets every
// byte right, each part boundary falls on a 4 KiB boundary of the volume
// (whatever the request's own alignment), and the stream stays in step.
func TestLocalOnlyLargeWriteHeadFromBuffer(t *testing.T) {
	d := &splitDevice{localDevice: localDevice{newMemDevice(t, txSize)}}
	ts := startServer(t, nil, Export{Name: "d", Device: d})
	c := ts.dialGo(t, "")
	type w struct {
		off uint64
		n   int
	}
	ws := []w{{100, 1000}, {5000, 300 << 10}, {320 << 10, 250 << 10}, {600 << 10, 270 << 10}, {900 << 10, 40 << 10}, {980 << 10, 30 << 10}}
	var burst [][]byte
	for i, x := range ws {
		burst = append(burst, encRequest(0, wireCmdWrite, c.nextCookie(), x.off, uint32(x.n)), pattern(byte(i+1), x.n))
	}
	c.write(burst...)
	for range ws {
		if errno, _ := c.simpleReply(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	// The writes do not overlap, so each call belongs to one of them.
	want := make([]byte, txSize)
	for i, x := range ws {
		copy(want[x.off:], pattern(byte(i+1), x.n))
	}
	if got := d.contents(0, txSize); !bytes.Equal(got, want) {
		t.Fatal("device differs from the writes")
	}
	d.mu.Lock()
	calls := append([][2]int64(nil), d.calls...)
	d.mu.Unlock()
	split := 0
	for _, x := range ws {
		var parts [][2]int64
		for _, cl := range calls {
			if cl[0] >= int64(x.off) && cl[0]+cl[1] <= int64(x.off)+int64(x.n) {
				parts = append(parts, cl)
			}
		}
		if len(parts) > 1 {
			split++
			for _, p := range parts[:len(parts)-1] {
				if (p[0]+p[1])%4096 != 0 {
					t.Fatalf("write of %d at %d split at %d, not on a 4 KiB boundary", x.n, x.off, p[0]+p[1])
				}
			}
		}
	}
	t.Logf("%d of %d writes served in two parts", split, len(ws))
	p := pattern(0x77, 4096)
	c.writeAt(900<<10, p)
	if got := c.readAt(900<<10, 4096); !bytes.Equal(got, p) {
		t.Fatal("read after the burst differs")
	}
	c.disconnect()
}
