package mirror

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/time/rate"
)

const testSize = 16 << 20

// netFault cuts and heals the link between two test volumes: it closes
// live connections and refuses new dials while cut.
type netFault struct {
	mu    sync.Mutex
	cut   bool
	conns []net.Conn
	// slow, when set, paces what the dialing side sends (a slow link);
	// paused stalls it entirely (a congested or stalled link that keeps
	// the connection).
	slow   atomic.Pointer[rate.Limiter]
	paused atomic.Bool
}

func (f *netFault) dial(ctx context.Context, addr string) (net.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cut {
		return nil, errors.New("injected: link cut")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	f.conns = append(f.conns, c)
	return &faultConn{Conn: c, f: f}, nil
}

// faultConn paces and pauses writes in chunks, as a slow link would.
type faultConn struct {
	net.Conn
	f *netFault
}

func (c *faultConn) Write(p []byte) (int, error) {
	const chunk = 16 << 10
	done := 0
	for done < len(p) {
		for c.f.paused.Load() {
			time.Sleep(time.Millisecond)
		}
		n := min(chunk, len(p)-done)
		if lim := c.f.slow.Load(); lim != nil {
			_ = lim.WaitN(context.Background(), n)
		}
		k, err := c.Conn.Write(p[done : done+n])
		done += k
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

func (f *netFault) setCut(cut bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cut = cut
	if cut {
		for _, c := range f.conns {
			_ = c.Close()
		}
		f.conns = nil
	}
}

type pairOpts struct {
	// peer adjusts both nodes' peer configuration.
	peer       func(*PeerConfig)
	mode       Mode
	secretB    string
	volumeB    string
	sizeB      int64
	resyncRate int64
	// fenceA opens node a as a failover agent would
	// (FencePromotions, HoldOnDisconnect).
	fenceA bool
	// beaconB receives node b's FrameBeacon payloads.
	beaconB func([]byte)
}

type node struct {
	v    *Volume
	dir  string
	opts Options
}

func (n *node) reopen(t testing.TB) {
	t.Helper()
	v, err := Open(filepath.Join(n.dir, "disk.img"), n.opts)
	if err != nil {
		t.Fatalf("reopen %s: %v", n.opts.Node, err)
	}
	n.v = v
	t.Cleanup(func() { _ = v.Close() })
}

// newPair starts nodes "a" (dials) and "b" (listens) on loopback.
func newPair(t testing.TB, po pairOpts) (a, b *node, fault *netFault) {
	t.Helper()
	fault = &netFault{}
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	mk := func(name, peer, secret, vol string, size int64, pc PeerConfig) *node {
		dir := t.TempDir()
		pc.Node, pc.Secret, pc.Mode = peer, []byte(secret), po.mode
		pc.Timeout, pc.PingInterval, pc.ConnectRetry = 5*time.Second, 200*time.Millisecond, 50*time.Millisecond
		pc.ResyncMaxRate = po.resyncRate
		if po.peer != nil {
			po.peer(&pc)
		}
		n := &node{dir: dir, opts: Options{Name: vol, Node: name, Size: size, MetaPath: filepath.Join(dir, "disk.meta"), Peer: &pc, Log: log}}
		n.opts.FencePromotions = po.fenceA && name == "a"
		n.opts.HoldOnDisconnect = n.opts.FencePromotions
		if name == "b" {
			n.opts.OnBeacon = po.beaconB
		}
		n.reopen(t)
		return n
	}
	secretB, volB, sizeB := "secret", "vol0", int64(testSize)
	if po.secretB != "" {
		secretB = po.secretB
	}
	if po.volumeB != "" {
		volB = po.volumeB
	}
	if po.sizeB != 0 {
		sizeB = po.sizeB
	}
	b = mk("b", "a", secretB, volB, sizeB, PeerConfig{Listen: "127.0.0.1:0"})
	a = mk("a", "b", "secret", "vol0", testSize, PeerConfig{Address: b.v.PeerListenAddr().String(), Dial: fault.dial})
	return a, b, fault
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func established(v *Volume) bool {
	st := v.Status()
	return st.Peer != nil && st.Peer.Connection == string(ConnConnected) && st.Peer.Replication == string(ReplEstablished)
}

func fileSum(t *testing.T, n *node) [32]byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func assertIdentical(t *testing.T, a, b *node) {
	t.Helper()
	if fileSum(t, a) != fileSum(t, b) {
		t.Fatal("replicas differ")
	}
}

func randomWrites(t *testing.T, v *Volume, rng *rand.Rand, count int, lo, hi int64) {
	t.Helper()
	buf := make([]byte, 64<<10)
	for range count {
		n := int64(4096 * (1 + rng.IntN(16)))
		off := lo + rng.Int64N((hi-lo-n)/4096)*4096
		for i := range buf[:n] {
			buf[i] = byte(rng.Uint32())
		}
		if err := v.WriteAt(buf[:n], off, false); err != nil {
			t.Fatalf("write at %d: %v", off, err)
		}
	}
}

func TestSyncReplicatesConcurrentWrites(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := b.v.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("write on Secondary: %v, want ErrNotPrimary", err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			randomWrites(t, a.v, rand.New(rand.NewPCG(uint64(g), 1)), 200, int64(g)*testSize/8, int64(g+1)*testSize/8)
		}()
	}
	wg.Wait()
	if err := a.v.WriteZeroes(4096, 8192, true, false); err != nil {
		t.Fatal(err)
	}
	if err := a.v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := a.v.Status().OutOfSyncBytes; got != 0 {
		t.Fatalf("out of sync after sync writes: %d", got)
	}
	assertIdentical(t, a, b)
}

func TestCutThenPartialResync(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 7))
	randomWrites(t, a.v, rng, 100, 0, testSize)
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.Status().Peer.Connection != string(ConnConnected) })
	sentBefore := a.v.link.stats.resyncBytes.Load()
	randomWrites(t, a.v, rng, 50, 0, 2<<20) // 2 MiB of 16 touched while away
	dirty := a.v.Status().OutOfSyncBytes
	if dirty == 0 || dirty > 2<<20 {
		t.Fatalf("dirty bytes while cut = %d, want within the 2 MiB written", dirty)
	}
	if g := a.v.Generations(); g.Bitmap == 0 {
		t.Fatal("no new generation after writing without the peer")
	}
	fault.setCut(false)
	waitFor(t, "resync", func() bool { return established(a.v) && a.v.Status().OutOfSyncBytes == 0 && established(b.v) })
	if sent := int64(a.v.link.stats.resyncBytes.Load() - sentBefore); sent != dirty {
		t.Fatalf("resync sent %d bytes, dirty was %d", sent, dirty)
	}
	if a.v.Generations().Current != b.v.Generations().Current {
		t.Fatalf("generations differ after resync: %v vs %v", a.v.Generations(), b.v.Generations())
	}
	assertIdentical(t, a, b)
}

