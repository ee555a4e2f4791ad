package tests

import (
	"bufio"
	"cmp"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A failover lab: primary "a", target "b", witness "w" and a client "c",
// each in its own network namespace, joined by veths to a bridge in a hub
// namespace. The client reaches the volume only through the floating IP,
// which the failover agent moves with the Primary.
const (
	labNet      = "10.77.0."
	labFloating = labNet + "100"
	labNBDPort  = "10809"
	labSecret   = "failover-lab-secret-0123456789abcdef"
)

var labIP = map[string]string{"a": labNet + "1", "b": labNet + "2", "w": labNet + "3", "c": labNet + "10"}

type lab struct {
	t       *testing.T
	prefix  string
	dir     string
	nodes   map[string]*labNode
	wit     *exec.Cmd
	witDone chan struct{}
	wlog    *writableLog // the two-Primaries checker, while it runs
	// resources, if set, replaces the floating IP as the body of each
	// node's failover.resources list (%[1]s is the node's directory).
	resources string
	// peerTimeout is the nodes' peer.timeout ("3s" if empty).
	peerTimeout string
}

type labNode struct {
	name, peer string
	dir, ctl   string
	cfg        string
	cmd        *exec.Cmd
	done       chan struct{}
	log        string
	starts     int
}

func (l *lab) ns(name string) string { return l.prefix + name }

func (l *lab) ip(args ...string) {
	l.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// exec runs a command inside a namespace.
func (l *lab) exec(ns string, name string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", l.ns(ns), name}, args...)...).CombinedOutput()
	return string(out), err
}

func newLab(t *testing.T) *lab {
	t.Helper()
	requireRoot(t)
	requireTools(t, "ip", "nft")
	l := &lab{t: t, prefix: fmt.Sprintf("foa%d", os.Getpid()%100000), dir: shortTempDir(t), nodes: map[string]*labNode{}}
	hub := "hub"
	t.Cleanup(func() {
		for _, n := range []string{"a", "b", "w", "c", hub} {
			_ = exec.Command("ip", "netns", "del", l.ns(n)).Run()
		}
	})
	l.ip("netns", "add", l.ns(hub))
	l.ip("-n", l.ns(hub), "link", "add", "br0", "type", "bridge")
	l.ip("-n", l.ns(hub), "link", "set", "br0", "up")
	for _, n := range []string{"a", "b", "w", "c"} {
		l.ip("netns", "add", l.ns(n))
		l.ip("-n", l.ns(n), "link", "set", "lo", "up")
		l.ip("-n", l.ns(hub), "link", "add", "v"+n, "type", "veth", "peer", "name", "eth0", "netns", l.ns(n))
		l.ip("-n", l.ns(hub), "link", "set", "v"+n, "master", "br0", "up")
		l.ip("-n", l.ns(n), "addr", "add", labIP[n]+"/24", "dev", "eth0")
		l.ip("-n", l.ns(n), "link", "set", "eth0", "up")
	}
	for _, f := range []string{"secret", "witness.secret"} {
		if err := os.WriteFile(filepath.Join(l.dir, f), []byte(labSecret+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// startWitness runs `mirrord witness` in namespace w.
func (l *lab) startWitness() {
	l.t.Helper()
	logf, err := os.Create(filepath.Join(l.dir, "witness.log"))
	if err != nil {
		l.t.Fatal(err)
	}
	defer logf.Close()
	l.wit = exec.Command("ip", "netns", "exec", l.ns("w"), mirrordBin, "witness", "--log-format", "json",
		"--secret-file", filepath.Join(l.dir, "witness.secret"), "--listen", labIP["w"]+":7700",
		"--state-dir", filepath.Join(l.dir, "witness-state"))
	l.wit.Stdout, l.wit.Stderr = logf, logf
	if err := l.wit.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.witDone = make(chan struct{})
	go func() { _ = l.wit.Wait(); close(l.witDone) }()
	l.t.Cleanup(func() {
		_ = l.wit.Process.Kill()
		<-l.witDone
	})
}

// config writes node name's config (peer the other) and returns its path.
func (l *lab) config(name, peer string, extra string) *labNode {
	dir := filepath.Join(l.dir, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		l.t.Fatal(err)
	}
	n := &labNode{name: name, peer: peer, dir: dir, ctl: filepath.Join(dir, "ctl.sock"), cfg: filepath.Join(dir, "mirrord.yaml")}
	cfg := fmt.Sprintf(`node: {name: %[1]s}
volume: {name: vol0, path: %[2]s/vol.img, size: 64MiB}
nbd: {listen: ["tcp:0.0.0.0:%[3]s"]}
peer: {node: %[4]s, address: "%[5]s:7789", listen: "0.0.0.0:7789", secret-file: %[6]s/secret, timeout: %[12]s, ping-interval: 200ms, connect-retry: 200ms}
control: {socket: %[7]s}
log: {level: info, format: json}
failover:
  enabled: true
  witness: "%[8]s:7700"
  witness-secret-file: %[6]s/witness.secret
  udp: ["%[9]s:7790->%[5]s:7790"]
  resources:
%[10]s
%[11]s`, name, dir, labNBDPort, peer, labIP[peer], l.dir, n.ctl, labIP["w"], labIP[name], l.resourceList(dir), extra, cmp.Or(l.peerTimeout, "3s"))
	if err := os.WriteFile(n.cfg, []byte(cfg), 0o644); err != nil {
		l.t.Fatal(err)
	}
	l.nodes[name] = n
	return n
}

// labIPResource is the floating IP, the lab's default resource list.
const labIPResource = "    - {type: ip, address: " + labFloating + "/24, interface: eth0, arp-count: 3, arp-interval: 100ms}"

func (l *lab) resourceList(dir string) string {
	if l.resources == "" {
		return labIPResource
	}
	return fmt.Sprintf(l.resources, dir)
}

func (l *lab) start(n *labNode) {
	l.t.Helper()
	n.starts++
	n.log = filepath.Join(n.dir, fmt.Sprintf("mirrord.%d.log", n.starts))
	logf, err := os.Create(n.log)
	if err != nil {
		l.t.Fatal(err)
	}
	defer logf.Close()
	n.cmd = exec.Command("ip", "netns", "exec", l.ns(n.name), mirrordBin, "run", "-c", n.cfg)
	n.cmd.Env = childEnv(nil)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	if err := n.cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	done := make(chan struct{})
	n.done = done
	cmd := n.cmd
	go func() { _ = cmd.Wait(); close(done) }()
	l.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if l.t.Failed() {
			b, _ := os.ReadFile(n.log)
			l.t.Logf("%s log (start %d):\n%s", n.name, n.starts, tail(string(b), 60))
		}
	})
	waitFor(l.t, startTimeout, n.name+" control socket", func() bool {
		_, err := n.status()
		return err == nil
	})
	if l.wlog != nil {
		l.wlog.watch(n, done)
	}
}

func tail(s string, lines int) string {
	ls := strings.Split(s, "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// kill9 kills the node's mirrord with SIGKILL (ip netns exec execs it, so
// the pid is mirrord's own).
func (n *labNode) kill9() {
	_ = n.cmd.Process.Signal(unix.SIGKILL)
	<-n.done
}

type labStatus struct {
	Role      string `json:"role"`
	Disk      string `json:"disk"`
	Fence     string `json:"fence"`
	OutOfSync int64  `json:"out_of_sync_bytes"`
	Peer      *struct {
		Connection  string `json:"connection"`
		Replication string `json:"replication"`
		PeerDisk    string `json:"peer_disk"`
		ResyncBytes uint64 `json:"resync_bytes"`
		InFlight    int    `json:"in_flight_writes"`
	} `json:"peer"`
	Failover *struct {
		Epoch  uint64 `json:"epoch"`
		Fenced bool   `json:"fenced"`
		Peer   struct {
			Role   string `json:"role"`
			InSync bool   `json:"in_sync"`
			Epoch  uint64 `json:"epoch"`
		} `json:"peer"`
		Resources []struct {
			Name  string `json:"name"`
			Error string `json:"error"`
		} `json:"resources"`
		ResourceFailure *struct {
			Resource string `json:"resource"`
			Down     bool   `json:"down"`
		} `json:"resource_failure"`
	} `json:"failover"`
}

func (n *labNode) status() (labStatus, error) {
	var st labStatus
	out, err := exec.Command(mirrordBin, "status", "--json", "--control", n.ctl).Output()
	if err != nil {
		return st, err
	}
	err = json.Unmarshal(out, &st)
	return st, err
}

// writable: Primary and not fenced, as its own control socket says.
func (n *labNode) writable() bool {
	st, err := n.status()
	return err == nil && st.Role == "Primary" && st.Fence == ""
}

func (n *labNode) admin(args ...string) (string, error) {
	out, err := exec.Command(mirrordBin, append(args, "--control", n.ctl)...).CombinedOutput()
	return string(out), err
}

// inNS runs f on a thread switched into namespace ns: sockets it creates
// belong to that namespace for their whole life.
func (l *lab) inNS(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		fd, err := unix.Open("/var/run/netns/"+l.ns(ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- err
			return
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// client is an NBD connection from the client namespace to the floating IP.
func (l *lab) client() (*nbdClient, error) {
	var c *nbdClient
	err := l.inNS("c", func() error {
		nc, err := net.DialTimeout("tcp", net.JoinHostPort(labFloating, labNBDPort), 500*time.Millisecond)
		if err != nil {
			return err
		}
		c = &nbdClient{nc: nc, br: bufio.NewReaderSize(nc, 1<<20)}
		if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
			c.Close()
			return err
		}
		if err := c.optGo("vol0"); err != nil {
			c.Close()
			return err
		}
		return nil
	})
	return c, err
}

// writer writes numbered 4 KiB blocks through the floating IP, reconnecting
// after failures, and remembers what was acknowledged. A write that failed
// may or may not have landed (NBD gives no guarantee either way), so the
// blocks of failed writes issued after an offset's last acknowledged one
// are also acceptable contents there; anything older is a lost write.
type writer struct {
	l     *lab
	mu    sync.Mutex
	acked map[uint64][]byte   // offset -> data of the last acknowledged write
	maybe map[uint64][][]byte // offset -> failed writes since that one
	seq   atomic.Uint64
	ok    atomic.Int64 // acknowledged writes (load)
	c     *nbdClient
}

const writerSpan = 16 << 20 // the writer cycles through the first 16 MiB

func (w *writer) block(n uint64) (uint64, []byte) {
	off := (n * 4096) % writerSpan
	b := make([]byte, 4096)
	for i := 0; i < len(b); i += 8 {
		binary.BigEndian.PutUint64(b[i:], n)
	}
	return off, b
}

// write performs the next write; it returns the error (and drops the
// connection) if the write was not acknowledged.
func (w *writer) write() error {
	if w.c == nil {
		c, err := w.l.client()
		if err != nil {
			return err
		}
		w.c = c
	}
	n := w.seq.Add(1)
	off, b := w.block(n)
	// The client helper sets its own long deadline on every exchange; a
	// write still unanswered after 2 s (its server lost the floating IP)
	// is abandoned by closing the connection.
	c := w.c
	timer := time.AfterFunc(2*time.Second, func() { c.Close() })
	errno, err := c.writeAt(off, b, cmdFlagFUA)
	timer.Stop()
	if err == nil && errno != 0 {
		err = fmt.Errorf("write errno %d", errno)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		w.c.Close()
		w.c = nil
		if w.maybe == nil {
			w.maybe = map[uint64][][]byte{}
		}
		w.maybe[off] = append(w.maybe[off], b)
		return err
	}
	w.acked[off] = b
	delete(w.maybe, off)
	return nil
}

// verify reads every acknowledged block back through the floating IP.
func (w *writer) verify(t *testing.T) {
	t.Helper()
	var c *nbdClient
	waitFor(t, 30*time.Second, "client connection for verify", func() bool {
		var err error
		c, err = w.l.client()
		return err == nil
	})
	defer c.Close()
	w.mu.Lock()
	defer w.mu.Unlock()
	for off, want := range w.acked {
		_ = c.nc.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := c.mustRead(off, 4096)
		if err != nil {
			t.Fatalf("read back %d: %v", off, err)
		}
		ok := string(got) == string(want)
		for _, m := range w.maybe[off] {
			ok = ok || string(got) == string(m)
		}
		if !ok {
			t.Fatalf("acknowledged write at %d lost (%d failed writes there since): %s", off, len(w.maybe[off]), firstDiff(got, want))
		}
	}
}

// The checker: every node's event stream (mirrord events) gives the
// instants its volume became and stopped being writable (Primary and not
// fenced). All processes share the host's clock, so the intervals of the
// two nodes can be compared: they must never overlap. A stream that ends
// (the process died) closes its interval when the end is seen, which only
// widens it.
type writableLog struct {
	mu        sync.Mutex
	intervals map[string][][2]time.Time
	open      map[string]time.Time
	wg        sync.WaitGroup
}

func (w *writableLog) watch(n *labNode, done <-chan struct{}) {
	cmd := exec.Command(mirrordBin, "events", "--control", n.ctl)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return
	}
	if err := cmd.Start(); err != nil {
		return
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		go func() { <-done; _ = cmd.Process.Kill() }()
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var e struct {
				Time   time.Time `json:"time"`
				Status *struct {
					Role  string `json:"role"`
					Fence string `json:"fence"`
				} `json:"status"`
			}
			if json.Unmarshal(sc.Bytes(), &e) != nil || e.Status == nil {
				continue // a failover decision, not a volume state
			}
			w.set(n.name, e.Status.Role == "Primary" && e.Status.Fence == "", e.Time)
		}
		_ = cmd.Wait()
		w.set(n.name, false, time.Now())
	}()
}

func (w *writableLog) set(node string, writable bool, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	start, open := w.open[node]
	switch {
	case writable && !open:
		w.open[node] = at
	case !writable && open:
		w.intervals[node] = append(w.intervals[node], [2]time.Time{start, at})
		delete(w.open, node)
	}
}

// overlaps returns every instant both a and b were writable.
func (w *writableLog) overlaps(now time.Time) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	all := map[string][][2]time.Time{}
	for n, iv := range w.intervals {
		all[n] = append(all[n], iv...)
	}
	for n, s := range w.open {
		all[n] = append(all[n], [2]time.Time{s, now})
	}
	var bad []string
	for _, x := range all["a"] {
		for _, y := range all["b"] {
			if x[0].Before(y[1]) && y[0].Before(x[1]) {
				bad = append(bad, fmt.Sprintf("a writable %s..%s, b writable %s..%s",
					x[0].Format(time.RFC3339Nano), x[1].Format(time.RFC3339Nano), y[0].Format(time.RFC3339Nano), y[1].Format(time.RFC3339Nano)))
			}
		}
	}
	return bad
}

// checker starts the writable log (every node start from now on is
// watched) and returns a function that stops it and fails the test on
// any instant with two writable Primaries; it returns the number of
// writable intervals seen.
func (l *lab) checker(a, b *labNode) (stop func() int) {
	l.wlog = &writableLog{intervals: map[string][][2]time.Time{}, open: map[string]time.Time{}}
	for _, n := range []*labNode{a, b} {
		l.wlog.watch(n, n.done)
	}
	return func() int {
		// Let the streams deliver what happened up to now.
		time.Sleep(200 * time.Millisecond) // event delivery lag, not a condition
		bad := l.wlog.overlaps(time.Now())
		w := l.wlog
		l.wlog = nil
		if len(bad) > 0 {
			l.t.Fatalf("two writable Primaries: %s", strings.Join(bad, "; "))
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.intervals["a"]) + len(w.intervals["b"]) + len(w.open)
	}
}

// up starts witness, a (Primary, floating IP) and b, connected and in sync.
func (l *lab) up(extra string) (a, b *labNode) {
	l.t.Helper()
	return l.upPair(extra, extra)
}

// upPair is up with a different failover section tail for a and b.
func (l *lab) upPair(extraA, extraB string) (a, b *labNode) {
	l.t.Helper()
	l.startWitness()
	a, b = l.config("a", "b", extraA), l.config("b", "a", extraB)
	l.start(b)
	l.start(a)
	waitFor(l.t, 30*time.Second, "a and b connected and UpToDate", func() bool {
		sa, e1 := a.status()
		sb, e2 := b.status()
		return e1 == nil && e2 == nil && sa.Peer != nil && sb.Peer != nil &&
			sa.Peer.Replication == "Established" && sb.Peer.Replication == "Established" &&
			sa.Disk == "UpToDate" && sb.Disk == "UpToDate"
	})
	if out, err := a.admin("promote"); err != nil {
		l.t.Fatalf("promote a: %v\n%s", err, out)
	}
	waitFor(l.t, 30*time.Second, "a writable (unfenced by its agent)", a.writable)
	l.heardPrimary(b, a)
	return a, b
}

// heardPrimary waits until target's agent has heard primary as an in-sync
// Primary and adopted its epoch: only then may it take over (a target
// behind the witness's epoch by more than one refuses).
func (l *lab) heardPrimary(target, primary *labNode) {
	l.t.Helper()
	waitFor(l.t, 30*time.Second, target.name+" hears "+primary.name+" as in-sync Primary at its epoch", func() bool {
		st, err := target.status()
		ps, perr := primary.status()
		return err == nil && perr == nil && st.Failover != nil && ps.Failover != nil &&
			st.Failover.Peer.Role == "Primary" && st.Failover.Peer.InSync &&
			st.Failover.Peer.Epoch == ps.Failover.Epoch && st.Failover.Epoch == ps.Failover.Epoch
	})
}

func sumFile(t *testing.T, path string) string {
	t.Helper()
	return sha256File(t, path, 0, fileSize(t, path))
}

// kill -9 of the Primary: the target takes over and serves writes at the
// floating IP, every acknowledged write is there, and the old Primary
// comes back as Secondary, resyncs, and both replicas are identical.
func TestFailoverKillPrimaryNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.up("")
	stop := l.checker(a, b)
	w := &writer{l: l, acked: map[uint64][]byte{}}
	arp := l.watchARP()
	waitFor(t, 30*time.Second, "first write through the floating IP", func() bool { return w.write() == nil })
	for range 200 {
		if err := w.write(); err != nil {
			t.Fatalf("write before the kill: %v", err)
		}
	}
	a.kill9()
	killed := time.Now()
	waitFor(t, 30*time.Second, "a write accepted at the floating IP after the kill", func() bool { return w.write() == nil })
	t.Logf("kill -9 to first write at the floating IP: %v (bar checked by scripts/drill.sh)", time.Since(killed).Round(time.Millisecond))
	if st, err := b.status(); err != nil || st.Role != "Primary" {
		t.Fatalf("b after failover: %+v %v, want Primary", st, err)
	}
	for range 200 {
		if err := w.write(); err != nil {
			t.Fatalf("write after failover: %v", err)
		}
	}
	w.verify(t)
	macB := l.mac("b")
	waitFor(t, 10*time.Second, "gratuitous ARP for the floating IP from b, seen in the client namespace", func() bool {
		return arp.saw(labFloating, macB)
	})

	// The old Primary returns: Secondary, resynced from b.
	l.start(a)
	waitFor(t, 60*time.Second, "a back in sync as Secondary", func() bool {
		sa, e1 := a.status()
		sb, e2 := b.status()
		return e1 == nil && e2 == nil && sa.Role == "Secondary" && sa.Disk == "UpToDate" &&
			sb.Peer != nil && sb.Peer.Replication == "Established" && sb.Peer.PeerDisk == "UpToDate"
	})
	// Partial: only what b wrote without a (within the writer's 16 MiB
	// of a 64 MiB volume), not a full copy.
	if sb, err := b.status(); err != nil || sb.Peer.ResyncBytes == 0 || sb.Peer.ResyncBytes > writerSpan {
		t.Fatalf("resync to the returning a: %d bytes (%v), want some and at most %d", sb.Peer.ResyncBytes, err, writerSpan)
	} else {
		t.Logf("a resynced %d bytes on its return", sb.Peer.ResyncBytes)
	}
	for range 50 {
		if err := w.write(); err != nil {
			t.Fatalf("write after a's return: %v", err)
		}
	}
	w.verify(t)
	closeWriter(w)
	stop()
	l.compareReplicas(a, b)
}

// The drill the README shows: scripts/drill.sh sets up its own namespaces,
// kills the primary and prints the time to the first write at the floating
// IP. Here only its correctness is checked (DRILL_NO_BAR): the figure is
// the drill's to judge, not a test's.
func TestDrillScript(t *testing.T) {
	requireRoot(t)
	requireTools(t, "ip", "qemu-io")
	out := runScript(t, 3*time.Minute, append(childEnv(nil), "MIRRORD="+mirrordBin, "DRILL_NO_BAR=1"), "../scripts/drill.sh")
	if !strings.Contains(out, "kill -9 of the primary to the first write accepted at the floating IP:") {
		t.Fatalf("drill.sh printed no figure:\n%s", out)
	}
	t.Logf("%s", out)
}
