// Package witness is the mirrord witness: the third vote of a two-node
// mirror, run on a third host with `mirrord witness`, and the client that
// asks it (a failover.Voter).
//
// The witness implements the witness contract of package failover for any
// number of volumes: per volume a holder with a lease, the last holder, an
// epoch counter and a set of outdated nodes. The counter, the last holder,
// its lease length and the outdated set are written to Config.StateDir
// (atomically, fsynced) before a grant that changed them is sent, so a
// restarted witness never hands out an epoch twice or forgets that a node
// lacks acknowledged writes. A restarted witness gives the last holder a
// full lease again, because it cannot know how much of the old one is left.
//
// Lease time is the witness's own monotonic clock; the nodes' clocks matter
// only for the replay window (Config.MaxSkew), which needs them within that
// much of the witness's wall clock.
//
// Requests and replies are single UDP datagrams authenticated with an
// HMAC-SHA256 under a shared secret (see wire.go). UDP because a vote is a
// single round trip that the client retransmits on its own schedule, with
// no connection state to go stale across a partition.
package witness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Defaults.
const (
	DefaultListen   = ":7790"
	DefaultStateDir = "/var/lib/mirrord/witness"
	// DefaultLeaseTTL is used when a client sends no TTL: the LAN
	// detection timeout (failover.DefaultLAN().LeaseTTL()).
	DefaultLeaseTTL = 2 * time.Second
	// DefaultMaxLeaseTTL bounds what a client may ask for, so that a
	// misconfigured node cannot block failover for hours.
	DefaultMaxLeaseTTL = 5 * time.Minute
	// DefaultMaxSkew is the replay window: requests stamped further from
	// the witness's wall clock are refused. NTP keeps hosts far closer;
	// the window only has to outlast a captured datagram's usefulness.
	DefaultMaxSkew = 30 * time.Second
	// MinSecret is the shortest shared secret accepted.
	MinSecret = 16
)

// Config configures a Server.
type Config struct {
	// Listen is the UDP address to serve on (host:port).
	Listen string
	// SecretFile holds the shared secret (surrounding white space is
	// ignored); Secret, if set, is used instead (tests).
	SecretFile string
	Secret     []byte
	// StateDir holds the durable state; created if missing.
	StateDir string
	// LeaseTTL is the lease for a request that names none; a request
	// asking for more than MaxLeaseTTL is refused.
	LeaseTTL, MaxLeaseTTL time.Duration
	// MaxSkew is the replay window (see the package doc).
	MaxSkew time.Duration
	// Clock reads the lease clock; default time.Now (monotonic). Tests
	// inject a clock they advance.
	Clock func() time.Time
}

// Defaults returns the default configuration; the caller sets the secret.
func Defaults() Config {
	return Config{Listen: DefaultListen, StateDir: DefaultStateDir, LeaseTTL: DefaultLeaseTTL, MaxLeaseTTL: DefaultMaxLeaseTTL, MaxSkew: DefaultMaxSkew}
}

// ErrConfig is wrapped by configuration errors; the message names the field.
var ErrConfig = errors.New("witness config")

// LoadSecret reads a shared secret file. The same file is given to the
// witness and to every node that uses it.
func LoadSecret(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: secret file: %v", ErrConfig, err)
	}
	s := []byte(strings.TrimSpace(string(b)))
	if len(s) < MinSecret {
		return nil, fmt.Errorf("%w: secret file %s: %d bytes, at least %d needed", ErrConfig, path, len(s), MinSecret)
	}
	return s, nil
}

// Server is a running witness.
type Server struct {
	cfg    Config
	log    zerolog.Logger
	secret []byte
	conn   *net.UDPConn

	mu     sync.Mutex
	ledger *ledger
	seen   replayCache
}

