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

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/internal/busypoll"
	"github.com/mirrord/mirrord/wan"
)

// Mode is a peer's replication protocol.
type Mode uint8

// Replication modes, in DRBD's terms.
const (
	// ModeSync is protocol C: a write completes when both disks have it.
	ModeSync Mode = iota
	// ModeAsync is protocol A: a write completes locally and is shipped in
	// order; the peer's disk is always a prefix of the write history.
	ModeAsync
)

func (m Mode) String() string {
	if m == ModeAsync {
		return "async"
	}
	return "sync"
}

// OnDisconnect is what a Primary does with writes while its peer is away.
type OnDisconnect uint8

// Policies for writes while the peer is unreachable.
const (
	// KeepServing records writes in the bitmap and resyncs them later
	// (DRBD's default; the peer is Outdated meanwhile).
	KeepServing OnDisconnect = iota
	// SuspendIO holds writes until the peer is back (zero divergence, at
	// the price of availability).
	SuspendIO
)

// Defaults for PeerConfig.
const (
	// DefaultPeerTimeout is how long a missing ack or a silent link is
	// tolerated before the peer is declared lost (DRBD: timeout 6 s).
	DefaultPeerTimeout  = 6 * time.Second
	DefaultPingInterval = 1 * time.Second
	DefaultConnectRetry = 1 * time.Second
	// DefaultAsyncWindow bounds the bytes shipped but not yet acknowledged
	// in async mode; past it the primary goes Ahead (bitmap only).
	DefaultAsyncWindow = 64 << 20
	// DefaultResyncMinRate is the resync rate kept up while applications
	// write (DRBD's c-min-rate idea: resync yields, but never stops).
	DefaultResyncMinRate = 32 << 20
	// DefaultResyncWindow is the resync data in flight, enough to keep a
	// LAN pipe full.
	DefaultResyncWindow = 32 << 20
	// resyncChunk is a resync frame's most data on an uncapped link: 4
	// MiB measured 480-556 -> 539-661 MiB/s for a full 1 GiB resync over
	// loopback against 1 MiB (fewer frames, acks and direct writes on the
	// target, which keeps one receive buffer). Where a cap paces resync
	// (peer.resync-max-rate, peer.rate-limit) frames stay at
	// resyncChunkCapped, so that pacing and progress stay fine-grained and
	// a live write queues behind less resync data.
	resyncChunk       = 4 << 20
	resyncChunkCapped = 1 << 20
	verifyChunk       = 1 << 20
	handshakeTimeout  = 10 * time.Second
)

// PeerConfig describes the one peer a volume replicates with.
type PeerConfig struct {
	// Node is the peer's node name; it must differ from ours.
	Node string
	// Address is the peer's replication address (host:port) we dial.
	Address string
	// Listen is where we accept the peer's connection (host:port).
	Listen string
	// Secret authenticates both sides (HMAC challenge-response).
	Secret []byte
	Mode   Mode
	// Timeout, PingInterval, ConnectRetry: see the Default constants.
	Timeout      time.Duration
	PingInterval time.Duration
	ConnectRetry time.Duration
	AsyncWindow  int64
	OnDisconnect OnDisconnect
	// ResyncMaxRate caps resync bandwidth in bytes/s (0: unlimited);
	// ResyncMinRate is what resync keeps while applications write.
	ResyncMaxRate int64
	ResyncMinRate int64
	ResyncWindow  int64
	// JournalPath is the async journal's file (MetaPath + ".journal" if
	// empty); JournalSize its ring (DefaultJournalSize if 0, no journal
	// if negative: a full window then goes Ahead at once).
	JournalPath string
	JournalSize int64
	// MaxLagBytes and MaxLagTime bound how far an async peer may fall
	// behind (0: unbounded); LagPolicy says what happens past the bound.
	MaxLagBytes int64
	MaxLagTime  time.Duration
	LagPolicy   LagPolicy
	// TLS, if set, runs the link in TLS 1.3 with mutual certificates
	// (wan.LoadTLS); both nodes must agree.
	TLS *tls.Config
	// Compress asks the peer for zstd-compressed data frames; they are used
	// when both sides ask.
	Compress bool
	// RateLimit caps the bytes/s this node sends to the peer, on the wire
	// (0: unlimited); ResyncShare is the percentage of it resync keeps while
	// live writes flow (DefaultResyncShare if 0). Volume.SetPeerRateLimit
	// changes both at runtime.
	RateLimit   int64
	ResyncShare int
	// UndoMaxSize caps the undo log a sync target keeps during a catch-up
	// (DefaultUndoMaxSize if 0, no cap if negative). A resync region that
	// would take it past the cap is refused and the session ends with
	// ErrUndoFull: the catch-up pauses, the image stays recoverable.
	UndoMaxSize int64
	// BusyPoll is how long the link's reader polls the socket before it
	// blocks while frames are flowing (busypoll.DefaultWindow if 0, never
	// if negative).
	BusyPoll time.Duration
	// Dial connects to Address (net.Dialer by default); tests inject
	// faults here.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

func (c *PeerConfig) fillDefaults() {
	if c.BusyPoll == 0 {
		c.BusyPoll = busypoll.DefaultWindow
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultPeerTimeout
	}
	if c.PingInterval == 0 {
		c.PingInterval = DefaultPingInterval
	}
	if c.ConnectRetry == 0 {
		c.ConnectRetry = DefaultConnectRetry
	}
	if c.AsyncWindow == 0 {
		c.AsyncWindow = DefaultAsyncWindow
	}
	if c.ResyncMinRate == 0 {
		c.ResyncMinRate = DefaultResyncMinRate
	}
	if c.ResyncWindow == 0 {
		c.ResyncWindow = DefaultResyncWindow
	}
	if c.JournalSize == 0 {
		c.JournalSize = DefaultJournalSize
	}
	if c.ResyncShare == 0 {
		c.ResyncShare = DefaultResyncShare
	}
	if c.UndoMaxSize == 0 {
		c.UndoMaxSize = DefaultUndoMaxSize
	}
	if c.Dial == nil {
		var d net.Dialer
		c.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}
	}
}

