package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"
	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/internal/busypoll"
)

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Defaults for Server tunables.
const (
	// DefaultInflightBytes bounds the payload memory one connection may hold
	// in requests not yet answered. Each request is charged at least
	// minRequestCost, so it also bounds the request count (256).
	DefaultInflightBytes = 64 << 20
	minRequestCost       = 256 << 10

	// readBufferSize lets one read syscall pick up a whole queue of small
	// requests at depth 32.
	readBufferSize = 256 << 10
	// Replies collect while a write is in progress, up to
	// maxPendingReplies bytes; one larger than directReply goes out with
	// writev instead of being copied.
	maxPendingReplies = 1 << 20
	directReply       = 32 << 10

	// handshakeTimeout stops a client that connects and says nothing from
	// holding a connection forever.
	handshakeTimeout = 30 * time.Second

	// yieldEvery: a reader that has not been through the scheduler for this
	// long yields once before it reads again (see transmit).
	yieldEvery = 2 * time.Millisecond
	// directPayload: a write payload at least this large skips the read
	// buffer (see readPayload).
	directPayload = 32 << 10
)

// Stats are cumulative counters across all connections.
type Stats struct {
	Connections  uint64 `json:"connections"`
	Reads        uint64 `json:"reads"`
	Writes       uint64 `json:"writes"`
	Flushes      uint64 `json:"flushes"`
	FUAWrites    uint64 `json:"fua_writes"`
	Trims        uint64 `json:"trims"`
	WriteZeroes  uint64 `json:"write_zeroes"`
	BytesRead    uint64 `json:"bytes_read"`
	BytesWritten uint64 `json:"bytes_written"`
	Errors       uint64 `json:"errors"`
}

type counters struct {
	conns, reads, writes, flushes, fuas, trims, zeroes atomic.Uint64
	bytesRead, bytesWritten, errors                    atomic.Uint64
}

// Server serves exports over any number of listeners and connections.
type Server struct {
	// InflightBytes is the per-connection budget of unanswered payload.
	InflightBytes int64
	// PollWindow is how long a connection's reader polls its socket
	// before it blocks while requests are flowing (busypoll); 0 never
	// polls. Read when a connection starts.
	PollWindow time.Duration

	log     zerolog.Logger
	exports []*Export
	stats   counters

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	wg        sync.WaitGroup
}

// NewServer returns a server for the given exports (at least one; names
// unique).
func NewServer(log zerolog.Logger, exports ...Export) (*Server, error) {
	if len(exports) == 0 {
		return nil, errors.New("nbd: no exports")
	}
	s := &Server{
		InflightBytes: DefaultInflightBytes,
		PollWindow:    busypoll.DefaultWindow,
		log:           log,
		listeners:     make(map[net.Listener]struct{}),
		conns:         make(map[*conn]struct{}),
	}
	seen := make(map[string]bool)
	for i := range exports {
		e := exports[i]
		if e.Device == nil {
			return nil, fmt.Errorf("nbd: export %q has no device", e.Name)
		}
		if seen[e.Name] {
			return nil, fmt.Errorf("nbd: duplicate export %q", e.Name)
		}
		seen[e.Name] = true
		s.exports = append(s.exports, &e)
	}
	return s, nil
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Connections: c.conns.Load(), Reads: c.reads.Load(), Writes: c.writes.Load(),
		Flushes: c.flushes.Load(), FUAWrites: c.fuas.Load(), Trims: c.trims.Load(),
		WriteZeroes: c.zeroes.Load(), BytesRead: c.bytesRead.Load(),
		BytesWritten: c.bytesWritten.Load(), Errors: c.errors.Load(),
	}
}

// Serve accepts connections on l until Shutdown (ErrServerClosed) or an
// accept error.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		s.ServeConn(nc)
	}
}

// ServeConn serves one already-connected client in the background, starting
// with the handshake. The server owns nc from now on.
func (s *Server) ServeConn(nc net.Conn) { s.serveConn(nc, nil) }