// NewServer validates cfg, loads the state and binds the socket; Serve or
// ListenAndServe then answers requests.
func NewServer(cfg Config, log zerolog.Logger) (*Server, error) {
	d := Defaults()
	if cfg.Listen == "" {
		cfg.Listen = d.Listen
	}
	if cfg.StateDir == "" {
		cfg.StateDir = d.StateDir
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = d.LeaseTTL
	}
	if cfg.MaxLeaseTTL == 0 {
		cfg.MaxLeaseTTL = d.MaxLeaseTTL
	}
	if cfg.MaxSkew == 0 {
		cfg.MaxSkew = d.MaxSkew
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	switch {
	case cfg.LeaseTTL < 0 || cfg.LeaseTTL > cfg.MaxLeaseTTL:
		return nil, fmt.Errorf("%w: LeaseTTL: %v must be positive and at most MaxLeaseTTL %v", ErrConfig, cfg.LeaseTTL, cfg.MaxLeaseTTL)
	case cfg.MaxSkew < 0:
		return nil, fmt.Errorf("%w: MaxSkew: %v is negative", ErrConfig, cfg.MaxSkew)
	}
	secret := cfg.Secret
	if secret == nil {
		if cfg.SecretFile == "" {
			return nil, fmt.Errorf("%w: SecretFile: the witness needs a shared secret", ErrConfig)
		}
		var err error
		if secret, err = LoadSecret(cfg.SecretFile); err != nil {
			return nil, err
		}
	} else if len(secret) < MinSecret {
		return nil, fmt.Errorf("%w: Secret: %d bytes, at least %d needed", ErrConfig, len(secret), MinSecret)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: StateDir: %v", ErrConfig, err)
	}
	l, err := loadLedger(cfg.StateDir, cfg.Clock())
	if err != nil {
		return nil, err
	}
	addr, err := net.ResolveUDPAddr("udp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("%w: Listen: %v", ErrConfig, err)
	}
	conn, err := net.ListenUDP("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("witness listen: %w", err)
	}
	s := &Server{cfg: cfg, log: log, secret: secret, conn: conn, ledger: l}
	log.Info().Str("listen", conn.LocalAddr().String()).Str("state", cfg.StateDir).Int("volumes", len(l.vols)).Msg("witness ready")
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.conn.LocalAddr() }

// ListenAndServe runs a witness with cfg until ctx ends.
func ListenAndServe(ctx context.Context, cfg Config, log zerolog.Logger) error {
	s, err := NewServer(cfg, log)
	if err != nil {
		return err
	}
	return s.Serve(ctx)
}

// Serve answers requests until ctx ends or Close; it closes the socket.
func (s *Server) Serve(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer stop()
	defer s.conn.Close()
	buf := make([]byte, MaxDatagram+1)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("witness read: %w", err)
		}
		if reply := s.Handle(buf[:n]); reply != nil {
			if _, err := s.conn.WriteToUDPAddrPort(reply, from); err != nil {
				s.log.Warn().Err(err).Str("to", from.String()).Msg("reply not sent")
			}
		}
	}
}

// Close stops Serve.
func (s *Server) Close() error { return s.conn.Close() }

