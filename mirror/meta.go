package mirror

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/wan"
)

// The metadata file sits beside the backing store and holds what must
// survive kill -9 and power loss: identity, role, disk state, generation
// identifiers, the activity log and the dirty bitmap.
//
// Layout (all offsets 4 KiB aligned, integers little-endian):
//
//	0      superblock slot 0 (4 KiB)
//	4096   superblock slot 1
//	8192   activity-log slot 0 (alSlotSize)
//	...    activity-log slot 1
//	bmOff  bitmap words, one bit per region, 4 KiB pages
//
// Superblocks and AL records are written to alternating slots, each with a
// sequence number and CRC-32C; the valid slot with the higher sequence wins,
// so a torn write loses at most the update being made, never the previous
// state.
const (
	metaMagic   = "MRDMETA1"
	metaVersion = 1
	sbSize      = 4096
	alOffset    = 2 * sbSize
	// DefaultALExtents is DRBD's default activity-log size: 1237 extents of
	// 4 MiB, about 4.8 GiB that may be out of sync after a primary crash.
	DefaultALExtents = 1237
	// ALExtentSize is the activity-log granularity.
	ALExtentSize = 4 << 20
	pageSize     = 4096
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors from the metadata store.
var (
	ErrMetaCorrupt  = errors.New("metadata corrupt")
	ErrMetaMismatch = errors.New("metadata belongs to another volume geometry")
)

// Role is the node's role for the volume.
type Role uint8

// Roles, as DRBD names them.
const (
	RoleUnknown Role = iota
	RolePrimary
	RoleSecondary
)

func (r Role) String() string {
	switch r {
	case RolePrimary:
		return "Primary"
	case RoleSecondary:
		return "Secondary"
	}
	return "Unknown"
}

// DiskState is the local disk's state, as DRBD names it.
type DiskState uint8

// Disk states (the subset mirrord uses; the names are DRBD's).
const (
	DiskDUnknown DiskState = iota
	DiskInconsistent
	DiskOutdated
	DiskConsistent
	DiskUpToDate
	DiskFailed
)

func (d DiskState) String() string {
	switch d {
	case DiskInconsistent:
		return "Inconsistent"
	case DiskOutdated:
		return "Outdated"
	case DiskConsistent:
		return "Consistent"
	case DiskUpToDate:
		return "UpToDate"
	case DiskFailed:
		return "Failed"
	}
	return "DUnknown"
}

// Generations are DRBD-style generation identifiers: Current names the
// data generation, Bitmap the generation the dirty bitmap is relative to (0
// when the bitmap tracks nothing for the peer), History the two before.
type Generations struct {
	Current uint64
	Bitmap  uint64
	History [2]uint64
}

// Superblock flags.
const (
	// flagClean is set by an orderly shutdown; without it the activity log
	// is folded into the bitmap at the next start.
	flagClean = 1 << 0
	// flagPristine marks a store mirrord created itself (all zeroes) and
	// nothing has written since: two pristine peers need no initial sync.
	flagPristine = 1 << 1
	// flagSplitBrain records an unresolved split brain so that it survives
	// restarts until an operator resolves it.
	flagSplitBrain = 1 << 2
	// flagDiscardMine is the operator's split-brain resolution: this node's
	// changes since the split are discarded at the next connect.
	flagDiscardMine = 1 << 3
)

// superblock is the persistent state, apart from the bitmap and AL.
type superblock struct {
	seq        uint64
	volumeID   [16]byte
	size       uint64
	regionSize uint32
	alExtents  uint32
	role       Role
	disk       DiskState
	flags      uint32
	gen        Generations
	// stream is a Secondary's position in its Primary's async stream
	// (stream.go), kept at an orderly close. It sits after the base
	// layout's checksum with its own, so older builds ignore it and a
	// superblock they wrote reads as no position.
	stream wan.StreamPos
}

const sbEncodedSize = 8 + 4 + 8 + 16 + 8 + 4 + 4 + 1 + 1 + 4 + 32 + 4

func (s *superblock) encode() []byte {
	b := make([]byte, sbSize)
	copy(b, metaMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], metaVersion)
	le.PutUint64(b[12:], s.seq)
	copy(b[20:36], s.volumeID[:])
	le.PutUint64(b[36:], s.size)
	le.PutUint32(b[44:], s.regionSize)
	le.PutUint32(b[48:], s.alExtents)
	b[52] = byte(s.role)
	b[53] = byte(s.disk)
	le.PutUint32(b[54:], s.flags)
	le.PutUint64(b[58:], s.gen.Current)
	le.PutUint64(b[66:], s.gen.Bitmap)
	le.PutUint64(b[74:], s.gen.History[0])
	le.PutUint64(b[82:], s.gen.History[1])
	le.PutUint32(b[90:], crc32.Checksum(b[:90], castagnoli))
	le.PutUint64(b[96:], s.stream.Stream)
	le.PutUint64(b[104:], s.stream.Pos)
	le.PutUint32(b[112:], crc32.Checksum(b[96:112], castagnoli))
	return b
}

