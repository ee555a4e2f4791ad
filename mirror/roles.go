package mirror

import (
	"errors"
	"fmt"

	"github.com/mirrord/mirrord/wan"
)

// hello is what this node tells a connecting peer.
func (v *Volume) hello() wan.Hello {
	sb := v.meta.snapshot()
	h := wan.Hello{
		Version: wan.ProtocolVersion, Node: v.node, Volume: v.name, VolumeID: sb.volumeID,
		Size: uint64(v.size), RegionSize: uint32(v.dirty.RegionSize()),
		Role: uint8(v.Role()), Disk: uint8(v.Disk()), Mode: uint8(v.link.cfg.Mode),
		Gen: toWan(sb.gen),
	}
	if v.pristine.Load() {
		h.Flags |= wan.HelloNeverWritten
	}
	if sb.flags&flagDiscardMine != 0 {
		h.Flags |= wan.HelloDiscardMine
	}
	if v.resyncHeld() {
		h.Flags |= wan.HelloResyncHeld
	}
	return h
}

// resyncHeld reports that this disk is the target of an interrupted
// bitmap resync whose undo log still holds its last consistent image: the
// disk is Inconsistent, but only in the regions that resync touched, and
// a bitmap resync of the same generation completes it. An interrupted
// initial full sync has no undo log (nothing consistent to keep) and so
// is resumed by a full one.
func (v *Volume) resyncHeld() bool {
	return v.Disk() == DiskInconsistent && v.undo.Load() != nil
}

func (v *Volume) nodeState() nodeState {
	sb := v.meta.snapshot()
	return nodeState{
		Name: v.node, Role: v.Role(), Disk: v.Disk(), Gen: sb.gen,
		Pristine: v.pristine.Load(), DiscardMine: sb.flags&flagDiscardMine != 0,
		ResyncHeld: v.resyncHeld(),
	}
}

func helloState(h wan.Hello) nodeState {
	return nodeState{
		Name: h.Node, Role: Role(h.Role), Disk: DiskState(h.Disk), Gen: fromWan(h.Gen),
		Pristine: h.Flags&wan.HelloNeverWritten != 0, DiscardMine: h.Flags&wan.HelloDiscardMine != 0,
		ResyncHeld: h.Flags&wan.HelloResyncHeld != 0,
	}
}

func toWan(g Generations) wan.Generations {
	return wan.Generations{Current: g.Current, Bitmap: g.Bitmap, History: g.History}
}

func fromWan(g wan.Generations) Generations {
	return Generations{Current: g.Current, Bitmap: g.Bitmap, History: g.History}
}

func (v *Volume) wanGen() wan.Generations { return toWan(v.meta.snapshot().gen) }

func genString(g Generations) string {
	return fmt.Sprintf("%016X:%016X:%016X:%016X", g.Current, g.Bitmap, g.History[0], g.History[1])
}

// Generations returns the current generation identifiers (zero without
// metadata).
func (v *Volume) Generations() Generations {
	if v.meta == nil {
		return Generations{}
	}
	return v.meta.snapshot().gen
}

// newGenerationIfNeeded starts a new data generation the first time a
// Primary writes without its peer: the old one becomes the bitmap's base,
// so that the peer, still at the old generation, is later recognised as
// "unchanged since we parted" and gets a bitmap resync.
func (v *Volume) newGenerationIfNeeded() error {
	if v.meta == nil {
		return nil
	}
	if sb := v.meta.snapshot(); sb.gen.Bitmap != 0 && sb.gen.Current != 0 {
		return nil
	}
	err := v.meta.update(func(s *superblock) {
		if s.gen.Bitmap != 0 && s.gen.Current != 0 {
			return
		}
		if s.gen.Current != 0 {
			s.gen.History[1] = s.gen.History[0]
			s.gen.History[0] = s.gen.Bitmap
			s.gen.Bitmap = s.gen.Current
		}
		s.gen.Current = newGeneration()
	})
	if err != nil {
		return fmt.Errorf("new generation: %w", errors.Join(err, errIO))
	}
	v.ev.emit("volume", v.Status())
	return nil
}

