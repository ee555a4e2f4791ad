package tests

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The kernel block device is tested in QEMU VMs running Debian's kernel
// (this machine's kernel has no nbd module): scripts/vm/run.sh boots one
// with a script from testdata/vm and a static mirrord, and the script
// prints "MARK key value" lines that the test checks.

// staticMirrord is mirrord built without cgo, to run in the VM's initramfs
// (which has no libc for it).
var staticMirrord = sync.OnceValues(func() (string, error) {
	out := filepath.Join(filepath.Dir(mirrordBin), "static", "mirrord")
	cmd := exec.Command("go", "build", "-o", out, "../cmd/mirrord")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", &exec.ExitError{Stderr: b}
	}
	return out, nil
})

// vmResult is what a VM script reported.
type vmResult struct {
	console string
	marks   map[string]string // "MARK key rest-of-line"
	status  string            // the last "STATUS json" line
}

// runVM boots a VM running testdata/vm/script with the static mirrord and
// fails t unless the script exits 0.
func runVM(t *testing.T, script string) vmResult {
	t.Helper()
	bin, err := staticMirrord()
	if err != nil {
		t.Fatalf("static build of mirrord: %v", err)
	}
	start := time.Now()
	out, err := vmCommand(bin, script, nil).CombinedOutput()
	t.Logf("VM %s: %v", script, time.Since(start).Round(time.Second))
	if err != nil {
		t.Fatalf("scripts/vm/run.sh %s: %v\n%s", script, err, out)
	}
	return parseVM(string(out))
}

// vmCommand is scripts/vm/run.sh booting testdata/vm/script with the
// static mirrord, lib.sh and files in /test; opts go before the script.
func vmCommand(bin, script string, files []string, opts ...string) *exec.Cmd {
	args := append([]string{"-m", "768", "-t", "300"}, opts...)
	args = append(args, filepath.Join("testdata", "vm", script), bin, filepath.Join("testdata", "vm", "lib.sh"))
	args = append(args, files...)
	return exec.Command("../scripts/vm/run.sh", args...)
}

func parseVM(console string) vmResult {
	r := vmResult{console: console, marks: make(map[string]string)}
	for _, line := range strings.Split(strings.ReplaceAll(r.console, "\r", ""), "\n") {
		if rest, ok := strings.CutPrefix(line, "MARK "); ok {
			k, v, _ := strings.Cut(rest, " ")
			r.marks[k] = v
		}
		if rest, ok := strings.CutPrefix(line, "STATUS "); ok {
			r.status = rest
		}
	}
	return r
}

func (r vmResult) want(t *testing.T, key, value string) {
	t.Helper()
	if got, ok := r.marks[key]; !ok || got != value {
		t.Errorf("%s = %q (present %v), want %q\n%s", key, got, ok, value, r.console)
	}
}

// TestKernelDevice: in a VM, mirrord attaches /dev/nbd0 through netlink;
// ext4 is made, written with fsync, checked clean and read back; the
// device is a write-back cache with FUA and the server saw flushes and
// FUA writes; demotion is refused while mounted and detaches after; the
// same file system then mounts through the ioctl interface; and
// --keep-device leaves the device attached for the next mirrord, which
// finds it with nbd.device=auto.
func TestKernelDevice(t *testing.T) {
	t.Parallel()
	r := runVM(t, "device.sh")
	r.want(t, "write_cache", "write_back")
	r.want(t, "fua", "1")
	r.want(t, "backend", "mirrord:vol0")
	r.want(t, "written", "20")
	r.want(t, "demote-refused", "1")
	r.want(t, "fsck", "clean")
	r.want(t, "sums", "ok")
	r.want(t, "demoted-size", "0")
	r.want(t, "ioctl-pid", "yes")
	r.want(t, "ioctl-detached-size", "0")
	r.want(t, "kept-size", "262144")
	r.want(t, "kept-reattached", `"path":"/dev/nbd0","interface":"netlink","reattached":true`)
	r.want(t, "io-errors", "0")
	var st struct {
		NBD struct {
			Flushes   uint64 `json:"flushes"`
			FUAWrites uint64 `json:"fua_writes"`
			Errors    uint64 `json:"errors"`
		} `json:"nbd"`
		Device *struct {
			Path      string `json:"path"`
			Interface string `json:"interface"`
			Connected bool   `json:"connected"`
		} `json:"device"`
	}
	if err := json.Unmarshal([]byte(r.status), &st); err != nil {
		t.Fatalf("status %q: %v", r.status, err)
	}
	if st.NBD.Flushes == 0 || st.NBD.FUAWrites == 0 || st.NBD.Errors != 0 {
		t.Errorf("server counters: %+v; want flushes and FUA writes, no errors", st.NBD)
	}
	if st.Device == nil || st.Device.Path != "/dev/nbd0" || st.Device.Interface != "netlink" || !st.Device.Connected {
		t.Errorf("status device: %+v", st.Device)
	}
}

