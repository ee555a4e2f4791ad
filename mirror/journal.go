package mirror

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/bitmap"
	"github.com/mirrord/mirrord/wan"
)

// The async journal is where the ordered write stream goes when the
// in-flight window is full (DataKeeper's async queue, on disk): the sender
// drains it in order, so the peer's disk stays a prefix of the Primary's
// write history however far behind it falls. Only when the journal itself
// is full does the session go Ahead (bitmap only).
//
// File layout (integers little-endian):
//
//	0     header slot 0 (512 bytes)
//	512   header slot 1
//	4096  ring of capacity bytes
//
// Header: magic "MRDJRNL1", u32 version, u64 header sequence, u64
// capacity, u64 tail position, u64 tail record sequence, u64 head
// position, u64 head record sequence, u32 CRC-32C of the bytes before it.
// Headers alternate slots; the valid one with the higher sequence wins.
// Positions are logical byte offsets that grow forever; the ring offset
// is position mod capacity.
//
// Record (jrecHeaderSize bytes, then the payload):
//
//	0   u32 magic "JREC"
//	4   u8  kind (1 write, 2 zero, 3 pad)
//	5   u8  flags (1 FUA, 2 may unmap)
//	6   u16 reserved, 0
//	8   u64 record sequence (consecutive)
//	16  i64 time the application wrote it (unix nanoseconds)
//	24  u64 volume offset
//	32  u64 volume length
//	40  u32 payload bytes (writes: the data; pad: bytes skipped to the
//	        ring's end)
//	44  u32 CRC-32C of bytes 0..43 and the payload
//
// A record never wraps: one that does not fit before the ring's end is
// preceded by a pad record (or, when not even a header fits, by nothing:
// readers skip a tail shorter than a header).
//
// Durability: records are written without fsync, like the application's
// own writes; after kill -9 they are in the page cache, after power loss
// they may be gone. Either way the dirty bitmap is the safety net: every
// journaled write sets its bits before it is appended, and a bit is
// cleared only when the peer has acknowledged every journaled write to its
// region. At start the records between tail and head are folded into the
// bitmap and the journal restarts empty.
const (
	journalMagic      = "MRDJRNL1"
	journalVersion    = 1
	journalHeaderArea = 4096
	journalSlotSize   = 512
	journalHdrLen     = 8 + 4 + 8*6
	jrecMagic         = 0x4345524a // "JREC" little-endian
	jrecHeaderSize    = 48
	// DefaultJournalSize is the async journal's ring. 1 GiB absorbs a
	// minute of 16 MiB/s above link rate, or a 10 s outage at 100 MiB/s,
	// without falling back to the bitmap.
	DefaultJournalSize = 1 << 30
	// MinJournalSize keeps a journal useful; a write larger than the
	// whole ring goes to the bitmap (Ahead) like any write that does not
	// fit.
	MinJournalSize = 1 << 20
)

type jrecKind uint8

const (
	jrecWrite jrecKind = 1
	jrecZero  jrecKind = 2
	jrecPad   jrecKind = 3
)

const (
	jflagFUA   = 1 << 0
	jflagUnmap = 1 << 1
)

// Journal errors.
var (
	ErrJournalCorrupt = errors.New("journal record corrupt")
	errJournalFull    = errors.New("journal full")
)

// jrec is one decoded record.
type jrec struct {
	kind    jrecKind
	flags   uint8
	seq     uint64
	time    int64
	off, n  int64
	payload []byte // writes: aliases the decoded buffer
	pad     uint32 // pad: bytes skipped
}

// size is the record's length on disk.
func (r *jrec) size() int64 {
	if r.kind == jrecPad {
		return jrecHeaderSize + int64(r.pad)
	}
	return jrecHeaderSize + int64(len(r.payload))
}

func (r *jrec) putHeader(b []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], jrecMagic)
	b[4] = byte(r.kind)
	b[5] = r.flags
	le.PutUint16(b[6:], 0)
	le.PutUint64(b[8:], r.seq)
	le.PutUint64(b[16:], uint64(r.time))
	le.PutUint64(b[24:], uint64(r.off))
	le.PutUint64(b[32:], uint64(r.n))
	plen := uint32(len(r.payload))
	if r.kind == jrecPad {
		plen = r.pad
	}
	le.PutUint32(b[40:], plen)
	c := crc32.Update(0, castagnoli, b[:44])
	if r.kind != jrecPad {
		c = crc32.Update(c, castagnoli, r.payload)
	}
	le.PutUint32(b[44:], c)
}

