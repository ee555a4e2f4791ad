// Package mirror owns the Volume: the local backing store behind the NBD
// export, its durability, its role, its metadata (generation identifiers,
// activity log, dirty bitmap) and its replication to a peer.
package mirror

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/bitmap"
	"github.com/mirrord/mirrord/wan"
)

// Errors a Volume returns. Each wraps the errno the NBD server sends.
var (
	ErrClosed       = fmt.Errorf("volume closed: %w", syscall.ESHUTDOWN)
	ErrShort        = fmt.Errorf("backing store shorter than volume: %w", syscall.EIO)
	ErrNotPrimary   = fmt.Errorf("volume is not Primary on this node: %w", syscall.EPERM)
	ErrInconsistent = errors.New("local disk is Inconsistent: it cannot be promoted (wait for the resync to finish, or use --force to accept data loss)")
	ErrPeerPrimary  = errors.New("the peer is Primary: demote it first (or use switchover)")
	ErrNoPeer       = errors.New("no peer configured")
	ErrNotConnected = errors.New("peer not connected")
)

// Options configure Open.
type Options struct {
	// Name identifies the volume to peers.
	Name string
	// Node is this host's name (peers must have distinct names).
	Node string
	// Size creates the backing file with this size if it does not exist.
	// An existing store of another size is refused: resizing is explicit.
	Size int64
	// RegionSize is the bitmap granularity (bitmap.DefaultRegionSize if 0).
	RegionSize int64
	// MetaPath, when set, keeps generation identifiers, role, disk state,
	// the activity log and the bitmap on disk. Required with a peer.
	MetaPath string
	// ALExtents is the activity-log size (DefaultALExtents if 0).
	ALExtents uint32
	// Peer, when set, replicates to one peer.
	Peer *PeerConfig
	Log  zerolog.Logger
	// FencePromotions leaves every promotion fenced (writes held): a
	// failover agent unfences the volume once it knows this node is the
	// only Primary.
	FencePromotions bool
	// HoldOnDisconnect fences a Primary (writes held) the moment its
	// replication session drops, before any write the peer lacks is
	// acknowledged; the failover agent lifts it once the witness has
	// recorded the peer outdated (sync mode with a witness).
	HoldOnDisconnect bool
	// OnBeacon receives the failover agent's messages that arrive over
	// the replication link (FrameBeacon). It is called from the session's
	// receive loop and must not block; p is not retained by the caller.
	OnBeacon func(p []byte)
}

// Volume is the local copy of a mirrored block device. It implements the
// nbd Device, Trimmer and Zeroer interfaces.
//
// Concurrency: all methods are safe for concurrent use; overlapping writes
// land in an unspecified order, as on a disk, but the same order on both
// replicas. Buffers are not retained. Errors wrap a syscall.Errno: EPERM
// when the volume is not Primary here, ESHUTDOWN after Close, the backing
// store's errno otherwise. A failed peer never fails a write: the region is
// marked out of sync instead.
type Volume struct {
	name     string
	node     string
	path     string
	f        *os.File
	fd       int
	size     int64
	blockDev bool
	dirty    *bitmap.Bitmap
	log      zerolog.Logger

	meta     *meta         // nil for a standalone volume
	al       *activityLog  // nil without meta
	link     *link         // nil without a peer
	ev       eventBus      // state changes
	rl       rangeLocks    // overlapping writes, resync and verify
	gate     sync.RWMutex  // writes hold it shared; role changes exclusively
	role     atomic.Uint32 // Role
	disk     atomic.Uint32 // DiskState
	pristine atomic.Bool   // created zero-filled by us and never written
	fc       fence         // the failover agent's write fence
	fencePro bool          // Options.FencePromotions
	onBeacon func([]byte)  // Options.OnBeacon
	// undo guards the last consistent image while a resync overwrites
	// it (sync target only; nil otherwise).
	undo atomic.Pointer[undoLog]
	// direct writes resync data past the page cache (direct.go).
	direct directWriter
	// plugs counts NBD readers serving a burst (PlugBurst).
	plugs atomic.Int32
	// held: sync writes of a burst whose local copy waits for Unplug
	// (writeasync.go).
	held heldWrites
	// nowait says how ReadCached tells a cached read (nowaitTry...).
	nowait atomic.Uint32

	closed atomic.Bool
}