// ConnState is the connection state, as DRBD names it.
type ConnState string

// Connection states.
const (
	ConnStandAlone ConnState = "StandAlone"
	ConnConnecting ConnState = "Connecting"
	ConnConnected  ConnState = "Connected"
)

// ReplState is the replication state, as DRBD names it.
type ReplState string

// Replication states.
const (
	ReplOff         ReplState = "Off"
	ReplEstablished ReplState = "Established"
	ReplSyncSource  ReplState = "SyncSource"
	ReplSyncTarget  ReplState = "SyncTarget"
	ReplAhead       ReplState = "Ahead"
	ReplBehind      ReplState = "Behind"
	ReplVerifyS     ReplState = "VerifyS"
	ReplVerifyT     ReplState = "VerifyT"
)

// receiving: this disk is a resync's target, from the connection
// (SyncTarget) or in a catch-up after the source went Ahead (Behind).
func (r ReplState) receiving() bool { return r == ReplSyncTarget || r == ReplBehind }

// errDisconnected completes transfer-log entries when a session ends.
var errDisconnected = errors.New("peer disconnected")

// link owns the relationship with the peer across connections: it dials
// or accepts, runs one session at a time, and reconnects.
type link struct {
	v   *Volume
	cfg PeerConfig
	log zerolog.Logger
	ln  net.Listener

	mu         sync.Mutex
	cond       sync.Cond               // session changes, for SuspendIO waiters
	sess       atomic.Pointer[session] // the live session; read without mu on every write
	conn       ConnState
	standalone bool   // stopped reconnecting: split brain or operator
	reason     string // why the last session ended or was refused
	peerHello  *wan.Hello
	splitBrain bool
	stream     streamState

	incoming chan net.Conn
	kick     chan struct{}
	quit     chan struct{}
	wg       sync.WaitGroup

	stats linkStats

	// journal is the async write journal (nil in sync mode or disabled).
	journal *journal
	// behindSince is when the peer first lacked a write the bitmap
	// tracks (unix nanos, 0 when it lacks none), for the lag's age.
	behindSince atomic.Int64
	lagG        lagGuard

	shaper *shaper
	zstd   *wan.Compressor // shared by the link's sessions, for the ratio in status
	// noOptional: the peer refused a Hello with optional flags (a build
	// from before they were ignored); later Hellos carry none.
	noOptional atomic.Bool
}

type linkStats struct {
	sentBytes, resyncBytes, recvBytes atomic.Uint64
	sessions                          atomic.Uint64
}

