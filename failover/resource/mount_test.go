package resource

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// loopExt4 makes an ext4 image and attaches it to a loop device.
func loopExt4(t *testing.T) string {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required (scripts/deps.sh test installs it): %v", tool, err)
		}
	}
	img := filepath.Join(t.TempDir(), "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	return dev
}

func TestMount(t *testing.T) {
	dev := loopExt4(t)
	path := filepath.Join(t.TempDir(), "mnt")
	m := &Mount{Device: dev, Path: path, FSType: "ext4", Options: "noatime,errors=remount-ro"}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
	ctx := context.Background()
	if err := m.Monitor(ctx); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("monitor before start: %v", err)
	}
	if err := m.Start(ctx); err != nil {
		t.Fatalf("start: %v", err)
	}
	if err := m.Monitor(ctx); err != nil {
		t.Fatalf("monitor: %v", err)
	}
	if err := m.Start(ctx); err != nil {
		t.Fatalf("second start: %v", err)
	}
	if n := countMounts(t, path); n != 1 {
		t.Fatalf("%d mounts at %s after two starts", n, path)
	}
	if err := os.WriteFile(filepath.Join(path, "data"), []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}

	// Busy: a process holds a file open under it.
	f, err := os.Open(filepath.Join(path, "data"))
	if err != nil {
		t.Fatal(err)
	}
	err = m.Stop(ctx)
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), path) {
		t.Fatalf("stop while busy: %v, want ErrBusy naming %s", err, path)
	}
	if err := m.Monitor(ctx); err != nil {
		t.Fatalf("still mounted after the refused stop: %v", err)
	}
	f.Close()
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := m.Monitor(ctx); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("monitor after stop: %v", err)
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("second stop: %v", err)
	}

	// Back again, data there; lazy stop detaches a busy file system.
	if err := m.Start(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(path, "data")); err != nil || string(b) != "kept" {
		t.Fatalf("data after remount: %q %v", b, err)
	}
	f, err = os.Open(filepath.Join(path, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lazy := *m
	lazy.Lazy = true
	if err := lazy.Stop(ctx); err != nil {
		t.Fatalf("lazy stop: %v", err)
	}
	if err := m.Monitor(ctx); !errors.Is(err, ErrNotMounted) {
		t.Fatalf("monitor after lazy stop: %v", err)
	}
}

// Something else mounted at the path: Start refuses instead of stacking.
func TestMountOccupied(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mnt")
	os.MkdirAll(path, 0o755)
	if err := unix.Mount("tmpfs", path, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
	m := &Mount{Device: "/dev/loop-none", Path: path, FSType: "ext4"}
	err := m.Start(context.Background())
	if !errors.Is(err, ErrNotMounted) || !strings.Contains(err.Error(), "tmpfs") {
		t.Fatalf("start over tmpfs: %v", err)
	}
}

func countMounts(t *testing.T, path string) int {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if e, ok := parseMountinfo(l); ok && e.point == path {
			n++
		}
	}
	return n
}

func TestParseMountinfo(t *testing.T) {
	e, ok := parseMountinfo(`36 35 98:0 /mnt1 /mnt\040with\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue`)
	if !ok || e.point != "/mnt with space" || e.fstype != "ext3" || e.source != "/dev/root" {
		t.Fatalf("%+v %v", e, ok)
	}
	if _, ok := parseMountinfo("garbage"); ok {
		t.Fatal("garbage parsed")
	}
}

// A real chain: the mount starts, the script after it fails, and the mount
// is rolled back.
func TestChainRollbackReal(t *testing.T) {
	dev := loopExt4(t)
	path := filepath.Join(t.TempDir(), "mnt")
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
	script := writeScript(t, `echo "app refuses to $1"; exit 1`)
	c, err := Build([]Spec{
		{Type: TypeMount, Device: dev, Path: path, FSType: "ext4"},
		{Type: TypeScript, Path: script},
	}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Start(context.Background())
	var se *StartError
	var scriptErr *ScriptError
	if !errors.As(err, &se) || !errors.As(err, &scriptErr) || scriptErr.ExitCode != 1 {
		t.Fatalf("Start: %v", err)
	}
	if se.Resource != "script:"+script || len(se.RolledBack) != 1 || se.RolledBack[0] != "mount:"+path || se.RollbackErr == nil {
		// The failed script's own stop also exits 1 ("app refuses to
		// stop"): reported, not hidden.
		t.Fatalf("StartError %+v", se)
	}
	if n := countMounts(t, path); n != 0 {
		t.Fatalf("mount not rolled back: %d mounts at %s", n, path)
	}
	h := c.Monitor(context.Background())
	if !errors.Is(h[0].Err, ErrNotMounted) {
		t.Fatalf("monitor: %+v", h)
	}
}