// encode returns the record as it is stored.
func (r *jrec) encode() []byte {
	b := make([]byte, jrecHeaderSize+len(r.payload))
	copy(b[jrecHeaderSize:], r.payload)
	r.putHeader(b)
	return b
}

// decodeJrec decodes the record at the start of b. A pad record's skipped
// bytes are not part of b (they may be garbage) and are not checksummed.
func decodeJrec(b []byte) (jrec, error) {
	var r jrec
	if len(b) < jrecHeaderSize {
		return r, fmt.Errorf("%w: %d bytes, header needs %d", ErrJournalCorrupt, len(b), jrecHeaderSize)
	}
	le := binary.LittleEndian
	if le.Uint32(b) != jrecMagic {
		return r, fmt.Errorf("%w: bad magic", ErrJournalCorrupt)
	}
	r.kind, r.flags = jrecKind(b[4]), b[5]
	r.seq = le.Uint64(b[8:])
	r.time = int64(le.Uint64(b[16:]))
	off, n := le.Uint64(b[24:]), le.Uint64(b[32:])
	plen := le.Uint32(b[40:])
	switch {
	case le.Uint16(b[6:]) != 0:
		return r, fmt.Errorf("%w: reserved bits set", ErrJournalCorrupt)
	case r.flags&^(jflagFUA|jflagUnmap) != 0:
		return r, fmt.Errorf("%w: unknown flags %#x", ErrJournalCorrupt, r.flags)
	case off > 1<<62 || n > 1<<62:
		return r, fmt.Errorf("%w: range %d+%d out of bounds", ErrJournalCorrupt, off, n)
	}
	r.off, r.n = int64(off), int64(n)
	c := crc32.Update(0, castagnoli, b[:44])
	switch r.kind {
	case jrecWrite:
		if uint64(plen) != n || n == 0 || n > wan.MaxData {
			return r, fmt.Errorf("%w: write of %d bytes with %d payload bytes", ErrJournalCorrupt, n, plen)
		}
		if len(b) < jrecHeaderSize+int(plen) {
			return r, fmt.Errorf("%w: payload truncated (%d of %d bytes)", ErrJournalCorrupt, len(b)-jrecHeaderSize, plen)
		}
		r.payload = b[jrecHeaderSize : jrecHeaderSize+int(plen)]
		c = crc32.Update(c, castagnoli, r.payload)
	case jrecZero:
		if plen != 0 || n == 0 {
			return r, fmt.Errorf("%w: zero record with payload %d, length %d", ErrJournalCorrupt, plen, n)
		}
	case jrecPad:
		if r.flags != 0 || off != 0 || n != 0 {
			return r, fmt.Errorf("%w: pad record with a range", ErrJournalCorrupt)
		}
		r.pad = plen
	default:
		return r, fmt.Errorf("%w: kind %d", ErrJournalCorrupt, r.kind)
	}
	if c != le.Uint32(b[44:]) {
		return r, fmt.Errorf("%w: checksum (seq %d)", ErrJournalCorrupt, r.seq)
	}
	return r, nil
}

// op converts a write or zero record back to the volume operation.
func (r *jrec) op() op {
	if r.kind == jrecZero {
		return op{kind: opZero, off: r.off, n: r.n, fua: r.flags&jflagFUA != 0, mayUnmap: r.flags&jflagUnmap != 0}
	}
	return op{kind: opWrite, p: r.payload, off: r.off, n: r.n, fua: r.flags&jflagFUA != 0}
}

// journalHeader is the persisted ring state.
type journalHeader struct {
	hseq          uint64
	capacity      uint64
	tail, tailSeq uint64
	head, headSeq uint64
	version       uint32
}

func (h *journalHeader) encode() []byte {
	b := make([]byte, journalSlotSize)
	copy(b, journalMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], journalVersion)
	for i, v := range []uint64{h.hseq, h.capacity, h.tail, h.tailSeq, h.head, h.headSeq} {
		le.PutUint64(b[12+8*i:], v)
	}
	le.PutUint32(b[journalHdrLen:], crc32.Checksum(b[:journalHdrLen], castagnoli))
	return b
}

