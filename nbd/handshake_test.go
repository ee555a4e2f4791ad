package nbd

import (
	"bytes"
	"context"
	"testing"
	"time"
)

const (
	hsSize0 = 1 << 20 // "disk0"
	hsSize1 = 2 << 20 // "ro"
)

// startHandshakeServer serves two exports: "disk0" (1 MiB, read-write,
// first, so the default) and "ro" (2 MiB, read-only).
func startHandshakeServer(t *testing.T) (*testServer, *memDevice) {
	t.Helper()
	d0 := newMemDevice(t, hsSize0)
	d1 := newMemDevice(t, hsSize1)
	ts := startServer(t, nil,
		Export{Name: "disk0", Description: "first disk", Device: d0},
		Export{Name: "ro", Description: "read only", Device: d1, ReadOnly: true},
	)
	return ts, d0
}

// Exact INFO payloads.
func infoExportBytes(size uint64, flags uint16) []byte {
	return append(append(be16(wireInfoExport), be64(size)...), be16(flags)...)
}

var infoBlockSizeBytes = []byte{
	0x00, 0x03, // NBD_INFO_BLOCK_SIZE
	0x00, 0x00, 0x00, 0x01, // minimum 1
	0x00, 0x00, 0x10, 0x00, // preferred 4096
	0x02, 0x00, 0x00, 0x00, // maximum 32 MiB
}

func requireInfos(t *testing.T, got []optReply, opt uint32, want ...[]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d INFO replies %v, want %d", len(got), got, len(want))
	}
	for i := range want {
		if got[i].Opt != opt || got[i].Type != wireRepInfo || !bytes.Equal(got[i].Data, want[i]) {
			t.Errorf("INFO reply %d = %v, want data % x", i, got[i], want[i])
		}
	}
}

// startOptions reads the hello and sends client flags.
func (c *rawClient) startOptions(flags uint32) {
	c.t.Helper()
	c.hello()
	c.write(be32(flags))
}

// goAndUse finishes negotiation with GO "disk0" and proves the connection is
// in transmission with one write and read.
func (c *rawClient) goAndUse() {
	c.t.Helper()
	c.write(encOption(wireOptGo, encInfoReq("disk0")))
	size, flags := c.expectExportInfo(c.infoReplies(wireOptGo))
	if size != hsSize0 || flags != wireFlagsRW {
		c.fail("GO disk0: size %d flags %#x", size, flags)
	}
	p := pattern(7, 512)
	c.writeAt(4096, p)
	if got := c.readAt(4096, 512); !bytes.Equal(got, p) {
		c.fail("read back after negotiation differs")
	}
}

func TestHandshakeHello(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	got := c.read(18)
	want := append(append(be64(wireNBDMagic), be64(wireOptMagic)...), 0x00, 0x03)
	if !bytes.Equal(got, want) || !bytes.Equal(got, wantHello) {
		t.Fatalf("hello = % x, want % x", got, want)
	}
}

func TestHandshakeGo(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  uint64
		flags uint16
	}{
		{"", hsSize0, wireFlagsRW}, // the default name selects the first export
		{"disk0", hsSize0, wireFlagsRW},
		{"ro", hsSize1, wireFlagsRO},
	} {
		t.Run("name="+tc.name, func(t *testing.T) {
			ts, _ := startHandshakeServer(t)
			c := ts.dial(t)
			c.startOptions(3)
			c.write(encOption(wireOptGo, encInfoReq(tc.name)))
			requireInfos(t, c.infoReplies(wireOptGo), wireOptGo,
				infoExportBytes(tc.size, tc.flags), infoBlockSizeBytes)
			// In transmission now: a read at the last byte works.
			if got := c.readAt(tc.size-1, 1); !bytes.Equal(got, []byte{0}) {
				t.Fatalf("read = % x", got)
			}
			c.disconnect()
		})
	}
}

func TestHandshakeInfo(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)

	// Everything requested, plus an unknown info type that must be ignored.
	c.write(encOption(wireOptInfo, encInfoReq("ro", wireInfoName, wireInfoDesc, wireInfoBlock, 999)))
	requireInfos(t, c.infoReplies(wireOptInfo), wireOptInfo,
		infoExportBytes(hsSize1, wireFlagsRO),
		infoBlockSizeBytes,
		append(be16(wireInfoName), "ro"...),
		append(be16(wireInfoDesc), "read only"...),
	)

	// The default name reports the canonical name of the first export.
	c.write(encOption(wireOptInfo, encInfoReq("", wireInfoName)))
	requireInfos(t, c.infoReplies(wireOptInfo), wireOptInfo,
		infoExportBytes(hsSize0, wireFlagsRW),
		infoBlockSizeBytes,
		append(be16(wireInfoName), "disk0"...),
	)

	// INFO did not end negotiation: other options still work, then GO.
	c.write(encOption(wireOptList, nil))
	c.expectReply(wireOptList, wireRepServer)
	c.expectReply(wireOptList, wireRepServer)
	c.expectReply(wireOptList, wireRepAck)
	c.goAndUse()
}

