package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// ioTimeout bounds every wait in these tests: a hang becomes a failure
// with a message, not a test binary timeout.
const ioTimeout = 10 * time.Second

// Wire values written out as literals, straight from the NBD spec, so a
// wrong constant in protocol.go cannot hide behind itself.
const (
	wireNBDMagic   = 0x4e42444d41474943 // "NBDMAGIC"
	wireOptMagic   = 0x49484156454f5054 // "IHAVEOPT"
	wireReplyMagic = 0x0003e889045565a9
	wireReqMagic   = 0x25609513
	wireSimpleRep  = 0x67446698

	wireOptExportName = 1
	wireOptAbort      = 2
	wireOptList       = 3
	wireOptStartTLS   = 5
	wireOptInfo       = 6
	wireOptGo         = 7
	wireOptStructured = 8

	wireRepAck        = 1
	wireRepServer     = 2
	wireRepInfo       = 3
	wireRepErrUnsup   = 0x80000001
	wireRepErrInvalid = 0x80000003
	wireRepErrUnknown = 0x80000006
	wireRepErrTooBig  = 0x80000009

	wireInfoExport = 0
	wireInfoName   = 1
	wireInfoDesc   = 2
	wireInfoBlock  = 3

	// HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|CAN_MULTI_CONN
	wireFlagsRW = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100
	wireFlagsRO = wireFlagsRW | 0x0002

	wireCmdRead   = 0
	wireCmdWrite  = 1
	wireCmdDisc   = 2
	wireCmdFlush  = 3
	wireCmdTrim   = 4
	wireCmdZeroes = 6

	wireFlagFUA    = 1 << 0
	wireFlagNoHole = 1 << 1

	wireEPERM     = 1
	wireEIO       = 5
	wireEINVAL    = 22
	wireENOSPC    = 28
	wireESHUTDOWN = 108
)

func deadlineC() <-chan time.Time {
	return time.After(ioTimeout)
}

// waitFor polls cond until it holds, failing t after ioTimeout.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(ioTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", ioTimeout, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// connCount is the number of connections the server is still serving.
func connCount(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// testServer is a Server listening on a unix socket in t.TempDir().
type testServer struct {
	*Server
	t        testing.TB
	path     string
	devs     []*memDevice
	serveErr chan error
	once     sync.Once
	shutErr  error
}

func testLogger() zerolog.Logger { return zerolog.Nop() }

func newTestServer(t testing.TB, exports ...Export) *Server {
	t.Helper()
	srv, err := NewServer(testLogger(), exports...)
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// startServer serves exports on a fresh unix socket. configure, if not nil,
// may change the Server's tunables before it serves. The server is shut
// down (and Serve's result checked) when the test ends.
func startServer(t testing.TB, configure func(*Server), exports ...Export) *testServer {
	t.Helper()
	srv := newTestServer(t, exports...)
	if configure != nil {
		configure(srv)
	}
	path := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: srv, t: t, path: path, serveErr: make(chan error, 1)}
	for _, e := range exports {
		switch d := e.Device.(type) {
		case *memDevice:
			ts.devs = append(ts.devs, d)
		case plainDevice:
			ts.devs = append(ts.devs, d.m)
		}
	}
	go func() { ts.serveErr <- srv.Serve(l) }()
	t.Cleanup(func() {
		ts.shutdown()
		_ = l.Close()
	})
	return ts
}

// shutdown shuts the server down once (releasing every device hold first,
// so a forgotten hold cannot wedge the test) and checks that Serve returned
// ErrServerClosed. It returns Shutdown's error.
func (ts *testServer) shutdown() error {
	ts.once.Do(func() {
		for _, d := range ts.devs {
			d.releaseAll()
		}
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		ts.shutErr = ts.Shutdown(ctx)
		select {
		case err := <-ts.serveErr:
			if !errors.Is(err, ErrServerClosed) {
				ts.t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		case <-time.After(ioTimeout):
			ts.t.Errorf("Serve did not return after Shutdown")
		}
		if n := connCount(ts.Server); n != 0 {
			ts.t.Errorf("%d connections still registered after Shutdown", n)
		}
	})
	return ts.shutErr
}

func (ts *testServer) dial(t testing.TB) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout("unix", ts.path, ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return newRawClient(t, nc)
}

// dialGo connects and negotiates export name with GO.
func (ts *testServer) dialGo(t testing.TB, name string) *rawClient {
	t.Helper()
	c := ts.dial(t)
	c.handshakeGo(name)
	return c
}

// rawClient speaks NBD byte by byte. Its methods fail the test on any
// unexpected byte or I/O error; after async() they may run on any goroutine.
type rawClient struct {
	t       testing.TB
	nc      net.Conn
	br      io.Reader // bufio over the conn (a tee in the golden test)
	isAsync bool
	cookie  uint64
}

func newRawClient(t testing.TB, nc net.Conn) *rawClient {
	c := &rawClient{t: t, nc: nc, br: bufio.NewReader(nc)}
	t.Cleanup(func() { _ = nc.Close() })
	return c
}

// async lets the client be used from a goroutine other than the test's:
// failures then end only that goroutine (deferred calls still run).
func (c *rawClient) async() *rawClient {
	c.isAsync = true
	return c
}

func (c *rawClient) fail(format string, args ...any) {
	c.t.Helper()
	if c.isAsync {
		c.t.Errorf(format, args...)
		runtime.Goexit()
	}
	c.t.Fatalf(format, args...)
}

func (c *rawClient) close() { _ = c.nc.Close() }

func (c *rawClient) write(bs ...[]byte) {
	c.t.Helper()
	_ = c.nc.SetWriteDeadline(time.Now().Add(ioTimeout))
	if _, err := c.nc.Write(bytes.Join(bs, nil)); err != nil {
		c.fail("write: %v", err)
	}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(ioTimeout))
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.fail("read %d bytes: %v", n, err)
	}
	return b
}

