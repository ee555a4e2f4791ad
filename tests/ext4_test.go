package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// blockStack is an export attached as a filesystem: nbdfuse shows it as a
// file, a loop device makes that a block device, and ext4 is mounted on it.
// Layers come down in reverse order, also when a test fails half-way, so
// that no loop device or mount outlives the test.
type blockStack struct {
	t        *testing.T
	fuseDir  string // nbdfuse mountpoint
	file     string // fuseDir/nbd, the export as a file
	fuse     *exec.Cmd
	fuseDone chan struct{}
	fuseLog  string
	loop     string // /dev/loopN, or "" when detached
	mnt      string // ext4 mountpoint
	mounted  bool
}

const teardownTimeout = 20 * time.Second

// attachExport starts nbdfuse on p's unix socket and a loop device on the
// resulting file; readOnly makes the loop device read-only.
func attachExport(t *testing.T, p *proc, size int64, readOnly bool) *blockStack {
	t.Helper()
	s := &blockStack{t: t}
	// The directories are removed after teardown (cleanups run last
	// registered first).
	s.fuseDir = shortTempDir(t)
	s.mnt = shortTempDir(t)
	t.Cleanup(func() { s.detach(false) })

	s.file = filepath.Join(s.fuseDir, "nbd")
	s.fuseLog = filepath.Join(p.Dir, fmt.Sprintf("nbdfuse-%d.log", logSeq.Add(1)))
	pidFile := s.fuseLog + ".pid"
	logf, err := os.Create(s.fuseLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	bin, err := lookTool("nbdfuse")
	if err != nil {
		t.Fatal(err)
	}
	s.fuse = exec.Command(bin, "-P", pidFile, s.file, "--unix", p.Sock)
	s.fuse.Stdout, s.fuse.Stderr = logf, logf
	if err := s.fuse.Start(); err != nil {
		t.Fatalf("start nbdfuse: %v", err)
	}
	s.fuseDone = make(chan struct{})
	go func() { _ = s.fuse.Wait(); close(s.fuseDone) }()
	waitFor(t, startTimeout, "nbdfuse to write its pid file", func() bool {
		_, err := os.Stat(pidFile)
		return err == nil || s.fuseExited()
	})
	if s.fuseExited() {
		t.Fatalf("nbdfuse exited (%v):\n%s", s.fuse.ProcessState, s.log())
	}
	st, err := os.Stat(s.file)
	if err != nil {
		t.Fatalf("nbdfuse ready but %s: %v", s.file, err)
	}
	if st.Size() != size {
		t.Fatalf("%s is %d bytes, want the export size %d", s.file, st.Size(), size)
	}
	args := []string{"-f", "--show"}
	if readOnly {
		args = append(args, "-r")
	}
	s.loop = strings.TrimSpace(runCmd(t, cmdTimeout, "losetup", append(args, s.file)...))
	if !strings.HasPrefix(s.loop, "/dev/loop") {
		t.Fatalf("losetup printed %q, want a loop device", s.loop)
	}
	t.Logf("export attached: %s -> %s -> %s", p.Sock, s.file, s.loop)
	return s
}

func (s *blockStack) fuseExited() bool {
	select {
	case <-s.fuseDone:
		return true
	default:
		return false
	}
}

func (s *blockStack) log() string {
	b, _ := os.ReadFile(s.fuseLog)
	return string(b)
}

func (s *blockStack) mount(opts string) {
	s.t.Helper()
	runCmd(s.t, cmdTimeout, "mount", "-t", "ext4", "-o", opts, s.loop, s.mnt)
	s.mounted = true
}

func (s *blockStack) umount() {
	s.t.Helper()
	runCmd(s.t, cmdTimeout, "umount", s.mnt)
	s.mounted = false
}

// fsck requires e2fsck -fn to find the unmounted filesystem clean.
func (s *blockStack) fsck() {
	s.t.Helper()
	if s.mounted {
		s.t.Fatal("fsck of a mounted filesystem")
	}
	runCmd(s.t, cmdTimeout, "e2fsck", "-fn", s.loop)
}

// detach takes the stack down. strict (the test's own call) fails the test
// at the first problem; otherwise (cleanup after a failure) it reports
// problems and falls back to lazy unmounts and kill so nothing is left.
func (s *blockStack) detach(strict bool) {
	t := s.t
	t.Helper()
	fail := t.Errorf
	if strict {
		fail = t.Fatalf
	}
	if s.mounted {
		if out, err := runCmdErr(teardownTimeout, "umount", s.mnt); err != nil {
			fail("umount %s: %v\n%s", s.mnt, err, out)
			if out, err := runCmdErr(teardownTimeout, "umount", "-l", s.mnt); err != nil {
				t.Errorf("umount -l %s: %v\n%s", s.mnt, err, out)
			}
		}
		s.mounted = false
	}
	if s.loop != "" {
		if out, err := runCmdErr(teardownTimeout, "losetup", "-d", s.loop); err != nil {
			fail("losetup -d %s: %v\n%s", s.loop, err, out)
		}
		s.loop = ""
	}
	if s.fuse == nil || s.fuseExited() {
		return
	}
	// The loop device lets go of the file asynchronously (udev may still
	// hold it open for a moment), so unmounting FUSE may need retries.
	var out string
	var err error
	deadline := time.Now().Add(teardownTimeout)
	for delay := 5 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		if out, err = runCmdErr(teardownTimeout, "fusermount3", "-u", s.fuseDir); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(delay)
	}
	if err != nil {
		fail("fusermount3 -u %s: %v\n%s", s.fuseDir, err, out)
		_, _ = runCmdErr(teardownTimeout, "fusermount3", "-uz", s.fuseDir)
	}
	select {
	case <-s.fuseDone:
	case <-time.After(teardownTimeout):
		_ = s.fuse.Process.Kill()
		<-s.fuseDone
		fail("nbdfuse did not exit after unmount:\n%s", s.log())
	}
	if !s.fuse.ProcessState.Success() {
		t.Errorf("nbdfuse exited with %v:\n%s", s.fuse.ProcessState, s.log())
	}
}

