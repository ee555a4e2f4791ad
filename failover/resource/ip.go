package resource

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Floating IP announcement defaults: three announcements 200 ms apart, as
// keepalived and Pacemaker's IPaddr2 do, because a single gratuitous ARP
// is easily lost to a switch still learning the port.
const (
	DefaultARPCount    = 3
	DefaultARPInterval = 200 * time.Millisecond
)

// IP is a floating IP address: added to an interface on Start, then
// announced (gratuitous ARP for IPv4, unsolicited neighbour advertisement
// for IPv6) so that neighbours update their caches at once instead of
// after their entries time out.
type IP struct {
	// Address is the address with its prefix length (10.0.0.100/24).
	Address netip.Prefix
	// Interface is the link to add it to.
	Interface string
	// ARPCount announcements ARPInterval apart (defaults above). The first
	// is sent before Start returns, the rest in the background.
	ARPCount    int
	ARPInterval time.Duration
	Log         zerolog.Logger

	mu     sync.Mutex
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// Name implements Resource.
func (r *IP) Name() string { return "ip:" + r.Address.String() }

func (r *IP) addr() *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: r.Address.Addr().AsSlice(), Mask: net.CIDRMask(r.Address.Bits(), r.Address.Addr().BitLen())}}
	if r.Address.Addr().Is6() {
		// Skip duplicate address detection: the address moves between
		// nodes on purpose, and a tentative address could neither be
		// announced nor used for a second or more.
		a.Flags = unix.IFA_F_NODAD
	}
	return a
}

// Start implements Resource: AddrReplace (idempotent), then the
// announcements.
func (r *IP) Start(ctx context.Context) error {
	link, err := netlink.LinkByName(r.Interface)
	if err != nil {
		return fmt.Errorf("interface %s: %w", r.Interface, err)
	}
	if err := netlink.AddrReplace(link, r.addr()); err != nil {
		return fmt.Errorf("add %s to %s: %w", r.Address, r.Interface, err)
	}
	a, err := newAnnouncer(link, r.Address.Addr())
	if err != nil {
		return fmt.Errorf("announce %s on %s: %w", r.Address, r.Interface, err)
	}
	if err := a.send(); err != nil {
		a.close()
		return fmt.Errorf("announce %s on %s: %w", r.Address, r.Interface, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stopAnnouncing()
	actx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.cancel = cancel
	r.wg.Add(1)
	count, interval := r.ARPCount, r.ARPInterval
	if count <= 0 {
		count = DefaultARPCount
	}
	if interval <= 0 {
		interval = DefaultARPInterval
	}
	go func() {
		defer r.wg.Done()
		defer a.close()
		t := time.NewTicker(interval)
		defer t.Stop()
		for i := 1; i < count; i++ {
			select {
			case <-actx.Done():
				return
			case <-t.C:
			}
			if err := a.send(); err != nil {
				r.Log.Warn().Err(err).Str("address", r.Address.String()).Msg("announcement not sent")
			}
		}
	}()
	return nil
}

// stopAnnouncing ends the background announcements; r.mu held.
func (r *IP) stopAnnouncing() {
	if r.cancel != nil {
		r.cancel()
		r.wg.Wait()
		r.cancel = nil
	}
}

// Stop implements Resource: the address is removed; an address (or an
// interface) already gone is success.
func (r *IP) Stop(ctx context.Context) error {
	r.mu.Lock()
	r.stopAnnouncing()
	r.mu.Unlock()
	link, err := netlink.LinkByName(r.Interface)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("interface %s: %w", r.Interface, err)
	}
	if err := netlink.AddrDel(link, r.addr()); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("remove %s from %s: %w", r.Address, r.Interface, err)
	}
	return nil
}

// ErrAbsent: Monitor found the address missing.
var ErrAbsent = errors.New("address not on the interface")

// Monitor implements Resource: the address is on the interface.
func (r *IP) Monitor(ctx context.Context) error {
	link, err := netlink.LinkByName(r.Interface)
	if err != nil {
		return fmt.Errorf("interface %s: %w", r.Interface, err)
	}
	family := netlink.FAMILY_V4
	if r.Address.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(link, family)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", r.Interface, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if ok && ip.Unmap() == r.Address.Addr() && ones == r.Address.Bits() {
			return nil
		}
	}
	return fmt.Errorf("%s on %s: %w", r.Address, r.Interface, ErrAbsent)
}
