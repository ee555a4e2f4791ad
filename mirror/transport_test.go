package mirror

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// TestShaperResyncShare: resync is held to its share only while live writes
// flow; the connection cap applies to everything and can change at once.
func TestShaperResyncShare(t *testing.T) {
	const limit = 4 << 20
	s := newShaper(limit, 25) // resync: 1 MiB/s while live writes flow
	ctx := context.Background()
	// Idle link: resync is not held back here (the connection cap still is).
	t0 := time.Now()
	if err := s.waitResync(ctx, 4<<20); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 100*time.Millisecond {
		t.Fatalf("resync waited %v with no live writes", d)
	}
	// Live writes: 1.5 MiB of resync at 1 MiB/s, after the bucket's
	// 256 KiB burst, takes about 1.25 s.
	s.note(wan.FrameWrite, 4096)
	t0 = time.Now()
	for range 6 {
		s.note(wan.FrameWrite, 4096)
		if err := s.waitResync(ctx, 256<<10); err != nil {
			t.Fatal(err)
		}
	}
	if d := time.Since(t0); d < time.Second || d > 3*time.Second {
		t.Fatalf("1.5 MiB of resync beside live writes took %v, want about 1.25 s at a 25%% share of 4 MiB/s", d)
	}
	// Unlimited: no wait at all.
	s.set(0, 25)
	s.note(wan.FrameWrite, 4096)
	t0 = time.Now()
	if err := s.waitResync(ctx, 64<<20); err != nil || time.Since(t0) > 100*time.Millisecond {
		t.Fatalf("unlimited: %v after %v", err, time.Since(t0))
	}
}

// TestLimitedConn: writes through the cap take size/rate; Close ends a wait.
func TestLimitedConn(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := b.Read(buf); err != nil {
				return
			}
		}
	}()
	s := newShaper(2<<20, 30)
	c := s.wrap(a)
	t0 := time.Now()
	if _, err := c.Write(make([]byte, 1<<20+256<<10)); err != nil { // burst 256 KiB, then 1 MiB at 2 MiB/s
		t.Fatal(err)
	}
	if d := time.Since(t0); d < 400*time.Millisecond || d > 2*time.Second {
		t.Fatalf("1.25 MiB at 2 MiB/s took %v, want about 0.5 s", d)
	}
	s.set(64<<10, 30) // 64 KiB/s: the next write would take a minute
	done := make(chan error, 1)
	go func() { _, err := c.Write(make([]byte, 4<<20)); done <- err }()
	_ = c.Close() // before or during the write's wait for tokens: either way it ends
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("write through a closed capped connection succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end a write waiting for the cap")
	}
}

func TestMeter(t *testing.T) {
	var m meter
	const now = 1_000_000
	m.addAt(1<<20, now-meterSpan-1) // too old
	for i := int64(1); i <= meterSpan; i++ {
		m.addAt(100, now-i)
		m.addAt(200, now-i)
	}
	m.addAt(1<<20, now) // the current second does not count yet
	if r := m.rateAt(now); r != 300 {
		t.Fatalf("rate %v, want 300", r)
	}
	m.addAt(7, now+2) // reuses the bucket of now-2
	if r := m.rateAt(now + 3); r != (1<<20+7)/3.0 {
		t.Fatalf("rate %v after the window moved", r)
	}
}
