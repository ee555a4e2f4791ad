package mirror

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// doneRecorder is the nbd server's side of WriteAsync in a test: it counts
// answers and checks each write is answered once.
type doneRecorder struct {
	wg       *sync.WaitGroup
	answered atomic.Int32
	err      atomic.Pointer[error]
	sent     *atomic.Int64 // SendHeld calls, for all writes
}

func (d *doneRecorder) Done(err error) {
	if d.answered.Add(1) != 1 {
		panic("write answered twice")
	}
	if err != nil {
		d.err.Store(&err)
	}
	d.wg.Done()
}

func (d *doneRecorder) SendHeld() { d.sent.Add(1) }

// asyncBursts writes bursts of 1-32 writes through WriteAsync as the nbd
// reader does (more set but for the last of a burst, then Unplug), some
// overlapping earlier ones still in flight, and waits for every answer.
func asyncBursts(t *testing.T, v *Volume, rng *rand.Rand, writes int) {
	t.Helper()
	var wg sync.WaitGroup
	var sent atomic.Int64
	var recs []*doneRecorder
	for i := 0; i < writes; {
		burst := min(1+rng.IntN(32), writes-i)
		for k := range burst {
			n := 4096 * (1 + rng.IntN(4))
			if rng.IntN(8) == 0 {
				n = 128 << 10 // sent in place, not copied
			}
			off := rng.Int64N((testSize-int64(n))/4096) * 4096
			if rng.IntN(4) == 0 {
				off = 0 // overlaps: the goroutine fallback
			}
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			d := &doneRecorder{wg: &wg, sent: &sent}
			recs = append(recs, d)
			wg.Add(1)
			v.WriteAsync(p, off, k < burst-1, d)
		}
		v.Unplug()
		i += burst
	}
	waitDone(t, &wg)
	for _, d := range recs {
		if e := d.err.Load(); e != nil {
			t.Fatalf("write failed: %v", *e)
		}
	}
}

func TestWriteAsyncSyncMode(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(11, 3))
	asyncBursts(t, a.v, rng, 2000)
	if err := a.v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := a.v.Status().OutOfSyncBytes; got != 0 {
		t.Fatalf("out of sync after sync writes: %d", got)
	}
	assertIdentical(t, a, b)

	// Cut while bursts are in flight: every write is answered (the local
	// copy stands), what the peer may lack is dirty, and the resync after
	// the heal makes the replicas equal.
	stop := make(chan struct{})
	go func() {
		time.Sleep(20 * time.Millisecond)
		fault.setCut(true)
		close(stop)
	}()
	asyncBursts(t, a.v, rng, 3000)
	<-stop
	asyncBursts(t, a.v, rng, 200) // with the peer away
	fault.setCut(false)
	waitFor(t, "resync", func() bool {
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0
	})
	asyncBursts(t, a.v, rng, 500)
	if err := a.v.Flush(); err != nil {
		t.Fatal(err)
	}
	assertIdentical(t, a, b)
}

// In async mode (and on a Secondary) WriteAsync is WriteAt on a goroutine.
func TestWriteAsyncFallback(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeAsync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	var wg sync.WaitGroup
	var sent atomic.Int64
	d := &doneRecorder{wg: &wg, sent: &sent}
	wg.Add(1)
	a.v.WriteAsync(make([]byte, 4096), 0, false, d)
	wg.Wait()
	if e := d.err.Load(); e == nil || !errors.Is(*e, ErrNotPrimary) {
		t.Fatalf("write on a Secondary: %v, want ErrNotPrimary", d.err.Load())
	}
	if sent.Load() != 1 {
		t.Fatalf("SendHeld calls = %d, want 1", sent.Load())
	}
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	asyncBursts(t, a.v, rand.New(rand.NewPCG(5, 5)), 500)
	waitFor(t, "async drain", func() bool { return a.v.Status().OutOfSyncBytes == 0 && a.v.Status().Peer.InFlightWrites == 0 })
	assertIdentical(t, a, b)
}

