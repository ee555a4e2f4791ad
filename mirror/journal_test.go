package mirror

import (
	"bytes"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/mirrord/mirrord/bitmap"
)

func TestJournalRecordRoundTrip(t *testing.T) {
	for _, r := range []jrec{
		{kind: jrecWrite, flags: jflagFUA, seq: 7, time: 123, off: 4096, n: 5, payload: []byte("hello")},
		{kind: jrecZero, flags: jflagUnmap, seq: 8, time: 124, off: 1 << 20, n: 1 << 16},
	} {
		b := r.encode()
		got, err := decodeJrec(b)
		if err != nil {
			t.Fatalf("decode %+v: %v", r, err)
		}
		if got.kind != r.kind || got.flags != r.flags || got.seq != r.seq || got.time != r.time || got.off != r.off || got.n != r.n || !bytes.Equal(got.payload, r.payload) {
			t.Fatalf("round trip: got %+v, want %+v", got, r)
		}
		for i := range b {
			bad := bytes.Clone(b)
			bad[i] ^= 0x40
			if _, err := decodeJrec(bad); !errors.Is(err, ErrJournalCorrupt) {
				t.Fatalf("byte %d flipped: %v, want ErrJournalCorrupt", i, err)
			}
		}
	}
}

func newTestJournal(t *testing.T, path string, capacity int64, fold func(off, n int64)) *journal {
	t.Helper()
	bm, err := bitmap.New(64<<20, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if fold == nil {
		fold = func(off, n int64) { t.Errorf("fold %d+%d from a fresh journal", off, n) }
	}
	j, err := openJournal(path, capacity, bm, fold)
	if err != nil {
		t.Fatal(err)
	}
	j.nosync = true
	return j
}

// TestJournalRingWrapsAndFoldsAfterCrash appends past the ring's end,
// acknowledges part, "crashes" (no close) and checks that reopening folds
// exactly the unacknowledged writes.
func TestJournalRingWrapsAndFoldsAfterCrash(t *testing.T) {
	path := filepath.Join(t.TempDir(), "j")
	j := newTestJournal(t, path, MinJournalSize, nil)
	s := &session{}
	j.attach(s)
	data := bytes.Repeat([]byte{0xab}, 100<<10) // does not divide the ring: pads
	var acked int
	var want [][2]int64
	for i := range 40 {
		off := int64(i) * 128 << 10
		j.mu.Lock()
		err := j.appendLocked(op{kind: opWrite, p: data, off: off, n: int64(len(data))}, time.Now(), 0)
		j.mu.Unlock()
		if errors.Is(err, errJournalFull) {
			// Send and acknowledge the oldest three, then retry.
			for range 3 {
				e, ok := j.next(s)
				if !ok {
					t.Fatal("full journal has nothing to send")
				}
				r, _, err := j.read(e, nil)
				if err != nil || !bytes.Equal(r.payload, data) {
					t.Fatalf("read back record %d: %v", e.seq, err)
				}
				j.markSent(s, e.seq)
				j.ack(s, e.seq)
				acked++
			}
			j.mu.Lock()
			err = j.appendLocked(op{kind: opWrite, p: data, off: off, n: int64(len(data))}, time.Now(), 0)
			j.mu.Unlock()
		}
		if err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
		want = append(want, [2]int64{off, int64(len(data))})
	}
	if j.head <= j.capacity {
		t.Fatalf("test setup: ring never wrapped (head %d, capacity %d)", j.head, j.capacity)
	}
	_ = j.f.Close() // crash: header not rewritten since the last ack
	var got [][2]int64
	j2 := newTestJournal(t, path, MinJournalSize, func(off, n int64) { got = append(got, [2]int64{off, n}) })
	defer j2.close()
	want = want[acked:]
	if len(got) != len(want) {
		t.Fatalf("folded %d records, want the %d unacknowledged", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("folded record %d = %v, want %v", i, got[i], want[i])
		}
	}
	if !j2.empty() || j2.used() != 0 {
		t.Fatal("reopened journal not empty")
	}
}

// encodeUrec is an undo record as stored.
func encodeUrec(seq uint64, off int64, data []byte) []byte {
	r := urec{seq: seq, off: off, n: int64(len(data))}
	b := make([]byte, urecHeaderSize+len(data))
	copy(b[urecHeaderSize:], data)
	r.putHeader(b, b[urecHeaderSize:])
	return b
}

func TestUndoRecordRoundTrip(t *testing.T) {
	data := []byte("old contents")
	b := encodeUrec(3, 8192, data)
	got, d, err := decodeUrec(b, 1<<20)
	if err != nil || got.seq != 3 || got.off != 8192 || !bytes.Equal(d, data) {
		t.Fatalf("decode: %+v %q %v", got, d, err)
	}
	for i := range b {
		bad := bytes.Clone(b)
		bad[i] ^= 1
		if _, _, err := decodeUrec(bad, 1<<20); !errors.Is(err, ErrUndoCorrupt) {
			t.Fatalf("byte %d flipped: %v, want ErrUndoCorrupt", i, err)
		}
	}
	if _, _, err := decodeUrec(b, 8192); !errors.Is(err, ErrUndoCorrupt) {
		t.Fatalf("record past the volume end: %v", err)
	}
	// A hole record: the header alone stands for n zero bytes.
	h := urec{seq: 4, off: 1 << 16, n: 1 << 20, hole: true}
	hb := make([]byte, urecHeaderSize)
	h.putHeader(hb, nil)
	got, d, err = decodeUrec(hb, 4<<20)
	if err != nil || !got.hole || got.n != 1<<20 || got.dataLen() != 0 || len(d) != 0 {
		t.Fatalf("hole record: %+v %d bytes %v", got, len(d), err)
	}
	hb[4] |= 2 // an unknown flag
	if _, _, err := decodeUrec(hb, 4<<20); !errors.Is(err, ErrUndoCorrupt) {
		t.Fatalf("unknown record flag: %v", err)
	}
}

func FuzzJournalRecord(f *testing.F) {
	w := jrec{kind: jrecWrite, seq: 1, time: 2, off: 4096, n: 4, payload: []byte("data")}
	z := jrec{kind: jrecZero, flags: jflagUnmap | jflagFUA, seq: 2, off: 0, n: 1 << 20}
	p := jrec{kind: jrecPad, seq: 3, pad: 100}
	for _, r := range []jrec{w, z} {
		f.Add(r.encode())
	}
	pb := make([]byte, jrecHeaderSize)
	p.putHeader(pb)
	f.Add(pb)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeJrec(b)
		if err != nil {
			if !errors.Is(err, ErrJournalCorrupt) {
				t.Fatalf("error %v does not wrap ErrJournalCorrupt", err)
			}
			return
		}
		var enc []byte
		if r.kind == jrecPad {
			enc = make([]byte, jrecHeaderSize)
			r.putHeader(enc)
		} else {
			enc = r.encode()
		}
		if !bytes.Equal(enc, b[:len(enc)]) {
			t.Fatalf("re-encoding differs:\n%x\n%x", enc, b[:len(enc)])
		}
	})
}

