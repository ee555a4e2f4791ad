package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover/agent"
	"github.com/mirrord/mirrord/mirror"
	"github.com/mirrord/mirrord/nbd"
)

// shutdownGrace is how long in-flight requests get to finish on SIGTERM
// before connections are cut.
const shutdownGrace = 30 * time.Second

func cmdRun(args []string, stderr io.Writer) error {
	fs := newFlagSet("run")
	var cf configFlags
	cf.register(fs)
	path := fs.String("path", "", "backing file or block device (volume.path)")
	size := fs.String("size", "", "size when creating the backing file (volume.size)")
	listen := fs.StringSlice("listen", nil, "unix:/path or tcp:host:port, repeatable (nbd.listen)")
	keep := fs.Bool("keep-device", false, "on exit leave nbd.device attached for the next mirrord (an upgrade), even when nothing holds it")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	// The shortcut flags are --set in disguise, so they share its checks.
	if *path != "" {
		cf.set = append(cf.set, "volume.path="+*path)
	}
	if *size != "" {
		cf.set = append(cf.set, "volume.size="+*size)
	}
	if len(*listen) > 0 {
		cf.set = append(cf.set, "nbd.listen="+strings.Join(*listen, ","))
	}
	c, err := loadConfig(cf)
	if err != nil {
		return err
	}
	log := newLogger(c.Log, os.Stderr).With().Str("volume", c.Volume.Name).Logger()
	return run(c, log, *keep)
}

func run(c *Config, log zerolog.Logger, keepDevice bool) error {
	if err := os.MkdirAll(filepath.Dir(c.Volume.Path), 0o755); err != nil {
		return fmt.Errorf("volume.path: %w", err)
	}
	peer, err := c.mirrorPeer()
	if err != nil {
		return err
	}
	size := int64(c.Volume.Size)
	if _, err := os.Stat(c.Volume.Path); size == 0 && os.IsNotExist(err) {
		size = DefaultVolumeSize
	}
	var foRecv atomicRecv
	var fo *agent.Agent
	opts := mirror.Options{
		Name:       c.Volume.Name,
		Node:       c.Node.Name,
		Size:       size,
		RegionSize: int64(c.Volume.RegionSize),
		MetaPath:   c.metaPath(),
		ALExtents:  c.Volume.ALExtents,
		Peer:       peer,
		Log:        log,
	}
	if c.Failover.Enabled {
		// A promotion stays fenced until the agent knows this node is the
		// only Primary; in sync mode with a witness, writes are held the
		// moment replication drops, until the agent decides.
		opts.FencePromotions = true
		opts.HoldOnDisconnect = peer.Mode == mirror.ModeSync && (c.Failover.Witness != "" || len(c.Failover.EtcdEndpoints) > 0)
		opts.OnBeacon = func(b []byte) { foRecv.load()(failoverPathReplication, b) }
	}
	vol, err := mirror.Open(c.Volume.Path, opts)
	if err != nil {
		return err
	}
	srv, err := nbd.NewServer(log, nbd.Export{
		Name:        c.Volume.Name,
		Description: "mirrord volume " + c.Volume.Name,
		Device:      vol,
		ReadOnly:    c.NBD.ReadOnly,
	})
	if err != nil {
		_ = vol.Close()
		return err
	}
	srv.InflightBytes = int64(c.NBD.InflightBytes)
	srv.PollWindow = c.Node.BusyPoll
	// The kernel device is the agent's first resource (a mount above it
	// needs it), or follows the role by itself without an agent.
	kx := &kernelExport{srv: srv, vol: vol, cfg: c.NBD, name: c.Volume.Name, log: log}
	if c.Failover.Enabled {
		fo, err = newFailover(c, vol, peer.Secret, foRecv.load, kx, log)
		if err != nil {
			_ = vol.Close()
			return err
		}
		foRecv.store(fo.Receive)
		fo.Start()
		defer func() { _ = fo.Close() }()
	}

	var listeners []net.Listener
	for _, a := range c.NBD.Listen {
		l, err := listen(a)
		if err != nil {
			for _, l := range listeners {
				_ = l.Close()
			}
			_ = vol.Close()
			return fmt.Errorf("nbd.listen: %w", err)
		}
		listeners = append(listeners, l)
	}
	ctl, err := listenControl(c.Control.Socket)
	if err != nil {
		for _, l := range listeners {
			_ = l.Close()
		}
		_ = vol.Close()
		return fmt.Errorf("control.socket: %w", err)
	}
	cs := &controlServer{vol: vol, srv: srv, kx: kx, log: log, agent: fo}
	hs := &http.Server{Handler: cs.handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = hs.Serve(ctl) }()
	defer func() { _ = hs.Close() }()

	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { serveErr <- srv.Serve(l) }()
	}
	log.Info().Str("path", vol.Path()).Int64("size", vol.Size()).
		Strs("listen", c.NBD.Listen).Bool("read_only", c.NBD.ReadOnly).
		Str("role", vol.Role().String()).Str("control", c.Control.Socket).
		Str("version", version).Msg("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	var runErr error
	stopFollow := func() {}
	if fo == nil {
		stopFollow = kx.follow()
	}
	if err := kx.attach(); err != nil {
		runErr = err
		log.Error().Err(err).Msg("kernel device attach failed, shutting down")
	} else {
		select {
		case s := <-sig:
			log.Info().Str("signal", s.String()).Msg("shutting down")
		case err := <-serveErr:
			runErr = fmt.Errorf("serve: %w", err)
			log.Error().Err(err).Msg("listener failed, shutting down")
		}
	}
	if fo != nil && c.Failover.StopResourcesOnExit {
		// While the volume, its NBD server and the device still serve:
		// an unmount writes, and the floating IP must be gone before
		// the service is. The device itself is left to kx.stop below,
		// which keeps it attached while in use or with --keep-device.
		kx.exiting.Store(true)
		ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		if err := fo.StopResourcesOnExit(ctx); err != nil {
			runErr = errors.Join(runErr, fmt.Errorf("stopping the resources on exit: %w", err))
		}
		cancel()
	}
	stopFollow()
	kx.stop(keepDevice)
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		runErr = errors.Join(runErr, err)
	}
	if fo != nil {
		// The agent stops before the volume it drives.
		if err := fo.Close(); err != nil {
			runErr = errors.Join(runErr, err)
		}
	}
	if err := vol.Close(); err != nil {
		runErr = errors.Join(runErr, err)
	}
	if runErr == nil {
		log.Info().Msg("stopped cleanly")
	}
	return runErr
}

// listen opens one listener. A unix socket left behind by a process that
// died is removed; one that still answers is in use and refused.
func listen(a string) (net.Listener, error) {
	network, addr, err := parseListen(a)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o755); err != nil {
			return nil, err
		}
		if _, err := os.Stat(addr); err == nil {
			if c, err := net.DialTimeout("unix", addr, time.Second); err == nil {
				_ = c.Close()
				return nil, fmt.Errorf("%s: another server is listening there", addr)
			}
			_ = os.Remove(addr)
		}
	}
	return net.Listen(network, addr)
}
