// Package wanproxy emulates a WAN between two TCP endpoints for tests and benchmarks:
// a proxy that forwards each connection with a one-way delay, jitter, a bandwidth
// and loss, per direction, and lets a test cut the link, watch or alter the bytes.
//
// It works on the byte stream, not on packets: the kernel's TCP on each side of the
// proxy never sees a loss. Loss is therefore modelled as what TCP makes of it, a
// stall of one retransmission timeout for the chunk hit and (order being kept)
// everything behind it. Bandwidth is a serialization delay per chunk at the given
// rate, as a bottleneck link adds; a bounded queue in front of it pushes back on
// the sender the way a full bottleneck buffer does (through the sender's TCP
// window). Randomness comes from a seeded source, so a run can be replayed.
//
// Where a kernel shaper is the better model (many flows, real TCP dynamics), use
// tc tbf in a network namespace instead; this proxy needs no privileges and works
// on loopback, where netem may be missing.
package wanproxy

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Link is one direction of the emulated WAN.
type Link struct {
	// Delay is the one-way propagation delay (half the added RTT).
	Delay time.Duration
	// Jitter adds a uniform random delay in [0, Jitter) per chunk; order is
	// kept, as on one TCP connection.
	Jitter time.Duration
	// Rate is the bottleneck bandwidth in bytes/s (0: unlimited).
	Rate int64
	// Loss is the probability that a chunk is "lost": delivered RTO late.
	Loss float64
	// RTO is the stall a loss costs (DefaultRTO if 0).
	RTO time.Duration
}

// Defaults.
const (
	// DefaultRTO is Linux's minimum retransmission timeout.
	DefaultRTO = 200 * time.Millisecond
	// DefaultQueue is the bottleneck buffer per direction.
	DefaultQueue = 4 << 20
	// chunkSize is the unit of delay and loss: small enough for smooth
	// shaping at 100 Mbit/s, large enough to stay cheap.
	chunkSize = 16 << 10
)

// Filter sees every chunk of one direction before it is delivered: conn numbers
// the proxy's connections from 1, off is the chunk's offset in that connection's
// stream. It may change b in place (tampering) or copy it (recording); it runs on
// the reading goroutine of that direction.
type Filter func(conn int, off int64, b []byte)

// Config sets up a Proxy.
type Config struct {
	Listen string // host:port, "127.0.0.1:0" if empty
	Target string // host:port every connection is forwarded to
	// Up is client to target, Down target to client.
	Up, Down Link
	// UpFilter, DownFilter: see Filter (nil: none).
	UpFilter, DownFilter Filter
	// Queue is the bottleneck buffer in bytes per direction (DefaultQueue).
	Queue int64
	Seed  uint64
}

// Proxy is a running emulated WAN.
type Proxy struct {
	cfg Config
	ln  net.Listener

	mu      sync.Mutex
	cut     bool
	closed  bool
	stalled bool      // hold what the client sends (Up), connections kept
	unstall sync.Cond // broadcast when stalled, cut or closed change
	conns   map[net.Conn]struct{}
	nconn   int
	rng     *rand.Rand
	wg      sync.WaitGroup

	up, down atomic.Int64 // bytes delivered each way
}

// Start listens and forwards until Close.
func Start(cfg Config) (*Proxy, error) {
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Queue == 0 {
		cfg.Queue = DefaultQueue
	}
	for _, l := range []*Link{&cfg.Up, &cfg.Down} {
		if l.RTO == 0 {
			l.RTO = DefaultRTO
		}
		if l.Delay < 0 || l.Jitter < 0 || l.Rate < 0 || l.Loss < 0 || l.Loss >= 1 {
			return nil, errors.New("wanproxy: negative delay, jitter or rate, or loss outside [0, 1)")
		}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg, ln: ln, conns: make(map[net.Conn]struct{}), rng: rand.New(rand.NewPCG(cfg.Seed, 0x77616e))}
	p.unstall.L = &p.mu
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is where clients connect.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Delivered returns the bytes delivered up (client to target) and down.
func (p *Proxy) Delivered() (up, down int64) { return p.up.Load(), p.down.Load() }

// Target is where connections are forwarded to (for a restarted proxy).
func (p *Proxy) Target() string { return p.cfg.Target }

// Connections returns how many connections were forwarded.
func (p *Proxy) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.nconn
}

// SetCut cuts the link (closing every connection, refusing new ones) or heals it.
func (p *Proxy) SetCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	p.unstall.Broadcast()
	if cut {
		for c := range p.conns {
			_ = c.Close()
		}
	}
}

// SetStalled holds everything the client sends (or lets it flow again)
// while keeping the connections open: a congested link rather than a cut
// one. The target's direction still flows.
func (p *Proxy) SetStalled(stalled bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stalled = stalled
	p.unstall.Broadcast()
}