func (c *rawClient) u32() uint32 { c.t.Helper(); return binary.BigEndian.Uint32(c.read(4)) }
func (c *rawClient) u64() uint64 { c.t.Helper(); return binary.BigEndian.Uint64(c.read(8)) }

// expectClosed requires the server to close the connection without sending
// anything more.
func (c *rawClient) expectClosed() {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(ioTimeout))
	b, err := io.ReadAll(c.br)
	if len(b) != 0 {
		c.fail("expected the server to close, got %d more bytes: % x", len(b), b[:min(len(b), 64)])
	}
	if err != nil && !isClosedErr(err) {
		c.fail("expected the server to close, got %v", err)
	}
}

// isClosedErr is true for the ways a closed peer shows on a unix socket:
// EOF, or ECONNRESET when the server closed with our bytes still unread.
func isClosedErr(err error) bool {
	return err == nil || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.ErrClosedPipe)
}

// hello reads the server's greeting and checks every byte.
func (c *rawClient) hello() {
	c.t.Helper()
	got := c.read(18)
	if !bytes.Equal(got, wantHello) {
		c.fail("server hello = % x, want % x", got, wantHello)
	}
}

var wantHello = []byte{
	'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',
	'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T',
	0x00, 0x03, // FIXED_NEWSTYLE | NO_ZEROES
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// encOption is one client option: magic, code, length, data.
func encOption(opt uint32, data []byte) []byte {
	b := be64(wireOptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// encInfoReq is the INFO/GO payload: name and the info types requested.
func encInfoReq(name string, infos ...uint16) []byte {
	b := be32(uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// encRequest is one transmission request header.
func encRequest(flags, typ uint16, cookie, off uint64, length uint32) []byte {
	b := be32(wireReqMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

type optReply struct {
	Opt, Type uint32
	Data      []byte
}

func (r optReply) String() string {
	return fmt.Sprintf("{opt %d type %#x data % x}", r.Opt, r.Type, r.Data)
}

// optReply reads one option reply, checking its magic.
func (c *rawClient) optReply() optReply {
	c.t.Helper()
	if m := c.u64(); m != wireReplyMagic {
		c.fail("option reply magic = %#x, want %#x", m, uint64(wireReplyMagic))
	}
	r := optReply{Opt: c.u32(), Type: c.u32()}
	n := c.u32()
	if n > 1<<20 {
		c.fail("option reply length %d", n)
	}
	r.Data = c.read(int(n))
	return r
}

// expectReply reads one option reply and requires its option and type.
func (c *rawClient) expectReply(opt, typ uint32) []byte {
	c.t.Helper()
	r := c.optReply()
	if r.Opt != opt || r.Type != typ {
		c.fail("option reply %v, want opt %d type %#x", r, opt, typ)
	}
	return r.Data
}

// infoReplies reads NBD_REP_INFO replies up to the closing ACK.
func (c *rawClient) infoReplies(opt uint32) []optReply {
	c.t.Helper()
	var out []optReply
	for {
		r := c.optReply()
		if r.Opt != opt {
			c.fail("reply for option %d, want %d", r.Opt, opt)
		}
		switch r.Type {
		case wireRepAck:
			if len(r.Data) != 0 {
				c.fail("ACK with data % x", r.Data)
			}
			return out
		case wireRepInfo:
			out = append(out, r)
		default:
			c.fail("unexpected reply %v in INFO/GO", r)
		}
	}
}

// handshakeGo performs hello, client flags (fixed newstyle, no zeroes) and
// GO for name, checking that the export info is present.
func (c *rawClient) handshakeGo(name string) (size uint64, flags uint16) {
	c.t.Helper()
	c.hello()
	c.write(be32(3), encOption(wireOptGo, encInfoReq(name)))
	return c.expectExportInfo(c.infoReplies(wireOptGo))
}

func (c *rawClient) expectExportInfo(rs []optReply) (size uint64, flags uint16) {
	c.t.Helper()
	for _, r := range rs {
		if len(r.Data) >= 2 && binary.BigEndian.Uint16(r.Data) == wireInfoExport {
			if len(r.Data) != 12 {
				c.fail("INFO_EXPORT length %d, want 12", len(r.Data))
			}
			return binary.BigEndian.Uint64(r.Data[2:]), binary.BigEndian.Uint16(r.Data[10:])
		}
	}
	c.fail("no NBD_INFO_EXPORT among %v", rs)
	return 0, 0
}

// simpleReply reads one simple reply header.
func (c *rawClient) simpleReply() (errno uint32, cookie uint64) {
	c.t.Helper()
	if m := c.u32(); m != wireSimpleRep {
		c.fail("reply magic = %#x, want %#x", m, wireSimpleRep)
	}
	return c.u32(), c.u64()
}

func (c *rawClient) nextCookie() uint64 {
	c.cookie++
	return c.cookie<<8 | 0xa5 // never zero, distinctive
}

// do sends one request and waits for its reply; a successful READ returns
// its data. Nothing else may be in flight on c.
func (c *rawClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	cookie := c.nextCookie()
	c.write(encRequest(flags, typ, cookie, off, length), payload)
	errno, got := c.simpleReply()
	if got != cookie {
		c.fail("reply cookie %#x, want %#x", got, cookie)
	}
	if typ == wireCmdRead && errno == 0 {
		return 0, c.read(int(length))
	}
	return errno, nil
}

// mustDo is do that requires success.
func (c *rawClient) mustDo(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	c.t.Helper()
	errno, data := c.do(typ, flags, off, length, payload)
	if errno != 0 {
		c.fail("cmd %d off %d len %d: errno %d", typ, off, length, errno)
	}
	return data
}

func (c *rawClient) writeAt(off uint64, p []byte) {
	c.t.Helper()
	c.mustDo(wireCmdWrite, 0, off, uint32(len(p)), p)
}

func (c *rawClient) readAt(off uint64, n uint32) []byte {
	c.t.Helper()
	return c.mustDo(wireCmdRead, 0, off, n, nil)
}

// disconnect sends DISC and requires the server to close.
func (c *rawClient) disconnect() {
	c.t.Helper()
	c.write(encRequest(0, wireCmdDisc, 0, 0, 0))
	c.expectClosed()
}

// pattern returns n deterministic, position-dependent bytes: a 4 KiB block
// derived from seed, each copy stamped with its index (copies, not a
// per-byte loop, so that 32 MiB stay cheap under -race).
func pattern(seed byte, n int) []byte {
	var blk [4096]byte
	for i := range blk {
		blk[i] = seed ^ byte(i) ^ byte(i>>8)*31
	}
	b := make([]byte, n)
	for off := 0; off < n; off += len(blk) {
		k := copy(b[off:], blk[:])
		var idx [8]byte
		binary.BigEndian.PutUint64(idx[:], uint64(off/len(blk))^uint64(seed)<<56)
		copy(b[off:off+k], idx[:])
	}
	return b
}

// socketPair returns the two ends of a connected unix stream socketpair
// (CloseWrite works on them, unlike net.Pipe).
func socketPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conv := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer func() { _ = f.Close() }()
		nc, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return nc.(*net.UnixConn)
	}
	return conv(fds[0]), conv(fds[1])
}