// TestKernelDeviceRestart: mirrord is stopped and started again, then
// killed (-9) and started again, under a mounted ext4 with an fsync'ing
// writer; the new process takes the device over, the writer sees no
// error, and every file it logged checks out.
func TestKernelDeviceRestart(t *testing.T) {
	t.Parallel()
	r := runVM(t, "restart.sh")
	for _, k := range []string{"restart1", "restart2"} {
		if _, ok := r.marks[k]; !ok {
			t.Errorf("no %s mark\n%s", k, r.console)
		}
	}
	t.Logf("I/O resumed: restart %s, after kill -9 %s", r.marks["restart1"], r.marks["restart2"])
	n, err := strconv.Atoi(r.marks["files"])
	if err != nil || n < 23 {
		t.Errorf("files = %q, want at least 23 (the first restart after 10, the second after 20, 3 more after it)", r.marks["files"])
	}
	r.want(t, "fsck", "clean")
	r.want(t, "sums", "ok")
	r.want(t, "io-errors", "0")
	r.want(t, "detached-size", "0")
	if strings.Contains(r.console, "writer-error") {
		t.Errorf("the writer saw an I/O error\n%s", r.console)
	}
}

// TestKernelDeviceSiteLoss: two VMs on one emulated segment, a synchronous
// pair with failover agents and a witness on the host. Site A is Primary
// with ext4 mounted on /dev/nbd0 and a writer logging each fsync'd file;
// its qemu is killed (site loss). B's agent wins the witness's vote and
// promotes it, /dev/nbd0 comes up as its first resource, and every file A
// logged is there with its checksum; e2fsck finds the file system clean.
func TestKernelDeviceSiteLoss(t *testing.T) {
	t.Parallel()
	bin, err := staticMirrord()
	if err != nil {
		t.Fatalf("static build of mirrord: %v", err)
	}
	start := time.Now()
	dir := t.TempDir()
	// The witness runs on the host; each VM reaches it through its second
	// NIC (user networking, the host's loopback at 10.0.2.2).
	wit := freeUDPAddr(t)
	files := []string{filepath.Join(dir, "witness.addr"), filepath.Join(dir, "witness.secret")}
	_, port, _ := strings.Cut(wit, ":")
	if err := os.WriteFile(files[0], []byte("10.0.2.2:"+port+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(files[1], []byte("vm-site-loss-witness-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	witLog, err := os.Create(filepath.Join(dir, "witness.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer witLog.Close()
	w := exec.Command(mirrordBin, "witness", "--log-format", "json", "--secret-file", files[1],
		"--listen", wit, "--state-dir", filepath.Join(dir, "witness-state"))
	w.Env = childEnv(nil)
	w.Stdout, w.Stderr = witLog, witLog
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Process.Kill(); _ = w.Wait() }()

	seg := freeTCPAddr(t)
	pidA := filepath.Join(dir, "a.pid")
	a := vmCommand(bin, "site-a.sh", files, "-u", "-i", "10.0.3.21", "-n", "socket,listen="+seg, "-p", pidA)
	aOut, err := a.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	a.Stderr = a.Stdout
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Process.Kill(); _ = a.Wait() }()
	// A's qemu listens on the segment once its pid file is written.
	waitFor(t, 2*time.Minute, "site A's qemu", func() bool {
		b, err := os.ReadFile(pidA)
		return err == nil && len(strings.TrimSpace(string(b))) > 0
	})
	var bConsole strings.Builder
	b := vmCommand(bin, "site-b.sh", files, "-u", "-i", "10.0.3.22", "-n", "socket,connect="+seg)
	b.Stdout, b.Stderr = &bConsole, &bConsole
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	bDone := make(chan error, 1)
	go func() { bDone <- b.Wait() }()

	// Read A's console until it has logged enough files, then kill it.
	logged := make(map[string]string)
	var aConsole strings.Builder
	sc := bufio.NewScanner(aOut)
	const enough = 15
	for len(logged) < enough && sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		aConsole.WriteString(line + "\n")
		if f := strings.Fields(line); len(f) == 3 && f[0] == "LOGGED" {
			logged[f[1]] = f[2]
		}
	}
	if len(logged) < enough {
		t.Fatalf("site A logged %d files before its console ended\n%s", len(logged), aConsole.String())
	}
	pb, _ := os.ReadFile(pidA)
	pid, err := strconv.Atoi(strings.TrimSpace(string(pb)))
	if err != nil {
		t.Fatalf("site A pid file: %q", pb)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill site A's qemu: %v", err)
	}
	killedAt := time.Since(start)
	_, _ = io.Copy(io.Discard, aOut)

	select {
	case err = <-bDone:
	case <-time.After(5 * time.Minute):
		_ = b.Process.Kill()
		t.Fatalf("site B did not finish\n%s", bConsole.String())
	}
	t.Logf("site loss: A killed after %v with %d files logged; B done at %v", killedAt.Round(time.Second), len(logged), time.Since(start).Round(time.Second))
	if err != nil {
		wl, _ := os.ReadFile(witLog.Name())
		t.Fatalf("site B: %v\n%s\nwitness log:\n%s", err, bConsole.String(), wl)
	}
	r := parseVM(bConsole.String())
	r.want(t, "promoted", "")
	r.want(t, "fsck", "clean")
	onB := make(map[string]string)
	for _, line := range strings.Split(r.console, "\n") {
		if f := strings.Fields(strings.TrimRight(line, "\r")); len(f) == 3 && f[0] == "FILE" {
			onB[f[1]] = f[2]
		}
	}
	for name, sum := range logged {
		if onB[name] != sum {
			t.Errorf("%s: logged on A with sha256 %s, on B %q", name, sum, onB[name])
		}
	}
	t.Logf("B: %s; %d files on B, %d logged on A", r.marks["peer-lost"], len(onB), len(logged))
}