// A plugged burst's async writes leave at the unplug, and a plug never
// holds back more than plugMaxHeld.
func TestPlugBurstAsync(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeAsync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(4, 4))
	drained := func() bool { st := a.v.Status(); return st.OutOfSyncBytes == 0 && st.Peer.InFlightWrites == 0 }
	sent0, recv0 := a.v.link.stats.sentBytes.Load(), b.v.link.stats.recvBytes.Load()
	a.v.PlugBurst()
	randomWrites(t, a.v, rng, 64, 0, testSize) // 64 x 4-64 KiB: past the bound
	queued := int64(a.v.link.stats.sentBytes.Load() - sent0)
	waitFor(t, "all but plugMaxHeld shipped while plugged", func() bool {
		return int64(b.v.link.stats.recvBytes.Load()-recv0) >= queued-plugMaxHeld
	})
	a.v.UnplugBurst()
	waitFor(t, "the last write shipped at the unplug", drained)
	assertIdentical(t, a, b)
}

// heldBurst promotes a's fresh sync pair and starts one WriteAsync burst
// on it with more set throughout (no Unplug yet): payload i, of sizes[i]
// bytes of byte 0x40+i, at i*64 KiB.
type heldBurst struct {
	wg   sync.WaitGroup
	sent atomic.Int64
	recs []*doneRecorder
}

func startHeldBurst(t *testing.T, a, b *node, sizes []int) *heldBurst {
	t.Helper()
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	// A pristine volume's first write, and one to an extent not yet in
	// the activity log, take the WriteAt path.
	if err := a.v.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	hb := &heldBurst{}
	for i, n := range sizes {
		d := &doneRecorder{wg: &hb.wg, sent: &hb.sent}
		hb.recs = append(hb.recs, d)
		hb.wg.Add(1)
		a.v.WriteAsync(bytes.Repeat([]byte{byte(0x40 + i)}, n), int64(i)<<16, true, d)
	}
	return hb
}

// unplug unplugs v and checks every write of the burst succeeded.
func (hb *heldBurst) unplug(t *testing.T, v *Volume) {
	t.Helper()
	v.Unplug()
	waitDone(t, &hb.wg)
	for i, d := range hb.recs {
		if e := d.err.Load(); e != nil {
			t.Fatalf("write %d: %v", i, *e)
		}
	}
}

// holds checks that v holds the burst's data.
func (hb *heldBurst) holds(t *testing.T, v *Volume) {
	t.Helper()
	got := make([]byte, 4096)
	for i := range hb.recs {
		if err := v.ReadAt(got, int64(i)<<16); err != nil || got[0] != byte(0x40+i) || got[4095] != byte(0x40+i) {
			t.Fatalf("write %d: %v, the disk holds %#x", i, err, got[0])
		}
	}
}

// A burst's local copies wait for Unplug, which sends the frames first: the
// peer holds a held write's data before this node's disk does, and no write
// of the burst is answered before the Unplug.
func TestWriteAsyncBurstLocalCopiesAtUnplug(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeSync})
	hb := startHeldBurst(t, a, b, []int{4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096})
	got := make([]byte, 4096)
	if err := a.v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if got[0] != 0 {
		t.Fatalf("local copy of a held write written before Unplug (byte %#x)", got[0])
	}
	for i, d := range hb.recs {
		if d.answered.Load() != 0 {
			t.Fatalf("held write %d answered before Unplug", i)
		}
	}
	hb.unplug(t, a.v)
	if hb.sent.Load() == 0 {
		t.Fatal("writes completed at Unplug sent no replies")
	}
	hb.holds(t, a.v)
	if st := a.v.Status(); st.OutOfSyncBytes != 0 {
		t.Fatalf("out of sync after acknowledged sync writes: %d", st.OutOfSyncBytes)
	}
	assertIdentical(t, a, b)
}

// The link is cut between a burst's WriteAsync and its Unplug: every held
// write is still written here and answered, the peer's share is out of
// sync, and the resync after the heal makes the replicas equal. Every other
// payload is large enough to be sent in place: its answer waits until the
// batch that carries it has left or failed.
func TestWriteAsyncBurstCutBeforeUnplug(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync})
	var sizes []int
	for i := range 16 {
		sizes = append(sizes, []int{4096, wan.ZeroCopyMin}[i%2])
	}
	hb := startHeldBurst(t, a, b, sizes)
	fault.setCut(true)
	waitFor(t, "the session's end", func() bool { return !established(a.v) })
	hb.unplug(t, a.v)
	hb.holds(t, a.v)
	if got := a.v.Status().OutOfSyncBytes; got == 0 {
		t.Fatal("nothing out of sync after a cut with writes unacknowledged")
	}
	fault.setCut(false)
	waitFor(t, "resync", func() bool {
		return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0
	})
	assertIdentical(t, a, b)
	hb.holds(t, b.v)
}

func waitDone(t *testing.T, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("writes not answered")
	}
}
