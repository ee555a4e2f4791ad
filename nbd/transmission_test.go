package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"syscall"
	"testing"
)

const txSize = 1 << 20

// startTx serves one 1 MiB read-write export and returns a client in
// transmission.
func startTx(t *testing.T) (*testServer, *memDevice, *rawClient) {
	t.Helper()
	d := newMemDevice(t, txSize)
	ts := startServer(t, nil, Export{Name: "d", Device: d})
	return ts, d, ts.dialGo(t, "")
}

func TestWriteReadBack(t *testing.T) {
	_, d, c := startTx(t)
	for i, tc := range []struct{ off, n int }{
		{0, 4096},
		{1, 4095},       // unaligned, ends on a page boundary
		{4095, 2},       // straddles a page boundary
		{10000, 131072}, // many pages, unaligned
		{txSize - 100, 100},
		{txSize - 1, 1},
		{0, txSize}, // the whole export
	} {
		p := pattern(byte(i+1), tc.n)
		c.writeAt(uint64(tc.off), p)
		if got := c.readAt(uint64(tc.off), uint32(tc.n)); !bytes.Equal(got, p) {
			t.Fatalf("off %d len %d: read back differs", tc.off, tc.n)
		}
		if got := d.contents(int64(tc.off), int64(tc.n)); !bytes.Equal(got, p) {
			t.Fatalf("off %d len %d: device differs", tc.off, tc.n)
		}
	}
	c.disconnect()
}

func TestFUAWrite(t *testing.T) {
	ts, d, c := startTx(t)
	plain, fua := pattern(1, 8192), pattern(2, 8192)

	c.writeAt(0, plain)
	c.mustDo(wireCmdWrite, wireFlagFUA, 65536, 8192, fua)

	st := d.stats()
	if st.Writes != 2 || st.FUAWrites != 1 || st.Flushes != 0 {
		t.Fatalf("device stats %+v, want 2 writes, 1 FUA, no flush", st)
	}
	// The FUA write is stable without a flush; the plain one is not yet.
	if got := d.stableContents(65536, 8192); !bytes.Equal(got, fua) {
		t.Fatal("FUA write is not stable when answered")
	}
	if got := d.stableContents(0, 8192); !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatal("plain write is stable without a flush (the fake is broken)")
	}
	if s := ts.Stats(); s.Writes != 2 || s.FUAWrites != 1 || s.BytesWritten != 16384 {
		t.Fatalf("server stats %+v", s)
	}
}

func TestFlush(t *testing.T) {
	ts, d, c := startTx(t)
	p := pattern(3, 10000)
	c.writeAt(12345, p)
	if got := d.stableContents(12345, 10000); bytes.Equal(got, p) {
		t.Fatal("stable before flush (the fake is broken)")
	}
	c.mustDo(wireCmdFlush, 0, 0, 0, nil)
	if st := d.stats(); st.Flushes != 1 {
		t.Fatalf("Flush called %d times, want 1", st.Flushes)
	}
	if got := d.stableContents(12345, 10000); !bytes.Equal(got, p) {
		t.Fatal("write answered before FLUSH is not stable after it")
	}
	// FUA is accepted on FLUSH.
	c.mustDo(wireCmdFlush, wireFlagFUA, 0, 0, nil)

	// A FLUSH with an offset or length is invalid and flushes nothing.
	for _, tc := range []struct {
		off uint64
		n   uint32
	}{{1, 0}, {0, 1}, {4096, 4096}} {
		if errno, _ := c.do(wireCmdFlush, 0, tc.off, tc.n, nil); errno != wireEINVAL {
			t.Errorf("FLUSH off %d len %d: errno %d, want %d", tc.off, tc.n, errno, wireEINVAL)
		}
	}
	if st := d.stats(); st.Flushes != 2 {
		t.Fatalf("Flush called %d times, want 2", st.Flushes)
	}
	if s := ts.Stats(); s.Flushes != 2 || s.Errors != 3 {
		t.Fatalf("server stats %+v", s)
	}
}

