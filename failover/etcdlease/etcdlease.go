// Package etcdlease is the third vote kept in etcd, for sites that already
// run an etcd cluster: a failover.Voter that implements the witness
// contract of package failover with etcd leases and transactions.
//
// Per volume it keeps two keys under Config.Prefix:
//
//	<prefix><volume>/holder  the holding node's name, attached to an etcd
//	                         lease of Config.LeaseTTL: etcd deletes it when
//	                         the holder stops renewing
//	<prefix><volume>/state   JSON: the epoch counter, the last holder and
//	                         the outdated nodes
//
// Every change is one transaction that compares the revisions of both keys
// as they were read, so two nodes racing for the vote can never both be
// granted: the loser's transaction fails, it reads again and is denied.
// etcd counts lease time on its leader, in whole seconds (a TTL is rounded
// up, which only makes the lease longer, never shorter, so it stays safe),
// and a restarted or newly elected leader extends every lease to its full
// TTL, as the mirrord witness does after a restart.
package etcdlease

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/mirrord/mirrord/failover"
)

// Defaults.
const (
	DefaultPrefix      = "/mirrord/vote/"
	DefaultDialTimeout = 5 * time.Second
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = 2 * time.Second
)

// ErrConfig is wrapped by configuration errors; the message names the field.
var ErrConfig = errors.New("etcdlease config")

// Config configures a Voter.
type Config struct {
	// Endpoints of the etcd cluster (http://host:2379).
	Endpoints []string
	// Prefix of the keys (DefaultPrefix); volumes of different clusters
	// sharing an etcd need different prefixes or volume names.
	Prefix string
	// LeaseTTL is the vote's lease: failover.Config.LeaseTTL(), rounded
	// up to whole seconds.
	LeaseTTL time.Duration
	// DialTimeout bounds the first connection (DefaultDialTimeout).
	DialTimeout time.Duration
	// Timeout bounds Vote and Release when their context has no deadline
	// (DefaultTimeout): etcd's client retries until the context ends.
	Timeout time.Duration
	// Username, Password and TLS are passed to the etcd client.
	Username, Password string
	TLS                *tls.Config
}

// Voter implements failover.Voter on etcd. Safe for concurrent use.
type Voter struct {
	cli     *clientv3.Client
	prefix  string
	ttl     int64 // seconds
	timeout time.Duration
}

var _ failover.Voter = (*Voter)(nil)

// New connects to etcd.
func New(cfg Config) (*Voter, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	switch {
	case len(cfg.Endpoints) == 0:
		return nil, fmt.Errorf("%w: Endpoints: none", ErrConfig)
	case cfg.LeaseTTL <= 0:
		return nil, fmt.Errorf("%w: LeaseTTL: %v is not positive", ErrConfig, cfg.LeaseTTL)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: cfg.Endpoints, DialTimeout: cfg.DialTimeout,
		Username: cfg.Username, Password: cfg.Password, TLS: cfg.TLS,
		// The client's own retry warnings would only repeat, unstructured,
		// what Vote returns as an error.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd %v: %w", cfg.Endpoints, err)
	}
	return &Voter{cli: cli, prefix: cfg.Prefix, ttl: int64(math.Ceil(cfg.LeaseTTL.Seconds())), timeout: cfg.Timeout}, nil
}

// ErrBadRequest: a request that names no volume or node, or the same node
// twice.
var ErrBadRequest = errors.New("etcdlease: bad request")

func (v *Voter) check(ctx context.Context, volume, node, other string) (context.Context, context.CancelFunc, error) {
	switch {
	case volume == "" || node == "" || other == "":
		return nil, nil, fmt.Errorf("%w: volume %q, nodes %q and %q: none may be empty", ErrBadRequest, volume, node, other)
	case node == other:
		return nil, nil, fmt.Errorf("%w: both nodes are %q", ErrBadRequest, node)
	}
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, v.timeout)
	return ctx, cancel, nil
}

// Close implements failover.Voter. Leases are left to run out: closing a
// Primary's voter must not hand the vote away early.
func (v *Voter) Close() error { return v.cli.Close() }

// state is the durable part of a volume's record.
type state struct {
	Epoch    uint64   `json:"epoch"`
	Last     string   `json:"last_holder,omitempty"`
	Outdated []string `json:"outdated,omitempty"`
}

func (s *state) outdated(node string) bool {
	for _, n := range s.Outdated {
		if n == node {
			return true
		}
	}
	return false
}

func (s *state) setOutdated(node string, on bool) {
	out := s.Outdated[:0:0]
	for _, n := range s.Outdated {
		if n != node {
			out = append(out, n)
		}
	}
	if on {
		out = append(out, node)
		sort.Strings(out)
	}
	s.Outdated = out
}

// snapshot is a volume's two keys as read at one revision.
type snapshot struct {
	holder           string
	lease            clientv3.LeaseID
	holderCreate     int64 // 0: no holder
	stateMod         int64 // 0: no state yet
	st               state
	holderKey, stKey string
}

func (v *Voter) read(ctx context.Context, volume string) (*snapshot, error) {
	s := &snapshot{holderKey: v.prefix + volume + "/holder", stKey: v.prefix + volume + "/state"}
	resp, err := v.cli.Txn(ctx).Then(clientv3.OpGet(s.holderKey), clientv3.OpGet(s.stKey)).Commit()
	if err != nil {
		return nil, err
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 1 {
		s.holder, s.lease, s.holderCreate = string(kvs[0].Value), clientv3.LeaseID(kvs[0].Lease), kvs[0].CreateRevision
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 1 {
		s.stateMod = kvs[0].ModRevision
		if err := json.Unmarshal(kvs[0].Value, &s.st); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, s.stKey, err)
		}
	}
	return s, nil
}