// Handle answers one datagram; nil means no answer (it was not an
// authenticated request: answering would help a prober, and the client
// reports the silence). Safe for concurrent use.
func (s *Server) Handle(p []byte) []byte {
	r, err := DecodeRequest(p, s.secret)
	if err != nil {
		s.log.Warn().Err(err).Int("bytes", len(p)).Msg("request dropped")
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	wall := time.Now()
	if reply, ok := s.seen.get(r.Nonce, wall); ok {
		return reply
	}
	rep := s.answer(r, wall)
	rep.Nonce, rep.Time = r.Nonce, wall
	b := AppendReply(nil, &rep, s.secret)
	if rep.Status != StatusClockSkew {
		s.seen.put(r.Nonce, b, wall, 2*s.cfg.MaxSkew)
	}
	return b
}

func (s *Server) answer(r *Request, wall time.Time) Reply {
	log := s.log.With().Str("volume", r.Volume).Str("node", r.Node).Stringer("op", r.Op).Logger()
	if skew := wall.Sub(r.Time); skew > s.cfg.MaxSkew || skew < -s.cfg.MaxSkew {
		log.Warn().Dur("skew", skew).Msg("request refused: clock skew beyond the replay window")
		return Reply{Status: StatusClockSkew, Message: fmt.Sprintf("request time is %v off the witness's clock (window %v)", skew, s.cfg.MaxSkew)}
	}
	if msg := badRequest(r); msg != "" {
		log.Warn().Str("problem", msg).Msg("request refused")
		return Reply{Status: StatusBadRequest, Message: msg}
	}
	ttl := r.TTL
	if ttl == 0 {
		ttl = s.cfg.LeaseTTL
	}
	if ttl > s.cfg.MaxLeaseTTL {
		// Refused, not capped: a node that believes its lease longer
		// than the witness keeps it could serve on after the witness has
		// handed the vote to its peer.
		log.Warn().Dur("lease", ttl).Dur("max", s.cfg.MaxLeaseTTL).Msg("request refused: lease too long")
		return Reply{Status: StatusBadRequest, Message: fmt.Sprintf("lease %v exceeds the witness's maximum %v", ttl, s.cfg.MaxLeaseTTL)}
	}
	now := s.cfg.Clock()
	switch r.Op {
	case OpVote:
		prev := *s.ledger.vol(r.Volume)
		a, err := s.ledger.vote(now, r, ttl)
		if err != nil {
			log.Error().Err(err).Msg("vote not granted: state not saved")
			return Reply{Status: StatusInternal, Message: err.Error()}
		}
		if a.granted && (prev.holder != r.Node || prev.epoch != a.epoch || !now.Before(prev.expiry)) {
			log.Info().Uint64("epoch", a.epoch).Bool("peer_outdated", a.peerOutdated).Msg("vote granted")
		}
		return Reply{Granted: a.granted, Holder: a.holder, Epoch: a.epoch, Outdated: a.outdated, PeerOutdated: a.peerOutdated}
	default: // OpRelease
		if err := s.ledger.release(now, r.Volume, r.Node, r.Peer, ttl); err != nil {
			if errors.Is(err, errNotHolder) {
				v := s.ledger.vol(r.Volume)
				return Reply{Status: StatusNotHolder, Holder: v.holder, Epoch: v.epoch, Message: fmt.Sprintf("%s does not hold the vote", r.Node)}
			}
			log.Error().Err(err).Msg("release refused: state not saved")
			return Reply{Status: StatusInternal, Message: err.Error()}
		}
		v := s.ledger.vol(r.Volume)
		log.Info().Str("to", r.Peer).Uint64("epoch", v.epoch).Msg("vote released")
		return Reply{Granted: true, Holder: v.holder, Epoch: v.epoch}
	}
}

func badRequest(r *Request) string {
	switch {
	case r.Op != OpVote && r.Op != OpRelease:
		return fmt.Sprintf("unknown op %d", r.Op)
	case r.Volume == "":
		return "volume name empty"
	case r.Node == "":
		return "node name empty"
	case r.Peer == "":
		return "peer name empty"
	case r.Node == r.Peer:
		return fmt.Sprintf("node and peer are both %q", r.Node)
	}
	return ""
}

// replayCache remembers the replies to recent nonces, for as long as a
// request with that nonce could still pass the time check.
type replayCache struct {
	m     map[[NonceSize]byte][]byte
	order []cacheEntry
}

type cacheEntry struct {
	nonce [NonceSize]byte
	until time.Time
}

// maxCached bounds the cache; only authenticated requests reach it, so
// only a misbehaving node holding the secret could fill it.
const maxCached = 1 << 16

func (c *replayCache) get(n [NonceSize]byte, now time.Time) ([]byte, bool) {
	for len(c.order) > 0 && (now.After(c.order[0].until) || len(c.order) > maxCached) {
		delete(c.m, c.order[0].nonce)
		c.order = c.order[1:]
	}
	b, ok := c.m[n]
	return b, ok
}

func (c *replayCache) put(n [NonceSize]byte, reply []byte, now time.Time, keep time.Duration) {
	if c.m == nil {
		c.m = map[[NonceSize]byte][]byte{}
	}
	c.m[n] = reply
	c.order = append(c.order, cacheEntry{nonce: n, until: now.Add(keep)})
}
