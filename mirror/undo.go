package mirror

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/bitmap"
)

// The undo log keeps a sync target's last consistent image recoverable
// while a resync overwrites it (DRBD's catch-up leaves the target
// Inconsistent with nothing to fall back to). Before the first write of a
// resync session touches a region, the region's old contents are appended
// here and made durable; if the source dies before the resync ends,
// promoting this node first writes every saved region back, so the
// promoted volume is the point-in-time image it held before the resync.
// When the resync completes the file is removed (one unlink: atomic).
//
// File layout (integers little-endian), beside the metadata:
//
//	0     header (4 KiB): magic "MRDUNDO1", u32 version, 16-byte volume
//	      id, u64 generations current/bitmap/history0/history1 of the
//	      saved image, u8 its disk state, u32 CRC-32C of bytes 0..60
//	4096  records: u32 magic "UREC", u32 reserved 0, u64 sequence (from
//	      1), u64 volume offset, u64 length, u32 CRC-32C of bytes 0..31
//	      and the data, u32 reserved 0; then length bytes of old data
//
// Each region is saved once per log (the first pre-image is the one that
// matters). A torn last record is harmless: the overwrite it protects
// waits for its fdatasync.
const (
	undoMagic      = "MRDUNDO1"
	undoVersion    = 1
	undoHeaderSize = 4096
	undoHdrLen     = 8 + 4 + 16 + 32 + 1
	urecMagic      = 0x43455255 // "UREC" little-endian
	urecHeaderSize = 40
	// urecHole flags a record whose range read back as a hole: it carries
	// no data and rolls back as zeroes. A resync onto a sparse target
	// (the usual first catch-up) then costs the log a header per run, not
	// a copy of nothing.
	urecHole = 1
	// undoMaxRecord bounds one record, so a large write is saved in
	// pieces a rollback reads with a bounded buffer.
	undoMaxRecord = 4 << 20
)

// ErrUndoCorrupt means an undo record failed its checksum where the log
// says one must be.
var ErrUndoCorrupt = errors.New("undo log corrupt")

// ErrUndoFull means a resync would overwrite regions the undo log has no
// room (peer.undo-max-size) to save: nothing of it is written, the session
// ends and the catch-up pauses there. The last consistent image stays
// recoverable (promote rolls the log back); raising the cap resumes it.
var ErrUndoFull = errors.New("undo log full: catch-up paused (raise peer.undo-max-size, or promote to roll back to the last consistent image)")

// DefaultUndoMaxSize caps the undo log: a catch-up overwrites each region
// at most once, so this is the largest catch-up (in regions changed while
// Ahead or disconnected) a target can take and still roll back.
const DefaultUndoMaxSize = 16 << 30

type undoHeader struct {
	volumeID [16]byte
	gen      Generations
	disk     DiskState
}

func (h *undoHeader) encode() []byte {
	b := make([]byte, undoHeaderSize)
	copy(b, undoMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], undoVersion)
	copy(b[12:28], h.volumeID[:])
	for i, g := range []uint64{h.gen.Current, h.gen.Bitmap, h.gen.History[0], h.gen.History[1]} {
		le.PutUint64(b[28+8*i:], g)
	}
	b[60] = byte(h.disk)
	le.PutUint32(b[undoHdrLen:], crc32.Checksum(b[:undoHdrLen], castagnoli))
	return b
}

func decodeUndoHeader(b []byte) (undoHeader, error) {
	var h undoHeader
	if len(b) < undoHdrLen+4 || string(b[:8]) != undoMagic {
		return h, fmt.Errorf("%w: no header", ErrUndoCorrupt)
	}
	le := binary.LittleEndian
	if crc32.Checksum(b[:undoHdrLen], castagnoli) != le.Uint32(b[undoHdrLen:]) {
		return h, fmt.Errorf("%w: header checksum", ErrUndoCorrupt)
	}
	if v := le.Uint32(b[8:]); v != undoVersion {
		return h, fmt.Errorf("%w: version %d", ErrUndoCorrupt, v)
	}
	copy(h.volumeID[:], b[12:28])
	h.gen = Generations{le.Uint64(b[28:]), le.Uint64(b[36:]), [2]uint64{le.Uint64(b[44:]), le.Uint64(b[52:])}}
	h.disk = DiskState(b[60])
	return h, nil
}

