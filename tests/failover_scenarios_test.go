package tests

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nftTable names this test's nftables tables (unique per process).
func (l *lab) nftTable() string { return "fo_agent_" + l.prefix }

// cut drops IP traffic between node ns and each of others, both ways.
// With arp it also silences ARP in ns (a node isolated from its whole
// site must not answer for the floating IP either).
func (l *lab) cut(ns string, others []string, arp bool) {
	l.t.Helper()
	tbl := l.nftTable()
	var rules strings.Builder
	fmt.Fprintf(&rules, "table inet %s {\n chain in { type filter hook input priority 0; policy accept;\n", tbl)
	for _, o := range others {
		fmt.Fprintf(&rules, "  ip saddr %s drop\n", labIP[o])
	}
	rules.WriteString(" }\n chain out { type filter hook output priority 0; policy accept;\n")
	for _, o := range others {
		fmt.Fprintf(&rules, "  ip daddr %s drop\n", labIP[o])
	}
	rules.WriteString(" }\n}\n")
	if arp {
		fmt.Fprintf(&rules, "table arp %s {\n chain in { type filter hook input priority 0; policy drop; }\n chain out { type filter hook output priority 0; policy drop; }\n}\n", tbl)
	}
	l.nft(ns, rules.String())
}

// heal removes every table cut made in ns.
func (l *lab) heal(ns string) {
	l.t.Helper()
	out, _ := l.exec(ns, "nft", "list", "tables")
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 3 && f[2] == l.nftTable() {
			if out, err := l.exec(ns, "nft", "delete", "table", f[1], f[2]); err != nil {
				l.t.Fatalf("nft delete table in %s: %v\n%s", ns, err, out)
			}
		}
	}
}

func (l *lab) nft(ns, rules string) {
	l.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", l.ns(ns), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		l.t.Fatalf("nft in %s: %v\n%s\n%s", ns, err, rules, out)
	}
}

// load runs the writer until stopped, counting acknowledged writes.
func (w *writer) load() (stop func() (acked, failed int)) {
	quit := make(chan struct{})
	done := make(chan struct{})
	var bad int
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			default:
			}
			if err := w.write(); err != nil {
				bad++
				time.Sleep(20 * time.Millisecond)
				continue
			}
			w.ok.Add(1)
		}
	}()
	return func() (int, int) {
		close(quit)
		<-done
		return int(w.ok.Load()), bad
	}
}

// settled: exactly one node serves, the other is its in-sync Secondary,
// and the Secondary's agent has heard it so (same epoch): only from then
// on may the Secondary take over.
func (l *lab) settled(a, b *labNode) (primary *labNode, ok bool) {
	sa, e1 := a.status()
	sb, e2 := b.status()
	if e1 != nil || e2 != nil || sa.Peer == nil || sb.Peer == nil {
		return nil, false
	}
	for _, p := range []struct {
		n      *labNode
		ps, ss labStatus
	}{{a, sa, sb}, {b, sb, sa}} {
		if p.ps.Role == "Primary" && p.ps.Fence == "" && p.ss.Role == "Secondary" && p.ss.Disk == "UpToDate" &&
			p.ps.Peer.Replication == "Established" && p.ps.Peer.PeerDisk == "UpToDate" &&
			p.ss.Failover != nil && p.ps.Failover != nil && p.ss.Failover.Peer.Role == "Primary" &&
			p.ss.Failover.Peer.InSync && p.ss.Failover.Epoch == p.ps.Failover.Epoch {
			return p.n, true
		}
	}
	return nil, false
}