func decodeJournalHeader(b []byte) (journalHeader, error) {
	var h journalHeader
	if len(b) < journalHdrLen+4 || string(b[:8]) != journalMagic {
		return h, fmt.Errorf("%w: no journal header", ErrJournalCorrupt)
	}
	le := binary.LittleEndian
	if crc32.Checksum(b[:journalHdrLen], castagnoli) != le.Uint32(b[journalHdrLen:]) {
		return h, fmt.Errorf("%w: journal header checksum", ErrJournalCorrupt)
	}
	if h.version = le.Uint32(b[8:]); h.version != journalVersion {
		return h, fmt.Errorf("%w: journal version %d", ErrJournalCorrupt, h.version)
	}
	f := make([]uint64, 6)
	for i := range f {
		f[i] = le.Uint64(b[12+8*i:])
	}
	h.hseq, h.capacity, h.tail, h.tailSeq, h.head, h.headSeq = f[0], f[1], f[2], f[3], f[4], f[5]
	if h.tail > h.head || h.head-h.tail > h.capacity {
		return h, fmt.Errorf("%w: tail %d, head %d, capacity %d", ErrJournalCorrupt, h.tail, h.head, h.capacity)
	}
	return h, nil
}

// jentry indexes one record between tail and head, in memory.
type jentry struct {
	seq    uint64
	pos    int64 // logical position of the record (after any skip)
	end    int64 // logical position after it
	off, n int64
	time   int64
	epoch  uint64
	cost   int64  // window and lag bytes (op.cost)
	spos   uint64 // stream position it was shipped at before a disconnect (replay.go); 0: not shipped
}

// journal is the open ring. mu serializes appends, sends and acks: order
// in the file is stream order. It also guards the bitmap bits of
// journaled writes (see setBits/ack), so that a bit is never cleared
// between another writer setting it and recording why.
type journal struct {
	f        *os.File
	fd       int
	path     string
	capacity int64
	dirty    *bitmap.Bitmap

	mu       sync.Mutex
	owner    *session // records belong to this session's stream
	spilling bool     // new writes queue behind the journal
	// spillingHint mirrors spilling for the write path's lock-free fast
	// path: a writer that completed a spill stored it before returning,
	// so any write that starts after one sees it set.
	spillingHint atomic.Bool
	head         int64
	tail         int64
	diskTail     int64 // the tail the header on disk names
	nextSeq      uint64
	ents         []jentry // from tail to head; ents[:sent] are on the wire
	first        int      // ents[first] is the oldest (a slice queue)
	sent         int      // index of the next record to send
	pending      map[int64]jpending
	progress     chan struct{} // an acknowledgement retired a record
	queued       int64         // data bytes appended, not yet sent
	hseq         uint64
	lastHdr      time.Time
	stats        journalStats
	retained     *retainedStream // records kept across a disconnect (replay.go)
	nosync       bool
	iovHdr       [jrecHeaderSize]byte
	padBytes     [jrecHeaderSize]byte
}

type journalStats struct {
	spilled, spilledBytes uint64
	highWater             int64
	fullEvents            uint64
	replays               uint64
}

// openJournal opens or creates the journal at path. Records a crash left
// between tail and head are passed to fold (their regions may be missing
// on the peer); the journal then starts empty.
func openJournal(path string, capacity int64, dirty *bitmap.Bitmap, fold func(off, n int64)) (*journal, error) {
	if capacity < MinJournalSize {
		return nil, fmt.Errorf("journal %s: size %d below the minimum %d", path, capacity, MinJournalSize)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open journal: %w", err)
	}
	j := &journal{f: f, fd: int(f.Fd()), path: path, capacity: capacity, dirty: dirty, pending: make(map[int64]jpending), progress: make(chan struct{}, 1)}
	h, found := j.loadHeader()
	if found {
		j.hseq = h.hseq
		j.nextSeq = j.scan(h, fold)
	}
	if err := f.Truncate(journalHeaderArea + capacity); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("size journal %s: %w", path, err)
	}
	if err := j.writeHeader(true); err != nil {
		_ = f.Close()
		return nil, err
	}
	return j, nil
}