// ServeNegotiated serves a connection whose handshake happened elsewhere
// (the kernel's client, which only speaks the transmission phase, is given
// the export's flags and size through netlink or ioctl). The server owns nc
// from now on.
func (s *Server) ServeNegotiated(nc net.Conn, export string) error {
	e := s.export(export)
	if e == nil {
		_ = nc.Close()
		return fmt.Errorf("nbd: no export %q", export)
	}
	s.serveConn(nc, e)
	return nil
}

// export finds an export by name; "" is the first, as in the handshake.
func (s *Server) export(name string) *Export {
	for _, e := range s.exports {
		if e.Name == name {
			return e
		}
	}
	if name == "" {
		return s.exports[0]
	}
	return nil
}

func (s *Server) serveConn(nc net.Conn, exp *Export) {
	c := &conn{
		exp: exp,
		s:   s,
		nc:  nc,
		log: s.log.With().Str("client", remoteName(nc)).Logger(),
	}
	c.br = bufio.NewReaderSize(connReader{c}, readBufferSize)
	c.budget.max = s.InflightBytes
	c.budget.cond.L = &c.budget.mu
	c.wcond.L = &c.wmu
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.stats.conns.Add(1)
	go func() {
		defer s.wg.Done()
		c.serve()
		s.mu.Lock()
		delete(s.conns, c)
		if c.thread {
			ReleaseP()
		}
		s.mu.Unlock()
	}()
}

// Shutdown stops accepting, stops reading new requests, lets the requests
// already received finish and be answered, flushes every export and closes
// the connections. If ctx ends first the connections are closed at once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		_ = l.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			_ = c.nc.Close()
		}
		s.mu.Unlock()
		<-done
	}
	var errs []error
	for _, e := range s.exports {
		if e.ReadOnly {
			continue
		}
		if err := e.Device.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush export %q: %w", e.Name, err))
		}
	}
	return errors.Join(append(errs, ctx.Err())...)
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "local"
}

// budget bounds the payload held by unanswered requests of one connection.
// One request is always admitted, however large, so progress is certain.
type budget struct {
	mu         sync.Mutex
	cond       sync.Cond
	used, max  int64
	requestsIn int
}

func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.requestsIn > 0 && b.used+n > b.max {
		b.cond.Wait()
	}
	b.used += n
	b.requestsIn++
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.requestsIn--
	b.mu.Unlock()
	b.cond.Signal()
}

// request is one decoded transmission request; the header struct is go-nbd's.
type request struct {
	protocol.TransmissionRequestHeader
	buf    *[]byte // WRITE payload, or nil
	cost   int64
	inline bool // served on the reader: its reply may wait for the burst
	// peeked, when not nil, is the WRITE payload, or its head (the rest
	// is in buf), as a view of the read buffer (peekPayload, peekHead);
	// it is valid until the reader reads on. A field of its own, not buf:
	// a pointer to it would move the request to the heap.
	peeked []byte
	// discard: bytes of the read buffer the reader skips once the
	// request is served (a whole peeked payload).
	discard int
}

// connReader reads from the connection's current socket, which the
// reader may swap for a blockingConn after the handshake.
type connReader struct{ c *conn }

func (r connReader) Read(p []byte) (int, error) { return r.c.nc.Read(p) }

type conn struct {
	s      *Server
	nc     net.Conn // swapped under s.mu, before any handler starts
	br     *bufio.Reader
	exp    *Export
	log    zerolog.Logger
	thread bool // nc was made a blockingConn, on a P from ReserveP

	budget   budget
	active   atomic.Int32 // requests being served
	held     atomic.Int32 // replies appended with hold, maybe not yet sent
	handlers sync.WaitGroup
	stopping atomic.Bool

	// Replies use group commit: the goroutine that finds no write in
	// progress writes the batch outside the lock while later replies
	// collect in the other buffer.
	wmu      sync.Mutex
	wcond    sync.Cond
	wbuf     []byte
	walt     []byte
	flushing bool
	werr     error

	// plugger is a LocalOnly device's Plugger; plugged says the reader
	// has plugged it for the burst it is serving (reader only).
	plugger Plugger
	plugged bool
}

