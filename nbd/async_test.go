package nbd

import (
	"bytes"
	"sync"
	"testing"
)

// asyncDevice completes writes later, on a goroutine of its own, like a
// replicated device waiting for its peer: a write started with more is
// held until Unplug, as the contract allows.
type asyncDevice struct {
	*memDevice
	mu                    sync.Mutex
	held                  []pendingAsync
	started, more, unplug int
	batches               []int // writes per completed batch
}

type pendingAsync struct {
	p   []byte
	off int64
	w   WriteDone
}

func (d *asyncDevice) WriteAsync(p []byte, off int64, more bool, w WriteDone) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.started++
	if more {
		d.more++
	}
	d.held = append(d.held, pendingAsync{p, off, w})
	if !more {
		d.releaseLocked()
	}
}

func (d *asyncDevice) Unplug() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.unplug++
	d.releaseLocked()
}

func (d *asyncDevice) releaseLocked() {
	if len(d.held) == 0 {
		return
	}
	batch := d.held
	d.held = nil
	d.batches = append(d.batches, len(batch))
	go func() {
		for _, h := range batch {
			h.w.Done(d.WriteAt(h.p, h.off, false))
		}
		batch[len(batch)-1].w.SendHeld()
	}()
}

// writeBurst encodes n writes of size bytes, cookie i+1 writing
// pattern(i) at i*size, to be sent in one go.
func writeBurst(n, size int) []byte {
	var reqs []byte
	for i := range n {
		reqs = append(reqs, encRequest(0, wireCmdWrite, uint64(i+1), uint64(i*size), uint32(size))...)
		reqs = append(reqs, pattern(byte(i), size)...)
	}
	return reqs
}

func TestAsyncWriterBurstsAndDisconnect(t *testing.T) {
	d := &asyncDevice{memDevice: newMemDevice(t, txSize)}
	ts := startServer(t, nil, Export{Name: "d", Device: d})
	c := ts.dialGo(t, "")
	// 64 writes and a DISC in one go: the server reads them as one burst,
	// the last writes held until it unplugs on the way out, and every
	// write is answered before the connection closes.
	const n, size = 64, 4096
	c.write(writeBurst(n, size), encRequest(0, wireCmdDisc, 0, 0, 0))
	seen := make(map[uint64]bool)
	for range n {
		errno, cookie := c.simpleReply()
		if errno != 0 || cookie < 1 || cookie > n || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d (seen before: %v)", errno, cookie, seen[cookie])
		}
		seen[cookie] = true
	}
	c.expectClosed()
	for i := range n {
		if !bytes.Equal(d.contents(int64(i*size), size), pattern(byte(i), size)) {
			t.Fatalf("write %d not on the device", i)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.started != n || d.more == 0 || len(d.batches) >= n {
		t.Fatalf("started %d writes (%d with more) in %d batches; want %d, some held, batched", d.started, d.more, len(d.batches), n)
	}
	if st := ts.Stats(); st.Writes != n {
		t.Fatalf("stats: %d writes, want %d", st.Writes, n)
	}
}

// FUA writes keep the plain path: the device's WriteAt with fua.
func TestAsyncWriterFUAUsesWriteAt(t *testing.T) {
	d := &asyncDevice{memDevice: newMemDevice(t, txSize)}
	ts := startServer(t, nil, Export{Name: "d", Device: d})
	c := ts.dialGo(t, "")
	p := pattern(7, 8192)
	c.mustDo(wireCmdWrite, wireFlagFUA, 4096, uint32(len(p)), p)
	if !bytes.Equal(d.stableContents(4096, 8192), p) {
		t.Fatal("FUA write not stable")
	}
	c.writeAt(0, pattern(8, 4096))
	if got := c.readAt(0, 4096); !bytes.Equal(got, pattern(8, 4096)) {
		t.Fatal("read back differs")
	}
	c.disconnect()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.started != 1 {
		t.Fatalf("WriteAsync calls = %d, want 1 (the FUA write goes to WriteAt)", d.started)
	}
}

// plugDevice is a LocalOnly device that records PlugBurst/UnplugBurst.
type plugDevice struct {
	localDevice
	mu                  sync.Mutex
	plugs, unplugs, max int
	depth               int
	writesPlugged       int
}

func (d *plugDevice) PlugBurst() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.plugs++
	d.depth++
	d.max = max(d.max, d.depth)
}

func (d *plugDevice) UnplugBurst() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.unplugs++
	d.depth--
}

func (d *plugDevice) WriteAt(p []byte, off int64, fua bool) error {
	d.mu.Lock()
	if d.depth > 0 {
		d.writesPlugged++
	}
	d.mu.Unlock()
	return d.localDevice.WriteAt(p, off, fua)
}

func TestPluggerPairedAroundBursts(t *testing.T) {
	d := &plugDevice{localDevice: localDevice{newMemDevice(t, txSize)}}
	ts := startServer(t, nil, Export{Name: "d", Device: d})
	c := ts.dialGo(t, "")
	const n, size = 32, 4096
	c.write(writeBurst(n, size))
	for range n {
		if errno, _ := c.simpleReply(); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
	}
	// The burst is served: the reader waits for the client, unplugged.
	waitFor(t, "unplug", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.depth == 0
	})
	c.writeAt(0, pattern(9, 4096)) // a lone write: no plug
	c.disconnect()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.plugs == 0 || d.plugs != d.unplugs || d.max != 1 || d.writesPlugged == 0 {
		t.Fatalf("plugs %d unplugs %d max depth %d writes plugged %d", d.plugs, d.unplugs, d.max, d.writesPlugged)
	}
	if d.writesPlugged > n {
		t.Fatalf("%d writes plugged, only %d were in the burst", d.writesPlugged, n)
	}
}