// adoptGeneration makes an in-sync Secondary follow the Primary's
// generation.
func (v *Volume) adoptGeneration(g wan.Generations) {
	if v.meta == nil || v.meta.snapshot().gen.Current == g.Current {
		return
	}
	_ = v.meta.update(func(s *superblock) {
		s.gen = Generations{Current: g.Current, History: g.History}
		s.disk = DiskUpToDate
	})
	v.disk.Store(uint32(DiskUpToDate))
}

func (v *Volume) setDisk(d DiskState) error {
	err := v.meta.update(func(s *superblock) {
		s.disk = d
		if d == DiskInconsistent {
			s.stream = wan.StreamPos{} // no prefix of any stream now
		}
	})
	if err != nil {
		return err
	}
	v.disk.Store(uint32(d))
	return nil
}

// finishAsSource retires the bitmap generation after a complete resync.
func (v *Volume) finishAsSource() error {
	if err := v.al.persistAll(); err != nil {
		return err
	}
	return v.meta.update(func(s *superblock) {
		if s.gen.Bitmap != 0 {
			s.gen.History[1] = s.gen.History[0]
			s.gen.History[0] = s.gen.Bitmap
			s.gen.Bitmap = 0
		}
		s.flags &^= flagDiscardMine | flagSplitBrain
	})
}

// finishAsTarget adopts the source's generation: the disk is UpToDate.
func (v *Volume) finishAsTarget(g wan.Generations) error {
	v.dirty.ClearAll()
	if err := v.al.persistAll(); err != nil {
		return err
	}
	err := v.meta.update(func(s *superblock) {
		s.gen = Generations{Current: g.Current, History: g.History}
		s.disk = DiskUpToDate
		s.flags &^= flagDiscardMine | flagSplitBrain | flagPristine
	})
	if err != nil {
		return err
	}
	v.pristine.Store(false)
	v.disk.Store(uint32(DiskUpToDate))
	return nil
}

func (v *Volume) clearSplitBrainFlag() error {
	return v.meta.update(func(s *superblock) { s.flags &^= flagSplitBrain })
}

func (l *link) enterSplitBrain(reason string) {
	l.mu.Lock()
	l.splitBrain = true
	l.standalone = true
	l.conn = ConnStandAlone
	l.reason = "split brain: " + reason
	l.mu.Unlock()
	_ = l.v.meta.update(func(s *superblock) { s.flags |= flagSplitBrain })
	l.log.Error().Str("reason", reason).Msg("split brain detected: connection refused until an operator resolves it (mirrord discard-my-data on the node whose changes are to be lost)")
	l.v.ev.emit("split-brain", l.v.Status())
}

// PromoteOptions qualify Promote.
type PromoteOptions struct {
	// Force promotes a disk that is not UpToDate, or while the peer's
	// state is unknown: the operator accepts losing what the peer has and
	// this node lacks.
	Force bool
}

// Promote makes this node Primary. It refuses an Inconsistent disk (a
// half-finished resync) and a connected Primary peer unless forced.
func (v *Volume) Promote(o PromoteOptions) error {
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.closed.Load() {
		return ErrClosed
	}
	if v.Role() == RolePrimary {
		return nil
	}
	if v.meta == nil {
		v.promoteFence()
		v.role.Store(uint32(RolePrimary))
		return nil
	}
	if err := v.promoteUndo(o); err != nil {
		return err
	}
	if d := v.Disk(); d != DiskUpToDate && !o.Force {
		if d == DiskInconsistent {
			return ErrInconsistent
		}
		return fmt.Errorf("local disk is %s: promote refused without --force", d)
	}
	var s *session
	if v.link != nil {
		s = v.link.current()
		if s != nil {
			if ph := v.link.peerState(); ph != nil && Role(ph.Role) == RolePrimary {
				return ErrPeerPrimary
			}
			if st := s.replState(); st.receiving() && !o.Force {
				return ErrInconsistent
			}
		}
	}
	if v.link != nil {
		v.link.newStream()
	}
	if s != nil {
		s.announceStream() // before any write of ours is numbered
	}
	err := v.meta.update(func(sb *superblock) {
		sb.role = RolePrimary
		sb.stream = wan.StreamPos{}
		if sb.gen.Current == 0 {
			sb.gen.Current = newGeneration()
		}
		if o.Force && sb.disk != DiskUpToDate {
			sb.disk = DiskUpToDate
		}
	})
	if err != nil {
		return err
	}
	v.disk.Store(uint32(v.meta.snapshot().disk))
	v.promoteFence()
	v.role.Store(uint32(RolePrimary))
	v.log.Info().Bool("force", o.Force).Str("gen", genString(v.meta.snapshot().gen)).Msg("promoted to Primary")
	if s != nil {
		s.sendState()
		s.awaitAsleep() // the P kept for a sync target is the NBD reader's now
	}
	v.ev.emit("volume", v.Status())
	return nil
}