// hashTree returns the sha256 of every regular file under dir by relative
// path, leaving out lost+found.
func hashTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	sums := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "lost+found" {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		s := sha256.Sum256(b)
		sums[rel] = hex.EncodeToString(s[:])
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	return sums
}

// TestExt4OverNbdfuse puts a real filesystem on the export (mkfs, files,
// fsck), restarts the daemon, and finds every file intact.
func TestExt4OverNbdfuse(t *testing.T) {
	requireRoot(t)
	requireTools(t, "nbdfuse", "fusermount3", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck")
	const size = 512 << 20
	p := startMirrordWith(t, mirrordOpts{Size: "512MiB"})
	r := newRand(t)

	s := attachExport(t, p, size, false)
	// mkfs discards the whole device first: TRIM through loop and FUSE.
	runCmd(t, cmdTimeout, "mkfs.ext4", "-q", "-F", s.loop)
	s.mount("rw")
	want := map[string]string{}
	if err := os.Mkdir(filepath.Join(s.mnt, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	total := 0
	for i := range 20 {
		var n int
		switch {
		case i < 5: // small, unaligned
			n = 1 + int(r.Uint64()%65536)
		case i < 15:
			n = 100<<10 + int(r.Uint64()%(1<<20))
		default: // several MiB
			n = 1<<20 + int(r.Uint64()%(5<<20))
		}
		name := fmt.Sprintf("file%02d", i)
		if i%2 == 1 {
			name = filepath.Join("sub", name)
		}
		data := randomBytes(r, n)
		if err := os.WriteFile(filepath.Join(s.mnt, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
		want[name] = sha256Bytes(data)
		total += n
	}
	t.Logf("wrote 20 files, %d bytes", total)
	syscall.Sync()
	s.umount()
	s.fsck()
	s.detach(true)
	p.stop()

	// The image in the backing file is itself a clean filesystem.
	runCmd(t, cmdTimeout, "e2fsck", "-fn", p.Path)

	p = p.restart(t)
	s = attachExport(t, p, size, true)
	s.mount("ro")
	got := hashTree(t, s.mnt)
	for name, sum := range want {
		if got[name] != sum {
			t.Errorf("%s after restart: sha256 %q, want %s", name, got[name], sum)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("unexpected file %s after restart", name)
		}
	}
	s.umount()
	s.fsck()
	s.detach(true)
	p.stop()
}
