package witness

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/mirrord/mirrord/internal/atomicfile"
)

// stateFile is the name of the witness's durable state in Config.StateDir.
const stateFile = "witness.json"

// volume is the witness's record of one volume (see "The witness contract"
// in package failover).
type volume struct {
	// holder holds the vote until expiry (on the witness's monotonic
	// clock); it is not persisted: after a restart the last holder is
	// assumed to hold a full lease again (see load).
	holder string
	expiry time.Time
	// Durable: the epoch counter, the last holder, the lease it was given
	// and the outdated set.
	epoch    uint64
	last     string
	ttl      time.Duration
	outdated map[string]bool
}

// diskState is the persisted form; stable JSON so an operator can read it.
type diskState struct {
	Version int                   `json:"version"`
	Volumes map[string]diskVolume `json:"volumes"`
}

type diskVolume struct {
	Epoch      uint64   `json:"epoch"`
	LastHolder string   `json:"last_holder"`
	LeaseMS    int64    `json:"lease_ms"`
	Outdated   []string `json:"outdated,omitempty"`
}

// ledger applies the witness contract to every volume and keeps it durable.
// Not safe for concurrent use; the server serialises requests.
type ledger struct {
	dir  string
	vols map[string]*volume
}

// answer is the contract's reply.
type answer struct {
	granted, outdated, peerOutdated bool
	holder                          string
	epoch                           uint64
}

// loadLedger reads the state in dir (a missing file is a fresh witness). A
// last holder gets a full lease from now: the witness cannot know how much
// of the lease it granted before the restart is left, and granting the vote
// to another node early would make two Primaries.
func loadLedger(dir string, now time.Time) (*ledger, error) {
	l := &ledger{dir: dir, vols: map[string]*volume{}}
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read witness state: %w", err)
	}
	var s diskState
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrState, filepath.Join(dir, stateFile), err)
	}
	if s.Version != 1 {
		return nil, fmt.Errorf("%w: %s: version %d, want 1", ErrState, filepath.Join(dir, stateFile), s.Version)
	}
	for name, dv := range s.Volumes {
		v := &volume{epoch: dv.Epoch, last: dv.LastHolder, ttl: time.Duration(dv.LeaseMS) * time.Millisecond, outdated: map[string]bool{}}
		for _, n := range dv.Outdated {
			v.outdated[n] = true
		}
		if v.last != "" {
			v.holder, v.expiry = v.last, now.Add(v.ttl)
		}
		l.vols[name] = v
	}
	return l, nil
}

// ErrState means the persisted state is unreadable. The witness refuses to
// start rather than forget epochs and outdated nodes.
var ErrState = errors.New("witness: corrupt state file")

func (l *ledger) vol(name string) *volume {
	v := l.vols[name]
	if v == nil {
		v = &volume{outdated: map[string]bool{}}
		l.vols[name] = v
	}
	return v
}

// vote is RequestVote. The state is persisted before a grant that changed it
// is returned; if that fails the grant is undone and not given.
func (l *ledger) vote(now time.Time, r *Request, ttl time.Duration) (answer, error) {
	v := l.vol(r.Volume)
	if v.holder != "" && v.holder != r.Node && now.Before(v.expiry) {
		return answer{holder: v.holder, epoch: v.epoch, outdated: v.outdated[r.Node], peerOutdated: v.outdated[r.Peer]}, nil
	}
	before := *v
	before.outdated = map[string]bool{r.Peer: v.outdated[r.Peer]}
	epoch := max(v.epoch, r.Epoch)
	if v.last != r.Node { // another node, or nobody on record
		epoch++
	}
	changed := epoch != v.epoch || v.last != r.Node || v.ttl != ttl || v.outdated[r.Peer] != r.PeerOutdated
	v.epoch, v.last, v.ttl = epoch, r.Node, ttl
	v.holder, v.expiry = r.Node, now.Add(ttl)
	setOutdated(v, r.Peer, r.PeerOutdated)
	if changed {
		if err := l.save(); err != nil {
			v.epoch, v.last, v.ttl, v.holder, v.expiry = before.epoch, before.last, before.ttl, before.holder, before.expiry
			setOutdated(v, r.Peer, before.outdated[r.Peer])
			return answer{}, err
		}
	}
	return answer{granted: true, holder: r.Node, epoch: v.epoch, outdated: v.outdated[r.Node], peerOutdated: v.outdated[r.Peer]}, nil
}

// release is ReleaseVote: from must hold an unexpired vote.
func (l *ledger) release(now time.Time, volName, from, to string, ttl time.Duration) error {
	v := l.vol(volName)
	if v.holder != from || !now.Before(v.expiry) {
		return errNotHolder
	}
	before := *v
	v.epoch++
	v.holder, v.last, v.ttl, v.expiry = to, to, ttl, now.Add(ttl)
	if err := l.save(); err != nil {
		v.epoch, v.holder, v.last, v.ttl, v.expiry = before.epoch, before.holder, before.last, before.ttl, before.expiry
		return err
	}
	return nil
}

var errNotHolder = errors.New("not the holder")

func setOutdated(v *volume, node string, on bool) {
	if on {
		v.outdated[node] = true
	} else {
		delete(v.outdated, node)
	}
}

// save writes the state atomically and durably: a temporary file, fsync,
// rename over the old one, fsync of the directory. A crash leaves either
// the old state or the new one.
func (l *ledger) save() error {
	s := diskState{Version: 1, Volumes: map[string]diskVolume{}}
	for name, v := range l.vols {
		dv := diskVolume{Epoch: v.epoch, LastHolder: v.last, LeaseMS: v.ttl.Milliseconds()}
		for n := range v.outdated {
			dv.Outdated = append(dv.Outdated, n)
		}
		sort.Strings(dv.Outdated)
		s.Volumes[name] = dv
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(l.dir, stateFile), append(b, '\n')); err != nil {
		return fmt.Errorf("save witness state: %w", err)
	}
	return nil
}
