package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

func TestBadRequestMagicClosesOnlyThatConnection(t *testing.T) {
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Device: d})
	good := ts.dialGo(t, "")
	bad := ts.dialGo(t, "")

	// A valid request first: it is answered before the close.
	bad.writeAt(0, pattern(1, 512))
	hdr := encRequest(0, wireCmdRead, 1, 0, 512)
	hdr[3] ^= 1
	bad.write(hdr)
	bad.expectClosed()
	waitFor(t, "the bad connection to go", func() bool { return connCount(ts.Server) == 1 })

	p := pattern(2, 4096)
	good.writeAt(8192, p)
	if got := good.readAt(8192, 4096); !bytes.Equal(got, p) {
		t.Fatal("other connection broken")
	}
	good.disconnect()
}

func TestTruncatedHeaderCleansUp(t *testing.T) {
	ts, d, c := startTx(t)
	c.write(encRequest(0, wireCmdRead, 1, 0, 512)[:10])
	c.close()
	waitFor(t, "the connection to be forgotten", func() bool { return connCount(ts.Server) == 0 })
	start := time.Now()
	if err := ts.shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if el := time.Since(start); el > ioTimeout/2 {
		t.Fatalf("Shutdown took %v", el)
	}
	if st := d.stats(); st.Reads != 0 {
		t.Fatalf("truncated request reached the device: %+v", st)
	}
}

func TestClientVanishesMidPayload(t *testing.T) {
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Device: d})
	other := ts.dialGo(t, "")
	c := ts.dialGo(t, "")
	c.write(encRequest(0, wireCmdWrite, 1, 4096, 65536), bytes.Repeat([]byte{0xab}, 1000))
	c.close()
	waitFor(t, "the vanished client to be forgotten", func() bool { return connCount(ts.Server) == 1 })
	if st := d.stats(); st.Writes != 0 {
		t.Fatalf("partial write reached the device: %+v", st)
	}
	if got := d.contents(0, 128<<10); !bytes.Equal(got, make([]byte, 128<<10)) {
		t.Fatal("device changed")
	}
	p := pattern(3, 4096)
	other.writeAt(4096, p)
	if got := other.readAt(4096, 4096); !bytes.Equal(got, p) {
		t.Fatal("other client broken")
	}
}

// DISC: requests received before it are still carried out and answered,
// the device is flushed, then the server closes.
func TestDiscWaitsForInflight(t *testing.T) {
	for _, pipelined := range []bool{true, false} {
		name := "separate"
		if pipelined {
			name = "pipelined"
		}
		t.Run(name, func(t *testing.T) {
			ts, d, c := startTx(t)
			h := d.holdOps(func(op string, _, _ int64) bool { return op == opWrite })
			p := pattern(4, 4096)
			req := append(encRequest(0, wireCmdWrite, 77, 8192, 4096), p...)
			disc := encRequest(0, wireCmdDisc, 78, 0, 0)
			if pipelined {
				c.write(req, disc)
				h.waitEntered(t)
			} else {
				c.write(req)
				h.waitEntered(t)
				c.write(disc)
			}
			if st := d.stats(); st.Flushes != 0 || st.Writes != 0 {
				t.Fatalf("device stats %+v while the write is held", st)
			}
			h.release()
			errno, cookie := c.simpleReply()
			if errno != 0 || cookie != 77 {
				t.Fatalf("write reply errno %d cookie %d", errno, cookie)
			}
			c.expectClosed()
			// Closed only after the flush: by now it is stable.
			if st := d.stats(); st.Writes != 1 || st.Flushes != 1 {
				t.Fatalf("device stats %+v after DISC", st)
			}
			if got := d.stableContents(8192, 4096); !bytes.Equal(got, p) {
				t.Fatal("write before DISC is not stable after the close")
			}
			waitFor(t, "the connection to be forgotten", func() bool { return connCount(ts.Server) == 0 })
		})
	}
}