func newLink(v *Volume, cfg PeerConfig) (*link, error) {
	cfg.fillDefaults()
	if cfg.Node == "" || cfg.Node == v.node {
		return nil, fmt.Errorf("peer node name %q must be set and differ from ours (%q)", cfg.Node, v.node)
	}
	if len(cfg.Secret) == 0 {
		return nil, errors.New("peer secret must be set")
	}
	if cfg.Address == "" && cfg.Listen == "" {
		return nil, errors.New("peer needs an address to dial or a listen address")
	}
	l := &link{
		v: v, cfg: cfg, conn: ConnConnecting,
		log:      v.log.With().Str("peer", cfg.Node).Logger(),
		incoming: make(chan net.Conn), kick: make(chan struct{}, 1), quit: make(chan struct{}),
		shaper: newShaper(cfg.RateLimit, cfg.ResyncShare), zstd: wan.NewCompressor(),
	}
	if v.meta != nil {
		l.stream.applied = v.meta.snapshot().stream
	}
	if cfg.RateLimit < 0 || cfg.ResyncShare < 0 || cfg.ResyncShare > 100 {
		return nil, fmt.Errorf("%w: rate limit %d bytes/s, resync share %d%%", ErrBadRate, cfg.RateLimit, cfg.ResyncShare)
	}
	l.cond.L = &l.mu
	l.lagG.cond.L = &l.lagG.mu
	if cfg.Mode == ModeAsync && cfg.JournalSize > 0 {
		path := cfg.JournalPath
		if path == "" {
			path = v.meta.metaPath + ".journal"
		}
		// Records a crash left behind may be missing on the peer: their
		// regions join the bitmap before anything else runs.
		folded := int64(0)
		j, err := openJournal(path, cfg.JournalSize, v.dirty, func(off, n int64) {
			v.dirty.Set(off, n)
			folded += n
		})
		if err != nil {
			return nil, err
		}
		if folded > 0 {
			l.log.Warn().Int64("bytes", folded).Msg("journal held unacknowledged writes: folded into the bitmap")
			if err := v.al.persistAll(); err != nil {
				_ = j.close()
				return nil, err
			}
		}
		l.journal = j
	}
	if v.dirty.Count() > 0 {
		l.markBehind()
	}
	if cfg.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			if l.journal != nil {
				_ = l.journal.close()
			}
			return nil, fmt.Errorf("peer listen %s: %w", cfg.Listen, err)
		}
		l.ln = ln
	}
	sb := v.meta.snapshot()
	if sb.flags&flagSplitBrain != 0 {
		l.splitBrain = true
		l.standalone = true
		l.conn = ConnStandAlone
		l.reason = "split brain recorded before restart: resolve with discard-my-data"
	}
	return l, nil
}

func (l *link) start() {
	if l.ln != nil {
		l.wg.Add(1)
		go l.acceptLoop()
	}
	l.wg.Add(1)
	go l.connectLoop()
	if l.bounded() {
		l.wg.Add(1)
		go l.lagLoop()
	}
}

// errClosing ends the session of a volume being closed.
var errClosing = errors.New("volume closing")

// stop ends the loops; connectLoop ends the live session, if any.
func (l *link) stop() {
	close(l.quit)
	if l.ln != nil {
		_ = l.ln.Close()
	}
	l.mu.Lock()
	l.cond.Broadcast()
	l.mu.Unlock()
	l.wg.Wait()
	if l.journal != nil {
		if err := l.journal.close(); err != nil {
			l.log.Error().Err(err).Msg("close journal")
		}
	}
}

func (l *link) acceptLoop() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			select {
			case <-l.quit:
				return
			default:
			}
			l.log.Warn().Err(err).Msg("peer accept failed")
			time.Sleep(l.cfg.ConnectRetry)
			continue
		}
		select {
		case l.incoming <- c:
		case <-l.quit:
			_ = c.Close()
			return
		}
	}
}

// dials reports whether we initiate: both nodes may know each other's
// address, and the lower node name dials so that exactly one connection
// forms.
func (l *link) dials() bool {
	return l.cfg.Address != "" && (l.ln == nil || l.v.node < l.cfg.Node)
}

