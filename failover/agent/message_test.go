package agent

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mirrord/mirrord/failover"
)

var testKey = Key([]byte("pair secret"))

func sampleMessage() Message {
	return Message{Kind: KindBeacon, Volume: "vol0", Boot: 0x0102030405060708, Seq: 9,
		Beacon: failover.Beacon{Node: "a", Role: failover.RolePrimary, Disk: failover.DiskUpToDate, Epoch: 3,
			InSync: true, Hears: true, LagBytes: 4096, LagTime: 1500 * time.Millisecond}}
}

func TestMessageRoundTripAndGolden(t *testing.T) {
	m := sampleMessage()
	b, err := Encode(nil, m, testKey)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b, testKey)
	if err != nil || got != m {
		t.Fatalf("round trip: %+v %v, want %+v", got, err, m)
	}
	golden := filepath.Join("testdata", "beacon.hex")
	if os.Getenv("UPDATE_GOLDEN") == "1" {
		if err := os.WriteFile(golden, []byte(hex.EncodeToString(b)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(b) != strings.TrimSpace(string(want)) {
		t.Fatalf("encoding changed:\n got %x\nwant %s", b, want)
	}
}

func TestMessageRejects(t *testing.T) {
	b, _ := Encode(nil, sampleMessage(), testKey)
	if _, err := Decode(b, Key([]byte("other secret"))); !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong key: %v, want ErrAuth", err)
	}
	for i := range b {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		if _, err := Decode(c, testKey); err == nil {
			t.Fatalf("byte %d flipped: accepted", i)
		}
	}
	for _, n := range []int{0, 10, msgFixed + macSize - 1, len(b) - 1} {
		if _, err := Decode(b[:n], testKey); !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrAuth) {
			t.Fatalf("truncated to %d: %v", n, err)
		}
	}
	long := sampleMessage()
	long.Node = strings.Repeat("n", maxName+1)
	if _, err := Encode(nil, long, testKey); !errors.Is(err, ErrMalformed) {
		t.Fatalf("long node name: %v", err)
	}
}

func TestReplayFilter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	f := replayFilter{window: time.Second}
	steps := []struct {
		boot, seq uint64
		at        time.Duration
		ok        bool
	}{
		{1, 5, 0, true},
		{1, 5, 10 * time.Millisecond, false}, // the same message again
		{1, 4, 20 * time.Millisecond, false}, // older
		{1, 6, 30 * time.Millisecond, true},
		{2, 1, 500 * time.Millisecond, false}, // a new boot while boot 1 still speaks
		{2, 1, 1100 * time.Millisecond, true}, // boot 1 silent for the window: a restart
		{1, 7, 1200 * time.Millisecond, false},
	}
	for i, s := range steps {
		err := f.accept(s.boot, s.seq, t0.Add(s.at))
		if (err == nil) != s.ok {
			t.Fatalf("step %d (boot %d seq %d): %v, want ok=%v", i, s.boot, s.seq, err, s.ok)
		}
		if err != nil && !errors.Is(err, ErrReplay) {
			t.Fatalf("step %d: %v, want ErrReplay", i, err)
		}
	}
}

func FuzzMessageWire(f *testing.F) {
	b, _ := Encode(nil, sampleMessage(), testKey)
	f.Add(b)
	p := sampleMessage()
	p.Kind, p.Node, p.Volume = KindPeerPromote, strings.Repeat("x", maxName), "v"
	b2, _ := Encode(nil, p, testKey)
	f.Add(b2)
	f.Add([]byte("MRDB"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b, testKey)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to the same bytes.
		again, err := Encode(nil, m, testKey)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("decoded %+v re-encodes to %x (%v), input %x", m, again, err, b)
		}
	})
}

// FuzzMessageBody fuzzes the structure checks behind the MAC: the
// fuzzer cannot forge a MAC, so this target signs its input first.
func FuzzMessageBody(f *testing.F) {
	b, _ := Encode(nil, sampleMessage(), testKey)
	f.Add(b[:len(b)-macSize])
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) > MaxMessage {
			return
		}
		signed := appendMAC(body)
		m, err := Decode(signed, testKey)
		if err != nil {
			return
		}
		again, err := Encode(nil, m, testKey)
		if err != nil || !bytes.Equal(again, signed) {
			t.Fatalf("decoded %+v re-encodes to %x (%v), input %x", m, again, err, signed)
		}
	})
}

func appendMAC(body []byte) []byte {
	m := hmac.New(sha256.New, testKey)
	m.Write(body)
	return m.Sum(bytes.Clone(body))
}
