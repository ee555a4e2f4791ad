package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"testing"
	"time"
)

func cat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// ---- FuzzHandshake ---------------------------------------------------------

const (
	fzSize0 = 1 << 20
	fzSize1 = 3 << 20
)

func fuzzHandshakeSeeds() [][]byte {
	return [][]byte{
		nil,
		be32(3),
		cat(be32(3), encOption(wireOptGo, encInfoReq(""))),
		cat(be32(1), encOption(wireOptInfo, encInfoReq("a", wireInfoName, wireInfoDesc, wireInfoBlock)),
			encOption(wireOptList, nil), encOption(wireOptGo, encInfoReq("ro", wireInfoName))),
		cat(be32(3), encOption(wireOptExportName, []byte("ro"))),
		cat(be32(0), encOption(wireOptExportName, nil)),
		cat(be32(3), encOption(wireOptExportName, []byte("missing"))),
		cat(be32(3), encOption(wireOptAbort, nil)),
		cat(be32(3), encOption(42, []byte("x")), encOption(wireOptStartTLS, nil),
			encOption(wireOptStructured, nil), encOption(wireOptList, []byte{1}), encOption(wireOptGo, encInfoReq("a"))),
		cat(be32(3), be64(wireOptMagic), be32(42), be32(64<<10+1), []byte("truncated")),
		cat(be32(3), encOption(wireOptGo, []byte{0, 0, 0, 9, 'a'}), encOption(wireOptGo, encInfoReq("nope"))),
		cat(be32(3), be64(wireOptMagic-1)),
		be32(4),
	}
}

// FuzzHandshake feeds arbitrary client bytes into a negotiation. It must
// not panic, must keep its option buffer bounded, and must write only
// well-formed replies.
func FuzzHandshake(f *testing.F) {
	for _, s := range fuzzHandshakeSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		exports := []*Export{
			{Name: "a", Description: "first", Device: newMemDevice(t, fzSize0)},
			{Name: "ro", Description: "second", Device: newMemDevice(t, fzSize1), ReadOnly: true},
		}
		var out bytes.Buffer
		n := negotiation{r: bytes.NewReader(data), w: bufio.NewWriter(&out), exports: exports}
		exp, err := n.run()

		if cap(n.buf) > maxOptionLength {
			t.Fatalf("option buffer grew to %d", cap(n.buf))
		}
		switch {
		case err == nil && exp == nil:
			t.Fatal("no error and no export")
		case err != nil && exp != nil:
			t.Fatalf("export %q and error %v", exp.Name, err)
		case exp != nil && !slices.Contains(exports, exp):
			t.Fatal("export not among the server's")
		}
		// Output is linear in the input (no amplification beyond the short
		// names and descriptions above).
		if out.Len() > 64+40*len(data) {
			t.Fatalf("%d bytes of output for %d of input", out.Len(), len(data))
		}
		checkHandshakeOutput(t, out.Bytes(), exp)
	})
}

// checkHandshakeOutput parses what the server wrote: the hello, option
// replies, and (only if an export was chosen by EXPORT_NAME) its reply.
func checkHandshakeOutput(t *testing.T, out []byte, exp *Export) {
	t.Helper()
	if !bytes.HasPrefix(out, wantHello) {
		t.Fatalf("output does not start with the hello: % x", out[:min(len(out), 18)])
	}
	rest := out[18:]
	lastAckGo := false
	for len(rest) >= 8 && binary.BigEndian.Uint64(rest) == wireReplyMagic {
		if len(rest) < 20 {
			t.Fatalf("truncated option reply % x", rest)
		}
		opt, typ, n := binary.BigEndian.Uint32(rest[8:]), binary.BigEndian.Uint32(rest[12:]), binary.BigEndian.Uint32(rest[16:])
		if uint64(len(rest)-20) < uint64(n) {
			t.Fatalf("option reply length %d, %d bytes left", n, len(rest)-20)
		}
		data := rest[20 : 20+n]
		switch typ {
		case wireRepAck:
			if n != 0 {
				t.Fatalf("ACK with data")
			}
		case wireRepServer:
			if opt != wireOptList || n < 4 || uint64(binary.BigEndian.Uint32(data)) > uint64(n-4) {
				t.Fatalf("bad SERVER reply opt %d % x", opt, data)
			}
		case wireRepInfo:
			if (opt != wireOptInfo && opt != wireOptGo) || n < 2 {
				t.Fatalf("bad INFO reply opt %d % x", opt, data)
			}
			switch binary.BigEndian.Uint16(data) {
			case wireInfoExport:
				if n != 12 {
					t.Fatalf("INFO_EXPORT of %d bytes", n)
				}
			case wireInfoBlock:
				if n != 14 {
					t.Fatalf("INFO_BLOCK_SIZE of %d bytes", n)
				}
			case wireInfoName, wireInfoDesc:
			default:
				t.Fatalf("unknown info type sent: % x", data)
			}
		case wireRepErrUnsup, wireRepErrInvalid, wireRepErrUnknown, wireRepErrTooBig:
		default:
			t.Fatalf("unexpected reply type %#x", typ)
		}
		lastAckGo = typ == wireRepAck && opt == wireOptGo
		rest = rest[20+n:]
	}
	if len(rest) == 0 {
		if exp != nil && !lastAckGo {
			t.Fatalf("export %q chosen without a GO ACK or EXPORT_NAME reply", exp.Name)
		}
		return
	}
	// Only an EXPORT_NAME reply may follow, and only if it chose exp.
	if exp == nil || (len(rest) != 10 && len(rest) != 134) {
		t.Fatalf("trailing output % x (export %v)", rest[:min(len(rest), 40)], exp != nil)
	}
	if binary.BigEndian.Uint64(rest) != uint64(exp.Device.Size()) ||
		binary.BigEndian.Uint16(rest[8:]) != exp.transmissionFlags() ||
		!bytes.Equal(rest[10:], make([]byte, len(rest)-10)) {
		t.Fatalf("bad EXPORT_NAME reply % x", rest)
	}
}

