package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// nbdinfoJSON is the part of `nbdinfo --json` the tests look at.
type nbdinfoJSON struct {
	Protocol string `json:"protocol"`
	Exports  []struct {
		Name        string `json:"export-name"`
		Description string `json:"description"`
		ReadOnly    bool   `json:"is_read_only"`
		CanFlush    bool   `json:"can_flush"`
		CanFUA      bool   `json:"can_fua"`
		CanTrim     bool   `json:"can_trim"`
		CanZero     bool   `json:"can_zero"`
		CanMulti    bool   `json:"can_multi_conn"`
		BlockMin    int64  `json:"block_size_minimum"`
		BlockPref   int64  `json:"block_size_preferred"`
		BlockMax    int64  `json:"block_size_maximum"`
		Size        int64  `json:"export-size"`
	} `json:"exports"`
}

func nbdinfo(t *testing.T, args ...string) nbdinfoJSON {
	t.Helper()
	out := runCmd(t, cmdTimeout, "nbdinfo", append([]string{"--json"}, args...)...)
	var info nbdinfoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json %v: %v\n%s", args, err, out)
	}
	if len(info.Exports) == 0 {
		t.Fatalf("nbdinfo --json %v: no exports\n%s", args, out)
	}
	return info
}

func TestNbdinfoFlags(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo", "nbdcopy", "qemu-io")
	p := startMirrord(t)
	p.waitLog(t, `"message":"serving"`, startTimeout)

	// The export vol0 by name over both transports, and the default export
	// ("" is what clients send when the URI names none).
	for _, uri := range []string{p.unixURI(), p.tcpURI(), p.unixURIName(""), "nbd://" + p.TCP} {
		info := nbdinfo(t, uri)
		e := info.Exports[0]
		if info.Protocol != "newstyle-fixed" {
			t.Errorf("%s: protocol %q, want newstyle-fixed", uri, info.Protocol)
		}
		if !e.CanFlush || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanMulti || e.ReadOnly {
			t.Errorf("%s: flags %+v: want can_flush, can_fua, can_trim, can_zero, can_multi_conn true and is_read_only false", uri, e)
		}
		if e.Size != 1<<30 {
			t.Errorf("%s: export-size %d, want %d", uri, e.Size, 1<<30)
		}
		// Minimum 1 (any alignment), preferred 4 KiB, maximum 32 MiB (the
		// largest payload the NBD spec asks servers to take).
		if e.BlockMin != 1 || e.BlockPref != 4096 || e.BlockMax != 32<<20 {
			t.Errorf("%s: block sizes min %d pref %d max %d, want 1/4096/%d", uri, e.BlockMin, e.BlockPref, e.BlockMax, 32<<20)
		}
	}

	list := nbdinfo(t, "--list", p.unixURIName(""))
	if len(list.Exports) != 1 || list.Exports[0].Name != "vol0" {
		t.Errorf("nbdinfo --list: exports %+v, want exactly vol0", list.Exports)
	}
	if out := runCmd(t, cmdTimeout, "nbdinfo", "--list", p.tcpURI()); !strings.Contains(out, `export="vol0"`) {
		t.Errorf("nbdinfo --list over TCP does not show export vol0:\n%s", out)
	}
	p.stop()

	t.Run("read-only", func(t *testing.T) {
		ro := startMirrord(t, "--set", "nbd.read-only=true")
		e := nbdinfo(t, ro.unixURI()).Exports[0]
		if !e.ReadOnly {
			t.Errorf("read-only export: is_read_only false")
		}
		// Well-behaved clients refuse on their own...
		if out, err := runCmdErr(cmdTimeout, "qemu-io", "-f", "raw", ro.unixURI(), "-c", "write -P 0x5a 0 64k"); err == nil {
			t.Errorf("qemu-io write to a read-only export succeeded:\n%s", out)
		}
		src := filepath.Join(ro.Dir, "src")
		writeRandomFile(t, newRand(t), src, 1<<20)
		if out, err := runCmdErr(cmdTimeout, "nbdcopy", src, ro.tcpURI()); err == nil {
			t.Errorf("nbdcopy to a read-only export succeeded:\n%s", out)
		}
		// ...so the server's own refusal needs a client that ignores the
		// READ_ONLY flag: every modifying command gets EPERM, reads work.
		c, err := dialNBD("unix", ro.Sock, "vol0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if c.Flags&tflagReadOnly == 0 {
			t.Errorf("transmission flags %#x lack READ_ONLY", c.Flags)
		}
		payload := bytes.Repeat([]byte{0x5a}, 65536)
		if errno, err := c.writeAt(0, payload, 0); err != nil || errno != errnoPerm {
			t.Errorf("WRITE on read-only export: errno %d, err %v; want %d (EPERM)", errno, err, errnoPerm)
		}
		if errno, err := c.writeAt(4096, payload[:4096], cmdFlagFUA); err != nil || errno != errnoPerm {
			t.Errorf("FUA WRITE on read-only export: errno %d, err %v; want EPERM", errno, err)
		}
		for _, cmd := range []uint16{cmdTrim, cmdWriteZeroes} {
			if errno, _, err := c.do(cmd, 0, 0, 65536, nil); err != nil || errno != errnoPerm {
				t.Errorf("command %d on read-only export: errno %d, err %v; want EPERM", cmd, errno, err)
			}
		}
		data, err := c.mustRead(0, 65536)
		if err != nil {
			t.Fatalf("read on read-only export after refused writes: %v", err)
		}
		if !bytes.Equal(data, make([]byte, 65536)) {
			t.Errorf("read-only export changed by a refused write: %s", firstDiff(data, make([]byte, 65536)))
		}
		if err := c.disconnect(); err != nil {
			t.Error(err)
		}
		ro.stop()
		if got := sha256File(t, ro.Path, 0, 1<<20); got != sha256Zeroes(1<<20) {
			t.Errorf("backing file of the read-only export was modified")
		}
	})
}

