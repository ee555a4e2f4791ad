package mirror

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkAsyncWrite4K is the Primary's write path in async mode with the
// link stalled, so that only the local side is measured: "window" queues
// every write in memory (a window larger than the run), "journal" spills
// every write to the on-disk journal. It reports process CPU per write
// besides wall time.
func BenchmarkAsyncWrite4K(b *testing.B) {
	for _, bc := range []struct {
		name            string
		window, journal int64
	}{
		{"window", 1 << 30, -1},
		{"journal", 256 << 10, 1 << 30},
	} {
		b.Run(bc.name, func(b *testing.B) {
			a, _, fault := asyncPrimary(b, pairOpts{mode: ModeAsync, peer: journalPeer(bc.window, bc.journal)})
			fault.paused.Store(true)
			defer fault.paused.Store(false)
			buf := make([]byte, 4096)
			var r0, r1 unix.Rusage
			_ = unix.Getrusage(unix.RUSAGE_SELF, &r0)
			b.SetBytes(4096)
			b.ResetTimer()
			i := 0
			for b.Loop() {
				if err := a.v.WriteAt(buf, int64(i%2048)*4096, false); err != nil {
					b.Fatal(err)
				}
				i++
			}
			b.StopTimer()
			_ = unix.Getrusage(unix.RUSAGE_SELF, &r1)
			cpu := time.Duration(r1.Utime.Nano()+r1.Stime.Nano()-r0.Utime.Nano()-r0.Stime.Nano()) / time.Duration(max(i, 1))
			b.ReportMetric(float64(cpu.Nanoseconds()), "cpu-ns/write")
			if bc.journal > 0 && a.v.Status().Peer.Journal.SpilledWrites == 0 {
				b.Fatal("nothing spilled")
			}
		})
	}
}
