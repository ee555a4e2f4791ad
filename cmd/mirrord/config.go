package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/mirrord/mirrord/internal/busypoll"
	"github.com/mirrord/mirrord/internal/units"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/mirrord/mirrord/bitmap"
	"github.com/mirrord/mirrord/mirror"
	"github.com/mirrord/mirrord/nbd"
	"github.com/mirrord/mirrord/wan"
)

// Config is the whole of mirrord's configuration: one YAML file, every key
// overridable by MIRRORD_SECTION_KEY environment variables and --set
// section.key=value flags. Unknown keys are errors, so a typo never falls
// back to a default silently.
type Config struct {
	Node    NodeConfig    `mapstructure:"node"`
	Volume  VolumeConfig  `mapstructure:"volume"`
	NBD     NBDConfig     `mapstructure:"nbd"`
	Peer    PeerConfig    `mapstructure:"peer"`
	Control ControlConfig `mapstructure:"control"`
	Log     LogConfig     `mapstructure:"log"`
	// Failover is the failover agent (off unless failover.enabled).
	Failover FailoverConfig `mapstructure:"failover"`
}

// NodeConfig names this host.
type NodeConfig struct {
	// Name must differ between the two nodes (default: the hostname).
	Name string `mapstructure:"name"`
	// BusyPoll is how long the NBD readers and the replication link poll
	// their sockets before they block, while data is flowing (0: never).
	BusyPoll time.Duration `mapstructure:"busy-poll"`
}

// PeerConfig is the replication partner. Without peer.node the volume is
// standalone.
type PeerConfig struct {
	Node    string `mapstructure:"node"`
	Address string `mapstructure:"address"` // host:port we dial
	Listen  string `mapstructure:"listen"`  // host:port we accept on
	// Secret authenticates the pair; SecretFile reads it from a file.
	Secret        string        `mapstructure:"secret"`
	SecretFile    string        `mapstructure:"secret-file"`
	Mode          string        `mapstructure:"mode"` // sync (protocol C) or async (protocol A)
	Timeout       time.Duration `mapstructure:"timeout"`
	PingInterval  time.Duration `mapstructure:"ping-interval"`
	ConnectRetry  time.Duration `mapstructure:"connect-retry"`
	OnDisconnect  string        `mapstructure:"on-disconnect"` // continue or suspend
	AsyncWindow   ByteSize      `mapstructure:"async-window"`
	ResyncMaxRate ByteSize      `mapstructure:"resync-max-rate"` // bytes/s, 0 unlimited
	ResyncMinRate ByteSize      `mapstructure:"resync-min-rate"`
	// Journal is where async writes spill when the window is full.
	Journal JournalConfig `mapstructure:"journal"`
	// MaxLag bounds how far an async peer may fall behind; LagPolicy
	// (alert, throttle or block) is what happens past the bound.
	MaxLag    MaxLagConfig `mapstructure:"max-lag"`
	LagPolicy string       `mapstructure:"lag-policy"`
	// Profile is lan or wan. A WAN peer (profile wan) gets TLS and zstd
	// compression unless peer.tls.enabled / peer.compression say otherwise.
	// It is not inferred from mode async: async is used on LANs too (to take
	// the peer out of the write latency), and TLS needs key material an
	// operator must provision.
	Profile     string        `mapstructure:"profile"`
	TLS         PeerTLSConfig `mapstructure:"tls"`
	Compression string        `mapstructure:"compression"` // auto (by profile), zstd, off
	// RateLimit caps what this node sends to the peer ("100Mbit",
	// "12MiB/s", 0 unlimited); ResyncShare is resync's share of it while
	// application writes flow. Both change at runtime with `mirrord set`.
	RateLimit   Rate    `mapstructure:"rate-limit"`
	ResyncShare Percent `mapstructure:"resync-share"`
	// UndoMaxSize caps the target's undo log (0: no cap); past it the
	// catch-up pauses rather than overwrite what it cannot roll back.
	UndoMaxSize ByteSize `mapstructure:"undo-max-size"`
}

