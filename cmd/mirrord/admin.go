package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/spf13/pflag"

	"github.com/mirrord/mirrord/mirror"
)

// adminFlags locate the daemon: --control SOCKET, or the config it runs
// with.
type adminFlags struct {
	control string
	cf      configFlags
}

func (a *adminFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&a.control, "control", "", "control socket of the running mirrord (default: control.socket from the config)")
	a.cf.register(fs)
}

func (a *adminFlags) client() (*controlClient, error) {
	if a.control != "" {
		return newControlClient(a.control), nil
	}
	c, err := loadConfig(a.cf)
	if err != nil {
		return nil, err
	}
	return newControlClient(c.Control.Socket), nil
}

func cmdStatus(args []string, stdout io.Writer) error {
	fs := newFlagSet("status")
	var a adminFlags
	a.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	var st statusReply
	if err := c.call("GET", "/status", &st); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Fprint(stdout, humanStatus(st))
	return nil
}

// humanStatus renders status the way drbdadm status does: the resource and
// role, the disk, then one indented block for the peer.
func humanStatus(st statusReply) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s role:%s\n", st.Volume, st.Role)
	fmt.Fprintf(&b, "  disk:%s", st.Disk)
	if st.OutOfSyncBytes > 0 {
		fmt.Fprintf(&b, " out-of-sync:%s", humanBytes(st.OutOfSyncBytes))
	}
	fmt.Fprintf(&b, " size:%s\n", humanBytes(st.SizeBytes))
	if st.UndoBytes > 0 {
		limit := "no cap"
		if st.UndoLimitBytes > 0 {
			limit = "cap " + humanBytes(st.UndoLimitBytes)
		}
		fmt.Fprintf(&b, "  undo:%s of %s (last consistent image recoverable: promote rolls back)\n", humanBytes(st.UndoBytes), limit)
	}
	if p := st.Peer; p != nil {
		fmt.Fprintf(&b, "  %s role:%s\n", p.Node, p.PeerRole)
		fmt.Fprintf(&b, "    connection:%s replication:%s peer-disk:%s mode:%s\n", p.Connection, p.Replication, p.PeerDisk, p.Mode)
		if p.SplitBrain {
			fmt.Fprintf(&b, "    SPLIT-BRAIN: resolve with 'mirrord discard-my-data' on the node whose changes are to be lost\n")
		}
		if r := p.Resync; r != nil {
			eta := "unknown"
			if r.ETASeconds > 0 {
				eta = fmt.Sprintf("%.0fs", r.ETASeconds)
			}
			fmt.Fprintf(&b, "    done:%.1f%% (%s of %s, %s/s, eta %s)\n", r.Percent,
				humanBytes(r.TotalBytes-st.OutOfSyncBytes), humanBytes(r.TotalBytes), humanBytes(int64(r.RateBps)), eta)
		}
		fmt.Fprintf(&b, "    transport:%s\n", humanTransport(p.Transport))
		if p.InFlightWrites > 0 {
			fmt.Fprintf(&b, "    in-flight:%d writes (%s)\n", p.InFlightWrites, humanBytes(p.InFlightBytes))
		}
		if p.LagBytes > 0 || p.MaxLagBytes > 0 || p.MaxLagSeconds > 0 {
			fmt.Fprintf(&b, "    lag:%s %.1fs", humanBytes(p.LagBytes), p.LagSeconds)
			if p.LagPolicy != "" {
				fmt.Fprintf(&b, " bound:%s %.1fs policy:%s", humanBytes(p.MaxLagBytes), p.MaxLagSeconds, p.LagPolicy)
				if p.LagOverBound {
					fmt.Fprint(&b, " OVER")
				}
			}
			fmt.Fprintln(&b)
		}
		if p.JournalBytes > 0 {
			fmt.Fprintf(&b, "    journal:%s of %s\n", humanBytes(p.JournalBytes), humanBytes(p.JournalCapacity))
		}
		if p.Reason != "" && p.Connection != string(mirror.ConnConnected) {
			fmt.Fprintf(&b, "    last:%s\n", p.Reason)
		}
	}
	if st.Fence != "" {
		fmt.Fprintf(&b, "  fence:%s (writes are not acknowledged)\n", st.Fence)
	}
	if st.Failover != nil {
		b.WriteString(humanFailover(st.Failover))
	}
	return b.String()
}

