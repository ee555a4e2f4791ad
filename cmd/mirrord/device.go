package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover/agent"
	"github.com/mirrord/mirrord/mirror"
	"github.com/mirrord/mirrord/nbd"
)

// The volume as a kernel block device (nbd.device): attached while this
// node is Primary, detached on demotion (refused while mounted), and left
// attached across a restart of mirrord so a mounted file system never
// notices one.

// Defaults for the nbd.device-* keys.
const (
	DefaultDeviceConnections = nbd.DefaultKernelConnections
	DefaultDeviceTimeout     = nbd.DefaultKernelTimeout
	DefaultDeviceDeadTimeout = nbd.DefaultDeadConnTimeout
)

func setDeviceDefaults(set func(key string, value any)) {
	set("nbd.device", "")
	set("nbd.device-connections", DefaultDeviceConnections)
	set("nbd.device-timeout", DefaultDeviceTimeout.String())
	set("nbd.device-dead-timeout", DefaultDeviceDeadTimeout.String())
	set("nbd.device-interface", "auto")
}

// deviceIndex parses nbd.device: "/dev/nbdN" or "auto".
func deviceIndex(dev string) (int, error) {
	if dev == "auto" {
		return nbd.AnyDevice, nil
	}
	n, ok := strings.CutPrefix(dev, "/dev/nbd")
	i, err := strconv.Atoi(n)
	if !ok || err != nil || i < 0 {
		return 0, fmt.Errorf("want /dev/nbdN, auto or empty (got %q)", dev)
	}
	return i, nil
}

func (c *Config) validateDevice(bad func(key, format string, a ...any)) {
	n := &c.NBD
	if n.Device != "" {
		if _, err := deviceIndex(n.Device); err != nil {
			bad("nbd.device", "%v", err)
		}
	}
	if n.DeviceConnections < 1 || n.DeviceConnections > 64 {
		bad("nbd.device-connections", "must be from 1 to 64 (got %d)", n.DeviceConnections)
	}
	if n.DeviceTimeout < time.Second {
		bad("nbd.device-timeout", "must be at least 1s, the kernel counts whole seconds (got %v)", n.DeviceTimeout)
	}
	if n.DeviceDeadTimeout < 0 {
		bad("nbd.device-dead-timeout", "must not be negative (got %v)", n.DeviceDeadTimeout)
	}
	switch n.DeviceInterface {
	case "auto", "netlink", "ioctl":
	default:
		bad("nbd.device-interface", "must be auto, netlink or ioctl (got %q)", n.DeviceInterface)
	}
}

// kernelExport owns the kernel device of one volume. Its methods are safe
// for concurrent use (control requests, shutdown); with nbd.device empty
// they do nothing.
type kernelExport struct {
	srv  *nbd.Server
	vol  *mirror.Volume
	cfg  NBDConfig
	name string
	log  zerolog.Logger

	mu  sync.Mutex
	dev *nbd.KernelDevice
	// parked: detached on the way to a demotion; follow must not attach
	// again on a Primary event that races the demotion. Cleared once the
	// volume is seen Secondary, or by an explicit attach.
	parked bool
	// exiting: mirrord is stopping; the resources' stop on exit leaves
	// the device to stop, which keeps it attached when it is in use
	// (mounted by hand) or with --keep-device.
	exiting atomic.Bool
}

// deviceStatus is the "device" part of GET /status.
type deviceStatus struct {
	Path       string `json:"path"`
	Interface  string `json:"interface"`
	Reattached bool   `json:"reattached"`
	Connected  bool   `json:"connected"`
}

// attach exposes the volume as a block device if configured and Primary.
func (k *kernelExport) attach() error {
	if k == nil || k.cfg.Device == "" || k.vol.Role() != mirror.RolePrimary {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.parked = false
	return k.attachLocked()
}

func (k *kernelExport) attachLocked() error {
	if k.dev != nil {
		return nil
	}
	minProcsForKernel(k.cfg.DeviceConnections)
	idx, _ := deviceIndex(k.cfg.Device) // validated with the config
	iface := k.cfg.DeviceInterface
	if iface == "auto" {
		iface = nbd.InterfaceAuto
	}
	dev, err := k.srv.AttachKernel(k.name, nbd.KernelOptions{
		Index:           idx,
		Connections:     k.cfg.DeviceConnections,
		Timeout:         k.cfg.DeviceTimeout,
		DeadConnTimeout: k.cfg.DeviceDeadTimeout,
		Backend:         "mirrord:" + k.name,
		Interface:       iface,
	})
	if err != nil {
		return fmt.Errorf("nbd.device %s: %w", k.cfg.Device, err)
	}
	k.dev = dev
	return nil
}

// minProcsForKernel gives the Go scheduler a P per kernel connection on top
// of one per CPU, unless GOMAXPROCS was set. The kernel's connections are
// read with blocking read(2) on their own threads, and a thread blocked in
// a syscall keeps its P until sysmon takes it back: with fewer Ps than
// busy connections, a request that arrives on the others, or a handler
// goroutine, waits for sysmon (20 us to 10 ms). With one P on a
// single-CPU VM sysmon took it back on every request (QD1 writes at
// 800-1700 IOPS against 2200-2500 with two Ps); with five rather than two,
// 1 MiB writes cost 36-51 against 51-92 context switches each there.
func minProcsForKernel(conns int) {
	if want := runtime.NumCPU() + conns; os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
}

// follow attaches the device whenever the volume becomes Primary, whoever
// promoted it (the control API, the failover agent), until the returned
// stop is called. Detaching is not automatic: a demotion must refuse while
// the device is mounted, so whoever demotes calls detach first.
func (k *kernelExport) follow() (stop func()) {
	if k == nil || k.cfg.Device == "" {
		return func() {}
	}
	ch, cancel := k.vol.Subscribe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for e := range ch {
			k.mu.Lock()
			var err error
			switch {
			case e.Status.Role != mirror.RolePrimary.String():
				k.parked = false
			case !k.parked:
				err = k.attachLocked()
			}
			k.mu.Unlock()
			if err != nil {
				k.log.Error().Err(err).Msg("kernel device attach on promotion failed")
			}
		}
	}()
	return func() { cancel(); <-done }
}

