package mirror

import "sync"

// rangeLocks serializes overlapping operations on the primary: a write, a
// resync read or a verify digest holds its range from the moment it is
// sequenced until both copies are done with it. Without it two overlapping
// writes could reach the local disk and the peer in different orders and
// leave the replicas different. Non-overlapping ranges never wait.
type rangeLocks struct {
	mu     sync.Mutex
	active []lockedRange
}

type lockedRange struct {
	off, end int64
	wait     chan struct{} // closed on unlock; nil until someone waits
}

func (l *rangeLocks) lock(off, length int64) {
	end := off + max(length, 1)
	l.mu.Lock()
	for {
		i := l.overlap(off, end)
		if i < 0 {
			break
		}
		if l.active[i].wait == nil {
			l.active[i].wait = make(chan struct{})
		}
		w := l.active[i].wait
		l.mu.Unlock()
		<-w
		l.mu.Lock()
	}
	l.active = append(l.active, lockedRange{off: off, end: end})
	l.mu.Unlock()
}

// tryLock is lock when it would not wait.
func (l *rangeLocks) tryLock(off, length int64) bool {
	end := off + max(length, 1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.overlap(off, end) >= 0 {
		return false
	}
	l.active = append(l.active, lockedRange{off: off, end: end})
	return true
}

func (l *rangeLocks) overlap(off, end int64) int {
	for i, r := range l.active {
		if off < r.end && r.off < end {
			return i
		}
	}
	return -1
}

func (l *rangeLocks) unlock(off, length int64) {
	end := off + max(length, 1)
	l.mu.Lock()
	for i, r := range l.active {
		if r.off == off && r.end == end {
			if r.wait != nil {
				close(r.wait)
			}
			last := len(l.active) - 1
			l.active[i] = l.active[last]
			l.active = l.active[:last]
			break
		}
	}
	l.mu.Unlock()
}
