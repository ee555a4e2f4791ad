package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/agent"
)

// failoverEvent is a decision in `mirrord events`.
type failoverEvent struct {
	Time     time.Time    `json:"time"`
	Type     string       `json:"type"` // "failover"
	Decision decisionView `json:"decision"`
}

// decisionView is a decision as JSON: names, not numbers.
type decisionView struct {
	At    time.Time `json:"at"`
	Kind  string    `json:"kind"`
	Acted bool      `json:"acted"`
	Cause string    `json:"cause"`
	Facts string    `json:"facts"`
}

func decisionJSON(d failover.Decision) decisionView {
	return decisionView{At: d.At, Kind: string(d.Kind), Acted: d.Acted, Cause: d.Cause, Facts: d.Facts.String()}
}

// commandReply is the answer to a failover command.
type commandReply struct {
	Decisions []decisionView `json:"decisions"`
}

func (c *controlServer) failoverHandlers(mux *http.ServeMux) {
	cmd := func(path string, ev func(r *http.Request) failover.Event) {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, r *http.Request) {
			c.failoverCommand(w, strings.TrimPrefix(path, "/"), ev(r))
		})
	}
	cmd("/switchover", func(*http.Request) failover.Event { return failover.Switchover{} })
	cmd("/confirm", func(*http.Request) failover.Event { return failover.Confirm{} })
	cmd("/deny", func(*http.Request) failover.Event { return failover.Deny{} })
	cmd("/maintenance", func(r *http.Request) failover.Event {
		return failover.SetMaintenance{On: r.URL.Query().Get("on") == "1"}
	})
}

// errNoFailover: a failover verb on a node without failover.enabled.
var errNoFailover = errors.New("failover is not enabled on this node (failover.enabled)")