func FuzzJournalHeader(f *testing.F) {
	h := journalHeader{hseq: 3, capacity: 1 << 20, tail: 100, tailSeq: 5, head: 900, headSeq: 9}
	f.Add(h.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeJournalHeader(b)
		if err != nil {
			if !errors.Is(err, ErrJournalCorrupt) {
				t.Fatalf("error %v does not wrap ErrJournalCorrupt", err)
			}
			return
		}
		if h.head < h.tail || h.head-h.tail > h.capacity {
			t.Fatalf("accepted impossible positions %+v", h)
		}
		if !bytes.Equal(h.encode()[:journalHdrLen+4], b[:journalHdrLen+4]) {
			t.Fatal("re-encoding differs")
		}
	})
}

func FuzzUndoRecord(f *testing.F) {
	f.Add(encodeUrec(1, 4096, []byte("pre-image")))
	hole := make([]byte, urecHeaderSize)
	(&urec{seq: 2, off: 0, n: 1 << 20, hole: true}).putHeader(hole, nil)
	f.Add(hole)
	h := undoHeader{gen: Generations{Current: 10, History: [2]uint64{4, 2}}, disk: DiskUpToDate}
	f.Add(h.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := decodeUndoHeader(b); err == nil {
			if !bytes.Equal(h.encode()[:undoHdrLen+4], b[:undoHdrLen+4]) {
				t.Fatal("undo header re-encoding differs")
			}
		} else if !errors.Is(err, ErrUndoCorrupt) {
			t.Fatalf("error %v does not wrap ErrUndoCorrupt", err)
		}
		r, data, err := decodeUrec(b, 1<<30)
		if err != nil {
			if !errors.Is(err, ErrUndoCorrupt) {
				t.Fatalf("error %v does not wrap ErrUndoCorrupt", err)
			}
			return
		}
		enc := encodeUrec(r.seq, r.off, data)
		if r.hole {
			enc = make([]byte, urecHeaderSize)
			r.putHeader(enc, nil)
		}
		if !bytes.Equal(enc, b[:len(enc)]) {
			t.Fatal("undo record re-encoding differs")
		}
	})
}
