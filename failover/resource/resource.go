// Package resource owns what runs above a Primary volume: a floating IP, a
// mount, user scripts. The failover runner starts a Chain after a promotion
// and stops it before a demotion.
//
// A Chain starts its resources in order and stops them in reverse, each
// under its own timeout. A failed start stops again, in reverse, whatever
// had already started, and reports which resource failed and what was
// rolled back (a *StartError), so a half-started service never lingers.
// Stop carries on past a failure (a demotion wants everything down that can
// be) and reports every failure.
//
// # Configuration
//
// cmd/mirrord reads the chain from a list under failover.resources; each
// entry has a type and that type's keys (any other key is an error):
//
//	failover:
//	  resources:
//	    - {type: mount, device: /dev/nbd0, path: /srv, fstype: ext4, options: noatime}
//	    - {type: ip, address: 10.0.0.100/24, interface: eth0}
//	    - {type: script, path: /etc/mirrord/app.sh, timeout: 30s}
//
//	ip:     address (CIDR, IPv4 or IPv6), interface; arp-count (default 3),
//	        arp-interval (default 200ms): gratuitous ARPs (IPv4) or unsolicited
//	        neighbour advertisements (IPv6) sent after the address is added.
//	mount:  device, path, fstype; options (comma separated, as mount(8));
//	        lazy: detach a busy file system instead of failing the stop.
//	script: path, run as `path start|stop|monitor`; args (extra arguments
//	        after the action).
//	all:    name (default type:address/path), timeout (per action; default
//	        DefaultTimeout).
package resource

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Resource is one thing the chain starts and stops. The Chain calls one
// method at a time per resource; implementations need not be safe for
// concurrent use. Start and Stop must be idempotent: starting a running
// resource or stopping a stopped one succeeds (a runner retries after a
// crash without knowing what had been done).
type Resource interface {
	// Name identifies the resource in errors, logs and status.
	Name() string
	// Start brings the resource up; ctx carries its timeout.
	Start(ctx context.Context) error
	// Stop takes it down.
	Stop(ctx context.Context) error
	// Monitor is a cheap check that the resource looks alive; nil means it
	// does. It is called periodically while the chain runs.
	Monitor(ctx context.Context) error
}

// DefaultTimeout bounds each Start, Stop and Monitor unless the resource's
// spec sets one.
const DefaultTimeout = 30 * time.Second

// Errors.
var (
	// ErrTimeout: a resource did not finish an action within its timeout.
	// A mount(2) or a script may still complete after it.
	ErrTimeout = errors.New("resource timed out")
	// ErrSpec is wrapped by every configuration error; the message names
	// the entry and the field.
	ErrSpec = errors.New("resource spec")
	// ErrUnknown: Restart was given a name that is not in the chain.
	ErrUnknown = errors.New("no such resource in the chain")
)

// StartError reports a failed Chain.Start: which resource failed, and what
// was stopped again.
type StartError struct {
	// Resource is the name of the resource whose Start failed.
	Resource string
	Err      error
	// RolledBack names the resources stopped again, in the order stopped.
	RolledBack []string
	// RollbackErr joins the failures of that rollback (nil: all stopped);
	// a resource whose Stop failed may still be up.
	RollbackErr error
}

func (e *StartError) Error() string {
	var b strings.Builder
	b.WriteString(e.Err.Error()) // "start <name>: ..."
	if len(e.RolledBack) > 0 {
		fmt.Fprintf(&b, "; rolled back %s", strings.Join(e.RolledBack, ", "))
	} else {
		b.WriteString("; nothing to roll back")
	}
	if e.RollbackErr != nil {
		fmt.Fprintf(&b, "; ROLLBACK FAILED: %v", e.RollbackErr)
	}
	return b.String()
}

func (e *StartError) Unwrap() error { return e.Err }

// FailedResource names the resource whose start failed (the failover
// machine's ResourceNamer), for its decisions and status.
func (e *StartError) FailedResource() string { return e.Resource }

// Entry is a resource in a chain with its timeout.
type Entry struct {
	Resource Resource
	// Timeout bounds each action (DefaultTimeout if zero).
	Timeout time.Duration
}