// JournalConfig is the async journal: Path defaults to the metadata file
// plus ".journal"; Size 0 disables it (a full window then goes Ahead).
type JournalConfig struct {
	Path string   `mapstructure:"path"`
	Size ByteSize `mapstructure:"size"`
}

// MaxLagConfig is the RPO bound; 0 leaves a dimension unbounded.
type MaxLagConfig struct {
	Bytes ByteSize      `mapstructure:"bytes"`
	Time  time.Duration `mapstructure:"time"`
}

// PeerTLSConfig is the replication link's TLS 1.3 with mutual certificates; the
// files come from `mirrord keygen`.
type PeerTLSConfig struct {
	Enabled string `mapstructure:"enabled"` // auto (on for profile wan), on, off
	CA      string `mapstructure:"ca"`      // the pair's CA certificate
	Cert    string `mapstructure:"cert"`    // this node's certificate
	Key     string `mapstructure:"key"`     // this node's private key
}

// tlsOn and zstdOn resolve "auto" by the profile.
func (p *PeerConfig) tlsOn() bool {
	return p.TLS.Enabled == "on" || p.TLS.Enabled == "auto" && p.Profile == "wan"
}
func (p *PeerConfig) zstdOn() bool {
	return p.Compression == "zstd" || p.Compression == "auto" && p.Profile == "wan"
}

// ControlConfig is the local admin socket the CLI talks to.
type ControlConfig struct {
	Socket string `mapstructure:"socket"`
}

// VolumeConfig is the local copy of the mirrored device.
type VolumeConfig struct {
	Name string `mapstructure:"name"`
	// Path is a regular file (created sparse with Size if missing) or a
	// block device.
	Path string `mapstructure:"path"`
	// Size is the size to create the store with (0: DefaultVolumeSize).
	// An existing store keeps its size; set Size to have it checked.
	Size       ByteSize `mapstructure:"size"`
	RegionSize ByteSize `mapstructure:"region-size"`
	// Meta is the metadata file (generations, activity log, bitmap);
	// default: Path + ".meta" when a peer is configured.
	Meta      string `mapstructure:"meta"`
	ALExtents uint32 `mapstructure:"al-extents"`
}

// NBDConfig is how clients reach the volume.
type NBDConfig struct {
	// Listen holds addresses "unix:/path" or "tcp:host:port".
	Listen        []string `mapstructure:"listen"`
	ReadOnly      bool     `mapstructure:"read-only"`
	InflightBytes ByteSize `mapstructure:"inflight-bytes"`
	// Device exposes the volume as a kernel block device while this node
	// is Primary: "/dev/nbdN", "auto" (the first free one) or "" (none).
	// The other device-* keys tune it (see device.go).
	Device            string        `mapstructure:"device"`
	DeviceConnections int           `mapstructure:"device-connections"`
	DeviceTimeout     time.Duration `mapstructure:"device-timeout"`
	DeviceDeadTimeout time.Duration `mapstructure:"device-dead-timeout"`
	DeviceInterface   string        `mapstructure:"device-interface"` // auto, netlink or ioctl
}

// LogConfig selects verbosity and format.
type LogConfig struct {
	Level  string `mapstructure:"level"`  // debug, info, warn, error
	Format string `mapstructure:"format"` // auto (console on a terminal), console, json
}

// Defaults: a volume that runs on a fresh host as root with nothing
// configured. TCP listens on loopback only: NBD has no authentication.
const (
	DefaultVolumeName = "vol0"
	DefaultVolumePath = "/var/lib/mirrord/vol0.img"
	DefaultVolumeSize = 1 << 30
	DefaultUnixSocket = "/run/mirrord/vol0.sock"
	DefaultTCPListen  = "127.0.0.1:10809"
	DefaultControl    = "/run/mirrord/vol0.ctl"
)