func TestHandshakeList(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)
	c.write(encOption(wireOptList, nil))
	for _, want := range [][]byte{
		append(append(be32(5), "disk0"...), "first disk"...),
		append(append(be32(2), "ro"...), "read only"...),
	} {
		if got := c.expectReply(wireOptList, wireRepServer); !bytes.Equal(got, want) {
			t.Errorf("SERVER reply % x, want % x", got, want)
		}
	}
	if got := c.expectReply(wireOptList, wireRepAck); len(got) != 0 {
		t.Errorf("ACK carries % x", got)
	}

	// LIST with data is invalid; negotiation continues.
	c.write(encOption(wireOptList, []byte{0}))
	c.expectReply(wireOptList, wireRepErrInvalid)
	c.goAndUse()
}

func TestHandshakeUnsupportedOptions(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)
	for _, tc := range []struct {
		opt  uint32
		data []byte
	}{
		{42, nil},
		{42, []byte("some data")},
		{wireOptStartTLS, nil},
		{wireOptStructured, nil},
		{9, nil},                   // NBD_OPT_BLOCK_SIZE
		{10, encInfoReq("disk0")},  // LIST_META_CONTEXT
		{11, be32(0)},              // SET_META_CONTEXT
		{0, nil},                   // not an option at all
		{0xffffffff, []byte{1, 2}}, // nor this
	} {
		c.write(encOption(tc.opt, tc.data))
		c.expectReply(tc.opt, wireRepErrUnsup)
	}
	c.goAndUse()
}

func TestHandshakeMalformedInfoGo(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"5 bytes", []byte{0, 0, 0, 0, 0}},
		{"name length past end", append(be32(6), "disk0\x00\x00"...)},
		{"name length huge", append(be32(0xffffffff), 0, 0)},
		{"count without types", append(encInfoReq("disk0")[:9], 0, 1)},
		{"odd trailing byte", append(encInfoReq("disk0", wireInfoName), 0)},
		{"count short", append(encInfoReq("disk0", wireInfoName), 0, 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, _ := startHandshakeServer(t)
			c := ts.dial(t)
			c.startOptions(3)
			for _, opt := range []uint32{wireOptInfo, wireOptGo} {
				c.write(encOption(opt, tc.data))
				c.expectReply(opt, wireRepErrInvalid)
			}
			c.goAndUse()
		})
	}
}

func TestHandshakeUnknownExport(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)
	for _, opt := range []uint32{wireOptInfo, wireOptGo} {
		for _, name := range []string{"nope", "Disk0", "disk0 "} {
			c.write(encOption(opt, encInfoReq(name, wireInfoName)))
			c.expectReply(opt, wireRepErrUnknown)
		}
	}
	c.goAndUse()
}

func TestHandshakeExportName(t *testing.T) {
	for _, tc := range []struct {
		name        string
		clientFlags uint32
		export      string
		size        uint64
		flags       uint16
		zeroes      int
	}{
		{"no zeroes", 3, "disk0", hsSize0, wireFlagsRW, 0},
		{"zeroes", 1, "disk0", hsSize0, wireFlagsRW, 124},
		{"default name", 3, "", hsSize0, wireFlagsRW, 0},
		{"read-only with zeroes", 1, "ro", hsSize1, wireFlagsRO, 124},
		{"no fixed newstyle", 0, "ro", hsSize1, wireFlagsRO, 124},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, _ := startHandshakeServer(t)
			c := ts.dial(t)
			c.startOptions(tc.clientFlags)
			c.write(encOption(wireOptExportName, []byte(tc.export)))
			want := append(append(be64(tc.size), be16(tc.flags)...), make([]byte, tc.zeroes)...)
			if got := c.read(len(want)); !bytes.Equal(got, want) {
				t.Fatalf("EXPORT_NAME reply % x, want % x", got, want)
			}
			// The next bytes must be the reply to our first request: no
			// stray padding.
			if got := c.readAt(0, 16); !bytes.Equal(got, make([]byte, 16)) {
				t.Fatalf("read = % x", got)
			}
			c.disconnect()
		})
	}
}

