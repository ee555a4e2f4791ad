package resource

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// newNS returns a fresh unnamed network namespace, gone when the test ends
// (nothing is created in the test's own namespace or under /run).
func newNS(t *testing.T) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Fatalf("new network namespace (needs root): %v", err)
	}
	if err := netns.Set(orig); err != nil {
		panic(err) // the thread is locked and dies with the goroutine
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// inNS runs f on a thread switched into ns.
func inNS(t *testing.T, ns netns.NsHandle, f func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread() // else the thread dies with us
		}
	}()
	f()
}

// vethPair joins two new namespaces with a veth pair fq-a <-> fq-b, both up.
func vethPair(t *testing.T) (a, b netns.NsHandle, macA net.HardwareAddr) {
	a, b = newNS(t), newNS(t)
	ha, err := netlink.NewHandleAt(a)
	if err != nil {
		t.Fatal(err)
	}
	defer ha.Close()
	hb, err := netlink.NewHandleAt(b)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := ha.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "fq-a"}, PeerName: "fq-b", PeerNamespace: netlink.NsFd(b)}); err != nil {
		t.Fatalf("veth: %v", err)
	}
	for _, x := range []struct {
		h    *netlink.Handle
		name string
	}{{ha, "fq-a"}, {hb, "fq-b"}} {
		l, err := x.h.LinkByName(x.name)
		if err != nil {
			t.Fatal(err)
		}
		if err := x.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		if x.name == "fq-a" {
			macA = l.Attrs().HardwareAddr
		}
	}
	return a, b, macA
}

// capture opens a packet socket for ethertype in ns; packets queue from
// now on.
func capture(t *testing.T, ns netns.NsHandle, ethertype uint16) int {
	t.Helper()
	var fd int
	inNS(t, ns, func() {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(ethertype)))
		if err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { unix.Close(fd) })
	tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return fd
}

// await reads packets until match has accepted n of them or the deadline.
func await(t *testing.T, fd, n int, match func(p []byte) bool) []time.Time {
	t.Helper()
	var seen []time.Time
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for len(seen) < n && time.Now().Before(deadline) {
		k, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if match(buf[:k]) {
			seen = append(seen, time.Now())
		}
	}
	if len(seen) < n {
		t.Fatalf("saw %d matching packets, want %d", len(seen), n)
	}
	return seen
}

func TestFloatingIPv4(t *testing.T) {
	a, b, macA := vethPair(t)
	addr := netip.MustParsePrefix("192.0.2.10/24")
	r := &IP{Address: addr, Interface: "fq-a", ARPCount: 3, ARPInterval: 100 * time.Millisecond, Log: testLog(t)}
	ctx := context.Background()
	arps := capture(t, b, unix.ETH_P_ARP)
	started := time.Now()
	inNS(t, a, func() {
		if err := r.Monitor(ctx); !errors.Is(err, ErrAbsent) {
			t.Fatalf("monitor before start: %v", err)
		}
		if err := r.Start(ctx); err != nil {
			t.Fatalf("start: %v", err)
		}
		if err := r.Monitor(ctx); err != nil {
			t.Fatalf("monitor after start: %v", err)
		}
	})
	// Seen from the other namespace: three gratuitous ARP requests with
	// fq-a's MAC and the floating address as sender and target.
	want := addr.Addr().As4()
	seen := await(t, arps, 3, func(p []byte) bool {
		return len(p) >= 28 && p[7] == 1 && bytes.Equal(p[8:14], macA) && [4]byte(p[14:18]) == want && [4]byte(p[24:28]) == want
	})
	// The third is sent two intervals after the first, which is sent
	// after started.
	if d := seen[2].Sub(started); d < 200*time.Millisecond {
		t.Fatalf("three announcements within %v of the start, want them 100ms apart", d)
	}
	inNS(t, a, func() {
		// Starting again is harmless: still one address.
		if err := r.Start(ctx); err != nil {
			t.Fatalf("second start: %v", err)
		}
		l, _ := netlink.LinkByName("fq-a")
		addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		if len(addrs) != 1 {
			t.Fatalf("addresses after two starts: %v", addrs)
		}
		if err := r.Stop(ctx); err != nil {
			t.Fatalf("stop: %v", err)
		}
		if err := r.Monitor(ctx); !errors.Is(err, ErrAbsent) {
			t.Fatalf("monitor after stop: %v", err)
		}
		if err := r.Stop(ctx); err != nil {
			t.Fatalf("second stop: %v", err)
		}
		// And back (a failback).
		if err := r.Start(ctx); err != nil {
			t.Fatalf("restart: %v", err)
		}
		if err := r.Monitor(ctx); err != nil {
			t.Fatalf("monitor after restart: %v", err)
		}
		if err := r.Stop(ctx); err != nil {
			t.Fatalf("stop: %v", err)
		}
	})
	await(t, arps, 1, func(p []byte) bool { return len(p) >= 28 && [4]byte(p[14:18]) == want })
	// A missing interface is a clear error.
	inNS(t, a, func() {
		bad := &IP{Address: addr, Interface: "fq-none"}
		if err := bad.Start(ctx); err == nil {
			t.Fatal("start on a missing interface succeeded")
		}
	})
}

func TestFloatingIPv6(t *testing.T) {
	a, b, macA := vethPair(t)
	addr := netip.MustParsePrefix("2001:db8::10/64")
	r := &IP{Address: addr, Interface: "fq-a", ARPCount: 2, ARPInterval: 50 * time.Millisecond, Log: testLog(t)}
	ctx := context.Background()
	pkts := capture(t, b, unix.ETH_P_IPV6)
	inNS(t, a, func() {
		if err := r.Start(ctx); err != nil {
			t.Fatalf("start: %v", err)
		}
		if err := r.Monitor(ctx); err != nil {
			t.Fatalf("monitor: %v", err)
		}
	})
	want := addr.Addr().As16()
	// IPv6 header (40 bytes, next header ICMPv6, hop limit 255, source the
	// address), then a neighbour advertisement for it with Override and
	// fq-a's MAC as the target link-layer address.
	await(t, pkts, 2, func(p []byte) bool {
		return len(p) >= 40+32 && p[6] == 58 && p[7] == 255 && [16]byte(p[8:24]) == want &&
			p[40] == 136 && p[44]&0x20 != 0 && [16]byte(p[48:64]) == want && p[64] == 2 && bytes.Equal(p[66:72], macA)
	})
	inNS(t, a, func() {
		if err := r.Stop(ctx); err != nil {
			t.Fatalf("stop: %v", err)
		}
		if err := r.Monitor(ctx); !errors.Is(err, ErrAbsent) {
			t.Fatalf("monitor after stop: %v", err)
		}
	})
}
