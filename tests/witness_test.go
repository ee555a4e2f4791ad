package tests

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/witness"
)

// witnessProc is a `mirrord witness` process.
type witnessProc struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func startWitness(t *testing.T, args ...string) *witnessProc {
	t.Helper()
	w := &witnessProc{done: make(chan struct{}), log: filepath.Join(t.TempDir(), "witness.log")}
	f, err := os.Create(w.log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w.cmd = exec.Command(mirrordBin, append([]string{"witness", "--log-format", "json"}, args...)...)
	w.cmd.Stdout, w.cmd.Stderr = f, f
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { w.cmd.Wait(); close(w.done) }()
	t.Cleanup(func() {
		w.cmd.Process.Kill()
		<-w.done
		if t.Failed() {
			b, _ := os.ReadFile(w.log)
			t.Logf("witness log:\n%s", b)
		}
	})
	return w
}

// The witness binary: answers votes, keeps epochs and outdated nodes across
// a kill -9, holds the last holder's lease over the restart, and exits 0 on
// SIGTERM.
func TestWitnessProcess(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	if err := os.WriteFile(secretFile, []byte("e2e-witness-secret-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.LocalAddr().String()
	l.Close()
	args := []string{"--listen", addr, "--secret-file", secretFile, "--state-dir", filepath.Join(dir, "state")}
	w := startWitness(t, args...)

	secret, err := witness.LoadSecret(secretFile)
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 500 * time.Millisecond
	c, err := witness.NewClient(witness.ClientConfig{Addr: addr, Secret: secret, LeaseTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	vote := func(node, peer string, epoch uint64, peerOutdated bool) (failover.WitnessVote, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		return c.Vote(ctx, failover.VoteRequest{Volume: "vol0", Node: node, Peer: peer, Epoch: epoch, PeerOutdated: peerOutdated})
	}
	var v failover.WitnessVote
	waitFor(t, startTimeout, "the witness to answer", func() bool {
		v, err = vote("a", "b", 3, true)
		return err == nil
	})
	if !v.Granted || v.Epoch != 4 || !v.PeerOutdated { // 3+1: the first grant on an empty ledger bumps
		t.Fatalf("first vote: %+v", v)
	}

	// kill -9 and restart on the same state.
	w.cmd.Process.Kill()
	<-w.done
	restarted := time.Now()
	w = startWitness(t, args...)
	waitFor(t, startTimeout, "the restarted witness to answer", func() bool {
		v, err = vote("b", "a", 3, false)
		return err == nil
	})
	if v.Granted && time.Since(restarted) < ttl {
		t.Fatalf("b granted %v after the restart, inside a's lease of %v: %+v", time.Since(restarted), ttl, v)
	}
	waitFor(t, 10*time.Second, "a's lease to run out", func() bool {
		v, err = vote("b", "a", 3, false)
		return err == nil && v.Granted
	})
	if v.Epoch != 5 || !v.Outdated {
		t.Fatalf("b after the restart: %+v, want epoch 5 and b still outdated", v)
	}

	w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(stopTimeout):
		t.Fatal("witness ignored SIGTERM")
	}
	if code := w.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
	b, _ := os.ReadFile(w.log)
	if !strings.Contains(string(b), `"vote granted"`) {
		t.Fatalf("log lacks the grants:\n%s", b)
	}
}

func TestWitnessNeedsSecret(t *testing.T) {
	out, err := exec.Command(mirrordBin, "witness", "--state-dir", t.TempDir()).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "--secret-file") {
		t.Fatalf("witness without a secret: %v: %s", err, out)
	}
}