func TestSplitBrainDetectedAndResolved(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 3))
	randomWrites(t, a.v, rng, 20, 0, testSize)
	fault.setCut(true)
	waitFor(t, "b sees the cut", func() bool { return b.v.Status().Peer.Connection != string(ConnConnected) })
	randomWrites(t, a.v, rng, 20, 0, testSize)
	if err := b.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	randomWrites(t, b.v, rng, 20, 0, testSize)
	if err := b.v.Demote(); err != nil {
		t.Fatal(err)
	}
	fault.setCut(false)
	waitFor(t, "split brain", func() bool { return a.v.Status().Peer.SplitBrain && b.v.Status().Peer.SplitBrain })
	if fileSum(t, a) == fileSum(t, b) {
		t.Fatal("test setup: replicas should differ before resolution")
	}
	// Refused, and stays refused: nothing syncs by itself.
	if st := b.v.Status().Peer; st.Connection != string(ConnStandAlone) {
		t.Fatalf("b connection after split brain = %s, want StandAlone", st.Connection)
	}
	if err := b.v.DiscardMyData(); err != nil {
		t.Fatal(err)
	}
	a.v.Connect()
	waitFor(t, "resolution", func() bool { return established(a.v) && established(b.v) && a.v.Status().OutOfSyncBytes == 0 })
	assertIdentical(t, a, b)
	if b.v.Status().Peer.SplitBrain {
		t.Fatal("split brain flag still set after resolution")
	}
}

