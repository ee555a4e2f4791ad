package mirror

import (
	"time"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/nbd"
)

// A sync target is idle between a QD1 writer's frames, and so is every P
// of its Go runtime: sysmon then parks itself, and the receive loop's
// next system call (the read of the next frame) must wake it with a
// futex first, on the write's path, and sysmon's run takes the other
// CPU just when the Primary's receive loop is to be woken there for the
// ack. Measured on the 2-core bench VM, fio 4k randwrite QD1 against a
// loopback pair: the target woke sysmon before reading the frame in 81%
// of writes (12 us median in that futex alone). With a P kept in a
// system call as below, interleaved fresh pairs gave 10.1-12.6k IOPS
// (mean 79-98 us) against 9.9-11.0k (90-100 us). A Primary needs nothing
// of the kind: its NBD reader parks in read(2) (nbd.blockingConn), which
// keeps sysmon awake.
//
// keepAwake keeps one P in a system call while this node is the
// Secondary of a sync session and a P can be spared (nbd.ReserveP, shared
// with the NBD server's blocking readers): sysmon only parks when every P
// is idle. Each wait is shorter than the 10 ms after which sysmon takes
// an idle syscall's P back; the session's end releases the P within one
// wait, and Promote waits for that (awaitAsleep), so that an NBD client
// connecting right after a promotion gets a thread of its own.
//
// A target whose receive loop polls its socket (PeerConfig.BusyPoll, on
// more than one CPU) needs none of it either: the poll keeps a P busy
// while frames flow, and a P kept in ppoll beside it only took the second
// P from the rest of the runtime. Fresh sync pairs, fio 4k randwrite QD1,
// four interleaved runs each: 12.9-14.1k IOPS without the keep-awake
// against 11.7-13.0k with it.
//
// A busy target needs none of it (its Ps are seldom all idle) and may
// need the P for its own work: above awakeBusyFrames frames in one wait
// (25k a second; QD1 sync writes reach 12k) or awakeBusyBytes (200 MB/s,
// a 1 MiB QD8 stream; QD1 4 KiB writes reach 50) the P is released, and
// taken again only after a check interval at a lower rate.
const (
	awakeWait       = 5 * time.Millisecond   // one parked system call
	awakeCheck      = 100 * time.Millisecond // re-check while not parked
	awakeBusyFrames = 125
	awakeBusyBytes  = 1 << 20
)

// busy reports whether the session received more than a QD1 writer's
// frames or bytes between two readings of recvd, over spans waits.
func (s *session) busy(frames, bytes uint64, spans uint64) bool {
	f, b := s.recvd()
	return f-frames > awakeBusyFrames*spans || b-bytes > awakeBusyBytes*spans
}

// recvd reads the session's frame count and the link's received bytes
// (one session at a time: its deltas are the session's).
func (s *session) recvd() (frames, bytes uint64) {
	return s.frames.Load(), s.l.stats.recvBytes.Load()
}

func (s *session) keepAwake() {
	defer s.loops.Done()
	check := time.NewTicker(awakeCheck)
	defer check.Stop()
	quiet := true // the last check's window saw no more than a QD1 rate
	for {
		s.awakeMu.Lock()
		if quiet && s.wantAwake() && nbd.ReserveP() {
			s.awake.Store(true)
			for s.wantAwake() {
				f, b := s.recvd()
				// ppoll writes the time left back into ts: a fresh one
				// each time, or every wait after the first is zero and
				// this loop spins (it did, on a whole CPU).
				ts := unix.NsecToTimespec(int64(awakeWait))
				_, _ = unix.Ppoll(nil, &ts, nil) // EINTR: just check again
				if s.busy(f, b, 1) {
					break
				}
			}
			nbd.ReleaseP()
			s.awake.Store(false)
		}
		s.awakeMu.Unlock()
		if s.isClosed() {
			return
		}
		f, b := s.recvd()
		select {
		case <-s.done:
			return
		case <-check.C:
		}
		quiet = !s.busy(f, b, uint64(awakeCheck/awakeWait))
	}
}

func (s *session) wantAwake() bool {
	return !s.polls && s.l.cfg.Mode == ModeSync && s.v.Role() == RoleSecondary && !s.isClosed()
}

// awaitAsleep returns once keepAwake holds no P (it sees the new role
// within one wait).
func (s *session) awaitAsleep() {
	s.awakeMu.Lock()
	//lint:ignore SA2001 the lock is only waited for, nothing is guarded here
	s.awakeMu.Unlock()
}
