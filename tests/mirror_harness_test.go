package tests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mirrord/mirrord/internal/wanproxy"
)

// Helpers for the two-node tests (mirror_*_test.go): a pair of real mirrord
// processes, alpha and beta, replicating through an in-test TCP proxy that
// can cut and heal the link and counts the bytes crossing it; writers that
// log every acknowledged NBD write; checkers that compare each replica with
// that log block by block.

const (
	mirrorBlock  = 4096
	alExtent     = 4 << 20 // the activity log's extent size (README)
	mirrorSecret = "s3cret-for-tests"
	// stateTimeout bounds a wait for a connection or state change; the
	// link retries every 100 ms, so a healthy run never comes near it.
	stateTimeout = 20 * time.Second
	// resyncTimeout bounds a wait for a resync of up to ~64 MiB, rate
	// limited to 8 MiB/s in the slowest test.
	resyncTimeout = 60 * time.Second
	cliTimeout    = 30 * time.Second
)

// mirrorSeed is a seed for one test, logged so that a failure can be
// replayed with E2E_SEED.
func mirrorSeed(t testing.TB) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("E2E_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("E2E_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with E2E_SEED=%d)", seed, seed)
	return seed
}

// soakIterations is n, or E2E_SOAK when set.
func soakIterations(t testing.TB, n int) int {
	t.Helper()
	if s := os.Getenv("E2E_SOAK"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			t.Fatalf("E2E_SOAK=%q: want a positive number of iterations", s)
		}
		return v
	}
	return n
}

// The proxy.

// linkProxy forwards the replication link from alpha to beta through
// internal/wanproxy. cut closes every connection on both sides and refuses
// new ones until heal; latency delays every chunk, each way, in order, as a
// longer link would: with it an async Primary has writes acknowledged to the
// application but not yet on the peer.
type linkProxy struct {
	p *wanproxy.Proxy
	// toTarget (alpha -> beta) and fromTarget count the bytes delivered,
	// accepted the connections forwarded.
	toTarget, fromTarget, accepted counter
}

// counter reads a proxy's count.
type counter func() int64

func (c counter) Load() int64 { return c() }

func newLinkProxy(t testing.TB, target string, latency time.Duration) *linkProxy {
	t.Helper()
	link := wanproxy.Link{Delay: latency}
	p, err := wanproxy.Start(wanproxy.Config{Target: target, Up: link, Down: link})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return &linkProxy{p: p,
		toTarget:   func() int64 { up, _ := p.Delivered(); return up },
		fromTarget: func() int64 { _, down := p.Delivered(); return down },
		accepted:   func() int64 { return int64(p.Connections()) },
	}
}

func (p *linkProxy) addr() string { return p.p.Addr() }
func (p *linkProxy) cutLink()     { p.p.SetCut(true) }
func (p *linkProxy) healLink()    { p.p.SetCut(false) }

// stall holds everything alpha sends (a congested link that keeps the
// connection); beta's side still flows.
func (p *linkProxy) stall(on bool) { p.p.SetStalled(on) }

// The nodes.

// mirrorStatus is `mirrord status --json`, decoded with the field names the
// tests rely on (declared here, not imported, so that a renamed field fails
// the tests instead of following silently).
type mirrorStatus struct {
	Volume         string            `json:"volume"`
	Node           string            `json:"node"`
	Role           string            `json:"role"`
	Disk           string            `json:"disk"`
	SizeBytes      int64             `json:"size_bytes"`
	OutOfSyncBytes int64             `json:"out_of_sync_bytes"`
	Generations    string            `json:"generations"`
	UndoBytes      int64             `json:"undo_bytes"`
	UndoLimitBytes int64             `json:"undo_limit_bytes"`
	Peer           *mirrorPeerStatus `json:"peer"`
	raw            string
}

