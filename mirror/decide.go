package mirror

import "fmt"

// Action is what a connecting pair of nodes must do, from the local node's
// point of view.
type Action uint8

// Actions decided on connect.
const (
	// ActNone: the disks hold the same generation; replicate from here on
	// (a resync may still follow if either bitmap has bits).
	ActNone Action = iota
	// ActSource: this node is the sync source.
	ActSource
	// ActTarget: this node is the sync target.
	ActTarget
	// ActSplitBrain: both sides wrote since they parted. Refused until an
	// operator names the side whose changes are discarded.
	ActSplitBrain
	// ActUnrelated: the generations share no history: another volume's data.
	ActUnrelated
	// ActNoSource: neither side has data anyone can trust (both
	// Inconsistent or never initialised); an operator must force one.
	ActNoSource
	// ActBothPrimary: two primaries; refused.
	ActBothPrimary
	// ActPrimaryBehind: this node is Primary but the peer's data is newer;
	// refused (a Primary never becomes a sync target).
	ActPrimaryBehind
	// ActPeerPrimaryBehind is ActPrimaryBehind from the other side.
	ActPeerPrimaryBehind
)

func (a Action) String() string {
	return [...]string{"none", "sync-source", "sync-target", "split-brain", "unrelated-data",
		"no-sync-source", "both-primary", "primary-behind", "peer-primary-behind"}[a]
}

// nodeState is what each side tells the other in its Hello.
type nodeState struct {
	Name        string
	Role        Role
	Disk        DiskState
	Gen         Generations
	Pristine    bool // created by mirrord, never written: all zeroes
	DiscardMine bool // operator resolved a split brain against this node
	// ResyncHeld: an Inconsistent disk that is the target of an
	// interrupted bitmap resync, its undo log kept (wan.HelloResyncHeld).
	ResyncHeld bool
}

// decision is the outcome of comparing two nodes' states on connect.
type decision struct {
	Action Action
	// Full asks for a full resync (no bitmap relates the two generations).
	Full bool
	// Reason explains the decision for logs and status.
	Reason string
}

// decide compares generation identifiers as DRBD does. It is pure and
// antisymmetric: decide(a, b) is ActSource exactly when decide(b, a) is
// ActTarget, so both nodes reach the same conclusion independently.
func decide(l, p nodeState) decision {
	d := decideRaw(l, p)
	// A Primary serves the volume; it never becomes a sync target.
	switch {
	case d.Action == ActTarget && l.Role == RolePrimary:
		return decision{Action: ActPrimaryBehind, Reason: "peer has newer data than this Primary: " + d.Reason}
	case d.Action == ActSource && p.Role == RolePrimary:
		return decision{Action: ActPeerPrimaryBehind, Reason: "this node has newer data than the Primary peer: " + d.Reason}
	}
	return d
}

