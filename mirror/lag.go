package mirror

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// LagPolicy is what a Primary does when its async peer falls further
// behind than PeerConfig.MaxLagBytes or MaxLagTime.
type LagPolicy uint8

// Lag policies.
const (
	// LagAlert only reports crossing the bound: a "lag" event and a log
	// line, each way.
	LagAlert LagPolicy = iota
	// LagThrottle delays new writes in proportion to the lag, from half
	// the bound (no delay) to the bound (MaxThrottleDelay per write), so
	// that the application slows to what the link carries.
	LagThrottle
	// LagBlock holds new writes while the lag is over the bound (the RPO
	// is a hard limit; availability pays for it).
	LagBlock
)

func (p LagPolicy) String() string {
	switch p {
	case LagThrottle:
		return "throttle"
	case LagBlock:
		return "block"
	}
	return "alert"
}

// ParseLagPolicy reads "alert", "throttle" or "block".
func ParseLagPolicy(s string) (LagPolicy, error) {
	for _, p := range []LagPolicy{LagAlert, LagThrottle, LagBlock} {
		if p.String() == s {
			return p, nil
		}
	}
	return 0, fmt.Errorf("lag policy %q: want alert, throttle or block", s)
}

const (
	// MaxThrottleDelay is the delay per write at the lag bound under
	// LagThrottle: 50 ms lets 20 writes a second through per client queue
	// slot, well below any link's rate, without stalling the client.
	MaxThrottleDelay = 50 * time.Millisecond
	// throttleFrom is the fraction of the bound where throttling starts.
	throttleFrom = 0.5
	// lagSample is how often a bounded link samples its lag, to report
	// crossings and to wake blocked writers.
	lagSample = 20 * time.Millisecond
)

// lagGuard applies the lag policy.
type lagGuard struct {
	mu      sync.Mutex
	cond    sync.Cond
	over    bool
	stopped bool
	alerts  atomic.Uint64 // times the bound was crossed
}

func (l *link) bounded() bool { return l.cfg.MaxLagBytes > 0 || l.cfg.MaxLagTime > 0 }

// holds reports that writes may wait on the lag policy (so they are not
// purely local).
func (l *link) holds() bool { return l.bounded() && l.cfg.LagPolicy != LagAlert }

func (l *link) lagRatio(bytes int64, age time.Duration) float64 {
	r := 0.0
	if l.cfg.MaxLagBytes > 0 {
		r = max(r, float64(bytes)/float64(l.cfg.MaxLagBytes))
	}
	if l.cfg.MaxLagTime > 0 {
		r = max(r, float64(age)/float64(l.cfg.MaxLagTime))
	}
	return r
}

func (l *link) lagLoop() {
	defer l.wg.Done()
	t := time.NewTicker(lagSample)
	defer t.Stop()
	for {
		select {
		case <-l.quit:
			g := &l.lagG
			g.mu.Lock()
			g.stopped = true
			g.cond.Broadcast()
			g.mu.Unlock()
			return
		case <-t.C:
		}
		l.sampleLag()
	}
}

// sampleLag updates the policy's view and reports crossings of the bound.
func (l *link) sampleLag() {
	bytes, age := l.v.Lag()
	r := l.lagRatio(bytes, age)
	g := &l.lagG
	over := r > 1
	g.mu.Lock()
	changed := over != g.over
	g.over = over
	g.cond.Broadcast()
	g.mu.Unlock()
	if !changed {
		return
	}
	ev := l.log.Info()
	msg := "replication lag back within the bound"
	if over {
		g.alerts.Add(1)
		ev = l.log.Warn()
		msg = "replication lag over the bound"
	}
	ev.Int64("lag_bytes", bytes).Dur("lag", age).Int64("max_lag_bytes", l.cfg.MaxLagBytes).
		Dur("max_lag", l.cfg.MaxLagTime).Str("policy", l.cfg.LagPolicy.String()).Msg(msg)
	l.v.ev.emit("lag", l.v.Status())
}

// holdForLag applies the throttle or block policy to a new write. It runs
// before the write takes any lock, so that a held write stalls nothing
// but itself (and Close still gets through). The lag is computed afresh
// (a few mutexes, no scan): a sample could let a burst far past the bound.
func (l *link) holdForLag() {
	if !l.holds() {
		return
	}
	ratio := func() float64 { return l.lagRatio(l.v.Lag()) }
	switch l.cfg.LagPolicy {
	case LagThrottle:
		r := ratio()
		if r <= throttleFrom {
			return
		}
		d := time.Duration(float64(MaxThrottleDelay) * min(1, (r-throttleFrom)/(1-throttleFrom)))
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-l.quit:
		}
	case LagBlock:
		g := &l.lagG
		g.mu.Lock()
		// The sampler broadcasts every lagSample.
		for !g.stopped && ratio() > 1 {
			g.cond.Wait()
		}
		g.mu.Unlock()
	}
}

func (l *link) lagOver() bool {
	g := &l.lagG
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.over
}