func setDefaults(v *viper.Viper) {
	v.SetDefault("volume.name", DefaultVolumeName)
	v.SetDefault("volume.path", DefaultVolumePath)
	v.SetDefault("volume.size", "0")
	v.SetDefault("volume.region-size", fmt.Sprint(bitmap.DefaultRegionSize))
	v.SetDefault("nbd.listen", []string{"unix:" + DefaultUnixSocket, "tcp:" + DefaultTCPListen})
	v.SetDefault("nbd.read-only", false)
	v.SetDefault("nbd.inflight-bytes", fmt.Sprint(nbd.DefaultInflightBytes))
	host, _ := os.Hostname()
	v.SetDefault("node.name", host)
	v.SetDefault("node.busy-poll", busypoll.DefaultWindow.String())
	v.SetDefault("volume.meta", "")
	v.SetDefault("volume.al-extents", mirror.DefaultALExtents)
	v.SetDefault("peer.node", "")
	v.SetDefault("peer.address", "")
	v.SetDefault("peer.listen", "")
	v.SetDefault("peer.secret", "")
	v.SetDefault("peer.secret-file", "")
	v.SetDefault("peer.mode", "sync")
	v.SetDefault("peer.timeout", mirror.DefaultPeerTimeout.String())
	v.SetDefault("peer.ping-interval", mirror.DefaultPingInterval.String())
	v.SetDefault("peer.connect-retry", mirror.DefaultConnectRetry.String())
	v.SetDefault("peer.on-disconnect", "continue")
	v.SetDefault("peer.async-window", fmt.Sprint(mirror.DefaultAsyncWindow))
	v.SetDefault("peer.resync-max-rate", "0")
	v.SetDefault("peer.resync-min-rate", fmt.Sprint(mirror.DefaultResyncMinRate))
	v.SetDefault("peer.journal.path", "")
	v.SetDefault("peer.journal.size", fmt.Sprint(mirror.DefaultJournalSize))
	v.SetDefault("peer.max-lag.bytes", "0")
	v.SetDefault("peer.max-lag.time", "0s")
	v.SetDefault("peer.lag-policy", mirror.LagAlert.String())
	v.SetDefault("peer.profile", "lan")
	v.SetDefault("peer.tls.enabled", "auto")
	v.SetDefault("peer.tls.ca", "")
	v.SetDefault("peer.tls.cert", "")
	v.SetDefault("peer.tls.key", "")
	v.SetDefault("peer.compression", "auto")
	v.SetDefault("peer.rate-limit", "0")
	v.SetDefault("peer.undo-max-size", fmt.Sprint(mirror.DefaultUndoMaxSize))
	v.SetDefault("peer.resync-share", fmt.Sprintf("%d%%", mirror.DefaultResyncShare))
	v.SetDefault("control.socket", DefaultControl)
	v.SetDefault("log.level", "info")
	v.SetDefault("log.format", "auto")
	setDeviceDefaults(v.SetDefault)
	setFailoverDefaults(v.SetDefault)
}

// configKeys lists every valid key, derived from the struct tags so that the
// list cannot drift from Config.
func configKeys() []string {
	var keys []string
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for i := range t.NumField() {
			f := t.Field(i)
			name := prefix + f.Tag.Get("mapstructure")
			if f.Type.Kind() == reflect.Struct {
				walk(f.Type, name+".")
				continue
			}
			keys = append(keys, name)
		}
	}
	walk(reflect.TypeFor[Config](), "")
	sort.Strings(keys)
	return keys
}

func envName(key string) string {
	return "MIRRORD_" + strings.NewReplacer(".", "_", "-", "_").Replace(strings.ToUpper(key))
}

// configFlags are the flags every subcommand that reads the config takes.
type configFlags struct {
	file string
	set  []string
}

