package tests

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// mirrordBin is the binary under test, built once by TestMain.
var mirrordBin string

// raceBuild reports whether the binary was built with -race (E2E_RACE=1).
var raceBuild = os.Getenv("E2E_RACE") == "1"

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "mirrord-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "tests:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	mirrordBin = filepath.Join(dir, "mirrord")
	args := []string{"build", "-o", mirrordBin}
	if raceBuild {
		args = append(args, "-race")
	}
	args = append(args, "../cmd/mirrord")
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	if out, err := exec.Command(goBin, args...).CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "tests: go %s: %v\n%s", strings.Join(args, " "), err, out)
		return 1
	}
	return m.Run()
}

// Deadlines. Generous, because a -race build on two busy cores is slow; a
// healthy run never waits for them.
const (
	startTimeout = 30 * time.Second
	// stopTimeout exceeds the daemon's 30 s shutdown grace, so a timeout
	// here means it hung, not that it was slow to cut clients.
	stopTimeout = 45 * time.Second
	cmdTimeout  = 2 * time.Minute
)

// mirrordOpts describes one daemon. The zero value is a fresh 1 GiB volume
// in a new private directory, reachable over a unix socket and a free TCP
// port on 127.0.0.1, with its control socket in that directory (the
// default, /run/mirrord/vol0.ctl, would make parallel daemons collide).
type mirrordOpts struct {
	Dir   string   // private directory; a new temporary one if empty
	Path  string   // backing file; Dir/vol.img if empty
	Size  string   // --size; "1GiB" if empty; "-" leaves the flag out
	Sock  string   // unix socket; Dir/nbd.sock if empty; "-" for none
	Ctl   string   // control socket; Dir/ctl.sock if empty; "-" leaves it to the config
	NoTCP bool     // no TCP listener
	Args  []string // appended after the harness's own flags
	// Env adds KEY=VALUE pairs. The test process's own MIRRORD_* variables
	// (E2E_RACE) are never passed on: the daemon rejects unknown ones.
	Env []string
}

// proc is one running (or exited) mirrord.
type proc struct {
	t    testing.TB
	opts mirrordOpts
	Dir  string // private directory (holds the logs)
	Path string // backing file
	Sock string // unix socket, or ""
	TCP  string // 127.0.0.1:port, or ""
	Ctl  string // control socket, or "" if the config chose it

	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited
}

var logSeq atomic.Int64

// startMirrord starts a daemon with default options plus extra args.
func startMirrord(t testing.TB, args ...string) *proc {
	t.Helper()
	return startMirrordWith(t, mirrordOpts{Args: args})
}