// urec is one undo record's header.
type urec struct {
	seq    uint64
	off, n int64
	hole   bool  // no data follows: the range was zeroes
	pos    int64 // file offset of the record
}

// dataLen is how many data bytes follow the record's header.
func (r *urec) dataLen() int64 {
	if r.hole {
		return 0
	}
	return r.n
}

func (r *urec) putHeader(b []byte, data []byte) {
	le := binary.LittleEndian
	le.PutUint32(b[0:], urecMagic)
	var flags uint32
	if r.hole {
		flags = urecHole
	}
	le.PutUint32(b[4:], flags)
	le.PutUint64(b[8:], r.seq)
	le.PutUint64(b[16:], uint64(r.off))
	le.PutUint64(b[24:], uint64(r.n))
	c := crc32.Update(crc32.Update(0, castagnoli, b[:32]), castagnoli, data)
	le.PutUint32(b[32:], c)
	le.PutUint32(b[36:], 0)
}

// decodeUrec checks a record (header and data) against the volume size.
func decodeUrec(b []byte, volSize int64) (urec, []byte, error) {
	var r urec
	if len(b) < urecHeaderSize {
		return r, nil, fmt.Errorf("%w: short record header", ErrUndoCorrupt)
	}
	le := binary.LittleEndian
	if le.Uint32(b) != urecMagic || le.Uint32(b[4:])&^urecHole != 0 || le.Uint32(b[36:]) != 0 {
		return r, nil, fmt.Errorf("%w: bad record magic", ErrUndoCorrupt)
	}
	r.hole = le.Uint32(b[4:])&urecHole != 0
	r.seq = le.Uint64(b[8:])
	off, n := le.Uint64(b[16:]), le.Uint64(b[24:])
	if n == 0 || n > undoMaxRecord || off > uint64(volSize) || n > uint64(volSize)-off {
		return r, nil, fmt.Errorf("%w: record range %d+%d", ErrUndoCorrupt, off, n)
	}
	r.off, r.n = int64(off), int64(n)
	dl := int(r.dataLen())
	if len(b) < urecHeaderSize+dl {
		return r, nil, fmt.Errorf("%w: record data truncated", ErrUndoCorrupt)
	}
	data := b[urecHeaderSize : urecHeaderSize+dl]
	if crc32.Update(crc32.Update(0, castagnoli, b[:32]), castagnoli, data) != le.Uint32(b[32:]) {
		return r, nil, fmt.Errorf("%w: record %d checksum", ErrUndoCorrupt, r.seq)
	}
	return r, data, nil
}

// undoLog is an open undo log. mu serializes saves (sync targets apply
// non-overlapping writes concurrently) and rollback.
type undoLog struct {
	path    string
	volSize int64
	hdr     undoHeader

	mu    sync.Mutex
	f     *os.File
	fd    int
	saved *bitmap.Bitmap
	end   int64
	seq   uint64
	bytes int64
	buf   []byte
	// full: a save was refused at the cap (until a restart, which may
	// bring a larger one).
	full bool
	// lastHole: the last record appended was a hole record.
	lastHole bool
}

// createUndo starts an empty log for the image described by hdr; it is
// durable (file and directory entry) before createUndo returns.
func createUndo(path string, hdr undoHeader, volSize, regionSize int64) (*undoLog, error) {
	saved, err := bitmap.New(volSize, regionSize)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create undo log: %w", err)
	}
	u := &undoLog{path: path, volSize: volSize, hdr: hdr, f: f, fd: int(f.Fd()), saved: saved, end: undoHeaderSize}
	if _, err := f.WriteAt(hdr.encode(), 0); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("write undo header: %w", err)
	}
	if err := errors.Join(unix.Fdatasync(u.fd), syncDir(path)); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("sync undo log: %w", err)
	}
	return u, nil
}