func TestTrimAndWriteZeroes(t *testing.T) {
	for _, tc := range []struct {
		name         string
		cmd, flags   uint16
		wantMayUnmap bool
	}{
		{"trim", wireCmdTrim, 0, false},
		{"trim fua", wireCmdTrim, wireFlagFUA, false},
		{"write zeroes", wireCmdZeroes, 0, true},
		{"write zeroes no hole", wireCmdZeroes, wireFlagNoHole, false},
		{"write zeroes fua no hole", wireCmdZeroes, wireFlagFUA | wireFlagNoHole, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, d, c := startTx(t)
			p := pattern(9, 65536)
			c.writeAt(0, p)
			const off, n = 1000, 20000 // unaligned, several pages
			c.mustDo(tc.cmd, tc.flags, off, n, nil)

			want := bytes.Clone(p)
			clear(want[off : off+n])
			if got := c.readAt(0, 65536); !bytes.Equal(got, want) {
				t.Fatal("read back after zeroing differs")
			}
			st := d.stats()
			fua := tc.flags&wireFlagFUA != 0
			switch tc.cmd {
			case wireCmdTrim:
				if st.Trims != 1 || (st.FUATrims == 1) != fua {
					t.Fatalf("device stats %+v", st)
				}
			case wireCmdZeroes:
				if st.Zeroes != 1 || st.LastMayUnmap != tc.wantMayUnmap || (st.FUAZeroes == 1) != fua {
					t.Fatalf("device stats %+v (want mayUnmap %v)", st, tc.wantMayUnmap)
				}
			}
			if fua {
				if got := d.stableContents(off, n); !bytes.Equal(got, make([]byte, n)) {
					t.Fatal("FUA zeroing is not stable when answered")
				}
			}
		})
	}
}

// Without Trimmer/Zeroer: WRITE_ZEROES is done with WriteAt, TRIM is a no-op
// (FUA on it still flushes).
func TestZeroesFallback(t *testing.T) {
	m := newMemDevice(t, 4<<20)
	ts := startServer(t, nil, Export{Device: plainDevice{m}})
	c := ts.dialGo(t, "")
	p := pattern(4, 4<<20)
	c.writeAt(0, p)

	const off, n = 100, 3<<20 + 5 // more than zeroChunk: several WriteAt calls
	c.mustDo(wireCmdZeroes, wireFlagFUA, off, n, nil)
	want := bytes.Clone(p)
	clear(want[off : off+n])
	if got := m.contents(0, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("WRITE_ZEROES fallback did not zero the range")
	}
	if st := m.stats(); st.Writes != 1+4 || st.FUAWrites != 4 {
		t.Fatalf("device stats %+v: want 4 FUA WriteAt calls of <= 1 MiB", st)
	}

	c.mustDo(wireCmdTrim, 0, 0, 4096, nil)
	if got := m.contents(0, 4096); !bytes.Equal(got, want[:4096]) {
		t.Fatal("TRIM without Trimmer changed data")
	}
	c.mustDo(wireCmdTrim, wireFlagFUA, 0, 4096, nil)
	if st := m.stats(); st.Flushes != 1 {
		t.Fatalf("TRIM+FUA without Trimmer: %d flushes, want 1", st.Flushes)
	}
}