type mirrorPeerStatus struct {
	Node           string `json:"node"`
	Mode           string `json:"mode"`
	Connection     string `json:"connection"`
	Replication    string `json:"replication"`
	PeerRole       string `json:"peer_role"`
	PeerDisk       string `json:"peer_disk"`
	SplitBrain     bool   `json:"split_brain"`
	InFlightWrites int    `json:"in_flight_writes"`
	SentBytes      int64  `json:"sent_bytes"`
	ReceivedBytes  int64  `json:"received_bytes"`
	ResyncBytes    int64  `json:"resync_bytes"`
	Resync         *struct {
		DoneBytes  int64 `json:"done_bytes"`
		TotalBytes int64 `json:"total_bytes"`
	} `json:"resync"`
	Reason          string  `json:"reason"`
	LagBytes        int64   `json:"lag_bytes"`
	LagSeconds      float64 `json:"lag_seconds"`
	JournalBytes    int64   `json:"journal_bytes"`
	JournalCapacity int64   `json:"journal_capacity"`
	LagOverBound    bool    `json:"lag_over_bound"`
	Journal         *struct {
		SpilledWrites int64 `json:"spilled_writes"`
		FullEvents    int64 `json:"full_events"`
		SpilledBytes  int64 `json:"spilled_bytes"`
		QueuedBytes   int64 `json:"queued_bytes"`
		Kept          bool  `json:"kept"`
		Replays       int64 `json:"replays"`
	} `json:"journal"`
}

func (s mirrorStatus) connection() string {
	if s.Peer == nil {
		return "(no peer)"
	}
	return s.Peer.Connection
}

// inSync: connected, replicating, nothing out of sync, disk UpToDate.
func (s mirrorStatus) inSync() bool {
	return s.Peer != nil && s.Peer.Connection == "Connected" && s.Peer.Replication == "Established" &&
		s.OutOfSyncBytes == 0 && s.Disk == "UpToDate"
}

func (s mirrorStatus) disconnected() bool {
	return s.Peer != nil && s.Peer.Connection != "Connected"
}

func (s mirrorStatus) brief() string {
	b := fmt.Sprintf("%s role:%s disk:%s oos:%d", s.Node, s.Role, s.Disk, s.OutOfSyncBytes)
	if p := s.Peer; p != nil {
		b += fmt.Sprintf(" connection:%s replication:%s peer-role:%s peer-disk:%s split-brain:%v resync-bytes:%d reason:%q",
			p.Connection, p.Replication, p.PeerRole, p.PeerDisk, p.SplitBrain, p.ResyncBytes, p.Reason)
	}
	return b
}

// mirrorNode is one mirrord of a pair.
type mirrorNode struct {
	t    *testing.T
	name string
	dir  string
	ctl  string // control socket
	sock string // NBD unix socket
	path string // backing file
	p    *proc
}

type pairOptions struct {
	mode string // sync or async
	size string // volume size of both, "64MiB" if empty
	// extra --set key=value for one side, after the common ones (later
	// --set wins).
	alphaSet, betaSet []string
	betaSize          string // beta's volume size, if different
	// linkLatency delays the replication link each way.
	linkLatency time.Duration
	// wan, if set, puts an emulated WAN (internal/wanproxy) in the link
	// instead of the plain proxy; its Target is filled in.
	wan *wanproxy.Config
}

// mirrorPair is alpha (dials, through the proxy) and beta (listens).
type mirrorPair struct {
	alpha, beta *mirrorNode
	proxy       *linkProxy      // nil with pairOptions.wan
	wan         *wanproxy.Proxy // set with pairOptions.wan
	size        int64
}

// startPair starts beta, then alpha, each in its own directory with a
// fresh volume that mirrord creates (both pristine, hence in sync).
func startPair(t *testing.T, o pairOptions) *mirrorPair {
	t.Helper()
	if o.mode == "" {
		o.mode = "sync"
	}
	if o.size == "" {
		o.size = "64MiB"
	}
	size, err := strconv.ParseInt(strings.TrimSuffix(o.size, "MiB"), 10, 64)
	if err != nil {
		t.Fatalf("pair size %q: want NMiB", o.size)
	}
	// Only beta listens: the lower node name dials, so alpha never accepts,
	// and a second "free" port could be handed out twice (to alpha and to
	// the proxy) between being probed and being bound.
	betaListen := freeTCPAddr(t)
	var pr *linkProxy
	var wp *wanproxy.Proxy
	var dial string
	if o.wan != nil {
		cfg := *o.wan
		cfg.Target = betaListen
		var err error
		if wp, err = wanproxy.Start(cfg); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = wp.Close() })
		dial = wp.Addr()
	} else {
		pr = newLinkProxy(t, betaListen, o.linkLatency)
		dial = pr.addr()
	}
	common := func(name, peer string) []string {
		return []string{
			"node.name=" + name, "volume.name=vol0", "peer.node=" + peer,
			"peer.secret=" + mirrorSecret, "peer.mode=" + o.mode,
			"peer.timeout=2s", "peer.ping-interval=200ms", "peer.connect-retry=100ms",
		}
	}
	beta := newMirrorNode(t, "beta", append(append(common("beta", "alpha"),
		"peer.listen="+betaListen), o.betaSet...), cmpOr(o.betaSize, o.size))
	alpha := newMirrorNode(t, "alpha", append(append(common("alpha", "beta"),
		"peer.address="+dial), o.alphaSet...), o.size)
	return &mirrorPair{alpha: alpha, beta: beta, proxy: pr, wan: wp, size: size << 20}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func newMirrorNode(t *testing.T, name string, set []string, size string) *mirrorNode {
	t.Helper()
	dir := shortTempDir(t)
	n := &mirrorNode{t: t, name: name, dir: dir, ctl: filepath.Join(dir, "ctl.sock"),
		sock: filepath.Join(dir, "nbd.sock"), path: filepath.Join(dir, "vol.img")}
	var args []string
	for _, kv := range set {
		args = append(args, "--set", kv)
	}
	n.p = startMirrordWith(t, mirrordOpts{Dir: dir, Path: n.path, Size: size, Sock: n.sock, Ctl: n.ctl, NoTCP: true, Args: args})
	return n
}

