package tests

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// closeTimeout is how long the server may take to hang up on a client that
// broke the protocol.
const closeTimeout = 10 * time.Second

// TestBadClients throws broken and hostile clients at one daemon over both
// transports, then checks that it still serves, that good clients' data is
// intact, and that it stops cleanly.
func TestBadClients(t *testing.T) {
	t.Parallel()
	requireTools(t, "nbdinfo")
	p := startMirrord(t)
	r := newRand(t)

	// A good client's data, written before the abuse and checked after.
	const goodOff, goodLen = 900 << 20, 4 << 20
	good := randomBytes(r, goodLen)
	c, err := dialNBD("unix", p.Sock, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.mustWrite(goodOff, good, 0); err != nil {
		t.Fatal(err)
	}
	if errno, err := c.flush(); err != nil || errno != 0 {
		t.Fatalf("flush: errno %d, err %v", errno, err)
	}
	if err := c.disconnect(); err != nil {
		t.Fatal(err)
	}

	expect := map[uint64][]byte{goodOff: good}
	for i, tr := range []struct{ network, addr string }{{"unix", p.Sock}, {"tcp", p.TCP}} {
		t.Run(tr.network, func(t *testing.T) {
			b := &badClients{p: p, network: tr.network, addr: tr.addr, base: uint64(i) * (256 << 20),
				r: r, expect: expect}
			b.run(t)
		})
	}
	if p.exited() {
		t.Fatalf("mirrord died under bad clients: %v", p.cmd.ProcessState)
	}

	// Still serving, to real clients and to ours.
	if info := nbdinfo(t, p.unixURI()); info.Exports[0].Size != 1<<30 {
		t.Errorf("nbdinfo after bad clients: size %d", info.Exports[0].Size)
	}
	c, err = dialNBD("tcp", p.TCP, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.mustRead(goodOff, goodLen)
	if err != nil {
		t.Fatal(err)
	}
	if sha256Bytes(got) != sha256Bytes(good) {
		t.Errorf("good client's region changed: %s", firstDiff(got, good))
	}

	// Idle clients, one mid-handshake and one connected, must not hold up
	// SIGTERM; the connected one is hung up on.
	idleHS, err := dialRaw("unix", p.Sock)
	if err != nil {
		t.Fatal(err)
	}
	defer idleHS.Close()
	start := time.Now()
	p.stop()
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("stop with idle clients took %v", d)
	}
	if err := c.expectClosed(closeTimeout); err != nil {
		t.Errorf("connected client after shutdown: %v", err)
	}
	c.Close()

	// Everything good clients wrote is in the backing file.
	for off, want := range expect {
		if got := readFileAt(t, p.Path, int64(off), len(want)); !bytes.Equal(got, want) {
			t.Errorf("backing file at %d (%d bytes): %s", off, len(want), firstDiff(got, want))
		}
	}
}

type badClients struct {
	p       *proc
	network string
	addr    string
	base    uint64 // this transport's 256 MiB of the volume
	r       *rand.ChaCha8
	expect  map[uint64][]byte // what good writes left, by offset
	slot    uint64
}

const volSize = 1 << 30

func (b *badClients) dial(t *testing.T) *nbdClient {
	t.Helper()
	c, err := dialNBD(b.network, b.addr, "vol0")
	if err != nil {
		t.Fatalf("dial %s %s: %v", b.network, b.addr, err)
	}
	t.Cleanup(func() { c.Close() })
	if c.Size != volSize {
		t.Fatalf("export size %d, want %d", c.Size, volSize)
	}
	return c
}

func (b *badClients) raw(t *testing.T) *nbdClient {
	t.Helper()
	c, err := dialRaw(b.network, b.addr)
	if err != nil {
		t.Fatalf("dial %s %s: %v", b.network, b.addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// usable checks that c still works: it writes 4 KiB to a fresh slot and
// reads it back.
func (b *badClients) usable(t *testing.T, c *nbdClient) {
	t.Helper()
	off := b.base + b.slot*4096
	b.slot++
	data := randomBytes(b.r, 4096)
	if err := c.mustWrite(off, data, 0); err != nil {
		t.Fatalf("connection unusable: %v", err)
	}
	got, err := c.mustRead(off, 4096)
	if err != nil {
		t.Fatalf("connection unusable: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read back after write: %s", firstDiff(got, data))
	}
	b.expect[off] = data
}

func wantErrno(t *testing.T, what string, errno uint32, err error, want ...uint32) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v (connection should stay up)", what, err)
	}
	for _, w := range want {
		if errno == w {
			return
		}
	}
	t.Errorf("%s: errno %d, want %v", what, errno, want)
}

func (b *badClients) run(t *testing.T) {
	t.Run("bad option magic", func(t *testing.T) {
		c := b.raw(t)
		if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
			t.Fatal(err)
		}
		if err := c.sendOptionMagic(0x1122334455667788, optGo, nil); err != nil {
			t.Fatal(err)
		}
		if err := c.expectClosed(closeTimeout); err != nil {
			t.Error(err)
		}
	})

	t.Run("unknown client flags", func(t *testing.T) {
		c := b.raw(t)
		if err := c.hello(nbdFlagFixedNewstyle | 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := c.expectClosed(closeTimeout); err != nil {
			t.Error(err)
		}
	})

	t.Run("unknown option then go", func(t *testing.T) {
		c := b.raw(t)
		if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
			t.Fatal(err)
		}
		if err := c.sendOption(99, []byte("xyz")); err != nil {
			t.Fatal(err)
		}
		rep, err := c.readOptReply()
		if err != nil {
			t.Fatal(err)
		}
		if rep.opt != 99 || rep.typ != repErrUnsup {
			t.Errorf("unknown option: reply opt %d type %#x, want 99 / NBD_REP_ERR_UNSUP", rep.opt, rep.typ)
		}
		if err := c.optGo("vol0"); err != nil {
			t.Fatalf("GO after an unknown option: %v", err)
		}
		b.usable(t, c)
	})

	t.Run("unknown export then info and default export", func(t *testing.T) {
		c := b.raw(t)
		if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
			t.Fatal(err)
		}
		var oe *optError
		if err := c.optGo("no-such-export"); !errors.As(err, &oe) || oe.typ != repErrUnknown {
			t.Fatalf("GO for an unknown export: %v, want NBD_REP_ERR_UNKNOWN", err)
		}
		if err := c.infoOrGo(optInfo, "vol0"); err != nil {
			t.Fatalf("INFO after an unknown export: %v", err)
		}
		want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagWriteZeroes | tflagCanMultiConn)
		if c.Size != volSize || c.Flags != want {
			t.Errorf("INFO: size %d flags %#x, want %d %#x", c.Size, c.Flags, volSize, want)
		}
		if err := c.optGo(""); err != nil {
			t.Fatalf("GO for the default export: %v", err)
		}
		if c.Size != volSize {
			t.Errorf("default export size %d", c.Size)
		}
		b.usable(t, c)
	})

	t.Run("list then old-style export name", func(t *testing.T) {
		c := b.raw(t)
		// Without NO_ZEROES: EXPORT_NAME's reply then carries 124 zeroes.
		if err := c.hello(nbdFlagFixedNewstyle); err != nil {
			t.Fatal(err)
		}
		if err := c.sendOption(optList, nil); err != nil {
			t.Fatal(err)
		}
		var names []string
		for {
			rep, err := c.readOptReply()
			if err != nil {
				t.Fatal(err)
			}
			if rep.typ == repAck {
				break
			}
			if rep.typ != repServer || len(rep.data) < 4 {
				t.Fatalf("LIST: reply type %#x, %d bytes", rep.typ, len(rep.data))
			}
			n := binary.BigEndian.Uint32(rep.data)
			if int(n) > len(rep.data)-4 {
				t.Fatalf("LIST: name length %d in %d bytes", n, len(rep.data))
			}
			names = append(names, string(rep.data[4:4+n]))
		}
		if len(names) != 1 || names[0] != "vol0" {
			t.Errorf("LIST: %q, want [vol0]", names)
		}
		if err := c.sendOption(optExportName, nil); err != nil {
			t.Fatal(err)
		}
		rep, err := c.readFull(8 + 2 + 124)
		if err != nil {
			t.Fatal(err)
		}
		if size := binary.BigEndian.Uint64(rep); size != volSize {
			t.Errorf("EXPORT_NAME: size %d", size)
		}
		if !bytes.Equal(rep[10:], make([]byte, 124)) {
			t.Errorf("EXPORT_NAME: 124 trailing bytes are not zero")
		}
		b.usable(t, c)
	})

	t.Run("abort", func(t *testing.T) {
		c := b.raw(t)
		if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
			t.Fatal(err)
		}
		if err := c.sendOption(optAbort, nil); err != nil {
			t.Fatal(err)
		}
		if rep, err := c.readOptReply(); err == nil && (rep.opt != optAbort || rep.typ != repAck) {
			t.Errorf("ABORT: reply opt %d type %#x, want an ACK or nothing", rep.opt, rep.typ)
		}
		if err := c.expectClosed(closeTimeout); err != nil {
			t.Error(err)
		}
	})

	t.Run("bad request magic", func(t *testing.T) {
		c := b.dial(t)
		h := make([]byte, 28)
		binary.BigEndian.PutUint32(h, 0xdeadbeef)
		binary.BigEndian.PutUint32(h[24:], 4096)
		if err := c.write(h); err != nil {
			t.Fatal(err)
		}
		if err := c.expectClosed(closeTimeout); err != nil {
			t.Error(err)
		}
	})

	t.Run("unknown command", func(t *testing.T) {
		c := b.dial(t)
		errno, _, err := c.do(99, 0, b.base, 4096, nil)
		wantErrno(t, "command 99", errno, err, errnoInval)
		errno, _, err = c.do(cmdRead, 1<<15, b.base, 4096, nil)
		wantErrno(t, "READ with unknown flag", errno, err, errnoInval)
		b.usable(t, c)
	})

	t.Run("read past end", func(t *testing.T) {
		c := b.dial(t)
		for _, r := range []struct {
			off uint64
			n   uint32
		}{
			{volSize - 4096 + 1, 4096},
			{volSize, 1},
			{volSize + 1<<20, 4096},
			{1 << 63, 512},
			{^uint64(0) - 511, 1024}, // offset+length wraps
		} {
			errno, _, err := c.read(r.off, r.n)
			wantErrno(t, fmt.Sprintf("READ %d@%d", r.n, r.off), errno, err, errnoInval)
		}
		if _, err := c.mustRead(volSize-4096, 4096); err != nil {
			t.Errorf("last 4 KiB: %v", err)
		}
		b.usable(t, c)
	})

	t.Run("write past end", func(t *testing.T) {
		c := b.dial(t)
		for _, w := range []struct {
			off uint64
			n   int
		}{
			{volSize - 100, 4096},
			{volSize, 512},
			{^uint64(0) - 4095, 8192}, // offset+length wraps
		} {
			errno, err := c.writeAt(w.off, bytes.Repeat([]byte{0xee}, w.n), 0)
			wantErrno(t, fmt.Sprintf("WRITE %d@%d", w.n, w.off), errno, err, errnoNoSpace)
		}
		errno, _, err := c.do(cmdWriteZeroes, 0, volSize-100, 4096, nil)
		wantErrno(t, "WRITE_ZEROES past end", errno, err, errnoNoSpace, errnoInval)
		errno, _, err = c.do(cmdTrim, 0, volSize-100, 4096, nil)
		wantErrno(t, "TRIM past end", errno, err, errnoNoSpace, errnoInval)
		b.usable(t, c)
		// The valid tail was not touched by the refused writes.
		tail, err := c.mustRead(volSize-4096, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(tail, make([]byte, 4096)) {
			t.Errorf("refused write past end changed the last block: %s", firstDiff(tail, make([]byte, 4096)))
		}
	})

	t.Run("oversize requests", func(t *testing.T) {
		c := b.dial(t)
		const big = 40 << 20
		off := b.base + 8<<20
		errno, err := c.writeAt(off, bytes.Repeat([]byte{0xee}, big), 0)
		wantErrno(t, "40 MiB WRITE", errno, err, errnoInval, errnoOverflw, errnoNoSpace)
		errno, _, err = c.read(off, big)
		wantErrno(t, "40 MiB READ", errno, err, errnoInval, errnoOverflw)
		got, err := c.mustRead(off, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, 4096)) {
			t.Errorf("refused 40 MiB write left data behind: %s", firstDiff(got, make([]byte, 4096)))
		}
		// The largest legal request, 32 MiB, is served.
		data := randomBytes(b.r, 32<<20)
		if err := c.mustWrite(off, data, 0); err != nil {
			t.Fatal(err)
		}
		if got, err := c.mustRead(off, 32<<20); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("32 MiB read back: err %v, %s", err, firstDiff(got, data))
		}
		b.expect[off] = data
		b.usable(t, c)
	})

	t.Run("truncated header", func(t *testing.T) {
		c := b.dial(t)
		h := make([]byte, 10)
		binary.BigEndian.PutUint32(h, nbdReqMagic)
		if err := c.write(h); err != nil {
			t.Fatal(err)
		}
		c.Close()
		b.usable(t, b.dial(t))
	})

	t.Run("vanish mid-payload", func(t *testing.T) {
		c := b.dial(t)
		// 1 MiB announced, 100 KiB sent. The write was never acknowledged,
		// so its range may hold anything; it is kept out of expect.
		h := make([]byte, 28, 28+100<<10)
		binary.BigEndian.PutUint32(h, nbdReqMagic)
		binary.BigEndian.PutUint16(h[6:], cmdWrite)
		binary.BigEndian.PutUint64(h[16:], b.base+48<<20)
		binary.BigEndian.PutUint32(h[24:], 1<<20)
		if err := c.write(append(h, make([]byte, 100<<10)...)); err != nil {
			t.Fatal(err)
		}
		c.Close()
		c2 := b.dial(t)
		if _, err := c2.mustRead(b.base+48<<20, 1<<20); err != nil {
			t.Fatal(err)
		}
		b.usable(t, c2)
	})

	t.Run("pipelined out of order", func(t *testing.T) { b.pipelined(t) })

	t.Run("disconnect with requests in flight", func(t *testing.T) {
		// NBD_CMD_DISC right behind 16 writes: the server must complete
		// them all before it closes.
		c := b.dial(t)
		const n, bs = 16, 64 << 10
		off := b.base + 80<<20
		var reqs []byte
		blocks := make([][]byte, n)
		for k := range n {
			blocks[k] = randomBytes(b.r, bs)
			h := make([]byte, 28)
			binary.BigEndian.PutUint32(h, nbdReqMagic)
			binary.BigEndian.PutUint16(h[6:], cmdWrite)
			binary.BigEndian.PutUint64(h[8:], uint64(k))
			binary.BigEndian.PutUint64(h[16:], off+uint64(k)*bs)
			binary.BigEndian.PutUint32(h[24:], bs)
			reqs = append(append(reqs, h...), blocks[k]...)
		}
		h := make([]byte, 28)
		binary.BigEndian.PutUint32(h, nbdReqMagic)
		binary.BigEndian.PutUint16(h[6:], cmdDisc)
		reqs = append(reqs, h...)
		sent := make(chan error, 1)
		go func() { sent <- c.write(reqs) }()
		for range n {
			errno, cookie, err := c.readReplyHeader()
			if err != nil {
				t.Fatalf("replies to writes sent before DISC: %v", err)
			}
			if errno != 0 {
				t.Errorf("write %d before DISC: errno %d", cookie, errno)
			}
		}
		if err := <-sent; err != nil {
			t.Fatal(err)
		}
		if err := c.expectClosed(closeTimeout); err != nil {
			t.Errorf("after DISC: %v", err)
		}
		c2 := b.dial(t)
		for k := range n {
			got, err := c2.mustRead(off+uint64(k)*bs, bs)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, blocks[k]) {
				t.Errorf("write %d sent before DISC: %s", k, firstDiff(got, blocks[k]))
			}
			b.expect[off+uint64(k)*bs] = blocks[k]
		}
	})

	t.Run("100 clients at once", func(t *testing.T) { b.hundred(t) })
}

