package mirror

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/mirrord/mirrord/bitmap"
)

// activityLog is DRBD's activity log: the persistent set of "hot" 4 MiB
// extents that may hold writes not yet on the peer. A write to a hot extent
// costs two atomic operations; a write to a cold one first makes it hot in a
// synced metadata transaction. After a primary crash only hot extents need
// resync, not the device.
//
// An extent leaves the log only when no write to it is in flight and its
// dirty bits are on disk, so the on-disk bitmap plus the on-disk log always
// cover every region that may differ from the peer.
type activityLog struct {
	m        *meta
	dirty    *bitmap.Bitmap
	capacity int
	// Per extent. The writer increments inflight and then checks hot; the
	// evictor clears hot and then checks inflight. With sequentially
	// consistent atomics one of them always sees the other.
	hot      []atomic.Bool
	inflight []atomic.Int32
	ref      []atomic.Bool // second chance for the clock sweep

	mu      sync.Mutex
	cond    sync.Cond
	waiters atomic.Int32
	members []uint32 // extents in the log, swept by hand
	hand    int

	misses atomic.Uint64
}

func extentCount(size int64) int64 { return (size + ALExtentSize - 1) / ALExtentSize }

// openActivityLog loads the log. After an unclean shutdown every extent it
// names is marked dirty: writes to them may not have reached the peer.
func openActivityLog(m *meta, dirty *bitmap.Bitmap, clean bool) (*activityLog, error) {
	n := extentCount(dirty.Size())
	a := &activityLog{
		m: m, dirty: dirty, capacity: int(m.sb.alExtents),
		hot: make([]atomic.Bool, n), inflight: make([]atomic.Int32, n), ref: make([]atomic.Bool, n),
	}
	a.cond.L = &a.mu
	ext, err := m.readAL()
	if err != nil {
		return nil, err
	}
	for _, e := range ext {
		if int64(e) >= n {
			return nil, fmt.Errorf("%w: activity log names extent %d of %d", ErrMetaCorrupt, e, n)
		}
		if !clean {
			dirty.Set(int64(e)*ALExtentSize, ALExtentSize)
		}
		a.hot[e].Store(true)
		a.members = append(a.members, e)
	}
	return a, nil
}

// begin makes every extent of the range hot and counts the write in flight.
// Each successful begin is paired with an end.
func (a *activityLog) begin(off, length int64) error {
	first, last := off/ALExtentSize, (off+max(length, 1)-1)/ALExtentSize
	for e := first; e <= last; e++ {
		a.inflight[e].Add(1)
		if a.hot[e].Load() {
			if !a.ref[e].Load() {
				a.ref[e].Store(true)
			}
			continue
		}
		a.inflight[e].Add(-1)
		if err := a.activate(uint32(e)); err != nil {
			a.endExtents(first, e-1)
			return err
		}
	}
	return nil
}

// tryBegin is begin when every extent of the range is already in the log
// (no metadata write, no wait).
func (a *activityLog) tryBegin(off, length int64) bool {
	first, last := off/ALExtentSize, (off+max(length, 1)-1)/ALExtentSize
	for e := first; e <= last; e++ {
		a.inflight[e].Add(1)
		if !a.hot[e].Load() {
			a.endExtents(first, e)
			return false
		}
		if !a.ref[e].Load() {
			a.ref[e].Store(true)
		}
	}
	return true
}

func (a *activityLog) end(off, length int64) {
	a.endExtents(off/ALExtentSize, (off+max(length, 1)-1)/ALExtentSize)
}

func (a *activityLog) endExtents(first, last int64) {
	for e := first; e <= last; e++ {
		if a.inflight[e].Add(-1) == 0 && a.waiters.Load() > 0 {
			a.mu.Lock()
			a.cond.Broadcast()
			a.mu.Unlock()
		}
	}
}

// activate adds extent e to the log (evicting an idle one if full) and
// counts one write in flight on it.
func (a *activityLog) activate(e uint32) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		if a.hot[e].Load() {
			a.inflight[e].Add(1)
			return nil
		}
		a.misses.Add(1)
		if len(a.members) < a.capacity {
			return a.commit(e, -1)
		}
		if victim := a.pickVictim(); victim >= 0 {
			return a.commit(e, victim)
		}
		// Every extent in the log has writes in flight: wait for one to
		// finish (only possible when the log is smaller than the queue).
		a.waiters.Add(1)
		a.cond.Wait()
		a.waiters.Add(-1)
	}
}

// pickVictim sweeps the clock for an idle extent and takes it out of the
// hot set; it returns the member index, or -1.
func (a *activityLog) pickVictim() int {
	for range 2 * len(a.members) {
		i := a.hand
		a.hand = (a.hand + 1) % len(a.members)
		v := a.members[i]
		if a.ref[v].Load() {
			a.ref[v].Store(false)
			continue
		}
		a.hot[v].Store(false)
		if a.inflight[v].Load() != 0 {
			a.hot[v].Store(true)
			continue
		}
		return i
	}
	return -1
}

// commit persists the log with e added, replacing member index victim (-1:
// append). The victim's dirty bits reach the disk before the log forgets it.
func (a *activityLog) commit(e uint32, victim int) error {
	var old uint32
	if victim >= 0 {
		old = a.members[victim]
		if err := a.persistExtentBits(old); err != nil {
			a.hot[old].Store(true)
			return err
		}
		a.members[victim] = e
	} else {
		a.members = append(a.members, e)
	}
	if err := a.m.writeAL(a.members); err != nil {
		// The on-disk log still holds the old set; so does memory again.
		if victim >= 0 {
			a.members[victim] = old
			a.hot[old].Store(true)
		} else {
			a.members = a.members[:len(a.members)-1]
		}
		return err
	}
	a.hot[e].Store(true)
	a.inflight[e].Add(1)
	return nil
}

// persistExtentBits writes the bitmap pages covering extent v and syncs.
func (a *activityLog) persistExtentBits(v uint32) error {
	rs := a.dirty.RegionSize()
	firstRegion := int64(v) * ALExtentSize / rs
	lastRegion := min((int64(v)+1)*ALExtentSize, a.dirty.Size())/rs + 1
	// Whole pages, so that a torn sector never mixes old and new words of
	// other extents in a way that loses a bit: we rewrite the same values.
	wordsPerPage := int64(pageSize / 8)
	fw := firstRegion / 64 / wordsPerPage * wordsPerPage
	lw := min((lastRegion/64/wordsPerPage+1)*wordsPerPage, (a.dirty.Regions()+63)/64)
	words := a.dirty.WordsRange(fw, lw-fw)
	if err := a.m.writeBitmapWords(fw, words); err != nil {
		return err
	}
	return a.m.sync()
}

// persistAll writes the whole bitmap and syncs (clean shutdown, resync
// checkpoints).
func (a *activityLog) persistAll() error {
	if err := a.m.writeBitmapWords(0, a.dirty.Words()); err != nil {
		return err
	}
	return a.m.sync()
}
