package wan

import (
	"bytes"
	"errors"
	"testing"
)

// FrameBeacon carries the failover agent's opaque message up to MaxBeacon
// bytes; the numbers between ResyncDone and it stay unknown.
func TestBeaconFrame(t *testing.T) {
	msg := bytes.Repeat([]byte{0xb5}, MaxBeacon)
	wire := encode(t, Frame{Header: Header{Type: FrameBeacon}, Payload: msg})
	f, err := NewReader(bytes.NewReader(wire)).ReadFrame()
	if err != nil || f.Type != FrameBeacon || !bytes.Equal(f.Payload, msg) {
		t.Fatalf("beacon round trip: %v %v", f.Header, err)
	}
	if FrameBeacon.String() != "Beacon" || MaxPayload(FrameBeacon) != MaxBeacon {
		t.Fatalf("beacon name %q limit %d", FrameBeacon.String(), MaxPayload(FrameBeacon))
	}
	for typ := FrameStream + 1; typ < FrameBeacon; typ++ {
		if typ.known() || MaxPayload(typ) != -1 {
			t.Errorf("frame type %d is known", typ)
		}
	}
	h := Header{Type: FrameBeacon, Length: MaxBeacon + 1}
	if _, err := h.MarshalBinary(); !errors.Is(err, ErrFrameTooBig) {
		t.Fatalf("oversized beacon: %v", err)
	}
}
