package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// The kernel's generic netlink family "nbd" (include/uapi/linux/nbd-netlink.h).
// vishvananda/netlink resolves the family and carries the messages; the
// attributes are ours.
const (
	genlFamilyName = "nbd"
	genlVersion    = 1
)

// Commands of the "nbd" family.
const (
	genlCmdConnect     = 1
	genlCmdDisconnect  = 2
	genlCmdReconfigure = 3
	genlCmdStatus      = 5
)

// Top-level attributes.
const (
	attrIndex             = 1  // u32
	attrSizeBytes         = 2  // u64
	attrBlockSizeBytes    = 3  // u64
	attrTimeout           = 4  // u64, seconds
	attrServerFlags       = 5  // u64, the NBD transmission flags
	attrClientFlags       = 6  // u64
	attrSockets           = 7  // nested list of attrSockItem
	attrDeadConnTimeout   = 8  // u64, seconds
	attrDeviceList        = 9  // nested list of attrDeviceItem
	attrBackendIdentifier = 10 // string
)

// Nested attributes: a socket item holds one fd; a device item an index and
// whether it is connected.
const (
	attrSockItem        = 1
	attrSockFD          = 1 // u32
	attrDeviceItem      = 1
	attrDeviceIndex     = 1 // u32
	attrDeviceConnected = 2 // u8
)

// nlaTypeMask strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from a type.
const nlaTypeMask = 0x3fff

// ErrNetlinkMessage means the kernel's reply could not be decoded.
var ErrNetlinkMessage = errors.New("nbd: malformed netlink message")

// linkConfig is what NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE carry. Zero
// fields are left out, so the kernel keeps its value (on reconfigure) or
// its default (on connect).
type linkConfig struct {
	Index           int // < 0: the kernel picks a free device (connect only)
	Size            uint64
	BlockSize       uint64
	Timeout         time.Duration
	DeadConnTimeout time.Duration
	ServerFlags     uint64
	ClientFlags     uint64
	FDs             []int
	Backend         string
}

// genlHeader is struct genlmsghdr. nl.Genlmsg serializes its two fields
// with whatever follows them in memory as the reserved bytes, so we write
// the four bytes ourselves.
type genlHeader struct{ cmd uint8 }

func (h genlHeader) Len() int          { return 4 }
func (h genlHeader) Serialize() []byte { return []byte{h.cmd, genlVersion, 0, 0} }

// newGenlRequest builds one request of the nbd family. The kernel answers
// every request with an ack (or an error), so it is always asked for.
func newGenlRequest(family uint16, cmd uint8, attrs ...*nl.RtAttr) *nl.NetlinkRequest {
	req := nl.NewNetlinkRequest(int(family), unix.NLM_F_ACK)
	req.AddData(genlHeader{cmd: cmd})
	for _, a := range attrs {
		req.AddData(a)
	}
	return req
}

func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	// The kernel counts whole seconds; round up so 500ms is not "none".
	return uint64((d + time.Second - 1) / time.Second)
}

// attrs encodes the configuration in the order nbd-client sends it.
func (c *linkConfig) attrs() []*nl.RtAttr {
	var a []*nl.RtAttr
	if c.Index >= 0 {
		a = append(a, nl.NewRtAttr(attrIndex, nl.Uint32Attr(uint32(c.Index))))
	}
	u64 := func(t int, v uint64) {
		if v != 0 {
			a = append(a, nl.NewRtAttr(t, nl.Uint64Attr(v)))
		}
	}
	u64(attrSizeBytes, c.Size)
	u64(attrBlockSizeBytes, c.BlockSize)
	u64(attrTimeout, seconds(c.Timeout))
	u64(attrDeadConnTimeout, seconds(c.DeadConnTimeout))
	u64(attrServerFlags, c.ServerFlags)
	if c.ClientFlags != 0 || c.FDs != nil {
		// Sent even when zero on connect, so a reused device does not keep
		// flags a previous user set.
		a = append(a, nl.NewRtAttr(attrClientFlags, nl.Uint64Attr(c.ClientFlags)))
	}
	if c.Backend != "" {
		a = append(a, nl.NewRtAttr(attrBackendIdentifier, nl.ZeroTerminated(c.Backend)))
	}
	if len(c.FDs) > 0 {
		socks := nl.NewRtAttr(attrSockets|unix.NLA_F_NESTED, nil)
		for _, fd := range c.FDs {
			item := socks.AddRtAttr(attrSockItem|unix.NLA_F_NESTED, nil)
			item.AddRtAttr(attrSockFD, nl.Uint32Attr(uint32(fd)))
		}
		a = append(a, socks)
	}
	return a
}

// nlAttr is one decoded attribute.
type nlAttr struct {
	typ uint16
	val []byte
}

// parseAttrs splits b into attributes. It never reads outside b: every
// length is checked, and a missing alignment pad after the last attribute
// is tolerated.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var out []nlAttr
	for len(b) > 0 {
		if len(b) < unix.SizeofRtAttr {
			return nil, fmt.Errorf("%w: %d trailing bytes", ErrNetlinkMessage, len(b))
		}
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofRtAttr || l > len(b) {
			return nil, fmt.Errorf("%w: attribute length %d with %d bytes left", ErrNetlinkMessage, l, len(b))
		}
		out = append(out, nlAttr{typ: binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask, val: b[unix.SizeofRtAttr:l]})
		b = b[min((l+3)&^3, len(b)):]
	}
	return out, nil
}

