package mirror

import (
	"net"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestCloseWhileConnecting closes both volumes of a fresh pair while their
// link may be anywhere between dialling, the handshake and the first
// frames: Close must return promptly every time (it once waited for a
// session that established after Close had looked for one).
func TestCloseWhileConnecting(t *testing.T) {
	for i := range 30 {
		a, b, _ := newPair(t, pairOpts{mode: ModeSync})
		// Spread the Close over the connection's stages.
		time.Sleep(time.Duration(i%10) * time.Millisecond)
		for _, n := range []*node{a, b} {
			done := make(chan error, 1)
			go func() { done <- n.v.Close() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("round %d: close %s: %v", i, n.opts.Node, err)
				}
			case <-time.After(5 * time.Second):
				buf := make([]byte, 1<<20) // where it hangs
				t.Log(string(buf[:runtime.Stack(buf, true)]))
				t.Fatalf("round %d: Close of %s still blocked after 5 s (link %s)", i, n.opts.Node, n.v.Status().Peer.Connection)
			}
		}
	}
}

// TestCloseDuringSilentHandshake: a peer that accepts the connection and
// never answers must not hold Close for the handshake timeout.
func TestCloseDuringSilentHandshake(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dir := t.TempDir()
	v, err := Open(filepath.Join(dir, "disk.img"), Options{
		Name: "vol0", Node: "a", Size: testSize, MetaPath: filepath.Join(dir, "disk.meta"),
		Peer: &PeerConfig{Node: "b", Secret: []byte("secret"), Address: ln.Addr().String()},
		Log:  zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	select {
	case c = <-accepted:
		defer c.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("volume never dialled the silent peer")
	}
	start := time.Now()
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Close took %v with a handshake in progress (handshake timeout %v)", d, handshakeTimeout)
	}
}