// stop makes the reader return at its next read; requests already read are
// still answered.
func (c *conn) stop() {
	c.stopping.Store(true)
	_ = c.nc.SetReadDeadline(time.Now())
}

func (c *conn) serve() {
	defer func() { _ = c.nc.Close() }()
	_ = c.nc.SetDeadline(time.Now().Add(handshakeTimeout))
	// stop() sets stopping before its read deadline, so checking after our
	// own deadline is set means a concurrent Shutdown is never missed.
	if c.stopping.Load() {
		return
	}
	exp, err := c.negotiate()
	if err != nil {
		switch {
		case errors.Is(err, ErrAborted):
		case errors.Is(err, io.EOF), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNRESET):
			// A client that connects and leaves: a health probe, a port scan.
			c.log.Debug().Err(err).Msg("client left during the handshake")
		default:
			c.log.Info().Err(err).Msg("handshake failed")
		}
		return
	}
	_ = c.nc.SetDeadline(time.Time{})
	if !c.takeThread() {
		return // stopping
	}
	c.exp = exp
	c.log = c.log.With().Str("export", exp.Name).Logger()
	c.log.Debug().Msg("client connected")

	graceful := c.transmit()

	c.handlers.Wait()
	// A reply held for a burst is in the buffer once its handler is done,
	// but the device may call SendHeld only after that (AsyncWriter), and
	// may be writing it right now: the last replies must be on the socket
	// before it closes (a client lost one in 4% of test runs).
	c.drainReplies()
	if graceful && !exp.ReadOnly {
		if err := exp.Device.Flush(); err != nil {
			c.log.Error().Err(err).Msg("flush on disconnect failed")
		}
	}
	c.log.Debug().Bool("graceful", graceful).Msg("client disconnected")
}

// takeThread serves the rest of the connection with blocking reads when a
// P can be spared for it (see blockingConn, ReserveP): GOMAXPROCS-1 such
// goroutines at a time in the process, so one P always stays for handlers
// and the other connections, which stay on Go's poller. Measured on the
// 2-core bench VM (fio's nbd engine, one connection, a busy machine),
// server CPU per request: 4 KiB writes at QD32 5.8-6.7 against 6.6-8.0 us
// through the poller, 1 MiB writes 334-441 against 445-486 us, 4 KiB
// writes at QD1 12-14 against 14-23 us, cached 4 KiB reads at QD32 6-9
// against 12 us. It reports false if the server is stopping.
func (c *conn) takeThread() bool {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.stopping.Load() {
		return false
	}
	if ReserveP() {
		if nc, ok := blocking(c.nc, s.PollWindow); ok {
			c.nc, c.thread = nc, true
		} else {
			ReleaseP()
		}
	}
	return true
}

// negotiate runs the handshake, unless the connection came pre-negotiated.
func (c *conn) negotiate() (*Export, error) {
	if c.exp != nil {
		return c.exp, nil
	}
	bw := bufio.NewWriterSize(c.nc, 4096)
	neg := negotiation{r: c.br, w: bw, exports: c.s.exports}
	return neg.run()
}