func TestNbdcopyRoundTrip(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdcopy")
	const exportSize, dataSize = 128 << 20, 64 << 20
	p := startMirrordWith(t, mirrordOpts{Size: "128MiB"})
	src := filepath.Join(p.Dir, "src.bin")
	sum := writeRandomFile(t, newRand(t), src, dataSize)

	// In over the unix socket (nbdcopy uses several connections when the
	// server allows multi-conn), out over TCP.
	runCmd(t, cmdTimeout, "nbdcopy", "--flush", src, p.unixURI())
	out := filepath.Join(p.Dir, "out.bin")
	runCmd(t, cmdTimeout, "nbdcopy", p.tcpURI(), out)
	if n := fileSize(t, out); n != exportSize {
		t.Fatalf("copied out %d bytes, want the whole export (%d)", n, exportSize)
	}
	if got := sha256File(t, out, 0, dataSize); got != sum {
		t.Errorf("sha256 of data read back = %s, want %s", got, sum)
	}
	if got := sha256File(t, out, dataSize, exportSize-dataSize); got != sha256Zeroes(exportSize-dataSize) {
		t.Errorf("the part of the export never written does not read back as zeroes")
	}
	p.stop()
	if n := fileSize(t, p.Path); n != exportSize {
		t.Errorf("backing file is %d bytes, want %d", n, exportSize)
	}
	if got := sha256File(t, p.Path, 0, dataSize); got != sum {
		t.Errorf("sha256 of the backing file's first 64 MiB = %s, want %s", got, sum)
	}
}

// qemuIO runs qemu-io on uri and requires that every command succeeded and
// every pattern verified.
func qemuIO(t *testing.T, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw", uri}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out := runCmd(t, cmdTimeout, "qemu-io", args...)
	for _, bad := range []string{"Pattern verification failed", "failed", "error", "Error"} {
		if strings.Contains(out, bad) {
			t.Fatalf("qemu-io %v: output contains %q:\n%s", cmds, bad, out)
		}
	}
	return out
}

