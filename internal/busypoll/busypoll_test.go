package busypoll

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pair returns the two ends of a connected unix socket pair, on Go's poller.
func pair(t *testing.T) (a, b net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "sock")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	return conn(fds[0]), conn(fds[1])
}

// reader counts the blocking reads a Poller falls back to.
type reader struct {
	c      net.Conn
	blocks int
}

func (r *reader) block(b []byte) (int, error) {
	r.blocks++
	return r.c.Read(b)
}

// flowing returns a socket pair's writing end and a Poller over the other
// that has just read a byte (data is flowing), with its blocking reads
// counted by r.
func flowing(t *testing.T, window time.Duration) (a net.Conn, p *Poller, r *reader) {
	t.Helper()
	if runtime.NumCPU() < 2 {
		t.Fatalf("needs 2 CPUs to poll; TestSingleCPUNeverPolls covers this machine")
	}
	a, b := pair(t)
	p, r = New(b.(syscall.Conn), window), &reader{c: b}
	if _, err := a.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if n, err := p.Read(make([]byte, 1), r.block); n != 1 || err != nil || r.blocks != 1 {
		t.Fatalf("first read: %d, %v, %d blocking reads; want 1, nil, 1 (nothing read yet: no poll)", n, err, r.blocks)
	}
	return a, p, r
}

// writeAfter sends s on a after d: data that arrives during a poll, or
// after its window.
func writeAfter(a net.Conn, d time.Duration, s string) {
	go func() {
		time.Sleep(d)
		_, _ = a.Write([]byte(s))
	}()
}

func TestPollsWhileDataFlows(t *testing.T) {
	a, p, r := flowing(t, time.Second)
	buf := make([]byte, 16)

	// Data flowing: the next read polls and finds what arrives meanwhile.
	writeAfter(a, 5*time.Millisecond, "two")
	if n, err := p.Read(buf, r.block); err != nil || string(buf[:n]) != "two" || r.blocks != 1 {
		t.Fatalf("polled read: %q, %v, %d blocking reads; want two, nil, 1", buf[:n], err, r.blocks)
	}
	// EOF found by the poll is io.EOF, as from the conn.
	_ = a.Close()
	if n, err := p.Read(buf, r.block); n != 0 || !errors.Is(err, io.EOF) || r.blocks != 1 {
		t.Fatalf("polled EOF: %d, %v, %d blocking reads; want 0, EOF, 1", n, err, r.blocks)
	}
}

func TestBlocksWhenIdleOrWindowEnds(t *testing.T) {
	a, p, r := flowing(t, time.Millisecond)
	buf := make([]byte, 16)
	// The poll window (1 ms) ends before the data comes: the read blocks
	// and still returns it; nothing was lost to the poll.
	writeAfter(a, 50*time.Millisecond, "late")
	start := time.Now()
	if n, err := p.Read(buf, r.block); err != nil || string(buf[:n]) != "late" || r.blocks != 2 {
		t.Fatalf("late read: %q, %v, %d blocking reads; want late, nil, 2", buf[:n], err, r.blocks)
	}
	if time.Since(start) < 40*time.Millisecond {
		t.Fatal("late data read before it was sent")
	}
	// Idle far longer than the window: no poll at all, straight to a
	// blocking read (an idle daemon does not spin).
	p.last = time.Now().Add(-time.Hour)
	_, _ = a.Write([]byte("y"))
	if _, err := p.Read(buf, r.block); err != nil || r.blocks != 3 {
		t.Fatalf("idle read: %v, %d blocking reads; want nil, 3", err, r.blocks)
	}
}

func TestDeadlineEndsPoll(t *testing.T) {
	_, p, r := flowing(t, time.Second)
	// A deadline in the past (how a session is stopped) ends the read at
	// once, poll or not.
	_ = r.c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := p.Read(make([]byte, 16), r.block); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v, want ErrDeadlineExceeded", err)
	}
}

func TestZeroWindowNeverPolls(t *testing.T) {
	a, b := pair(t)
	r := &reader{c: b}
	buf := make([]byte, 16)
	for _, p := range []*Poller{nil, New(b.(syscall.Conn), 0)} {
		for range 3 {
			_, _ = a.Write([]byte("z"))
			if _, err := p.Read(buf, r.block); err != nil {
				t.Fatal(err)
			}
		}
	}
	if r.blocks != 6 {
		t.Fatalf("%d blocking reads, want 6", r.blocks)
	}
}

func TestSingleCPUNeverPolls(t *testing.T) {
	_, b := pair(t)
	p := New(b.(syscall.Conn), time.Second)
	if runtime.NumCPU() < 2 && p.Polls() {
		t.Fatalf("polls on one CPU (window %v)", p.window)
	}
	if runtime.NumCPU() >= 2 && (p == nil || p.window != time.Second) {
		t.Fatalf("window on %d CPUs: %+v, want 1s", runtime.NumCPU(), p)
	}
}
