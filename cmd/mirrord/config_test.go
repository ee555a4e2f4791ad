package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  bool
	}{
		{"4096", 4096, false},
		{"4KiB", 4096, false},
		{"4k", 4096, false},
		{"512M", 512 << 20, false},
		{"1G", 1 << 30, false},
		{"1.5GiB", 3 << 29, false},
		{" 2 TiB ", 2 << 40, false},
		{"0", 0, false},
		{"abc", 0, true},
		{"12XB", 0, true},
		{"-1", 0, true},
		{"", 0, true},
		{"99999999T", 0, true},
	} {
		got, err := ParseByteSize(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseByteSize(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfigPrecedence(t *testing.T) {
	file := writeConfig(t, "volume:\n  size: 2GiB\n  name: fromfile\nlog:\n  level: warn\n")
	t.Setenv("MIRRORD_VOLUME_NAME", "fromenv")
	c, err := loadConfig(configFlags{file: file, set: []string{"log.level=debug"}})
	if err != nil {
		t.Fatal(err)
	}
	if c.Volume.Size != 2<<30 || c.Volume.Name != "fromenv" || c.Log.Level != "debug" {
		t.Fatalf("got size %d name %q level %q; want file size, env name, flag level", c.Volume.Size, c.Volume.Name, c.Log.Level)
	}
	if c.Volume.RegionSize != 4096 || c.Peer.Timeout != 6*time.Second || len(c.NBD.Listen) != 2 {
		t.Fatalf("defaults not applied: %+v", c)
	}
}

func TestLoadConfigErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		set        []string
		env        [2]string
		want       string
	}{
		{name: "unknown file key", file: "volume:\n  sise: 1G\n", want: `"volume.sise"`},
		{name: "unknown section", file: "volum:\n  size: 1G\n", want: `"volum.size"`},
		{name: "unknown --set key", set: []string{"volume.sise=1"}, want: `"volume.sise"`},
		{name: "--set without =", set: []string{"volume.size"}, want: "want key=value"},
		{name: "unknown env", env: [2]string{"MIRRORD_VOLUME_SISE", "1"}, want: "MIRRORD_VOLUME_SISE"},
		{name: "bad size", set: []string{"volume.size=abc"}, want: "abc"},
		{name: "region size", set: []string{"volume.region-size=1000"}, want: "volume.region-size"},
		{name: "listen", set: []string{"nbd.listen=udp:x"}, want: "nbd.listen"},
		{name: "log level", set: []string{"log.level=loud"}, want: "log.level"},
		{name: "negative busy poll", set: []string{"node.busy-poll=-1us"}, want: "node.busy-poll"},
		{name: "busy poll past 1s", set: []string{"node.busy-poll=2s"}, want: "node.busy-poll"},
		{name: "peer mode", set: []string{"peer.node=b", "peer.address=h:1", "peer.secret=s", "peer.mode=fast"}, want: "peer.mode"},
		{name: "peer without secret", set: []string{"peer.node=b", "peer.address=h:1"}, want: "peer.secret"},
		{name: "peer named like us", set: []string{"node.name=a", "peer.node=a", "peer.address=h:1", "peer.secret=s"}, want: "peer.node"},
		{name: "peer keys without peer", set: []string{"peer.address=h:1"}, want: "peer.address"},
		{name: "bad duration", set: []string{"peer.timeout=soon"}, want: "timeout"},
		{name: "journal too small", set: append(asyncPeer, "peer.journal.size=4KiB"), want: "peer.journal.size"},
		{name: "lag policy", set: append(asyncPeer, "peer.lag-policy=panic"), want: "peer.lag-policy"},
		{name: "block without a bound", set: append(asyncPeer, "peer.lag-policy=block"), want: "peer.max-lag"},
		{name: "negative lag time", set: append(asyncPeer, "peer.max-lag.time=-1s"), want: "peer.max-lag.time"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cf := configFlags{set: tc.set}
			if tc.file != "" {
				cf.file = writeConfig(t, tc.file)
			}
			if tc.env[0] != "" {
				t.Setenv(tc.env[0], tc.env[1])
			}
			_, err := loadConfig(cf)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}

var asyncPeer = []string{"peer.node=b", "peer.address=h:1", "peer.secret=s", "peer.mode=async"}

func TestJournalAndLagConfig(t *testing.T) {
	c, err := loadConfig(configFlags{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Peer.Journal.Size != 1<<30 || c.Peer.LagPolicy != "alert" || c.Peer.MaxLag.Bytes != 0 {
		t.Fatalf("defaults: %+v", c.Peer)
	}
	file := writeConfig(t, "peer:\n  journal:\n    path: /x/j\n    size: 64MiB\n  max-lag:\n    bytes: 8MiB\n    time: 30s\n  lag-policy: throttle\n")
	c, err = loadConfig(configFlags{file: file, set: asyncPeer})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := c.mirrorPeer()
	if err != nil {
		t.Fatal(err)
	}
	if pc.JournalPath != "/x/j" || pc.JournalSize != 64<<20 || pc.MaxLagBytes != 8<<20 || pc.MaxLagTime != 30*time.Second || pc.LagPolicy.String() != "throttle" {
		t.Fatalf("peer config %+v", pc)
	}
	c, err = loadConfig(configFlags{set: append(asyncPeer, "peer.journal.size=0")})
	if err != nil {
		t.Fatal(err)
	}
	if pc, _ := c.mirrorPeer(); pc.JournalSize >= 0 {
		t.Fatalf("journal size 0 should disable the journal, got %d", pc.JournalSize)
	}
}

func TestFieldErrorIsTyped(t *testing.T) {
	_, err := loadConfig(configFlags{set: []string{"log.format=xml"}})
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Key != "log.format" {
		t.Fatalf("error %v is not a FieldError for log.format", err)
	}
}

func TestHumanStatus(t *testing.T) {
	var st statusReply
	st.Volume, st.Role, st.Disk, st.SizeBytes = "vol0", "Primary", "UpToDate", 1<<30
	got := humanStatus(st)
	if !strings.Contains(got, "vol0 role:Primary") || !strings.Contains(got, "disk:UpToDate size:1.0 GiB") {
		t.Fatalf("human status:\n%s", got)
	}
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 29: "1.5 GiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  bool
	}{
		{"0", 0, false},
		{"100Mbit", 12_500_000, false},
		{"100mbit/s", 12_500_000, false},
		{"1.5Gbit", 187_500_000, false},
		{"800kbit", 100_000, false},
		{"12MiB/s", 12 << 20, false},
		{"12MiB", 12 << 20, false},
		{"4096", 4096, false},
		{"fast", 0, true},
		{"-1Mbit", 0, true},
		{"10Xbit", 0, true},
	} {
		got, err := ParseRate(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestPeerProfile: profile wan turns TLS and compression on and then needs the
// key files; explicit keys override the profile; TLS files with TLS off are an
// error rather than a silent plaintext link.
func TestPeerProfile(t *testing.T) {
	base := []string{"node.name=alpha", "peer.node=beta", "peer.address=127.0.0.1:1", "peer.secret=x"}
	load := func(set ...string) (*Config, error) {
		return loadConfig(configFlags{set: append(append([]string{}, base...), set...)})
	}
	c, err := load()
	if err != nil || c.Peer.tlsOn() || c.Peer.zstdOn() {
		t.Fatalf("lan default: err %v tls %v zstd %v, want both off", err, c.Peer.tlsOn(), c.Peer.zstdOn())
	}
	_, err = load("peer.profile=wan")
	var fe *FieldError
	if !errors.As(err, &fe) || !strings.HasPrefix(fe.Key, "peer.tls.") {
		t.Fatalf("wan without key files: %v, want a peer.tls.* field error", err)
	}
	c, err = load("peer.profile=wan", "peer.tls.enabled=off")
	if err != nil || c.Peer.tlsOn() || !c.Peer.zstdOn() {
		t.Fatalf("wan, tls off: err %v tls %v zstd %v", err, c.Peer.tlsOn(), c.Peer.zstdOn())
	}
	if _, err := load("peer.tls.ca=/x"); !errors.As(err, &fe) || fe.Key != "peer.tls.ca" {
		t.Fatalf("ca with TLS off: %v, want a peer.tls.ca field error", err)
	}
	if _, err := load("peer.resync-share=0%"); !errors.As(err, &fe) || fe.Key != "peer.resync-share" {
		t.Fatalf("share 0%%: %v", err)
	}
	c, err = load("peer.rate-limit=100Mbit", "peer.resync-share=25%")
	if err != nil || c.Peer.RateLimit != 12_500_000 || c.Peer.ResyncShare != 25 {
		t.Fatalf("rate: %v %+v", err, c.Peer)
	}
}

// node.busy-poll reaches the replication link: the default, a value, and 0
// (never), which the link must not read as "use the default".
func TestBusyPollConfig(t *testing.T) {
	peer := []string{"peer.node=b", "peer.address=h:1", "peer.secret=s"}
	for _, tc := range []struct {
		set       []string
		node, got time.Duration
	}{
		{nil, 100 * time.Microsecond, 100 * time.Microsecond},
		{[]string{"node.busy-poll=250us"}, 250 * time.Microsecond, 250 * time.Microsecond},
		{[]string{"node.busy-poll=0"}, 0, -1},
	} {
		c, err := loadConfig(configFlags{set: append(tc.set, peer...)})
		if err != nil {
			t.Fatal(err)
		}
		pc, err := c.mirrorPeer()
		if err != nil {
			t.Fatal(err)
		}
		if c.Node.BusyPoll != tc.node || pc.BusyPoll != tc.got {
			t.Errorf("%v: node.busy-poll %v, peer %v; want %v, %v", tc.set, c.Node.BusyPoll, pc.BusyPoll, tc.node, tc.got)
		}
	}
}
