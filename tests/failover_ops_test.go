package tests

import (
	"cmp"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Operator-facing behaviour of the failover agent in the netns lab (see
// failover_netns_test.go): confirm mode with a witness, the resource chain
// with a real file system, failback policies, and a stale site returning
// alone.

// must runs a mirrord verb against n and fails the test if it fails.
func (n *labNode) must(t *testing.T, args ...string) string {
	t.Helper()
	out, err := n.admin(args...)
	if err != nil {
		t.Fatalf("mirrord %s on %s: %v\n%s", strings.Join(args, " "), n.name, err, out)
	}
	return out
}

type labDecision struct {
	Kind  string `json:"kind"`
	Acted bool   `json:"acted"`
	Cause string `json:"cause"`
}

// decisions returns the agent's recent decisions (mirrord status --json).
func (n *labNode) decisions() []labDecision {
	out, err := exec.Command(mirrordBin, "status", "--json", "--control", n.ctl).Output()
	if err != nil {
		return nil
	}
	var st struct {
		Failover *struct {
			Decisions []labDecision `json:"decisions"`
		} `json:"failover"`
	}
	if json.Unmarshal(out, &st) != nil || st.Failover == nil {
		return nil
	}
	return st.Failover.Decisions
}

// decided reports whether n recorded a decision of kind whose cause
// contains cause.
func (n *labNode) decided(kind, cause string) bool {
	for _, d := range n.decisions() {
		if d.Kind == kind && strings.Contains(d.Cause, cause) {
			return true
		}
	}
	return false
}

// intent reports whether `mirrord status` shows an intent to promote.
func (n *labNode) intent() bool {
	out, err := n.admin("status")
	return err == nil && strings.Contains(out, "INTENT: promote")
}

// events follows n's `mirrord events` until the test ends or n stops.
func (l *lab) events(n *labNode) *lockedBuffer {
	l.t.Helper()
	cmd := exec.Command(mirrordBin, "events", "--control", n.ctl)
	buf := &lockedBuffer{}
	cmd.Stdout = buf
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return buf
}

// backInSync waits until n, restarted, is an UpToDate Secondary of primary
// and primary's agent serves with n heard as its Secondary.
func (l *lab) backInSync(n, primary *labNode) {
	l.t.Helper()
	waitFor(l.t, 60*time.Second, n.name+" back in sync as "+primary.name+"'s Secondary", func() bool {
		p, ok := l.settled(n, primary)
		return ok && p == primary
	})
}

// restartPromoted starts n again (its volume opens Secondary), has the
// operator promote it once it is connected to other, and waits until other
// is its in-sync Secondary.
func (l *lab) restartPromoted(n, other *labNode) {
	l.t.Helper()
	l.start(n)
	waitFor(l.t, 30*time.Second, n.name+" connected to "+other.name, func() bool {
		st, err := n.status()
		return err == nil && st.Peer != nil && st.Peer.Replication == "Established"
	})
	n.must(l.t, "promote")
	l.backInSync(other, n)
}

// Confirm mode with a witness, three site losses: the target announces
// its intent (status and events) and `mirrord confirm` promotes it; then
// `mirrord deny` keeps the other Secondary past the confirm timeout; then
// nobody answers and the default action (proceed) promotes after the
// timeout.
func TestFailoverConfirmModeNetns(t *testing.T) {
	const confirmTimeout = 4 * time.Second
	l := newLab(t)
	a, b := l.up(fmt.Sprintf("  mode: confirm\n  confirm-timeout: %v\n  confirm-default: proceed\n", confirmTimeout))
	stop := l.checker(a, b)

	// 1. Confirmed.
	evB := l.events(b)
	a.kill9()
	waitFor(t, 30*time.Second, "b announcing its intent to promote", b.intent)
	if b.writable() {
		t.Fatal("b serving before anyone confirmed")
	}
	for _, want := range []string{`"kind":"intent"`, "announced intent: promote b", "default action proceed in 4s"} {
		waitFor(t, 10*time.Second, "b's events showing "+want, func() bool { return strings.Contains(evB.String(), want) })
	}
	confirmed := time.Now()
	if out := b.must(t, "confirm"); !strings.Contains(out, "operator confirmed") {
		t.Fatalf("confirm on b:\n%s", out)
	}
	waitFor(t, 30*time.Second, "b serving after confirm", b.writable)
	if d := time.Since(confirmed); d >= confirmTimeout {
		t.Fatalf("b served %v after confirm: that is the default action's timeout, not the confirm", d)
	}
	t.Logf("confirm to b serving: %v", time.Since(confirmed).Round(time.Millisecond))
	waitFor(t, 10*time.Second, "b's events showing the promotion", func() bool { return strings.Contains(evB.String(), `"kind":"promote"`) })

	// 2. Denied: a stays Secondary, also after the confirm timeout.
	l.start(a)
	l.backInSync(a, b)
	b.kill9()
	waitFor(t, 30*time.Second, "a announcing its intent to promote", a.intent)
	if out := a.must(t, "deny"); !strings.Contains(out, "denied by the operator") {
		t.Fatalf("deny on a:\n%s", out)
	}
	denied := time.Now()
	for time.Since(denied) < confirmTimeout+time.Second { // the timeout passing is the experiment
		if st, err := a.status(); err != nil || st.Role != "Secondary" {
			t.Fatalf("a after deny: %+v %v, want Secondary", st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if a.intent() {
		t.Fatal("a still shows its intent after deny")
	}
	if !a.decided("no-promote", "the operator denied it") {
		t.Fatalf("a's status does not say why it stays Secondary: %+v", a.decisions())
	}

	// 3. Nobody answers. b returns; a volume always opens Secondary, so
	// with nobody Primary the operator promotes b (it was the last
	// Primary) and a is its Secondary again. b dies again and a proceeds
	// after the timeout on its own.
	l.restartPromoted(b, a)
	b.kill9()
	waitFor(t, 30*time.Second, "a announcing its intent to promote", a.intent)
	announced := time.Now()
	waitFor(t, confirmTimeout+30*time.Second, "a serving after the default action", a.writable)
	if d := time.Since(announced); d < confirmTimeout-500*time.Millisecond {
		t.Fatalf("a served %v after announcing, before the confirm timeout of %v", d, confirmTimeout)
	}
	if !a.decided("intent", "no answer within 4s: default action proceed") {
		t.Fatalf("a does not record the default action: %+v", a.decisions())
	}
	t.Logf("intent to serving with nobody answering: %v (confirm timeout %v)", time.Since(announced).Round(time.Millisecond), confirmTimeout)
	stop()
}

// Failback: b (policy never) takes over from a, and a, back in sync, stays
// Secondary; a (policy immediate) then takes over from b, and b, back in
// sync, gets the role back. The replicas end identical.
func TestFailbackPoliciesNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.upPair("  failback: immediate\n", "  failback: never\n")
	stop := l.checker(a, b)

	a.kill9()
	waitFor(t, 30*time.Second, "b serving after a's kill -9", b.writable)
	l.start(a)
	l.backInSync(a, b)
	// Immediate failback would switch over after a detection timeout (2 s)
	// in sync: watch twice as long.
	for held := time.Now(); time.Since(held) < 4*time.Second; time.Sleep(100 * time.Millisecond) {
		if p, ok := l.settled(a, b); ok && p != b {
			t.Fatal("b (failback: never) gave the volume back to a")
		}
	}
	if b.decided("failback", "failing back") {
		t.Fatalf("b recorded a failback: %+v", b.decisions())
	}

	b.kill9()
	waitFor(t, 30*time.Second, "a serving after b's kill -9", a.writable)
	failedOver := time.Now()
	l.start(b)
	waitFor(t, 60*time.Second, "b Primary again (a fails back: policy immediate)", func() bool {
		p, ok := l.settled(a, b)
		return ok && p == b
	})
	t.Logf("b restarted to b serving again after failback: %v", time.Since(failedOver).Round(time.Millisecond))
	if !a.decided("failback", "failing back (policy immediate)") {
		t.Fatalf("a does not record the failback: %+v", a.decisions())
	}
	// The failback was a switchover: b does not fail back to a.
	time.Sleep(3 * time.Second) // watching for a ping-pong, not waiting for a state
	if p, ok := l.settled(a, b); !ok || p != b {
		t.Fatal("the pair did not stay with b after the failback")
	}
	stop()
	l.compareReplicas(a, b)
}

// Both sites down, and only the stale one (the Secondary that died first,
// before the Primary acknowledged more writes) returns: it does not promote
// on its own, and its status says why. When the Primary returns, nothing it
// acknowledged is lost.
func TestFailoverStaleSiteAloneNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.up("")
	w := &writer{l: l, acked: map[uint64][]byte{}}
	waitFor(t, 30*time.Second, "first write through the floating IP", func() bool { return w.write() == nil })
	b.kill9()
	// a keeps serving once the witness has recorded b outdated.
	waitFor(t, 30*time.Second, "a write acknowledged by a without b", func() bool { return w.write() == nil })
	for range 100 {
		if err := w.write(); err != nil {
			t.Fatalf("write with b down: %v", err)
		}
	}
	closeWriter(w)
	a.kill9()

	l.start(b)
	started := time.Now()
	const why = "did not promote: this node has not heard a since it started"
	var status string
	waitFor(t, 30*time.Second, "b saying why it does not promote", func() bool {
		out, err := b.admin("status")
		status = out
		return err == nil && strings.Contains(out, why)
	})
	t.Logf("b, alone for %v, says:\n%s", time.Since(started).Round(time.Millisecond), status)
	if st, err := b.status(); err != nil || st.Role != "Secondary" {
		t.Fatalf("b alone: %+v %v, want Secondary", st, err)
	}
	if out, _ := exec.Command("ip", "netns", "exec", l.ns("b"), "ip", "-o", "addr", "show", "dev", "eth0").Output(); strings.Contains(string(out), labFloating+"/") {
		t.Fatalf("b took the floating IP:\n%s", out)
	}

	// a returns: a volume always opens Secondary, and neither agent
	// promotes a peer it hears; the operator promotes a, the last
	// Primary, and b resyncs from it.
	l.restartPromoted(a, b)
	w.verify(t)
	closeWriter(w)
	l.compareReplicas(a, b)
}

// chainScript is the lab's user script (run as `res.sh start|stop|monitor
// ROLE DIR`): role attach makes the promoted volume a block device through
// the node's own NBD server (nbdfuse, then a loop device linked at
// DIR/dev; the kernel here has no nbd client) and formats it the first
// time; role app is the application, which needs the mount and the
// floating IP, appends to a history file on the file system, and refuses
// to start while DIR/fail-app exists. Each action is logged in DIR/order.log.
const chainScript = `#!/bin/bash
set -u
act=$1 role=$2 d=$3
log() { echo "$role $act${*:+ $*}" >> "$d/order.log"; }
case $role/$act in
attach/start)
	mkdir -p "$d/fuse"
	if [ ! -e "$d/dev" ]; then
		rm -f "$d/nbdfuse.pid"
		setsid nbdfuse -P "$d/nbdfuse.pid" "$d/fuse/nbd" "nbd://127.0.0.1:` + labNBDPort + `/vol0" </dev/null >"$d/nbdfuse.log" 2>&1 &
		for i in $(seq 200); do [ -s "$d/nbdfuse.pid" ] && break; sleep 0.05; done
		[ -s "$d/nbdfuse.pid" ] || { echo "nbdfuse did not start:"; cat "$d/nbdfuse.log"; exit 1; }
		loop=$(losetup -f --show "$d/fuse/nbd") || exit 1
		echo "$loop" >> "$d/loops"
		ln -sfn "$loop" "$d/dev"
	fi
	blkid -p "$d/dev" >/dev/null 2>&1; rc=$?
	if [ $rc = 2 ]; then
		mkfs.ext4 -q -F "$d/dev" || exit 1
		log formatted
	elif [ $rc != 0 ]; then
		echo "blkid -p $d/dev: exit $rc"; exit 1
	fi
	log ;;
attach/stop)
	if [ -e "$d/dev" ]; then
		mountpoint -q "$d/mnt" && { log still-mounted; echo "$d/mnt still mounted"; exit 1; }
		losetup -d "$(readlink "$d/dev")" || exit 1
		rm -f "$d/dev"
	fi
	if [ -s "$d/nbdfuse.pid" ]; then
		pid=$(cat "$d/nbdfuse.pid")
		for i in $(seq 100); do fusermount3 -u "$d/fuse" 2>/dev/null && break; sleep 0.05; done
		for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
		rm -f "$d/nbdfuse.pid"
	fi
	log ;;
attach/monitor) [ -b "$d/dev" ] ;;
app/start)
	if [ -e "$d/fail-app" ]; then log refused; echo "app: $d/fail-app exists"; exit 3; fi
	mountpoint -q "$d/mnt" || { log no-mount; exit 1; }
	ip -o addr show dev eth0 | grep -q " ` + labFloating + `/" || { log no-ip; exit 1; }
	cp "$d/mnt/history" "$d/seen-history" 2>/dev/null
	echo "started on $(basename "$d")" >> "$d/mnt/history" && sync -f "$d/mnt/history" || exit 1
	touch "$d/app-running"
	log mounted ip ;;
app/stop)
	if [ -e "$d/app-running" ]; then
		mountpoint -q "$d/mnt" || { log no-mount; exit 1; }
		ip -o addr show dev eth0 | grep -q " ` + labFloating + `/" || { log no-ip; exit 1; }
		echo "stopped on $(basename "$d")" >> "$d/mnt/history" && sync -f "$d/mnt/history" || exit 1
		rm -f "$d/app-running"
		log mounted ip
	else
		log not-running
	fi ;;
app/monitor) [ -e "$d/app-running" ] ;;
*) echo "usage: $0 start|stop|monitor attach|app DIR"; exit 2 ;;
esac
`

// unchainOnCleanup takes down whatever chainScript stack is up on nodes,
// before the nodes are killed (this cleanup runs first). The stack lives
// in the mount namespace `ip netns exec` gave mirrord, which nbdfuse keeps
// alive: it must be unmounted while nbdfuse still answers. Killing nbdfuse
// with the ext4 still mounted deadlocks in the kernel: the namespace's
// teardown unmounts the file system, whose journal flush waits for the
// exiting nbdfuse.
func (l *lab) unchainOnCleanup(script string, nodes ...*labNode) {
	t := l.t
	t.Cleanup(func() {
		for _, n := range nodes {
			pid, err := os.ReadFile(filepath.Join(n.dir, "nbdfuse.pid"))
			if err != nil {
				continue
			}
			ns := []string{"-t", strings.TrimSpace(string(pid)), "-m", "--"}
			if out, err := exec.Command("nsenter", append(ns, "umount", filepath.Join(n.dir, "mnt"))...).CombinedOutput(); err != nil {
				t.Logf("cleanup: umount on %s: %v %s", n.name, err, out)
			}
			if out, err := exec.Command("nsenter", append(ns, script, "stop", "attach", n.dir)...).CombinedOutput(); err != nil {
				t.Errorf("cleanup: detach on %s: %v %s", n.name, err, out)
			}
		}
	})
}

// orderLog returns the lines of n's order.log.
func orderLog(t *testing.T, n *labNode) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(n.dir, "order.log"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(b)), " ", "_"))
}

