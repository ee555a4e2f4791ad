package failover

import (
	"flag"
	"fmt"
	"testing"
	"time"
)

// More seeds for a longer hunt: go test -run TestRandomPartitions -seeds 2000
var seedsFlag = flag.Int("seeds", 8, "random partition seeds")

// TestRandomPartitions is Jepsen's nemesis in miniature: random partitions
// (halves, one node, the witness, one path), kill -9 and restarts of either
// node or both, each followed by a heal, over two machines and a witness.
// Invariants, checked at every simulated instant:
//
//   - never two writable Primaries (and the writable timelines never
//     overlap);
//   - a Promote without Force never loses an acknowledged write (checked by
//     the simulated volume);
//   - a lost Primary is replaced when quorum and data allow: if the
//     Primary dies or is cut from both its peer and the witness while the
//     Secondary is up, reaches the witness and holds every acknowledged
//     write, the Secondary is writable within the episode;
//   - after the last heal exactly one node is writable and the other has
//     its data.
func TestRandomPartitions(t *testing.T) {
	const episodes = 25
	seeds := int64(*seedsFlag)
	liveness, promotions, fences, demotions := 0, 0, 0, 0
	for seed := int64(1); seed <= seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			// Variants: WAN timing; async replication (no freeze: the
			// quorum fence alone stops a cut-off Primary); Confirm mode
			// with an operator who answers late or says no; no witness
			// with a careful operator (confirms only when the peer is
			// really down: without a witness, the human is the third
			// vote).
			wan, confirm, noWitness := seed%4 == 0, seed%7 == 2, seed%6 == 3
			c := newCluster(t, seed, func(cfg *Config) {
				if wan {
					*cfg = withNames(DefaultWAN(), cfg)
				}
				if confirm {
					cfg.Mode, cfg.ConfirmTimeout = ModeConfirm, 3*cfg.DetectTimeout()
				}
				cfg.Witness = !noWitness
			})
			c.async = seed%5 == 1
			c.onIntent = func(n *simNode, a AnnounceIntent) {
				inc := n.inc
				c.after(time.Duration(c.rng.Int63n(int64(4*n.cfg.DetectTimeout()))), func() {
					if !n.up || n.inc != inc {
						return
					}
					p := c.peerOf(n)
					if (noWitness && !p.up) || (!noWitness && c.rng.Intn(4) > 0) {
						c.step(n, Confirm{})
					} else {
						c.step(n, Deny{})
					}
				})
			}
			c.run(3 * time.Second)
			D := c.n[0].cfg.DetectTimeout()
			for ep := 0; ep < episodes; ep++ {
				prim, sec := c.n[0], c.n[1]
				if sec.role == RolePrimary {
					prim, sec = sec, prim
				}
				// Can the Secondary take over if the Primary goes? The
				// machine's own preconditions, checked against ground
				// truth: it has every acknowledged write, has heard the
				// Primary report it in sync, and is not outdated.
				st := sec.m.Status()
				ready := prim.up && sec.up && prim.role == RolePrimary && prim.writable &&
					sec.disk == DiskUpToDate && sec.hash == c.acked.hash &&
					st.Peer.Seen && st.Peer.Role == RolePrimary && st.Peer.InSync &&
					!c.w.outdated[sec.name] && c.w.epoch <= st.Epoch+1
				hold := 300*time.Millisecond + time.Duration(c.rng.Int63n(int64(4*D)))
				primaryLost := false
				switch k := c.rng.Intn(15); k {
				case 0:
					c.cut(linkRepl, linkUDP)
				case 1:
					c.cut(linkRepl)
				case 2:
					c.cut(linkUDP)
				case 3:
					c.cut(linkRepl, linkUDP, wlink(prim))
					primaryLost = true
				case 4:
					c.cut(linkRepl, linkUDP, wlink(sec))
				case 5:
					c.cut("a-w", "b-w")
				case 6:
					c.cut(wlink(prim))
				case 7:
					c.cut(wlink(sec))
				case 8:
					c.crash(prim)
					primaryLost = true
				case 9:
					c.crash(sec)
				case 10:
					// Both sites die; one comes back after a while.
					c.crash(prim)
					c.crash(sec)
					c.run(time.Duration(c.rng.Int63n(int64(2 * D))))
					c.restart(c.n[c.rng.Intn(2)])
				case 11:
					for _, l := range []string{linkRepl, linkUDP, "a-w", "b-w"} {
						if c.rng.Intn(2) == 0 {
							c.cut(l)
						}
					}
				case 12:
					c.crash(prim)
					c.cut(wlink(sec))
				case 13:
					// One-way: the Secondary stops hearing the Primary,
					// which still hears it, and the Primary has lost the
					// witness.
					c.cut(linkRepl, wlink(prim))
					c.oneway[prim.name] = true
					c.logf("one-way: %s's heartbeats lost", prim.name)
				case 14:
					c.cut(linkRepl)
					c.oneway[c.n[c.rng.Intn(2)].name] = true
				}
				c.run(hold)
				if ready && primaryLost && hold >= D+D/2 && !confirm && !noWitness {
					liveness++
					if !sec.writable {
						c.fail("episode %d: %s lost, %s ready with quorum, but not promoted within %v", ep, prim.name, sec.name, hold)
					}
				}
				c.heal()
				for _, n := range c.n {
					c.restart(n)
				}
				c.run(D + time.Duration(c.rng.Int63n(int64(2*D))))
			}
			c.heal()
			c.run(3 * D)
			c.overlap()
			for _, n := range c.n {
				promotions += count[Promote](n, t0)
				fences += count[Fence](n, t0)
				demotions += count[Demote](n, t0)
			}
			w := c.writers()
			if len(w) != 1 {
				c.fail("after the final heal %d writable nodes", len(w))
			}
			o := c.peerOf(w[0])
			if o.role != RoleSecondary || o.hash != w[0].hash || o.disk != DiskUpToDate {
				c.fail("after the final heal %s is %s/%s, same data %v", o.name, o.role, o.disk, o.hash == w[0].hash)
			}
		})
	}
	if liveness < int(seeds) {
		t.Fatalf("the liveness check ran only %d times", liveness)
	}
	t.Logf("%d seeds: %d promotions, %d fences, %d demotions; liveness checked %d times", seeds, promotions, fences, demotions, liveness)
}

func withNames(c Config, from *Config) Config {
	c.Node, c.Peer, c.Witness = from.Node, from.Peer, from.Witness
	return c
}