// startMirrordWith starts a daemon and waits until every listener accepts.
// The daemon is stopped (SIGTERM, exit 0 expected) when the test ends if
// the test has not stopped it; its log is dumped if the test failed.
func startMirrordWith(t testing.TB, o mirrordOpts) *proc {
	t.Helper()
	if o.Dir == "" {
		o.Dir = shortTempDir(t)
	}
	if o.Path == "" {
		o.Path = filepath.Join(o.Dir, "vol.img")
	}
	if o.Size == "" {
		o.Size = "1GiB"
	}
	if o.Sock == "" {
		o.Sock = filepath.Join(o.Dir, "nbd.sock")
	}
	if o.Ctl == "" {
		o.Ctl = filepath.Join(o.Dir, "ctl.sock")
	}
	var err error
	for range 5 {
		var p *proc
		p, err = launch(t, o)
		if err == nil {
			return p
		}
		// The free port we probed was taken before the daemon bound it:
		// pick another. Anything else is a real failure.
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("start mirrord: %v", err)
	return nil
}

func launch(t testing.TB, o mirrordOpts) (*proc, error) {
	t.Helper()
	p := &proc{t: t, opts: o, Dir: o.Dir, Path: o.Path}
	args := []string{"run", "--path", o.Path, "--set", "log.format=json"}
	if o.Size != "-" {
		args = append(args, "--size", o.Size)
	}
	if o.Ctl != "-" {
		p.Ctl = o.Ctl
		args = append(args, "--set", "control.socket="+o.Ctl)
	}
	var listen []string
	if o.Sock != "-" {
		p.Sock = o.Sock
		listen = append(listen, "unix:"+o.Sock)
	}
	if !o.NoTCP {
		p.TCP = freeTCPAddr(t)
		listen = append(listen, "tcp:"+p.TCP)
	}
	if len(listen) > 0 {
		args = append(args, "--listen", strings.Join(listen, ","))
	}
	args = append(args, o.Args...)

	p.logPath = filepath.Join(o.Dir, fmt.Sprintf("mirrord-%d.log", logSeq.Add(1)))
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	p.cmd = exec.Command(mirrordBin, args...)
	p.cmd.Stdout = logf
	p.cmd.Stderr = logf
	p.cmd.Env = childEnv(o.Env)
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	p.done = make(chan struct{})
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Logf("started mirrord pid %d: %s", p.cmd.Process.Pid, strings.Join(args, " "))

	deadline := time.Now().Add(startTimeout)
	for !p.accepting() {
		if p.exited() {
			p.cleanupCheck()
			return nil, fmt.Errorf("mirrord exited (%v) before serving:\n%s", p.cmd.ProcessState, p.log())
		}
		if time.Now().After(deadline) {
			p.forceKill()
			return nil, fmt.Errorf("mirrord not accepting on %s / %s / %s after %v:\n%s", p.Sock, p.TCP, p.Ctl, startTimeout, p.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() {
		if !p.exited() {
			if code, err := p.terminate(stopTimeout); err != nil || code != 0 {
				t.Errorf("mirrord pid %d at cleanup: SIGTERM gave exit code %d, err %v (want 0)", p.cmd.Process.Pid, code, err)
			}
		}
		p.cleanupCheck()
	})
	return p, nil
}

// cleanupCheck fails the test on a race report and dumps the log of a
// failed test.
func (p *proc) cleanupCheck() {
	log := p.log()
	if strings.Contains(log, "WARNING: DATA RACE") {
		p.t.Errorf("mirrord pid %d reported a data race", p.cmd.Process.Pid)
	}
	if p.t.Failed() {
		p.t.Logf("mirrord pid %d log (%s):\n%s", p.cmd.Process.Pid, p.logPath, log)
	}
}

// restart starts a new daemon on the same directory, backing file, socket
// and options (a new TCP port). The old one must have exited.
func (p *proc) restart(t testing.TB) *proc {
	t.Helper()
	if !p.exited() {
		t.Fatalf("restart: mirrord pid %d still running", p.cmd.Process.Pid)
	}
	return startMirrordWith(t, p.opts)
}

func (p *proc) accepting() bool {
	for _, a := range [][2]string{{"unix", p.Sock}, {"tcp", p.TCP}, {"unix", p.Ctl}} {
		if a[1] == "" {
			continue
		}
		c, err := net.DialTimeout(a[0], a[1], time.Second)
		if err != nil {
			return false
		}
		_ = c.Close()
	}
	return true
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// log returns everything the daemon wrote to stdout and stderr so far.
func (p *proc) log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	return string(b)
}

// waitLog waits until the log contains s.
func (p *proc) waitLog(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("mirrord log to contain %q", s), func() bool {
		return strings.Contains(p.log(), s)
	})
}

// stop sends SIGTERM and requires a clean exit (code 0) within stopTimeout.
func (p *proc) stop() {
	p.t.Helper()
	start := time.Now()
	code, err := p.terminate(stopTimeout)
	if err != nil {
		p.t.Fatalf("stop mirrord pid %d: %v", p.cmd.Process.Pid, err)
	}
	if code != 0 {
		p.t.Fatalf("mirrord pid %d exited with code %d after SIGTERM, want 0 (%v)", p.cmd.Process.Pid, code, p.cmd.ProcessState)
	}
	p.t.Logf("mirrord pid %d stopped cleanly in %v", p.cmd.Process.Pid, time.Since(start).Round(time.Millisecond))
}

// terminate sends SIGTERM and waits. On timeout it asks for a goroutine
// dump (SIGQUIT, into the log) and kills the process.
func (p *proc) terminate(timeout time.Duration) (int, error) {
	if p.exited() {
		return p.cmd.ProcessState.ExitCode(), fmt.Errorf("had already exited (%v) before SIGTERM", p.cmd.ProcessState)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode(), nil
	case <-time.After(timeout):
	}
	_ = p.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.forceKill()
	}
	return -1, fmt.Errorf("no exit within %v of SIGTERM (SIGQUIT sent for a goroutine dump)", timeout)
}

// kill sends SIGKILL and waits for the process to be gone: a crash.
func (p *proc) kill() {
	p.t.Helper()
	if p.exited() {
		p.t.Fatalf("kill: mirrord pid %d had already exited (%v)", p.cmd.Process.Pid, p.cmd.ProcessState)
	}
	p.forceKill()
}

func (p *proc) forceKill() {
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.t.Errorf("mirrord pid %d survived SIGKILL for 10s", p.cmd.Process.Pid)
	}
}

