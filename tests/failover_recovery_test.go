package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// What the failover agent does when a resource fails on a running Primary
// (local recovery, then a handover), and with the resources when mirrord
// itself is stopped, in the netns lab (see failover_netns_test.go).

// appScript is a script resource: `res.sh start|stop|monitor ROLE DIR`
// keeps DIR/ROLE-running while started and logs every action to
// DIR/order.log; a DIR/fail-ROLE file makes its start fail.
const appScript = `#!/bin/sh
act=$1 role=$2 d=$3
log() { echo "$role-$act${1:+-$1}" >> "$d/order.log"; }
case $act in
start)
	if [ -e "$d/fail-$role" ]; then log refused; echo "$role: $d/fail-$role exists"; exit 3; fi
	touch "$d/$role-running"; log ;;
stop) rm -f "$d/$role-running"; log ;;
monitor) [ -e "$d/$role-running" ] || { echo "$role is not running"; exit 1; } ;;
*) echo "usage: $0 start|stop|monitor ROLE DIR"; exit 2 ;;
esac
`

// appChain sets the lab's resources: the floating IP, then one appScript
// resource per role, in order.
func (l *lab) appChain(roles ...string) {
	l.t.Helper()
	script := filepath.Join(l.dir, "res.sh")
	if err := os.WriteFile(script, []byte(appScript), 0o755); err != nil {
		l.t.Fatal(err)
	}
	res := fmt.Sprintf("    - {type: ip, address: %s/24, interface: eth0, arp-count: 3, arp-interval: 100ms}", labFloating)
	for _, r := range roles {
		res += fmt.Sprintf("\n    - {type: script, name: %[2]s, path: %[1]s, args: [%[2]s, \"%%[1]s\"], timeout: 10s}", script, r)
	}
	l.resources = res
}

func running(n *labNode, role string) bool {
	_, err := os.Stat(filepath.Join(n.dir, role+"-running"))
	return err == nil
}

