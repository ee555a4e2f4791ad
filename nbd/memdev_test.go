package nbd

import (
	"bytes"
	"fmt"
	"sync"
	"syscall"
	"testing"
)

// Device operation names, as passed to the fault and hold hooks.
const (
	opRead  = "read"
	opWrite = "write"
	opFlush = "flush"
	opTrim  = "trim"
	opZero  = "zero"
)

const memPage = 4096

// memDevice is an in-memory Device (with Trimmer and Zeroer) for tests.
//
// It keeps two images: the current one (what reads see) and the stable one
// (what would survive a power cut): Flush copies every page written since
// into the stable image, a FUA write copies its own pages. Storage is
// sparse, 4 KiB pages, so a large export costs nothing until written.
//
// Any access outside [0, Size) fails the test that owns the device.
type memDevice struct {
	t    testing.TB
	size int64

	mu     sync.Mutex
	pages  map[int64][]byte // absent: zeroes
	stable map[int64][]byte
	dirty  map[int64]struct{}
	st     memStats
	fault  func(op string, off, length int64) error
	holds  []*hold
}

// memStats counts calls that reached the data (faulted calls are counted in
// faults only).
type memStats struct {
	Reads, Writes, FUAWrites, Flushes, Trims, Zeroes int
	Faults, OutOfRange                               int
	// LastMayUnmap is the mayUnmap of the last WriteZeroes.
	LastMayUnmap bool
	// FUATrims and FUAZeroes count Trim/WriteZeroes calls with fua set.
	FUATrims, FUAZeroes int
}

func newMemDevice(t testing.TB, size int64) *memDevice {
	return &memDevice{
		t:      t,
		size:   size,
		pages:  make(map[int64][]byte),
		stable: make(map[int64][]byte),
		dirty:  make(map[int64]struct{}),
	}
}

// setFault installs the fault hook: called before every operation (after
// any hold); a non-nil error fails the operation without touching data.
func (d *memDevice) setFault(f func(op string, off, length int64) error) {
	d.mu.Lock()
	d.fault = f
	d.mu.Unlock()
}

func (d *memDevice) stats() memStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.st
}

// hold blocks the device operations it matches until released. Every
// operation that blocks is announced on entered first.
type hold struct {
	match   func(op string, off, length int64) bool
	entered chan opCall
	ch      chan struct{}
	once    sync.Once
}

type opCall struct {
	Op          string
	Off, Length int64
}

func (h *hold) release() { h.once.Do(func() { close(h.ch) }) }

// holdOps makes matching operations block until the returned hold is
// released (or the device's releaseAll runs, which test servers do before
// shutting down).
func (d *memDevice) holdOps(match func(op string, off, length int64) bool) *hold {
	h := &hold{match: match, entered: make(chan opCall, 1024), ch: make(chan struct{})}
	d.mu.Lock()
	d.holds = append(d.holds, h)
	d.mu.Unlock()
	return h
}

func (d *memDevice) releaseAll() {
	d.mu.Lock()
	hs := d.holds
	d.mu.Unlock()
	for _, h := range hs {
		h.release()
	}
}

// waitEntered returns the next held operation, failing t after ioTimeout.
func (h *hold) waitEntered(t testing.TB) opCall {
	t.Helper()
	select {
	case c := <-h.entered:
		return c
	case <-deadlineC():
		t.Fatalf("no device operation reached the hold within %v", ioTimeout)
		return opCall{}
	}
}