func (j *journal) loadHeader() (journalHeader, bool) {
	var best journalHeader
	found := false
	buf := make([]byte, journalSlotSize)
	for slot := range 2 {
		if _, err := j.f.ReadAt(buf, int64(slot)*journalSlotSize); err != nil {
			continue
		}
		h, err := decodeJournalHeader(buf)
		if err != nil {
			continue
		}
		if !found || h.hseq > best.hseq {
			best, found = h, true
		}
	}
	return best, found
}

// scan walks the records from the persisted tail while they are valid and
// consecutive, handing each write's range to fold, and returns the
// sequence number after the last. The persisted head is only a hint:
// records appended after the last header write are found by their
// sequence numbers.
func (j *journal) scan(h journalHeader, fold func(off, n int64)) uint64 {
	capy := int64(h.capacity)
	pos, seq := int64(h.tail), h.tailSeq
	if capy < jrecHeaderSize {
		return seq
	}
	buf := make([]byte, jrecHeaderSize)
	for pos-int64(h.tail) < capy {
		ring := pos % capy
		if capy-ring < jrecHeaderSize {
			pos += capy - ring
			continue
		}
		if _, err := j.f.ReadAt(buf[:jrecHeaderSize], journalHeaderArea+ring); err != nil {
			break
		}
		size := int64(jrecHeaderSize)
		if jrecKind(buf[4]) != jrecPad {
			size += int64(binary.LittleEndian.Uint32(buf[40:]))
			if ring+size > capy || size > jrecHeaderSize+wan.MaxData {
				break
			}
			if int64(len(buf)) < size {
				buf = make([]byte, size)
			}
			if _, err := j.f.ReadAt(buf[:size], journalHeaderArea+ring); err != nil {
				break
			}
		}
		r, err := decodeJrec(buf[:size])
		if err != nil || r.seq != seq {
			break
		}
		if r.kind != jrecPad {
			fold(r.off, r.n)
		}
		seq++
		pos += r.size()
	}
	return seq
}

// writeHeader persists head and tail; with sync it is made durable.
func (j *journal) writeHeader(sync bool) error {
	j.hseq++
	tailSeq, headSeq := j.nextSeq, j.nextSeq
	if n := len(j.ents) - j.first; n > 0 {
		tailSeq = j.ents[j.first].seq
	}
	h := journalHeader{hseq: j.hseq, capacity: uint64(j.capacity), tail: uint64(j.tail), tailSeq: tailSeq, head: uint64(j.head), headSeq: headSeq}
	if _, err := j.f.WriteAt(h.encode(), int64(j.hseq%2)*journalSlotSize); err != nil {
		return fmt.Errorf("write journal header: %w", err)
	}
	j.lastHdr = time.Now()
	j.diskTail = j.tail
	if sync && !j.nosync {
		if err := unix.Fdatasync(j.fd); err != nil {
			return fmt.Errorf("fdatasync journal: %w", err)
		}
	}
	return nil
}

// attach hands the (empty) journal to a new session.
func (j *journal) attach(s *session) {
	j.mu.Lock()
	j.owner = s
	j.mu.Unlock()
}

// detach empties the journal when its session ends: the records' bits are
// set, so the bitmap resync carries them (the peer may have applied any
// prefix of what was in flight; replaying it would rewind that prefix).
func (j *journal) detach(s *session) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s {
		return nil
	}
	j.owner = nil
	j.setSpilling(false)
	j.ents, j.first, j.sent = j.ents[:0], 0, 0
	clear(j.pending)
	j.queued = 0
	j.tail = j.head
	return j.writeHeader(false)
}

// setSpilling changes the spill state; mu is held.
func (j *journal) setSpilling(on bool) {
	j.spilling = on
	j.spillingHint.Store(on)
}

// used is the ring bytes between tail and head.
func (j *journal) used() int64 { return j.head - j.tail }