func decodeSuperblock(b []byte) (superblock, error) {
	var s superblock
	if len(b) < sbEncodedSize || string(b[:8]) != metaMagic {
		return s, fmt.Errorf("%w: no superblock", ErrMetaCorrupt)
	}
	le := binary.LittleEndian
	if crc32.Checksum(b[:90], castagnoli) != le.Uint32(b[90:]) {
		return s, fmt.Errorf("%w: superblock checksum", ErrMetaCorrupt)
	}
	if v := le.Uint32(b[8:]); v != metaVersion {
		return s, fmt.Errorf("%w: version %d", ErrMetaCorrupt, v)
	}
	s.seq = le.Uint64(b[12:])
	copy(s.volumeID[:], b[20:36])
	s.size = le.Uint64(b[36:])
	s.regionSize = le.Uint32(b[44:])
	s.alExtents = le.Uint32(b[48:])
	s.role = Role(b[52])
	s.disk = DiskState(b[53])
	s.flags = le.Uint32(b[54:])
	s.gen = Generations{le.Uint64(b[58:]), le.Uint64(b[66:]), [2]uint64{le.Uint64(b[74:]), le.Uint64(b[82:])}}
	if len(b) >= 116 && crc32.Checksum(b[96:112], castagnoli) == le.Uint32(b[112:]) {
		s.stream = wan.StreamPos{Stream: le.Uint64(b[96:]), Pos: le.Uint64(b[104:])}
	}
	return s, nil
}

// meta is the open metadata file. Superblock updates are serialized by mu;
// AL transactions by the activity log's own lock.
type meta struct {
	f        *os.File
	fd       int
	alSlot   int64 // bytes per AL slot
	bmOff    int64
	bmBytes  int64
	mu       sync.Mutex
	sb       superblock
	alSeq    uint64
	nosync   bool
	metaPath string
}

func alSlotSize(extents uint32) int64 {
	n := int64(8+8+4+4) + 4*int64(extents) + 4
	return (n + pageSize - 1) / pageSize * pageSize
}

func bitmapBytes(size int64, regionSize int64) int64 {
	regions := (size + regionSize - 1) / regionSize
	words := (regions + 63) / 64
	return (words*8 + pageSize - 1) / pageSize * pageSize
}

// openMeta opens or creates the metadata file for a store of the given
// geometry. created reports a new file.
func openMeta(path string, size, regionSize int64, alExtents uint32, pristine bool) (m *meta, created bool, err error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		created = true
	}
	if err != nil {
		return nil, false, fmt.Errorf("open metadata: %w", err)
	}
	m = &meta{f: f, fd: int(f.Fd()), metaPath: path}
	if created {
		sb := superblock{
			size: uint64(size), regionSize: uint32(regionSize), alExtents: alExtents,
			role: RoleSecondary, disk: DiskInconsistent, flags: flagClean,
		}
		if pristine {
			sb.flags |= flagPristine
		}
		if _, err := rand.Read(sb.volumeID[:]); err != nil {
			return nil, false, err
		}
		m.layout(sb)
		if err := f.Truncate(m.bmOff + m.bmBytes); err != nil {
			_ = f.Close()
			_ = os.Remove(path)
			return nil, false, fmt.Errorf("size metadata: %w", err)
		}
		m.sb = sb
		// Both slots get the initial superblock so neither holds garbage.
		err := m.writeSB()
		if err == nil {
			err = m.writeSB()
		}
		if err != nil {
			_ = f.Close()
			_ = os.Remove(path)
			return nil, false, err
		}
		return m, true, nil
	}
	if err := m.load(); err != nil {
		_ = f.Close()
		return nil, false, fmt.Errorf("%s: %w", path, err)
	}
	if m.sb.size != uint64(size) || int64(m.sb.regionSize) != regionSize {
		_ = f.Close()
		return nil, false, fmt.Errorf("%s: %w: metadata says %d bytes / %d-byte regions, volume is %d / %d",
			path, ErrMetaMismatch, m.sb.size, m.sb.regionSize, size, regionSize)
	}
	return m, false, nil
}

func (m *meta) layout(sb superblock) {
	m.alSlot = alSlotSize(sb.alExtents)
	m.bmOff = alOffset + 2*m.alSlot
	m.bmBytes = bitmapBytes(int64(sb.size), int64(sb.regionSize))
}