// waitUnstalled blocks while the client's direction is stalled.
func (p *Proxy) waitUnstalled() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.stalled && !p.cut && !p.closed {
		p.unstall.Wait()
	}
}

// Close stops the proxy and waits for its goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.unstall.Broadcast()
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

func (p *Proxy) serve(c net.Conn) {
	defer p.wg.Done()
	p.mu.Lock()
	refuse := p.cut || p.closed
	p.mu.Unlock()
	if refuse {
		_ = c.Close()
		return
	}
	u, err := net.DialTimeout("tcp", p.cfg.Target, 5*time.Second)
	if err != nil {
		_ = c.Close()
		return
	}
	p.mu.Lock()
	if p.cut || p.closed {
		p.mu.Unlock()
		_ = c.Close()
		_ = u.Close()
		return
	}
	p.conns[c], p.conns[u] = struct{}{}, struct{}{}
	p.nconn++
	id := p.nconn
	seeds := [2]uint64{p.rng.Uint64(), p.rng.Uint64()}
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go p.pipe(&wg, u, c, p.cfg.Up, p.cfg.UpFilter, &p.up, id, seeds[0])
	go p.pipe(&wg, c, u, p.cfg.Down, p.cfg.DownFilter, &p.down, id, seeds[1])
	wg.Wait()
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, u)
	p.mu.Unlock()
}

type chunk struct {
	at time.Time // when it may be written to dst
	b  []byte
}

// pipe carries src to dst through one direction's delay line. When either end
// fails both close, as a broken link does.
func (p *Proxy) pipe(wg *sync.WaitGroup, dst, src net.Conn, l Link, filter Filter, delivered *atomic.Int64, id int, seed uint64) {
	defer wg.Done()
	defer func() {
		_ = src.Close()
		_ = dst.Close()
	}()
	rng := rand.New(rand.NewPCG(seed, uint64(id)))
	q := &queue{limit: p.cfg.Queue}
	q.cond.L = &q.mu
	go func() {
		defer q.close()
		var off int64
		var txEnd, last time.Time // end of the previous chunk's serialization; its delivery
		for {
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			if n > 0 {
				b := buf[:n]
				if filter != nil {
					filter(id, off, b)
				}
				off += int64(n)
				now := time.Now()
				start := now
				if txEnd.After(start) {
					start = txEnd
				}
				txEnd = start
				if l.Rate > 0 {
					txEnd = start.Add(time.Duration(float64(n) / float64(l.Rate) * float64(time.Second)))
				}
				at := txEnd.Add(l.Delay)
				if l.Jitter > 0 {
					at = at.Add(time.Duration(rng.Int64N(int64(l.Jitter))))
				}
				if l.Loss > 0 && rng.Float64() < l.Loss {
					at = at.Add(l.RTO)
				}
				if at.Before(last) {
					at = last
				}
				last = at
				if !q.put(chunk{at, b}) {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	for {
		c, ok := q.get()
		if !ok {
			return
		}
		sleepUntil(c.at)
		if delivered == &p.up {
			p.waitUnstalled()
		}
		if _, err := dst.Write(c.b); err != nil {
			q.close()
			_ = src.Close() // unblocks the reader
			return
		}
		delivered.Add(int64(len(c.b)))
	}
}

// sleepUntil sleeps in the kernel (nanosleep: hrtimer precision, tens of µs)
// rather than on the Go timer, which overshoots by up to a millisecond under
// load: at 1 ms of emulated RTT that would be the larger part of the delay. The
// blocked thread costs nothing: the runtime hands its P to another.
func sleepUntil(at time.Time) {
	for d := time.Until(at); d > 0; d = time.Until(at) {
		ts := unix.NsecToTimespec(d.Nanoseconds())
		if err := unix.Nanosleep(&ts, nil); err != nil && err != unix.EINTR {
			time.Sleep(d)
		}
	}
}

// queue is the bottleneck buffer: put blocks while it holds limit bytes.
type queue struct {
	mu     sync.Mutex
	cond   sync.Cond
	items  []chunk
	bytes  int64
	limit  int64
	closed bool
}

func (q *queue) put(c chunk) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.bytes >= q.limit && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		return false
	}
	q.items = append(q.items, c)
	q.bytes += int64(len(c.b))
	q.cond.Broadcast()
	return true
}

// get returns the next chunk; false once closed and drained.
func (q *queue) get() (chunk, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.items) == 0 {
		return chunk{}, false
	}
	c := q.items[0]
	q.items[0] = chunk{}
	q.items = q.items[1:]
	q.bytes -= int64(len(c.b))
	q.cond.Broadcast()
	return c, true
}

func (q *queue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// Copy is io.Copy for filters that record: it returns a Filter appending the
// stream of connection conn to w (other connections are ignored).
func Copy(w io.Writer, conn int) Filter {
	return func(c int, _ int64, b []byte) {
		if c == conn {
			_, _ = w.Write(b)
		}
	}
}