func TestQemuIOPattern(t *testing.T) {
	t.Parallel()
	requireTools(t, "qemu-io")
	p := startMirrord(t)
	const M = 1 << 20

	// Fill first, so that zeroing and discarding have something to undo.
	qemuIO(t, p.unixURI(), "write -P 0x77 0 8M", "flush")
	qemuIO(t, p.unixURI(),
		"write -P 0xab 0 1M",
		"write -P 0xcd 1M 1M",
		"write -z 2M 1M",
		"discard 3M 1M",
		"write -f -P 0x11 4M 64k",    // FUA
		"write -z -f 4160k 64k",      // FUA write-zeroes (4M+64k)
		"write -z -u 4224k 64k",      // write-zeroes that may unmap
		"write -P 0x42 5242881 1000", // unaligned: 5M+1
		"aio_write -P 0x21 6M 64k",   // several in flight on one connection
		"aio_write -P 0x22 6208k 64k",
		"aio_write -P 0x23 6272k 64k",
		"aio_flush",
		"flush",
	)
	// A new connection, over TCP, sees all of it.
	qemuIO(t, p.tcpURI(),
		"read -P 0xab 0 1M",
		"read -P 0xcd 1M 1M",
		"read -P 0 2M 2M",
		"read -P 0x11 4M 64k",
		"read -P 0 4160k 128k",
		"read -P 0x77 4288k 832k", // untouched up to 5M+1
		"read -P 0x77 5M 1",
		"read -P 0x42 5242881 1000",
		"read -P 0x77 5243881 1047575", // the rest of that MiB
		"read -P 0x21 6M 64k",
		"read -P 0x22 6208k 64k",
		"read -P 0x23 6272k 64k",
		"read -P 0x77 6336k 1856k", // up to 8M
	)
	// The pattern check bites: a wrong expectation fails.
	if out, err := runCmdErr(cmdTimeout, "qemu-io", "-f", "raw", p.unixURI(), "-c", "read -P 0xac 0 1M"); err == nil || !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io accepted a wrong pattern (err %v):\n%s", err, out)
	}
	// The commands went over the wire as themselves, not emulated by
	// qemu with plain writes: the daemon counted each kind.
	out, err := p.admin(cmdTimeout, "status", "--json")
	if err != nil {
		t.Fatalf("mirrord status --json: %v\n%s", err, out)
	}
	var st struct {
		NBD struct {
			Flushes     uint64 `json:"flushes"`
			FUAWrites   uint64 `json:"fua_writes"`
			Trims       uint64 `json:"trims"`
			WriteZeroes uint64 `json:"write_zeroes"`
		} `json:"nbd"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("mirrord status --json: %v\n%s", err, out)
	}
	if n := st.NBD; n.Flushes == 0 || n.FUAWrites == 0 || n.Trims == 0 || n.WriteZeroes == 0 {
		t.Errorf("server counters %+v: want flushes, FUA writes, trims and write-zeroes all seen", n)
	}
	p.stop()

	// And the backing file holds the same bytes.
	file := readFileAt(t, p.Path, 0, 8*M)
	want := bytes.Repeat([]byte{0x77}, 8*M)
	copy(want[0:], bytes.Repeat([]byte{0xab}, M))
	copy(want[M:], bytes.Repeat([]byte{0xcd}, M))
	clear(want[2*M : 4*M])
	copy(want[4*M:], bytes.Repeat([]byte{0x11}, 64<<10))
	clear(want[4160<<10 : 4288<<10])
	copy(want[5*M+1:], bytes.Repeat([]byte{0x42}, 1000))
	copy(want[6*M:], bytes.Repeat([]byte{0x21}, 64<<10))
	copy(want[6208<<10:], bytes.Repeat([]byte{0x22}, 64<<10))
	copy(want[6272<<10:], bytes.Repeat([]byte{0x23}, 64<<10))
	if !bytes.Equal(file, want) {
		t.Errorf("backing file after stop: %s", firstDiff(file, want))
	}
}

// fioResult is the part of fio's JSON output the tests look at.
type fioResult struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"read"`
		Write struct {
			IOBytes int64 `json:"io_bytes"`
		} `json:"write"`
	} `json:"jobs"`
}