// Open opens (or creates, see Options.Size) the backing file or block
// device at path. A volume without MetaPath is standalone and Primary; one
// with metadata starts Secondary, as DRBD resources do: promotion is an
// explicit act.
func Open(path string, opts Options) (*Volume, error) {
	if opts.RegionSize == 0 {
		opts.RegionSize = bitmap.DefaultRegionSize
	}
	if opts.ALExtents == 0 {
		opts.ALExtents = DefaultALExtents
	}
	if opts.Name == "" {
		opts.Name = "vol0"
	}
	created := false
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) && opts.Size > 0 {
		f, err = createSparse(path, opts.Size)
		created = err == nil
	}
	if err != nil {
		return nil, fmt.Errorf("open backing store: %w", err)
	}
	v := &Volume{name: opts.Name, node: opts.Node, path: path, f: f, fd: int(f.Fd()), log: opts.Log,
		fencePro: opts.FencePromotions, onBeacon: opts.OnBeacon}
	v.fc.cond.L = &v.fc.mu
	v.fc.holdOnDrop = opts.HoldOnDisconnect
	fail := func(err error) (*Volume, error) {
		if v.meta != nil {
			_ = v.meta.close()
		}
		_ = f.Close()
		if created {
			_ = os.Remove(path)
		}
		return nil, err
	}
	if err := v.probe(); err != nil {
		return fail(err)
	}
	if opts.Size > 0 && opts.Size != v.size {
		return fail(fmt.Errorf("backing store %s is %d bytes, configured size is %d: refusing to resize", path, v.size, opts.Size))
	}
	if v.size == 0 {
		return fail(fmt.Errorf("backing store %s is empty", path))
	}
	if v.dirty, err = bitmap.New(v.size, opts.RegionSize); err != nil {
		return fail(err)
	}
	if opts.MetaPath == "" {
		if opts.Peer != nil {
			return fail(errors.New("a peer needs a metadata file"))
		}
		v.role.Store(uint32(RolePrimary))
		v.disk.Store(uint32(DiskUpToDate))
		return v, nil
	}
	if err := v.openMeta(opts, created); err != nil {
		return fail(err)
	}
	if opts.Peer != nil {
		l, err := newLink(v, *opts.Peer)
		if err != nil {
			return fail(err)
		}
		v.link = l
		l.start()
	}
	return v, nil
}

func (v *Volume) openMeta(opts Options, created bool) error {
	m, newMeta, err := openMeta(opts.MetaPath, v.size, opts.RegionSize, opts.ALExtents, created)
	if err != nil {
		return err
	}
	v.meta = m
	sb := m.snapshot()
	if !newMeta {
		words, err := m.readBitmapWords((v.dirty.Regions() + 63) / 64)
		if err != nil {
			return err
		}
		if err := v.dirty.LoadWords(words); err != nil {
			return fmt.Errorf("%w: %v", ErrMetaCorrupt, err)
		}
	}
	clean := sb.flags&flagClean != 0
	if v.al, err = openActivityLog(m, v.dirty, clean); err != nil {
		return err
	}
	if !clean {
		v.log.Warn().Int64("out_of_sync_bytes", v.dirty.DirtyBytes()).
			Msg("unclean shutdown: activity-log extents marked out of sync")
		if err := v.al.persistAll(); err != nil {
			return err
		}
	}
	disk := sb.disk
	if newMeta && created {
		// A store we created is all zeroes: consistent by construction.
		disk = DiskUpToDate
	}
	v.disk.Store(uint32(disk))
	v.role.Store(uint32(RoleSecondary))
	v.pristine.Store(sb.flags&flagPristine != 0)
	err = m.update(func(s *superblock) {
		s.flags &^= flagClean
		s.disk = disk
		s.role = RoleSecondary
		if !clean {
			// After a crash the disk may hold writes past the position
			// kept at the last close; a replay from there would apply
			// them again, older versions over newer, and leave it no
			// prefix until it caught up (stream.go).
			s.stream = wan.StreamPos{}
		}
	})
	if err != nil {
		return err
	}
	return v.loadUndo()
}

func createSparse(path string, size int64) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		_ = os.Remove(path)
		return nil, err
	}
	return f, nil
}

func (v *Volume) probe() error {
	var st unix.Stat_t
	if err := unix.Fstat(v.fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", v.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		v.size = st.Size
	case unix.S_IFBLK:
		v.blockDev = true
		end, err := v.f.Seek(0, io.SeekEnd)
		if err != nil {
			return fmt.Errorf("size of %s: %w", v.path, err)
		}
		v.size = end
	default:
		return fmt.Errorf("%s is neither a regular file nor a block device", v.path)
	}
	return nil
}

// Size is the volume size in bytes.
func (v *Volume) Size() int64 { return v.size }

// Path is the backing store's path.
func (v *Volume) Path() string { return v.path }

// Dirty is the bitmap of regions the peer may lack.
func (v *Volume) Dirty() *bitmap.Bitmap { return v.dirty }

// Role is the current role.
func (v *Volume) Role() Role { return Role(v.role.Load()) }

// Disk is the local disk state.
func (v *Volume) Disk() DiskState { return DiskState(v.disk.Load()) }

