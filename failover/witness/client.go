package witness

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/mirrord/mirrord/failover"
)

// Client defaults.
const (
	// DefaultRetry is how often a request is retransmitted while no
	// authenticated reply has come: a lost datagram costs 100 ms, well
	// inside a LAN heartbeat interval.
	DefaultRetry = 100 * time.Millisecond
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = time.Second
)

// Client errors.
var (
	// ErrNoReply: no authenticated reply before the deadline (the witness
	// is down or unreachable, or the secrets differ: the witness does not
	// answer requests it cannot authenticate).
	ErrNoReply = errors.New("witness: no reply")
	// ErrRefused wraps a witness's refusal (clock skew, bad request,
	// state not saved); the message says which.
	ErrRefused = errors.New("witness: request refused")
	// ErrClosed: the client was closed.
	ErrClosed = errors.New("witness: client closed")
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Addr is the witness's UDP address (host:port).
	Addr string
	// Secret is the shared secret (LoadSecret).
	Secret []byte
	// LeaseTTL is the lease asked for: failover.Config.LeaseTTL().
	LeaseTTL time.Duration
	// Retry is the retransmission interval (DefaultRetry); Timeout bounds
	// calls without a deadline (DefaultTimeout).
	Retry, Timeout time.Duration
}

// Client asks a witness. It implements failover.Voter and is safe for
// concurrent use: every call uses its own socket, so replies never cross.
type Client struct {
	cfg    ClientConfig
	closed atomic.Bool
}

var _ failover.Voter = (*Client)(nil)

// NewClient checks cfg; it does not contact the witness.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Retry == 0 {
		cfg.Retry = DefaultRetry
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	switch {
	case cfg.Addr == "":
		return nil, fmt.Errorf("%w: Addr: empty", ErrConfig)
	case len(cfg.Secret) < MinSecret:
		return nil, fmt.Errorf("%w: Secret: %d bytes, at least %d needed", ErrConfig, len(cfg.Secret), MinSecret)
	case cfg.LeaseTTL <= 0 || cfg.LeaseTTL > DefaultMaxLeaseTTL:
		return nil, fmt.Errorf("%w: LeaseTTL: %v must be positive and at most %v", ErrConfig, cfg.LeaseTTL, DefaultMaxLeaseTTL)
	case cfg.Retry < 0 || cfg.Timeout < 0:
		return nil, fmt.Errorf("%w: Retry/Timeout: negative", ErrConfig)
	}
	return &Client{cfg: cfg}, nil
}

// Vote implements failover.Voter.
func (c *Client) Vote(ctx context.Context, req failover.VoteRequest) (failover.WitnessVote, error) {
	rep, err := c.do(ctx, &Request{Op: OpVote, Epoch: req.Epoch, Volume: req.Volume, Node: req.Node, Peer: req.Peer, PeerOutdated: req.PeerOutdated})
	if err != nil {
		return failover.WitnessVote{}, fmt.Errorf("vote for %s on %s: %w", req.Node, req.Volume, err)
	}
	if rep.Status != StatusOK {
		return failover.WitnessVote{}, fmt.Errorf("vote for %s on %s: %w: %s", req.Node, req.Volume, ErrRefused, rep.Message)
	}
	return failover.WitnessVote{Granted: rep.Granted, Holder: rep.Holder, Epoch: rep.Epoch, Outdated: rep.Outdated, PeerOutdated: rep.PeerOutdated}, nil
}

// Release implements failover.Voter.
func (c *Client) Release(ctx context.Context, volume, from, to string) error {
	rep, err := c.do(ctx, &Request{Op: OpRelease, Volume: volume, Node: from, Peer: to})
	if err == nil {
		switch rep.Status {
		case StatusOK:
			return nil
		case StatusNotHolder:
			err = fmt.Errorf("%w (holder %q, epoch %d)", failover.ErrNotHolder, rep.Holder, rep.Epoch)
		default:
			err = fmt.Errorf("%w: %s", ErrRefused, rep.Message)
		}
	}
	return fmt.Errorf("release %s from %s to %s: %w", volume, from, to, err)
}

// Close implements failover.Voter; later calls fail with ErrClosed.
func (c *Client) Close() error {
	c.closed.Store(true)
	return nil
}

// do sends r (with a fresh nonce and the time) and retransmits the same
// datagram every Retry until an authenticated reply to it arrives.
func (c *Client) do(ctx context.Context, r *Request) (*Reply, error) {
	if c.closed.Load() {
		return nil, ErrClosed
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.cfg.Timeout)
		defer cancel()
	}
	r.TTL = c.cfg.LeaseTTL
	r.Time = time.Now()
	if _, err := rand.Read(r.Nonce[:]); err != nil {
		return nil, err
	}
	msg, err := AppendRequest(nil, r, c.cfg.Secret)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", c.cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoReply, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	buf := make([]byte, MaxDatagram+1)
	var lastErr error
	for {
		if _, err := conn.Write(msg); err != nil {
			lastErr = err // e.g. ECONNREFUSED from an earlier send: retry
		}
		next := time.Now().Add(c.cfg.Retry)
		for {
			if ctx.Err() != nil {
				return nil, c.noReply(ctx, lastErr)
			}
			conn.SetReadDeadline(next)
			if ctx.Err() != nil { // AfterFunc may have run before the line above
				return nil, c.noReply(ctx, lastErr)
			}
			n, err := conn.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break // retransmit
				}
				lastErr = err
				if !sleepUntil(ctx, next) {
					return nil, c.noReply(ctx, lastErr)
				}
				break
			}
			rep, err := DecodeReply(buf[:n], c.cfg.Secret)
			if err != nil || rep.Nonce != r.Nonce {
				continue // not ours: keep waiting for the real one
			}
			if rep.Status == StatusClockSkew {
				return nil, fmt.Errorf("%w: clock skew: %s (witness time %v)", ErrRefused, rep.Message, rep.Time.UTC())
			}
			return rep, nil
		}
	}
}

func (c *Client) noReply(ctx context.Context, last error) error {
	if last != nil {
		return fmt.Errorf("%w from %s: %v (last error: %v)", ErrNoReply, c.cfg.Addr, ctx.Err(), last)
	}
	return fmt.Errorf("%w from %s: %v (is the witness up, and is the secret the same?)", ErrNoReply, c.cfg.Addr, ctx.Err())
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	tm := time.NewTimer(time.Until(t))
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}
