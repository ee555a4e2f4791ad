package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/agent"
	"github.com/mirrord/mirrord/mirror"
	"github.com/mirrord/mirrord/nbd"
)

// The control API is HTTP over a unix socket (root-only by its mode): the
// CLI's status, events, promote, demote, verify, connect, disconnect and
// discard-my-data all go through it.

// statusReply is GET /status.
type statusReply struct {
	mirror.Status
	NBD    nbd.Stats     `json:"nbd"`
	Device *deviceStatus `json:"device,omitempty"`
	// Failover is the agent's state (absent when failover is off).
	Failover *failoverView `json:"failover,omitempty"`
}

type controlServer struct {
	vol   *mirror.Volume
	srv   *nbd.Server
	kx    *kernelExport
	log   zerolog.Logger
	agent *agent.Agent // nil: failover off
}

func (c *controlServer) status() statusReply {
	st := statusReply{Status: c.vol.Status(), NBD: c.srv.Stats(), Device: c.kx.status()}
	if c.agent != nil {
		st.Failover = viewFailover(c.agent.Status())
	}
	return st
}

func (c *controlServer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, c.status())
	})
	c.failoverHandlers(mux)
	mux.HandleFunc("GET /events", c.events)
	mux.HandleFunc("POST /promote", func(w http.ResponseWriter, r *http.Request) {
		force := r.URL.Query().Get("force") == "1"
		if force && c.agent != nil {
			// The panic button goes through the agent, which knows what
			// may be lost and refuses without the acknowledgement.
			c.failoverCommand(w, "promote --force", failover.ForcePromote{AcceptDataLoss: r.URL.Query().Get("accept-data-loss") == "1"})
			return
		}
		err := c.vol.Promote(mirror.PromoteOptions{Force: force})
		switch {
		case err != nil:
		case c.agent != nil:
			// The agent unfences once it knows this node is the only
			// Primary; the resources (the kernel device first) come up now.
			err = c.agent.Resources(r.Context(), true)
		default:
			err = c.kx.attach()
		}
		c.act(w, "promote", err)
	})
	mux.HandleFunc("POST /demote", func(w http.ResponseWriter, r *http.Request) {
		// The resources go first (the mount, then the device, which
		// refuses while still mounted): a Secondary's device would fail
		// every write, and one in use must keep its Primary.
		if c.agent != nil {
			if err := c.agent.Resources(r.Context(), false); err != nil {
				c.act(w, "demote", err)
				return
			}
		} else if err := c.kx.detach(); err != nil {
			c.act(w, "demote", err)
			return
		}
		err := c.vol.Demote()
		if err != nil && c.agent == nil {
			// Still Primary (a standalone volume, say): expose it again.
			err = errors.Join(err, c.kx.attach())
		}
		c.act(w, "demote", err)
	})
	mux.HandleFunc("POST /connect", func(w http.ResponseWriter, r *http.Request) {
		c.vol.Connect()
		c.act(w, "connect", nil)
	})
	mux.HandleFunc("POST /disconnect", func(w http.ResponseWriter, r *http.Request) {
		c.vol.Disconnect()
		c.act(w, "disconnect", nil)
	})
	mux.HandleFunc("POST /discard-my-data", func(w http.ResponseWriter, r *http.Request) {
		c.act(w, "discard-my-data", c.vol.DiscardMyData())
	})
	mux.HandleFunc("POST /verify", c.verify)
	mux.HandleFunc("POST /set", c.set)
	// Profiling for operators and benchmarks; the socket is root-only.
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	return mux
}

func (c *controlServer) act(w http.ResponseWriter, what string, err error) {
	if err != nil {
		c.log.Warn().Err(err).Str("command", what).Msg("control command refused")
		writeJSON(w, http.StatusConflict, map[string]string{"error": err.Error()})
		return
	}
	c.log.Info().Str("command", what).Msg("control command done")
	writeJSON(w, http.StatusOK, c.vol.Status())
}

// runtimeKeys are the config keys `mirrord set` changes in a running daemon.
var runtimeKeys = []string{"peer.rate-limit", "peer.resync-share"}