// Shutdown: in-flight requests finish and are answered, the device is
// flushed, Serve returns ErrServerClosed, new clients are refused.
func TestShutdownWaitsForInflight(t *testing.T) {
	ts, d, c := startTx(t)
	idle := ts.dialGo(t, "")
	h := d.holdOps(func(op string, _, _ int64) bool { return op == opWrite })
	p := pattern(5, 4096)
	c.write(encRequest(0, wireCmdWrite, 5, 0, 4096), p)
	h.waitEntered(t)

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		done <- ts.Shutdown(ctx)
	}()
	waitFor(t, "Shutdown to begin", func() bool {
		ts.mu.Lock()
		defer ts.mu.Unlock()
		return ts.closed
	})
	select {
	case err := <-ts.serveErr:
		if !errors.Is(err, ErrServerClosed) {
			t.Fatalf("Serve = %v, want ErrServerClosed", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("Serve did not return")
	}
	ts.serveErr <- ErrServerClosed // for the cleanup's check
	if nc, err := net.Dial("unix", ts.path); err == nil {
		nc.Close()
		t.Fatal("dial succeeded after Shutdown began")
	}
	idle.expectClosed() // idle connections go at once
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) with a request in flight", err)
	default:
	}

	h.release()
	errno, cookie := c.simpleReply()
	if errno != 0 || cookie != 5 {
		t.Fatalf("in-flight write: errno %d cookie %d", errno, cookie)
	}
	c.expectClosed()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("Shutdown did not return")
	}
	if got := d.stableContents(0, 4096); !bytes.Equal(got, p) {
		t.Fatal("in-flight write not stable after Shutdown")
	}
	if n := connCount(ts.Server); n != 0 {
		t.Fatalf("%d connections left", n)
	}
}

// When ctx ends first, Shutdown closes the connections at once (the client
// sees the close while the device is still stuck), then returns ctx's error
// once the device lets go.
func TestShutdownContextExpires(t *testing.T) {
	ts, d, c := startTx(t)
	h := d.holdOps(func(op string, _, _ int64) bool { return op == opRead })
	c.write(encRequest(0, wireCmdRead, 9, 0, 512))
	h.waitEntered(t)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(ctx) }()
	c.expectClosed()
	h.release()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Shutdown = %v, want context.Canceled", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("Shutdown did not return")
	}
}

func TestShutdownIdleTransmission(t *testing.T) {
	ts, d, c := startTx(t)
	c.writeAt(0, pattern(6, 4096))
	if err := ts.shutdown(); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()
	if got := d.stableContents(0, 4096); !bytes.Equal(got, pattern(6, 4096)) {
		t.Fatal("not flushed by Shutdown")
	}
}

// A client that wrote and vanished without DISC gets no flush from its
// connection; Shutdown must still make its answered writes stable.
func TestShutdownFlushesAfterAbruptClient(t *testing.T) {
	ts, d, c := startTx(t)
	p := pattern(7, 8192)
	c.writeAt(0, p)
	c.close()
	waitFor(t, "the connection to be forgotten", func() bool { return connCount(ts.Server) == 0 })
	if got := d.stableContents(0, 8192); bytes.Equal(got, p) {
		t.Fatal("stable before any flush (the fake is broken)")
	}
	if err := ts.shutdown(); err != nil {
		t.Fatal(err)
	}
	if got := d.stableContents(0, 8192); !bytes.Equal(got, p) {
		t.Fatal("Shutdown did not flush the export")
	}
}

// Read-only exports are not flushed by Shutdown; errors from a flush are
// reported.
func TestShutdownFlushError(t *testing.T) {
	rw := newMemDevice(t, 4096)
	ro := newMemDevice(t, 4096)
	ts := startServer(t, nil, Export{Name: "rw", Device: rw}, Export{Name: "ro", Device: ro, ReadOnly: true})
	rw.setFault(func(op string, _, _ int64) error {
		if op == opFlush {
			return errors.New("flush failed")
		}
		return nil
	})
	if err := ts.shutdown(); err == nil {
		t.Fatal("Shutdown hid the flush error")
	}
	if st := ro.stats(); st.Flushes != 0 {
		t.Fatalf("read-only export flushed %d times", st.Flushes)
	}
}
