package witness

import (
	"bytes"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

var goldenRequest = Request{Op: OpVote, Nonce: [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, Time: time.Unix(1700000000, 5), Epoch: 7, TTL: 2 * time.Second, Volume: "vol0", Node: "a", Peer: "b", PeerOutdated: true}

var goldenReply = Reply{Status: StatusOK, Granted: true, PeerOutdated: true, Nonce: goldenRequest.Nonce, Epoch: 8, Time: time.Unix(1700000001, 0), Holder: "a"}

// The byte layout is the protocol: a change must be deliberate.
func TestGolden(t *testing.T) {
	req, err := AppendRequest(nil, &goldenRequest, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	rep := AppendReply(nil, &goldenReply, testSecret)
	for _, g := range []struct {
		file string
		b    []byte
	}{{"request.hex", req}, {"reply.hex", rep}} {
		path := filepath.Join("testdata", g.file)
		if os.Getenv("UPDATE_GOLDEN") != "" {
			os.WriteFile(path, []byte(hex.EncodeToString(g.b)+"\n"), 0o644)
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(g.b) + "\n"; got != string(want) {
			t.Errorf("%s:\n got %s\nwant %s", g.file, got, want)
		}
	}
	r, err := DecodeRequest(req, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Time.Equal(goldenRequest.Time) {
		t.Fatalf("time %v", r.Time)
	}
	r.Time = goldenRequest.Time
	if *r != goldenRequest {
		t.Fatalf("request round trip: %+v", r)
	}
	p, err := DecodeReply(rep, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	p.Time = goldenReply.Time
	if *p != goldenReply {
		t.Fatalf("reply round trip: %+v", p)
	}
}

func TestDecodeErrors(t *testing.T) {
	req, _ := AppendRequest(nil, &goldenRequest, testSecret)
	rep := AppendReply(nil, &goldenReply, testSecret)
	for _, tc := range []struct {
		name string
		p    []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"reply as request", rep, ErrMagic},
		{"other secret", req[:], ErrAuth},
	} {
		secret := testSecret
		if tc.name == "other secret" {
			secret = []byte("another secret, 16+")
		}
		if _, err := DecodeRequest(tc.p, secret); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := DecodeReply(req, testSecret); !errors.Is(err, ErrMagic) {
		t.Errorf("request as reply: %v", err)
	}
	// An authenticated frame with a length byte pointing past the end,
	// and one with bytes to spare.
	body := append([]byte(nil), req[:len(req)-macSize]...)
	body[len(body)-2] = 200 // peer name length
	if _, err := DecodeRequest(appendMAC(body, body, testSecret), testSecret); !errors.Is(err, ErrShort) {
		t.Errorf("overlong name: %v", err)
	}
	body = append(append([]byte(nil), req[:len(req)-macSize]...), 0)
	if _, err := DecodeRequest(appendMAC(body, body, testSecret), testSecret); !errors.Is(err, ErrTrailing) {
		t.Errorf("trailing: %v", err)
	}
	body = append([]byte(nil), req[:len(req)-macSize]...)
	body[5] |= 0x80 // an undefined flag
	if _, err := DecodeRequest(appendMAC(body, body, testSecret), testSecret); !errors.Is(err, ErrFlags) {
		t.Errorf("undefined flag: %v", err)
	}
	if _, err := AppendRequest(nil, &Request{Volume: string(bytes.Repeat([]byte{'x'}, MaxName+1))}, testSecret); err == nil {
		t.Error("a name over MaxName encoded")
	}
}

// FuzzDecodeRequest feeds the decoder arbitrary datagrams, authenticated
// (so the fuzzer reaches the field parsing) and not: it must never panic,
// and what decodes must re-encode to the same bytes.
func FuzzDecodeRequest(f *testing.F) {
	req, _ := AppendRequest(nil, &goldenRequest, testSecret)
	f.Add(req[:len(req)-macSize], true)
	f.Add(req, false)
	f.Add([]byte("MWQ1"), true)
	f.Fuzz(func(t *testing.T, p []byte, sign bool) {
		if sign {
			p = appendMAC(append([]byte(nil), p...), p, testSecret)
		}
		r, err := DecodeRequest(p, testSecret)
		if err != nil {
			return
		}
		b, err := AppendRequest(nil, r, testSecret)
		if err != nil {
			t.Fatalf("decoded %+v does not encode: %v", r, err)
		}
		if !bytes.Equal(b, p) {
			t.Fatalf("round trip differs:\n%x\n%x", p, b)
		}
	})
}

// FuzzDecodeReply is FuzzDecodeRequest for replies.
func FuzzDecodeReply(f *testing.F) {
	rep := AppendReply(nil, &goldenReply, testSecret)
	f.Add(rep[:len(rep)-macSize], true)
	f.Add(rep, false)
	f.Fuzz(func(t *testing.T, p []byte, sign bool) {
		if sign {
			p = appendMAC(append([]byte(nil), p...), p, testSecret)
		}
		r, err := DecodeReply(p, testSecret)
		if err != nil {
			return
		}
		if b := AppendReply(nil, r, testSecret); !bytes.Equal(b, p) {
			t.Fatalf("round trip differs:\n%x\n%x", p, b)
		}
	})
}
