// Package mirror owns the Volume: the local backing store behind the NBD
// export, its durability, and the dirty-region bitmap that records what the
// peer does not hold yet. Replication to peers builds on it.
package mirror

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/bitmap"
)

// Errors a Volume returns. Each wraps the errno the NBD server sends.
var (
	ErrClosed = fmt.Errorf("volume closed: %w", syscall.ESHUTDOWN)
	ErrShort  = fmt.Errorf("backing store shorter than volume: %w", syscall.EIO)
)

// Options configure Open.
type Options struct {
	// Size creates the backing file with this size if it does not exist.
	// An existing store of another size is refused: resizing is explicit.
	Size int64
	// RegionSize is the bitmap granularity (bitmap.DefaultRegionSize if 0).
	RegionSize int64
}

// Volume is the local copy of a mirrored block device. It implements the
// nbd Device, Trimmer and Zeroer interfaces.
//
// Concurrency: all methods are safe for concurrent use; overlapping writes
// land in an unspecified order, as on a disk. Buffers are not retained.
// Errors wrap a syscall.Errno; an I/O error fails the one request and does
// not fence the volume.
type Volume struct {
	path     string
	f        *os.File
	fd       int
	size     int64
	blockDev bool
	dirty    *bitmap.Bitmap
	closed   atomic.Bool
}

// Open opens (or creates, see Options.Size) the backing file or block
// device at path.
func Open(path string, opts Options) (*Volume, error) {
	if opts.RegionSize == 0 {
		opts.RegionSize = bitmap.DefaultRegionSize
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) && opts.Size > 0 {
		f, err = createSparse(path, opts.Size)
	}
	if err != nil {
		return nil, fmt.Errorf("open backing store: %w", err)
	}
	v := &Volume{path: path, f: f, fd: int(f.Fd())}
	if err := v.probe(); err != nil {
		_ = f.Close()
		return nil, err
	}
	if opts.Size > 0 && opts.Size != v.size {
		_ = f.Close()
		return nil, fmt.Errorf("backing store %s is %d bytes, configured size is %d: refusing to resize", path, v.size, opts.Size)
	}
	if v.size == 0 {
		_ = f.Close()
		return nil, fmt.Errorf("backing store %s is empty", path)
	}
	v.dirty, err = bitmap.New(v.size, opts.RegionSize)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return v, nil
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

// Dirty is the bitmap of regions written since they were last marked clean.
func (v *Volume) Dirty() *bitmap.Bitmap { return v.dirty }

// ReadAt reads len(p) bytes at off.
func (v *Volume) ReadAt(p []byte, off int64) error {
	if v.closed.Load() {
		return ErrClosed
	}
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

// WriteAt marks the range dirty, then writes it; with fua the data is on
// stable storage when WriteAt returns. Marking first means a crash between
// the two can only over-report dirty regions, never miss one.
func (v *Volume) WriteAt(p []byte, off int64, fua bool) error {
	if v.closed.Load() {
		return ErrClosed
	}
	v.dirty.Set(off, int64(len(p)))
	return v.pwrite(p, off, fua)
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

// Flush makes every completed write stable (fdatasync).
func (v *Volume) Flush() error {
	if v.closed.Load() {
		return ErrClosed
	}
	if err := unix.Fdatasync(v.fd); err != nil {
		return fmt.Errorf("fdatasync %s: %w", v.path, err)
	}
	return nil
}

// Trim discards the range; it reads back as zeroes afterwards.
func (v *Volume) Trim(off, length int64, fua bool) error {
	return v.WriteZeroes(off, length, true, fua)
}

// WriteZeroes zeroes the range, deallocating it when mayUnmap allows.
func (v *Volume) WriteZeroes(off, length int64, mayUnmap, fua bool) error {
	if v.closed.Load() {
		return ErrClosed
	}
	v.dirty.Set(off, length)
	if err := v.zero(off, length, mayUnmap); err != nil {
		return fmt.Errorf("zero %d@%d: %w", length, off, err)
	}
	if fua {
		return v.Flush()
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
		// Filesystems without hole punching or zero ranges (tmpfs on old
		// kernels, NFS): plain zero writes.
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

// Close flushes and closes the backing store. Requests after Close fail
// with ESHUTDOWN; the caller stops serving before closing.
func (v *Volume) Close() error {
	if v.closed.Swap(true) {
		return nil
	}
	err := unix.Fdatasync(v.fd)
	if cerr := v.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("close %s: %w", v.path, err)
	}
	return nil
}