// transmit reads requests until DISC, shutdown or a broken stream. It
// reports whether the end was orderly (DISC or shutdown).
func (c *conn) transmit() (graceful bool) {
	size := uint64(c.exp.Device.Size())
	q, ok := c.exp.Device.(LocalOnly)
	quick := ok && q.LocalOnly()
	ws, ok := c.exp.Device.(WriteSplitter)
	split := quick && ok && ws.SplitWrites()
	cached, _ := c.exp.Device.(CachedReader)
	aw, _ := c.exp.Device.(AsyncWriter)
	if quick {
		aw = nil
		c.plugger, _ = c.exp.Device.(Plugger)
	}
	var h [requestHeaderSize]byte
	lastYield := time.Now()
	defer c.flushHeld()
	defer c.unplug(aw) // held writes must leave: serve waits for their replies
	for {
		// Replies held back for a burst leave before this goroutine can
		// block on the socket.
		if c.br.Buffered() < requestHeaderSize {
			c.unplug(aw)
			c.flushHeld()
			// A reader that serves its requests itself and sleeps in
			// blocking reads (the kernel's sockets) never passes through
			// the scheduler; after 10 ms of that, Go's sysmon treats it
			// as a hog, takes its P in the middle of a syscall and then
			// polls every 20 us for a millisecond or more, over and over.
			// A yield now and then keeps sysmon asleep: in a 1-vCPU TCG
			// VM, 2.9-3.2 against 4.1-5.7 context switches in mirrord per
			// 4 KiB write at QD32 (3.3-3.7 against 4.6-5.2 at QD1).
			if now := time.Now(); now.Sub(lastYield) > yieldEvery {
				lastYield = now
				runtime.Gosched()
			}
		}
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if c.stopping.Load() {
				return true
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.log.Info().Err(err).Msg("connection lost")
			}
			return false
		}
		r := request{TransmissionRequestHeader: protocol.TransmissionRequestHeader{
			RequestMagic: binary.BigEndian.Uint32(h[0:]),
			CommandFlags: binary.BigEndian.Uint16(h[4:]),
			Type:         binary.BigEndian.Uint16(h[6:]),
			Handle:       binary.BigEndian.Uint64(h[8:]),
			Offset:       binary.BigEndian.Uint64(h[16:]),
			Length:       binary.BigEndian.Uint32(h[24:]),
		}}
		if r.RequestMagic != magicRequest {
			// Without a valid magic we cannot find the next request.
			c.log.Warn().Uint32("magic", r.RequestMagic).Msg("bad request magic, closing")
			return false
		}
		if r.Type == CmdDisc {
			return true
		}
		errno := c.check(&r, size)
		// A buffered write on a LocalOnly device is served on the reader
		// (see below), so its payload may stay in the read buffer.
		inlineWrite := quick && r.Type == CmdWrite && r.CommandFlags&CmdFlagFUA == 0
		if r.Type == CmdWrite {
			if errno != 0 {
				// Drain the payload so the stream stays in step, then refuse.
				if _, err := io.CopyN(io.Discard, c.br, int64(r.Length)); err != nil {
					return false
				}
			} else {
				if c.br.Buffered() < int(r.Length) {
					c.unplug(aw)
					c.flushHeld()
				}
				if inlineWrite && c.peekPayload(&r) {
					// Served inline below, before the reader reads on.
				} else {
					if inlineWrite && split {
						c.peekHead(&r)
					}
					r.buf = getBuf(int(r.Length) - len(r.peeked))
					if err := c.readPayload(*r.buf); err != nil {
						putBuf(r.buf)
						c.log.Info().Err(err).Msg("connection lost in write payload")
						return false
					}
				}
			}
		}
		if errno != 0 {
			c.s.stats.errors.Add(1)
			c.reply(r.Handle, errno, nil, false)
			continue
		}
		if cached != nil && r.Type == CmdRead && c.readCached(cached, &r) {
			continue
		}
		if aw != nil && r.Type == CmdWrite && r.CommandFlags&CmdFlagFUA == 0 {
			c.writeAsync(aw, &r)
			continue
		}
		c.handlers.Add(1)
		// A request gets its own goroutine, unless it is a lone read or
		// write on a device that promises never to wait on anything but
		// its disk: then serving it here saves a goroutine start and the
		// wake-up of another thread, which measured 14 against 35 us of
		// CPU per 4 KiB write at queue depth 1. On any other device a
		// request served here could stall the next ones (a replicated
		// write waiting for its peer).
		//
		// On such a device a buffered (non-FUA) write is always served
		// here, its reply held until the burst of requests already read
		// is done: a burst then costs one read and one write syscall and
		// no goroutines, as in a threaded C server's worker loop.
		lone := c.br.Buffered() == 0 && c.active.Load() == 0
		if inlineWrite || (quick && r.Type == CmdRead && lone) {
			// Served before the next request is read: nothing to budget.
			r.inline = true
			c.plugBurst(&r)
			c.active.Add(1)
			c.handle(&r)
			_, _ = c.br.Discard(r.discard) // buffered: cannot fail
			continue
		}
		r.cost = max(int64(r.Length), minRequestCost)
		c.acquire(aw, r.cost)
		c.active.Add(1)
		// A copy for the goroutine, so that r itself stays on the stack:
		// requests served here allocate nothing (a heap request per
		// request was most of the garbage at 150k requests/s).
		rc := new(request)
		*rc = r
		go c.handle(rc)
	}
}

