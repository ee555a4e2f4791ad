package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/agent"
	"github.com/mirrord/mirrord/failover/etcdlease"
	"github.com/mirrord/mirrord/failover/resource"
	"github.com/mirrord/mirrord/failover/witness"
	"github.com/mirrord/mirrord/mirror"
)

// FailoverConfig is the failover agent (see package failover). It needs a
// peer; without a witness or etcd it is confirm-only.
type FailoverConfig struct {
	Enabled bool `mapstructure:"enabled"`
	// Mode: auto, confirm or maintenance.
	Mode string `mapstructure:"mode"`
	// Profile picks the timer defaults: lan (500ms x 4) or wan (2s x 10).
	Profile           string        `mapstructure:"profile"`
	HeartbeatInterval time.Duration `mapstructure:"heartbeat-interval"` // 0: the profile's
	MissCount         int           `mapstructure:"miss-count"`         // 0: the profile's
	// UDP lists independent heartbeat paths, each "LISTEN->PEER"
	// (host:port->host:port).
	UDP []UDPPath `mapstructure:"udp"`
	// Witness is the mirrord witness's UDP address; WitnessSecretFile its
	// secret. EtcdEndpoints use an etcd lease instead.
	Witness           string   `mapstructure:"witness"`
	WitnessSecretFile string   `mapstructure:"witness-secret-file"`
	EtcdEndpoints     []string `mapstructure:"etcd-endpoints"`
	// Fencing: suspend (hold writes) or error (EIO).
	Fencing         string        `mapstructure:"fencing"`
	MaxAsyncLag     ByteSize      `mapstructure:"max-async-lag"`
	MaxAsyncLagTime time.Duration `mapstructure:"max-async-lag-time"`
	// Failback: never, immediate or window; FailbackWindow "22-06".
	Failback          string        `mapstructure:"failback"`
	FailbackWindow    string        `mapstructure:"failback-window"`
	SwitchoverTimeout time.Duration `mapstructure:"switchover-timeout"`
	ConfirmTimeout    time.Duration `mapstructure:"confirm-timeout"`
	// ConfirmDefault: proceed or abandon, when nobody answers in time.
	ConfirmDefault string `mapstructure:"confirm-default"`
	// EpochFile persists the agent's epoch (default: the metadata path +
	// ".epoch").
	EpochFile string          `mapstructure:"epoch-file"`
	Resources []resource.Spec `mapstructure:"resources"`
	// MonitorInterval is how often the running resources are checked
	// (their monitor); 0 never.
	MonitorInterval time.Duration `mapstructure:"monitor-interval"`
	// LocalRecovery is how many times a resource that fails its check is
	// restarted in place before the Primary hands over to its peer; 0:
	// never, hand over at once.
	LocalRecovery int `mapstructure:"local-recovery"`
	// HandoverHold: after handing the service over for a resource
	// failure, this node hands over for one no more for this long (the
	// peer's resources failed too if the service came back).
	HandoverHold time.Duration `mapstructure:"handover-hold"`
	// StopResourcesOnExit: a Primary's mirrord that is stopped (SIGTERM,
	// SIGINT) stops the resources in reverse before its volume closes;
	// false leaves them up, for a restart that keeps the kernel device
	// (an upgrade).
	StopResourcesOnExit bool `mapstructure:"stop-resources-on-exit"`
}

// UDPPath is one "LISTEN->PEER" heartbeat path.
type UDPPath struct {
	Listen string `json:"listen"`
	Peer   string `json:"peer"`
}

// UnmarshalText parses "LISTEN->PEER".
func (u *UDPPath) UnmarshalText(b []byte) error {
	l, p, ok := strings.Cut(strings.TrimSpace(string(b)), "->")
	if !ok {
		return fmt.Errorf("heartbeat path %q: want LISTEN->PEER (host:port->host:port)", b)
	}
	for _, a := range []string{l, p} {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("heartbeat path %q: %v", b, err)
		}
	}
	u.Listen, u.Peer = l, p
	return nil
}

func setFailoverDefaults(set func(string, any)) {
	set("failover.enabled", false)
	set("failover.mode", "auto")
	set("failover.profile", "lan")
	set("failover.heartbeat-interval", "0s")
	set("failover.miss-count", 0)
	set("failover.udp", []string{})
	set("failover.witness", "")
	set("failover.witness-secret-file", "")
	set("failover.etcd-endpoints", []string{})
	set("failover.fencing", "suspend")
	set("failover.max-async-lag", fmt.Sprint(failover.DefaultMaxAsyncLagBytes))
	set("failover.max-async-lag-time", failover.DefaultMaxAsyncLagTime.String())
	set("failover.failback", "never")
	set("failover.failback-window", "")
	set("failover.switchover-timeout", failover.DefaultSwitchoverTimeout.String())
	set("failover.confirm-timeout", failover.DefaultConfirmTimeout.String())
	set("failover.confirm-default", "proceed")
	set("failover.epoch-file", "")
	set("failover.monitor-interval", agent.DefaultMonitorInterval.String())
	set("failover.local-recovery", failover.DefaultLocalRecovery)
	set("failover.handover-hold", failover.DefaultHandoverHold.String())
	set("failover.stop-resources-on-exit", true)
}

