package wan

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

var testSecret = []byte("correct horse battery staple")

type result struct {
	peer Hello
	err  error
	r    *Reader
	w    *Writer
}

// startHandshake runs Handshake on conn in a goroutine, bounded by a deadline as the
// engine would bound it.
func startHandshake(conn net.Conn, own Hello, secret []byte) <-chan result {
	ch := make(chan result, 1)
	go func() {
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		r, w := NewReader(conn), NewWriter(conn)
		peer, err := Handshake(r, w, own, secret)
		ch <- result{peer, err, r, w}
	}()
	return ch
}

func await(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case res := <-ch:
		return res
	case <-time.After(15 * time.Second):
		t.Fatal("handshake did not return")
		return result{}
	}
}

func pipe(t *testing.T) (net.Conn, net.Conn) {
	a, b := net.Pipe()
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func helloPair() (Hello, Hello) {
	a := sampleHello()
	a.Nonce = [32]byte{} // random
	b := a
	b.Node, b.Role, b.Flags = "beta", RoleSecondary, 0
	return a, b
}

func TestHandshakeSuccess(t *testing.T) {
	ca, cb := pipe(t)
	ha, hb := helloPair()
	cha, chb := startHandshake(ca, ha, testSecret), startHandshake(cb, hb, testSecret)
	ra, rb := await(t, cha), await(t, chb)
	if ra.err != nil || rb.err != nil {
		t.Fatalf("handshake: a %v, b %v", ra.err, rb.err)
	}
	if ra.peer.Node != "beta" || rb.peer.Node != "alpha" {
		t.Fatalf("peers: a sees %q, b sees %q", ra.peer.Node, rb.peer.Node)
	}
	if ra.peer.Nonce == ([32]byte{}) || rb.peer.Nonce == ([32]byte{}) || ra.peer.Nonce == rb.peer.Nonce {
		t.Fatal("Handshake did not fill fresh random nonces")
	}
	// Apart from the nonce, each side receives exactly the other's Hello.
	gotB, gotA := ra.peer, rb.peer
	gotB.Nonce, gotA.Nonce = [32]byte{}, [32]byte{}
	if gotB != hb || gotA != ha {
		t.Fatalf("peer hellos differ:\n%+v\n%+v", gotB, gotA)
	}

	// The stream is ready for frames both ways.
	for _, dir := range []struct {
		name string
		w    *Writer
		r    *Reader
	}{{"a to b", ra.w, rb.r}, {"b to a", rb.w, ra.r}} {
		data := fill(4096, 3)
		errc := make(chan error, 1)
		go func() {
			err := dir.w.WriteFrame(Header{Type: FrameWrite, Seq: 1, Flags: FlagSync}, data)
			if err == nil {
				err = dir.w.Flush()
			}
			errc <- err
		}()
		f, err := dir.r.ReadFrame()
		if err != nil || f.Type != FrameWrite || !bytes.Equal(f.Payload, data) {
			t.Fatalf("%s: %v %v", dir.name, f.Type, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("%s: %v", dir.name, err)
		}
	}
}

// TestExchangeStream: after a handshake both sides send their stream
// position at once and each reads the other's.
func TestExchangeStream(t *testing.T) {
	ca, cb := pipe(t)
	ha, hb := helloPair()
	ha.Flags |= HelloStream
	hb.Flags |= HelloStream
	cha, chb := startHandshake(ca, ha, testSecret), startHandshake(cb, hb, testSecret)
	ra, rb := await(t, cha), await(t, chb)
	if ra.err != nil || rb.err != nil {
		t.Fatalf("handshake: a %v, b %v", ra.err, rb.err)
	}
	if ra.peer.Flags&HelloStream == 0 || rb.peer.Flags&HelloStream == 0 {
		t.Fatal("HelloStream lost in the handshake")
	}
	pa, pb := StreamPos{Stream: 9, Pos: 1000}, StreamPos{Stream: 9, Pos: 990}
	got := make(chan StreamPos, 1)
	errc := make(chan error, 1)
	go func() {
		p, err := ExchangeStream(rb.r, rb.w, pb)
		got <- p
		errc <- err
	}()
	p, err := ExchangeStream(ra.r, ra.w, pa)
	if err != nil || p != pb {
		t.Fatalf("a read %+v, %v; want %+v", p, err, pb)
	}
	if p, err := <-got, <-errc; err != nil || p != pa {
		t.Fatalf("b read %+v, %v; want %+v", p, err, pa)
	}
	if _, err := ExchangeStream(ra.r, ra.w, StreamPos{Pos: 1}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("a position without a stream sent: %v", err)
	}
}

// TestHandshakeTCP runs the handshake and a zero-copy batch over real TCP, where the
// Writer uses writev.
func TestHandshakeTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skip("no loopback TCP:", err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	ca, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cb, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	defer cb.Close()

	ha, hb := helloPair()
	cha, chb := startHandshake(ca, ha, testSecret), startHandshake(cb, hb, testSecret)
	ra, rb := await(t, cha), await(t, chb)
	if ra.err != nil || rb.err != nil {
		t.Fatalf("handshake: a %v, b %v", ra.err, rb.err)
	}

	frames := []Frame{
		{Header{Type: FrameWrite, Seq: 1}, fill(1<<20, 1)},
		{Header{Type: FrameWrite, Seq: 2}, fill(4096, 2)},
		{Header{Type: FrameResyncData, Seq: 3, Offset: 1 << 20}, fill(zeroCopyMin, 3)},
		{Header{Type: FrameFlush, Seq: 4}, nil},
	}
	errc := make(chan error, 1)
	go func() {
		for _, f := range frames {
			if err := ra.w.WriteFrame(f.Header, f.Payload); err != nil {
				errc <- err
				return
			}
		}
		errc <- ra.w.Flush()
	}()
	for _, want := range frames {
		f, err := rb.r.ReadFrame()
		if err != nil || f.Seq != want.Seq || !bytes.Equal(f.Payload, want.Payload) {
			t.Fatalf("frame %d: %v", want.Seq, err)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func TestHandshakeWrongSecret(t *testing.T) {
	for _, tc := range []struct {
		name   string
		sa, sb []byte
	}{
		{name: "a wrong", sa: []byte("wrong"), sb: testSecret},
		{name: "b wrong", sa: testSecret, sb: []byte("wrong")},
		{name: "prefix", sa: testSecret, sb: testSecret[:len(testSecret)-1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ca, cb := pipe(t)
			ha, hb := helloPair()
			cha, chb := startHandshake(ca, ha, tc.sa), startHandshake(cb, hb, tc.sb)
			ra, rb := await(t, cha), await(t, chb)
			if !errors.Is(ra.err, ErrAuth) || !errors.Is(rb.err, ErrAuth) {
				t.Fatalf("a: %v, b: %v; want ErrAuth on both sides", ra.err, rb.err)
			}
			if ra.peer != (Hello{}) || rb.peer != (Hello{}) {
				t.Fatal("a failed handshake returned a peer Hello")
			}
		})
	}
}

// scriptedPeer plays the far end by hand. Everything the side under test sends is
// decoded in the background, so that the synchronous pipe never blocks it.
type scriptedPeer struct {
	t      *testing.T
	conn   net.Conn
	frames chan Frame
}

func newScriptedPeer(t *testing.T, conn net.Conn) *scriptedPeer {
	p := &scriptedPeer{t: t, conn: conn, frames: make(chan Frame, 64)}
	go func() {
		defer close(p.frames)
		r := NewReader(conn)
		for {
			f, err := r.ReadFrame()
			if err != nil {
				return
			}
			f.Payload = bytes.Clone(f.Payload)
			p.frames <- f
		}
	}()
	return p
}

func (p *scriptedPeer) write(b ...[]byte) {
	p.t.Helper()
	if _, err := p.conn.Write(bytes.Join(b, nil)); err != nil {
		p.t.Errorf("scripted peer write: %v", err)
	}
}

// next returns the next frame the side under test sent; ok is false once its
// connection has closed.
func (p *scriptedPeer) next() (Frame, bool) {
	p.t.Helper()
	select {
	case f, ok := <-p.frames:
		return f, ok
	case <-time.After(10 * time.Second):
		p.t.Fatal("no frame from the side under test")
		return Frame{}, false
	}
}

// rest returns the types of the remaining frames, up to the first read error.
func (p *scriptedPeer) rest() []FrameType {
	var types []FrameType
	for {
		f, ok := p.next()
		if !ok {
			return types
		}
		types = append(types, f.Type)
	}
}

func frameBytes(t *testing.T, h Header, payload []byte) []byte {
	return encode(t, Frame{h, payload})
}

// TestHandshakeWrongSecretStopsReading checks that after a bad Auth the side under
// test reads nothing more (the pipelined frame stays in its Reader), tells the peer
// why, and never accepts the peer.
func TestHandshakeWrongSecretStopsReading(t *testing.T) {
	ca, cb := pipe(t)
	own, peerHello := helloPair()
	peerHello.Nonce = [32]byte{9}
	ch := startHandshake(ca, own, testSecret)
	p := newScriptedPeer(t, cb)

	peerBytes := mustMarshal(t, peerHello)
	p.write(frameBytes(t, Header{Type: FrameHello}, peerBytes))
	f, _ := p.next()
	var ownSent Hello
	if f.Type != FrameHello || ownSent.UnmarshalBinary(f.Payload) != nil {
		t.Fatalf("first frame %v, want a valid Hello", f.Type)
	}
	mac := authMAC([]byte("not the secret"), nil, ownSent.Nonce, peerHello.Nonce, peerBytes, f.Payload)
	// Auth and a pipelined frame in one write, so both sit in the Reader's buffer.
	p.write(frameBytes(t, Header{Type: FrameAuth}, mac), frameBytes(t, Header{Type: FramePing, Seq: 77}, nil))

	if f, _ := p.next(); f.Type != FrameAuth {
		t.Fatalf("second frame %v, want Auth", f.Type)
	}
	if f, _ := p.next(); f.Type != FrameClose || string(f.Payload) != "authentication failed" {
		t.Fatalf("third frame %v %q, want Close \"authentication failed\"", f.Type, f.Payload)
	}
	res := await(t, ch)
	if !errors.Is(res.err, ErrAuth) {
		t.Fatalf("Handshake: %v, want ErrAuth", res.err)
	}
	if res.r.Buffered() != HeaderSize {
		t.Fatalf("Reader holds %d bytes, want the %d of the pipelined ping", res.r.Buffered(), HeaderSize)
	}
	if f, err := res.r.ReadFrame(); err != nil || f.Type != FramePing || f.Seq != 77 {
		t.Fatalf("pipelined frame: %v seq %d, %v", f.Type, f.Seq, err)
	}
}

// TestHandshakePipelinedAfterAuth checks that frames a peer sends right behind its
// Auth survive the handshake.
func TestHandshakePipelinedAfterAuth(t *testing.T) {
	ca, cb := pipe(t)
	own, peerHello := helloPair()
	peerHello.Nonce = [32]byte{9}
	ch := startHandshake(ca, own, testSecret)
	p := newScriptedPeer(t, cb)

	peerBytes := mustMarshal(t, peerHello)
	p.write(frameBytes(t, Header{Type: FrameHello}, peerBytes))
	f, _ := p.next()
	var ownSent Hello
	if err := ownSent.UnmarshalBinary(f.Payload); err != nil {
		t.Fatal(err)
	}
	mac := authMAC(testSecret, nil, ownSent.Nonce, peerHello.Nonce, peerBytes, f.Payload)
	state := mustMarshal(t, StateUpdate{Role: RoleSecondary, Disk: 3})
	p.write(frameBytes(t, Header{Type: FrameAuth}, mac), frameBytes(t, Header{Type: FrameState}, state))
	if f, _ := p.next(); f.Type != FrameAuth {
		t.Fatalf("second frame %v, want Auth", f.Type)
	}
	res := await(t, ch)
	if res.err != nil {
		t.Fatal(res.err)
	}
	if f, err := res.r.ReadFrame(); err != nil || f.Type != FrameState || !bytes.Equal(f.Payload, state) {
		t.Fatalf("pipelined frame: %v, %v", f.Type, err)
	}
}

// recordingConn keeps a copy of everything written through it.
type recordingConn struct {
	net.Conn
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *recordingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.out.Write(p)
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// TestHandshakeReplay captures one side of a valid exchange and replays it, byte for
// byte, against a new handshake: the fresh nonce makes the captured Auth worthless.
func TestHandshakeReplay(t *testing.T) {
	ca, cb := pipe(t)
	ha, hb := helloPair()
	rec := &recordingConn{Conn: cb}
	cha, chb := startHandshake(ca, ha, testSecret), startHandshake(rec, hb, testSecret)
	if ra, rb := await(t, cha), await(t, chb); ra.err != nil || rb.err != nil {
		t.Fatalf("capture handshake: a %v, b %v", ra.err, rb.err)
	}
	rec.mu.Lock()
	captured := bytes.Clone(rec.out.Bytes())
	rec.mu.Unlock()
	// The capture is exactly B's Hello frame and Auth frame.
	r := NewReader(bytes.NewReader(captured))
	for _, want := range []FrameType{FrameHello, FrameAuth} {
		if f, err := r.ReadFrame(); err != nil || f.Type != want {
			t.Fatalf("capture: %v %v, want %v", f.Type, err, want)
		}
	}

	c2a, c2b := pipe(t)
	ch := startHandshake(c2a, ha, testSecret) // ha.Nonce is zero: a fresh one is drawn
	p := newScriptedPeer(t, c2b)
	p.write(captured)
	if res := await(t, ch); !errors.Is(res.err, ErrAuth) {
		t.Fatalf("replayed handshake: %v, want ErrAuth", res.err)
	}
	c2a.Close()
	if got := p.rest(); len(got) != 3 || got[0] != FrameHello || got[1] != FrameAuth || got[2] != FrameClose {
		t.Fatalf("side under test sent %v, want Hello Auth Close", got)
	}
}

// TestHandshakeReflection sends our own Hello back to us. Without the nonce check the
// peer's expected MAC would equal ours, so echoing our Auth would pass.
func TestHandshakeReflection(t *testing.T) {
	ca, cb := pipe(t)
	own, _ := helloPair()
	ch := startHandshake(ca, own, testSecret)
	p := newScriptedPeer(t, cb)
	f, _ := p.next()
	p.write(frameBytes(t, Header{Type: FrameHello}, f.Payload))
	if res := await(t, ch); !errors.Is(res.err, ErrAuth) {
		t.Fatalf("reflected handshake: %v, want ErrAuth", res.err)
	}
	ca.Close()
	if got := p.rest(); len(got) != 1 || got[0] != FrameClose {
		t.Fatalf("side under test sent %v after its Hello, want only Close (no Auth)", got)
	}
}

func TestHandshakeBadPeer(t *testing.T) {
	good := mustMarshal(t, sampleHello())
	v2 := append(bytes.Clone(good), "and a longer v2 layout"...)
	v2[1] = 2
	tests := []struct {
		name      string
		send      []byte
		closeHalf bool // the peer closes after sending
		want      error
		reason    string // Close reason the side under test sends, if any
	}{
		{name: "version 2", send: frameBytes(t, Header{Type: FrameHello}, v2), want: ErrVersion, reason: "unsupported protocol version"},
		{name: "version 0", send: frameBytes(t, Header{Type: FrameHello}, []byte{0, 0}), want: ErrVersion, reason: "unsupported protocol version"},
		{name: "truncated hello", send: frameBytes(t, Header{Type: FrameHello}, good[:50]), want: ErrMalformed, reason: "malformed hello"},
		{name: "empty hello", send: frameBytes(t, Header{Type: FrameHello}, nil), want: ErrMalformed, reason: "malformed hello"},
		{name: "hello with trailing bytes", send: frameBytes(t, Header{Type: FrameHello}, append(bytes.Clone(good), 0)), want: ErrMalformed, reason: "malformed hello"},
		{name: "garbage", send: []byte("GET / HTTP/1.1\r\nHost: mirrord\r\n\r\n"), want: ErrBadMagic},
		{name: "truncated stream", send: frameBytes(t, Header{Type: FrameHello}, good)[:60], closeHalf: true, want: io.ErrUnexpectedEOF},
		{name: "auth first", send: frameBytes(t, Header{Type: FrameAuth}, make([]byte, 32)), want: ErrMalformed},
		// Refused from the header alone: an unauthenticated peer cannot make us
		// allocate a data buffer.
		{name: "data frame first", send: rawHeader(FrameWrite, 0, 0, 0, 0, MaxData), want: ErrMalformed},
		{name: "close", send: frameBytes(t, Header{Type: FrameClose}, []byte("go away")), want: ErrPeerClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ca, cb := pipe(t)
			own, _ := helloPair()
			ch := startHandshake(ca, own, testSecret)
			p := newScriptedPeer(t, cb)
			p.write(tc.send)
			if tc.closeHalf {
				cb.Close()
			}
			res := await(t, ch)
			if !errors.Is(res.err, tc.want) {
				t.Fatalf("Handshake: %v, want %v", res.err, tc.want)
			}
			if cap(res.r.buf) > MaxControl {
				t.Fatalf("an unauthenticated peer made the Reader allocate %d bytes", cap(res.r.buf))
			}
			ca.Close() // ends the scripted peer's reader
			var got []Frame
			for f, ok := p.next(); ok; f, ok = p.next() {
				got = append(got, f)
			}
			if tc.reason != "" {
				if len(got) != 2 || got[1].Type != FrameClose || string(got[1].Payload) != tc.reason {
					t.Fatalf("side under test sent %d frames, want Hello then Close %q", len(got), tc.reason)
				}
			}
			for _, f := range got {
				if f.Type == FrameAuth {
					t.Fatal("side under test sent Auth to a bad peer")
				}
			}
		})
	}
}

func TestHandshakeDeadline(t *testing.T) {
	ca, cb := pipe(t)
	newScriptedPeer(t, cb) // reads our Hello, never answers
	own, _ := helloPair()
	_ = ca.SetDeadline(time.Now().Add(50 * time.Millisecond))
	start := time.Now()
	_, err := Handshake(NewReader(ca), NewWriter(ca), own, testSecret)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Handshake: %v, want a deadline error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Handshake took %v past a 50ms deadline", d)
	}
}

func TestHandshakeRefusesMisuse(t *testing.T) {
	var cw countingWriter
	own, _ := helloPair()
	for _, secret := range [][]byte{nil, {}} {
		if _, err := Handshake(NewReader(bytes.NewReader(nil)), NewWriter(&cw), own, secret); !errors.Is(err, ErrNoSecret) {
			t.Fatalf("secret %q: %v, want ErrNoSecret", secret, err)
		}
	}
	if cw.calls != 0 {
		t.Fatal("Handshake without a secret wrote to the stream")
	}

	w := NewWriter(&cw)
	_ = w.WriteFrame(Header{Type: FramePing}, nil)
	if _, err := Handshake(NewReader(bytes.NewReader(nil)), w, own, testSecret); err == nil {
		t.Fatal("Handshake accepted a Writer holding buffered frames")
	}

	bad := own
	bad.Version = 2
	if _, err := Handshake(NewReader(bytes.NewReader(nil)), NewWriter(&cw), bad, testSecret); !errors.Is(err, ErrVersion) {
		t.Fatalf("own version 2: %v, want ErrVersion", err)
	}
	if cw.calls != 0 {
		t.Fatal("a refused Handshake wrote to the stream")
	}
}

func TestAuthMACIsDirectional(t *testing.T) {
	// The two Auth frames of one handshake differ, so neither side can pass by
	// echoing the other's.
	a, b := [32]byte{1}, [32]byte{2}
	ha, hb := []byte("hello a"), []byte("hello b")
	if bytes.Equal(authMAC(testSecret, nil, b, a, ha, hb), authMAC(testSecret, nil, a, b, hb, ha)) {
		t.Fatal("the two sides' MACs are equal")
	}
}

// TestHandshakeHelloRefused: a peer that finds our Hello malformed (a build
// older than a flag we set) answers our Auth with Close "malformed hello";
// that is ErrHelloRefused (still ErrPeerClosed), so the caller can retry
// without its optional flags. Any other Close at that point is not.
func TestHandshakeHelloRefused(t *testing.T) {
	for _, tc := range []struct {
		reason string
		want   bool
	}{{reasonHello, true}, {reasonAuth, false}} {
		ca, cb := pipe(t)
		own, peer := helloPair()
		own.Flags |= HelloResyncHeld
		ch := startHandshake(ca, own, testSecret)
		p := newScriptedPeer(t, cb)
		if f, ok := p.next(); !ok || f.Type != FrameHello {
			t.Fatal("side under test sent no Hello")
		}
		p.write(frameBytes(t, Header{Type: FrameHello}, mustMarshal(t, peer)))
		p.write(frameBytes(t, Header{Type: FrameClose}, []byte(tc.reason)))
		res := await(t, ch)
		if !errors.Is(res.err, ErrPeerClosed) || errors.Is(res.err, ErrHelloRefused) != tc.want {
			t.Fatalf("Close %q after the Hellos: %v, want ErrHelloRefused %v", tc.reason, res.err, tc.want)
		}
		ca.Close()
	}
}