// peekPayload points r.peeked at a write's payload where it lies in the read
// buffer, when all of it is there: a write served inline is done with it
// before the reader reads on, so the copy into a request buffer is saved.
// A burst of large writes fills the read buffer with whole payloads (the
// kernel's client sends 128 KiB requests): that copy was a fifth of
// mirrord's CPU on 1 MiB writes in a 1-vCPU TCG VM, and 8% on 4 KiB
// writes at QD32.
func (c *conn) peekPayload(r *request) bool {
	n := int(r.Length)
	if c.br.Buffered() < n {
		return false
	}
	p, err := c.br.Peek(n)
	if err != nil {
		return false
	}
	r.peeked, r.discard = p, n
	return true
}

// peekHead points r.peeked at the head of a large write's payload that
// lies in the read buffer, up to a 4 KiB boundary of the volume (a page
// written in two parts could cost the page cache a read), and skips it in
// the buffer; the rest is read into a request buffer. The head is not
// overwritten before the request is served: readPayload takes the rest
// from the buffer and then from the socket, and the buffer refills only
// at the next header. fio's nbd engine sends 1 MiB writes whole, and the
// read buffer holds the first 256 KiB of each: copying it was a quarter
// of a copy of every byte.
func (c *conn) peekHead(r *request) {
	end := (int64(r.Offset) + int64(c.br.Buffered())) &^ (4096 - 1)
	n := end - int64(r.Offset)
	// A rest under directPayload would be read through the buffer, whose
	// refill would overwrite the head.
	if n < directPayload || int64(r.Length)-n < directPayload {
		return
	}
	p, err := c.br.Peek(int(n))
	if err != nil {
		return
	}
	_, _ = c.br.Discard(int(n))
	r.peeked = p
}

// readPayload reads a write's payload into p. What the read buffer holds
// is copied; the rest of a large payload is read from the socket straight
// into p, not through the read buffer and a second copy (bufio does that
// by itself only for reads larger than its buffer). The kernel's client
// sends a 1 MiB write as 128 KiB requests: in a 1-vCPU TCG VM, 28-29
// against 39-84 context switches per 1 MiB write. Small payloads still go
// through the buffer, which takes a burst of them in one read.
func (c *conn) readPayload(p []byte) error {
	if len(p) < directPayload {
		_, err := io.ReadFull(c.br, p)
		return err
	}
	if b := c.br.Buffered(); b > 0 {
		n, _ := c.br.Read(p[:min(len(p), b)]) // no syscall: only what is buffered
		p = p[n:]
	}
	if len(p) == 0 {
		return nil
	}
	_, err := io.ReadFull(connReader{c}, p)
	return err
}

