package tests

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mirrord/mirrord/internal/wanproxy"
)

// The async journal and the catch-up undo log, end to end: a stalled link
// fills the window, then the journal, then the Primary goes Ahead; when
// the link recovers the journal drains and the catch-up resync runs. The
// Primary is killed (-9) at several points of that catch-up, and each
// time the target, promoted, is a consistent ext4 that fscks clean and
// holds every file written before the stall.

// writeTree writes n files of about size bytes under dir/sub and returns
// their sha256 by relative path.
func writeTree(t *testing.T, dir, sub string, n, size int) map[string]string {
	t.Helper()
	r := newRand(t)
	if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for i := range n {
		data := randomBytes(r, size/2+int(r.Uint64()%uint64(size)))
		name := filepath.Join(sub, fmt.Sprintf("f%03d", i))
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
		want[name] = sha256Bytes(data)
	}
	return want
}

func TestAsyncCatchUpKillPrimaryPromotesConsistentExt4(t *testing.T) {
	requireRoot(t)
	requireTools(t, "nbdfuse", "fusermount3", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck")
	const size = 128 << 20
	// Kill when the target has received this fraction of the catch-up, on
	// loopback and across the reference WAN (50 ms RTT, 100 Mbit/s).
	for _, tc := range []struct {
		link string
		wan  *wanproxy.Config
		frac float64
	}{{"loopback", nil, 0.02}, {"loopback", nil, 0.5}, {"loopback", nil, 0.9}, {"wan", &wanproxy.Config{Up: wan100, Down: wan100, Seed: 6}, 0.5}} {
		frac := tc.frac
		t.Run(fmt.Sprintf("%s at %.0f%%", tc.link, 100*frac), func(t *testing.T) {
			// A stall outlasts the 2 s test timeout; the window and the
			// journal are small so that the writes below overflow both.
			set := []string{"peer.timeout=20s", "peer.ping-interval=500ms", "peer.async-window=32MiB", "peer.journal.size=4MiB"}
			pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB", wan: tc.wan,
				alphaSet: append(set, "peer.resync-max-rate=4MiB"), betaSet: set})

			s := attachExport(t, pr.alpha.p, size, false)
			// No discard: a whole-device trim is one 128 MiB zero request,
			// which over the WAN sends the Primary Ahead before the test
			// has begun (it reserves its length in the window).
			runCmd(t, cmdTimeout, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", s.loop)
			s.mount("rw")
			before := writeTree(t, s.mnt, "before", 16, 256<<10)
			syscall.Sync()
			s.umount()
			pr.alpha.waitStatus("lag 0", stateTimeout, func(st mirrorStatus) bool {
				return st.Peer != nil && st.Peer.LagBytes == 0 && st.Peer.Replication == "Established"
			})

			pr.stall(true)
			s.mount("rw")
			writeTree(t, s.mnt, "during", 24, 2<<20) // ~48 MiB: window + journal overflow
			syscall.Sync()
			s.umount()
			s.detach(true)
			aSt := pr.alpha.waitStatus("Ahead", stateTimeout, func(st mirrorStatus) bool {
				return st.Peer != nil && st.Peer.Replication == "Ahead"
			})
			if j := aSt.Peer.Journal; j == nil || j.SpilledWrites == 0 || j.FullEvents == 0 {
				t.Fatalf("alpha Ahead without having filled the journal: %s", aSt.raw)
			}
			if aSt.Peer.LagBytes < 32<<20 || aSt.Peer.LagSeconds <= 0 {
				t.Fatalf("alpha Ahead: lag %d bytes, %.2f s; want the backlog", aSt.Peer.LagBytes, aSt.Peer.LagSeconds)
			}
			t.Logf("stalled: alpha Ahead, lag %d bytes / %.1f s, journal %d of %d bytes",
				aSt.Peer.LagBytes, aSt.Peer.LagSeconds, aSt.Peer.JournalBytes, aSt.Peer.JournalCapacity)

			base := pr.beta.status().Peer.ResyncBytes
			pr.stall(false)
			// The source knows the catch-up's size; the target counts what
			// arrived.
			aSt = pr.alpha.waitStatus("catch-up", resyncTimeout, func(st mirrorStatus) bool {
				return st.Peer.Replication == "SyncSource" && st.Peer.Resync != nil && st.Peer.Resync.TotalBytes > 0
			})
			total := aSt.Peer.Resync.TotalBytes
			bSt := pr.beta.waitStatus("catch-up under way", resyncTimeout, func(st mirrorStatus) bool {
				return st.UndoBytes > 0 && float64(st.Peer.ResyncBytes-base) >= frac*float64(total)
			})
			pr.alpha.p.kill()
			// The source's total in status grows with writes during the
			// catch-up; the target has the one announced at its start.
			if bSt.Peer.Replication != "Behind" || bSt.Peer.Resync == nil || bSt.Peer.Resync.TotalBytes == 0 || bSt.Peer.Resync.TotalBytes > total {
				t.Fatalf("beta in the catch-up: want Behind with the source's total (%d): %s", total, bSt.raw)
			}
			if bSt.Disk == "UpToDate" || bSt.Peer.ResyncBytes-base >= total {
				t.Fatalf("catch-up finished before the kill; slow it down: %s", bSt.brief())
			}
			bSt = pr.beta.waitDisconnected()
			if bSt.Disk != "Inconsistent" || bSt.UndoBytes == 0 {
				t.Fatalf("beta after the primary's death mid catch-up: %s undo %d", bSt.brief(), bSt.UndoBytes)
			}
			t.Logf("killed alpha at %d of %d catch-up bytes; beta's undo log holds %d bytes",
				bSt.Peer.ResyncBytes-base, total, bSt.UndoBytes)

			start := time.Now()
			pr.beta.promote()
			bSt = pr.beta.status()
			if bSt.Disk != "UpToDate" || bSt.UndoBytes != 0 {
				t.Fatalf("beta after promote: %s undo %d", bSt.brief(), bSt.UndoBytes)
			}
			t.Logf("promote with rollback took %v", time.Since(start).Round(time.Millisecond))

			// The promoted volume: mounting replays ext4's own journal (the
			// image is a point in time mid-write), then it must fsck clean
			// and hold every file written before the stall.
			b := attachExport(t, pr.beta.p, size, false)
			b.mount("rw")
			got := hashTree(t, b.mnt)
			for name, sum := range before {
				if got[name] != sum {
					t.Errorf("%s on the promoted target: sha256 %q, want %s", name, got[name], sum)
				}
			}
			b.umount()
			b.fsck()
			b.detach(true)
		})
	}
}