// Random partitions under load: a checker probing both nodes never finds
// two writable Primaries; after each heal the pair settles with one
// Primary and an in-sync Secondary; no acknowledged write is lost; the
// replicas end identical. E2E_SOAK sets the number of partitions.
func TestFailoverPartitionsNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.up("")
	rng := rand.New(rand.NewPCG(mirrorSeed(t), 4))
	stopCheck := l.checker(a, b)
	w := &writer{l: l, acked: map[uint64][]byte{}}
	stopLoad := w.load()
	kinds := []struct {
		name string
		do   func(primary, target *labNode)
	}{
		{"primary isolated", func(p, _ *labNode) { l.cut(p.name, others(p.name), true) }},
		{"target isolated", func(_, s *labNode) { l.cut(s.name, others(s.name), true) }},
		{"primary and target cut apart", func(p, s *labNode) { l.cut(p.name, []string{s.name}, false) }},
		{"witness isolated", func(_, _ *labNode) { l.cut("w", []string{"a", "b"}, false) }},
		{"primary cut from witness", func(p, _ *labNode) { l.cut(p.name, []string{"w"}, false) }},
		{"target cut from witness", func(_, s *labNode) { l.cut(s.name, []string{"w"}, false) }},
	}
	n := soakIterations(t, 20)
	failovers := 0
	for i := range n {
		primary, ok := l.settled(a, b)
		if !ok {
			sa, _ := a.status()
			sb, _ := b.status()
			t.Logf("partition %d: pair not settled at the start: a %+v %+v, b %+v %+v", i, sa.Peer, sa.Failover, sb.Peer, sb.Failover)
			waitFor(t, 30*time.Second, "pair settled", func() bool { primary, ok = l.settled(a, b); return ok })
		}
		target := b
		if primary == b {
			target = a
		}
		k := kinds[rng.IntN(len(kinds))]
		if i < len(kinds) {
			k = kinds[i] // every kind at least once
		}
		hold := time.Duration(1000+rng.IntN(3000)) * time.Millisecond
		if k.name == "primary isolated" {
			// Long enough for the target to take over (2 s detection,
			// the dead lease, the vote): the failover is then asserted.
			hold = time.Duration(3500+rng.IntN(1500)) * time.Millisecond
		}
		t.Logf("partition %d: %s (primary %s) for %v", i, k.name, primary.name, hold)
		k.do(primary, target)
		time.Sleep(hold) // the partition's length is the experiment, not a wait for a condition
		for _, ns := range []string{"a", "b", "w"} {
			l.heal(ns)
		}
		var now *labNode
		waitFor(t, 60*time.Second, fmt.Sprintf("pair settled after partition %d (%s)", i, k.name), func() bool {
			now, ok = l.settled(a, b)
			return ok
		})
		// Settled by status is not yet a working stream: after a heal the
		// replication connection may still wait out TCP's retransmission
		// backoff, and its watchdog may yet drop it (then the pair
		// resyncs). The next partition starts only once acknowledged
		// writes flow again, so that it begins from a pair in sync as its
		// heartbeats say, and the failover it may call for is owed.
		base := w.ok.Load()
		waitFor(t, 60*time.Second, fmt.Sprintf("writes flowing after partition %d", i), func() bool {
			p, ok := l.settled(a, b)
			return ok && p == now && w.ok.Load() >= base+20
		})
		if now != primary {
			failovers++
		}
		if k.name == "primary isolated" && now == primary {
			out, _ := target.admin("status")
			t.Fatalf("partition %d: the isolated primary %s is still Primary after %v; %s says:\n%s", i, primary.name, hold, target.name, out)
		}
	}
	acked, failed := stopLoad()
	probes := stopCheck()
	t.Logf("%d partitions, %d failovers, %d writes acknowledged, %d failed or held, %d writable intervals checked", n, failovers, acked, failed, probes)
	if acked == 0 {
		t.Fatal("no write was acknowledged under the partitions")
	}
	w.verify(t)
	closeWriter(w)
	w.mu.Lock()
	for off, bs := range w.maybe {
		var seqs []uint64
		for _, b := range bs {
			seqs = append(seqs, binary.BigEndian.Uint64(b))
		}
		t.Logf("not acknowledged: offset %d seqs %v (acknowledged there: %s)", off, seqs, blockStamp(w.acked[off], 0))
	}
	w.mu.Unlock()
	l.compareReplicas(a, b)
}

func others(n string) []string {
	var o []string
	for _, x := range []string{"a", "b", "w", "c"} {
		if x != n {
			o = append(o, x)
		}
	}
	return o
}

func closeWriter(w *writer) {
	if w.c != nil {
		w.c.Close()
		w.c = nil
	}
}