func (c *configFlags) register(fs *pflag.FlagSet) {
	fs.StringVarP(&c.file, "config", "c", "", "YAML config file")
	fs.StringArrayVar(&c.set, "set", nil, "override one key: --set section.key=value (repeatable)")
}

// loadConfig merges defaults, the file, the environment and --set flags (in
// that order of precedence, lowest first) and validates the result.
func loadConfig(cf configFlags) (*Config, error) {
	v := viper.New()
	setDefaults(v)
	known := make(map[string]bool)
	for _, k := range configKeys() {
		known[k] = true
	}
	if cf.file != "" {
		v.SetConfigFile(cf.file)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("config %s: %w", cf.file, err)
		}
		file := viper.New()
		file.SetConfigFile(cf.file)
		file.SetConfigType("yaml")
		if err := file.ReadInConfig(); err != nil {
			return nil, fmt.Errorf("config %s: %w", cf.file, err)
		}
		for _, k := range file.AllKeys() {
			if !known[k] {
				return nil, fmt.Errorf("config %s: unknown key %q (valid keys: %s)", cf.file, k, strings.Join(configKeys(), ", "))
			}
		}
	}
	envKeys := make(map[string]string)
	for _, k := range configKeys() {
		envKeys[envName(k)] = k
		if err := v.BindEnv(k, envName(k)); err != nil {
			return nil, err
		}
	}
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "MIRRORD_") && envKeys[name] == "" {
			return nil, fmt.Errorf("environment: unknown variable %s (it matches no config key)", name)
		}
	}
	for _, s := range cf.set {
		k, val, ok := strings.Cut(s, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok {
			return nil, fmt.Errorf("--set %q: want key=value", s)
		}
		if !known[k] {
			return nil, fmt.Errorf("--set: unknown key %q (valid keys: %s)", k, strings.Join(configKeys(), ", "))
		}
		v.Set(k, val)
	}

	var c Config
	err := v.UnmarshalExact(&c, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		mapstructure.TextUnmarshallerHookFunc(),
		mapstructure.StringToTimeDurationHookFunc(),
		mapstructure.StringToSliceHookFunc(","),
	)))
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// FieldError names the config key a bad value came from.
type FieldError struct {
	Key string
	Msg string
}

func (e *FieldError) Error() string { return "config: " + e.Key + ": " + e.Msg }

func (c *Config) validate() error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, &FieldError{Key: key, Msg: fmt.Sprintf(format, a...)})
	}
	if c.Volume.Name == "" || strings.ContainsAny(c.Volume.Name, "/ \t\n") {
		bad("volume.name", "must be non-empty, without spaces or slashes (got %q)", c.Volume.Name)
	}
	if c.Volume.Path == "" {
		bad("volume.path", "must be set")
	}
	if c.Volume.Size < 0 {
		bad("volume.size", "must not be negative (got %d)", c.Volume.Size)
	}
	rs := int64(c.Volume.RegionSize)
	if rs < 512 || rs > 1<<30 || rs&(rs-1) != 0 {
		bad("volume.region-size", "must be a power of two from 512 to 1GiB (got %d)", rs)
	}
	if c.Node.Name == "" {
		bad("node.name", "must be set (no hostname to default to)")
	}
	if c.Node.BusyPoll < 0 || c.Node.BusyPoll > time.Second {
		bad("node.busy-poll", "must be from 0 (never poll) to 1s (got %v)", c.Node.BusyPoll)
	}
	if c.Control.Socket == "" {
		bad("control.socket", "must be set")
	}
	c.validatePeer(bad)
	c.validateFailover(bad)
	if len(c.NBD.Listen) == 0 {
		bad("nbd.listen", "needs at least one address")
	}
	for _, a := range c.NBD.Listen {
		if _, _, err := parseListen(a); err != nil {
			bad("nbd.listen", "%v", err)
		}
	}
	c.validateDevice(bad)
	if c.NBD.InflightBytes < nbd.MaxPayload {
		bad("nbd.inflight-bytes", "must be at least %d, the largest request (got %d)", nbd.MaxPayload, c.NBD.InflightBytes)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "must be debug, info, warn or error (got %q)", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "console", "json":
	default:
		bad("log.format", "must be auto, console or json (got %q)", c.Log.Format)
	}
	return errors.Join(errs...)
}

