package mirror

import (
	"bytes"
	"testing"

	"github.com/mirrord/mirrord/wan"
)

// TestHoldModeBounded: the receive loop holds replies while more frames
// are buffered, but never more than maxHeldReplies of them
// (maxHeldStreamReplies for acks of stream frames), nor longer than
// maxReplyHold after the first.
func TestHoldModeBounded(t *testing.T) {
	for _, tc := range []struct {
		stream bool
		limit  int
	}{{false, maxHeldReplies}, {true, maxHeldStreamReplies}} {
		var stream bytes.Buffer
		w := wan.NewWriter(&stream)
		for i := range 40 {
			if err := w.WriteFrame(wan.Header{Type: wan.FramePing, Seq: uint64(i)}, nil); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		s := &session{r: wan.NewReader(&stream)}
		if _, err := s.r.ReadFrame(); err != nil || s.r.Buffered() == 0 {
			t.Fatalf("test setup: %v, %d bytes buffered", err, s.r.Buffered())
		}
		for round := range 2 {
			for i := range tc.limit {
				if m := s.holdMode(tc.stream); m != sendHold {
					t.Fatalf("stream %v, round %d, reply %d: mode %d, want held", tc.stream, round, i, m)
				}
			}
			if m := s.holdMode(tc.stream); m != sendFlush {
				t.Fatalf("stream %v, round %d: reply %d held, want a flush", tc.stream, round, tc.limit+1)
			}
		}
		if s.holdMode(tc.stream) != sendHold {
			t.Fatalf("stream %v: first reply after a flush not held", tc.stream)
		}
		s.heldSince = s.heldSince.Add(-maxReplyHold)
		if s.holdMode(tc.stream) != sendFlush {
			t.Fatalf("stream %v: reply held past %v", tc.stream, maxReplyHold)
		}
	}
}