// compareReplicas stops both nodes cleanly and compares their disks.
func (l *lab) compareReplicas(a, b *labNode) {
	l.t.Helper()
	// A write the client gave up on may still be on its way to the
	// Secondary (a partition's TCP retransmission can outlast the pair
	// looking settled): stopped then, the Primary's bitmap would rightly
	// hold the region out of sync and the images differ. Compare once the
	// Primary has nothing in flight and nothing out of sync.
	waitFor(l.t, 60*time.Second, "the Primary with nothing in flight or out of sync", func() bool {
		for _, n := range []*labNode{a, b} {
			st, err := n.status()
			if err == nil && st.Role == "Primary" && st.OutOfSync == 0 && st.Peer != nil &&
				st.Peer.Replication == "Established" && st.Peer.PeerDisk == "UpToDate" && st.Peer.InFlight == 0 {
				return true
			}
		}
		return false
	})
	for _, n := range []*labNode{a, b} {
		if err := n.cmd.Process.Signal(unix.SIGTERM); err != nil {
			l.t.Fatal(err)
		}
		<-n.done
	}
	if sa, sb := sumFile(l.t, a.dir+"/vol.img"), sumFile(l.t, b.dir+"/vol.img"); sa != sb {
		l.t.Fatalf("replicas differ: a %s b %s; 4 KiB blocks that differ: %s", sa, sb, diffBlocks(l.t, a.dir+"/vol.img", b.dir+"/vol.img"))
	}
}

// blockStamp is the writer's sequence number in a block (see writer.block).
func blockStamp(d []byte, off int) string {
	if off+8 > len(d) {
		return "nothing"
	}
	return fmt.Sprintf("seq %d", binary.BigEndian.Uint64(d[off:]))
}

// diffBlocks lists the 4 KiB blocks in which two files differ (the first
// 20, and how many), to tell a lost resync region from a torn write.
func diffBlocks(t *testing.T, pa, pb string) string {
	t.Helper()
	da, err := os.ReadFile(pa)
	if err != nil {
		t.Fatal(err)
	}
	db, err := os.ReadFile(pb)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	n := 0
	for off := 0; off < max(len(da), len(db)); off += 4096 {
		ea, eb := min(off+4096, len(da)), min(off+4096, len(db))
		if off >= len(da) || off >= len(db) || !bytes.Equal(da[off:ea], db[off:eb]) {
			if n < 20 {
				out = append(out, fmt.Sprintf("%d (extent %d: a holds %s, b %s)", off, off>>22, blockStamp(da, off), blockStamp(db, off)))
			}
			n++
		}
	}
	return fmt.Sprintf("%d: %s", n, strings.Join(out, ", "))
}

// Planned switchover there and back under load: no acknowledged write is
// lost and the replicas are identical.
func TestFailoverSwitchoverNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.up("")
	stopCheck := l.checker(a, b)
	w := &writer{l: l, acked: map[uint64][]byte{}}
	stopLoad := w.load()
	for _, s := range []struct{ from, to *labNode }{{a, b}, {b, a}} {
		base := w.ok.Load()
		waitFor(t, 30*time.Second, "100 writes acknowledged by "+s.from.name, func() bool { return w.ok.Load() >= base+100 })
		out, err := s.from.admin("switchover")
		if err != nil {
			t.Fatalf("switchover %s->%s: %v\n%s", s.from.name, s.to.name, err, out)
		}
		t.Logf("%v switchover %s->%s: %s", time.Now().Format("15:04:05.000"), s.from.name, s.to.name, strings.TrimSpace(out))
		waitFor(t, 30*time.Second, s.to.name+" serving after the switchover", func() bool {
			p, ok := l.settled(a, b)
			return ok && p == s.to
		})
		l.heardPrimary(s.from, s.to)
	}
	base := w.ok.Load()
	waitFor(t, 30*time.Second, "100 writes acknowledged after the switchovers", func() bool { return w.ok.Load() >= base+100 })
	acked, failed := stopLoad()
	stopCheck()
	t.Logf("%d writes acknowledged, %d failed or held across two switchovers", acked, failed)
	w.verify(t)
	closeWriter(w)
	l.compareReplicas(a, b)
}