func (c *Config) validatePeer(bad func(key, format string, a ...any)) {
	p := &c.Peer
	if p.Node == "" {
		for key, val := range map[string]string{"peer.address": p.Address, "peer.listen": p.Listen, "peer.secret": p.Secret, "peer.secret-file": p.SecretFile} {
			if val != "" {
				bad(key, "set, but peer.node is empty (a standalone volume has no peer)")
			}
		}
		return
	}
	if p.Node == c.Node.Name {
		bad("peer.node", "must differ from node.name (%q)", c.Node.Name)
	}
	if p.Address == "" && p.Listen == "" {
		bad("peer.address", "set peer.address, peer.listen or both")
	}
	for key, a := range map[string]string{"peer.address": p.Address, "peer.listen": p.Listen} {
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad(key, "want host:port (%v)", err)
		}
	}
	switch {
	case p.Secret != "" && p.SecretFile != "":
		bad("peer.secret", "set peer.secret or peer.secret-file, not both")
	case p.Secret == "" && p.SecretFile == "":
		bad("peer.secret", "a peer needs a shared secret (peer.secret or peer.secret-file)")
	}
	if p.Mode != "sync" && p.Mode != "async" {
		bad("peer.mode", "must be sync or async (got %q)", p.Mode)
	}
	if p.OnDisconnect != "continue" && p.OnDisconnect != "suspend" {
		bad("peer.on-disconnect", "must be continue or suspend (got %q)", p.OnDisconnect)
	}
	if p.Timeout <= 0 {
		bad("peer.timeout", "must be positive")
	}
	if p.PingInterval <= 0 || p.PingInterval >= p.Timeout {
		bad("peer.ping-interval", "must be positive and below peer.timeout")
	}
	if p.ConnectRetry <= 0 {
		bad("peer.connect-retry", "must be positive")
	}
	if p.AsyncWindow < nbd.MaxPayload {
		bad("peer.async-window", "must be at least %d", nbd.MaxPayload)
	}
	if p.ResyncMaxRate < 0 || p.ResyncMinRate <= 0 {
		bad("peer.resync-min-rate", "rates must be positive (resync-max-rate 0 means unlimited)")
	}
	if p.Journal.Size != 0 && p.Journal.Size < mirror.MinJournalSize {
		bad("peer.journal.size", "must be 0 (no journal) or at least %d (got %d)", mirror.MinJournalSize, p.Journal.Size)
	}
	if p.UndoMaxSize < 0 {
		bad("peer.undo-max-size", "must not be negative (0: no cap)")
	}
	if p.MaxLag.Bytes < 0 {
		bad("peer.max-lag.bytes", "must not be negative")
	}
	if p.MaxLag.Time < 0 {
		bad("peer.max-lag.time", "must not be negative")
	}
	policy, err := mirror.ParseLagPolicy(p.LagPolicy)
	switch {
	case err != nil:
		bad("peer.lag-policy", "must be alert, throttle or block (got %q)", p.LagPolicy)
	case policy != mirror.LagAlert && p.MaxLag.Bytes == 0 && p.MaxLag.Time == 0:
		bad("peer.lag-policy", "%s needs a bound: set peer.max-lag.bytes or peer.max-lag.time", policy)
	}
	if p.Profile != "lan" && p.Profile != "wan" {
		bad("peer.profile", "must be lan or wan (got %q)", p.Profile)
	}
	switch p.TLS.Enabled {
	case "auto", "on", "off":
	default:
		bad("peer.tls.enabled", "must be auto, on or off (got %q)", p.TLS.Enabled)
	}
	for key, f := range map[string]string{"peer.tls.ca": p.TLS.CA, "peer.tls.cert": p.TLS.Cert, "peer.tls.key": p.TLS.Key} {
		switch {
		case p.tlsOn() && f == "":
			bad(key, "TLS is on (peer.profile %s, peer.tls.enabled %s) and needs it; make the files with 'mirrord keygen'", p.Profile, p.TLS.Enabled)
		case !p.tlsOn() && f != "":
			bad(key, "set, but TLS is off (peer.profile %s, peer.tls.enabled %s)", p.Profile, p.TLS.Enabled)
		}
	}
	switch p.Compression {
	case "auto", "zstd", "off":
	default:
		bad("peer.compression", "must be auto, zstd or off (got %q)", p.Compression)
	}
	if p.ResyncShare < 1 || p.ResyncShare > 100 {
		bad("peer.resync-share", "must be from 1%% to 100%% (got %d%%)", p.ResyncShare)
	}
}