// Requests the server must refuse by itself, each with its exact error, on
// one connection: after each refusal a read proves the stream is still in
// step (WRITE payloads drained, no stray data).
func TestRequestErrors(t *testing.T) {
	const size = txSize
	const near = ^uint64(0) - 511 // offset + length overflows 64 bits
	payload := func(n int) []byte { return bytes.Repeat([]byte{0xcc}, n) }
	for _, tc := range []struct {
		name  string
		flags uint16
		cmd   uint16
		off   uint64
		n     uint32
		data  []byte
		want  uint32
	}{
		{"read past end", 0, wireCmdRead, size - 512, 1024, nil, wireEINVAL},
		{"read at end", 0, wireCmdRead, size, 1, nil, wireEINVAL},
		{"read beyond end", 0, wireCmdRead, size + 4096, 512, nil, wireEINVAL},
		{"read offset overflow", 0, wireCmdRead, near, 1024, nil, wireEINVAL},
		{"read max offset", 0, wireCmdRead, ^uint64(0), 1, nil, wireEINVAL},
		{"write past end", 0, wireCmdWrite, size - 512, 1024, payload(1024), wireENOSPC},
		{"write at end", 0, wireCmdWrite, size, 1, payload(1), wireENOSPC},
		{"write offset overflow", 0, wireCmdWrite, near, 1024, payload(1024), wireENOSPC},
		{"write zeroes past end", 0, wireCmdZeroes, size - 512, 1024, nil, wireENOSPC},
		{"write zeroes overflow", 0, wireCmdZeroes, near, 1024, nil, wireENOSPC},
		{"trim past end", 0, wireCmdTrim, size - 512, 1024, nil, wireEINVAL},
		{"trim overflow", 0, wireCmdTrim, near, 0xffffffff, nil, wireEINVAL},
		{"zero-length read", 0, wireCmdRead, 0, 0, nil, wireEINVAL},
		{"zero-length write", 0, wireCmdWrite, 0, 0, nil, wireEINVAL},
		{"zero-length trim", 0, wireCmdTrim, 0, 0, nil, wireEINVAL},
		{"zero-length write zeroes", 0, wireCmdZeroes, 0, 0, nil, wireEINVAL},
		{"read longer than 32 MiB", 0, wireCmdRead, 0, 32<<20 + 1, nil, wireEINVAL},
		{"read 4 GiB", 0, wireCmdRead, 0, 0xffffffff, nil, wireEINVAL},
		{"unknown command 99", 0, 99, 0, 512, nil, wireEINVAL},
		{"CACHE (not advertised)", 0, 5, 0, 512, nil, wireEINVAL},
		{"BLOCK_STATUS (not negotiated)", 0, 7, 0, 512, nil, wireEINVAL},
		{"unknown command 0xffff", 0, 0xffff, 0, 0, nil, wireEINVAL},
		{"NO_HOLE on WRITE", wireFlagNoHole, wireCmdWrite, 0, 512, payload(512), wireEINVAL},
		{"NO_HOLE on READ", wireFlagNoHole, wireCmdRead, 0, 512, nil, wireEINVAL},
		{"NO_HOLE on TRIM", wireFlagNoHole, wireCmdTrim, 0, 512, nil, wireEINVAL},
		{"NO_HOLE on FLUSH", wireFlagNoHole, wireCmdFlush, 0, 0, nil, wireEINVAL},
		{"DF on READ (no structured replies)", 1 << 2, wireCmdRead, 0, 512, nil, wireEINVAL},
		{"FAST_ZERO (not advertised)", 1 << 4, wireCmdZeroes, 0, 512, nil, wireEINVAL},
		{"unknown flag 7 on READ", 1 << 7, wireCmdRead, 0, 512, nil, wireEINVAL},
		{"unknown flag 15 on WRITE", 1 << 15, wireCmdWrite, 0, 512, payload(512), wireEINVAL},
		{"all flags on WRITE", 0xffff, wireCmdWrite, 0, 512, payload(512), wireEINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, d, c := startTx(t)
			if errno, _ := c.do(tc.cmd, tc.flags, tc.off, tc.n, tc.data); errno != tc.want {
				t.Fatalf("errno %d, want %d", errno, tc.want)
			}
			if got := c.readAt(0, 16); !bytes.Equal(got, make([]byte, 16)) {
				t.Fatalf("follow-up read = % x", got)
			}
			c.disconnect()
			if st := d.stats(); st != (memStats{Reads: 1, Flushes: 1}) {
				// One read (the follow-up) and the flush on DISC: the
				// refused request never reached the device.
				t.Fatalf("device stats %+v", st)
			}
			if s := ts.Stats(); s.Errors != 1 {
				t.Fatalf("server counted %d errors, want 1", s.Errors)
			}
		})
	}
}