// runFio runs fio with JSON output to a file and returns the parsed result
// and fio's other output (errors, verify failures), and whether it failed.
func runFio(t *testing.T, dir string, args ...string) (fioResult, string, error) {
	t.Helper()
	outFile := filepath.Join(dir, "fio.json")
	_ = os.Remove(outFile)
	// No verify state files: fio would leave them in the working directory
	// (the source tree) whenever a job fails.
	out, err := runCmdErr(cmdTimeout, "fio", append([]string{"--output-format=json", "--output=" + outFile, "--verify_state_save=0"}, args...)...)
	var res fioResult
	b, rerr := os.ReadFile(outFile)
	if rerr == nil {
		// fio may print notes before the JSON document
		if i := bytes.IndexByte(b, '{'); i >= 0 {
			b = b[i:]
		}
		// and notes after it: decode one document, ignore the rest.
		if jerr := json.NewDecoder(bytes.NewReader(b)).Decode(&res); jerr != nil && err == nil {
			t.Fatalf("fio JSON: %v\n%s\n%s", jerr, b, out)
		}
	}
	return res, out, err
}

func TestFioVerify(t *testing.T) {
	t.Parallel()
	requireTools(t, "fio", "qemu-io")
	p := startMirrord(t)
	const jobSize = 64 << 20
	// Two jobs of four processes each, every process its own connection
	// and its own 64 MiB: 4 KiB writes over the unix socket on 0..256M,
	// 64 KiB writes over TCP on 256M..512M, all at once.
	jobs := func(p *proc, extra ...string) []string {
		a := []string{"--ioengine=nbd", "--rw=randwrite", "--iodepth=32", "--numjobs=4",
			"--size=64M", "--offset_increment=64M", "--verify=crc32c"}
		a = append(a, extra...)
		return append(a,
			"--name=rand4k", "--uri="+p.unixURI(), "--bs=4k", "--offset=0",
			"--name=rand64k", "--uri="+p.tcpURI(), "--bs=64k", "--offset=256M")
	}
	// wantWrite < 0: a verify-only pass (fio still reports its phantom
	// writes).
	check := func(what string, res fioResult, out string, err error, wantWrite int64) {
		t.Helper()
		if err != nil {
			var jobs []string
			for _, j := range res.Jobs {
				jobs = append(jobs, fmt.Sprintf("%s: error %d, wrote %d, read %d", j.Name, j.Error, j.Write.IOBytes, j.Read.IOBytes))
			}
			t.Fatalf("fio %s: %v\n%s\njobs:\n%s", what, err, out, strings.Join(jobs, "\n"))
		}
		if strings.Contains(out, "verify") || strings.Contains(out, "bad magic") {
			t.Errorf("fio %s reported verify errors:\n%s", what, out)
		}
		if len(res.Jobs) != 8 {
			t.Fatalf("fio %s: %d job reports, want 8\n%s", what, len(res.Jobs), out)
		}
		for _, j := range res.Jobs {
			// Every byte written is read back and checked.
			if j.Error != 0 || (wantWrite >= 0 && j.Write.IOBytes != wantWrite) || j.Read.IOBytes != jobSize {
				t.Errorf("fio %s job %s: error %d, wrote %d, verified %d; want 0, %d, %d",
					what, j.Name, j.Error, j.Write.IOBytes, j.Read.IOBytes, wantWrite, jobSize)
			}
		}
	}
	res, out, err := runFio(t, p.Dir, jobs(p, "--do_verify=1")...)
	check("write+verify", res, out, err, jobSize)

	// What was verified also survives a clean restart.
	p.stop()
	p = p.restart(t)
	res, out, err = runFio(t, p.Dir, jobs(p, "--verify_only")...)
	check("verify after restart", res, out, err, -1)

	// The verification bites: one corrupted block in the 64k job's range
	// is found.
	qemuIO(t, p.unixURI(), "write -P 0x5a 300M 64k")
	_, out, err = runFio(t, p.Dir, jobs(p, "--verify_only")...)
	if err == nil || !strings.Contains(out, "verify") {
		t.Errorf("fio did not notice a corrupted block (err %v):\n%s", err, out)
	}
	p.stop()
}

