package wan

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// writeKeys writes a pair's key material for the named nodes into a temp dir and
// returns the files of each node.
func writeKeys(t *testing.T, nodes ...string) map[string]TLSFiles {
	t.Helper()
	pk, err := GenerateKeys(nodes, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca := write("ca.crt", pk.CACert)
	files := make(map[string]TLSFiles)
	for _, n := range nodes {
		files[n] = TLSFiles{CA: ca, Cert: write(n+".crt", pk.Nodes[n].Cert), Key: write(n+".key", pk.Nodes[n].Key)}
	}
	return files
}

// tcpPipe returns the two ends of a loopback TCP connection: unlike net.Pipe, a
// write (a TLS alert) does not wait for the other side to read.
func tcpPipe(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []net.Conn{a, b} {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

type tlsResult struct {
	conn    *tls.Conn
	binding []byte
	err     error
}

// tlsPair runs the client (dialer, "alpha" expecting peer "beta") and the server
// over a pipe with the given configurations.
func tlsPair(t *testing.T, client, server *tls.Config) (c, s tlsResult) {
	t.Helper()
	a, b := tcpPipe(t)
	run := func(conn *tls.Conn, ch chan<- tlsResult) {
		err := conn.Handshake()
		var bind []byte
		if err == nil {
			bind, err = TLSBinding(conn)
		} else {
			_ = conn.Close() // as the engine does: the other side then sees the end
		}
		ch <- tlsResult{conn, bind, err}
	}
	cc, sc := make(chan tlsResult, 1), make(chan tlsResult, 1)
	go run(tls.Client(a, client), cc)
	go run(tls.Server(b, server), sc)
	return <-cc, <-sc
}

func mustLoad(t *testing.T, f TLSFiles, peer string) *tls.Config {
	t.Helper()
	c, err := LoadTLS(f, peer)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestTLSMutual: a pair's certificates connect, both ends derive the same binding,
// and the bound handshake then succeeds inside TLS.
func TestTLSMutual(t *testing.T) {
	k := writeKeys(t, "alpha", "beta")
	c, s := tlsPair(t, mustLoad(t, k["alpha"], "beta"), mustLoad(t, k["beta"], "alpha"))
	if c.err != nil || s.err != nil {
		t.Fatalf("tls: client %v, server %v", c.err, s.err)
	}
	if v := c.conn.ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("TLS version %#x, want 1.3", v)
	}
	if string(c.binding) != string(s.binding) || len(c.binding) != 32 {
		t.Fatalf("bindings differ or are empty: %x vs %x", c.binding, s.binding)
	}
	ha, hb := helloPair()
	type res struct {
		err error
	}
	ch := make(chan res, 2)
	for _, side := range []struct {
		conn *tls.Conn
		h    Hello
		bind []byte
	}{{c.conn, ha, c.binding}, {s.conn, hb, s.binding}} {
		go func() {
			_, err := HandshakeBound(NewReader(side.conn), NewWriter(side.conn), side.h, testSecret, side.bind)
			ch <- res{err}
		}()
	}
	for range 2 {
		if r := <-ch; r.err != nil {
			t.Fatalf("bound handshake: %v", r.err)
		}
	}
}

// TestHandshakeBindingMismatch: MACs computed for another channel fail.
func TestHandshakeBindingMismatch(t *testing.T) {
	a, b := pipe(t)
	ha, hb := helloPair()
	ch := make(chan error, 2)
	for _, side := range []struct {
		conn net.Conn
		h    Hello
		bind string
	}{{a, ha, "channel one"}, {b, hb, "channel two"}} {
		go func() {
			_ = side.conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, err := HandshakeBound(NewReader(side.conn), NewWriter(side.conn), side.h, testSecret, []byte(side.bind))
			ch <- err
		}()
	}
	for range 2 {
		if err := <-ch; !errors.Is(err, ErrAuth) && !errors.Is(err, ErrPeerClosed) {
			t.Fatalf("mismatched bindings: %v, want ErrAuth or the peer's close", err)
		}
	}
}

// TestTLSRefusals: a certificate from another pair's CA, and a certificate of the
// right CA naming another node, are refused.
func TestTLSRefusals(t *testing.T) {
	k := writeKeys(t, "alpha", "beta", "gamma")
	foreign := writeKeys(t, "alpha", "beta")
	t.Run("foreign CA", func(t *testing.T) {
		c, s := tlsPair(t, mustLoad(t, foreign["alpha"], "beta"), mustLoad(t, k["beta"], "alpha"))
		if c.err == nil || s.err == nil {
			t.Fatalf("foreign certificate accepted: client %v, server %v", c.err, s.err)
		}
		// TLS 1.3: the dialer verifies the listener first, and refuses.
		if _, ok := errors.AsType[*tls.CertificateVerificationError](c.err); !ok {
			t.Fatalf("client: %v, want a certificate verification error", c.err)
		}
	})
	t.Run("wrong node", func(t *testing.T) {
		_, s := tlsPair(t, mustLoad(t, k["gamma"], "beta"), mustLoad(t, k["beta"], "alpha"))
		// The dialer's side of a TLS 1.3 handshake ends before the listener
		// has checked its certificate: the refusal is the listener's.
		if !errors.Is(s.err, ErrPeerCert) {
			t.Fatalf("gamma posing as alpha: server %v, want ErrPeerCert", s.err)
		}
	})
	t.Run("server names another node", func(t *testing.T) {
		c, _ := tlsPair(t, mustLoad(t, k["alpha"], "beta"), mustLoad(t, k["gamma"], "alpha"))
		if c.err == nil {
			t.Fatal("client accepted gamma's certificate for beta")
		}
	})
}

// TestPlaintextAgainstTLS: each side names the mismatch.
func TestPlaintextAgainstTLS(t *testing.T) {
	k := writeKeys(t, "alpha", "beta")
	a, b := pipe(t)
	_ = a.SetDeadline(time.Now().Add(10 * time.Second))
	_ = b.SetDeadline(time.Now().Add(10 * time.Second))
	tlsErr := make(chan error, 1)
	go func() {
		c := tls.Client(a, mustLoad(t, k["alpha"], "beta"))
		err := c.Handshake()
		_ = c.Close()
		tlsErr <- TLSError(err)
	}()
	_, hb := helloPair()
	_, plainErr := Handshake(NewReader(b), NewWriter(b), hb, testSecret)
	_ = b.Close()
	if !errors.Is(plainErr, ErrTLSMismatch) {
		t.Fatalf("plaintext side: %v, want ErrTLSMismatch", plainErr)
	}
	if err := <-tlsErr; err == nil {
		t.Fatal("TLS side: handshake with a plaintext peer succeeded")
	}

	// And the other way: the TLS side reads a plaintext Hello.
	a, b = pipe(t)
	_ = a.SetDeadline(time.Now().Add(10 * time.Second))
	_ = b.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		ha, _ := helloPair()
		_, _ = Handshake(NewReader(a), NewWriter(a), ha, testSecret)
		_ = a.Close()
	}()
	s := tls.Server(b, mustLoad(t, k["beta"], "alpha"))
	if err := TLSError(s.Handshake()); !errors.Is(err, ErrTLSMismatch) {
		t.Fatalf("TLS side: %v, want ErrTLSMismatch", err)
	}
}

func TestGenerateKeysRejectsNames(t *testing.T) {
	for _, nodes := range [][]string{{"a", "a"}, {"a", ""}} {
		if _, err := GenerateKeys(nodes, time.Now()); err == nil {
			t.Fatalf("GenerateKeys(%q) succeeded", nodes)
		}
	}
}