// machineConfig validates the section and converts it; bad reports each
// problem under its key.
func (c *Config) machineConfig(bad func(key, format string, a ...any)) failover.Config {
	f := c.Failover
	var mc failover.Config
	switch f.Profile {
	case "lan":
		mc = failover.DefaultLAN()
	case "wan":
		mc = failover.DefaultWAN()
	default:
		bad("failover.profile", "must be lan or wan (got %q)", f.Profile)
		mc = failover.DefaultLAN()
	}
	if f.HeartbeatInterval != 0 || f.MissCount != 0 {
		// Derived timers follow the interval.
		mc.TickInterval, mc.SafetyMargin, mc.JumpThreshold = 0, 0, 0
	}
	if f.HeartbeatInterval < 0 {
		bad("failover.heartbeat-interval", "must not be negative")
	} else if f.HeartbeatInterval > 0 {
		mc.HeartbeatInterval = f.HeartbeatInterval
	}
	if f.MissCount < 0 {
		bad("failover.miss-count", "must not be negative")
	} else if f.MissCount > 0 {
		mc.MissCount = f.MissCount
	}
	mc.Node, mc.Peer = c.Node.Name, c.Peer.Node
	mc.Paths = []string{failover.PathReplication}
	for i := range f.UDP {
		mc.Paths = append(mc.Paths, udpPathName(i))
	}
	mc.Mode = choose(bad, "failover.mode", f.Mode, failover.ModeAuto, failover.ModeConfirm, failover.ModeMaintenance)
	mc.Fencing = choose(bad, "failover.fencing", f.Fencing, failover.FenceSuspend, failover.FenceError)
	mc.DefaultConfirmAction = choose(bad, "failover.confirm-default", f.ConfirmDefault, failover.Proceed, failover.Abandon)
	mc.Failback.Policy = choose(bad, "failover.failback", f.Failback, failover.FailbackNever, failover.FailbackImmediate, failover.FailbackWindow)
	if mc.Failback.Policy == failover.FailbackWindow {
		from, to, ok := strings.Cut(f.FailbackWindow, "-")
		s, err1 := strconv.Atoi(from)
		e, err2 := strconv.Atoi(to)
		if !ok || err1 != nil || err2 != nil {
			bad("failover.failback-window", "want START-END hours, e.g. 22-06 (got %q)", f.FailbackWindow)
		}
		mc.Failback.StartHour, mc.Failback.EndHour = s, e
	}
	mc.MaxAsyncLagBytes, mc.MaxAsyncLagTime = int64(f.MaxAsyncLag), f.MaxAsyncLagTime
	mc.SwitchoverTimeout, mc.ConfirmTimeout = f.SwitchoverTimeout, f.ConfirmTimeout
	mc.Witness = f.Witness != "" || len(f.EtcdEndpoints) > 0
	if f.MonitorInterval < 0 {
		bad("failover.monitor-interval", "must not be negative (0: never check)")
	}
	if f.MonitorInterval > 0 {
		// A chain that failed to start is started again at the pace at
		// which a running one is checked (with checks off, at the
		// machine's default).
		mc.StartRetryInterval = f.MonitorInterval
	}
	switch {
	case f.LocalRecovery < 0:
		bad("failover.local-recovery", "must not be negative (0: no local recovery, hand over at once)")
	case f.LocalRecovery == 0:
		mc.LocalRecovery = -1 // the machine's "none"; its 0 is the default
	default:
		mc.LocalRecovery = f.LocalRecovery
	}
	if f.HandoverHold <= 0 {
		bad("failover.handover-hold", "must be positive")
	}
	mc.HandoverHold = f.HandoverHold
	return mc
}

// choose returns the option whose name (String) is val; otherwise it
// reports key and returns the first option.
func choose[T fmt.Stringer](bad func(key, format string, a ...any), key, val string, options ...T) T {
	names := make([]string, len(options))
	for i, o := range options {
		if o.String() == val {
			return o
		}
		names[i] = o.String()
	}
	bad(key, "must be %s or %s (got %q)", strings.Join(names[:len(names)-1], ", "), names[len(names)-1], val)
	return options[0]
}

func udpPathName(i int) string {
	if i == 0 {
		return failover.PathUDP
	}
	return fmt.Sprintf("%s%d", failover.PathUDP, i+1)
}

func (c *Config) validateFailover(bad func(key, format string, a ...any)) {
	f := c.Failover
	if !f.Enabled {
		return
	}
	if c.Peer.Node == "" {
		bad("failover.enabled", "failover needs a peer (peer.node)")
		return
	}
	if f.Witness != "" && len(f.EtcdEndpoints) > 0 {
		bad("failover.witness", "set failover.witness or failover.etcd-endpoints, not both")
	}
	if f.Witness != "" {
		if _, _, err := net.SplitHostPort(f.Witness); err != nil {
			bad("failover.witness", "want host:port (%v)", err)
		}
		if f.WitnessSecretFile == "" {
			bad("failover.witness-secret-file", "the witness needs its secret file")
		}
	}
	for i, s := range f.Resources {
		if err := s.Validate(i); err != nil {
			bad("failover.resources", "%v", err)
		}
	}
	mc := c.machineConfig(bad)
	// New fills the derived timers (ticks, margins) and validates.
	if _, err := failover.New(mc, failover.HardState{}, time.Time{}); err != nil {
		// The machine's error names its field (MissCount, Failback, ...).
		bad("failover", "%v", err)
	}
}