// pipelined keeps many requests in flight on one connection and matches
// replies by cookie, as real clients do.
func (b *badClients) pipelined(t *testing.T) {
	c := b.dial(t)
	const n, bs = 32, 64 << 10
	type req struct {
		typ, flags uint16
		off        uint64
		data       []byte // payload of a write, expected data of a read
	}
	// exchange sends reqs from one goroutine while reading replies on
	// this one (a client that stops reading can deadlock any server).
	exchange := func(reqs map[uint64]req) {
		t.Helper()
		sendErr := make(chan error, 1)
		go func() {
			for cookie, r := range reqs {
				length := uint32(len(r.data))
				var payload []byte
				if r.typ == cmdWrite {
					payload = r.data
				}
				if r.typ == cmdFlush {
					length = 0
				}
				if err := c.sendRequest(r.typ, r.flags, cookie, r.off, length, payload); err != nil {
					sendErr <- err
					return
				}
			}
			sendErr <- nil
		}()
		seen := map[uint64]bool{}
		for range reqs {
			errno, cookie, err := c.readReplyHeader()
			if err != nil {
				t.Fatal(err)
			}
			r, ok := reqs[cookie]
			if !ok || seen[cookie] {
				t.Fatalf("reply with unknown or repeated cookie %d", cookie)
			}
			seen[cookie] = true
			if errno != 0 {
				t.Fatalf("request %d (type %d at %d): errno %d", cookie, r.typ, r.off, errno)
			}
			if r.typ == cmdRead {
				got, err := c.readFull(len(r.data))
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, r.data) {
					t.Errorf("pipelined read %d at %d: %s", cookie, r.off, firstDiff(got, r.data))
				}
			}
		}
		if err := <-sendErr; err != nil {
			t.Fatal(err)
		}
	}
	first, second := b.base+64<<20, b.base+72<<20
	batch1 := map[uint64]req{}
	for k := range n {
		var flags uint16
		if k%4 == 0 {
			flags = cmdFlagFUA
		}
		batch1[uint64(1000+k)] = req{cmdWrite, flags, first + uint64(k)*bs, randomBytes(b.r, bs)}
	}
	exchange(batch1)
	batch2 := map[uint64]req{5000: {typ: cmdFlush}}
	for k := range n {
		w := batch1[uint64(1000+k)]
		batch2[uint64(2000+k)] = req{cmdRead, 0, w.off, w.data}
		batch2[uint64(3000+k)] = req{cmdWrite, 0, second + uint64(k)*bs, randomBytes(b.r, bs)}
		b.expect[w.off] = w.data
	}
	exchange(batch2)
	for k := range n {
		w := batch2[uint64(3000+k)]
		got, err := c.mustRead(w.off, bs)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w.data) {
			t.Errorf("read back of pipelined write at %d: %s", w.off, firstDiff(got, w.data))
		}
		b.expect[w.off] = w.data
	}
}

