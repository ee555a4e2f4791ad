package mirror

import (
	"bytes"
	"testing"

	"github.com/mirrord/mirrord/wan"
)

// TestHoldModeBounded: the receive loop holds replies while more frames
// are buffered, but never more than maxHeldReplies of them, nor longer
// than maxReplyHold after the first.
func TestHoldModeBounded(t *testing.T) {
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
		for i := range maxHeldReplies {
			if m := s.holdMode(); m != sendHold {
				t.Fatalf("round %d, reply %d: mode %d, want held", round, i, m)
			}
		}
		if m := s.holdMode(); m != sendFlush {
			t.Fatalf("round %d: reply %d held, want a flush", round, maxHeldReplies+1)
		}
	}
	if s.holdMode() != sendHold {
		t.Fatal("first reply after a flush not held")
	}
	s.heldSince = s.heldSince.Add(-maxReplyHold)
	if s.holdMode() != sendFlush {
		t.Fatalf("reply held past %v", maxReplyHold)
	}
}