func TestPeersRefusedWithNothingWritten(t *testing.T) {
	for _, tc := range []struct {
		name string
		po   pairOpts
	}{
		{"wrong secret", pairOpts{secretB: "other"}},
		{"wrong volume", pairOpts{volumeB: "vol9"}},
		{"wrong size", pairOpts{sizeB: testSize / 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b, _ := newPair(t, tc.po)
			if err := a.v.Promote(PromoteOptions{}); err != nil {
				t.Fatal(err)
			}
			randomWrites(t, a.v, rand.New(rand.NewPCG(1, 1)), 20, 0, testSize/2)
			waitFor(t, "a refusal", func() bool { return a.v.Status().Peer.Reason != "" && a.v.link.stats.sessions.Load() == 0 })
			if established(b.v) || b.v.link.stats.sessions.Load() != 0 {
				t.Fatal("b established a session")
			}
			data, err := os.ReadFile(filepath.Join(b.dir, "disk.img"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data, make([]byte, len(data))) {
				t.Fatal("refused peer's disk was written")
			}
			t.Logf("a: %s", a.v.Status().Peer.Reason)
		})
	}
}

func TestVerifyFindsAndRepairsDifferences(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	randomWrites(t, a.v, rand.New(rand.NewPCG(5, 5)), 50, 0, testSize)
	// Silent corruption on the secondary's disk, behind mirrord's back.
	f, err := os.OpenFile(filepath.Join(b.dir, "disk.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("bit rot"), 5<<20+123); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	res, err := a.v.Verify(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.CheckedBytes != testSize || res.MismatchedBytes != verifyChunk || len(res.Mismatches) != 1 || res.Mismatches[0][0] != 5<<20 {
		t.Fatalf("verify result %+v, want one 1 MiB mismatch at 5 MiB", res)
	}
	waitFor(t, "repair", func() bool { return established(a.v) && a.v.Status().OutOfSyncBytes == 0 })
	assertIdentical(t, a, b)
	if res, err := a.v.Verify(context.Background(), nil); err != nil || res.MismatchedBytes != 0 {
		t.Fatalf("second verify: %+v %v", res, err)
	}
}

func TestInterruptedResyncResumesAndTargetStaysInconsistent(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync, resyncRate: 4 << 20})
	waitFor(t, "connection", func() bool { return established(a.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	fault.setCut(true)
	waitFor(t, "disconnect", func() bool { return a.v.Status().Peer.Connection != string(ConnConnected) })
	randomWrites(t, a.v, rand.New(rand.NewPCG(9, 9)), 400, 0, testSize) // most of the disk
	fault.setCut(false)
	waitFor(t, "resync start", func() bool { return b.v.Disk() == DiskInconsistent })
	fault.setCut(true)
	waitFor(t, "cut mid-resync", func() bool { return b.v.Status().Peer.Connection != string(ConnConnected) })
	if a.v.Status().OutOfSyncBytes == 0 {
		t.Fatal("resync finished before the cut; slow it down")
	}
	if b.v.Disk() != DiskInconsistent || b.v.Status().UndoBytes == 0 {
		t.Fatalf("cut mid-resync: disk %s, undo %d bytes; want Inconsistent with its old image in the undo log", b.v.Disk(), b.v.Status().UndoBytes)
	}
	a.v.link.cfg.ResyncMaxRate = 0
	fault.setCut(false)
	waitFor(t, "resync end", func() bool { return established(a.v) && a.v.Status().OutOfSyncBytes == 0 && b.v.Disk() == DiskUpToDate })
	assertIdentical(t, a, b)
}

// TestAsyncTargetIsWriteOrderPrefix stamps block i with sequence i, writing
// each only after the previous completed, and cuts the link at a random
// moment: whatever the target holds must be a prefix of that history.
func TestAsyncTargetIsWriteOrderPrefix(t *testing.T) {
	for round := range 5 {
		a, b, fault := newPair(t, pairOpts{mode: ModeAsync})
		waitFor(t, "connection", func() bool { return established(a.v) })
		if err := a.v.Promote(PromoteOptions{}); err != nil {
			t.Fatal(err)
		}
		const blocks = 2000
		cutAt := 200 + rand.IntN(1500)
		buf := make([]byte, 4096)
		for i := range blocks {
			binary.LittleEndian.PutUint64(buf, uint64(i+1))
			if err := a.v.WriteAt(buf, int64(i)*4096, false); err != nil {
				t.Fatal(err)
			}
			if i == cutAt {
				fault.setCut(true)
			}
		}
		waitFor(t, "b disconnected", func() bool { return b.v.Status().Peer.Connection != string(ConnConnected) })
		data, err := os.ReadFile(filepath.Join(b.dir, "disk.img"))
		if err != nil {
			t.Fatal(err)
		}
		holes := false
		last := 0
		for i := range blocks {
			seq := binary.LittleEndian.Uint64(data[i*4096:])
			if seq == 0 {
				holes = true
				continue
			}
			if holes || seq != uint64(i+1) {
				t.Fatalf("round %d: block %d holds %d after a gap: not a prefix", round, i, seq)
			}
			last = i
		}
		t.Logf("round %d: cut at %d, target holds blocks 0..%d", round, cutAt, last)
		fault.setCut(false)
		waitFor(t, "catch-up", func() bool { return established(a.v) && a.v.Status().OutOfSyncBytes == 0 })
		assertIdentical(t, a, b)
	}
}

// TestUncleanShutdownResyncsOnlyActivityLog: after a crash only extents in
// the activity log are out of sync, not the device.
func TestUncleanShutdownResyncsOnlyActivityLog(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Name: "vol0", Node: "a", Size: 64 << 20, MetaPath: filepath.Join(dir, "m"),
		Peer: &PeerConfig{Node: "b", Address: "127.0.0.1:1", Secret: []byte("s"), ConnectRetry: time.Hour}}
	v, err := Open(filepath.Join(dir, "img"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Writes while disconnected are dirty anyway; what matters is what a
	// crash adds: nothing beyond the two extents touched.
	buf := make([]byte, 4096)
	for _, off := range []int64{0, 4096, 20 << 20} {
		if err := v.WriteAt(buf, off, false); err != nil {
			t.Fatal(err)
		}
	}
	v.dirty.ClearAll() // pretend the peer acknowledged everything
	// Crash: no Close, so the superblock stays marked unclean.
	v.link.stop()
	_ = v.meta.close()
	_ = v.f.Close()
	v2, err := Open(filepath.Join(dir, "img"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if got := v2.Dirty().DirtyBytes(); got != 2*ALExtentSize {
		t.Fatalf("out of sync after crash = %d, want the two hot extents (%d)", got, 2*ALExtentSize)
	}
}
