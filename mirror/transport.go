package mirror

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/mirrord/mirrord/internal/busypoll"
	"github.com/mirrord/mirrord/wan"
)

// The transport under a session: the bandwidth cap on what this node sends, TLS,
// and the compression both sides negotiated. The session above sees a net.Conn
// and a framed Reader/Writer whatever of these is on.

// DefaultResyncShare is the percentage of a capped link resync keeps while
// application writes are flowing (live writes get the rest; when they are idle
// resync takes the whole cap). 30% finishes a resync in bounded time without
// doubling the latency of live writes queued behind resync data.
const DefaultResyncShare = 30

// ErrBadRate is a rate limit or share out of range.
var ErrBadRate = errors.New("bad rate setting")

const (
	// limitChunk is the most one Write sends before asking the limiter again:
	// a TLS record's worth, so that a changed cap takes effect within
	// milliseconds and live frames interleave with resync data.
	limitChunk = 64 << 10
	// minBurst: the limiter's bucket never holds less than this (it must
	// admit a whole chunk), nor less than 1/10 s at the cap.
	minBurst = 256 << 10
	// liveRecent is how long after a live frame resync stays held to its share.
	liveRecent = 250 * time.Millisecond
)

// shaper caps the bytes this node sends to its peer. It lives as long as the link,
// so a cap set at runtime holds across reconnects.
type shaper struct {
	limit    atomic.Int64 // bytes/s, 0 unlimited
	share    atomic.Int64 // percent
	all      *rate.Limiter
	resync   *rate.Limiter
	lastLive atomic.Int64 // unix nanos of the last live frame sent

	wire, live, resyncM meter
}

func newShaper(limit int64, share int) *shaper {
	s := &shaper{all: rate.NewLimiter(rate.Inf, minBurst), resync: rate.NewLimiter(rate.Inf, minBurst)}
	s.set(limit, share)
	return s
}

// set changes the cap (bytes/s, 0 unlimited) and resync's share (percent, 1..100).
func (s *shaper) set(limit int64, share int) {
	s.limit.Store(limit)
	s.share.Store(int64(share))
	setLimit(s.all, limit)
	setLimit(s.resync, limit*int64(share)/100)
}

func setLimit(l *rate.Limiter, bps int64) {
	if bps <= 0 {
		l.SetLimit(rate.Inf)
		return
	}
	l.SetBurst(int(max(bps/10, minBurst)))
	l.SetLimit(rate.Limit(bps))
}

// note records a frame this node sent, for the rates in status and for resync's
// share.
func (s *shaper) note(t wan.FrameType, n int) {
	switch t {
	case wan.FrameResyncData:
		s.resyncM.add(n)
	case wan.FrameWrite, wan.FrameZero, wan.FrameFlush:
		s.live.add(n)
		s.lastLive.Store(time.Now().UnixNano())
	}
}

// waitResync holds resync data to its share of a capped link while live writes
// are flowing; otherwise the cap on the connection alone applies.
func (s *shaper) waitResync(ctx context.Context, n int64) error {
	if s.limit.Load() <= 0 || time.Since(time.Unix(0, s.lastLive.Load())) > liveRecent {
		return nil
	}
	for n > 0 {
		k := min(n, limitChunk)
		if err := s.resync.WaitN(ctx, int(k)); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// limitedConn applies the cap to writes; Close also ends a wait for tokens.
type limitedConn struct {
	net.Conn
	poll   *busypoll.Poller // nil: reads only block
	s      *shaper
	ctx    context.Context
	cancel context.CancelFunc
}

func (s *shaper) wrap(c net.Conn) *limitedConn {
	ctx, cancel := context.WithCancel(context.Background())
	return &limitedConn{Conn: c, s: s, ctx: ctx, cancel: cancel}
}

// busyPoll makes reads poll the socket for up to w while frames are
// flowing (busypoll); w <= 0, or a conn without a socket, never polls.
func (c *limitedConn) busyPoll(w time.Duration) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		c.poll = busypoll.New(sc, w)
	}
}

// polls reports whether reads poll the socket (busyPoll).
func (c *limitedConn) polls() bool { return c.poll.Polls() }

func (c *limitedConn) Read(p []byte) (int, error) {
	if c.poll == nil {
		return c.Conn.Read(p)
	}
	return c.poll.Read(p, c.Conn.Read)
}

