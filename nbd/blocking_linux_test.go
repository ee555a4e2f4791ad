package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"runtime"
	"testing"
)

func threadCount(s *Server) (threads, blockingConns int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.thread {
			threads++
		}
		if _, ok := c.nc.(*blockingConn); ok {
			blockingConns++
		}
	}
	return threads, blockingConns
}

// TestListenerConnsThreadBudget: listener connections are served with
// blocking reads while GOMAXPROCS-1 Ps are spare, the rest through the
// poller; both kinds serve data, a thread is handed back when its
// connection ends, and Shutdown ends the blocked reads.
func TestListenerConnsThreadBudget(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(3))
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Device: d})
	var cs []*rawClient
	roundTrip := func(c *rawClient, seed byte) {
		t.Helper()
		p := pattern(seed, 8192)
		c.writeAt(uint64(seed)*8192, p)
		if got := c.readAt(uint64(seed)*8192, 8192); !bytes.Equal(got, p) {
			t.Fatalf("client %d read back other data", seed)
		}
	}
	for i := range 3 {
		c := ts.dialGo(t, "")
		roundTrip(c, byte(i)) // answered: the connection is past takeThread
		cs = append(cs, c)
	}
	if th, bc := threadCount(ts.Server); th != 2 || bc != 2 {
		t.Fatalf("3 connections with GOMAXPROCS 3: %d threads, %d blocking conns; want 2, 2", th, bc)
	}
	cs[0].disconnect()
	waitFor(t, "the first connection's thread to be handed back", func() bool {
		th, _ := threadCount(ts.Server)
		return th == 1
	})
	c := ts.dialGo(t, "")
	roundTrip(c, 3)
	cs = append(cs[1:], c)
	if th, bc := threadCount(ts.Server); th != 2 || bc != 2 {
		t.Fatalf("after one left and one came: %d threads, %d blocking conns; want 2, 2", th, bc)
	}
	for i, c := range cs {
		roundTrip(c, byte(4+i))
	}
	if err := ts.shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	for _, c := range cs {
		c.expectClosed()
	}
	if th, _ := threadCount(ts.Server); th != 0 {
		t.Fatalf("%d threads counted after Shutdown", th)
	}
}

// TestBlockingTCPConnShutdown: a TCP connection served with blocking reads
// keeps its addresses, and Shutdown ends its blocked read (shutdown(2) on
// a TCP socket) with the request already sent answered.
func TestBlockingTCPConnShutdown(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	srv := newTestServer(t, Export{Device: newMemDevice(t, txSize)})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	nc, err := net.DialTimeout("tcp", l.Addr().String(), ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	c := newRawClient(t, nc)
	c.handshakeGo("")
	p := pattern(9, 4096)
	c.writeAt(0, p)
	if got := c.readAt(0, 4096); !bytes.Equal(got, p) {
		t.Fatal("read back other data")
	}
	srv.mu.Lock()
	for sc := range srv.conns {
		bc, ok := sc.nc.(*blockingConn)
		if !ok {
			srv.mu.Unlock()
			t.Fatalf("TCP connection served as %T, want *blockingConn", sc.nc)
		}
		if bc.RemoteAddr().String() != nc.LocalAddr().String() {
			srv.mu.Unlock()
			t.Fatalf("remote address %v, want %v", bc.RemoteAddr(), nc.LocalAddr())
		}
	}
	srv.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	c.expectClosed()
}