// hundred connects 100 clients at once; each writes and verifies its own
// 4 KiB.
func (b *badClients) hundred(t *testing.T) {
	const clients = 100
	region := b.base + 128<<20
	blocks := make([][]byte, clients)
	for i := range blocks {
		blocks[i] = randomBytes(b.r, 4096)
	}
	var (
		errs  collect
		wg    sync.WaitGroup
		start = make(chan struct{})
	)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			off := region + uint64(i)*4096
			c, err := dialNBD(b.network, b.addr, "vol0")
			if err != nil {
				errs.add(fmt.Errorf("client %d: %w", i, err))
				return
			}
			defer c.Close()
			if err := c.mustWrite(off, blocks[i], 0); err != nil {
				errs.add(fmt.Errorf("client %d: %w", i, err))
				return
			}
			got, err := c.mustRead(off, 4096)
			if err != nil {
				errs.add(fmt.Errorf("client %d: %w", i, err))
				return
			}
			if !bytes.Equal(got, blocks[i]) {
				errs.add(fmt.Errorf("client %d: read back %s", i, firstDiff(got, blocks[i])))
			}
			errs.add(c.disconnect())
		}()
	}
	close(start)
	wg.Wait()
	errs.report(t)
	for i := range clients {
		b.expect[region+uint64(i)*4096] = blocks[i]
	}
}
