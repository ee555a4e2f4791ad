package mirror

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/wan"
)

// TestOptionalHelloFlagsDroppedForOlderPeer: a node holding an interrupted
// resync's undo log says so with an optional Hello flag. A peer of a build
// that refuses optional flags answers "malformed hello"; the node then
// sends its Hellos without them (and so gets a full resync, as before the
// flag), rather than being refused forever.
func TestOptionalHelloFlagsDroppedForOlderPeer(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Name: "vol0", Node: "a", Size: testSize, MetaPath: filepath.Join(dir, "disk.meta"),
		Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)}
	// A target interrupted mid-resync: Inconsistent, its undo log kept.
	v, err := Open(filepath.Join(dir, "disk.img"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.beginUndo(); err != nil {
		t.Fatal(err)
	}
	if err := v.setDisk(DiskInconsistent); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}

	// The older peer: reads a Hello, answers with its own, and refuses
	// ours if it has a bit it does not know (it knows the low byte only).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	flags := make(chan uint16, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r, w := wan.NewReader(c), wan.NewWriter(c)
			f, err := r.ReadFrame()
			var h wan.Hello
			if err == nil && f.Type == wan.FrameHello && h.UnmarshalBinary(f.Payload) == nil {
				flags <- h.Flags
				own := h
				own.Node, own.Flags, own.Nonce = "b", 0, [32]byte{1}
				b, _ := own.MarshalBinary()
				_ = w.WriteFrame(wan.Header{Type: wan.FrameHello}, b)
				if h.Flags&wan.HelloOptional != 0 {
					_ = w.WriteFrame(wan.Header{Type: wan.FrameClose}, []byte("malformed hello"))
				}
				_ = w.Flush()
			}
			_ = c.Close()
		}
	}()

	opts.Peer = &PeerConfig{Node: "b", Secret: []byte("secret"), Mode: ModeAsync, Address: ln.Addr().String(),
		Timeout: 5 * time.Second, PingInterval: 200 * time.Millisecond, ConnectRetry: 20 * time.Millisecond}
	v, err = Open(filepath.Join(dir, "disk.img"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	if !v.resyncHeld() {
		t.Fatalf("reopened: disk %s, undo %d; want the held resync", v.Disk(), v.undoBytes())
	}
	next := func() uint16 {
		select {
		case f := <-flags:
			return f
		case <-time.After(10 * time.Second):
			t.Fatal("no connection attempt")
			return 0
		}
	}
	if f := next(); f&wan.HelloResyncHeld == 0 {
		t.Fatalf("first Hello flags %#04x: want HelloResyncHeld", f)
	}
	for range 2 {
		if f := next(); f&wan.HelloOptional != 0 {
			t.Fatalf("Hello after the refusal carries optional flags %#04x", f)
		}
	}
	if !v.resyncHeld() {
		t.Fatal("the undo log was dropped")
	}
}
