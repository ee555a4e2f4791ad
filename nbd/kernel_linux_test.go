package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestServeNegotiatedKernelConn plays the kernel's part on a socketpair:
// no handshake, a WRITE with FUA, a FLUSH and a READ, then Shutdown, which
// must end the blocked read of a blockingConn and answer what was read.
func TestServeNegotiatedKernelConn(t *testing.T) {
	d := newMemDevice(t, 1<<20)
	srv := newTestServer(t, Export{Name: "k", Device: d})
	pairs, err := newSocketPairs(1)
	if err != nil {
		t.Fatal(err)
	}
	defer pairs.close()
	if err := pairs.serve(srv, srv.export("k")); err != nil {
		t.Fatal(err)
	}
	kernel := os.NewFile(uintptr(pairs.kernel[0]), "kernel")
	pairs.kernel = nil
	defer kernel.Close()
	if pairs.accepted() != 1 {
		t.Fatal("our end sees the kernel end hung up")
	}

	req := func(flags, typ uint16, handle, off uint64, length uint32, payload []byte) {
		var h [requestHeaderSize]byte
		binary.BigEndian.PutUint32(h[0:], magicRequest)
		binary.BigEndian.PutUint16(h[4:], flags)
		binary.BigEndian.PutUint16(h[6:], typ)
		binary.BigEndian.PutUint64(h[8:], handle)
		binary.BigEndian.PutUint64(h[16:], off)
		binary.BigEndian.PutUint32(h[24:], length)
		if _, err := kernel.Write(append(h[:], payload...)); err != nil {
			t.Fatal(err)
		}
	}
	reply := func(handle uint64, data int) []byte {
		t.Helper()
		b := make([]byte, replyHeaderSize+data)
		_ = kernel.SetReadDeadline(time.Now().Add(ioTimeout))
		if _, err := io.ReadFull(kernel, b); err != nil {
			t.Fatal(err)
		}
		if m, e, h := binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:]), binary.BigEndian.Uint64(b[8:]); m != magicReply || e != 0 || h != handle {
			t.Fatalf("reply magic %#x error %d handle %d, want handle %d", m, e, h, handle)
		}
		return b[replyHeaderSize:]
	}
	data := bytes.Repeat([]byte("kern"), 1024)
	req(CmdFlagFUA, CmdWrite, 1, 8192, uint32(len(data)), data)
	reply(1, 0)
	req(0, CmdFlush, 2, 0, 0, nil)
	reply(2, 0)
	req(0, CmdRead, 3, 8192, uint32(len(data)), nil)
	if got := reply(3, len(data)); !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	if st := srv.Stats(); st.FUAWrites != 1 || st.Flushes != 1 {
		t.Fatalf("stats %+v, want one FUA write and one flush", st)
	}

	// The connection's reader is blocked in read(2) now; Shutdown must end it.
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	_ = kernel.SetReadDeadline(time.Now().Add(ioTimeout))
	if n, err := kernel.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("kernel end after shutdown: %d, %v; want EOF", n, err)
	}
}

// TestSocketPairsAccepted: a socket the kernel did not take (its end
// closed) is seen hung up.
func TestSocketPairsAccepted(t *testing.T) {
	pairs, err := newSocketPairs(3)
	if err != nil {
		t.Fatal(err)
	}
	defer pairs.close()
	_ = unix.Close(pairs.kernel[1])
	pairs.kernel = append(pairs.kernel[:1], pairs.kernel[2:]...)
	if n := pairs.accepted(); n != 2 {
		t.Fatalf("accepted %d, want 2", n)
	}
}