// TestAsyncLagBound: with peer.max-lag.bytes set, a stalled link reports
// its lag in status and events; "alert" only reports crossing the bound
// (both ways), "block" holds writes at the bound until the link recovers.
func TestAsyncLagBound(t *testing.T) {
	const bound = 8 << 20
	for _, policy := range []string{"alert", "block"} {
		t.Run(policy, func(t *testing.T) {
			set := []string{"peer.timeout=20s", "peer.ping-interval=500ms", "peer.async-window=32MiB", "peer.journal.size=64MiB"}
			pr := startPrimary(t, pairOptions{mode: "async", size: "64MiB", betaSet: set,
				alphaSet: append(set, fmt.Sprintf("peer.max-lag.bytes=%d", bound), "peer.lag-policy="+policy)})
			ev := pr.alpha.watchEvents()
			c, err := dialNBD("unix", pr.alpha.sock, "vol0")
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			pr.proxy.stall(true)
			const chunk, total = 256 << 10, 24 << 20
			var written atomic.Int64
			done := make(chan error, 1)
			go func() {
				buf := make([]byte, chunk)
				for off := int64(0); off < total; off += chunk {
					if err := c.mustWrite(uint64(off), buf, 0); err != nil {
						done <- err
						return
					}
					written.Add(chunk)
				}
				done <- nil
			}()
			// On a loaded machine `mirrord events` may subscribe after the
			// crossing: its first line ("exists") then carries it.
			over := ev.waitEvent(t, "lag over the bound", stateTimeout, func(e mirrorEvent) bool {
				return (e.Type == "lag" || e.Type == "exists") && e.Status.Peer != nil && e.Status.Peer.LagOverBound
			})
			if over.Status.Peer.LagBytes <= bound {
				t.Fatalf("lag event over the bound with lag %d bytes", over.Status.Peer.LagBytes)
			}
			if out := pr.alpha.mustCLI("status"); !strings.Contains(out, "lag:") || !strings.Contains(out, "policy:"+policy) {
				t.Fatalf("human status lacks the lag:\n%s", out)
			}
			if policy == "block" {
				// Held at the bound: the lag stays there and the writer
				// makes no progress while the link is stalled.
				st := pr.alpha.waitStatus("writes held at the bound", stateTimeout, func(s mirrorStatus) bool {
					return s.Peer.LagBytes >= bound
				})
				held := written.Load()
				if held >= total || st.Peer.LagBytes > bound+2*chunk {
					t.Fatalf("block policy: %d of %d bytes written, lag %d (bound %d)", held, total, st.Peer.LagBytes, bound)
				}
				for range 5 {
					if st := pr.alpha.status(); st.Peer.LagBytes > bound+2*chunk {
						t.Fatalf("block policy: lag %d past the bound %d", st.Peer.LagBytes, bound)
					}
				}
				if w := written.Load(); w > held+chunk {
					t.Fatalf("block policy: writes went on while held (%d then %d bytes)", held, w)
				}
				t.Logf("block: writer held at %d bytes, lag %d", held, st.Peer.LagBytes)
			} else if err := <-done; err != nil {
				t.Fatal(err) // alert never holds writes
			}
			pr.proxy.stall(false)
			if policy == "block" {
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			}
			ev.waitEvent(t, "lag back within the bound", resyncTimeout, func(e mirrorEvent) bool {
				return e.Type == "lag" && e.Status.Peer != nil && !e.Status.Peer.LagOverBound
			})
			pr.waitInSync(resyncTimeout)
			pr.stopAndCompare(t)
		})
	}
}