// mirrorPeer converts the peer section for mirror.Open.
func (c *Config) mirrorPeer() (*mirror.PeerConfig, error) {
	p := c.Peer
	if p.Node == "" {
		return nil, nil
	}
	secret := []byte(p.Secret)
	if p.SecretFile != "" {
		b, err := os.ReadFile(p.SecretFile)
		if err != nil {
			return nil, &FieldError{Key: "peer.secret-file", Msg: err.Error()}
		}
		secret = []byte(strings.TrimSpace(string(b)))
		if len(secret) == 0 {
			return nil, &FieldError{Key: "peer.secret-file", Msg: "file is empty"}
		}
	}
	pc := &mirror.PeerConfig{
		Node: p.Node, Address: p.Address, Listen: p.Listen, Secret: secret,
		Timeout: p.Timeout, PingInterval: p.PingInterval, ConnectRetry: p.ConnectRetry,
		AsyncWindow: int64(p.AsyncWindow), ResyncMaxRate: int64(p.ResyncMaxRate), ResyncMinRate: int64(p.ResyncMinRate),
		BusyPoll: c.Node.BusyPoll,
	}
	if pc.BusyPoll == 0 {
		pc.BusyPoll = -1 // never: 0 would be the default
	}
	if p.Mode == "async" {
		pc.Mode = mirror.ModeAsync
	}
	pc.JournalPath, pc.JournalSize = p.Journal.Path, int64(p.Journal.Size)
	if p.Journal.Size == 0 {
		pc.JournalSize = -1 // mirror reads 0 as the default size
	}
	pc.MaxLagBytes, pc.MaxLagTime = int64(p.MaxLag.Bytes), p.MaxLag.Time
	pc.LagPolicy, _ = mirror.ParseLagPolicy(p.LagPolicy) // validated
	pc.Compress = p.zstdOn()
	pc.RateLimit, pc.ResyncShare = int64(p.RateLimit), int(p.ResyncShare)
	pc.UndoMaxSize = int64(p.UndoMaxSize)
	if p.UndoMaxSize == 0 {
		pc.UndoMaxSize = -1 // mirror reads 0 as the default cap
	}
	if p.tlsOn() {
		tc, err := wan.LoadTLS(wan.TLSFiles{CA: p.TLS.CA, Cert: p.TLS.Cert, Key: p.TLS.Key}, p.Node)
		if err != nil {
			return nil, &FieldError{Key: "peer.tls", Msg: err.Error()}
		}
		pc.TLS = tc
	}
	if p.OnDisconnect == "suspend" {
		pc.OnDisconnect = mirror.SuspendIO
	}
	return pc, nil
}