func (a nlAttr) u32() (uint32, error) {
	if len(a.val) != 4 {
		return 0, fmt.Errorf("%w: attribute %d has %d bytes, want 4", ErrNetlinkMessage, a.typ, len(a.val))
	}
	return binary.NativeEndian.Uint32(a.val), nil
}

// genlPayload strips the generic netlink header from a reply's data.
func genlPayload(msg []byte) ([]byte, error) {
	if len(msg) < 4 {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the genetlink header", ErrNetlinkMessage, len(msg))
	}
	return msg[4:], nil
}

// parseConnectReply returns the device index the kernel chose.
func parseConnectReply(msg []byte) (int, error) {
	p, err := genlPayload(msg)
	if err != nil {
		return 0, err
	}
	attrs, err := parseAttrs(p)
	if err != nil {
		return 0, err
	}
	for _, a := range attrs {
		if a.typ == attrIndex {
			i, err := a.u32()
			return int(i), err
		}
	}
	return 0, fmt.Errorf("%w: connect reply without a device index", ErrNetlinkMessage)
}

// DeviceStatus is one device in the kernel's status reply.
type DeviceStatus struct {
	Index     int
	Connected bool
}

// parseStatusReply decodes NBD_CMD_STATUS's device list.
func parseStatusReply(msg []byte) ([]DeviceStatus, error) {
	p, err := genlPayload(msg)
	if err != nil {
		return nil, err
	}
	top, err := parseAttrs(p)
	if err != nil {
		return nil, err
	}
	var out []DeviceStatus
	for _, t := range top {
		if t.typ != attrDeviceList {
			continue
		}
		items, err := parseAttrs(t.val)
		if err != nil {
			return nil, err
		}
		for _, it := range items {
			if it.typ != attrDeviceItem {
				continue
			}
			fields, err := parseAttrs(it.val)
			if err != nil {
				return nil, err
			}
			d := DeviceStatus{Index: -1}
			for _, f := range fields {
				switch f.typ {
				case attrDeviceIndex:
					i, err := f.u32()
					if err != nil {
						return nil, err
					}
					d.Index = int(i)
				case attrDeviceConnected:
					if len(f.val) != 1 {
						return nil, fmt.Errorf("%w: connected flag has %d bytes, want 1", ErrNetlinkMessage, len(f.val))
					}
					d.Connected = f.val[0] != 0
				}
			}
			if d.Index < 0 {
				return nil, fmt.Errorf("%w: device item without an index", ErrNetlinkMessage)
			}
			out = append(out, d)
		}
	}
	return out, nil
}

// genl talks to the kernel's nbd family.
type genl struct{ family uint16 }

// ErrNoNetlink means the kernel has no "nbd" generic netlink family: the nbd
// module is not loaded, or predates netlink support (Linux < 4.12).
var ErrNoNetlink = errors.New("nbd: no generic netlink family \"nbd\" (is the nbd module loaded?)")

func openGenl() (*genl, error) {
	f, err := netlink.GenlFamilyGet(genlFamilyName)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, ErrNoNetlink
		}
		return nil, fmt.Errorf("resolve netlink family %q: %w", genlFamilyName, err)
	}
	return &genl{family: f.ID}, nil
}

func (g *genl) do(cmd uint8, attrs ...*nl.RtAttr) ([][]byte, error) {
	return newGenlRequest(g.family, cmd, attrs...).Execute(unix.NETLINK_GENERIC, 0)
}

// connect attaches the sockets in c.FDs and returns the device index.
func (g *genl) connect(c *linkConfig) (int, error) {
	msgs, err := g.do(genlCmdConnect, c.attrs()...)
	if err != nil {
		return 0, fmt.Errorf("netlink connect: %w", err)
	}
	if len(msgs) == 0 {
		// Kernels before 4.13 send no reply; the index is the one we asked.
		if c.Index < 0 {
			return 0, fmt.Errorf("netlink connect: %w: no reply naming the device", ErrNetlinkMessage)
		}
		return c.Index, nil
	}
	return parseConnectReply(msgs[0])
}

// reconfigure hands a connected device fresh sockets (replacing dead ones)
// and new timeouts.
func (g *genl) reconfigure(c *linkConfig) error {
	if _, err := g.do(genlCmdReconfigure, c.attrs()...); err != nil {
		return fmt.Errorf("netlink reconfigure nbd%d: %w", c.Index, err)
	}
	return nil
}

func (g *genl) disconnect(index int) error {
	if _, err := g.do(genlCmdDisconnect, nl.NewRtAttr(attrIndex, nl.Uint32Attr(uint32(index)))); err != nil {
		return fmt.Errorf("netlink disconnect nbd%d: %w", index, err)
	}
	return nil
}

// status reports one device (index >= 0) or all of them.
func (g *genl) status(index int) ([]DeviceStatus, error) {
	var attrs []*nl.RtAttr
	if index >= 0 {
		attrs = append(attrs, nl.NewRtAttr(attrIndex, nl.Uint32Attr(uint32(index))))
	}
	msgs, err := g.do(genlCmdStatus, attrs...)
	if err != nil {
		return nil, fmt.Errorf("netlink status: %w", err)
	}
	var out []DeviceStatus
	for _, m := range msgs {
		d, err := parseStatusReply(m)
		if err != nil {
			return nil, err
		}
		out = append(out, d...)
	}
	return out, nil
}