// admin runs an admin command (status, promote, ...) against this daemon's
// control socket and returns its output and error.
func (p *proc) admin(timeout time.Duration, cmd string, args ...string) (string, error) {
	if p.Ctl == "" {
		return "", errors.New("admin: daemon has no known control socket")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c := exec.CommandContext(ctx, mirrordBin, append([]string{cmd, "--control", p.Ctl}, args...)...)
	c.Env = childEnv(nil)
	c.WaitDelay = 5 * time.Second
	out, err := c.CombinedOutput()
	return string(out), err
}

// unixURI is the NBD URI of export name over the unix socket.
func (p *proc) unixURI() string { return p.unixURIName("vol0") }

func (p *proc) unixURIName(name string) string {
	return "nbd+unix:///" + name + "?socket=" + p.Sock
}

// tcpURI is the NBD URI of export vol0 over TCP.
func (p *proc) tcpURI() string { return "nbd://" + p.TCP + "/vol0" }

// childEnv is the test's environment without MIRRORD_* variables, plus
// extra.
func childEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MIRRORD_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// shortTempDir is a private directory removed when the test ends. It lives
// directly under the system temp dir so that unix socket paths in it stay
// far below the 108-byte limit whatever the test's name.
func shortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mirrord-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// freeTCPAddr returns a loopback address with a port nobody listens on now.
//
// The port comes from below the kernel's ephemeral range (32768 up on
// Linux): port 0 would hand out one from inside it, where any outgoing
// connection of a parallel test can take it before the daemon binds it.
func freeTCPAddr(t testing.TB) string {
	t.Helper()
	for range 1000 {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		_ = l.Close()
		return addr
	}
	t.Fatal("no free TCP port between 20000 and 32000 on 127.0.0.1")
	return ""
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for delay := time.Millisecond; !cond(); delay = min(2*delay, 50*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(delay)
	}
}

// Tools. A missing one is a failure, never a skip: CI installs them all.

var toolPackages = map[string]string{
	"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdfuse": "libnbd-bin",
	"qemu-io": "qemu-utils", "qemu-img": "qemu-utils", "qemu-nbd": "qemu-utils",
	"fio": "fio", "fusermount3": "fuse3",
	"mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs",
	"losetup": "mount", "mount": "mount", "umount": "mount",
}

// lookTool finds a tool in PATH or in the sbin directories a non-root PATH
// lacks.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in PATH or sbin", name)
}