// readCached answers a read on the reader when the device has its data in
// memory; it reports false (nothing sent) when the read would block.
func (c *conn) readCached(dev CachedReader, r *request) bool {
	data := getBuf(int(r.Length))
	defer putBuf(data)
	ok, err := dev.ReadCached(*data, int64(r.Offset))
	if !ok && err == nil {
		return false
	}
	st := &c.s.stats
	st.reads.Add(1)
	st.bytesRead.Add(uint64(r.Length))
	if err != nil {
		st.errors.Add(1)
		c.log.Warn().Err(err).Uint64("offset", r.Offset).Uint32("length", r.Length).Msg("read failed")
		c.reply(r.Handle, errnoOf(err), nil, true)
		return true
	}
	c.reply(r.Handle, 0, *data, true)
	return true
}

// check validates a request against the export; it returns the NBD error
// to answer with, or 0.
func (c *conn) check(r *request, size uint64) uint32 {
	var allowed uint16
	switch r.Type {
	case CmdRead, CmdWrite:
		// FUA is valid on every command and must be accepted even where
		// it means nothing (the spec; clients do set it on reads).
		allowed = CmdFlagFUA
	case CmdFlush:
		allowed = CmdFlagFUA
		if r.Offset != 0 || r.Length != 0 {
			return ErrnoInval
		}
	case CmdTrim:
		allowed = CmdFlagFUA
	case CmdWriteZeroes:
		allowed = CmdFlagFUA | CmdFlagNoHole
	default:
		return ErrnoInval
	}
	if r.CommandFlags&^allowed != 0 {
		return ErrnoInval
	}
	if r.Type == CmdFlush {
		return 0
	}
	if c.exp.ReadOnly && r.Type != CmdRead {
		return ErrnoPerm
	}
	if (r.Type == CmdRead || r.Type == CmdWrite) && r.Length > MaxPayload {
		return ErrnoInval
	}
	if r.Length == 0 {
		return ErrnoInval
	}
	if r.Offset > size || uint64(r.Length) > size-r.Offset {
		if r.Type == CmdWrite || r.Type == CmdWriteZeroes {
			return ErrnoNoSpace // as the spec asks for writes past the end
		}
		return ErrnoInval
	}
	return 0
}

func (c *conn) handle(r *request) {
	defer c.handlers.Done()
	defer c.active.Add(-1)
	dev := c.exp.Device
	off, n := int64(r.Offset), int64(r.Length)
	fua := r.CommandFlags&CmdFlagFUA != 0
	st := &c.s.stats
	var err error
	var data *[]byte
	switch r.Type {
	case CmdRead:
		data = getBuf(int(n))
		err = dev.ReadAt(*data, off)
		st.reads.Add(1)
		st.bytesRead.Add(uint64(n))
	case CmdWrite:
		if r.peeked != nil {
			err = dev.WriteAt(r.peeked, off, fua)
		}
		if r.buf != nil {
			if err == nil {
				err = dev.WriteAt(*r.buf, off+int64(len(r.peeked)), fua)
			}
			putBuf(r.buf)
		}
		st.writes.Add(1)
		st.bytesWritten.Add(uint64(n))
		if fua {
			st.fuas.Add(1)
		}
	case CmdFlush:
		err = dev.Flush()
		st.flushes.Add(1)
	case CmdTrim:
		if t, ok := dev.(Trimmer); ok {
			err = t.Trim(off, n, fua)
		} else if fua {
			err = dev.Flush()
		}
		st.trims.Add(1)
	case CmdWriteZeroes:
		err = writeZeroes(dev, off, n, r.CommandFlags&CmdFlagNoHole == 0, fua)
		st.zeroes.Add(1)
	}
	c.complete(r, err, data, r.inline)
}

// complete answers a served request (with data, unless it failed), logs
// and counts a failure, and gives back the request's budget.
func (c *conn) complete(r *request, err error, data *[]byte, hold bool) {
	errno := uint32(0)
	if err != nil {
		errno = errnoOf(err)
		c.s.stats.errors.Add(1)
		c.log.Warn().Err(err).Uint16("cmd", r.Type).Uint64("offset", r.Offset).Uint32("length", r.Length).
			Uint32("nbd_errno", errno).Msg("request failed")
	}
	if data != nil {
		if errno == 0 {
			c.reply(r.Handle, 0, *data, hold)
		} else {
			c.reply(r.Handle, errno, nil, hold)
		}
		putBuf(data)
	} else {
		c.reply(r.Handle, errno, nil, hold)
	}
	// The request counts against the budget until its reply is written:
	// a client that does not read replies must stop the reader, not leave
	// read data piling up in handlers waiting to write it.
	if r.cost > 0 {
		c.budget.release(r.cost)
	}
}