// Negotiations that must end with the server closing the connection, and
// exactly which bytes it sends before.
func TestHandshakeClose(t *testing.T) {
	for _, tc := range []struct {
		name  string
		send  []byte
		reply []byte // after the hello
		eof   bool   // the client stops sending after send
	}{
		{"export name unknown", cat(be32(3), encOption(wireOptExportName, []byte("nope"))), nil, false},
		{"abort", cat(be32(3), encOption(wireOptAbort, nil)),
			cat(be64(wireReplyMagic), be32(wireOptAbort), be32(wireRepAck), be32(0)), false},
		{"bad option magic", cat(be32(3), be64(wireOptMagic+1), be32(wireOptGo), be32(0)), nil, false},
		{"client flag 2", be32(4), nil, false},
		{"client flag 31", be32(1 << 31), nil, false},
		{"all client flags", be32(0xffffffff), nil, false},
		{"eof in flags", []byte{0, 0}, nil, true},
		{"eof in option header", cat(be32(3), be64(wireOptMagic)), nil, true},
		{"eof in option data", cat(be32(3), be64(wireOptMagic), be32(wireOptGo), be32(100)), nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, _ := startHandshakeServer(t)
			c := ts.dial(t)
			c.hello()
			c.write(tc.send)
			if tc.eof {
				_ = c.nc.(interface{ CloseWrite() error }).CloseWrite()
			}
			if len(tc.reply) > 0 {
				if got := c.read(len(tc.reply)); !bytes.Equal(got, tc.reply) {
					t.Fatalf("reply % x, want % x", got, tc.reply)
				}
			}
			c.expectClosed()
			waitFor(t, "the server to forget the connection", func() bool { return connCount(ts.Server) == 0 })
		})
	}
}

func TestHandshakeOptionTooBig(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)

	// 64 KiB exactly is not too big: the unknown option is just unsupported.
	c.write(encOption(42, make([]byte, 64<<10)))
	c.expectReply(42, wireRepErrUnsup)

	// One byte more is, whatever the option; the data is skipped.
	for _, opt := range []uint32{42, wireOptGo, wireOptList} {
		c.write(encOption(opt, bytes.Repeat([]byte{0xee}, 64<<10+1)))
		c.expectReply(opt, wireRepErrTooBig)
	}
	c.goAndUse()
}

func TestHandshakeManyOptionsThenGo(t *testing.T) {
	// A long negotiation on one connection, mixing every reply kind.
	ts, _ := startHandshakeServer(t)
	c := ts.dial(t)
	c.startOptions(3)
	for range 50 {
		c.write(encOption(wireOptList, nil))
		c.expectReply(wireOptList, wireRepServer)
		c.expectReply(wireOptList, wireRepServer)
		c.expectReply(wireOptList, wireRepAck)
		c.write(encOption(wireOptInfo, encInfoReq("ro")))
		c.infoReplies(wireOptInfo)
		c.write(encOption(wireOptGo, encInfoReq("missing")))
		c.expectReply(wireOptGo, wireRepErrUnknown)
	}
	c.goAndUse()
}

func TestShutdownDuringHandshake(t *testing.T) {
	ts, _ := startHandshakeServer(t)
	silent := ts.dial(t)
	silent.hello() // then says nothing

	half := ts.dial(t)
	half.hello()
	half.write(be32(3), encOption(wireOptGo, encInfoReq("disk0"))[:10]) // half an option

	waitFor(t, "both connections", func() bool { return connCount(ts.Server) == 2 })
	start := time.Now()
	if err := ts.shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if d := time.Since(start); d > handshakeTimeout/2 {
		t.Fatalf("Shutdown took %v: it waited for the handshake timeout", d)
	}
	silent.expectClosed()
	half.expectClosed()
}

func TestServeConnAfterShutdown(t *testing.T) {
	srv := newTestServer(t, Export{Device: newMemDevice(t, 4096)})
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	a, b := socketPair(t)
	srv.ServeConn(b)
	c := newRawClient(t, a)
	c.expectClosed()
	if err := srv.Serve(nil); err != ErrServerClosed {
		t.Fatalf("Serve after Shutdown = %v", err)
	}
}

func TestNewServerErrors(t *testing.T) {
	d := newMemDevice(t, 4096)
	for _, tc := range []struct {
		name    string
		exports []Export
	}{
		{"no exports", nil},
		{"nil device", []Export{{Name: "a"}}},
		{"duplicate", []Export{{Name: "a", Device: d}, {Name: "a", Device: d}}},
		{"duplicate default", []Export{{Device: d}, {Device: d}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewServer(testLogger(), tc.exports...); err == nil {
				t.Fatal("NewServer succeeded")
			}
		})
	}
}

// The transmission flags are part of the wire format: pin them.
func TestTransmissionFlagValues(t *testing.T) {
	rw := (&Export{}).transmissionFlags()
	ro := (&Export{ReadOnly: true}).transmissionFlags()
	if rw != wireFlagsRW || ro != wireFlagsRO {
		t.Fatalf("flags rw %#x ro %#x, want %#x %#x", rw, ro, wireFlagsRW, wireFlagsRO)
	}
}
