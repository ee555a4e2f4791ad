package tests

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// freeUDPAddr returns a loopback UDP address nobody listens on now.
func freeUDPAddr(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().String()
}

// The operator verbs, on a pair without a witness (two processes on
// loopback): mirrord says at startup that failover is confirm-only;
// maintenance on|off; after the Primary's kill -9 the target announces
// its intent and `mirrord confirm` promotes it; after the next kill
// `mirrord deny` withdraws the intent, `mirrord promote --force` refuses
// and says what may be lost, and `--i-accept-data-loss` promotes.
// loopPair configures two nodes on loopback, a and b, with failoverYAML
// as the body of their failover section; start runs one.
func loopPair(t *testing.T, failoverYAML string) (l *lab, a, b *labNode, start func(*labNode)) {
	dir := shortTempDir(t)
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte("verbs-secret-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	repl := map[string]string{"a": freeTCPAddr(t), "b": freeTCPAddr(t)}
	udp := map[string]string{"a": freeUDPAddr(t), "b": freeUDPAddr(t)}
	nbd := map[string]string{"a": freeTCPAddr(t), "b": freeTCPAddr(t)}
	l = &lab{t: t, dir: dir, nodes: map[string]*labNode{}}
	mk := func(name, peer string) *labNode {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		n := &labNode{name: name, peer: peer, dir: d, ctl: filepath.Join(d, "ctl.sock"), cfg: filepath.Join(d, "mirrord.yaml")}
		cfg := fmt.Sprintf(`node: {name: %s}
volume: {name: vol0, path: %s/vol.img, size: 16MiB}
nbd: {listen: ["tcp:%s"]}
peer: {node: %s, address: "%s", listen: "%s", secret-file: %s, connect-retry: 200ms}
control: {socket: %s}
log: {level: info, format: json}
failover:
  enabled: true
  udp: ["%s->%s"]
%s`, name, d, nbd[name], peer, repl[peer], repl[name], secret, n.ctl, udp[name], udp[peer], failoverYAML)
		if err := os.WriteFile(n.cfg, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
		l.nodes[name] = n
		return n
	}
	a, b = mk("a", "b"), mk("b", "a")
	start = func(n *labNode) {
		t.Helper()
		n.starts++
		n.log = filepath.Join(n.dir, fmt.Sprintf("mirrord.%d.log", n.starts))
		logf, err := os.Create(n.log)
		if err != nil {
			t.Fatal(err)
		}
		defer logf.Close()
		n.cmd = exec.Command(mirrordBin, "run", "-c", n.cfg)
		n.cmd.Env = childEnv(nil)
		n.cmd.Stdout, n.cmd.Stderr = logf, logf
		if err := n.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		n.done = done
		cmd := n.cmd
		go func() { _ = cmd.Wait(); close(done) }()
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			<-done
			if t.Failed() {
				b, _ := os.ReadFile(n.log)
				t.Logf("%s log:\n%s", n.name, tail(string(b), 40))
			}
		})
		waitFor(t, startTimeout, n.name+" control socket", func() bool { _, err := n.status(); return err == nil })
	}
	return l, a, b, start
}