// ReadAt reads len(p) bytes at off. Reads are served in any role: a
// Secondary's disk is readable for verification and backups.
func (v *Volume) ReadAt(p []byte, off int64) error {
	if v.closed.Load() {
		return ErrClosed
	}
	return v.pread(p, off)
}

// How ReadCached tells that a read needs no disk I/O.
const (
	nowaitTry    = iota // preadv2 with RWF_NOWAIT
	nowaitMemory        // the file lives in memory (tmpfs, ramfs): always
	nowaitNever         // the filesystem cannot tell: never
)

// ReadCached reads p at off only if that needs no disk I/O (preadv2 with
// RWF_NOWAIT); ok false means the data is not all in the page cache.
//
// tmpfs refuses RWF_NOWAIT (EOPNOTSUPP, still in Linux 6.18), yet its
// reads never wait for a disk (short of swap): a volume there is read
// with a plain pread, and on another filesystem that refuses the flag
// every read takes the blocking path without trying it first. In a
// 1-vCPU TCG VM, 4 KiB reads at QD32 from tmpfs had paid for a refused
// preadv2 and a goroutine hand-off each.
func (v *Volume) ReadCached(p []byte, off int64) (ok bool, err error) {
	if v.closed.Load() {
		return false, ErrClosed
	}
	switch v.nowait.Load() {
	case nowaitMemory:
		return true, v.pread(p, off)
	case nowaitNever:
		return false, nil
	}
	n, err := unix.Preadv2(v.fd, [][]byte{p}, off, unix.RWF_NOWAIT)
	switch {
	case err == unix.EOPNOTSUPP:
		v.nowait.Store(v.nowaitMode())
		return v.ReadCached(p, off)
	case err == unix.EAGAIN || err == unix.EINVAL || err == unix.ENOSYS || err == unix.EINTR:
		return false, nil // would block, or the kernel cannot tell: read normally
	case err != nil:
		return false, fmt.Errorf("read %d@%d: %w", len(p), off, err)
	case n < len(p):
		return false, nil // partly cached: the blocking path reads it all
	}
	return true, nil
}

// nowaitMode is what ReadCached does on a file that refuses RWF_NOWAIT.
func (v *Volume) nowaitMode() uint32 {
	var st unix.Statfs_t
	if unix.Fstatfs(v.fd, &st) == nil && (st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC) {
		return nowaitMemory
	}
	return nowaitNever
}