func (c *limitedConn) Write(p []byte) (int, error) {
	if c.s.all.Limit() == rate.Inf {
		// Uncapped: one syscall, however large p is.
		k, err := c.Conn.Write(p)
		c.s.wire.add(k)
		return k, err
	}
	done := 0
	for done < len(p) {
		n := min(len(p)-done, limitChunk)
		if c.s.all.Limit() != rate.Inf {
			if err := c.s.all.WaitN(c.ctx, n); err != nil {
				if c.ctx.Err() != nil {
					return done, net.ErrClosed
				}
				continue // the burst shrank under us: ask again
			}
		}
		k, err := c.Conn.Write(p[done : done+n])
		done += k
		c.s.wire.add(k)
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// WriteBuffers sends a frame batch with its large payloads in place: one
// writev on an uncapped link (the TCP connection's own net.Buffers path),
// else buffer by buffer through Write's limiter.
func (c *limitedConn) WriteBuffers(b *net.Buffers) (int64, error) {
	if c.s.all.Limit() == rate.Inf {
		n, err := b.WriteTo(c.Conn)
		c.s.wire.add(int(n))
		return n, err
	}
	var n int64
	for len(*b) > 0 {
		k, err := c.Write((*b)[0])
		n += int64(k)
		if err != nil {
			return n, err
		}
		*b = (*b)[1:]
	}
	return n, nil
}

func (c *limitedConn) Close() error {
	c.cancel()
	return c.Conn.Close()
}

// secure wraps a fresh connection in the cap and, if configured, TLS, and returns
// the stream to frame and the binding for the handshake. The caller has set the
// handshake deadline on c.
func (l *link) secure(c net.Conn, dialed bool) (raw *limitedConn, stream net.Conn, binding []byte, err error) {
	raw = l.shaper.wrap(c)
	raw.busyPoll(l.cfg.BusyPoll)
	if l.cfg.TLS == nil {
		return raw, raw, nil, nil
	}
	var tc *tls.Conn
	if dialed {
		tc = tls.Client(raw, l.cfg.TLS)
	} else {
		tc = tls.Server(raw, l.cfg.TLS)
	}
	if err := tc.Handshake(); err != nil {
		return raw, nil, nil, fmt.Errorf("TLS handshake with %s: %w", c.RemoteAddr(), wan.TLSError(err))
	}
	binding, err = wan.TLSBinding(tc)
	if err != nil {
		return raw, nil, nil, fmt.Errorf("TLS binding: %w", err)
	}
	return raw, tc, binding, nil
}

// SetPeerRateLimit changes the cap on what this node sends to its peer (bytes/s,
// 0 unlimited) and resync's share of it (percent, 1..100; 0 keeps the current
// share). It takes effect at once, also on a running session, and holds until the
// process restarts (the config file is not rewritten).
func (v *Volume) SetPeerRateLimit(limit int64, share int) error {
	if v.link == nil {
		return ErrNoPeer
	}
	if limit < 0 || share < 0 || share > 100 {
		return fmt.Errorf("%w: rate limit %d bytes/s, resync share %d%%", ErrBadRate, limit, share)
	}
	sh := v.link.shaper
	if share == 0 {
		share = int(sh.share.Load())
	}
	sh.set(limit, share)
	v.link.log.Info().Int64("rate_limit_bytes_per_s", limit).Int("resync_share_percent", share).Msg("peer rate limit changed")
	v.ev.emit("peer", v.Status())
	return nil
}

// meter measures a rate over whole seconds: the rate shown is the average of the
// last meterSpan complete seconds, steady enough to read, recent enough to follow
// a change of cap.
type meter struct {
	mu    sync.Mutex
	sec   [meterSpan + 1]int64 // unix second of each bucket
	bytes [meterSpan + 1]int64
}

const meterSpan = 3

func (m *meter) add(n int) { m.addAt(n, time.Now().Unix()) }

func (m *meter) rate() float64 { return m.rateAt(time.Now().Unix()) }

func (m *meter) addAt(n int, now int64) {
	i := now % int64(len(m.sec))
	m.mu.Lock()
	if m.sec[i] != now {
		m.sec[i], m.bytes[i] = now, 0
	}
	m.bytes[i] += int64(n)
	m.mu.Unlock()
}

// rateAt returns bytes/s over the meterSpan complete seconds before now.
func (m *meter) rateAt(now int64) float64 {
	var sum int64
	m.mu.Lock()
	for i := range m.sec {
		if age := now - m.sec[i]; age >= 1 && age <= meterSpan {
			sum += m.bytes[i]
		}
	}
	m.mu.Unlock()
	return float64(sum) / meterSpan
}