// The spec: FUA "is valid for all commands ... the server MUST accept all
// commands with this bit set (even by ignoring the bit)", and clients are
// known to set it on reads.
func TestFUAAcceptedOnEveryCommand(t *testing.T) {
	_, d, c := startTx(t)
	p := pattern(5, 4096)
	c.mustDo(wireCmdWrite, wireFlagFUA, 0, 4096, p)
	if got := c.mustDo(wireCmdRead, wireFlagFUA, 0, 4096, nil); !bytes.Equal(got, p) {
		t.Fatal("READ+FUA returned wrong data")
	}
	c.mustDo(wireCmdTrim, wireFlagFUA, 0, 512, nil)
	c.mustDo(wireCmdZeroes, wireFlagFUA, 512, 512, nil)
	c.mustDo(wireCmdFlush, wireFlagFUA, 0, 0, nil)
	if st := d.stats(); st.Reads != 1 || st.FUAWrites != 1 || st.FUATrims != 1 || st.FUAZeroes != 1 || st.Flushes != 1 {
		t.Fatalf("device stats %+v", st)
	}
}

// Payloads up to 32 MiB are legal; one byte more is refused with the
// payload drained. TRIM and WRITE_ZEROES carry no payload and may be larger.
func TestLargeRequests(t *testing.T) {
	const size = 80 << 20
	d := newMemDevice(t, size)
	ts := startServer(t, nil, Export{Device: d})
	c := ts.dialGo(t, "")

	big := pattern(6, MaxPayload)
	c.writeAt(4096, big)
	if got := c.readAt(4096, MaxPayload); !bytes.Equal(got, big) {
		t.Fatal("32 MiB read back differs")
	}

	over := bytes.Repeat([]byte{0xdd}, MaxPayload+1)
	if errno, _ := c.do(wireCmdWrite, 0, 40<<20, MaxPayload+1, over); errno != wireEINVAL {
		t.Fatalf("write of 32 MiB + 1: errno %d, want %d", errno, wireEINVAL)
	}
	if errno, _ := c.do(wireCmdRead, 0, 0, MaxPayload+1, nil); errno != wireEINVAL {
		t.Fatalf("read of 32 MiB + 1: errno %d, want %d", errno, wireEINVAL)
	}
	// Still in step, and the refused write wrote nothing.
	if got := c.readAt(40<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("refused oversize write reached the device")
	}

	c.mustDo(wireCmdZeroes, 0, 4096, 48<<20, nil)
	c.mustDo(wireCmdTrim, 0, 0, 64<<20, nil)
	if got := d.contents(0, 40<<20); !bytes.Equal(got, make([]byte, 40<<20)) {
		t.Fatal("large WRITE_ZEROES/TRIM did not zero")
	}
	c.disconnect()
}

func TestReadOnlyExport(t *testing.T) {
	d := newMemDevice(t, txSize)
	p := pattern(8, 8192)
	d.fill(p, 0)
	ts := startServer(t, nil, Export{Name: "ro", Device: d, ReadOnly: true})
	c := ts.dialGo(t, "ro")
	for _, tc := range []struct {
		name  string
		cmd   uint16
		flags uint16
		n     uint32
		data  []byte
	}{
		{"write", wireCmdWrite, 0, 4096, make([]byte, 4096)},
		{"fua write", wireCmdWrite, wireFlagFUA, 4096, make([]byte, 4096)},
		{"trim", wireCmdTrim, 0, 4096, nil},
		{"write zeroes", wireCmdZeroes, 0, 4096, nil},
		{"write zeroes no hole", wireCmdZeroes, wireFlagNoHole, 4096, nil},
	} {
		if errno, _ := c.do(tc.cmd, tc.flags, 0, tc.n, tc.data); errno != wireEPERM {
			t.Errorf("%s: errno %d, want %d", tc.name, errno, wireEPERM)
		}
	}
	if got := c.readAt(0, 8192); !bytes.Equal(got, p) {
		t.Fatal("read on read-only export differs")
	}
	c.mustDo(wireCmdFlush, 0, 0, 0, nil)
	c.disconnect()
	if st := d.stats(); st.Writes != 0 || st.Trims != 0 || st.Zeroes != 0 {
		t.Fatalf("read-only device was modified: %+v", st)
	}
	if got := d.contents(0, 8192); !bytes.Equal(got, p) {
		t.Fatal("read-only data changed")
	}
}