// humanTransport is one line: security, compression and its ratio, the cap and
// the current rates.
func humanTransport(t mirror.Transport) string {
	var b strings.Builder
	if t.TLS {
		b.WriteString(" tls")
	} else {
		b.WriteString(" plaintext")
	}
	fmt.Fprintf(&b, " compression:%s", t.Compression)
	if t.DataBytes > 0 {
		fmt.Fprintf(&b, " ratio:%.2f", t.CompressionRatio)
	}
	if t.RateLimit > 0 {
		fmt.Fprintf(&b, " cap:%s (resync share %d%%)", humanRate(float64(t.RateLimit)), t.ResyncShare)
	} else {
		b.WriteString(" cap:none")
	}
	fmt.Fprintf(&b, " wire:%s live:%s resync:%s", humanRate(t.WireRate), humanRate(t.LiveRate), humanRate(t.ResyncRate))
	return b.String()
}

// humanRate shows bytes/s in the network's unit, bits per second.
func humanRate(bps float64) string {
	bits := bps * 8
	switch {
	case bits >= 1e9:
		return fmt.Sprintf("%.2fGbit/s", bits/1e9)
	case bits >= 1e6:
		return fmt.Sprintf("%.1fMbit/s", bits/1e6)
	case bits >= 1e3:
		return fmt.Sprintf("%.0fkbit/s", bits/1e3)
	}
	return fmt.Sprintf("%.0fbit/s", bits)
}

// cmdSet changes a runtime key of the running daemon.
func cmdSet(args []string, stdout io.Writer) error {
	fs := newFlagSet("set")
	var a adminFlags
	a.register(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: want KEY VALUE (keys: %s)", errUsage, strings.Join(runtimeKeys, ", "))
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	q := url.Values{"key": {fs.Arg(0)}, "value": {fs.Arg(1)}}
	var st mirror.Status
	if err := c.call("POST", "/set?"+q.Encode(), &st); err != nil {
		return err
	}
	fmt.Fprint(stdout, humanStatus(statusReply{Status: st}))
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func cmdEvents(args []string, stdout io.Writer) error {
	fs := newFlagSet("events")
	var a adminFlags
	a.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	return c.stream("GET", "/events", func(line []byte) error {
		_, err := fmt.Fprintf(stdout, "%s\n", line)
		return err
	})
}

// cmdSimple runs a control verb that takes no arguments beyond its flags.
func cmdSimple(verb string, args []string, stdout io.Writer) error {
	fs := newFlagSet(verb)
	var a adminFlags
	a.register(fs)
	force, accept := false, false
	if verb == "promote" {
		fs.BoolVar(&force, "force", false, "promote a disk that is not UpToDate; with failover: the panic button, promote regardless of quorum")
		fs.BoolVar(&accept, "i-accept-data-loss", false, "with --force and failover: acknowledge that writes the peer acknowledged may be lost")
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	path := "/" + verb
	if force {
		path += "?force=1"
		if accept {
			path += "&accept-data-loss=1"
		}
	}
	var raw json.RawMessage
	if err := c.call("POST", path, &raw); err != nil {
		if force && !accept {
			return fmt.Errorf("%w\n(with failover the panic button needs --i-accept-data-loss: read what may be lost above first)", err)
		}
		return err
	}
	var r commandReply
	if json.Unmarshal(raw, &r) == nil && len(r.Decisions) > 0 {
		// The failover agent answered the panic button.
		for _, d := range r.Decisions {
			fmt.Fprintf(stdout, "%s: %s\n", d.Kind, d.Cause)
		}
		return nil
	}
	var st mirror.Status
	if err := json.Unmarshal(raw, &st); err != nil {
		return err
	}
	fmt.Fprint(stdout, humanStatus(statusReply{Status: st}))
	return nil
}

func cmdVerify(args []string, stdout io.Writer) error {
	fs := newFlagSet("verify")
	var a adminFlags
	a.register(fs)
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := a.client()
	if err != nil {
		return err
	}
	var result *mirror.VerifyResult
	err = c.stream("POST", "/verify", func(line []byte) error {
		var m struct {
			Progress *float64
			Error    string
			Result   *mirror.VerifyResult
		}
		if err := json.Unmarshal(line, &m); err != nil {
			return err
		}
		switch {
		case m.Error != "":
			return errors.New(m.Error)
		case m.Progress != nil && !*asJSON:
			fmt.Fprintf(stdout, "verify: %.1f%%\n", *m.Progress)
		case m.Result != nil:
			result = m.Result
		}
		return nil
	})
	if err != nil {
		return err
	}
	if result == nil {
		return errors.New("verify ended without a result")
	}
	if *asJSON {
		return json.NewEncoder(stdout).Encode(result)
	}
	fmt.Fprintf(stdout, "verify: checked %s in %.1fs, %s out of sync\n",
		humanBytes(result.CheckedBytes), result.Seconds, humanBytes(result.MismatchedBytes))
	for _, r := range result.Mismatches {
		fmt.Fprintf(stdout, "  mismatch at offset %d, %s\n", r[0], humanBytes(r[1]))
	}
	return nil
}
