package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/agent"
)

// peerSet is a valid peer for the failover section to build on.
var peerSet = []string{"node.name=a", "peer.node=b", "peer.address=h:1", "peer.secret=s", "failover.enabled=true"}

func TestFailoverConfigErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		file string
		set  []string
		want string
	}{
		{name: "no peer", set: []string{"failover.enabled=true"}, want: "failover.enabled"},
		{name: "mode", set: []string{"failover.mode=sometimes"}, want: "failover.mode"},
		{name: "profile", set: []string{"failover.profile=moon"}, want: "failover.profile"},
		{name: "fencing", set: []string{"failover.fencing=pray"}, want: "failover.fencing"},
		{name: "failback", set: []string{"failover.failback=later"}, want: "failover.failback"},
		{name: "failback window", set: []string{"failover.failback=window", "failover.failback-window=night"}, want: "failover.failback-window"},
		{name: "confirm default", set: []string{"failover.confirm-default=maybe"}, want: "failover.confirm-default"},
		{name: "miss count", set: []string{"failover.miss-count=2"}, want: "MissCount"},
		{name: "udp path", set: []string{"failover.udp=10.0.0.1:1"}, want: "LISTEN->PEER"},
		{name: "witness address", set: []string{"failover.witness=nowhere", "failover.witness-secret-file=/x"}, want: "failover.witness"},
		{name: "witness secret", set: []string{"failover.witness=h:1"}, want: "failover.witness-secret-file"},
		{name: "witness and etcd", set: []string{"failover.witness=h:1", "failover.witness-secret-file=/x", "failover.etcd-endpoints=http://e:2379"}, want: "not both"},
		{name: "unknown key", file: "failover:\n  enabeld: true\n", want: `"failover.enabeld"`},
		{name: "local recovery", set: []string{"failover.local-recovery=-1"}, want: "failover.local-recovery"},
		{name: "handover hold", set: []string{"failover.handover-hold=0s"}, want: "failover.handover-hold"},
		{name: "resource type", file: "failover:\n  resources:\n    - {type: teleport}\n", want: "failover.resources"},
		{name: "resource unknown key", file: "failover:\n  resources:\n    - {type: ip, address: 10.0.0.9/24, interface: eth0, colour: red}\n", want: "colour"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cf := configFlags{set: append(append([]string{}, peerSet...), tc.set...)}
			if tc.name == "no peer" {
				cf.set = tc.set
			}
			if tc.file != "" {
				cf.file = writeConfig(t, tc.file)
			}
			_, err := loadConfig(cf)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}

func TestFailoverConfigConverts(t *testing.T) {
	file := writeConfig(t, `failover:
  mode: confirm
  profile: wan
  udp: ["10.1.0.1:7790->10.1.0.2:7790", "10.2.0.1:7790->10.2.0.2:7790"]
  fencing: error
  failback: window
  failback-window: 22-06
  max-async-lag: 1MiB
  resources:
    - {type: ip, address: 10.0.0.100/24, interface: eth0}
`)
	c, err := loadConfig(configFlags{file: file, set: peerSet})
	if err != nil {
		t.Fatal(err)
	}
	var errs []error
	mc := c.machineConfig(func(key, format string, a ...any) { errs = append(errs, errors.New(key)) })
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	want := failover.DefaultWAN()
	if mc.Mode != failover.ModeConfirm || mc.HeartbeatInterval != want.HeartbeatInterval || mc.MissCount != want.MissCount ||
		mc.Fencing != failover.FenceError || mc.Failback.Policy != failover.FailbackWindow || mc.Failback.StartHour != 22 ||
		mc.Failback.EndHour != 6 || mc.MaxAsyncLagBytes != 1<<20 || mc.Witness || mc.Node != "a" || mc.Peer != "b" {
		t.Fatalf("machine config: %+v", mc)
	}
	if strings.Join(mc.Paths, ",") != "replication,udp,udp2" || c.Failover.UDP[1].Peer != "10.2.0.2:7790" {
		t.Fatalf("paths %v, udp %+v", mc.Paths, c.Failover.UDP)
	}
	if len(c.Failover.Resources) != 1 || c.Failover.Resources[0].Address != "10.0.0.100/24" {
		t.Fatalf("resources: %+v", c.Failover.Resources)
	}
	if _, err := failover.New(mc, failover.HardState{}, time.Time{}); err != nil {
		t.Fatal(err)
	}
	// A shorter interval re-derives the ticks from it.
	c2, err := loadConfig(configFlags{set: append(append([]string{}, peerSet...), "failover.heartbeat-interval=200ms", "failover.miss-count=5")})
	if err != nil {
		t.Fatal(err)
	}
	mc2 := c2.machineConfig(func(string, string, ...any) { t.Fatal("unexpected error") })
	if mc2.HeartbeatInterval != 200*time.Millisecond || mc2.MissCount != 5 || mc2.DetectTimeout() != time.Second {
		t.Fatalf("custom timers: %+v", mc2)
	}
}

// failover.local-recovery: default 1, 0 is none (the machine's negative),
// more is more; failover.stop-resources-on-exit: default true.
func TestFailoverResourceKeys(t *testing.T) {
	for _, tc := range []struct {
		set     []string
		machine int
		onExit  bool
	}{
		{nil, 1, true},
		{[]string{"failover.local-recovery=0", "failover.stop-resources-on-exit=false"}, -1, false},
		{[]string{"failover.local-recovery=3"}, 3, true},
	} {
		c, err := loadConfig(configFlags{set: append(append([]string{}, peerSet...), tc.set...)})
		if err != nil {
			t.Fatal(err)
		}
		mc := c.machineConfig(func(key, format string, a ...any) { t.Fatalf("%s: "+format, append([]any{key}, a...)...) })
		if mc.StartRetryInterval != agent.DefaultMonitorInterval || mc.HandoverHold != failover.DefaultHandoverHold {
			t.Errorf("%v: machine StartRetryInterval %v, HandoverHold %v: want the monitor interval and the default hold", tc.set, mc.StartRetryInterval, mc.HandoverHold)
		}
		if mc.LocalRecovery != tc.machine || c.Failover.StopResourcesOnExit != tc.onExit {
			t.Errorf("%v: machine LocalRecovery %d (want %d), stop-resources-on-exit %v (want %v)", tc.set, mc.LocalRecovery, tc.machine, c.Failover.StopResourcesOnExit, tc.onExit)
		}
	}
}

func TestHumanFailoverStatus(t *testing.T) {
	r := agent.Report{Witness: true}
	r.Mode, r.Epoch, r.Fenced = failover.ModeAuto, 3, true
	r.Quorum = failover.QuorumStatus{Configured: true, Answered: true, Holder: "b", Epoch: 4}
	r.Peer.Node, r.Peer.State = "b", failover.Lost
	r.Peer.Paths = []failover.PathStatus{{Name: "udp", State: failover.Lost, Silent: 2 * time.Second}}
	r.Intent = &failover.Intent{Want: "promote", Reason: "peer lost"}
	r.History = []failover.Decision{{Kind: failover.KindFence, Acted: true, Cause: "fenced (suspend): lost quorum"}}
	r.ResourceFailure = &failover.ResourceFailure{Resource: "app", Error: "monitor app: exit status 1", Recoveries: 1, MaxRecoveries: 1, Recovering: true}
	got := humanFailover(viewFailover(r))
	for _, want := range []string{"mode:auto epoch:3 FENCED", "holder:b", "path udp: lost (silent 2000ms)", "INTENT: promote", "fence (acted): fenced (suspend): lost quorum",
		"RESOURCE FAILED: app since", ": monitor app: exit status 1; local recoveries 1 of 1; local recovery running"} {
		if !strings.Contains(got, want) {
			t.Errorf("human failover status lacks %q:\n%s", want, got)
		}
	}
	// A chain that failed to start and is retried.
	r.ResourceFailure = &failover.ResourceFailure{Resource: "app", Error: "start app: exit status 3", Recoveries: 1, MaxRecoveries: 1,
		Down: true, Retries: 2, NextRetry: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	got = humanFailover(viewFailover(r))
	if want := "RESOURCE FAILED: app since 0001-01-01T00:00:00Z: start app: exit status 3; local recoveries 1 of 1; the resources are DOWN (failed to start); 2 retries, the next at 2026-01-02T03:04:05Z"; !strings.Contains(got, want) {
		t.Errorf("human failover status lacks %q:\n%s", want, got)
	}
	// While a retry runs the chain is still down.
	r.ResourceFailure.Recovering, r.ResourceFailure.Retries = true, 3
	got = humanFailover(viewFailover(r))
	if want := "local recoveries 1 of 1; the resources are DOWN (failed to start); retry 3 running"; !strings.Contains(got, want) {
		t.Errorf("human failover status lacks %q:\n%s", want, got)
	}
}
