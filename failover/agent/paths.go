package agent

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"

	"github.com/rs/zerolog"
)

func randomBoot() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:])
}

// UDPPath is a heartbeat path of its own: one UDP socket bound to Listen,
// sending to Peer. On another interface than the replication link it
// survives what cuts that link (LifeKeeper's second communication path).
type UDPPath struct {
	name string
	conn *net.UDPConn
	peer *net.UDPAddr
	wg   sync.WaitGroup
}

// ListenUDP opens a UDP path named name and hands what it receives from
// peer to recv (normally Agent.Receive). Datagrams from other addresses
// are dropped before they are decoded.
func ListenUDP(name, listen, peer string, recv func(path string, b []byte), log zerolog.Logger) (*UDPPath, error) {
	la, err := net.ResolveUDPAddr("udp", listen)
	if err != nil {
		return nil, fmt.Errorf("heartbeat path %s: listen %q: %w", name, listen, err)
	}
	pa, err := net.ResolveUDPAddr("udp", peer)
	if err != nil {
		return nil, fmt.Errorf("heartbeat path %s: peer %q: %w", name, peer, err)
	}
	c, err := net.ListenUDP("udp", la)
	if err != nil {
		return nil, fmt.Errorf("heartbeat path %s: %w", name, err)
	}
	p := &UDPPath{name: name, conn: c, peer: pa}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, MaxMessage+1)
		for {
			n, from, err := c.ReadFromUDP(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				log.Debug().Err(err).Str("path", name).Msg("heartbeat receive")
				continue
			}
			if !from.IP.Equal(pa.IP) || from.Port != pa.Port {
				continue
			}
			recv(name, buf[:n])
		}
	}()
	return p, nil
}

// Name is the path's name.
func (p *UDPPath) Name() string { return p.name }

// Addr is the local address (for tests that listen on port 0).
func (p *UDPPath) Addr() net.Addr { return p.conn.LocalAddr() }

// Send sends one datagram; a full socket buffer drops it.
func (p *UDPPath) Send(b []byte) error {
	_, err := p.conn.WriteToUDP(b, p.peer)
	return err
}

// Close closes the socket.
func (p *UDPPath) Close() error {
	err := p.conn.Close()
	p.wg.Wait()
	return err
}

// LinkSender is the replication link's side of a path (mirror.Volume).
type LinkSender interface {
	SendBeacon(p []byte) error
}

// LinkPath sends messages as FrameBeacon on the replication session. A
// send may block behind replicated data, so a goroutine of its own does
// the sending and a few messages wait (more are dropped); receiving is wired by
// the volume's OnBeacon option calling Agent.Receive.
type LinkPath struct {
	name string
	link LinkSender
	next chan []byte
	quit chan struct{}
	wg   sync.WaitGroup
}

// NewLinkPath returns the replication link path.
func NewLinkPath(name string, link LinkSender) *LinkPath {
	p := &LinkPath{name: name, link: link, next: make(chan []byte, 8), quit: make(chan struct{})}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			select {
			case <-p.quit:
				return
			case b := <-p.next:
				_ = p.link.SendBeacon(b) // not connected: the path is silent, as it should be
			}
		}
	}()
	return p
}

// Name is the path's name.
func (p *LinkPath) Name() string { return p.name }

// ErrBacklog: the link path is not keeping up and dropped a message.
var ErrBacklog = errors.New("heartbeat path backlog full")

// Send queues b; when the link is not keeping up, b is dropped.
func (p *LinkPath) Send(b []byte) error {
	select {
	case p.next <- b:
		return nil
	default:
		return ErrBacklog
	}
}

// Close stops the sender.
func (p *LinkPath) Close() error {
	close(p.quit)
	p.wg.Wait()
	return nil
}