// enter runs the range check, the holds and the fault hook.
func (d *memDevice) enter(op string, off, length int64) error {
	if op != opFlush && (off < 0 || length < 0 || off > d.size || length > d.size-off) {
		d.mu.Lock()
		d.st.OutOfRange++
		d.mu.Unlock()
		d.t.Errorf("memDevice: %s out of range: off=%d length=%d size=%d", op, off, length, d.size)
		return fmt.Errorf("memDevice: out of range: %w", syscall.EINVAL)
	}
	d.mu.Lock()
	hs := d.holds
	d.mu.Unlock()
	for _, h := range hs {
		if h.match(op, off, length) {
			select {
			case h.entered <- opCall{op, off, length}:
			default:
			}
			<-h.ch
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fault != nil {
		if err := d.fault(op, off, length); err != nil {
			d.st.Faults++
			return err
		}
	}
	return nil
}

func (d *memDevice) Size() int64 { return d.size }

func (d *memDevice) ReadAt(p []byte, off int64) error {
	if err := d.enter(opRead, off, int64(len(p))); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Reads++
	readPages(d.pages, p, off)
	return nil
}

func (d *memDevice) WriteAt(p []byte, off int64, fua bool) error {
	if err := d.enter(opWrite, off, int64(len(p))); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Writes++
	if fua {
		d.st.FUAWrites++
	}
	for done := int64(0); done < int64(len(p)); {
		pg, po := (off+done)/memPage, (off+done)%memPage
		b := d.pages[pg]
		if b == nil {
			b = make([]byte, memPage)
			d.pages[pg] = b
		}
		done += int64(copy(b[po:], p[done:]))
		d.touch(pg, fua)
	}
	return nil
}

func (d *memDevice) Flush() error {
	if err := d.enter(opFlush, 0, 0); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Flushes++
	for pg := range d.dirty {
		d.persist(pg)
	}
	clear(d.dirty)
	return nil
}

func (d *memDevice) Trim(off, length int64, fua bool) error {
	if err := d.enter(opTrim, off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Trims++
	if fua {
		d.st.FUATrims++
	}
	d.zeroRange(off, length, fua)
	return nil
}

func (d *memDevice) WriteZeroes(off, length int64, mayUnmap, fua bool) error {
	if err := d.enter(opZero, off, length); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.st.Zeroes++
	d.st.LastMayUnmap = mayUnmap
	if fua {
		d.st.FUAZeroes++
	}
	d.zeroRange(off, length, fua)
	return nil
}

// zeroRange zeroes [off, off+length); whole pages are dropped. d.mu held.
func (d *memDevice) zeroRange(off, length int64, fua bool) {
	for end := off + length; off < end; {
		pg, po := off/memPage, off%memPage
		n := min(memPage-po, end-off)
		if po == 0 && n == memPage {
			delete(d.pages, pg)
		} else if b := d.pages[pg]; b != nil {
			clear(b[po : po+n])
		}
		d.touch(pg, fua)
		off += n
	}
}

// touch records a change to page pg; with fua it is made stable now.
func (d *memDevice) touch(pg int64, fua bool) {
	if fua {
		d.persist(pg)
		delete(d.dirty, pg)
		return
	}
	d.dirty[pg] = struct{}{}
}

func (d *memDevice) persist(pg int64) {
	if b := d.pages[pg]; b != nil {
		d.stable[pg] = bytes.Clone(b)
	} else {
		delete(d.stable, pg)
	}
}

func readPages(pages map[int64][]byte, p []byte, off int64) {
	for done := int64(0); done < int64(len(p)); {
		pg, po := (off+done)/memPage, (off+done)%memPage
		n := min(memPage-po, int64(len(p))-done)
		if b := pages[pg]; b != nil {
			copy(p[done:done+n], b[po:])
		} else {
			clear(p[done : done+n])
		}
		done += n
	}
}

// contents returns n bytes of the current image at off.
func (d *memDevice) contents(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := make([]byte, n)
	readPages(d.pages, p, off)
	return p
}

// stableContents returns n bytes of the stable image at off.
func (d *memDevice) stableContents(off, n int64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := make([]byte, n)
	readPages(d.stable, p, off)
	return p
}

// fill writes p at off directly (no stats, no hooks) and makes it stable.
func (d *memDevice) fill(p []byte, off int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for done := int64(0); done < int64(len(p)); {
		pg, po := (off+done)/memPage, (off+done)%memPage
		b := d.pages[pg]
		if b == nil {
			b = make([]byte, memPage)
			d.pages[pg] = b
		}
		done += int64(copy(b[po:], p[done:]))
		d.persist(pg)
	}
}

// plainDevice exposes only the Device methods of a memDevice, so the server
// has to fall back for TRIM (no-op) and WRITE_ZEROES (zero WriteAt).
type plainDevice struct{ m *memDevice }

func (p plainDevice) Size() int64                                 { return p.m.Size() }
func (p plainDevice) ReadAt(b []byte, off int64) error            { return p.m.ReadAt(b, off) }
func (p plainDevice) WriteAt(b []byte, off int64, fua bool) error { return p.m.WriteAt(b, off, fua) }
func (p plainDevice) Flush() error                                { return p.m.Flush() }

var (
	_ Device  = (*memDevice)(nil)
	_ Trimmer = (*memDevice)(nil)
	_ Zeroer  = (*memDevice)(nil)
	_ Device  = plainDevice{}
)
