package wanproxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

// echoServer echoes every connection; it returns its address.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func start(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	p, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// TestDelay: a round trip takes at least both one-way delays, and not much more.
func TestDelay(t *testing.T) {
	p := start(t, Config{Target: echoServer(t), Up: Link{Delay: 20 * time.Millisecond}, Down: Link{Delay: 20 * time.Millisecond}})
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 1)
	for range 3 {
		t0 := time.Now()
		if _, err := c.Write([]byte{7}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		if rtt := time.Since(t0); rtt < 40*time.Millisecond || rtt > 400*time.Millisecond {
			t.Fatalf("round trip %v, want about 40ms", rtt)
		}
	}
}

// TestRate: a bulk transfer through a 4 MB/s link takes about size/rate.
func TestRate(t *testing.T) {
	const rate, size = 4 << 20, 2 << 20
	p := start(t, Config{Target: echoServer(t), Up: Link{Rate: rate}})
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	data := bytes.Repeat([]byte("x"), size)
	t0 := time.Now()
	go func() { _, _ = c.Write(data) }()
	if _, err := io.ReadFull(c, make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	el := time.Since(t0)
	if want := time.Duration(size * float64(time.Second) / rate); el < want*9/10 || el > want*3 {
		t.Fatalf("%d bytes at %d B/s took %v, want about %v", size, rate, el, want)
	}
}

// TestLossAndFilter: every chunk lost costs one RTO; a filter sees and may change
// the bytes.
func TestLossAndFilter(t *testing.T) {
	p := start(t, Config{Target: echoServer(t), Up: Link{Loss: 0.999, RTO: 50 * time.Millisecond},
		UpFilter: func(_ int, off int64, b []byte) {
			if off == 0 {
				b[0] ^= 0xff
			}
		}})
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t0 := time.Now()
	if _, err := c.Write([]byte{0x0f}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if buf[0] != 0xf0 {
		t.Fatalf("filter did not flip the byte: %#x", buf[0])
	}
	if el := time.Since(t0); el < 50*time.Millisecond {
		t.Fatalf("a lost chunk arrived after %v, want at least the RTO", el)
	}
	// The count follows the write the echo answered: poll for it.
	deadline := time.Now().Add(5 * time.Second)
	for up, _ := p.Delivered(); up != 1 || p.Connections() != 1; up, _ = p.Delivered() {
		if time.Now().After(deadline) {
			t.Fatalf("delivered %d bytes up over %d connections", up, p.Connections())
		}
		time.Sleep(time.Millisecond)
	}
}