func (l *link) connectLoop() {
	defer l.wg.Done()
	// closing cancels a dial or a handshake in progress when the volume
	// closes, so that a silent peer cannot hold Close for the handshake
	// timeout.
	closing, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-l.quit:
			cancel()
		case <-closing.Done():
		}
	}()
	for {
		l.mu.Lock()
		standalone := l.standalone
		l.mu.Unlock()
		var c net.Conn
		dialed := l.dials()
		if standalone {
			select {
			case <-l.quit:
				return
			case <-l.kick:
				continue
			case c = <-l.incoming:
				_ = c.Close() // StandAlone: refuse until an operator reconnects
				continue
			}
		}
		if dialed {
			ctx, cancelDial := context.WithTimeout(closing, handshakeTimeout)
			var err error
			c, err = l.cfg.Dial(ctx, l.cfg.Address)
			cancelDial()
			if err != nil {
				l.setReason("connect: " + err.Error())
				if !l.sleep() {
					return
				}
				continue
			}
		} else {
			select {
			case <-l.quit:
				return
			case <-l.kick:
				continue
			case c = <-l.incoming:
			}
		}
		unwatch := context.AfterFunc(closing, func() { _ = c.Close() })
		s, err := l.establish(c, dialed)
		unwatch()
		if err != nil {
			_ = c.Close()
			l.log.Warn().Err(err).Msg("peer connection refused")
			l.setReason(err.Error())
			if !l.sleep() {
				return
			}
			continue
		}
		l.stats.sessions.Add(1)
		s.run()
		// This loop, not stop, ends the session on Close: a session that
		// establishes after stop has looked for one would otherwise run
		// (and hold Close) for as long as the peer stays up.
		select {
		case <-s.done:
		case <-l.quit:
			s.fail(errClosing)
			<-s.done
		}
		l.log.Warn().Str("reason", s.errString()).Msg("peer disconnected")
		l.v.ev.emit("peer", l.v.Status())
		select {
		case <-l.quit:
			return
		default:
		}
	}
}

func (l *link) sleep() bool {
	t := time.NewTimer(l.cfg.ConnectRetry)
	defer t.Stop()
	select {
	case <-l.quit:
		return false
	case <-l.kick:
		return true
	case <-t.C:
		return true
	}
}

func (l *link) setReason(r string) {
	l.mu.Lock()
	changed := l.reason != r
	l.reason = r
	l.mu.Unlock()
	if changed {
		l.v.ev.emit("peer", l.v.Status())
	}
}

// current returns the live session, or nil.
func (l *link) current() *session {
	return l.sess.Load()
}

// replicate performs one write (or zero) on the primary: locally and, while
// a session is up, on the peer.
func (l *link) replicate(o op) error {
	v := l.v
	if err := v.al.begin(o.off, o.n); err != nil {
		return fmt.Errorf("activity log: %w", errors.Join(err, errIO))
	}
	defer v.al.end(o.off, o.n)
	v.rl.lock(o.off, o.n)
	defer v.rl.unlock(o.off, o.n)

	s := l.current()
	if s == nil && l.cfg.OnDisconnect == SuspendIO {
		s = l.waitSession()
	}
	if s != nil {
		if ok, err := s.replicate(o); ok {
			return err
		}
	}
	return l.writeUnreplicated(o)
}

// writeUnreplicated performs o locally with no peer to ship it to: the
// bitmap remembers, under a new generation, and the journal too while it
// keeps the stream (replay.go).
func (l *link) writeUnreplicated(o op) error {
	v := l.v
	if err := v.newGenerationIfNeeded(); err != nil {
		return err
	}
	if l.journal == nil || !l.journal.appendDetached(o, l.warn) {
		v.dirty.Set(o.off, o.n)
	}
	l.markBehind()
	return v.apply(o)
}

// waitSession blocks until a session is up or the volume closes.
func (l *link) waitSession() *session {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.sess.Load() == nil && !l.v.closed.Load() {
		select {
		case <-l.quit:
			return nil
		default:
		}
		l.cond.Wait()
	}
	return l.sess.Load()
}

// flush makes the peer's disk stable too in sync mode; in async mode the
// barrier is shipped in order and not waited for.
func (l *link) flush() {
	if s := l.current(); s != nil {
		s.flush()
	}
}

var errIO = fmt.Errorf("metadata update failed: %w", syscall.EIO)

// PeerListenAddr is the address peers connect to (nil without a listener).
func (v *Volume) PeerListenAddr() net.Addr {
	if v.link == nil || v.link.ln == nil {
		return nil
	}
	return v.link.ln.Addr()
}