// requireTools fails the test, naming the tool and its Debian package, if
// any tool is missing.
func requireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := lookTool(tool); err != nil {
			pkg := toolPackages[tool]
			if pkg == "" {
				pkg = "?"
			}
			t.Fatalf("required tool %s is missing (Debian package %s): %v", tool, pkg, err)
		}
	}
}

// requireRoot fails tests that need loop devices and mounts.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (loop devices, mounts); euid is %d", os.Geteuid())
	}
}

// runCmd runs a tool with a timeout and fails the test with its combined
// output if it fails.
func runCmd(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runCmdErr(timeout, name, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmdLine(name, args), err, out)
	}
	return out
}

// runCmdErr runs a tool with a timeout and returns its combined output.
func runCmdErr(timeout time.Duration, name string, args ...string) (string, error) {
	path, err := lookTool(name)
	if err != nil {
		return "", fmt.Errorf("required tool missing (Debian package %s): %w", toolPackages[name], err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return string(out), err
}

func cmdLine(name string, args []string) string {
	q := []string{name}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t'\"?&;$*") {
			a = strconv.Quote(a)
		}
		q = append(q, a)
	}
	return strings.Join(q, " ")
}

// Data helpers.

// newRand returns a fast seeded generator and logs the seed.
func newRand(t testing.TB) *rand.ChaCha8 {
	t.Helper()
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], uint64(time.Now().UnixNano()))
	t.Logf("random seed %x", seed[:8])
	return rand.NewChaCha8(seed)
}

func randomBytes(r *rand.ChaCha8, n int) []byte {
	b := make([]byte, n)
	_, _ = r.Read(b)
	return b
}

// writeRandomFile writes size random bytes to path and returns their
// sha256.
func writeRandomFile(t testing.TB, r *rand.ChaCha8, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for left := size; left > 0; {
		k := min(left, int64(len(buf)))
		_, _ = r.Read(buf[:k])
		h.Write(buf[:k])
		if _, err := f.Write(buf[:k]); err != nil {
			t.Fatal(err)
		}
		left -= k
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// sha256File hashes n bytes of path from off; the file must hold them all.
func sha256File(t testing.TB, path string, off, n int64) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	got, err := io.Copy(h, io.NewSectionReader(f, off, n))
	if err != nil {
		t.Fatalf("hash %s: %v", path, err)
	}
	if got != n {
		t.Fatalf("hash %s: only %d of %d bytes at offset %d", path, got, n, off)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func sha256Bytes(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// sha256Zeroes is the hash of n zero bytes.
func sha256Zeroes(n int64) string {
	h := sha256.New()
	_, _ = io.CopyN(h, zeroReader{}, n)
	return hex.EncodeToString(h.Sum(nil))
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// readFileAt reads n bytes of path at off.
func readFileAt(t testing.TB, path string, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatalf("read %s %d@%d: %v", path, n, off, err)
	}
	return b
}

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// firstDiff describes where two buffers first differ, for failure messages.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d: got %#02x, want %#02x", i, got[i], want[i])
		}
	}
	return "equal"
}

// collect gathers errors from goroutines so the test goroutine reports them.
type collect struct {
	mu   sync.Mutex
	errs []error
}

func (c *collect) add(err error) {
	if err == nil {
		return
	}
	c.mu.Lock()
	c.errs = append(c.errs, err)
	c.mu.Unlock()
}

func (c *collect) report(t testing.TB) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, err := range c.errs {
		if i == 10 {
			t.Errorf("... and %d more errors", len(c.errs)-10)
			break
		}
		t.Error(err)
	}
}

// runScript runs one of our bash scripts to the end and returns what it
// printed; a failure, or still running after limit, fails the test.
func runScript(t *testing.T, limit time.Duration, env []string, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", script)
	cmd.Env = env
	// A child the script left behind must not hold the output pipe open.
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s did not finish in %v:\n%s", script, limit, out)
	}
	if err != nil {
		t.Fatalf("%s: %v\n%s", script, err, out)
	}
	return string(out)
}