// failoverCommand steps ev and answers with the decisions it produced; a
// command the agent refused (its decisions record no action) is a 409
// carrying the agent's reason.
func (c *controlServer) failoverCommand(w http.ResponseWriter, what string, ev failover.Event) {
	if c.agent == nil {
		writeJSON(w, http.StatusConflict, map[string]string{"error": errNoFailover.Error()})
		return
	}
	switch ev.(type) {
	case failover.Confirm, failover.Deny:
		if c.agent.Status().Intent == nil {
			writeJSON(w, http.StatusConflict, map[string]string{"error": "nothing to " + what + ": the failover agent has announced no intent"})
			return
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ds, err := c.agent.Do(ctx, ev)
	if err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": err.Error()})
		return
	}
	var reply commandReply
	acted := false
	var causes []string
	for _, d := range ds {
		reply.Decisions = append(reply.Decisions, decisionJSON(d))
		causes = append(causes, d.Cause)
		acted = acted || d.Acted
	}
	switch ev.(type) {
	case failover.Deny, failover.SetMaintenance:
		// A withdrawn intent, or maintenance already as asked: done.
		acted = true
	}
	if !acted {
		msg := strings.Join(causes, "; ")
		if msg == "" {
			msg = "the failover agent took no action"
		}
		c.log.Warn().Str("command", what).Msg(msg)
		writeJSON(w, http.StatusConflict, map[string]string{"error": msg})
		return
	}
	c.log.Info().Str("command", what).Strs("decisions", causes).Msg("failover command done")
	writeJSON(w, http.StatusOK, reply)
}

// cmdFailover runs switchover, confirm, deny and maintenance on|off.
func cmdFailover(verb string, args []string, stdout io.Writer) error {
	fs := newFlagSet(verb)
	var a adminFlags
	a.register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	path := "/" + verb
	rest := fs.Args()
	switch {
	case verb == "maintenance" && len(rest) == 1 && (rest[0] == "on" || rest[0] == "off"):
		path += "?on=" + map[string]string{"on": "1", "off": "0"}[rest[0]]
	case verb == "maintenance":
		return fmt.Errorf("%w: mirrord maintenance on|off", errUsage)
	case len(rest) > 0:
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, rest)
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	var r commandReply
	if err := c.call("POST", path, &r); err != nil {
		return err
	}
	for _, d := range r.Decisions {
		fmt.Fprintf(stdout, "%s: %s\n", d.Kind, d.Cause)
	}
	return nil
}

// humanFailover renders the agent's block of `mirrord status`.
func humanFailover(r *failoverView) string {
	var b strings.Builder
	fmt.Fprintf(&b, "  failover: mode:%s epoch:%d", r.Mode, r.Epoch)
	if r.Fenced {
		b.WriteString(" FENCED")
	}
	if r.Forced {
		b.WriteString(" forced")
	}
	b.WriteString("\n")
	q := r.Quorum
	switch {
	case !r.Witness:
		b.WriteString("    quorum: no witness (confirm-only)\n")
	case !q.Answered:
		b.WriteString("    quorum: the witness has not answered\n")
	default:
		fmt.Fprintf(&b, "    quorum: holder:%s granted:%v witness-epoch:%d\n", orDash(q.Holder), q.Granted, q.Epoch)
	}
	p := r.Peer
	fmt.Fprintf(&b, "    peer %s: %s role:%s disk:%s epoch:%d in-sync:%v\n", p.Node, p.State, p.Role, p.Disk, p.Epoch, p.InSync)
	for _, ps := range p.Paths {
		fmt.Fprintf(&b, "      path %s: %s (silent %.0fms)\n", ps.Name, ps.State, ps.SilentMS)
	}
	if in := r.Intent; in != nil {
		dl := "no default action"
		if in.Deadline != nil {
			dl = "default action at " + in.Deadline.Format(time.RFC3339)
		}
		fmt.Fprintf(&b, "    INTENT: %s (%s): %s; answer with mirrord confirm | mirrord deny\n", in.Want, dl, in.Reason)
	}
	if r.Switchover != "" {
		fmt.Fprintf(&b, "    switchover: %s\n", r.Switchover)
	}
	for _, h := range r.Resources {
		fmt.Fprintf(&b, "    resource %s: %s\n", h.Name, orDash(h.Error))
	}
	if f := r.ResourceFailure; f != nil {
		state := "no local recovery left: handing over or staying (see the decisions)"
		switch {
		case f.Down && f.Recovering:
			state = fmt.Sprintf("the resources are DOWN (failed to start); retry %d running", f.Retries)
		case f.Recovering:
			state = "local recovery running"
		case f.Down && f.NextRetry != nil:
			state = fmt.Sprintf("the resources are DOWN (failed to start); %d retries, the next at %s", f.Retries, f.NextRetry.Format(time.RFC3339))
		case f.Down:
			state = "the resources are DOWN (failed to start); handing over or staying (see the decisions)"
		}
		name := f.Resource
		if name == "" {
			name = "resources"
		}
		fmt.Fprintf(&b, "    RESOURCE FAILED: %s since %s: %s; local recoveries %d of %d; %s\n",
			name, f.Since.Format(time.RFC3339), f.Error, f.Recoveries, f.MaxRecoveries, state)
	}
	n := len(r.Decisions)
	for _, d := range r.Decisions[max(0, n-5):] {
		acted := "did not act"
		if d.Acted {
			acted = "acted"
		}
		fmt.Fprintf(&b, "    %s %s (%s): %s\n", d.At.Format("15:04:05.000"), d.Kind, acted, d.Cause)
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// failoverView is the agent's state in `mirrord status --json`.
type failoverView struct {
	Mode        string      `json:"mode"`
	Maintenance bool        `json:"maintenance"`
	Role        string      `json:"role"`
	Epoch       uint64      `json:"epoch"`
	Fenced      bool        `json:"fenced"`
	Forced      bool        `json:"forced"`
	ServeUntil  *time.Time  `json:"serve_until,omitempty"`
	Witness     bool        `json:"witness"`
	Quorum      quorumView  `json:"quorum"`
	Peer        peerView    `json:"peer"`
	Intent      *intentView `json:"intent,omitempty"`
	Switchover  string      `json:"switchover,omitempty"`
	// Resources is the last check of the running resource chain.
	Resources []agent.Health `json:"resources,omitempty"`
	// ResourceFailure is a failed check being dealt with.
	ResourceFailure *resourceFailureView `json:"resource_failure,omitempty"`
	Decisions       []decisionView       `json:"decisions"`
}

type resourceFailureView struct {
	Resource      string    `json:"resource"`
	Error         string    `json:"error"`
	Since         time.Time `json:"since"`
	Recoveries    int       `json:"recoveries"`
	MaxRecoveries int       `json:"max_recoveries"`
	Recovering    bool      `json:"recovering"`
	// Down: the chain failed to start and rolled back; Retries starts
	// were tried since, the next at NextRetry.
	Down      bool       `json:"down,omitempty"`
	Retries   int        `json:"retries,omitempty"`
	NextRetry *time.Time `json:"next_retry,omitempty"`
}

type quorumView struct {
	Answered bool   `json:"answered"`
	Holder   string `json:"holder,omitempty"`
	Granted  bool   `json:"granted"`
	Epoch    uint64 `json:"epoch"`
}

type peerView struct {
	Node     string     `json:"node"`
	State    string     `json:"state"`
	Role     string     `json:"role"`
	Disk     string     `json:"disk"`
	Epoch    uint64     `json:"epoch"`
	InSync   bool       `json:"in_sync"`
	LagBytes int64      `json:"lag_bytes"`
	Paths    []pathView `json:"paths"`
}

type pathView struct {
	Name     string  `json:"name"`
	State    string  `json:"state"`
	SilentMS float64 `json:"silent_ms"`
}

type intentView struct {
	Want     string     `json:"want"`
	Reason   string     `json:"reason"`
	Deadline *time.Time `json:"deadline,omitempty"`
}

func viewFailover(r agent.Report) *failoverView {
	mode := r.Mode.String()
	if r.Maintenance {
		mode = "maintenance"
	}
	v := &failoverView{
		Mode: mode, Maintenance: r.Maintenance, Role: r.Role.String(), Epoch: r.Epoch, Fenced: r.Fenced, Forced: r.Forced,
		Witness: r.Witness, Switchover: r.Switchover, Resources: r.Resources,
		Quorum: quorumView{Answered: r.Quorum.Answered, Holder: r.Quorum.Holder, Granted: r.Quorum.Granted, Epoch: r.Quorum.Epoch},
		Peer: peerView{Node: r.Peer.Node, State: r.Peer.State.String(), Role: r.Peer.Role.String(), Disk: r.Peer.Disk.String(),
			Epoch: r.Peer.Epoch, InSync: r.Peer.InSync, LagBytes: r.Peer.LagBytes},
	}
	if !r.ServeUntil.IsZero() {
		t := r.ServeUntil.UTC()
		v.ServeUntil = &t
	}
	for _, p := range r.Peer.Paths {
		v.Peer.Paths = append(v.Peer.Paths, pathView{Name: p.Name, State: p.State.String(), SilentMS: float64(p.Silent) / 1e6})
	}
	if in := r.Intent; in != nil {
		v.Intent = &intentView{Want: in.Want, Reason: in.Reason}
		if !in.Deadline.IsZero() {
			t := in.Deadline.UTC()
			v.Intent.Deadline = &t
		}
	}
	if f := r.ResourceFailure; f != nil {
		v.ResourceFailure = &resourceFailureView{Resource: f.Resource, Error: f.Error, Since: f.Since.UTC(),
			Recoveries: f.Recoveries, MaxRecoveries: f.MaxRecoveries, Recovering: f.Recovering, Down: f.Down, Retries: f.Retries}
		if !f.NextRetry.IsZero() {
			t := f.NextRetry.UTC()
			v.ResourceFailure.NextRetry = &t
		}
	}
	for _, d := range r.History {
		v.Decisions = append(v.Decisions, decisionJSON(d))
	}
	return v
}