// promoteUndo settles an interrupted resync before a promotion: with the
// source gone, the undo log is rolled back so that the promoted volume is
// the last consistent image this node held; with the resync still running
// only a forced promotion proceeds, keeping the half-copied image.
func (v *Volume) promoteUndo(o PromoteOptions) error {
	if v.undo.Load() == nil {
		return nil
	}
	if v.link != nil {
		if s := v.link.current(); s != nil && s.replState().receiving() {
			if !o.Force {
				return ErrInconsistent
			}
			return v.discardUndo()
		}
	}
	return v.rollbackUndo()
}

// Demote makes this node Secondary: new writes are refused, writes in
// flight finish first, and the disk is flushed.
func (v *Volume) Demote() error {
	v.gate.Lock()
	defer v.gate.Unlock()
	if v.closed.Load() {
		return ErrClosed
	}
	if v.Role() != RolePrimary {
		return nil
	}
	if v.meta == nil {
		return errors.New("a standalone volume (no metadata) is always Primary")
	}
	if err := v.syncData(); err != nil {
		return err
	}
	if v.link != nil {
		v.link.flush()
	}
	if err := v.meta.update(func(sb *superblock) { sb.role = RoleSecondary }); err != nil {
		return err
	}
	v.role.Store(uint32(RoleSecondary))
	v.wakeFenced() // held writes fail now
	v.log.Info().Msg("demoted to Secondary")
	if v.link != nil {
		if s := v.link.current(); s != nil {
			s.sendState()
		}
	}
	v.ev.emit("volume", v.Status())
	return nil
}

// DiscardMyData resolves a split brain against this node: at the next
// connect it becomes the sync target and its changes since the split are
// overwritten (DRBD's "connect --discard-my-data").
func (v *Volume) DiscardMyData() error {
	if v.link == nil {
		return ErrNoPeer
	}
	if v.Role() == RolePrimary {
		return errors.New("this node is Primary: demote it before discarding its data")
	}
	if err := v.meta.update(func(s *superblock) { s.flags |= flagDiscardMine }); err != nil {
		return err
	}
	v.log.Warn().Msg("operator: this node's changes will be discarded at the next connect")
	v.Connect()
	return nil
}

// Connect leaves StandAlone and (re)connects to the peer.
func (v *Volume) Connect() {
	if v.link == nil {
		return
	}
	l := v.link
	l.mu.Lock()
	l.standalone = false
	l.splitBrain = false
	if l.conn == ConnStandAlone {
		l.conn = ConnConnecting
	}
	l.mu.Unlock()
	select {
	case l.kick <- struct{}{}:
	default:
	}
	v.ev.emit("peer", v.Status())
}

// Disconnect drops the peer and stays StandAlone until Connect.
func (v *Volume) Disconnect() {
	if v.link == nil {
		return
	}
	l := v.link
	l.mu.Lock()
	l.standalone = true
	l.conn = ConnStandAlone
	l.reason = "disconnected by operator"
	s := l.sess.Load()
	l.mu.Unlock()
	if s != nil {
		s.fail(errors.New("disconnected by operator"))
		<-s.done
	}
	l.mu.Lock()
	l.conn = ConnStandAlone
	l.mu.Unlock()
	v.ev.emit("peer", v.Status())
}

func (l *link) peerState() *wan.Hello {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.peerHello == nil {
		return nil
	}
	h := *l.peerHello
	return &h
}