// A Primary's resource fails its check: the agent restarts it and the
// resource after it in place, leaving the one before it (the floating IP)
// alone, and the service stays on a. Then, with b down, the resource
// cannot be started any more: the one local recovery fails and a stays,
// saying why; once b is back in sync a hands the service over to it as a
// switchover would, and clients reach it at the floating IP on b.
func TestFailoverResourceRecoveryNetns(t *testing.T) {
	l := newLab(t)
	l.appChain("app", "tail")
	a, b := l.up("  monitor-interval: 200ms")
	waitFor(t, 30*time.Second, "a's chain up", func() bool { return running(a, "app") && running(a, "tail") && hasFloatingIP(l, a) })
	w := &writer{l: l, acked: map[uint64][]byte{}}
	defer closeWriter(w)
	waitFor(t, 30*time.Second, "first write through the floating IP", func() bool { return w.write() == nil })
	evA := l.events(a)

	// 1. The app dies; local recovery restarts it (and tail after it).
	if err := os.Remove(filepath.Join(a.dir, "app-running")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "a's app passing its check again after local recovery", func() bool {
		return a.decided("resource", "resource app passes its check again")
	})
	if !a.decided("resource", "local recovery 1 of 1: resource app fails its check (") {
		t.Fatalf("a's decisions lack the local recovery: %+v", a.decisions())
	}
	if got, want := strings.Join(orderLog(t, a), " "), "app-start tail-start tail-stop app-stop app-start tail-start"; got != want {
		t.Fatalf("a's order log: %q, want %q (tail and app restarted in reverse/forward order, the IP untouched)", got, want)
	}
	if st, err := a.status(); err != nil || st.Role != "Primary" || !hasFloatingIP(l, a) {
		t.Fatalf("a after the local recovery: %+v %v, floating IP %v", st, err, hasFloatingIP(l, a))
	}
	if err := w.write(); err != nil {
		t.Fatalf("write after the local recovery: %v", err)
	}

	// 2. b is down when the app dies and cannot start again: the one
	// local recovery fails, and with nobody to take over a stays Primary
	// with what still runs (the floating IP) and says why.
	b.kill9()
	waitFor(t, 20*time.Second, "a serving with b lost", func() bool {
		return a.writable() && a.decided("peer", "peer b lost")
	})
	if err := os.WriteFile(filepath.Join(a.dir, "fail-app"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(a.dir, "app-running")); err != nil {
		t.Fatal(err)
	}
	const stay = "after 1 local recoveries: staying Primary with the resources as they are, no handover: peer b is lost"
	waitFor(t, 20*time.Second, "a saying why it does not hand over", func() bool { return a.decided("resource", stay) })
	if out := a.must(t, "status"); !strings.Contains(out, "RESOURCE FAILED: app since") {
		t.Fatalf("a's status does not show the failed resource:\n%s", out)
	}
	if err := w.write(); err != nil || !a.writable() || !hasFloatingIP(l, a) || running(a, "tail") {
		t.Fatalf("a while staying: write %v, writable %v, floating IP %v, tail running %v", err, a.writable(), hasFloatingIP(l, a), running(a, "tail"))
	}

	// 3. b returns and catches up: at a later failed check a hands over.
	failed := time.Now()
	l.start(b)
	waitFor(t, 60*time.Second, "b serving with the chain up after a's handover", func() bool {
		st, err := b.status()
		return err == nil && st.Role == "Primary" && st.Fence == "" && running(b, "app") && running(b, "tail") && hasFloatingIP(l, b)
	})
	t.Logf("b's restart to its chain up after a's handover: %v", time.Since(failed).Round(time.Millisecond))
	if st, err := a.status(); err != nil || st.Role != "Secondary" || hasFloatingIP(l, a) || running(a, "tail") {
		t.Fatalf("a after the handover: %+v %v, floating IP %v, tail running %v", st, err, hasFloatingIP(l, a), running(a, "tail"))
	}
	if !a.decided("resource", "after 1 local recoveries: handing over to b") {
		t.Fatalf("a's decisions lack the handover: %+v", a.decisions())
	}
	// The failed restart rolled app back; the switchover stopped the rest.
	if got, want := strings.Join(orderLog(t, a)[6:], " "), "tail-stop app-stop app-start-refused app-stop tail-stop app-stop"; got != want {
		t.Fatalf("a's order log for the failed recovery and the handover: %q, want %q", got, want)
	}
	if ev := evA.String(); !strings.Contains(ev, `"kind":"resource"`) || !strings.Contains(ev, "local recovery 1 of app failed: ") {
		t.Fatalf("a's events lack the resource decisions:\n%s", ev)
	}
	waitFor(t, 30*time.Second, "a write at the floating IP on b", func() bool { return w.write() == nil })
	l.backInSync(a, b)
	w.verify(t)
}

// kill -9 of the Primary while the target's application cannot start
// (b's DIR/fail-app exists): b promotes, its chain fails to start and
// rolls back (the floating IP with it), the one local recovery fails too,
// and with a lost b stays Primary, its volume still served, says why in
// status and events and starts the chain again every monitor interval.
// Once the cause is gone the next retry brings the chain up on b and
// clients reach the volume at the floating IP again, every acknowledged
// write there.
func TestFailoverStartFailureRetriedNetns(t *testing.T) {
	l := newLab(t)
	l.appChain("app")
	const retryEvery = time.Second
	a, b := l.up(fmt.Sprintf("  monitor-interval: %v", retryEvery))
	waitFor(t, 30*time.Second, "a's chain up", func() bool { return running(a, "app") && hasFloatingIP(l, a) })
	w := &writer{l: l, acked: map[uint64][]byte{}}
	defer closeWriter(w)
	waitFor(t, 30*time.Second, "first write through the floating IP", func() bool { return w.write() == nil })
	for range 100 {
		if err := w.write(); err != nil {
			t.Fatalf("write before the kill: %v", err)
		}
	}
	evB := l.events(b)
	failApp := filepath.Join(b.dir, "fail-app")
	if err := os.WriteFile(failApp, nil, 0o644); err != nil {
		t.Fatal(err)
	}

	a.kill9()
	const stay = "after 1 local recoveries: staying Primary with the resources down (the volume still served), starting them again every 1s; no handover: peer a is lost"
	waitFor(t, 30*time.Second, "b Primary, saying why its chain is down", func() bool { return b.writable() && b.decided("resource", stay) })
	if !b.decided("resource", "local recovery 1 of 1: resource app failed to start (start app: ") {
		t.Fatalf("b's decisions lack the local recovery: %+v", b.decisions())
	}
	// Retried: more refusals than the start and the local recovery.
	waitFor(t, 20*time.Second, "b retrying the start", func() bool {
		return strings.Count(strings.Join(orderLog(t, b), " "), "app-start-refused") >= 4
	})
	out := b.must(t, "status")
	if !strings.Contains(out, "RESOURCE FAILED: app since") || !strings.Contains(out, "the resources are DOWN (failed to start); ") {
		t.Fatalf("b's status does not show the chain down:\n%s", out)
	}
	// Each retry starts the floating IP again before app refuses and the
	// chain rolls back, so the IP comes and goes; between retries the
	// chain holds nothing and the volume is still served.
	if running(b, "app") || !b.writable() {
		t.Fatalf("b while its chain is down: app running %v, writable %v", running(b, "app"), b.writable())
	}
	waitFor(t, 10*time.Second, "b between retries without the floating IP", func() bool { return !hasFloatingIP(l, b) })

	// The cause goes away: the next retry brings the chain up.
	if err := os.Remove(failApp); err != nil {
		t.Fatal(err)
	}
	fixed := time.Now()
	waitFor(t, 20*time.Second, "b's chain up at a retry", func() bool {
		return running(b, "app") && hasFloatingIP(l, b) && b.decided("resource", "the resources are up again: resource app failed to start")
	})
	took := time.Since(fixed)
	t.Logf("cause removed to b's chain up: %v (retry every %v)", took.Round(time.Millisecond), retryEvery)
	if took > retryEvery+5*time.Second {
		t.Fatalf("b's chain came up %v after the cause went away, with retries every %v", took, retryEvery)
	}
	waitFor(t, 30*time.Second, "a write at the floating IP on b", func() bool { return w.write() == nil })
	if st, err := b.status(); err != nil || st.Failover == nil || st.Failover.ResourceFailure != nil {
		t.Fatalf("b's status after its chain came up: %+v %v", st.Failover, err)
	}
	if ev := evB.String(); !strings.Contains(ev, `"kind":"resource"`) || !strings.Contains(ev, "staying Primary with the resources down") {
		t.Fatalf("b's events lack the resource decisions:\n%s", ev)
	}
	w.verify(t)
	closeWriter(w)
	l.start(a)
	l.backInSync(a, b)
	l.compareReplicas(a, b)
}

// mirrord stopped with SIGTERM on a Primary: with
// failover.stop-resources-on-exit false the floating IP stays in its
// namespace (for an upgrade's restart); with the default (true) the chain
// stops in reverse before mirrord exits and the IP is gone.
func TestFailoverStopResourcesOnExitNetns(t *testing.T) {
	l := newLab(t)
	a, b := l.upPair("  stop-resources-on-exit: false\n", "")
	term := func(n *labNode) {
		t.Helper()
		if err := n.cmd.Process.Signal(unix.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-n.done:
		case <-time.After(60 * time.Second):
			t.Fatalf("%s did not exit within 60 s of SIGTERM", n.name)
		}
		if !n.cmd.ProcessState.Success() {
			b, _ := os.ReadFile(n.log)
			t.Fatalf("%s exited with %v:\n%s", n.name, n.cmd.ProcessState, tail(string(b), 30))
		}
	}
	if !hasFloatingIP(l, a) {
		t.Fatal("a serves without the floating IP")
	}
	term(a)
	if !hasFloatingIP(l, a) {
		t.Fatal("stop-resources-on-exit: false, yet a's floating IP is gone after SIGTERM")
	}
	// b takes over; the operator removes the address the upgrade left.
	waitFor(t, 30*time.Second, "b serving with the floating IP", func() bool { return b.writable() && hasFloatingIP(l, b) })
	l.ip("-n", l.ns("a"), "addr", "del", labFloating+"/24", "dev", "eth0")

	term(b)
	if hasFloatingIP(l, b) {
		t.Fatal("b's floating IP is still there after SIGTERM (stop-resources-on-exit defaults to true)")
	}
	if log, err := os.ReadFile(b.log); err != nil || !strings.Contains(string(log), "stopping the resources before exit") {
		t.Fatalf("b's log does not say it stopped the resources (%v)", err)
	}
}

// A Primary cut off from its peer and the witness holds writes (fencing:
// suspend) while its ext4 is still mounted, and b takes over. Dirty data
// on a's file system then needs writes to unmount. When the cut heals a
// hears b as the newer Primary: it fails writes with EIO first, so its
// unmount completes at once instead of waiting on held writes until the
// mount's timeout, then detaches the device and demotes, and resyncs
// from b.
func TestFailoverStepDownUnmountsNetns(t *testing.T) {
	requireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "blkid", "mountpoint", "setsid", "nsenter")
	const mountTimeout = 10 * time.Second
	l := newLab(t)
	script := filepath.Join(l.dir, "res.sh")
	if err := os.WriteFile(script, []byte(chainScript), 0o755); err != nil {
		t.Fatal(err)
	}
	l.resources = fmt.Sprintf(`    - {type: script, name: attach, path: %[1]s, args: [attach, "%%[1]s"], timeout: 20s}
    - {type: mount, device: "%%[1]s/dev", path: "%%[1]s/mnt", fstype: ext4, timeout: %[3]v}
    - {type: ip, address: %[2]s/24, interface: eth0, arp-count: 3, arp-interval: 100ms}`, script, labFloating, mountTimeout)
	a, b := l.up("")
	l.unchainOnCleanup(script, a, b)
	waitFor(t, 30*time.Second, "a's file system mounted and the floating IP up", func() bool { return mounted(t, a) && hasFloatingIP(l, a) })
	// Dirty pages on a's file system, written back after the cut (ext4
	// commits every 5 s) or by the unmount. Not written during the cut:
	// with writes held, a writer blocks in the kernel with the file open,
	// and an unmount then fails with EBUSY (an application holding its
	// files is what `lazy: true` is for).
	dirty := fmt.Sprintf("/proc/%d/root%s", a.cmd.Process.Pid, filepath.Join(a.dir, "mnt", "dirty"))
	if err := os.WriteFile(dirty, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}

	l.cut("a", []string{"b", "w"}, false)
	waitFor(t, 30*time.Second, "a holding writes and b serving with the file system", func() bool {
		sa, err := a.status()
		return err == nil && sa.Fence == "suspend" && b.writable() && mounted(t, b)
	})

	l.heal("a")
	healed := time.Now()
	waitFor(t, 3*mountTimeout, "a Secondary with its file system unmounted and the device detached", func() bool {
		st, err := a.status()
		return err == nil && st.Role == "Secondary" && !mounted(t, a) && !hasFloatingIP(l, a)
	})
	took := time.Since(healed)
	t.Logf("heal to a stepped down, unmounted and detached: %v", took.Round(time.Millisecond))
	if took >= mountTimeout {
		t.Fatalf("stepping down took %v, the mount's timeout: the unmount waited on held writes", took)
	}
	if a.decided("demote", "resources failed to stop") || !a.decided("fence", "stepping down for b: writes fail (EIO)") {
		t.Fatalf("a's step-down decisions: %+v", a.decisions())
	}
	if log := orderLog(t, a); len(log) == 0 || log[len(log)-1] != "attach_stop" {
		t.Fatalf("a's order log %v: the device was not detached after the unmount", log)
	}
	l.backInSync(a, b)
}