// appendLocked writes o as the next record. The caller holds mu, owns the
// spill decision and has set o's bits.
func (j *journal) appendLocked(o op, now time.Time, epoch uint64) error {
	r := jrec{kind: jrecWrite, seq: j.nextSeq, time: now.UnixNano(), off: o.off, n: o.n}
	if o.kind == opZero {
		r.kind = jrecZero
		if o.mayUnmap {
			r.flags |= jflagUnmap
		}
	} else {
		r.payload = o.p
	}
	if o.fua {
		r.flags |= jflagFUA
	}
	size := r.size()
	pos := j.head
	skip := int64(0)
	if ring := pos % j.capacity; j.capacity-ring < size {
		skip = j.capacity - ring
	}
	if j.head+skip+size-j.tail > j.capacity {
		return errJournalFull
	}
	if j.head+skip+size > j.diskTail+j.capacity {
		// The write would overwrite the record the header on disk calls
		// the tail: move that tail first, or a crash scan would stop
		// there and miss the records after it.
		if err := j.writeHeader(false); err != nil {
			return err
		}
	}
	if skip >= jrecHeaderSize {
		pad := jrec{kind: jrecPad, seq: r.seq, pad: uint32(skip - jrecHeaderSize)}
		pad.putHeader(j.padBytes[:])
		if err := j.pwrite(j.padBytes[:], pos); err != nil {
			return err
		}
		r.seq++
	}
	pos += skip
	r.putHeader(j.iovHdr[:])
	if err := j.pwritev(j.iovHdr[:], r.payload, pos); err != nil {
		return err
	}
	j.nextSeq = r.seq + 1
	j.head = pos + size
	j.ents = append(j.ents, jentry{seq: r.seq, pos: pos, end: j.head, off: o.off, n: o.n, time: r.time, epoch: epoch, cost: o.cost()})
	j.queued += o.cost()
	j.stats.spilled++
	j.stats.spilledBytes += uint64(o.cost())
	j.stats.highWater = max(j.stats.highWater, j.used())
	j.countRegions(o.off, o.n, 1)
	return nil
}

func (j *journal) pwrite(b []byte, pos int64) error {
	off := journalHeaderArea + pos%j.capacity
	for len(b) > 0 {
		n, err := unix.Pwrite(j.fd, b, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("write journal: %w", err)
		}
		b, off = b[n:], off+int64(n)
	}
	return nil
}

// pwritev writes a record's header and payload with one system call (no
// copy into a staging buffer).
func (j *journal) pwritev(hdr, payload []byte, pos int64) error {
	off := journalHeaderArea + pos%j.capacity
	n, err := unix.Pwritev(j.fd, [][]byte{hdr, payload}, off)
	for err == unix.EINTR {
		n, err = unix.Pwritev(j.fd, [][]byte{hdr, payload}, off)
	}
	if err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	if want := len(hdr) + len(payload); n < want {
		// Short writes are rare (signals, quotas); finish plainly.
		rest := append(append([]byte{}, hdr...), payload...)[n:]
		return j.pwrite(rest, pos+int64(n))
	}
	return nil
}

// jpending is a region's journaled writes not yet acknowledged. foreign
// says its bit was already set when the first of them was queued (the
// region was out of sync for another reason: a disconnect, a verify
// mismatch): then their acknowledgement does not make it in sync (a
// record may cover part of the region only), the resync does.
type jpending struct {
	n       int32
	foreign bool
}

// countRegions adjusts how many journaled, unacknowledged writes cover
// each region of the range, and returns the regions that are no longer
// covered and owe their bit to the journal alone. Appends call it before
// the write's bits are set.
func (j *journal) countRegions(off, n int64, d int32) []int64 {
	rs := j.dirty.RegionSize()
	var cleared []int64
	for r := off / rs; r <= (off+max(n, 1)-1)/rs; r++ {
		p, ok := j.pending[r]
		if !ok && d > 0 {
			p.foreign = j.dirty.Test(r*rs, 1)
		}
		p.n += d
		if p.n > 0 {
			j.pending[r] = p
			continue
		}
		delete(j.pending, r)
		if !p.foreign {
			cleared = append(cleared, r)
		}
	}
	return cleared
}

// covered reports that every region of the range has a journaled write
// queued: the journal will carry it, a resync need not.
func (j *journal) covered(off, n int64) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	rs := j.dirty.RegionSize()
	for r := off / rs; r <= (off+max(n, 1)-1)/rs; r++ {
		if j.pending[r].n == 0 {
			return false
		}
	}
	return true
}