func (m *meta) load() error {
	var best *superblock
	buf := make([]byte, sbSize)
	var firstErr error
	for slot := range 2 {
		if _, err := m.f.ReadAt(buf, int64(slot)*sbSize); err != nil {
			firstErr = errors.Join(firstErr, fmt.Errorf("read superblock %d: %w", slot, err))
			continue
		}
		sb, err := decodeSuperblock(buf)
		if err != nil {
			firstErr = errors.Join(firstErr, err)
			continue
		}
		if best == nil || sb.seq > best.seq {
			best = &sb
		}
	}
	if best == nil {
		return firstErr
	}
	m.sb = *best
	m.layout(m.sb)
	return nil
}

// update applies fn to a copy of the superblock and persists it.
func (m *meta) update(fn func(*superblock)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.sb
	fn(&m.sb)
	if err := m.writeSB(); err != nil {
		m.sb = old
		return err
	}
	return nil
}

func (m *meta) snapshot() superblock {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sb
}

// writeSB persists m.sb into the slot after the current one. Caller holds
// mu (or owns m exclusively).
func (m *meta) writeSB() error {
	m.sb.seq++
	b := m.sb.encode()
	if _, err := m.f.WriteAt(b, int64(m.sb.seq%2)*sbSize); err != nil {
		return fmt.Errorf("write superblock: %w", err)
	}
	return m.sync()
}

func (m *meta) sync() error {
	if m.nosync {
		return nil
	}
	if err := unix.Fdatasync(m.fd); err != nil {
		return fmt.Errorf("fdatasync metadata: %w", err)
	}
	return nil
}

// writeAL persists the set of hot extents as one transaction.
func (m *meta) writeAL(extents []uint32) error {
	m.alSeq++
	b := make([]byte, m.alSlot)
	le := binary.LittleEndian
	copy(b, "MRDAL001")
	le.PutUint64(b[8:], m.alSeq)
	le.PutUint32(b[16:], uint32(len(extents)))
	off := 20
	for _, e := range extents {
		le.PutUint32(b[off:], e)
		off += 4
	}
	le.PutUint32(b[off:], crc32.Checksum(b[:off], castagnoli))
	if _, err := m.f.WriteAt(b, alOffset+int64(m.alSeq%2)*m.alSlot); err != nil {
		return fmt.Errorf("write activity log: %w", err)
	}
	return m.sync()
}

// readAL returns the extents of the newest valid AL record (none for a new
// file).
func (m *meta) readAL() ([]uint32, error) {
	b := make([]byte, m.alSlot)
	le := binary.LittleEndian
	var best []uint32
	var bestSeq uint64
	for slot := range 2 {
		if _, err := m.f.ReadAt(b, alOffset+int64(slot)*m.alSlot); err != nil {
			return nil, fmt.Errorf("read activity log: %w", err)
		}
		if string(b[:8]) != "MRDAL001" {
			continue
		}
		seq := le.Uint64(b[8:])
		n := int(le.Uint32(b[16:]))
		end := 20 + 4*n
		if n > int(m.sb.alExtents) || end+4 > len(b) || crc32.Checksum(b[:end], castagnoli) != le.Uint32(b[end:]) {
			continue
		}
		if best == nil || seq > bestSeq {
			best = make([]uint32, n)
			for i := range best {
				best[i] = le.Uint32(b[20+4*i:])
			}
			bestSeq = seq
		}
	}
	m.alSeq = bestSeq
	return best, nil
}

// writeBitmap persists the bitmap words [first, first+len(words)) and
// syncs. Word-granular writes are rounded to whole pages by the caller.
func (m *meta) writeBitmapWords(first int64, words []uint64) error {
	b := make([]byte, 8*len(words))
	for i, w := range words {
		binary.LittleEndian.PutUint64(b[8*i:], w)
	}
	if _, err := m.f.WriteAt(b, m.bmOff+8*first); err != nil {
		return fmt.Errorf("write bitmap: %w", err)
	}
	return nil
}

func (m *meta) readBitmapWords(n int64) ([]uint64, error) {
	b := make([]byte, 8*n)
	if _, err := m.f.ReadAt(b, m.bmOff); err != nil {
		return nil, fmt.Errorf("read bitmap: %w", err)
	}
	w := make([]uint64, n)
	for i := range w {
		w[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	return w, nil
}

func (m *meta) close() error {
	return m.f.Close()
}

// newGeneration returns a fresh random generation identifier. Zero is
// reserved for "no generation yet", and the low bit is kept clear so that
// identifiers compare equal regardless of flags a future version may add.
func newGeneration() uint64 {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic(err) // crypto/rand never fails on Linux
		}
		if g := binary.LittleEndian.Uint64(b[:]) &^ 1; g != 0 {
			return g
		}
	}
}