// Device errors become the NBD error of the errno they wrap, and fail only
// their request.
func TestDeviceErrors(t *testing.T) {
	const badOff = 65536
	for _, tc := range []struct {
		name  string
		op    string
		cmd   uint16
		flags uint16
		err   error
		want  uint32
	}{
		{"read EIO", opRead, wireCmdRead, 0, errors.New("disk on fire"), wireEIO},
		{"read ENOSPC?", opRead, wireCmdRead, 0, fmt.Errorf("odd: %w", syscall.ENOSPC), wireENOSPC},
		{"write ENOSPC", opWrite, wireCmdWrite, 0, fmt.Errorf("volume full: %w", syscall.ENOSPC), wireENOSPC},
		{"write EPERM", opWrite, wireCmdWrite, 0, fmt.Errorf("fenced: %w", syscall.EPERM), wireEPERM},
		{"fua write EIO", opWrite, wireCmdWrite, wireFlagFUA, errors.New("peer lost"), wireEIO},
		{"write ESHUTDOWN", opWrite, wireCmdWrite, 0, fmt.Errorf("closing: %w", syscall.ESHUTDOWN), wireESHUTDOWN},
		{"flush EIO", opFlush, wireCmdFlush, 0, errors.New("flush failed"), wireEIO},
		{"trim EROFS", opTrim, wireCmdTrim, 0, fmt.Errorf("ro: %w", syscall.EROFS), wireEPERM},
		{"zeroes EDQUOT", opZero, wireCmdZeroes, 0, fmt.Errorf("quota: %w", syscall.EDQUOT), wireENOSPC},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, d, c := startTx(t)
			d.setFault(func(op string, off, _ int64) error {
				if op == tc.op && (op == opFlush || off == badOff) {
					return tc.err
				}
				return nil
			})
			off, n := uint64(badOff), uint32(4096)
			var data []byte
			switch tc.cmd {
			case wireCmdWrite:
				data = pattern(1, 4096)
			case wireCmdFlush:
				off, n = 0, 0
			}
			if errno, _ := c.do(tc.cmd, tc.flags, off, n, data); errno != tc.want {
				t.Fatalf("errno %d, want %d", errno, tc.want)
			}
			// The connection goes on, and other requests succeed.
			p := pattern(2, 512)
			c.writeAt(0, p)
			if got := c.readAt(0, 512); !bytes.Equal(got, p) {
				t.Fatal("read after device error differs")
			}
			if st := d.stats(); st.Faults != 1 {
				t.Fatalf("device faults %d, want 1", st.Faults)
			}
			if s := ts.Stats(); s.Errors != 1 {
				t.Fatalf("server errors %d, want 1", s.Errors)
			}
		})
	}
}

