package mirror

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// writeResync lands the same bytes whichever way it writes: direct from an
// aligned buffer, direct through the bounce buffer, buffered for a range
// off the alignment; and reads (page cache) see them at once.
func TestWriteResyncPaths(t *testing.T) {
	v, err := Open(filepath.Join(t.TempDir(), "disk.img"), Options{Size: testSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	rng := rand.New(rand.NewPCG(9, 9))
	fill := func(p []byte) []byte {
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		return p
	}
	// Cached pages first, so a direct write must replace what reads see.
	if err := v.WriteAt(fill(make([]byte, 1<<20)), 0, false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		p    []byte
		off  int64
	}{
		{"aligned", fill(alignedBuffer(256 << 10)), 0},
		{"unaligned buffer", fill(make([]byte, 64<<10+1))[1:], 512 << 10},
		{"unaligned offset", fill(make([]byte, 8192)), 4096*3 + 512},
		{"odd length", fill(make([]byte, 4096+100)), 2 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := v.writeResync(tc.p, tc.off); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(tc.p))
			if err := v.ReadAt(got, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.p) {
				t.Fatal("read back differs")
			}
		})
	}
	v.direct.mu.Lock()
	fd := v.direct.fd
	v.direct.mu.Unlock()
	t.Logf("direct descriptor %d (-1: this filesystem refuses O_DIRECT)", fd)
}

// A resync frame's save also saves what the source is still to send
// (data and holes) under the same sync, and a rollback restores all of it.
func TestUndoSaveAhead(t *testing.T) {
	dir := t.TempDir()
	v, err := Open(filepath.Join(dir, "disk.img"), Options{Size: testSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.Close() })
	old := bytes.Repeat([]byte{0xaa}, 1<<20)
	// [0, 1 MiB) and [4 MiB, 5 MiB) hold data; [8 MiB, 9 MiB) is a hole.
	for _, off := range []int64{0, 4 << 20} {
		if err := v.pwrite(old, off, false); err != nil {
			t.Fatal(err)
		}
	}
	u, err := createUndo(filepath.Join(dir, "undo"), undoHeader{}, v.size, v.dirty.RegionSize())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = u.close() })
	ahead := v.dirty.Clone()
	ahead.Set(0, 1<<20)
	ahead.Set(4<<20, 1<<20)
	ahead.Set(8<<20, 1<<20)
	if err := u.save(v, 0, 1<<20, ahead); err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 4 << 20, 8 << 20} {
		if !u.saved.Test(off, 1<<20) {
			t.Fatalf("region at %d not saved ahead", off)
		}
	}
	recs, _ := u.records()
	if len(recs) != 3 || !recs[2].hole || recs[1].hole {
		t.Fatalf("records %+v: want data, data, hole", recs)
	}
	// The resync overwrites all three; the rollback brings back each.
	newer := bytes.Repeat([]byte{0x55}, 1<<20)
	for _, off := range []int64{0, 4 << 20, 8 << 20} {
		if err := v.writeResync(newer, off); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := u.rollback(v); err != nil {
		t.Fatal(err)
	}
	for off, want := range map[int64][]byte{0: old, 4 << 20: old, 8 << 20: make([]byte, 1<<20)} {
		got := make([]byte, 1<<20)
		if err := v.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("region at %d not rolled back", off)
		}
	}
}
