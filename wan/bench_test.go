package wan

import (
	"io"
	"testing"
)

// BenchmarkWriteFrame4K encodes and flushes one 4 KiB write per iteration: the
// worst case for a sender, which batches when it can.
func BenchmarkWriteFrame4K(b *testing.B) {
	w := NewWriter(io.Discard)
	payload := fill(4096, 1)
	h := Header{Type: FrameWrite, Flags: FlagSync, Offset: 1 << 20}
	b.SetBytes(HeaderSize + 4096)
	b.ReportAllocs()
	for b.Loop() {
		h.Seq++
		if err := w.WriteFrame(h, payload); err != nil {
			b.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
	}
}

// loopReader replays a whole number of frames forever.
type loopReader struct {
	data []byte
	off  int
}

func (l *loopReader) Read(p []byte) (int, error) {
	n := copy(p, l.data[l.off:])
	l.off = (l.off + n) % len(l.data)
	return n, nil
}

// BenchmarkReadFrame4K decodes 4 KiB writes without detaching: the payload buffer is
// reused, so the steady state allocates nothing.
func BenchmarkReadFrame4K(b *testing.B) {
	frames := make([]Frame, 64)
	for i := range frames {
		frames[i] = Frame{Header{Type: FrameWrite, Seq: uint64(i), Offset: uint64(i) * 4096}, fill(4096, byte(i))}
	}
	r := NewReader(&loopReader{data: encode(b, frames...)})
	b.SetBytes(HeaderSize + 4096)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.ReadFrame(); err != nil {
			b.Fatal(err)
		}
	}
}