func (v *Volume) pread(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(v.fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %d@%d: %w", len(p), off, err)
		}
		if n == 0 {
			return ErrShort
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// op is one modification of the volume.
type op struct {
	kind     opKind
	p        []byte // opWrite
	off, n   int64
	fua      bool
	mayUnmap bool // opZero
}

type opKind uint8

const (
	opWrite opKind = iota
	opZero
)

// LocalOnly reports that reads and writes never wait on the network: a
// standalone volume, or an async one that does not suspend I/O while its
// peer is away, and no failover agent may hold its writes. (nbd serves
// such requests without a goroutine hand-off.)
func (v *Volume) LocalOnly() bool {
	return !v.fencePro && (v.link == nil || (v.link.cfg.Mode == ModeAsync && v.link.cfg.OnDisconnect != SuspendIO && !v.link.holds()))
}

// SplitWrites reports that a write may reach the volume in two parts at
// no extra cost (nbd serves a payload's buffered head in place): true
// without a peer, where each part is a pwrite; a replicated part would be
// a frame of its own.
func (v *Volume) SplitWrites() bool { return v.link == nil }

// WriteAt writes p at off; with fua the data is on stable storage (on both
// replicas in sync mode) when WriteAt returns.
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error {
	return v.modify(op{kind: opWrite, p: p, off: off, n: int64(len(p)), fua: fua})
}

// Trim discards the range; it reads back as zeroes afterwards, on both
// replicas.
func (v *Volume) Trim(off, length int64, fua bool) error {
	return v.modify(op{kind: opZero, off: off, n: length, fua: fua, mayUnmap: true})
}

// WriteZeroes zeroes the range, deallocating it when mayUnmap allows.
func (v *Volume) WriteZeroes(off, length int64, mayUnmap, fua bool) error {
	return v.modify(op{kind: opZero, off: off, n: length, fua: fua, mayUnmap: mayUnmap})
}

func (v *Volume) modify(o op) error {
	if v.link != nil {
		v.link.holdForLag() // before the gate: a held write must not stall Close
	}
	// One atomic load when unfenced: this is the hottest path. A write
	// that finds the fence set waits outside the gate, so that Demote
	// (which takes the gate) can fail it.
	if v.fc.mode.Load() != uint32(Unfenced) {
		if err := v.fenced(); err != nil {
			return err
		}
	}
	err := v.modifyGated(o)
	if err == nil && v.fc.mode.Load() != uint32(Unfenced) {
		// Fenced while the write was in flight: it is not acknowledged
		// until the fence lifts (or it fails).
		err = v.fenced()
	}
	return err
}

func (v *Volume) modifyGated(o op) error {
	v.gate.RLock()
	defer v.gate.RUnlock()
	if v.closed.Load() {
		return ErrClosed
	}
	if Role(v.role.Load()) != RolePrimary {
		return ErrNotPrimary
	}
	if v.pristine.Load() {
		if err := v.clearPristine(); err != nil {
			return err
		}
	}
	if v.link == nil {
		// Marking before writing means a crash between the two can only
		// over-report a dirty region, never miss one.
		v.dirty.Set(o.off, o.n)
		return v.apply(o)
	}
	return v.link.replicate(o)
}

func (v *Volume) clearPristine() error {
	if v.meta == nil || !v.pristine.Swap(false) {
		return nil
	}
	return v.meta.update(func(s *superblock) { s.flags &^= flagPristine })
}

// apply performs o on the local store only.
func (v *Volume) apply(o op) error {
	if o.kind == opWrite {
		return v.pwrite(o.p, o.off, o.fua)
	}
	if err := v.zero(o.off, o.n, o.mayUnmap); err != nil {
		return fmt.Errorf("zero %d@%d: %w", o.n, o.off, err)
	}
	if o.fua {
		return v.syncData()
	}
	return nil
}

func (v *Volume) pwrite(p []byte, off int64, fua bool) error {
	for len(p) > 0 {
		var n int
		var err error
		if fua {
			n, err = unix.Pwritev2(v.fd, [][]byte{p}, off, unix.RWF_DSYNC)
			if err == unix.EOPNOTSUPP || err == unix.ENOSYS {
				// Kernels before 4.7: write, then flush.
				if n, err = unix.Pwrite(v.fd, p, off); err == nil {
					err = unix.Fdatasync(v.fd)
				}
			}
		} else {
			n, err = unix.Pwrite(v.fd, p, off)
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %d@%d: %w", len(p), off, err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// Flush makes every completed write stable: on this disk, and in sync mode
// on the peer's.
func (v *Volume) Flush() error {
	if v.closed.Load() {
		return ErrClosed
	}
	if err := v.syncData(); err != nil {
		return err
	}
	if v.link != nil {
		v.link.flush()
	}
	return nil
}

func (v *Volume) syncData() error {
	if err := unix.Fdatasync(v.fd); err != nil {
		return fmt.Errorf("fdatasync %s: %w", v.path, err)
	}
	return nil
}

func (v *Volume) zero(off, length int64, mayUnmap bool) error {
	if v.blockDev {
		r := [2]uint64{uint64(off), uint64(length)}
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(v.fd), unix.BLKZEROOUT, uintptr(unsafePointer(&r)))
		if e == 0 {
			return nil
		}
		return v.writeZeroBuffers(off, length)
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if mayUnmap {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(v.fd, mode, off, length)
	if err == unix.EOPNOTSUPP || err == unix.ENOSYS || err == unix.EINVAL {
		// Filesystems without hole punching or zero ranges: zero writes.
		return v.writeZeroBuffers(off, length)
	}
	return err
}

var zeroBuf = make([]byte, 1<<20)

func (v *Volume) writeZeroBuffers(off, length int64) error {
	for length > 0 {
		k := min(length, int64(len(zeroBuf)))
		if err := v.pwrite(zeroBuf[:k], off, false); err != nil {
			return err
		}
		off += k
		length -= k
	}
	return nil
}

// Close stops replication, flushes, persists the bitmap and marks the
// metadata clean. Requests after Close fail with ESHUTDOWN; the caller
// stops serving first.
func (v *Volume) Close() error {
	v.gate.Lock()
	already := v.closed.Swap(true)
	v.gate.Unlock()
	if already {
		return nil
	}
	var errs []error
	if v.link != nil {
		v.link.stop()
	}
	if err := unix.Fdatasync(v.fd); err != nil {
		errs = append(errs, fmt.Errorf("fdatasync: %w", err))
	}
	if v.meta != nil {
		if err := v.al.persistAll(); err != nil {
			errs = append(errs, err)
		} else if err := v.meta.update(func(s *superblock) {
			s.flags |= flagClean
			if v.link != nil && v.Role() != RolePrimary {
				s.stream = v.link.appliedStream() // the data was synced above
			}
		}); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, v.meta.close())
	}
	if u := v.undo.Load(); u != nil {
		errs = append(errs, u.close())
	}
	errs = append(errs, v.direct.close(), v.f.Close())
	v.DisarmWatchdog()
	v.wakeFenced()
	v.ev.close()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close %s: %w", v.path, err)
	}
	return nil
}
