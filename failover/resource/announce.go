package resource

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// announcer sends the packets that tell a link's neighbours an address has
// moved here. The socket is opened in the caller's network namespace.
type announcer struct {
	fd   int
	pkt  []byte
	dest unix.Sockaddr
}

// newAnnouncer opens the socket and builds the packet: for IPv4 a
// gratuitous ARP request (sender and target IP both the address, target
// MAC zero, to the broadcast MAC) on an AF_PACKET socket, which every host
// on the segment accepts to refresh an existing entry; for IPv6 an
// unsolicited neighbour advertisement with the Override flag to the
// all-nodes group (RFC 4861 7.2.6).
func newAnnouncer(link netlink.Link, addr netip.Addr) (*announcer, error) {
	attrs := link.Attrs()
	mac := attrs.HardwareAddr
	if addr.Is4() || addr.Is4In6() {
		if len(mac) != 6 {
			return nil, fmt.Errorf("interface %s has no Ethernet address (%q): cannot send ARP", attrs.Name, mac)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
		if err != nil {
			return nil, fmt.Errorf("packet socket: %w", err)
		}
		ip := addr.Unmap().As4()
		return &announcer{
			fd:   fd,
			pkt:  arpPacket(mac, ip),
			dest: &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: attrs.Index, Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		}, nil
	}
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMPV6)
	if err != nil {
		return nil, fmt.Errorf("icmpv6 socket: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	// Neighbour discovery packets must carry hop limit 255 (receivers
	// drop others as possibly forwarded from off-link); the kernel fills in
	// the ICMPv6 checksum of a raw ICMPv6 socket.
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, 255); err != nil {
		return nil, fmt.Errorf("hop limit: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, attrs.Index); err != nil {
		return nil, fmt.Errorf("multicast interface: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{Addr: addr.As16(), ZoneId: uint32(attrs.Index)}); err != nil {
		return nil, fmt.Errorf("bind to %s: %w", addr, err)
	}
	ok = true
	return &announcer{
		fd:   fd,
		pkt:  naPacket(mac, addr.As16()),
		dest: &unix.SockaddrInet6{Addr: [16]byte{0: 0xff, 1: 0x02, 15: 0x01}, ZoneId: uint32(attrs.Index)},
	}, nil
}

func (a *announcer) send() error {
	if err := unix.Sendto(a.fd, a.pkt, 0, a.dest); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	return nil
}

func (a *announcer) close() { unix.Close(a.fd) }

// arpPacket is a gratuitous ARP request (RFC 5227 "ARP Announcement").
func arpPacket(mac net.HardwareAddr, ip [4]byte) []byte {
	p := make([]byte, 0, 28)
	p = binary.BigEndian.AppendUint16(p, 1)      // hardware type Ethernet
	p = binary.BigEndian.AppendUint16(p, 0x0800) // protocol IPv4
	p = append(p, 6, 4)
	p = binary.BigEndian.AppendUint16(p, 1) // request
	p = append(p, mac...)
	p = append(p, ip[:]...)
	p = append(p, 0, 0, 0, 0, 0, 0)
	return append(p, ip[:]...)
}

// naPacket is an unsolicited neighbour advertisement (type 136) with the
// Override flag and the target link-layer address option; the checksum is
// left to the kernel.
func naPacket(mac net.HardwareAddr, target [16]byte) []byte {
	p := []byte{136, 0, 0, 0, 0x20, 0, 0, 0} // type, code, checksum, flags (O)
	p = append(p, target[:]...)
	if len(mac) > 0 {
		opt := []byte{2, byte((2 + len(mac) + 7) / 8)}
		opt = append(opt, mac...)
		for len(opt)%8 != 0 {
			opt = append(opt, 0)
		}
		p = append(p, opt...)
	}
	return p
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
