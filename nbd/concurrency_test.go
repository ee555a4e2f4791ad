package nbd

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// A request stuck in the device does not hold back the ones after it:
// replies come back out of order, matched by cookie.
func TestOutOfOrderReplies(t *testing.T) {
	for _, tc := range []struct {
		name      string
		op        string
		cmd       uint16
		separate  bool // send B only once A is in the device
		withWrite bool
	}{
		{"reads pipelined", opRead, wireCmdRead, false, false},
		{"writes pipelined", opWrite, wireCmdWrite, false, true},
		{"reads separate", opRead, wireCmdRead, true, false},
		{"writes separate", opWrite, wireCmdWrite, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, d, c := startTx(t)
			pa, pb := pattern(1, 4096), pattern(2, 4096)
			d.fill(pa, 0)
			d.fill(pb, 8192)
			h := d.holdOps(func(op string, off, _ int64) bool { return op == tc.op && off < 4096 })

			var a, b []byte
			a = encRequest(0, tc.cmd, 0xA, 0, 4096)
			b = encRequest(0, tc.cmd, 0xB, 8192, 4096)
			if tc.withWrite {
				a = append(a, pa...)
				b = append(b, pb...)
			}
			if tc.separate {
				c.write(a)
				h.waitEntered(t)
				c.write(b)
			} else {
				c.write(a, b)
				h.waitEntered(t)
			}
			errno, cookie := c.simpleReply()
			if errno != 0 || cookie != 0xB {
				t.Fatalf("first reply: errno %d cookie %#x, want B", errno, cookie)
			}
			if !tc.withWrite {
				if got := c.read(4096); !bytes.Equal(got, pb) {
					t.Fatal("B data wrong")
				}
			}
			h.release()
			errno, cookie = c.simpleReply()
			if errno != 0 || cookie != 0xA {
				t.Fatalf("second reply: errno %d cookie %#x, want A", errno, cookie)
			}
			if !tc.withWrite {
				if got := c.read(4096); !bytes.Equal(got, pa) {
					t.Fatal("A data wrong")
				}
			}
			c.disconnect()
		})
	}
}