// mounted reports whether n's mirrord (whose mount namespace `ip netns
// exec` made private) has an ext4 mounted on DIR/mnt.
func mounted(t *testing.T, n *labNode) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", n.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("mountinfo of %s: %v", n.name, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == filepath.Join(n.dir, "mnt") && strings.Contains(line, " - ext4 ") {
			return true
		}
	}
	return false
}

func hasFloatingIP(l *lab, n *labNode) bool {
	out, _ := l.exec(n.name, "ip", "-o", "addr", "show", "dev", "eth0")
	return strings.Contains(out, " "+labFloating+"/")
}

// The resource chain under the agent: attach (script) -> mount (ext4 on
// the promoted volume) -> floating IP -> app (script), started in order
// on promotion and stopped in reverse on a switchover; the file system
// moves with the volume (the app on b reads what the app on a wrote). A
// failing start script rolls back what had started and is reported in
// status and events; a starts the chain once more (local recovery), then,
// b being in sync, hands the service back to b, which brings everything
// up again.
func TestFailoverResourceChainNetns(t *testing.T) {
	requireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "blkid", "mountpoint", "setsid", "nsenter")
	l := newLab(t)
	script := filepath.Join(l.dir, "res.sh")
	if err := os.WriteFile(script, []byte(chainScript), 0o755); err != nil {
		t.Fatal(err)
	}
	l.resources = fmt.Sprintf(`    - {type: script, name: attach, path: %[1]s, args: [attach, "%%[1]s"], timeout: 20s}
    - {type: mount, device: "%%[1]s/dev", path: "%%[1]s/mnt", fstype: ext4}
    - {type: ip, address: %[2]s/24, interface: eth0, arp-count: 3, arp-interval: 100ms}
    - {type: script, name: app, path: %[1]s, args: [app, "%%[1]s"], timeout: 10s}`, script, labFloating)
	a, b := l.up("  monitor-interval: 200ms")
	l.unchainOnCleanup(script, a, b)
	waitFor(t, 30*time.Second, "a's chain started (app running)", func() bool {
		_, err := os.Stat(filepath.Join(a.dir, "app-running"))
		return err == nil
	})
	if !mounted(t, a) || !hasFloatingIP(l, a) {
		t.Fatalf("a's app runs but mount %v, floating IP %v", mounted(t, a), hasFloatingIP(l, a))
	}
	if got, want := strings.Join(orderLog(t, a), " "), "attach_start_formatted attach_start app_start_mounted_ip"; got != want {
		t.Fatalf("a's order log: %q, want %q", got, want)
	}
	// The running chain is checked (each resource's monitor) and shown.
	health := func(n *labNode) string {
		st, err := n.status()
		if err != nil || st.Failover == nil {
			return fmt.Sprint(err)
		}
		var hs []string
		for _, h := range st.Failover.Resources {
			hs = append(hs, h.Name+"="+cmp.Or(h.Error, "ok"))
		}
		return strings.Join(hs, " ")
	}
	last := ""
	waitFor(t, 10*time.Second, "a's resources all checked healthy", func() bool {
		if h := health(a); h != last {
			t.Logf("a's resources: %q", h)
			last = h
		}
		return strings.Count(last, "=ok") == 4 && strings.HasSuffix(last, " app=ok")
	})
	// In maintenance mode the agent watches and never acts: the failed
	// check is shown and what the agent would do recorded, but the app is
	// not restarted (see failover_recovery_test.go for what it does).
	a.must(t, "maintenance", "on")
	if err := os.Remove(filepath.Join(a.dir, "app-running")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a's status shows the app's failed check", func() bool {
		h := health(a)
		return strings.Count(h, "=ok") == 3 && strings.Contains(h, " app=") && !strings.HasSuffix(h, " app=ok")
	})
	t.Logf("a's resources with the app gone: %s", health(a))
	waitFor(t, 10*time.Second, "a recording what it would do in maintenance", func() bool {
		return a.decided("resource", "maintenance: would restart app and the resources after it (local recovery 1 of 1)")
	})
	if err := os.WriteFile(filepath.Join(a.dir, "app-running"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "a's app passing its check again", func() bool { return a.decided("resource", "resource app passes its check again") })
	a.must(t, "maintenance", "off")

	// Switchover a -> b: a stops in reverse, b starts in order.
	evB := l.events(b)
	switched := time.Now()
	a.must(t, "switchover")
	waitFor(t, 30*time.Second, "b's app running after the switchover", func() bool {
		_, err := os.Stat(filepath.Join(b.dir, "app-running"))
		return err == nil
	})
	t.Logf("switchover to b's app running: %v", time.Since(switched).Round(time.Millisecond))
	if got, want := strings.Join(orderLog(t, a), " "), "attach_start_formatted attach_start app_start_mounted_ip app_stop_mounted_ip attach_stop"; got != want {
		t.Fatalf("a's order log after the switchover: %q, want %q (the app stopped while mount and IP were up, attach after the unmount)", got, want)
	}
	if mounted(t, a) || hasFloatingIP(l, a) {
		t.Fatal("a still has its mount or the floating IP after the switchover")
	}
	if got, want := strings.Join(orderLog(t, b), " "), "attach_start app_start_mounted_ip"; got != want {
		t.Fatalf("b's order log: %q, want %q (no format: the file system came with the volume)", got, want)
	}
	hist, err := os.ReadFile(filepath.Join(b.dir, "seen-history"))
	if err != nil || string(hist) != "started on a\nstopped on a\n" {
		t.Fatalf("history b's app found on the file system: %q (%v), want a's start and stop", hist, err)
	}

	// A failing start on a: the rollback stops the IP, the mount and the
	// attach again, in reverse, and the failure is in a's status and events.
	if err := os.WriteFile(filepath.Join(a.dir, "fail-app"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	l.heardPrimary(a, b)
	evA := l.events(a)
	b.must(t, "switchover")
	const failed = "resources failed to start: start app: "
	waitFor(t, 30*time.Second, "a reporting the failed start", func() bool { return a.decided("promote", failed) })
	for _, d := range a.decisions() {
		if strings.Contains(d.Cause, failed) {
			t.Logf("a: %s", d.Cause)
			if !strings.Contains(d.Cause, "rolled back ip:"+labFloating+"/24, mount:"+filepath.Join(a.dir, "mnt")+", attach") {
				t.Fatalf("the report does not name the rollback in reverse order: %s", d.Cause)
			}
		}
	}
	waitFor(t, 10*time.Second, "a's events showing the failed start", func() bool { return strings.Contains(evA.String(), failed) })
	if !strings.Contains(evB.String(), `"kind":"switchover"`) {
		t.Fatalf("b's events lack the switchover:\n%s", evB.String())
	}

	// a starts the chain once more, fails again, and hands the service
	// back to b, which is in sync: everything comes up on b again.
	waitFor(t, 30*time.Second, "b's app running again after a's handover", func() bool {
		_, err := os.Stat(filepath.Join(b.dir, "app-running"))
		return err == nil && hasFloatingIP(l, b) && mounted(t, b)
	})
	if !a.decided("resource", "after 1 local recoveries: handing over to b") {
		t.Fatalf("a's decisions lack the handover: %+v", a.decisions())
	}
	// The failed script's stop runs too (it may have left something);
	// every stop is idempotent.
	if got, want := strings.Join(orderLog(t, a)[5:], " "), "attach_start app_start_refused app_stop_not-running attach_stop "+
		"attach_start app_start_refused app_stop_not-running attach_stop app_stop_not-running attach_stop"; got != want {
		t.Fatalf("a's order log for the failed start, its local recovery and the handover: %q, want %q", got, want)
	}
	if mounted(t, a) || hasFloatingIP(l, a) {
		t.Fatal("a kept its mount or the floating IP after the failed start")
	}
	if err := os.Remove(filepath.Join(a.dir, "fail-app")); err != nil {
		t.Fatal(err)
	}
	hist, err = os.ReadFile(filepath.Join(b.dir, "mnt", "history"))
	if err != nil {
		// The file system is mounted in b's mirrord's mount namespace.
		hist, err = os.ReadFile(fmt.Sprintf("/proc/%d/root%s", b.cmd.Process.Pid, filepath.Join(b.dir, "mnt", "history")))
	}
	if err != nil || string(hist) != "started on a\nstopped on a\nstarted on b\nstopped on b\nstarted on b\n" {
		t.Fatalf("history on the file system: %q (%v)", hist, err)
	}
}

// A Primary that keeps the vote but is cut off from its sync target (the
// witness sees both) drops the silent replication session when the agent
// declares the target lost (2 s), not after peer.timeout (6 s here, the
// default): writes are held only until the witness has recorded the target
// outdated. Nothing acknowledged is lost, and after the heal the target
// resyncs.
func TestFailoverCutFromTargetStallNetns(t *testing.T) {
	const peerTimeout = 6 * time.Second
	l := newLab(t)
	l.peerTimeout = peerTimeout.String()
	a, b := l.up("")
	w := &writer{l: l, acked: map[uint64][]byte{}}
	waitFor(t, 30*time.Second, "first write through the floating IP", func() bool { return w.write() == nil })
	l.cut("a", []string{"b"}, false)
	cut := time.Now()
	for w.write() != nil {
		if time.Since(cut) > 30*time.Second {
			t.Fatal("no write acknowledged by a within 30 s of the cut")
		}
	}
	stall := time.Since(cut)
	t.Logf("cut from the target to the first write acknowledged again: %v (peer.timeout %v)", stall.Round(time.Millisecond), peerTimeout)
	if stall >= peerTimeout {
		t.Fatalf("writes held %v: the agent waited for peer.timeout (%v)", stall, peerTimeout)
	}
	if !a.decided("peer", "dropped now, not after its own timeout") {
		t.Fatalf("a does not record the early drop: %+v", a.decisions())
	}
	if st, err := b.status(); err != nil || st.Role != "Secondary" {
		t.Fatalf("b: %+v %v, want Secondary", st, err)
	}
	for range 50 {
		if err := w.write(); err != nil {
			t.Fatalf("write after the cut: %v", err)
		}
	}
	l.heal("a")
	l.backInSync(b, a)
	w.verify(t)
	closeWriter(w)
	l.compareReplicas(a, b)
}
