// Command wanproxy forwards TCP connections through an emulated WAN (package
// wanproxy): scripts/bench.sh puts it in the replication link.
//
//	wanproxy -listen 127.0.0.1:7000 -target 127.0.0.1:7001 -rtt 50ms [-rate 100Mbit] [-jitter 1ms] [-loss 0.001]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mirrord/mirrord/internal/units"

	"github.com/mirrord/mirrord/internal/wanproxy"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to accept on")
	target := flag.String("target", "", "address to forward to")
	rtt := flag.Duration("rtt", 0, "added round-trip time (half each way)")
	jitter := flag.Duration("jitter", 0, "random extra one-way delay, uniform in [0, jitter)")
	rateS := flag.String("rate", "0", "bandwidth each way, in bits/s with k, M or G (e.g. 100M); 0 unlimited")
	loss := flag.Float64("loss", 0, "probability a 16 KiB chunk is lost (costs one 200 ms RTO)")
	flag.Parse()
	rate, err := units.ParseBits(*rateS)
	if err != nil || *target == "" {
		fmt.Fprintf(os.Stderr, "wanproxy: need -target; -rate %q: %v\n", *rateS, err)
		os.Exit(2)
	}
	l := wanproxy.Link{Delay: *rtt / 2, Jitter: *jitter, Rate: rate / 8, Loss: *loss}
	p, err := wanproxy.Start(wanproxy.Config{Listen: *listen, Target: *target, Up: l, Down: l, Seed: uint64(time.Now().UnixNano())})
	if err != nil {
		fmt.Fprintf(os.Stderr, "wanproxy: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("wanproxy listening on %s -> %s\n", p.Addr(), *target)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = p.Close()
}