// 30% packet loss on the UDP heartbeat path, both ways, for 30 s (2 min
// with E2E_SOAK): no failover, no fence.
func TestFailoverLossyPathNoFalseFailoverNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.up("")
	stopCheck := l.checker(a, b)
	d := 30 * time.Second
	if os.Getenv("E2E_SOAK") != "" {
		d = 2 * time.Minute
	}
	l.nft("a", fmt.Sprintf(`table inet %s {
 chain in { type filter hook input priority 0; policy accept; udp dport 7790 numgen random mod 10 < 3 counter drop; }
 chain out { type filter hook output priority 0; policy accept; udp dport 7790 numgen random mod 10 < 3 counter drop; }
}
`, l.nftTable()))
	epoch := func(n *labNode) uint64 {
		st, err := n.status()
		if err != nil || st.Failover == nil {
			t.Fatalf("%s status: %v", n.name, err)
		}
		return st.Failover.Epoch
	}
	e0 := epoch(a)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if !a.writable() {
			t.Fatalf("a stopped serving under 30%% loss on one path")
		}
		if st, _ := b.status(); st.Role != "Secondary" {
			t.Fatalf("b became %s under 30%% loss on one path", st.Role)
		}
		time.Sleep(100 * time.Millisecond) // sampling the steady state, not waiting for a change
	}
	rules, _ := l.exec("a", "nft", "list", "table", "inet", l.nftTable())
	dropped := 0
	for _, f := range strings.Split(rules, "packets ")[1:] {
		var n int
		fmt.Sscan(f, &n)
		dropped += n
	}
	// 2 heartbeats a second each way, 30% dropped.
	if min := int(d.Seconds()) / 2; dropped < min {
		t.Fatalf("only %d heartbeats dropped in %v: the lossy path was not lossy\n%s", dropped, d, rules)
	}
	t.Logf("%d UDP heartbeats dropped in %v, no failover", dropped, d)
	l.heal("a")
	if e := epoch(a); e != e0 {
		t.Fatalf("epoch moved %d -> %d: a failover happened", e0, e)
	}
	out, _ := b.admin("status")
	if strings.Contains(out, "promote (acted)") {
		t.Fatalf("b recorded a promotion:\n%s", out)
	}
	stopCheck()
}

// arpWatch captures ARP in the client namespace and reports whether a
// gratuitous ARP for ip came from mac.
type arpWatch struct {
	fd   int
	mu   sync.Mutex
	seen []string // "ip mac" of gratuitous ARPs
	done atomic.Bool
}

func (l *lab) watchARP() *arpWatch {
	l.t.Helper()
	w := &arpWatch{fd: -1}
	err := l.inNS("c", func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons16(unix.ETH_P_ARP)))
		if err != nil {
			return err
		}
		w.fd = fd
		return nil
	})
	if err != nil {
		l.t.Fatalf("ARP capture socket in the client namespace: %v", err)
	}
	_ = unix.SetsockoptTimeval(w.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	go func() {
		buf := make([]byte, 2048)
		for !w.done.Load() {
			n, _, err := unix.Recvfrom(w.fd, buf, 0)
			if err != nil || n < 42 {
				continue
			}
			arp := buf[14:42]
			spa, tpa := net.IP(arp[14:18]), net.IP(arp[24:28])
			if spa.Equal(tpa) { // gratuitous: sender and target address are the one announced
				w.mu.Lock()
				w.seen = append(w.seen, spa.String()+" "+net.HardwareAddr(arp[8:14]).String())
				w.mu.Unlock()
			}
		}
		unix.Close(w.fd)
	}()
	l.t.Cleanup(func() { w.done.Store(true) })
	return w
}

func (w *arpWatch) saw(ip string, mac net.HardwareAddr) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.seen {
		if s == ip+" "+mac.String() {
			return true
		}
	}
	return false
}

func htons16(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

// mac returns eth0's hardware address in node ns.
func (l *lab) mac(ns string) net.HardwareAddr {
	l.t.Helper()
	out, err := l.exec(ns, "cat", "/sys/class/net/eth0/address")
	if err != nil {
		l.t.Fatalf("mac of %s: %v", ns, err)
	}
	m, err := net.ParseMAC(strings.TrimSpace(out))
	if err != nil {
		l.t.Fatal(err)
	}
	return m
}
