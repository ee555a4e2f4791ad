package failover

import (
	"context"
	"errors"
)

// Voter is the third vote (the mirrord witness or an etcd lease). Safe for
// concurrent use. Implementations follow the witness contract in the
// package documentation; package failover/votertest checks them against it.
//
// A denied vote is an answer, not an error: Vote returns an error only when
// it got no answer (the witness is unreachable, the request was refused as
// malformed or unauthenticated, ctx ended), and the runner then steps no
// WitnessVote at all, so the machine's quorum evidence simply ages.
type Voter interface {
	// Vote carries out a RequestVote for node (whose peer is peer) on
	// volume; the reply's Now is left zero for the runner to stamp.
	Vote(ctx context.Context, req VoteRequest) (WitnessVote, error)
	// Release hands the vote from node `from` to node `to` (a planned
	// switchover), per the contract's ReleaseVote. It fails with an error
	// wrapping ErrNotHolder when from does not hold an unexpired vote.
	Release(ctx context.Context, volume, from, to string) error
	Close() error
}

// VoteRequest is a RequestVote addressed to a Voter.
type VoteRequest struct {
	Volume, Node, Peer string
	// Epoch is the requesting node's epoch (RequestVote.Epoch).
	Epoch uint64
	// PeerOutdated is the node's claim about Peer (RequestVote.PeerOutdated).
	PeerOutdated bool
}

// ErrNotHolder is wrapped by Voter.Release when the releasing node does not
// hold the vote.
var ErrNotHolder = errors.New("not the holder of the vote")