func TestFailoverOperatorVerbs(t *testing.T) {
	l, a, b, start := loopPair(t, "  mode: confirm\n")
	mustAdmin := func(n *labNode, args ...string) string {
		t.Helper()
		out, err := n.admin(args...)
		if err != nil {
			t.Fatalf("mirrord %s on %s: %v\n%s", strings.Join(args, " "), n.name, err, out)
		}
		return out
	}
	intent := func(n *labNode) func() bool {
		return func() bool {
			out, err := n.admin("status")
			return err == nil && strings.Contains(out, "INTENT: promote")
		}
	}
	start(a)
	start(b)
	b0, _ := os.ReadFile(b.log)
	if !strings.Contains(string(b0), "failover is confirm-only") {
		t.Fatalf("no confirm-only warning at startup:\n%s", b0)
	}
	waitFor(t, 30*time.Second, "a and b in sync", func() bool {
		sa, e1 := a.status()
		sb, e2 := b.status()
		return e1 == nil && e2 == nil && sa.Peer != nil && sa.Peer.Replication == "Established" && sb.Disk == "UpToDate"
	})
	mustAdmin(a, "promote")
	waitFor(t, 30*time.Second, "a serving (its peer vouches for it)", a.writable)
	l.heardPrimary(b, a)

	if out := mustAdmin(b, "maintenance", "on"); !strings.Contains(out, "maintenance on") {
		t.Fatalf("maintenance on: %s", out)
	}
	if out := mustAdmin(b, "status"); !strings.Contains(out, "mode:maintenance") {
		t.Fatalf("status in maintenance:\n%s", out)
	}
	mustAdmin(b, "maintenance", "off")
	if out, err := b.admin("confirm"); err == nil || !strings.Contains(out, "no intent") {
		t.Fatalf("confirm with nothing pending: %v\n%s", err, out)
	}

	// Site loss without a witness: an intent, confirmed by the operator;
	// the decisions appear in b's event stream.
	ev := exec.Command(mirrordBin, "events", "--control", b.ctl)
	var evOut lockedBuffer
	ev.Stdout = &evOut
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ev.Process.Kill(); _ = ev.Wait() }()
	_ = a.cmd.Process.Signal(unix.SIGKILL)
	<-a.done
	waitFor(t, 30*time.Second, "b announcing its intent to promote", intent(b))
	mustAdmin(b, "confirm")
	waitFor(t, 30*time.Second, "b serving after confirm", b.writable)
	for _, want := range []string{`"type":"failover"`, `"kind":"intent"`, `"kind":"promote"`, "operator confirmed"} {
		waitFor(t, 10*time.Second, "mirrord events showing "+want, func() bool { return strings.Contains(evOut.String(), want) })
	}

	// a returns as b's Secondary; then b dies: deny, the panic button.
	start(a)
	waitFor(t, 60*time.Second, "a back in sync", func() bool {
		sa, err := a.status()
		return err == nil && sa.Role == "Secondary" && sa.Disk == "UpToDate" && sa.Peer != nil && sa.Peer.Replication == "Established"
	})
	l.heardPrimary(a, b)
	_ = b.cmd.Process.Signal(unix.SIGKILL)
	<-b.done
	waitFor(t, 30*time.Second, "a announcing its intent to promote", intent(a))
	mustAdmin(a, "deny")
	if intent(a)() {
		t.Fatal("intent still shown after deny")
	}
	out, err := a.admin("promote", "--force")
	if err == nil || !strings.Contains(out, "refused without AcceptDataLoss") || !strings.Contains(out, "--i-accept-data-loss") ||
		!strings.Contains(out, "would be lost") {
		t.Fatalf("promote --force without the acknowledgement: %v\n%s", err, out)
	}
	if a.writable() {
		t.Fatal("a promoted by a refused panic button")
	}
	out = mustAdmin(a, "promote", "--force", "--i-accept-data-loss")
	if !strings.Contains(out, "FORCED PROMOTION") {
		t.Fatalf("panic button output:\n%s", out)
	}
	waitFor(t, 30*time.Second, "a serving after the panic button", a.writable)
	events, _ := exec.Command(mirrordBin, "status", "--json", "--control", a.ctl).Output()
	if !strings.Contains(string(events), `"kind": "force"`) {
		t.Fatalf("status --json lacks the forced decision:\n%s", events)
	}
}

// lockedBuffer is a bytes.Buffer a process writes while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startEtcd runs a single-member etcd on loopback (Debian's etcd-server)
// and returns its client URL.
func startEtcd(t *testing.T) string {
	t.Helper()
	requireTools(t, "etcd")
	dir := t.TempDir()
	client := "http://" + freeTCPAddr(t)
	peer := "http://" + freeTCPAddr(t)
	cmd := exec.Command("etcd", "--name", "t", "--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "t="+peer,
		"--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "error", "--logger", "zap")
	logf, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-done })
	waitFor(t, 20*time.Second, "etcd healthy", func() bool {
		resp, err := http.Get(client + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return client
}

// An etcd lease as the third vote: kill -9 of the Primary, the target
// takes over on its own.
func TestFailoverEtcdLease(t *testing.T) {
	url := startEtcd(t)
	l, a, b, start := loopPair(t, fmt.Sprintf("  etcd-endpoints: [%q]\n", url))
	start(a)
	start(b)
	waitFor(t, 30*time.Second, "a and b in sync", func() bool {
		sa, e1 := a.status()
		sb, e2 := b.status()
		return e1 == nil && e2 == nil && sa.Peer != nil && sa.Peer.Replication == "Established" && sb.Disk == "UpToDate"
	})
	if out, err := a.admin("promote"); err != nil {
		t.Fatalf("promote a: %v\n%s", err, out)
	}
	waitFor(t, 30*time.Second, "a serving (etcd grants it the vote)", a.writable)
	l.heardPrimary(b, a)
	_ = a.cmd.Process.Signal(unix.SIGKILL)
	<-a.done
	waitFor(t, 30*time.Second, "b serving after a's kill -9", b.writable)
	out, err := b.admin("status")
	if err != nil || !strings.Contains(out, "holder:b granted:true") {
		t.Fatalf("b's quorum after the failover: %v\n%s", err, out)
	}
}