func TestErrnoOf(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", err)) }
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{errors.New("plain"), 5},
		{syscall.EIO, 5},
		{syscall.ENOENT, 5},
		{syscall.EAGAIN, 5},
		{syscall.EPERM, 1},
		{syscall.EROFS, 1},
		{syscall.EACCES, 1},
		{syscall.ENOMEM, 12},
		{syscall.EINVAL, 22},
		{syscall.ENOSPC, 28},
		{syscall.EDQUOT, 28},
		{syscall.EFBIG, 28},
		{syscall.EOVERFLOW, 75},
		{syscall.ENOTSUP, 95},
		{syscall.EOPNOTSUPP, 95},
		{syscall.ESHUTDOWN, 108},
		{wrap(syscall.ENOSPC), 28},
		{wrap(syscall.EPERM), 1},
		{wrap(errors.New("x")), 5},
		{errors.Join(errors.New("x"), syscall.EROFS), 1},
		{&syscallPathError{syscall.EDQUOT}, 28},
	} {
		if got := errnoOf(tc.err); got != tc.want {
			t.Errorf("errnoOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

type syscallPathError struct{ errno syscall.Errno }

func (e *syscallPathError) Error() string { return "write /x: " + e.errno.Error() }
func (e *syscallPathError) Unwrap() error { return e.errno }

func TestStatsCounters(t *testing.T) {
	ts, _, c := startTx(t)
	c.writeAt(0, make([]byte, 1000))
	c.mustDo(wireCmdWrite, wireFlagFUA, 0, 24, make([]byte, 24))
	c.readAt(0, 300)
	c.readAt(0, 200)
	c.mustDo(wireCmdFlush, 0, 0, 0, nil)
	c.mustDo(wireCmdTrim, 0, 0, 4096, nil)
	c.mustDo(wireCmdZeroes, 0, 0, 4096, nil)
	c.do(wireCmdRead, 0, txSize, 1, nil)
	want := Stats{Connections: 1, Reads: 2, Writes: 2, Flushes: 1, FUAWrites: 1, Trims: 1,
		WriteZeroes: 1, BytesRead: 500, BytesWritten: 1024, Errors: 1}
	if got := ts.Stats(); got != want {
		t.Fatalf("Stats = %+v\nwant    %+v", got, want)
	}
}

// TestLargePayloadsBesideSmallOnes: payloads from directPayload up are read
// past the read buffer (readPayload). Sent in one stream with small writes
// and a read around them, and in pieces with pauses, every payload lands
// where it belongs and the stream stays in step.
func TestLargePayloadsBesideSmallOnes(t *testing.T) {
	_, d, c := startTx(t)
	big, small := pattern(7, 4*directPayload+100), pattern(8, 512)
	var stream []byte
	stream = append(stream, encRequest(0, wireCmdWrite, 1, 0, uint32(len(small)))...)
	stream = append(stream, small...)
	stream = append(stream, encRequest(0, wireCmdWrite, 2, 4096, uint32(len(big)))...)
	stream = append(stream, big...)
	stream = append(stream, encRequest(0, wireCmdWrite, 3, 4096+uint64(len(big)), uint32(len(small)))...)
	stream = append(stream, small...)
	// The first piece ends inside the big payload, so the reader may hold
	// part of it buffered when it turns to the socket for the rest.
	cut := requestHeaderSize + len(small) + requestHeaderSize + 1000
	c.write(stream[:cut])
	c.write(stream[cut:])
	seen := map[uint64]bool{}
	for range 3 { // in any order: the device is not LocalOnly
		errno, cookie := c.simpleReply()
		if errno != 0 || cookie < 1 || cookie > 3 || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d (seen %v)", errno, cookie, seen)
		}
		seen[cookie] = true
	}
	c.cookie = 4
	if got := c.readAt(4096, uint32(len(big))); !bytes.Equal(got, big) {
		t.Fatal("the large payload read back differs")
	}
	if got := c.readAt(4096+uint64(len(big)), uint32(len(small))); !bytes.Equal(got, small) {
		t.Fatal("the small write after the large one landed wrong")
	}
	if got := c.readAt(0, uint32(len(small))); !bytes.Equal(got, small) {
		t.Fatal("the small write before the large one landed wrong")
	}
	if st := d.stats(); st.Writes != 3 {
		t.Fatalf("device saw %d writes, want 3", st.Writes)
	}
}