// openUndo opens an existing log; nil without one (or with only a torn
// header: nothing was overwritten before the header was durable).
func openUndo(path string, volSize, regionSize int64) (*undoLog, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open undo log: %w", err)
	}
	b := make([]byte, undoHeaderSize)
	if _, err := f.ReadAt(b, 0); err != nil {
		_ = f.Close()
		return nil, os.Remove(path)
	}
	hdr, err := decodeUndoHeader(b)
	if err != nil {
		_ = f.Close()
		return nil, os.Remove(path)
	}
	saved, err := bitmap.New(volSize, regionSize)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	u := &undoLog{path: path, volSize: volSize, hdr: hdr, f: f, fd: int(f.Fd()), saved: saved, end: undoHeaderSize}
	recs, end := u.records()
	for _, r := range recs {
		u.saved.Set(r.off, r.n)
		u.bytes += r.n
		u.seq = r.seq
	}
	u.end = end
	// Drop a torn tail so new records follow the last good one.
	if err := f.Truncate(end); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("truncate undo log: %w", err)
	}
	return u, nil
}

// records lists the valid, consecutive records and where they end.
func (u *undoLog) records() ([]urec, int64) {
	var recs []urec
	pos, seq := int64(undoHeaderSize), uint64(1)
	hdr := make([]byte, urecHeaderSize)
	for {
		if _, err := u.f.ReadAt(hdr, pos); err != nil {
			return recs, pos
		}
		hr := urec{n: int64(binary.LittleEndian.Uint64(hdr[24:])), hole: binary.LittleEndian.Uint32(hdr[4:])&urecHole != 0}
		if hr.n <= 0 || hr.n > undoMaxRecord {
			return recs, pos
		}
		r, _, err := u.read(pos, hr.dataLen())
		if err != nil || r.seq != seq || r.hole != hr.hole {
			return recs, pos
		}
		recs = append(recs, r)
		pos += urecHeaderSize + r.dataLen()
		seq++
	}
}

// read loads and checks the record at pos followed by n data bytes; the
// data aliases u.buf.
func (u *undoLog) read(pos, n int64) (urec, []byte, error) {
	if int64(cap(u.buf)) < urecHeaderSize+n {
		u.buf = make([]byte, urecHeaderSize+n)
	}
	b := u.buf[:urecHeaderSize+n]
	if _, err := u.f.ReadAt(b, pos); err != nil {
		return urec{}, nil, fmt.Errorf("read undo record at %d: %w", pos, err)
	}
	r, data, err := decodeUrec(b, u.volSize)
	r.pos = pos
	return r, data, err
}

// Look-ahead limits for a resync frame's save (see save): how far past the
// frame, in volume bytes and in pre-image bytes read and logged.
const (
	undoAheadSpan = 256 << 20
	undoAheadData = 32 << 20
)

// save appends the current contents of every region of [off, off+n) not
// saved yet, then makes them durable: call it before overwriting the
// range.
//
// ahead, if set, lists what the resync source is still to send: the
// regions that follow the range in it are saved under the same fdatasync
// (within undoAheadSpan and undoAheadData, and never past the cap), so a
// resync costs the log one sync per look-ahead, not one per frame.
// Saving a region early is safe: it still holds its pre-resync contents
// (every overwrite saves first, under mu), and a region saved but never
// overwritten rolls back to what it already holds.
func (u *undoLog) save(v *Volume, off, n int64, ahead *bitmap.Bitmap) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	rs := u.saved.RegionSize()
	lo, hi := off/rs*rs, min(v.size, (off+max(n, 1)+rs-1)/rs*rs)
	if limit := v.undoLimit(); limit > 0 {
		// Refused whole, before anything is saved or written.
		var need int64
		for p := lo; p < hi; p += rs {
			if !u.saved.Test(p, 1) {
				need += min(rs, hi-p)
			}
		}
		if need > 0 && u.bytes+need > limit {
			u.full = true
			return fmt.Errorf("%w: it holds %d bytes, the cap is %d, the write at %d needs %d more", ErrUndoFull, u.bytes, limit, off, need)
		}
	}
	wrote := false
	for p := lo; p < hi; {
		if u.saved.Test(p, 1) {
			p += rs
			continue
		}
		q := p + rs
		for q < hi && q-p < undoMaxRecord && !u.saved.Test(q, 1) {
			q += rs
		}
		q = min(q, hi)
		if err := u.appendLocked(v, p, q-p); err != nil {
			return err
		}
		wrote = true
		p = q
	}
	if !wrote {
		return nil
	}
	if ahead != nil {
		if err := u.saveAheadLocked(v, hi, ahead); err != nil {
			return err
		}
	}
	if err := unix.Fdatasync(u.fd); err != nil {
		return fmt.Errorf("fdatasync undo log: %w", err)
	}
	return nil
}