// Chain starts resources in order and stops them in reverse. Its methods
// must not be called concurrently with each other, except Monitor.
type Chain struct {
	entries []Entry
	log     zerolog.Logger
}

// NewChain returns a chain of entries, started in the order given.
func NewChain(log zerolog.Logger, entries ...Entry) *Chain {
	for i := range entries {
		if entries[i].Timeout <= 0 {
			entries[i].Timeout = DefaultTimeout
		}
	}
	return &Chain{entries: entries, log: log}
}

// Names lists the resources in start order.
func (c *Chain) Names() []string {
	names := make([]string, len(c.entries))
	for i, e := range c.entries {
		names[i] = e.Resource.Name()
	}
	return names
}

// Start starts every resource in order. On the first failure it stops the
// ones already started, in reverse, and returns a *StartError.
func (c *Chain) Start(ctx context.Context) error {
	for i, e := range c.entries {
		start := time.Now()
		err := call(ctx, e, "start", e.Resource.Start)
		if err == nil {
			c.log.Info().Str("resource", e.Resource.Name()).Dur("took", time.Since(start)).Msg("resource started")
			continue
		}
		se := &StartError{Resource: e.Resource.Name(), Err: err}
		var errs []error
		// The failed one too: a start that timed out or failed halfway
		// may have left something behind, and Stop is idempotent.
		for j := i; j >= 0; j-- {
			r := c.entries[j]
			if err := call(context.WithoutCancel(ctx), r, "stop", r.Resource.Stop); err != nil {
				errs = append(errs, err)
			}
			if j < i {
				se.RolledBack = append(se.RolledBack, r.Resource.Name())
			}
		}
		se.RollbackErr = errors.Join(errs...)
		c.log.Error().Err(se).Msg("resource chain failed to start")
		return se
	}
	return nil
}

// Stop stops every resource in reverse order, carrying on past failures,
// and returns them joined.
func (c *Chain) Stop(ctx context.Context) error {
	var errs []error
	for i := len(c.entries) - 1; i >= 0; i-- {
		e := c.entries[i]
		if err := call(ctx, e, "stop", e.Resource.Stop); err != nil {
			c.log.Error().Err(err).Str("resource", e.Resource.Name()).Msg("resource failed to stop")
			errs = append(errs, err)
			continue
		}
		c.log.Info().Str("resource", e.Resource.Name()).Msg("resource stopped")
	}
	return errors.Join(errs...)
}

// Restart is local recovery: it stops the resource named from and every
// resource after it, in reverse, then starts them again in order, as Stop
// and Start would for that tail of the chain; the resources before from
// keep running. A failed stop is logged and the start tried anyway (Start
// is idempotent, and a resource that failed its check may fail its stop
// too); a failed start rolls the tail back and returns a *StartError.
func (c *Chain) Restart(ctx context.Context, from string) error {
	i := slices.IndexFunc(c.entries, func(e Entry) bool { return e.Resource.Name() == from })
	if i < 0 {
		return fmt.Errorf("restart %s: %w", from, ErrUnknown)
	}
	tail := &Chain{entries: c.entries[i:], log: c.log}
	if err := tail.Stop(ctx); err != nil {
		c.log.Warn().Err(err).Str("resource", from).Msg("local recovery: stop failed, starting anyway")
	}
	return tail.Start(ctx)
}

// Health is one resource's Monitor result.
type Health struct {
	Name string
	// Err is nil when the resource looks alive.
	Err error
}

// Monitor checks every resource, in order, for status.
func (c *Chain) Monitor(ctx context.Context) []Health {
	h := make([]Health, len(c.entries))
	for i, e := range c.entries {
		h[i] = Health{Name: e.Resource.Name(), Err: call(ctx, e, "monitor", e.Resource.Monitor)}
	}
	return h
}

// call runs one action under the entry's timeout. The action runs in its own
// goroutine so that one stuck in the kernel (a hung mount) cannot hold the
// runner past the timeout; it is left to finish on its own.
func call(ctx context.Context, e Entry, action string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, e.Timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- f(ctx) }()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
		return fmt.Errorf("%s %s: %w after %v", action, e.Resource.Name(), ErrTimeout, e.Timeout)
	}
	return fmt.Errorf("%s %s: %w", action, e.Resource.Name(), err)
}
