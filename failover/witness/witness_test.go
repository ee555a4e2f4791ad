package witness

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/votertest"
)

var testSecret = []byte("0123456789abcdef-test-secret")

// fakeClock is the witness's lease clock, advanced by the test.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// running is a witness served on loopback for a test.
type running struct {
	srv  *Server
	done chan error
}

func startServer(t *testing.T, cfg Config) *running {
	t.Helper()
	srv, err := NewServer(cfg, zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	r := &running{srv: srv, done: make(chan error, 1)}
	go func() { r.done <- srv.Serve(context.Background()) }()
	t.Cleanup(r.stop)
	return r
}

func (r *running) stop() {
	r.srv.Close()
	<-r.done
	r.done <- nil // later stops return at once
}

func newClient(t *testing.T, addr string, ttl time.Duration) *Client {
	t.Helper()
	c, err := NewClient(ClientConfig{Addr: addr, Secret: testSecret, LeaseTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// backend is a witness on loopback and a client for the suite. With a
// clock, lease time is the test's to advance; without, it is real.
func backend(t *testing.T, ttl time.Duration, clock *fakeClock) *votertest.Backend {
	cfg := Config{Listen: "127.0.0.1:0", Secret: testSecret, StateDir: t.TempDir()}
	b := &votertest.Backend{TTL: ttl}
	if clock != nil {
		cfg.Clock, b.Advance = clock.Now, clock.Advance
	}
	srv := startServer(t, cfg)
	cfg.Listen = srv.srv.Addr().String()
	b.Voter = newClient(t, cfg.Listen, ttl)
	b.Restart = func(t *testing.T) failover.Voter {
		b.Voter.Close()
		srv.stop()
		srv = startServer(t, cfg)
		return newClient(t, cfg.Listen, ttl)
	}
	return b
}

func TestConformance(t *testing.T) {
	votertest.Run(t, func(t *testing.T) *votertest.Backend {
		return backend(t, 2*time.Second, &fakeClock{t: time.Unix(1000, 0)})
	})
}

// In real time too: the lease runs on the witness's monotonic clock.
func TestConformanceRealTime(t *testing.T) {
	votertest.Run(t, func(t *testing.T) *votertest.Backend {
		return backend(t, 300*time.Millisecond, nil)
	})
}

func request(t *testing.T, r *Request, secret []byte) []byte {
	t.Helper()
	b, err := AppendRequest(nil, r, secret)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newTestServer(t *testing.T, clock func() time.Time) *Server {
	t.Helper()
	srv, err := NewServer(Config{Listen: "127.0.0.1:0", Secret: testSecret, StateDir: t.TempDir(), Clock: clock}, zerolog.New(zerolog.NewTestWriter(t)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

func decodeReply(t *testing.T, b []byte) *Reply {
	t.Helper()
	if b == nil {
		t.Fatal("no reply")
	}
	r, err := DecodeReply(b, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A captured request replayed inside the window gets the reply already
// sent, not a second execution: a replayed Release does not pass the vote
// on again. Outside the window it is refused.
func TestReplay(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1000, 0)}
	srv := newTestServer(t, clock.Now)
	grant := &Request{Op: OpVote, Time: time.Now(), Nonce: [16]byte{1}, Volume: "v", Node: "a", Peer: "b", TTL: time.Second}
	if r := decodeReply(t, srv.Handle(request(t, grant, testSecret))); !r.Granted || r.Epoch != 1 { // the first grant on an empty ledger
		t.Fatalf("grant: %+v", r)
	}
	rel := &Request{Op: OpRelease, Time: time.Now(), Nonce: [16]byte{2}, Volume: "v", Node: "a", Peer: "b", TTL: time.Second}
	first := srv.Handle(request(t, rel, testSecret))
	if r := decodeReply(t, first); r.Status != StatusOK || r.Epoch != 2 {
		t.Fatalf("release: %+v", r)
	}
	again := srv.Handle(request(t, rel, testSecret))
	if string(again) != string(first) {
		t.Fatal("a repeated nonce got a different reply")
	}
	if e := srv.ledger.vols["v"].epoch; e != 2 {
		t.Fatalf("epoch %d after a replayed release, want 2", e)
	}
	old := &Request{Op: OpVote, Time: time.Now().Add(-DefaultMaxSkew - time.Second), Nonce: [16]byte{3}, Volume: "v", Node: "a", Peer: "b"}
	if r := decodeReply(t, srv.Handle(request(t, old, testSecret))); r.Status != StatusClockSkew || r.Granted {
		t.Fatalf("stale request: %+v", r)
	}
	future := &Request{Op: OpVote, Time: time.Now().Add(DefaultMaxSkew + time.Second), Nonce: [16]byte{4}, Volume: "v", Node: "a", Peer: "b"}
	if r := decodeReply(t, srv.Handle(request(t, future, testSecret))); r.Status != StatusClockSkew {
		t.Fatalf("future request: %+v", r)
	}
}

// Wrong secret, tampering, truncation: no answer at all, no state change.
func TestUnauthenticatedDropped(t *testing.T) {
	srv := newTestServer(t, time.Now)
	r := &Request{Op: OpVote, Time: time.Now(), Volume: "v", Node: "a", Peer: "b"}
	if srv.Handle(request(t, r, []byte("another-secret-of-16+"))) != nil {
		t.Fatal("answered a request under another secret")
	}
	good := request(t, r, testSecret)
	for i := range good {
		bad := append([]byte(nil), good...)
		bad[i] ^= 0x40
		if srv.Handle(bad) != nil {
			t.Fatalf("answered a request with byte %d flipped", i)
		}
	}
	if srv.Handle(good[:len(good)-1]) != nil {
		t.Fatal("answered a truncated request")
	}
	if len(srv.ledger.vols) != 0 {
		t.Fatalf("state changed: %+v", srv.ledger.vols)
	}
	// A client with the wrong secret reports the silence.
	go srv.Serve(context.Background())
	c, err := NewClient(ClientConfig{Addr: srv.Addr().String(), Secret: []byte("another-secret-of-16+"), LeaseTTL: time.Second, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Vote(context.Background(), failover.VoteRequest{Volume: "v", Node: "a", Peer: "b"}); !errors.Is(err, ErrNoReply) {
		t.Fatalf("wrong secret: %v, want ErrNoReply", err)
	}
}

func TestBadRequests(t *testing.T) {
	srv := newTestServer(t, time.Now)
	for _, r := range []Request{
		{Op: 9, Volume: "v", Node: "a", Peer: "b"},
		{Op: OpVote, Node: "a", Peer: "b"},
		{Op: OpVote, Volume: "v", Peer: "b"},
		{Op: OpVote, Volume: "v", Node: "a"},
		{Op: OpRelease, Volume: "v", Node: "a", Peer: "a"},
		{Op: OpVote, Volume: "v", Node: "a", Peer: "b", TTL: DefaultMaxLeaseTTL + time.Second},
	} {
		r.Time = time.Now()
		r.Nonce[0]++
		if rep := decodeReply(t, srv.Handle(request(t, &r, testSecret))); rep.Status != StatusBadRequest || rep.Message == "" {
			t.Errorf("%+v: %+v", r, rep)
		}
	}
}

// The witness does not answer a grant it could not make durable.
func TestGrantNotGivenUnsaved(t *testing.T) {
	srv := newTestServer(t, time.Now)
	// Root ignores directory permissions, so point the ledger at a
	// directory that does not exist.
	srv.ledger.dir = filepath.Join(srv.cfg.StateDir, "missing", "dir")
	r := &Request{Op: OpVote, Time: time.Now(), Volume: "v", Node: "a", Peer: "b", Epoch: 3}
	rep := decodeReply(t, srv.Handle(request(t, r, testSecret)))
	if rep.Status != StatusInternal || rep.Granted {
		t.Fatalf("unsaved grant: %+v", rep)
	}
	if v := srv.ledger.vols["v"]; v.holder != "" || v.epoch != 0 || v.last != "" {
		t.Fatalf("state kept an unsaved grant: %+v", v)
	}
}

func TestCorruptStateRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := NewServer(Config{Listen: "127.0.0.1:0", Secret: testSecret, StateDir: dir}, zerolog.Nop())
	if !errors.Is(err, ErrState) {
		t.Fatalf("corrupt state: %v, want ErrState", err)
	}
}

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("tiny\n"), 0o600)
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("  "+string(testSecret)+"\n"), 0o600)
	if s, err := LoadSecret(good); err != nil || string(s) != string(testSecret) {
		t.Fatalf("LoadSecret: %q %v", s, err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"SecretFile", Config{StateDir: dir}},
		{"secret file", Config{StateDir: dir, SecretFile: short}},
		{"secret file", Config{StateDir: dir, SecretFile: filepath.Join(dir, "none")}},
		{"LeaseTTL", Config{StateDir: dir, Secret: testSecret, LeaseTTL: time.Hour}},
		{"Listen", Config{StateDir: dir, Secret: testSecret, Listen: "nonsense"}},
	} {
		_, err := NewServer(tc.cfg, zerolog.Nop())
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.name) {
			t.Errorf("%+v: %v, want ErrConfig naming %s", tc.cfg, err, tc.name)
		}
	}
	for _, cc := range []ClientConfig{
		{Secret: testSecret, LeaseTTL: time.Second},
		{Addr: "x:1", Secret: []byte("short"), LeaseTTL: time.Second},
		{Addr: "x:1", Secret: testSecret},
	} {
		if _, err := NewClient(cc); !errors.Is(err, ErrConfig) {
			t.Errorf("%+v: %v", cc, err)
		}
	}
}

// A witness that is not there: the client says so by its deadline.
func TestNoWitness(t *testing.T) {
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.LocalAddr().String()
	l.Close()
	c := newClient(t, addr, time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = c.Vote(ctx, failover.VoteRequest{Volume: "v", Node: "a", Peer: "b"})
	if !errors.Is(err, ErrNoReply) {
		t.Fatalf("no witness: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("took %v past a 300ms deadline", d)
	}
	c.Close()
	if _, err := c.Vote(context.Background(), failover.VoteRequest{}); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}