// saveAheadLocked saves the regions of ahead from `from` on, within the
// look-ahead limits and the cap; the caller syncs.
func (u *undoLog) saveAheadLocked(v *Volume, from int64, ahead *bitmap.Bitmap) error {
	rs := u.saved.RegionSize()
	limit := v.undoLimit()
	var data int64
	for cursor := from; cursor < from+undoAheadSpan && data < undoAheadData; {
		off, n, ok := ahead.NextDirty(cursor, undoMaxRecord)
		if !ok || off >= from+undoAheadSpan {
			return nil
		}
		cursor = off + n
		for p := off; p < off+n; {
			if u.saved.Test(p, 1) {
				p += rs
				continue
			}
			q := p + rs
			for q < off+n && !u.saved.Test(q, 1) {
				q += rs
			}
			q = min(q, off+n)
			if limit > 0 && u.bytes+(q-p) > limit {
				return nil // the frame that needs it gets the refusal
			}
			if err := u.appendLocked(v, p, q-p); err != nil {
				return err
			}
			if !u.lastHole {
				data += q - p
			}
			p = q
		}
	}
	return nil
}

func (u *undoLog) appendLocked(v *Volume, off, n int64) error {
	r := urec{seq: u.seq + 1, off: off, n: n, hole: v.isHole(off, n)}
	dl := r.dataLen()
	if int64(cap(u.buf)) < urecHeaderSize+dl {
		u.buf = make([]byte, urecHeaderSize+dl)
	}
	b := u.buf[:urecHeaderSize+dl]
	if err := v.pread(b[urecHeaderSize:], off); err != nil {
		return fmt.Errorf("read pre-image: %w", err)
	}
	r.putHeader(b, b[urecHeaderSize:])
	if _, err := u.f.WriteAt(b, u.end); err != nil {
		return fmt.Errorf("write undo log: %w", err)
	}
	u.seq++
	u.lastHole = r.hole
	u.end += int64(len(b))
	u.bytes += n // the range covered (a hole record stores none of it)
	u.saved.Set(off, n)
	return nil
}

// rollback writes every saved pre-image back (newest first, so that the
// oldest, the consistent image, wins should a region appear twice), makes
// the volume durable and returns the bytes restored. The log stays until
// the caller discards it, so a crash during rollback rolls back again.
func (u *undoLog) rollback(v *Volume) (int64, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	recs, _ := u.records()
	var restored int64
	for i := len(recs) - 1; i >= 0; i-- {
		r, data, err := u.read(recs[i].pos, recs[i].dataLen())
		if err != nil {
			return restored, err
		}
		if r.hole {
			if err := v.zero(r.off, r.n, true); err != nil {
				return restored, fmt.Errorf("roll back %d@%d: %w", r.n, r.off, err)
			}
		} else if err := v.pwrite(data, r.off, false); err != nil {
			return restored, fmt.Errorf("roll back %d@%d: %w", r.n, r.off, err)
		}
		restored += r.n
	}
	return restored, v.syncData()
}

func (u *undoLog) size() int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.bytes
}

// discard removes the log: after it, the resync's result stands.
func (u *undoLog) discard() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	err := u.f.Close()
	if rerr := os.Remove(u.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		err = errors.Join(err, rerr)
	}
	return errors.Join(err, syncDir(u.path))
}

func (u *undoLog) close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.f.Close()
}

// syncDir makes a directory entry change durable.
func syncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func undoPath(metaPath string) string { return metaPath + ".undo" }

// loadUndo picks up an undo log a previous run left: still the guard of
// this disk's last consistent image if the resync it protected never
// finished (the disk is Inconsistent at the generation the log saved);
// otherwise the resync finished and the log is stale.
func (v *Volume) loadUndo() error {
	u, err := openUndo(undoPath(v.meta.metaPath), v.size, v.dirty.RegionSize())
	if err != nil || u == nil {
		return err
	}
	sb := v.meta.snapshot()
	if u.hdr.volumeID != sb.volumeID || sb.disk != DiskInconsistent || sb.gen.Current != u.hdr.gen.Current {
		return u.discard()
	}
	v.undo.Store(u)
	v.log.Warn().Int64("undo_bytes", u.size()).
		Msg("resync was interrupted: the last consistent image is recoverable (promote rolls the undo log back)")
	return nil
}