// zeroChunk is the most zero data writeZeroes sends per WriteAt when the
// device has no Zeroer.
const zeroChunk = 1 << 20

var zeroes = make([]byte, zeroChunk)

func writeZeroes(dev Device, off, n int64, mayUnmap, fua bool) error {
	if z, ok := dev.(Zeroer); ok {
		return z.WriteZeroes(off, n, mayUnmap, fua)
	}
	for n > 0 {
		k := min(n, zeroChunk)
		if err := dev.WriteAt(zeroes[:k], off, fua); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// reply sends one simple reply. Under load many replies share a syscall:
// while one goroutine writes a batch, the others append to the next one.
// A reader too slow to take replies is pushed back on (maxPendingReplies),
// so replies cannot pile up in memory.
func (c *conn) reply(cookie uint64, errno uint32, data []byte, hold bool) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for c.werr == nil && c.flushing && len(c.wbuf) >= maxPendingReplies {
		c.wcond.Wait()
	}
	if c.werr != nil {
		return
	}
	large := len(data) >= directReply
	// Large data goes out in place (writev), so its header must be the
	// last bytes of the batch: wait for the writer first.
	for large && c.flushing && c.werr == nil {
		c.wcond.Wait()
	}
	if c.werr != nil {
		return
	}
	var h [replyHeaderSize]byte
	binary.BigEndian.PutUint32(h[0:], magicReply)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], cookie)
	c.wbuf = append(c.wbuf, h[:]...)
	if large {
		c.flushLocked(data)
		return
	}
	c.wbuf = append(c.wbuf, data...)
	if !c.flushing && (!hold || len(c.wbuf) >= maxPendingReplies) {
		c.flushLocked(nil)
	} else if hold {
		c.held.Add(1)
	}
}

// flushHeld sends replies held back for a burst, unless a writer is
// already at it.
func (c *conn) flushHeld() {
	if c.held.Load() == 0 {
		return
	}
	c.wmu.Lock()
	c.held.Store(0)
	defer c.wmu.Unlock()
	c.flushIdleLocked()
}

// flushIdleLocked writes the buffered replies unless a flusher is at
// work (it takes them along). wmu is held.
func (c *conn) flushIdleLocked() {
	if !c.flushing && len(c.wbuf) > 0 && c.werr == nil {
		c.flushLocked(nil)
	}
}

// drainReplies sends every buffered reply, held or not, waiting for a
// flush in progress first.
func (c *conn) drainReplies() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for c.flushing && c.werr == nil {
		c.wcond.Wait()
	}
	c.flushIdleLocked()
}

// flushLocked writes pending batches (the first followed by extra, if
// any) until none is left. wmu is held on entry and exit.
func (c *conn) flushLocked(extra []byte) {
	c.flushing = true
	for len(c.wbuf) > 0 && c.werr == nil {
		buf := c.wbuf
		c.wbuf = c.walt[:0]
		c.wmu.Unlock()
		var err error
		if extra != nil {
			bufs := net.Buffers{buf, extra}
			_, err = bufs.WriteTo(c.nc)
			extra = nil
		} else {
			_, err = c.nc.Write(buf)
		}
		c.wmu.Lock()
		c.walt = buf[:0]
		if err != nil {
			c.werr = err
			// The client is gone; closing the socket stops the reader too.
			_ = c.nc.Close()
		}
		c.wcond.Broadcast()
	}
	c.flushing = false
	c.wcond.Broadcast()
}