// Many clients at once, each pipelining writes to its own region then
// reading it back out of order.
func TestManyClients(t *testing.T) {
	const (
		clients = 64
		perConn = 8
		chunk   = 8 << 10
		region  = perConn * chunk
	)
	d := newMemDevice(t, clients*region)
	ts := startServer(t, nil, Export{Device: d})
	want := make([][]byte, clients)
	var wg sync.WaitGroup
	for i := range clients {
		r := rand.New(rand.NewPCG(uint64(i), 42))
		want[i] = make([]byte, region)
		for j := range want[i] {
			want[i][j] = byte(r.Uint32())
		}
		c := ts.dial(t).async()
		wg.Go(func() {
			c.handshakeGo("")
			base := uint64(i * region)
			var reqs []byte
			for k := range perConn {
				reqs = append(reqs, encRequest(0, wireCmdWrite, uint64(k), base+uint64(k*chunk), chunk)...)
				reqs = append(reqs, want[i][k*chunk:(k+1)*chunk]...)
			}
			c.write(reqs)
			seen := map[uint64]bool{}
			for range perConn {
				errno, cookie := c.simpleReply()
				if errno != 0 || cookie >= perConn || seen[cookie] {
					c.fail("client %d: write reply errno %d cookie %d", i, errno, cookie)
				}
				seen[cookie] = true
			}
			reqs = reqs[:0]
			for k := range perConn {
				reqs = append(reqs, encRequest(0, wireCmdRead, uint64(100+k), base+uint64(k*chunk), chunk)...)
			}
			c.write(reqs)
			got := make([]byte, region)
			for range perConn {
				errno, cookie := c.simpleReply()
				k := int(cookie) - 100
				if errno != 0 || k < 0 || k >= perConn || seen[cookie] {
					c.fail("client %d: read reply errno %d cookie %d", i, errno, cookie)
				}
				seen[cookie] = true
				copy(got[k*chunk:], c.read(chunk))
			}
			if !bytes.Equal(got, want[i]) {
				c.fail("client %d: read back differs", i)
			}
			c.disconnect()
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	if got := d.contents(0, clients*region); !bytes.Equal(got, bytes.Join(want, nil)) {
		t.Fatal("device contents differ")
	}
	if s := ts.Stats(); s.Connections != clients || s.Writes != clients*perConn || s.Reads != clients*perConn {
		t.Fatalf("stats %+v", s)
	}
}

// CAN_MULTI_CONN: a FLUSH on one connection covers writes answered on
// another.
func TestMultiConnFlush(t *testing.T) {
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Device: d})
	c1 := ts.dialGo(t, "")
	c2 := ts.dialGo(t, "")
	p := pattern(7, 65536)
	c1.writeAt(4096, p)
	if got := d.stableContents(4096, 65536); bytes.Equal(got, p) {
		t.Fatal("stable before any flush (the fake is broken)")
	}
	c2.mustDo(wireCmdFlush, 0, 0, 0, nil)
	if got := d.stableContents(4096, 65536); !bytes.Equal(got, p) {
		t.Fatal("FLUSH on connection 2 did not cover the write answered on connection 1")
	}
	if st := d.stats(); st.Flushes != 1 {
		t.Fatalf("flushes %d", st.Flushes)
	}
}

// NBD orders a FLUSH only after the writes already answered; one sent
// while a write is still in flight is not queued behind it.
func TestFlushDoesNotWaitForUnansweredWrite(t *testing.T) {
	_, d, c := startTx(t)
	h := d.holdOps(func(op string, _, _ int64) bool { return op == opWrite })
	c.write(encRequest(0, wireCmdWrite, 1, 0, 512), make([]byte, 512), encRequest(0, wireCmdFlush, 2, 0, 0))
	h.waitEntered(t)
	if errno, cookie := c.simpleReply(); errno != 0 || cookie != 2 {
		t.Fatalf("first reply errno %d cookie %d, want the FLUSH", errno, cookie)
	}
	h.release()
	if errno, cookie := c.simpleReply(); errno != 0 || cookie != 1 {
		t.Fatalf("second reply errno %d cookie %d", errno, cookie)
	}
}

// With a tiny in-flight budget a client pipelining many large writes (and
// reading replies as they come, like the kernel) still gets all of them
// done.
func TestInflightBudgetPipelinedWrites(t *testing.T) {
	for _, budget := range []int64{1, 600 << 10, 4 << 20} {
		t.Run(fmt.Sprint(budget), func(t *testing.T) {
			const n, size = 32, 256 << 10
			d := newMemDevice(t, n*size)
			ts := startServer(t, func(s *Server) { s.InflightBytes = budget }, Export{Device: d})
			c := ts.dialGo(t, "")
			data := pattern(9, n*size)
			replies := make(chan error, 1)
			rc := &rawClient{t: t, nc: c.nc, br: c.br, isAsync: true}
			go func() {
				seen := make(map[uint64]bool)
				for range n {
					errno, cookie := rc.simpleReply()
					if errno != 0 || cookie >= n || seen[cookie] {
						rc.fail("reply errno %d cookie %d", errno, cookie)
					}
					seen[cookie] = true
				}
				replies <- nil
			}()
			for i := range n {
				c.write(encRequest(0, wireCmdWrite, uint64(i), uint64(i*size), size), data[i*size:(i+1)*size])
			}
			select {
			case <-replies:
			case <-time.After(ioTimeout):
				t.Fatal("not every write was answered")
			}
			if got := d.contents(0, n*size); !bytes.Equal(got, data) {
				t.Fatal("device contents differ")
			}
		})
	}
}

// A client that sends reads and does not read the replies must not make
// the server read ahead without bound: InflightBytes counts a request until
// its reply is written, so unanswered read data stays within the budget.
func TestInflightBudgetBoundsUnreadReplies(t *testing.T) {
	const (
		n      = 64
		size   = 256 << 10
		budget = 4 * size
	)
	d := newMemDevice(t, n*size)
	d.fill(pattern(3, n*size), 0)
	srv := newTestServer(t, Export{Device: d})
	srv.InflightBytes = budget
	// net.Pipe buffers nothing: a reply the client does not read is not
	// written, whatever the host's socket buffer sizes.
	cli, sc := net.Pipe()
	srv.ServeConn(sc)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		_ = cli.Close()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	})
	c := newRawClient(t, cli)
	c.handshakeGo("")
	var reqs []byte
	for i := range n {
		reqs = append(reqs, encRequest(0, wireCmdRead, uint64(i), uint64(i*size), size)...)
	}
	c.write(reqs) // 64 × 28 bytes: the server's first read takes them all

	waitFor(t, "the first reads", func() bool { return d.stats().Reads >= 1 })
	// Nothing read back yet: at most budget/size reads may have run. This
	// is a negative check, so it watches for a while rather than waiting
	// for an event.
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if r := d.stats().Reads; r > budget/size {
			t.Fatalf("%d reads done (%d MiB held) with no reply read; budget allows %d",
				r, r*size>>20, budget/size)
		}
	}

	got := make([]byte, n*size)
	for range n {
		errno, cookie := c.simpleReply()
		if errno != 0 || cookie >= n {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		copy(got[cookie*size:], c.read(size))
	}
	if !bytes.Equal(got, pattern(3, n*size)) {
		t.Fatal("data differs")
	}
}