// restart starts the node again with the same configuration; it must have
// exited (killed or stopped).
func (n *mirrorNode) restart() {
	n.t.Helper()
	n.p = n.p.restart(n.t)
}

// cli runs a control verb against this node and returns stdout, stderr and
// the exit code.
func (n *mirrorNode) cli(verb string, args ...string) (stdout, stderr string, code int) {
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, mirrordBin, append([]string{verb, "--control", n.ctl}, args...)...)
	cmd.Env = cliEnv()
	cmd.WaitDelay = 5 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		return out.String(), errb.String() + fmt.Sprintf("\n(timed out after %v)", cliTimeout), -1
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return out.String(), errb.String() + "\n" + err.Error(), -1
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// cliEnv is the environment of CLI runs. A -race binary sleeps a second at
// exit by default (for reports from other goroutines); a short CLI run
// polled dozens of times a test cannot afford that.
func cliEnv() []string {
	if !raceBuild {
		return childEnv(nil)
	}
	return childEnv([]string{"GORACE=" + strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0")})
}

// mustCLI runs a verb and requires exit code 0.
func (n *mirrorNode) mustCLI(verb string, args ...string) string {
	n.t.Helper()
	out, errOut, code := n.cli(verb, args...)
	if code != 0 {
		n.t.Fatalf("%s: mirrord %s %s: exit code %d\nstdout: %s\nstderr: %s", n.name, verb, strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func (n *mirrorNode) statusErr() (mirrorStatus, error) {
	out, errOut, code := n.cli("status", "--json")
	if code != 0 {
		return mirrorStatus{}, fmt.Errorf("status exit code %d: %s", code, strings.TrimSpace(errOut))
	}
	var st mirrorStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return mirrorStatus{}, fmt.Errorf("status --json: %v in %q", err, out)
	}
	st.raw = out
	return st, nil
}

func (n *mirrorNode) status() mirrorStatus {
	n.t.Helper()
	st, err := n.statusErr()
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	return st
}

// waitStatus polls `status --json` until cond holds. The control socket
// may not be up yet right after a start: errors are retried until the
// deadline.
func (n *mirrorNode) waitStatus(what string, timeout time.Duration, cond func(mirrorStatus) bool) mirrorStatus {
	n.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for delay := 2 * time.Millisecond; ; delay = min(2*delay, 50*time.Millisecond) {
		st, err := n.statusErr()
		if err == nil && cond(st) {
			return st
		}
		if err != nil {
			last = err.Error()
		} else {
			last = st.brief()
		}
		if n.p.exited() {
			n.t.Fatalf("%s: waiting for %s: mirrord exited (%v); last status: %s", n.name, what, n.p.cmd.ProcessState, last)
		}
		if time.Now().After(deadline) {
			n.t.Fatalf("%s: timed out after %v waiting for %s; last status: %s", n.name, timeout, what, last)
		}
		time.Sleep(delay)
	}
}

func (n *mirrorNode) waitDisconnected() mirrorStatus {
	n.t.Helper()
	return n.waitStatus("connection not Connected", stateTimeout, mirrorStatus.disconnected)
}

func (n *mirrorNode) promote(args ...string) {
	n.t.Helper()
	n.mustCLI("promote", args...)
	if st := n.status(); st.Role != "Primary" {
		n.t.Fatalf("%s: after promote: %s", n.name, st.brief())
	}
}

// waitInSync waits until both nodes are connected, Established, UpToDate
// and have nothing out of sync.
func (pr *mirrorPair) waitInSync(timeout time.Duration) (alpha, beta mirrorStatus) {
	pr.alpha.t.Helper()
	alpha = pr.alpha.waitStatus("in sync (Connected, Established, UpToDate, 0 out of sync)", timeout, mirrorStatus.inSync)
	beta = pr.beta.waitStatus("in sync (Connected, Established, UpToDate, 0 out of sync)", timeout, mirrorStatus.inSync)
	return alpha, beta
}

// startPrimary starts a pair, waits for the connection and promotes alpha.
func startPrimary(t *testing.T, o pairOptions) *mirrorPair {
	t.Helper()
	pr := startPair(t, o)
	pr.waitInSync(stateTimeout)
	pr.alpha.promote()
	pr.beta.waitStatus("peer role Primary", stateTimeout, func(s mirrorStatus) bool {
		return s.Peer != nil && s.Peer.PeerRole == "Primary"
	})
	return pr
}

// logValue finds the first JSON log line of p whose message contains msg
// and returns its field key.
func logValue(t testing.TB, p *proc, msg, key string) (any, bool) {
	t.Helper()
	for line := range strings.SplitSeq(p.log(), "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			continue
		}
		v, ok := m[key]
		return v, ok
	}
	return nil, false
}

// Block content.

// fillStamp fills b with version seq of the block at off: a header naming
// (seed, off, seq) and a pseudo-random body derived from them, so that any
// version is recognisable and computable.
func fillStamp(b []byte, seed uint64, off int64, seq uint64) {
	copy(b, "MRDTBLK1")
	binary.LittleEndian.PutUint64(b[8:], seed)
	binary.LittleEndian.PutUint64(b[16:], uint64(off))
	binary.LittleEndian.PutUint64(b[24:], seq)
	x := seed ^ uint64(off)*0x9e3779b97f4a7c15 ^ seq*0xbf58476d1ce4e5b9
	for i := 32; i < mirrorBlock; i += 8 {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		binary.LittleEndian.PutUint64(b[i:], z^z>>31)
	}
}

// readStamp identifies a block: zero, a valid stamp (seed, off, seq), or
// garbage.
func readStamp(b []byte) (zero bool, seed uint64, off int64, seq uint64, ok bool) {
	if isZero(b) {
		return true, 0, 0, 0, true
	}
	if string(b[:8]) != "MRDTBLK1" {
		return false, 0, 0, 0, false
	}
	seed = binary.LittleEndian.Uint64(b[8:])
	off = int64(binary.LittleEndian.Uint64(b[16:]))
	seq = binary.LittleEndian.Uint64(b[24:])
	var want [mirrorBlock]byte
	fillStamp(want[:], seed, off, seq)
	return false, seed, off, seq, bytes.Equal(b, want[:])
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// The write history.

// blockHistory logs writes: for each block, the sequence number of its last
// acknowledged write, and the one sent without a reply when the connection
// died. Each block has at most one writer at a time, so its writes are
// totally ordered.
type blockHistory struct {
	seed uint64
	seq  atomic.Uint64
	acks atomic.Int64

	mu      sync.Mutex
	last    map[int64]uint64
	pending map[int64]uint64
}

func newHistory(seed uint64) *blockHistory {
	return &blockHistory{seed: seed, last: make(map[int64]uint64), pending: make(map[int64]uint64)}
}

// errnoError is a write the server answered with an error.
type errnoError struct {
	off   int64
	errno uint32
}

func (e *errnoError) Error() string {
	return fmt.Sprintf("write at %d: NBD error %d", e.off, e.errno)
}

// write sends one new version of the 4 KiB block at off and logs it.
func (h *blockHistory) write(c *nbdClient, off int64) error {
	return h.writeRun(c, off, 1)
}

// writeRun writes n consecutive blocks from off in one NBD WRITE, each
// block a new version.
func (h *blockHistory) writeRun(c *nbdClient, off int64, n int) error {
	buf := make([]byte, n*mirrorBlock)
	seqs := make([]uint64, n)
	h.mu.Lock()
	for i := range n {
		seqs[i] = h.seq.Add(1)
		fillStamp(buf[i*mirrorBlock:], h.seed, off+int64(i)*mirrorBlock, seqs[i])
		h.pending[off+int64(i)*mirrorBlock] = seqs[i]
	}
	h.mu.Unlock()
	errno, err := c.writeAt(uint64(off), buf, 0)
	if err != nil {
		return err // no reply: the versions stay pending
	}
	if errno != 0 {
		return &errnoError{off: off, errno: errno}
	}
	h.mu.Lock()
	for i := range n {
		b := off + int64(i)*mirrorBlock
		h.last[b] = seqs[i]
		if h.pending[b] == seqs[i] {
			delete(h.pending, b)
		}
	}
	h.mu.Unlock()
	h.acks.Add(1)
	return nil
}

// touched lists every block the history wrote or tried to.
func (h *blockHistory) touched() []int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	var offs []int64
	for off := range h.last {
		offs = append(offs, off)
	}
	for off := range h.pending {
		if _, ok := h.last[off]; !ok {
			offs = append(offs, off)
		}
	}
	slices.Sort(offs)
	return offs
}

// check compares a replica's content (the whole volume from offset 0) with
// the history: a block written holds its last acknowledged version or, if
// a later write was in flight when the connection died, that version; a
// block never acknowledged may also still be zero; every other block is
// zero. It returns the number of bad blocks and the first few described.
func (h *blockHistory) check(data []byte) (bad int, msgs []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for off := int64(0); off+mirrorBlock <= int64(len(data)); off += mirrorBlock {
		b := data[off : off+mirrorBlock]
		acked, pend := h.last[off], h.pending[off]
		zero, seed, soff, seq, ok := readStamp(b)
		var good bool
		switch {
		case zero:
			good = acked == 0
		case !ok || seed != h.seed || soff != off:
			good = false
		default:
			good = seq == acked || (pend != 0 && seq == pend)
		}
		if !good {
			bad++
			if len(msgs) < 10 {
				got := "zeroes"
				if !zero {
					got = fmt.Sprintf("stamp valid=%v seed=%d off=%d seq=%d", ok, seed, soff, seq)
				}
				msgs = append(msgs, fmt.Sprintf("block at %d: got %s; want seq %d (last acked) or %d (in flight)", off, got, acked, pend))
			}
		}
	}
	return bad, msgs
}

// requireMatches fails the test unless data matches the history.
func (h *blockHistory) requireMatches(t testing.TB, what string, data []byte) {
	t.Helper()
	if bad, msgs := h.check(data); bad > 0 {
		t.Fatalf("%s: %d blocks do not match the acknowledged writes:\n  %s", what, bad, strings.Join(msgs, "\n  "))
	}
}

// Writers.

// writerGroup runs one goroutine per partition, each with its own NBD
// connection and its own blocks, writing one block at a time (each write
// waits for its reply) at random within its partition.
type writerGroup struct {
	h    *blockHistory
	stop chan struct{}
	pass chan struct{}
	wg   sync.WaitGroup

	mu      sync.Mutex
	failed  []error // replies with an error, failed dials
	ioErrs  []error // connections that died (expected when a node is killed)
	stopped sync.Once
	passed  sync.Once
}

func startWriters(t testing.TB, sock string, h *blockHistory, parts [][]int64) *writerGroup {
	t.Helper()
	g := &writerGroup{h: h, stop: make(chan struct{}), pass: make(chan struct{})}
	for i, part := range parts {
		c, err := dialNBD("unix", sock, "vol0")
		if err != nil {
			t.Fatalf("writer %d: %v", i, err)
		}
		rng := rand.New(rand.NewPCG(h.seed, uint64(i)))
		g.wg.Add(1)
		go g.run(c, part, rng)
	}
	t.Cleanup(func() { g.halt() })
	return g
}

func (g *writerGroup) run(c *nbdClient, part []int64, rng *rand.Rand) {
	defer g.wg.Done()
	fail := func(err error) {
		g.mu.Lock()
		defer g.mu.Unlock()
		if _, ok := errors.AsType[*errnoError](err); ok {
			g.failed = append(g.failed, err)
		} else {
			g.ioErrs = append(g.ioErrs, err)
		}
		_ = c.Close()
	}
	for {
		select {
		case <-g.stop:
			_ = c.disconnect()
			return
		case <-g.pass:
			// One write to every block of the partition, then done.
			for _, off := range part {
				if err := g.h.write(c, off); err != nil {
					fail(err)
					return
				}
			}
			_ = c.disconnect()
			return
		default:
		}
		if err := g.h.write(c, part[rng.IntN(len(part))]); err != nil {
			fail(err)
			return
		}
	}
}

// halt stops the writers and waits for them.
func (g *writerGroup) halt() {
	g.stopped.Do(func() { close(g.stop) })
	g.wg.Wait()
}

// finishWithPass makes every writer write each of its blocks once more,
// then stop; it waits for them.
func (g *writerGroup) finishWithPass() {
	g.passed.Do(func() { close(g.pass) })
	g.wg.Wait()
}

// wait waits for writers that end by themselves (their node was killed).
func (g *writerGroup) wait() { g.wg.Wait() }

// requireNoErrors fails on replies with an error and, unless connection
// loss is expected, on dead connections.
func (g *writerGroup) requireNoErrors(t testing.TB, connLossExpected bool) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, err := range g.failed {
		t.Errorf("writer: %v", err)
	}
	if !connLossExpected {
		for _, err := range g.ioErrs {
			t.Errorf("writer connection died: %v", err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// waitAcks waits until the history holds n acknowledged writes.
func waitAcks(t testing.TB, h *blockHistory, n int64) {
	t.Helper()
	waitFor(t, stateTimeout, fmt.Sprintf("%d acknowledged writes", n), func() bool { return h.acks.Load() >= n })
}

// partition deals offs round-robin into n parts.
func partition(offs []int64, n int) [][]int64 {
	parts := make([][]int64, n)
	for i, off := range offs {
		parts[i%n] = append(parts[i%n], off)
	}
	return parts
}

// randomBlocks picks n distinct block offsets in [lo, hi).
func randomBlocks(rng *rand.Rand, n int, lo, hi int64) []int64 {
	total := int((hi - lo) / mirrorBlock)
	idx := rng.Perm(total)[:n]
	offs := make([]int64, n)
	for i, k := range idx {
		offs[i] = lo + int64(k)*mirrorBlock
	}
	slices.Sort(offs)
	return offs
}

// Reading replicas.

// readVolume reads size bytes of a node's volume over NBD.
func (n *mirrorNode) readVolume(size int64) []byte {
	n.t.Helper()
	c, err := dialNBD("unix", n.sock, "vol0")
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	defer func() { _ = c.disconnect() }()
	if int64(c.Size) != size {
		n.t.Fatalf("%s: export size %d, want %d", n.name, c.Size, size)
	}
	data := make([]byte, 0, size)
	const chunk = 1 << 20
	for off := int64(0); off < size; off += chunk {
		b, err := c.mustRead(uint64(off), uint32(min(chunk, size-off)))
		if err != nil {
			n.t.Fatalf("%s: read: %v", n.name, err)
		}
		data = append(data, b...)
	}
	return data
}

// fileHash is the sha256 of the node's whole backing file.
func (n *mirrorNode) fileHash(size int64) string {
	n.t.Helper()
	if got := fileSize(n.t, n.path); got != size {
		n.t.Fatalf("%s: backing file is %d bytes, want %d", n.name, got, size)
	}
	return sha256File(n.t, n.path, 0, size)
}

// stopAndCompare stops both nodes cleanly (exit code 0), requires
// identical backing files and returns their sha256.
func (pr *mirrorPair) stopAndCompare(t testing.TB) string {
	t.Helper()
	pr.alpha.p.stop()
	pr.beta.p.stop()
	a, b := pr.alpha.fileHash(pr.size), pr.beta.fileHash(pr.size)
	if a != b {
		t.Fatalf("replicas differ after a clean stop: alpha sha256 %s, beta %s", a, b)
	}
	return a
}

// Events.

type mirrorEvent struct {
	Time   string       `json:"time"`
	Type   string       `json:"type"`
	Status mirrorStatus `json:"status"`
	raw    string
}

// eventWatch runs `mirrord events` against a node and collects its lines.
type eventWatch struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer
	done   chan struct{}

	mu    sync.Mutex
	lines []string
}

func (n *mirrorNode) watchEvents() *eventWatch {
	n.t.Helper()
	e := &eventWatch{done: make(chan struct{})}
	e.cmd = exec.Command(mirrordBin, "events", "--control", n.ctl)
	e.cmd.Env = cliEnv()
	e.cmd.Stderr = &e.stderr
	out, err := e.cmd.StdoutPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	if err := e.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	go func() {
		defer close(e.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			e.mu.Lock()
			e.lines = append(e.lines, sc.Text())
			e.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	n.t.Cleanup(e.close)
	return e
}

func (e *eventWatch) close() {
	if e.cmd.ProcessState == nil {
		_ = e.cmd.Process.Kill()
		<-e.done
		_ = e.cmd.Wait()
	}
}

func (e *eventWatch) snapshot() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.lines)
}

// waitEvent waits for an event line matching cond; every line seen must be
// a JSON object with a type and a status.
func (e *eventWatch) waitEvent(t testing.TB, what string, timeout time.Duration, cond func(mirrorEvent) bool) mirrorEvent {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range e.snapshot() {
			ev := parseEvent(t, line)
			if cond(ev) {
				return ev
			}
		}
		select {
		case <-e.done:
			t.Fatalf("events stream ended before %s; stderr: %s; lines:\n%s", what, e.stderr.String(), strings.Join(e.snapshot(), "\n"))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for event %s; lines:\n%s", timeout, what, strings.Join(e.snapshot(), "\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func parseEvent(t testing.TB, line string) mirrorEvent {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &raw); err != nil {
		t.Fatalf("event line is not a JSON object: %v: %q", err, line)
	}
	for _, k := range []string{"time", "type", "status"} {
		if _, ok := raw[k]; !ok {
			t.Fatalf("event line lacks %q: %s", k, line)
		}
	}
	var ev mirrorEvent
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		t.Fatalf("event line: %v: %s", err, line)
	}
	if ev.Type == "" || ev.Status.Node == "" || ev.Status.Role == "" {
		t.Fatalf("event line with an empty type or status: %s", line)
	}
	ev.raw = line
	return ev
}

// blockVersion names one version of a block: the history's seed and the
// write's sequence number.
type blockVersion struct{ seed, seq uint64 }

// versions returns each block's last acknowledged version.
func (h *blockHistory) versions() map[int64]blockVersion {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := make(map[int64]blockVersion, len(h.last))
	for off, seq := range h.last {
		m[off] = blockVersion{h.seed, seq}
	}
	return m
}

// requireExactly fails unless every block in want holds that version and
// every other block is zero.
func requireExactly(t testing.TB, what string, data []byte, want map[int64]blockVersion) {
	t.Helper()
	bad := 0
	var msgs []string
	for off := int64(0); off+mirrorBlock <= int64(len(data)); off += mirrorBlock {
		zero, seed, soff, seq, ok := readStamp(data[off : off+mirrorBlock])
		w, written := want[off]
		good := zero && !written || !zero && ok && written && soff == off && seed == w.seed && seq == w.seq
		if !good {
			bad++
			if len(msgs) < 10 {
				msgs = append(msgs, fmt.Sprintf("block at %d: zero=%v valid=%v seed=%d seq=%d; want written=%v seed=%d seq=%d",
					off, zero, ok, seed, seq, written, w.seed, w.seq))
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%s: %d blocks differ from what was expected:\n  %s", what, bad, strings.Join(msgs, "\n  "))
	}
}

// writeBlocks writes one new version of each block over one NBD
// connection and requires every write to succeed.
func (n *mirrorNode) writeBlocks(h *blockHistory, offs []int64) {
	n.t.Helper()
	c, err := dialNBD("unix", n.sock, "vol0")
	if err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
	for _, off := range offs {
		if err := h.write(c, off); err != nil {
			n.t.Fatalf("%s: %v", n.name, err)
		}
	}
	if err := c.disconnect(); err != nil {
		n.t.Fatalf("%s: %v", n.name, err)
	}
}

// requireNoPeerDrop fails if the node's current process logged a lost
// peer: a test whose guarantee holds only while the link stays up (sync
// writes on both disks, async shipping in order) must not blame the data
// for a drop it did not cause.
func (n *mirrorNode) requireNoPeerDrop() {
	n.t.Helper()
	for line := range strings.SplitSeq(n.p.log(), "\n") {
		if strings.Contains(line, `"message":"peer disconnected"`) {
			n.t.Fatalf("%s lost its peer before the test cut anything (too slow a machine for peer.timeout?): %s", n.name, line)
		}
	}
}