// ---- FuzzParseInfoRequest --------------------------------------------------

func FuzzParseInfoRequest(f *testing.F) {
	f.Add([]byte(nil))
	f.Add(encInfoReq(""))
	f.Add(encInfoReq("disk", wireInfoName, wireInfoDesc))
	f.Add(encInfoReq("x", 1, 2, 3, 4, 0xffff))
	f.Add(append(be32(0xffffffff), 0, 0))
	f.Add(append(encInfoReq("a", 1), 0))
	f.Fuzz(func(t *testing.T, data []byte) {
		name, infos, ok := parseInfoRequest(data)
		// Well-formed: u32 n, n name bytes, u16 count, 2*count bytes, exactly.
		want := false
		if len(data) >= 6 {
			nl := uint64(binary.BigEndian.Uint32(data))
			if nl+6 <= uint64(len(data)) {
				count := uint64(binary.BigEndian.Uint16(data[4+nl:]))
				want = uint64(len(data)) == 4+nl+2+2*count
			}
		}
		if ok != want {
			t.Fatalf("ok = %v, want %v for % x", ok, want, data)
		}
		if !ok {
			if name != "" || infos != nil {
				t.Fatalf("failed parse returned %q %v", name, infos)
			}
			return
		}
		if re := encInfoReq(name, infos...); !bytes.Equal(re, data) {
			t.Fatalf("round trip: % x != % x", re, data)
		}
	})
}

// ---- FuzzRequest -----------------------------------------------------------

const fzDevSize = 64 << 10

type fzReq struct {
	flags, typ  uint16
	off         uint64
	length      uint32
	cookie      uint64
	replied     bool
	allowedErrs []uint32 // empty: must succeed
}

// frameRequests splits a transmission stream the way a server must, and
// gives every request it would receive in full a unique cookie (its index)
// so that replies can be matched. It stops where the server stops reading:
// a bad magic, DISC, or the end of the data.
func frameRequests(data []byte, ro bool) (stream []byte, reqs []*fzReq) {
	stream = bytes.Clone(data)
	for pos := 0; pos+28 <= len(stream); {
		h := stream[pos : pos+28]
		if binary.BigEndian.Uint32(h) != wireReqMagic {
			break
		}
		r := &fzReq{
			flags:  binary.BigEndian.Uint16(h[4:]),
			typ:    binary.BigEndian.Uint16(h[6:]),
			off:    binary.BigEndian.Uint64(h[16:]),
			length: binary.BigEndian.Uint32(h[24:]),
			cookie: uint64(len(reqs)),
		}
		if r.typ == wireCmdDisc {
			break
		}
		binary.BigEndian.PutUint64(h[8:], r.cookie)
		pos += 28
		if r.typ == wireCmdWrite {
			if uint64(len(stream)-pos) < uint64(r.length) {
				break // the payload never arrives in full: no reply
			}
			pos += int(r.length)
		}
		r.allowedErrs = specErrors(r, ro)
		reqs = append(reqs, r)
	}
	return stream, reqs
}

// specErrors lists the errors the spec allows for r: one per rule it
// breaks (the server may report any of them), none if it is valid.
func specErrors(r *fzReq, ro bool) []uint32 {
	var errs []uint32
	allowed := uint16(wireFlagFUA)
	switch r.typ {
	case wireCmdRead, wireCmdWrite, wireCmdFlush, wireCmdTrim:
	case wireCmdZeroes:
		allowed |= wireFlagNoHole
	default:
		return []uint32{wireEINVAL}
	}
	if r.flags&^allowed != 0 {
		errs = append(errs, wireEINVAL)
	}
	if r.typ == wireCmdFlush {
		if r.off != 0 || r.length != 0 {
			errs = append(errs, wireEINVAL)
		}
		return errs
	}
	writes := r.typ != wireCmdRead
	if ro && writes {
		errs = append(errs, wireEPERM)
	}
	if r.length == 0 {
		errs = append(errs, wireEINVAL)
	}
	if (r.typ == wireCmdRead || r.typ == wireCmdWrite) && r.length > MaxPayload {
		errs = append(errs, wireEINVAL)
	}
	if r.off > fzDevSize || uint64(r.length) > fzDevSize-r.off {
		errs = append(errs, wireEINVAL)
		if r.typ == wireCmdWrite || r.typ == wireCmdZeroes {
			errs = append(errs, wireENOSPC)
		}
	}
	return errs
}