func TestRestartKeepsData(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdcopy", "qemu-io")
	const exportSize, dataSize = 256 << 20, 32 << 20
	p := startMirrordWith(t, mirrordOpts{Size: "256MiB"})
	src := filepath.Join(p.Dir, "src.bin")
	sum := writeRandomFile(t, newRand(t), src, dataSize)
	runCmd(t, cmdTimeout, "nbdcopy", src, p.unixURI())

	// Clean restart.
	p.stop()
	p = p.restart(t)
	out := filepath.Join(p.Dir, "out.bin")
	runCmd(t, cmdTimeout, "nbdcopy", p.unixURI(), out)
	if got := sha256File(t, out, 0, dataSize); got != sum {
		t.Fatalf("after SIGTERM and restart: sha256 %s, want %s", got, sum)
	}

	// Crash after flushed and FUA writes: SIGKILL leaves a stale socket
	// behind, and the new daemon must take it over.
	qemuIO(t, p.tcpURI(), "write -P 0x3c 100M 4M", "flush", "write -f -P 0x3d 104M 1M")
	p.kill()
	if _, err := os.Stat(p.Sock); err != nil {
		t.Logf("no stale socket after SIGKILL: %v", err)
	}
	p = p.restart(t)
	qemuIO(t, p.unixURI(), "read -P 0x3c 100M 4M", "read -P 0x3d 104M 1M", "read -P 0 105M 1M")
	runCmd(t, cmdTimeout, "nbdcopy", p.tcpURI(), out)
	if got := sha256File(t, out, 0, dataSize); got != sum {
		t.Errorf("after SIGKILL and restart: sha256 of the first %d bytes %s, want %s", dataSize, got, sum)
	}
	p.stop()
	if got := sha256File(t, p.Path, 0, dataSize); got != sum {
		t.Errorf("backing file: sha256 %s, want %s", got, sum)
	}
	if n := fileSize(t, p.Path); n != exportSize {
		t.Errorf("backing file is %d bytes, want %d", n, exportSize)
	}
}

// TestShutdownKeepsAckedWrites sends SIGTERM while clients stream pipelined
// writes: every write the daemon acknowledged must be in the backing file
// after it exits cleanly.
func TestShutdownKeepsAckedWrites(t *testing.T) {
	t.Parallel()
	p := startMirrordWith(t, mirrordOpts{Size: "256MiB"})
	const writers, blocks, bs = 4, 512, 64 << 10 // 32 MiB per writer
	block := func(w, k int) []byte {
		b := bytes.Repeat([]byte{byte(w*31 + k*7 + 1)}, bs)
		binary.BigEndian.PutUint64(b, uint64(w))
		binary.BigEndian.PutUint64(b[8:], uint64(k))
		return b
	}
	offset := func(w, k int) uint64 { return uint64(w)*blocks*bs + uint64(k)*bs }

	acked := make([][]bool, writers)
	var total atomic.Int64
	enough := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for w := range writers {
		network, addr := "unix", p.Sock
		if w%2 == 1 {
			network, addr = "tcp", p.TCP
		}
		c, err := dialNBD(network, addr, "vol0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		acked[w] = make([]bool, blocks)
		wg.Add(2)
		go func() { // sender: stops at the first error (the server hung up)
			defer wg.Done()
			for k := range blocks {
				if c.sendRequest(cmdWrite, 0, uint64(k), offset(w, k), bs, block(w, k)) != nil {
					return
				}
			}
		}()
		go func() { // receiver: records acknowledgements until the end
			defer wg.Done()
			for range blocks {
				errno, cookie, err := c.readReplyHeader()
				if err != nil {
					return
				}
				if errno == 0 && cookie < blocks {
					acked[w][cookie] = true
					if total.Add(1) >= 64 {
						once.Do(func() { close(enough) })
					}
				}
			}
		}()
	}
	select {
	case <-enough:
	case <-time.After(cmdTimeout):
		t.Fatal("no 64 writes acknowledged")
	}
	p.stop() // while the writers are still going
	wg.Wait()
	n := 0
	for w := range writers {
		for k := range blocks {
			if !acked[w][k] {
				continue
			}
			n++
			if got, want := readFileAt(t, p.Path, int64(offset(w, k)), bs), block(w, k); !bytes.Equal(got, want) {
				t.Errorf("acknowledged write %d of writer %d is not in the backing file: %s", k, w, firstDiff(got, want))
			}
		}
	}
	t.Logf("%d of %d writes acknowledged before shutdown, all in the backing file", n, writers*blocks)
}
