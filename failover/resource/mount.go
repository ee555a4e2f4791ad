package resource

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount mounts a file system (normally the mirrored volume's NBD device)
// on Start and unmounts it on Stop.
type Mount struct {
	Device, Path, FSType string
	// Options as mount(8) takes them: flags (ro, noatime, nosuid, ...) and
	// file-system data (anything else), comma separated.
	Options string
	// Lazy detaches a busy file system on Stop (umount -l) instead of
	// failing. Off by default: a lazily unmounted file system is still
	// written by the processes holding it, after the volume was demoted.
	Lazy bool
}

// ErrBusy: Stop found the file system in use.
var ErrBusy = errors.New("file system busy")

// ErrNotMounted: Monitor found nothing (or something else) mounted.
var ErrNotMounted = errors.New("not mounted")

// Name implements Resource.
func (m *Mount) Name() string { return "mount:" + m.Path }

// mountFlags maps mount(8) options to mount(2) flags; the rest is data.
var mountFlags = map[string]uintptr{
	"ro": unix.MS_RDONLY, "rw": 0, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
	"noexec": unix.MS_NOEXEC, "sync": unix.MS_SYNCHRONOUS, "dirsync": unix.MS_DIRSYNC,
	"noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME, "relatime": unix.MS_RELATIME,
	"strictatime": unix.MS_STRICTATIME, "lazytime": unix.MS_LAZYTIME, "defaults": 0,
}

func splitOptions(opts string) (uintptr, string) {
	var flags uintptr
	var data []string
	for _, o := range strings.Split(opts, ",") {
		if o = strings.TrimSpace(o); o == "" {
			continue
		}
		if f, ok := mountFlags[o]; ok {
			flags |= f
			continue
		}
		data = append(data, o)
	}
	return flags, strings.Join(data, ",")
}

// Start implements Resource. The mount point is created if missing; the
// same device already mounted there is success.
func (m *Mount) Start(ctx context.Context) error {
	switch err := m.Monitor(ctx); {
	case err == nil:
		return nil
	case !errors.Is(err, ErrNotMounted) || m.mountedHere():
		return err // something else is mounted there, or mountinfo failed
	}
	if err := os.MkdirAll(m.Path, 0o755); err != nil {
		return fmt.Errorf("mount point: %w", err)
	}
	flags, data := splitOptions(m.Options)
	if err := unix.Mount(m.Device, m.Path, m.FSType, flags, data); err != nil {
		return fmt.Errorf("mount %s on %s (%s, %q): %w", m.Device, m.Path, m.FSType, m.Options, err)
	}
	return nil
}

// mountedHere: anything is mounted at Path.
func (m *Mount) mountedHere() bool {
	_, found, _ := m.find()
	return found
}

// Stop implements Resource. A busy file system is ErrBusy (or detached
// when Lazy); one not mounted is success.
func (m *Mount) Stop(ctx context.Context) error {
	if !m.mountedHere() {
		return nil
	}
	flags := 0
	if m.Lazy {
		flags = unix.MNT_DETACH
	}
	err := unix.Unmount(m.Path, flags)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL) && !m.mountedHere():
		return nil
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("unmount %s: %w: processes hold files or directories under it (see fuser -vm %s); set lazy: true to detach it anyway", m.Path, ErrBusy, m.Path)
	}
	return fmt.Errorf("unmount %s: %w", m.Path, err)
}

// Monitor implements Resource: Device is mounted at Path with FSType, per
// /proc/self/mountinfo.
func (m *Mount) Monitor(ctx context.Context) error {
	e, found, err := m.find()
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("%s: %w", m.Path, ErrNotMounted)
	}
	if e.fstype != m.FSType || !sameFile(e.source, m.Device) {
		return fmt.Errorf("%s: %w: %s (%s) is mounted there, not %s (%s)", m.Path, ErrNotMounted, e.source, e.fstype, m.Device, m.FSType)
	}
	return nil
}

func sameFile(a, b string) bool {
	if a == b {
		return true
	}
	ra, err1 := filepath.EvalSymlinks(a)
	rb, err2 := filepath.EvalSymlinks(b)
	return err1 == nil && err2 == nil && ra == rb
}

type mountEntry struct{ point, fstype, source string }

// find returns the topmost mount at Path.
func (m *Mount) find() (mountEntry, bool, error) {
	path := filepath.Clean(m.Path)
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return mountEntry{}, false, fmt.Errorf("mountinfo: %w", err)
	}
	defer f.Close()
	var last mountEntry
	found := false
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		e, ok := parseMountinfo(sc.Text())
		if ok && e.point == path {
			last, found = e, true // later lines are mounted on top
		}
	}
	if err := sc.Err(); err != nil {
		return mountEntry{}, false, fmt.Errorf("mountinfo: %w", err)
	}
	return last, found, nil
}

// parseMountinfo reads one line of proc(5) mountinfo:
// id parent major:minor root point options [optional...] - fstype source superopts
func parseMountinfo(line string) (mountEntry, bool) {
	f := strings.Fields(line)
	if len(f) < 10 {
		return mountEntry{}, false
	}
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if sep < 0 || sep+2 >= len(f) {
		return mountEntry{}, false
	}
	return mountEntry{point: unescape(f[4]), fstype: f[sep+1], source: unescape(f[sep+2])}, true
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