// metaPath is where the metadata lives ("" for a standalone volume
// without one).
func (c *Config) metaPath() string {
	if c.Volume.Meta != "" {
		return c.Volume.Meta
	}
	if c.Peer.Node != "" {
		return c.Volume.Path + ".meta"
	}
	return ""
}

// parseListen splits "unix:/path" or "tcp:host:port".
func parseListen(a string) (network, addr string, err error) {
	network, addr, ok := strings.Cut(a, ":")
	if !ok || addr == "" {
		return "", "", fmt.Errorf("address %q: want unix:/path or tcp:host:port", a)
	}
	switch network {
	case "unix":
		return network, addr, nil
	case "tcp":
		if _, port, ok := strings.Cut(addr, ":"); !ok || port == "" {
			return "", "", fmt.Errorf("address %q: tcp needs host:port", a)
		}
		return network, addr, nil
	}
	return "", "", fmt.Errorf("address %q: network must be unix or tcp", a)
}

// ByteSize is a size in bytes that reads "4096", "4KiB", "512M", "1G" and
// "1.5GiB" (K, M, G, T are binary multiples, as for disks in Linux tools).
type ByteSize int64

// UnmarshalText parses a size.
func (b *ByteSize) UnmarshalText(text []byte) error {
	n, err := ParseByteSize(string(text))
	if err != nil {
		return err
	}
	*b = ByteSize(n)
	return nil
}

// ParseByteSize parses a size such as "1GiB".
func ParseByteSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	unit := strings.TrimLeft(t, "0123456789.")
	num := t[:len(t)-len(unit)]
	mult := int64(1)
	switch strings.ToLower(strings.TrimSpace(unit)) {
	case "", "b":
	case "k", "kb", "kib":
		mult = 1 << 10
	case "m", "mb", "mib":
		mult = 1 << 20
	case "g", "gb", "gib":
		mult = 1 << 30
	case "t", "tb", "tib":
		mult = 1 << 40
	default:
		return 0, fmt.Errorf("size %q: unknown unit %q", s, unit)
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("size %q: not a number", s)
	}
	if f*float64(mult) > float64(1<<62) {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return int64(f * float64(mult)), nil
}

// Rate is a bandwidth in bytes/s that reads bits as network people write them
// ("100Mbit", "1.5Gbit", "800kbit": decimal, as tc does) and bytes per second as
// storage people do ("12MiB/s", "500K/s": ByteSize units). "0" is unlimited.
type Rate int64

// UnmarshalText parses a rate.
func (r *Rate) UnmarshalText(text []byte) error {
	n, err := ParseRate(string(text))
	if err != nil {
		return err
	}
	*r = Rate(n)
	return nil
}

// ParseRate parses a rate such as "100Mbit" or "12MiB/s" into bytes/s.
func ParseRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	lower := strings.ToLower(t)
	switch {
	case strings.HasSuffix(lower, "bit"), strings.HasSuffix(lower, "bit/s"):
		bits, err := units.ParseBits(lower)
		if err != nil || bits > 1e15 {
			return 0, fmt.Errorf("rate %q: want e.g. 100Mbit, 12MiB/s or 0", s)
		}
		return bits / 8, nil
	}
	n, err := ParseByteSize(strings.TrimSuffix(t, "/s"))
	if err != nil {
		return 0, fmt.Errorf("rate %q: want e.g. 100Mbit, 12MiB/s or 0", s)
	}
	return n, nil
}

// Percent reads "30%" or "30".
type Percent int

// UnmarshalText parses a percentage.
func (p *Percent) UnmarshalText(text []byte) error {
	n, err := ParsePercent(string(text))
	if err != nil {
		return err
	}
	*p = Percent(n)
	return nil
}

// ParsePercent parses "30%" or "30" (0..100).
func ParsePercent(s string) (int, error) {
	n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(s), "%"))
	if err != nil || n < 0 || n > 100 {
		return 0, fmt.Errorf("percentage %q: want 0%% to 100%%", s)
	}
	return n, nil
}