// set changes one runtime key: POST /set?key=K&value=V.
func (c *controlServer) set(w http.ResponseWriter, r *http.Request) {
	key, val := r.URL.Query().Get("key"), r.URL.Query().Get("value")
	st := c.vol.Status()
	if st.Peer == nil {
		c.act(w, "set "+key, mirror.ErrNoPeer)
		return
	}
	limit, share := st.Peer.Transport.RateLimit, st.Peer.Transport.ResyncShare
	var err error
	switch key {
	case "peer.rate-limit":
		limit, err = ParseRate(val)
	case "peer.resync-share":
		share, err = ParsePercent(val)
		if err == nil && share == 0 {
			err = fmt.Errorf("peer.resync-share: must be at least 1%%")
		}
	default:
		err = fmt.Errorf("%w: %q cannot be changed at runtime (only %s)", errUsage, key, strings.Join(runtimeKeys, ", "))
	}
	if err == nil {
		err = c.vol.SetPeerRateLimit(limit, share)
	}
	c.act(w, "set "+key+"="+val, err)
}

// events streams state changes as JSON lines, starting with the current
// state.
func (c *controlServer) events(w http.ResponseWriter, r *http.Request) {
	ch, cancel := c.vol.Subscribe()
	defer cancel()
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	fl, _ := w.(http.Flusher)
	_ = enc.Encode(mirror.Event{Time: time.Now().UTC(), Type: "exists", Status: c.vol.Status()})
	if fl != nil {
		fl.Flush()
	}
	var decisions <-chan failover.Decision
	if c.agent != nil {
		d, cancel := c.agent.Subscribe()
		defer cancel()
		decisions = d
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case d, ok := <-decisions:
			if !ok {
				decisions = nil
				continue
			}
			if enc.Encode(failoverEvent{Time: d.At.UTC(), Type: "failover", Decision: decisionJSON(d)}) != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		case e, ok := <-ch:
			if !ok {
				return
			}
			if enc.Encode(e) != nil {
				return
			}
			if fl != nil {
				fl.Flush()
			}
		}
	}
}

// verify streams progress lines, then the result.
func (c *controlServer) verify(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	fl, _ := w.(http.Flusher)
	last := time.Now()
	res, err := c.vol.Verify(r.Context(), func(done, total int64) {
		if time.Since(last) < time.Second {
			return
		}
		last = time.Now()
		_ = enc.Encode(map[string]any{"progress": 100 * float64(done) / float64(total)})
		if fl != nil {
			fl.Flush()
		}
	})
	if err != nil {
		_ = enc.Encode(map[string]string{"error": err.Error()})
		return
	}
	c.log.Info().Int64("checked_bytes", res.CheckedBytes).Int64("mismatched_bytes", res.MismatchedBytes).Msg("verify done")
	_ = enc.Encode(map[string]any{"result": res})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// listenControl opens the control socket, replacing a stale one.
func listenControl(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("%s: another mirrord is running there", path)
		}
		_ = os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = l.Close()
		return nil, err
	}
	return l, nil
}

// controlClient talks to a running mirrord.
type controlClient struct {
	socket string
	http   *http.Client
}

func newControlClient(socket string) *controlClient {
	return &controlClient{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

func (c *controlClient) do(method, path string) (*http.Response, error) {
	req, err := http.NewRequest(method, "http://mirrord"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("is mirrord running? control socket %s: %w", c.socket, err)
	}
	return resp, nil
}

// call performs a request and decodes a JSON reply; a refusal becomes an
// error carrying the daemon's message.
func (c *controlClient) call(method, path string, out any) error {
	resp, err := c.do(method, path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s %s: %s", method, path, strings.TrimSpace(string(body)))
	}
	if out != nil {
		return json.Unmarshal(body, out)
	}
	return nil
}

func (c *controlClient) stream(method, path string, fn func(line []byte) error) error {
	resp, err := c.do(method, path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if err := fn(sc.Bytes()); err != nil {
			return err
		}
	}
	return sc.Err()
}