// next returns the oldest record not yet sent. With none left it ends the
// spill: every journaled write has been handed to the sender, so later
// writes may go straight to the window again without overtaking one.
func (j *journal) next(s *session) (jentry, bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s || j.first+j.sent >= len(j.ents) {
		if j.owner == s {
			j.setSpilling(false)
		}
		return jentry{}, false
	}
	return j.ents[j.first+j.sent], true
}

// read loads a record's data from the ring and checks it.
func (j *journal) read(e jentry, buf []byte) (jrec, []byte, error) {
	size := int(e.end - e.pos)
	if cap(buf) < size {
		buf = make([]byte, size)
	}
	buf = buf[:size]
	off := journalHeaderArea + e.pos%j.capacity
	for done := 0; done < size; {
		n, err := unix.Pread(j.fd, buf[done:], off+int64(done))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return jrec{}, buf, fmt.Errorf("read journal: %w", err)
		}
		if n == 0 {
			return jrec{}, buf, fmt.Errorf("%w: short read at %d", ErrJournalCorrupt, e.pos)
		}
		done += n
	}
	r, err := decodeJrec(buf)
	if err == nil && (r.seq != e.seq || r.off != e.off || r.n != e.n) {
		err = fmt.Errorf("%w: record at %d is seq %d, want %d", ErrJournalCorrupt, e.pos, r.seq, e.seq)
	}
	return r, buf, err
}

// markSent records that the oldest unsent record is sequenced on the wire.
func (j *journal) markSent(s *session, seq uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s || j.first+j.sent >= len(j.ents) || j.ents[j.first+j.sent].seq != seq {
		return
	}
	j.queued -= j.ents[j.first+j.sent].cost
	j.sent++
}

// ack retires the oldest record (the peer acknowledges in stream order)
// and clears the bits of regions no journaled write covers any more,
// unless the session went Ahead since it was appended (then the bitmap
// owns those bits until the catch-up resync).
func (j *journal) ack(s *session, seq uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.owner != s || j.sent == 0 || j.ents[j.first].seq != seq {
		return
	}
	e := j.ents[j.first]
	j.first++
	j.sent--
	if j.first == len(j.ents) {
		j.ents, j.first = j.ents[:0], 0
		j.tail = j.head
	} else {
		j.tail = j.ents[j.first].pos
		if j.first > 4096 && j.first*2 > len(j.ents) {
			j.ents = append(j.ents[:0], j.ents[j.first:]...)
			j.first = 0
		}
	}
	rs := j.dirty.RegionSize()
	cleared := j.countRegions(e.off, e.n, -1)
	if e.epoch == s.epoch.Load() {
		for _, r := range cleared {
			j.dirty.ClearRegions(r*rs, rs)
		}
	}
	select {
	case j.progress <- struct{}{}:
	default:
	}
	if time.Since(j.lastHdr) > time.Second {
		// The tail on disk only bounds the fold after a crash; keeping
		// it roughly current is enough.
		_ = j.writeHeader(false)
	}
}

// state reports the journal's occupancy for status and lag.
func (j *journal) state() (used, queued int64, oldest time.Time, records int) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if n := len(j.ents) - j.first - j.sent; n > 0 {
		oldest = time.Unix(0, j.ents[j.first+j.sent].time)
	}
	return j.used(), j.queued, oldest, len(j.ents) - j.first
}

func (j *journal) status() *JournalStatus {
	j.mu.Lock()
	defer j.mu.Unlock()
	return &JournalStatus{
		QueuedBytes: j.queued, Records: len(j.ents) - j.first,
		HighWater: j.stats.highWater, SpilledWrites: j.stats.spilled, SpilledBytes: j.stats.spilledBytes, FullEvents: j.stats.fullEvents,
		Kept: j.retained != nil, Replays: j.stats.replays,
	}
}

func (j *journal) usedBytes() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.used()
}

// empty reports that no record awaits sending or acknowledgement.
func (j *journal) empty() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.ents) == j.first
}

func (j *journal) close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	err := j.writeHeader(true)
	return errors.Join(err, j.f.Close())
}