// beginUndo starts protecting the local image before a resync overwrites
// it, if there is a consistent image to protect and no log already.
func (v *Volume) beginUndo() error {
	if v.undo.Load() != nil {
		return nil
	}
	d := v.Disk()
	if d != DiskUpToDate && d != DiskOutdated && d != DiskConsistent {
		return nil
	}
	sb := v.meta.snapshot()
	u, err := createUndo(undoPath(v.meta.metaPath), undoHeader{volumeID: sb.volumeID, gen: sb.gen, disk: d}, v.size, v.dirty.RegionSize())
	if err != nil {
		return err
	}
	v.undo.Store(u)
	v.log.Info().Str("disk", d.String()).Msg("resync starting: saving overwritten regions to the undo log")
	return nil
}

// applyRemote performs a peer's write, saving what it overwrites first
// while an undo log is open.
func (v *Volume) applyRemote(o op) error {
	if u := v.undo.Load(); u != nil {
		if err := u.save(v, o.off, o.n, nil); err != nil {
			return fmt.Errorf("undo log: %w", err)
		}
	}
	return v.apply(o)
}

// applyResync writes resync data (always a plain write), saving what it
// overwrites first while an undo log is open, with the regions still to
// come (ahead, may be nil) saved under the same sync; the data goes past
// the page cache where it can (direct.go).
func (v *Volume) applyResync(o op, ahead *bitmap.Bitmap) error {
	if u := v.undo.Load(); u != nil {
		if err := u.save(v, o.off, o.n, ahead); err != nil {
			return fmt.Errorf("undo log: %w", err)
		}
	}
	return v.writeResync(o.p, o.off)
}

// discardUndo drops the log once the resync's result is durable.
func (v *Volume) discardUndo() error {
	u := v.undo.Swap(nil)
	if u == nil {
		return nil
	}
	return u.discard()
}

// rollbackUndo restores the image the undo log saved and its disk state:
// the volume is again the last consistent point in time it held. Regions
// restored are marked out of sync (the peer has newer data there).
func (v *Volume) rollbackUndo() error {
	u := v.undo.Load()
	if u == nil {
		return nil
	}
	n, err := u.rollback(v)
	if err != nil {
		return fmt.Errorf("roll back the undo log: %w", err)
	}
	u.saved.Runs(func(off, length int64) bool {
		v.dirty.Set(off, length)
		return true
	})
	if err := v.al.persistAll(); err != nil {
		return err
	}
	if err := v.setDisk(u.hdr.disk); err != nil {
		return err
	}
	v.log.Warn().Int64("bytes", n).Str("disk", u.hdr.disk.String()).
		Msg("rolled back the interrupted resync: the volume is its last consistent image")
	return v.discardUndo()
}

// undoLimit is the undo log's cap in bytes (0 or less: none).
func (v *Volume) undoLimit() int64 {
	if v.link == nil {
		return 0
	}
	return v.link.cfg.UndoMaxSize
}

// undoRoom is ErrUndoFull when the open undo log cannot take one more
// region: a catch-up would stop at its first one.
func (v *Volume) undoRoom() error {
	u, limit := v.undo.Load(), v.undoLimit()
	if u == nil || limit <= 0 {
		return nil
	}
	u.mu.Lock()
	b, full := u.bytes, u.full
	u.mu.Unlock()
	if full || b+v.dirty.RegionSize() > limit {
		return fmt.Errorf("%w: it holds %d bytes, the cap is %d", ErrUndoFull, b, limit)
	}
	return nil
}

func (v *Volume) undoBytes() int64 {
	if u := v.undo.Load(); u != nil {
		return u.size()
	}
	return 0
}

// isHole reports that [off, off+n) of the backing file holds no data
// (SEEK_DATA finds none before its end), so it reads back as zeroes. Any
// doubt (a block device, an old kernel) says no: the caller then copies.
func (v *Volume) isHole(off, n int64) bool {
	next, err := unix.Seek(v.fd, off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return true // no data from off to the end of the file
	}
	return err == nil && next >= off+n
}
