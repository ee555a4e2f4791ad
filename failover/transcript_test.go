package failover

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/*.txt")

// The transcripts under testdata are what an operator reads after the fact:
// every action and every recorded decision with its cause, for a few
// scenarios, on the simulated cluster. They change only when a decision or
// its wording does; go test -run TestTranscripts -update rewrites them.
func TestTranscripts(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(c *cluster)
	}{
		{"site-loss", func(c *cluster) {
			c.run(2 * time.Second)
			c.crash(c.n[0])
			c.run(3 * time.Second)
			c.restart(c.n[0])
			c.run(3 * time.Second)
		}},
		{"primary-isolated", func(c *cluster) {
			c.run(2 * time.Second)
			c.cut(linkRepl, linkUDP, "a-w")
			c.run(3 * time.Second)
			c.heal()
			c.run(2 * time.Second)
		}},
		{"cut-apart-witness-sees-both", func(c *cluster) {
			c.run(2 * time.Second)
			c.cut(linkRepl, linkUDP)
			c.run(4 * time.Second)
			c.heal()
			c.run(2 * time.Second)
		}},
		{"resource-failure", func(c *cluster) {
			// Cured by a local recovery, then broken for good: the
			// restart fails and a hands over to b.
			c.run(2 * time.Second)
			a := c.n[0]
			a.resources = true // set up as Primary, its chain up
			a.appFault = true
			c.monitor(a)
			c.run(500 * time.Millisecond)
			c.monitor(a)
			a.appFault, a.appBroken = true, true
			c.monitor(a)
			c.run(2 * time.Second)
		}},
		{"start-failure", func(c *cluster) {
			// b takes over a dead a, but its chain fails to start:
			// one more try (the local recovery), then b stays Primary
			// and retries every 10 s; once a is back in sync, b's next
			// failed retry hands the service to a, whose chain starts.
			c.run(2 * time.Second)
			c.n[1].startBroken = true
			c.crash(c.n[0])
			c.run(5 * time.Second)
			c.restart(c.n[0])
			c.run(15 * time.Second)
		}},
		{"switchover", func(c *cluster) {
			c.run(2 * time.Second)
			c.step(c.n[0], Switchover{})
			c.run(2 * time.Second)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, 1, nil)
			tc.run(c)
			got := strings.Join(c.trace, "\n") + "\n"
			path := filepath.Join("testdata", tc.name+".txt")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("%s differs from the run (go test -run TestTranscripts -update to accept):\n%s", path, got)
			}
		})
	}
}
