package etcdlease

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/mirrord/mirrord/failover"
	"github.com/mirrord/mirrord/failover/votertest"
)

// etcdServer is a single-member etcd on loopback, started by the test.
type etcdServer struct {
	t                  *testing.T
	dir                string
	clientURL, peerURL string
	cmd                *exec.Cmd
	exited             chan struct{}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startEtcd(t *testing.T) *etcdServer {
	t.Helper()
	if _, err := exec.LookPath("etcd"); err != nil {
		t.Fatalf("etcd is required (Debian package etcd-server; scripts/deps.sh test installs it): %v", err)
	}
	e := &etcdServer{t: t, dir: t.TempDir(),
		clientURL: fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
		peerURL:   fmt.Sprintf("http://127.0.0.1:%d", freePort(t))}
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *etcdServer) start() {
	t := e.t
	// Short election timings make the minimum lease 1 s (etcd's minimum
	// TTL is 1.5 election timeouts, rounded up to a second).
	e.cmd = exec.Command("etcd", "--name", "t", "--data-dir", filepath.Join(e.dir, "data"),
		"--listen-client-urls", e.clientURL, "--advertise-client-urls", e.clientURL,
		"--listen-peer-urls", e.peerURL, "--initial-advertise-peer-urls", e.peerURL,
		"--initial-cluster", "t="+e.peerURL, "--heartbeat-interval", "50", "--election-timeout", "500",
		"--log-level", "error", "--logger", "zap")
	log, err := os.Create(filepath.Join(e.dir, "etcd.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	e.cmd.Stdout, e.cmd.Stderr = log, log
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	e.exited = make(chan struct{})
	go func() { e.cmd.Wait(); close(e.exited) }()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{e.clientURL}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		_, err := cli.Get(ctx, "ready")
		cancel()
		if err == nil {
			return
		}
		select {
		case <-e.exited:
			b, _ := os.ReadFile(filepath.Join(e.dir, "etcd.log"))
			t.Fatalf("etcd exited: %s", b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd not ready after 20s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *etcdServer) stop() {
	if e.cmd.ProcessState == nil {
		e.cmd.Process.Kill()
	}
	<-e.exited
}

func TestConformance(t *testing.T) {
	e := startEtcd(t)
	n := 0
	votertest.Run(t, func(t *testing.T) *votertest.Backend {
		// One etcd for the suite, a fresh prefix per test.
		n++
		prefix := fmt.Sprintf("/test%d/", n)
		mk := func() failover.Voter {
			v, err := New(Config{Endpoints: []string{e.clientURL}, LeaseTTL: time.Second, Prefix: prefix})
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
		b := &votertest.Backend{Voter: mk(), TTL: time.Second}
		// Restart kills etcd (kill -9) and starts it again on its data
		// directory: the epochs, outdated set and leases survive.
		b.Restart = func(t *testing.T) failover.Voter {
			b.Voter.Close()
			e.stop()
			e.start()
			return mk()
		}
		return b
	})
}

func TestConfig(t *testing.T) {
	if _, err := New(Config{LeaseTTL: time.Second}); !errors.Is(err, ErrConfig) {
		t.Fatalf("no endpoints: %v", err)
	}
	if _, err := New(Config{Endpoints: []string{"http://127.0.0.1:1"}}); !errors.Is(err, ErrConfig) {
		t.Fatalf("no TTL: %v", err)
	}
}

// etcd down: Vote fails by its deadline instead of hanging.
func TestUnreachable(t *testing.T) {
	v, err := New(Config{Endpoints: []string{fmt.Sprintf("http://127.0.0.1:%d", freePort(t))}, LeaseTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := v.Vote(ctx, failover.VoteRequest{Volume: "v", Node: "a", Peer: "b"}); err == nil {
		t.Fatal("vote without etcd succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %v past a 500ms deadline", d)
	}
}