// detach takes the device away, refusing while it is mounted or held.
func (k *kernelExport) detach() error {
	if k == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dev == nil {
		return nil
	}
	if err := k.dev.Detach(); err != nil {
		if errors.Is(err, nbd.ErrDeviceInUse) {
			return fmt.Errorf("%w: unmount it (or stop its user) first", err)
		}
		return err
	}
	k.dev, k.parked = nil, true
	return nil
}

// stop is the device's part of shutting down. Unless keep is set it is
// detached; if it is in use it stays attached whatever keep says, and the
// kernel holds its I/O for nbd.device-dead-timeout, waiting for the next
// mirrord to take it over.
func (k *kernelExport) stop(keep bool) {
	dev := k.current()
	if dev == nil {
		return
	}
	if !keep {
		err := k.detach()
		if err == nil {
			return
		}
		if !errors.Is(err, nbd.ErrDeviceInUse) {
			k.log.Error().Err(err).Str("device", dev.Path()).Msg("detach failed")
			return
		}
		k.log.Warn().Err(err).Msg("device in use: leaving it attached")
	}
	if dev.Interface() == nbd.InterfaceIoctl {
		// NBD_DO_IT ends with this process and the kernel then clears
		// the device: only netlink lets a device outlive its server.
		k.log.Error().Str("device", dev.Path()).Msg("device in use on the ioctl interface: its I/O fails once mirrord exits (restarts need the netlink interface)")
		return
	}
	k.log.Warn().Str("device", dev.Path()).Dur("dead_timeout", k.cfg.DeviceDeadTimeout).
		Msg("device left attached: the kernel holds its I/O until mirrord is started again within the dead timeout")
}

// under puts the kernel device beneath the failover agent's resources:
// attached before they start (a mount resource needs it), detached after
// they stop (refused while something still holds it). Without nbd.device
// it returns rest unchanged.
func (k *kernelExport) under(rest agent.Resources) agent.Resources {
	if k == nil || k.cfg.Device == "" {
		return rest
	}
	return deviceResources{k: k, rest: rest}
}

type deviceResources struct {
	k    *kernelExport
	rest agent.Resources // nil: none configured
}

func (d deviceResources) Start(ctx context.Context) error {
	if err := d.k.attach(); err != nil {
		return err
	}
	if d.rest == nil {
		return nil
	}
	return d.rest.Start(ctx)
}

func (d deviceResources) Stop(ctx context.Context) error {
	if d.rest != nil {
		if err := d.rest.Stop(ctx); err != nil {
			return err
		}
	}
	if d.k.exiting.Load() {
		return nil
	}
	return d.k.detach()
}

// Restart restarts part of the resources above the device (local
// recovery); the device itself is never restarted in place: it is not
// checked, and detaching it would take the whole chain down.
func (d deviceResources) Restart(ctx context.Context, from string) error {
	if r, ok := d.rest.(agent.Recoverer); ok {
		return r.Restart(ctx, from)
	}
	return agent.ErrNoRecovery
}

// Monitor checks the resources above the device (the attach itself is
// watched by the kernel's dead-connection timeout).
func (d deviceResources) Monitor(ctx context.Context) []agent.Health {
	if m, ok := d.rest.(agent.Monitorer); ok {
		return m.Monitor(ctx)
	}
	return nil
}

// current is the attached device, or nil.
func (k *kernelExport) current() *nbd.KernelDevice {
	if k == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.dev
}

func (k *kernelExport) status() *deviceStatus {
	dev := k.current()
	if dev == nil {
		return nil
	}
	st, err := dev.Status()
	return &deviceStatus{
		Path: dev.Path(), Interface: dev.Interface(),
		Reattached: dev.Reattached(), Connected: err == nil && st.Connected,
	}
}