// newFailover builds the agent over vol. secret is the pair's secret;
// recv returns where received heartbeats go (the agent, once built).
func newFailover(c *Config, vol *mirror.Volume, secret []byte, recv func() func(string, []byte), dev *kernelExport, log zerolog.Logger) (*agent.Agent, error) {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, &FieldError{Key: key, Msg: fmt.Sprintf(format, a...)})
	}
	mc := c.machineConfig(bad)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	f := c.Failover
	var voter failover.Voter
	switch {
	case f.Witness != "":
		s, err := witness.LoadSecret(f.WitnessSecretFile)
		if err != nil {
			return nil, &FieldError{Key: "failover.witness-secret-file", Msg: err.Error()}
		}
		if voter, err = witness.NewClient(witness.ClientConfig{Addr: f.Witness, Secret: s, LeaseTTL: mc.LeaseTTL()}); err != nil {
			return nil, &FieldError{Key: "failover.witness", Msg: err.Error()}
		}
	case len(f.EtcdEndpoints) > 0:
		v, err := etcdlease.New(etcdlease.Config{Endpoints: f.EtcdEndpoints, LeaseTTL: mc.LeaseTTL()})
		if err != nil {
			return nil, &FieldError{Key: "failover.etcd-endpoints", Msg: err.Error()}
		}
		voter = v
	default:
		log.Warn().Msg("failover: no witness configured (failover.witness or failover.etcd-endpoints): two nodes cannot tell a dead peer from a cut link, so failover is confirm-only: the agent announces and waits for 'mirrord confirm' or 'mirrord promote --force'")
	}
	closeAll := func(paths []agent.Path) {
		for _, p := range paths {
			_ = p.Close()
		}
		if voter != nil {
			_ = voter.Close()
		}
	}
	chain, err := resource.Build(f.Resources, log)
	if err != nil {
		closeAll(nil)
		return nil, &FieldError{Key: "failover.resources", Msg: err.Error()}
	}
	paths := []agent.Path{agent.NewLinkPath(failover.PathReplication, vol)}
	for i, u := range f.UDP {
		p, err := agent.ListenUDP(udpPathName(i), u.Listen, u.Peer, func(path string, b []byte) { recv()(path, b) }, log)
		if err != nil {
			closeAll(paths)
			return nil, &FieldError{Key: "failover.udp", Msg: err.Error()}
		}
		paths = append(paths, p)
	}
	var res agent.Resources
	if len(f.Resources) > 0 {
		res = monitoredChain{chain}
	}
	res = dev.under(res)
	a, err := agent.New(agent.Config{
		Machine: mc, Volume: c.Volume.Name, Secret: secret, EpochFile: c.epochFile(),
		Voter: voter, Resources: res, Log: log, MonitorInterval: monitorInterval(f.MonitorInterval),
	}, vol, paths)
	if err != nil {
		closeAll(paths)
		return nil, err
	}
	log.Info().Str("mode", mc.Mode.String()).Bool("witness", mc.Witness).Strs("paths", mc.Paths).
		Dur("heartbeat", mc.HeartbeatInterval).Int("miss", mc.MissCount).Msg("failover agent configured")
	return a, nil
}

func (c *Config) epochFile() string {
	if c.Failover.EpochFile != "" {
		return c.Failover.EpochFile
	}
	return c.metaPath() + ".epoch"
}

const failoverPathReplication = failover.PathReplication

// atomicRecv hands received messages to the agent once it exists (the
// volume, which delivers the replication link's, is opened first).
type atomicRecv struct {
	p atomic.Pointer[func(string, []byte)]
}

func (r *atomicRecv) store(f func(string, []byte)) { r.p.Store(&f) }

func (r *atomicRecv) load() func(string, []byte) {
	if f := r.p.Load(); f != nil {
		return *f
	}
	return func(string, []byte) {}
}

// monitoredChain lets the agent check the running chain (resource.Chain
// reports errors; the agent's status shows them as text) and restart part
// of it (local recovery).
type monitoredChain struct{ *resource.Chain }

var (
	_ agent.Monitorer = monitoredChain{}
	_ agent.Recoverer = monitoredChain{}
	// The machine names the resource that failed to start.
	_ failover.ResourceNamer = (*resource.StartError)(nil)
)

func (c monitoredChain) Monitor(ctx context.Context) []agent.Health {
	var hs []agent.Health
	for _, h := range c.Chain.Monitor(ctx) {
		x := agent.Health{Name: h.Name}
		if h.Err != nil {
			x.Error = h.Err.Error()
		}
		hs = append(hs, x)
	}
	return hs
}

// monitorInterval maps the config's 0 (never) to the agent's "negative:
// never" (its 0 means the default).
func monitorInterval(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