func decideRaw(l, p nodeState) decision {
	flip := func(d decision) decision {
		switch d.Action {
		case ActSource:
			d.Action = ActTarget
		case ActTarget:
			d.Action = ActSource
		}
		return d
	}
	if l.Role == RolePrimary && p.Role == RolePrimary {
		return decision{Action: ActBothPrimary, Reason: "both nodes are Primary"}
	}
	if l.Pristine && p.Pristine {
		return decision{Action: ActNone, Reason: "both disks are new and zero-filled"}
	}
	if l.DiscardMine && p.DiscardMine {
		return decision{Action: ActSplitBrain, Reason: "both nodes were told to discard their data"}
	}
	if l.DiscardMine {
		return decision{Action: ActTarget, Full: !sharesBitmapBase(l.Gen, p.Gen),
			Reason: "operator discarded this node's changes"}
	}
	if p.DiscardMine {
		return flip(decideRaw(p, l))
	}
	lData := l.Gen.Current != 0 && l.Disk != DiskInconsistent
	pData := p.Gen.Current != 0 && p.Disk != DiskInconsistent
	if !lData && !pData {
		return decision{Action: ActNoSource, Reason: "no UpToDate disk on either node"}
	}
	if !pData {
		if d, ok := relate(l, p); ok && d.Action == ActSource {
			return d
		} else if ok && d.Action == ActNone && p.ResyncHeld && p.Gen.Current != 0 {
			// Same generation: an interrupted catch-up, not an initial
			// full sync. The source's bitmap still names every region
			// the target lacks.
			return decision{Action: ActSource, Reason: "peer's interrupted bitmap resync resumes (its undo log holds its last consistent image)"}
		}
		return decision{Action: ActSource, Full: true, Reason: "peer has no consistent data"}
	}
	if !lData {
		if d, ok := relate(l, p); ok && d.Action == ActTarget {
			return d
		} else if ok && d.Action == ActNone && l.ResyncHeld && l.Gen.Current != 0 {
			return decision{Action: ActTarget, Reason: "this node's interrupted bitmap resync resumes (its undo log holds its last consistent image)"}
		}
		return decision{Action: ActTarget, Full: true, Reason: "local disk has no consistent data"}
	}
	if d, ok := relate(l, p); ok {
		return d
	}
	return decision{Action: ActUnrelated, Reason: fmt.Sprintf("generations %016x and %016x share no history", l.Gen.Current, p.Gen.Current)}
}

// relate finds how two generation sets descend from each other.
func relate(l, p nodeState) (decision, bool) {
	lg, pg := l.Gen, p.Gen
	switch {
	case lg.Current != 0 && lg.Current == pg.Current:
		// Same generation. Bits on either side (a crashed primary's
		// activity log) are resynced after the bitmap exchange, in the
		// direction primaryFirst picks.
		return decision{Action: ActNone, Reason: "same generation"}, true
	case lg.Bitmap != 0 && lg.Bitmap == pg.Current:
		return decision{Action: ActSource, Reason: "peer unchanged since the nodes parted; bitmap resync"}, true
	case pg.Bitmap != 0 && pg.Bitmap == lg.Current:
		return decision{Action: ActTarget, Reason: "local disk unchanged since the nodes parted; bitmap resync"}, true
	case sharesBitmapBase(lg, pg):
		return decision{Action: ActSplitBrain, Reason: "both nodes wrote since they parted"}, true
	case pg.Current != 0 && (lg.History[0] == pg.Current || lg.History[1] == pg.Current || lg.Bitmap == pg.Current):
		return decision{Action: ActSource, Full: true, Reason: "peer is an older generation without a bitmap; full resync"}, true
	case lg.Current != 0 && (pg.History[0] == lg.Current || pg.History[1] == lg.Current || pg.Bitmap == lg.Current):
		return decision{Action: ActTarget, Full: true, Reason: "local disk is an older generation without a bitmap; full resync"}, true
	case sharesAncestor(lg, pg):
		return decision{Action: ActSplitBrain, Reason: "both nodes moved on from a common ancestor"}, true
	}
	return decision{}, false
}

// sharesBitmapBase: both track changes against the same generation, so the
// union of their bitmaps covers every difference.
func sharesBitmapBase(a, b Generations) bool {
	return a.Bitmap != 0 && a.Bitmap == b.Bitmap
}

func sharesAncestor(a, b Generations) bool {
	as := []uint64{a.Bitmap, a.History[0], a.History[1]}
	bs := []uint64{b.Bitmap, b.History[0], b.History[1]}
	for _, x := range as {
		for _, y := range bs {
			if x != 0 && x == y {
				return true
			}
		}
	}
	return false
}

// primaryFirst reports whether, for the same generation with bits to
// resync, l is the source: the Primary, else the lower node name.
func primaryFirst(l, p nodeState) bool {
	if l.Role == RolePrimary {
		return true
	}
	if p.Role == RolePrimary {
		return false
	}
	return l.Name < p.Name
}