// aheadThenFlow stalls alpha's link, writes span bytes (each block once,
// in a random order; past the window and the journal), waits for alpha to
// go Ahead and lets the link flow again: the catch-up follows.
func (pr *mirrorPair) aheadThenFlow(t *testing.T, span int64) *seqWriter {
	t.Helper()
	pr.stall(true)
	w := startSeqWriter(t, pr.alpha, mirrorSeed(t), span, 16, 0)
	w.wait(t)
	pr.alpha.waitStatus("Ahead", stateTimeout, func(st mirrorStatus) bool { return st.Peer.Replication == "Ahead" })
	pr.stall(false)
	return w
}

// TestAsyncCatchUpBehindUndoCap: during a catch-up after Ahead the target
// says Behind, with progress against the total the source announced; with
// peer.undo-max-size smaller than the catch-up, the target stops at the
// cap (nothing past it written), says so in status, events and the log,
// and refuses the source until then; promoted, it rolls back to the image
// it held when the catch-up began: a write-order prefix of the history.
func TestAsyncCatchUpBehindUndoCap(t *testing.T) {
	const undoCap = 8 << 20
	set := []string{"peer.timeout=20s", "peer.ping-interval=500ms", "peer.async-window=32MiB", "peer.journal.size=4MiB"}
	pr := startPrimary(t, pairOptions{mode: "async", size: "128MiB",
		alphaSet: append(set, "peer.resync-max-rate=4MiB"), betaSet: append(set, fmt.Sprintf("peer.undo-max-size=%d", undoCap))})
	ev := pr.beta.watchEvents()
	w := pr.aheadThenFlow(t, 48<<20)

	bSt := pr.beta.waitStatus("Behind with the announced total", resyncTimeout, func(st mirrorStatus) bool {
		return st.Peer != nil && st.Peer.Replication == "Behind" && st.Peer.Resync != nil && st.Peer.Resync.TotalBytes > undoCap
	})
	t.Logf("beta Behind: %d of %d bytes, undo %d", bSt.Peer.Resync.DoneBytes, bSt.Peer.Resync.TotalBytes, bSt.UndoBytes)
	if bSt.Disk != "Inconsistent" {
		t.Fatalf("beta Behind with disk %s", bSt.Disk)
	}
	if out := pr.beta.mustCLI("status"); !strings.Contains(out, "Behind") || !strings.Contains(out, "done:") {
		t.Fatalf("human status of a Behind target lacks its state or progress:\n%s", out)
	}

	ev.waitEvent(t, "the undo log full", resyncTimeout, func(e mirrorEvent) bool { return e.Type == "undo" })
	waitFor(t, stateTimeout, "beta to refuse the source while its undo log is full", func() bool {
		return pr.beta.logCount("peer connection refused", "undo log full") > 0
	})
	bSt = pr.beta.status()
	if bSt.Disk != "Inconsistent" || bSt.UndoBytes == 0 || bSt.UndoBytes > undoCap || bSt.UndoLimitBytes != undoCap {
		t.Fatalf("beta paused at the cap: %s undo %d limit %d", bSt.brief(), bSt.UndoBytes, bSt.UndoLimitBytes)
	}
	if out := pr.beta.mustCLI("status"); !strings.Contains(out, "undo:") || !strings.Contains(out, "cap ") {
		t.Fatalf("human status lacks the undo log and its cap:\n%s", out)
	}
	pr.alpha.waitStatus("the pause in alpha's status", stateTimeout, func(st mirrorStatus) bool {
		return st.disconnected() && strings.Contains(st.Peer.Reason, "undo log full")
	})
	t.Logf("paused: beta's undo log holds %d of %d bytes; alpha: %q", bSt.UndoBytes, undoCap, pr.alpha.status().Peer.Reason)

	pr.alpha.p.kill()
	pr.beta.promote()
	if st := pr.beta.status(); st.Disk != "UpToDate" || st.UndoBytes != 0 {
		t.Fatalf("beta after promote: %s undo %d", st.brief(), st.UndoBytes)
	}
	data, err := os.ReadFile(pr.beta.path)
	if err != nil {
		t.Fatal(err)
	}
	held := w.requirePrefix(t, "beta rolled back", data[:pr.size])
	if held == 0 || held == w.h.seq.Load() {
		t.Fatalf("beta rolled back to %d of %d versions: want the prefix the window and journal delivered", held, w.h.seq.Load())
	}
	t.Logf("beta rolled back to versions 1..%d of %d", held, w.h.seq.Load())
}