// ErrCorrupt: the state key does not hold what this package wrote.
var ErrCorrupt = errors.New("etcdlease: corrupt state")

// unchanged compares both keys with the snapshot.
func (s *snapshot) unchanged() []clientv3.Cmp {
	return []clientv3.Cmp{
		clientv3.Compare(clientv3.CreateRevision(s.holderKey), "=", s.holderCreate),
		clientv3.Compare(clientv3.ModRevision(s.stKey), "=", s.stateMod),
	}
}

// Vote implements failover.Voter.
func (v *Voter) Vote(ctx context.Context, req failover.VoteRequest) (failover.WitnessVote, error) {
	ctx, cancel, err := v.check(ctx, req.Volume, req.Node, req.Peer)
	if err != nil {
		return failover.WitnessVote{}, err
	}
	defer cancel()
	for {
		w, done, err := v.tryVote(ctx, req)
		if err != nil {
			return failover.WitnessVote{}, fmt.Errorf("etcd vote for %s on %s: %w", req.Node, req.Volume, err)
		}
		if done {
			return w, nil
		}
		if err := ctx.Err(); err != nil {
			return failover.WitnessVote{}, fmt.Errorf("etcd vote for %s on %s: %w", req.Node, req.Volume, err)
		}
	}
}

// tryVote makes one attempt; done is false when a concurrent change got in
// the way and the caller must read again.
func (v *Voter) tryVote(ctx context.Context, req failover.VoteRequest) (failover.WitnessVote, bool, error) {
	s, err := v.read(ctx, req.Volume)
	if err != nil {
		return failover.WitnessVote{}, false, err
	}
	if s.holder != "" && s.holder != req.Node {
		return failover.WitnessVote{Holder: s.holder, Epoch: s.st.Epoch, Outdated: s.st.outdated(req.Node), PeerOutdated: s.st.outdated(req.Peer)}, true, nil
	}
	next := s.st
	next.Epoch = max(s.st.Epoch, req.Epoch)
	if s.st.Last != req.Node { // another node, or nobody on record
		next.Epoch++
	}
	next.Last = req.Node
	next.setOutdated(req.Peer, req.PeerOutdated)
	b, err := json.Marshal(next)
	if err != nil {
		return failover.WitnessVote{}, false, err
	}
	var ops []clientv3.Op
	if s.stateMod == 0 || next.Epoch != s.st.Epoch || next.Last != s.st.Last || next.outdated(req.Peer) != s.st.outdated(req.Peer) {
		ops = append(ops, clientv3.OpPut(s.stKey, string(b)))
	}
	lease := s.lease
	if s.holder == req.Node {
		// Renew first: if the lease ran out meanwhile, etcd has deleted
		// the key and the transaction below fails on its revision.
		if _, err := v.cli.KeepAliveOnce(ctx, lease); errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return failover.WitnessVote{}, false, nil
		} else if err != nil {
			return failover.WitnessVote{}, false, err
		}
	} else {
		g, err := v.cli.Grant(ctx, v.ttl)
		if err != nil {
			return failover.WitnessVote{}, false, err
		}
		lease = g.ID
		ops = append(ops, clientv3.OpPut(s.holderKey, req.Node, clientv3.WithLease(lease)))
	}
	resp, err := v.cli.Txn(ctx).If(s.unchanged()...).Then(ops...).Commit()
	if err != nil || !resp.Succeeded {
		if lease != s.lease {
			v.revoke(lease)
		}
		return failover.WitnessVote{}, false, err
	}
	return failover.WitnessVote{Granted: true, Holder: req.Node, Epoch: next.Epoch, Outdated: next.outdated(req.Node), PeerOutdated: next.outdated(req.Peer)}, true, nil
}

// revoke drops a lease this voter granted but did not use (best effort:
// an unused lease holds no key and expires on its own).
func (v *Voter) revoke(id clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	v.cli.Revoke(ctx, id)
}

// Release implements failover.Voter.
func (v *Voter) Release(ctx context.Context, volume, from, to string) error {
	ctx, cancel, err := v.check(ctx, volume, from, to)
	if err != nil {
		return err
	}
	defer cancel()
	for {
		s, err := v.read(ctx, volume)
		if err != nil {
			return fmt.Errorf("etcd release %s from %s to %s: %w", volume, from, to, err)
		}
		if s.holder != from {
			return fmt.Errorf("etcd release %s from %s to %s: %w (holder %q, epoch %d)", volume, from, to, failover.ErrNotHolder, s.holder, s.st.Epoch)
		}
		next := s.st
		next.Epoch++
		next.Last = to
		b, err := json.Marshal(next)
		if err != nil {
			return err
		}
		g, err := v.cli.Grant(ctx, v.ttl)
		if err != nil {
			return fmt.Errorf("etcd release %s from %s to %s: %w", volume, from, to, err)
		}
		resp, err := v.cli.Txn(ctx).If(s.unchanged()...).Then(
			clientv3.OpPut(s.holderKey, to, clientv3.WithLease(g.ID)),
			clientv3.OpPut(s.stKey, string(b)),
		).Commit()
		if err != nil {
			v.revoke(g.ID)
			return fmt.Errorf("etcd release %s from %s to %s: %w", volume, from, to, err)
		}
		if resp.Succeeded {
			v.revoke(s.lease) // now holds no key
			return nil
		}
		v.revoke(g.ID)
	}
}
