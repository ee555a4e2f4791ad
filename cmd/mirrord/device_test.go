package main

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/mirrord/mirrord/nbd"
)

func TestDeviceConfig(t *testing.T) {
	c, err := loadConfig(configFlags{set: []string{"node.name=a", "nbd.device=/dev/nbd3", "nbd.device-dead-timeout=90s"}})
	if err != nil {
		t.Fatal(err)
	}
	if c.NBD.Device != "/dev/nbd3" || c.NBD.DeviceDeadTimeout != 90*time.Second ||
		c.NBD.DeviceConnections != DefaultDeviceConnections || c.NBD.DeviceTimeout != DefaultDeviceTimeout || c.NBD.DeviceInterface != "auto" {
		t.Fatalf("device config %+v", c.NBD)
	}
	for _, tc := range []struct{ set, key string }{
		{"nbd.device=/dev/sda", "nbd.device"},
		{"nbd.device=/dev/nbd-1", "nbd.device"},
		{"nbd.device=nbd0", "nbd.device"},
		{"nbd.device-connections=0", "nbd.device-connections"},
		{"nbd.device-timeout=500ms", "nbd.device-timeout"},
		{"nbd.device-dead-timeout=-1s", "nbd.device-dead-timeout"},
		{"nbd.device-interface=sysfs", "nbd.device-interface"},
	} {
		_, err := loadConfig(configFlags{set: []string{"node.name=a", tc.set}})
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Key != tc.key {
			t.Errorf("--set %s: %v; want an error naming %s", tc.set, err, tc.key)
		}
	}
}

func TestDeviceIndex(t *testing.T) {
	for in, want := range map[string]int{"auto": nbd.AnyDevice, "/dev/nbd0": 0, "/dev/nbd15": 15} {
		if got, err := deviceIndex(in); err != nil || got != want {
			t.Errorf("deviceIndex(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
}

// TestMinProcsForKernel: attaching gives a P per kernel connection on top
// of one per CPU, never fewer Ps than there were, and leaves an explicit
// GOMAXPROCS alone.
func TestMinProcsForKernel(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	t.Setenv("GOMAXPROCS", "")
	minProcsForKernel(4)
	if got, want := runtime.GOMAXPROCS(0), runtime.NumCPU()+4; got != want {
		t.Fatalf("GOMAXPROCS %d after attaching 4 connections, want %d", got, want)
	}
	runtime.GOMAXPROCS(runtime.NumCPU() + 10)
	minProcsForKernel(4)
	if got, want := runtime.GOMAXPROCS(0), runtime.NumCPU()+10; got != want {
		t.Fatalf("GOMAXPROCS %d, want it kept at %d", got, want)
	}
	t.Setenv("GOMAXPROCS", "1")
	runtime.GOMAXPROCS(1)
	minProcsForKernel(4)
	if got := runtime.GOMAXPROCS(0); got != 1 {
		t.Fatalf("GOMAXPROCS %d with GOMAXPROCS=1 in the environment, want 1", got)
	}
}