func fuzzRequestSeeds() [][]byte {
	p := pattern(1, 4096)
	return [][]byte{
		nil,
		cat(encRequest(0, wireCmdWrite, 1, 0, 4096), p, encRequest(0, wireCmdRead, 2, 0, 4096),
			encRequest(wireFlagFUA, wireCmdWrite, 3, 100, 10), p[:10], encRequest(0, wireCmdFlush, 4, 0, 0),
			encRequest(0, wireCmdTrim, 5, 0, 8192), encRequest(wireFlagNoHole, wireCmdZeroes, 6, 512, 1024),
			encRequest(0, wireCmdDisc, 7, 0, 0)),
		cat(encRequest(0, wireCmdRead, 1, fzDevSize-1, 2), encRequest(0, wireCmdWrite, 2, ^uint64(0), 16), p[:16],
			encRequest(0, wireCmdRead, 3, 0, 0), encRequest(0, 99, 4, 0, 1), encRequest(1<<9, wireCmdRead, 5, 0, 1)),
		cat(encRequest(0, wireCmdWrite, 1, 0, 4096), p[:100]),
		cat(encRequest(0, wireCmdRead, 1, 0, 512), be32(0xdeadbeef), p[:24]),
		cat(encRequest(wireFlagFUA, wireCmdRead, 1, 0, 512), encRequest(0, wireCmdFlush, 2, 1, 0)),
		cat(encRequest(0, wireCmdWrite, 1, 0, MaxPayload+1), p),
	}
}

// FuzzRequest feeds arbitrary transmission bytes to a server connection
// after a real handshake. The server must not panic or touch the device out
// of range, must answer every request it received in full exactly once,
// with success exactly when the request is valid, and must then let go of
// the connection.
func FuzzRequest(f *testing.F) {
	for _, s := range fuzzRequestSeeds() {
		f.Add(false, s)
		f.Add(true, s)
	}
	f.Fuzz(func(t *testing.T, ro bool, data []byte) {
		d := newMemDevice(t, fzDevSize)
		srv := newTestServer(t, Export{Name: "", Device: d}, Export{Name: "ro", Device: d, ReadOnly: true})
		cli, sc := socketPair(t)
		defer cli.Close()
		srv.ServeConn(sc)
		_ = cli.SetDeadline(time.Now().Add(ioTimeout))

		name := ""
		if ro {
			name = "ro"
		}
		stream, reqs := frameRequests(data, ro)
		writeErr := make(chan error, 1)
		go func() {
			_, err := cli.Write(cat(be32(3), encOption(wireOptGo, encInfoReq(name)), stream))
			if err == nil {
				err = cli.CloseWrite()
			}
			writeErr <- err
		}()

		c := &rawClient{t: t, nc: cli, br: bufio.NewReader(cli)}
		c.hello()
		c.expectExportInfo(c.infoReplies(wireOptGo))
		for {
			var h [16]byte
			if _, err := io.ReadFull(c.br, h[:]); err != nil {
				if errors.Is(err, io.EOF) || isClosedErr(err) {
					break
				}
				t.Fatalf("reading replies: %v", err)
			}
			if m := binary.BigEndian.Uint32(h[:]); m != wireSimpleRep {
				t.Fatalf("reply magic %#x", m)
			}
			errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
			if cookie >= uint64(len(reqs)) || reqs[cookie].replied {
				t.Fatalf("reply for unknown or answered cookie %d", cookie)
			}
			r := reqs[cookie]
			r.replied = true
			switch {
			case len(r.allowedErrs) == 0 && errno != 0:
				t.Fatalf("valid request %+v failed with %d", *r, errno)
			case len(r.allowedErrs) != 0 && !slices.Contains(r.allowedErrs, errno):
				t.Fatalf("request %+v: errno %d, want one of %v", *r, errno, r.allowedErrs)
			}
			if r.typ == wireCmdRead && errno == 0 {
				c.read(int(r.length))
			}
		}
		for _, r := range reqs {
			if !r.replied {
				t.Fatalf("request %+v never answered", *r)
			}
		}
		if err := <-writeErr; err != nil && !isClosedErr(err) {
			t.Fatalf("write: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if n := connCount(srv); n != 0 {
			t.Fatalf("%d connections left", n)
		}
	})
}
