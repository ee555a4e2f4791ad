package tests

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// A minimal NBD client written from the protocol document, not from the
// server's code: the constants are the spec's numbers, so a wrong constant
// in the server shows up here instead of cancelling out.

const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic    = 0x49484156454F5054 // "IHAVEOPT"
	nbdRepMagic    = 0x0003e889045565a9
	nbdReqMagic    = 0x25609513
	nbdSimpleReply = 0x67446698

	nbdFlagFixedNewstyle = 1 << 0
	nbdFlagNoZeroes      = 1 << 1

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optInfo       = 6
	optGo         = 7

	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 1<<31 | 1
	repErrUnknown = 1<<31 | 6

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendFUA      = 1 << 3
	tflagSendTrim     = 1 << 5
	tflagWriteZeroes  = 1 << 6
	tflagCanMultiConn = 1 << 8

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA = 1 << 0

	errnoPerm    = 1
	errnoInval   = 22
	errnoNoSpace = 28
	errnoOverflw = 75
)

// ioTimeout bounds every exchange, so a server that stops answering fails
// the test instead of hanging it.
const ioTimeout = 30 * time.Second

type nbdClient struct {
	nc     net.Conn
	br     *bufio.Reader
	Size   uint64
	Flags  uint16
	cookie uint64
}

// dialNBD connects and negotiates export with NBD_OPT_GO.
func dialNBD(network, addr, export string) (*nbdClient, error) {
	c, err := dialRaw(network, addr)
	if err != nil {
		return nil, err
	}
	if err := c.hello(nbdFlagFixedNewstyle | nbdFlagNoZeroes); err != nil {
		c.Close()
		return nil, err
	}
	if err := c.optGo(export); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// dialRaw connects without saying anything.
func dialRaw(network, addr string) (*nbdClient, error) {
	nc, err := net.DialTimeout(network, addr, ioTimeout)
	if err != nil {
		return nil, err
	}
	return &nbdClient{nc: nc, br: bufio.NewReaderSize(nc, 1<<20)}, nil
}

func (c *nbdClient) Close() error { return c.nc.Close() }

func (c *nbdClient) deadline() { _ = c.nc.SetDeadline(time.Now().Add(ioTimeout)) }

func (c *nbdClient) write(b []byte) error {
	c.deadline()
	_, err := c.nc.Write(b)
	return err
}

func (c *nbdClient) readFull(n int) ([]byte, error) {
	c.deadline()
	b := make([]byte, n)
	_, err := io.ReadFull(c.br, b)
	return b, err
}

// hello reads the server greeting and sends the client flags.
func (c *nbdClient) hello(clientFlags uint32) error {
	b, err := c.readFull(18)
	if err != nil {
		return fmt.Errorf("read greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(b); m != nbdMagic {
		return fmt.Errorf("greeting magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(b[8:]); m != nbdOptMagic {
		return fmt.Errorf("greeting is not newstyle: %#x", m)
	}
	if f := binary.BigEndian.Uint16(b[16:]); f&nbdFlagFixedNewstyle == 0 {
		return fmt.Errorf("server is not fixed newstyle: flags %#x", f)
	}
	return c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
}

// sendOptionMagic sends one option with the given magic.
func (c *nbdClient) sendOptionMagic(magic uint64, opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, magic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return c.write(append(b, data...))
}

func (c *nbdClient) sendOption(opt uint32, data []byte) error {
	return c.sendOptionMagic(nbdOptMagic, opt, data)
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *nbdClient) readOptReply() (optReply, error) {
	h, err := c.readFull(20)
	if err != nil {
		return optReply{}, fmt.Errorf("read option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h); m != nbdRepMagic {
		return optReply{}, fmt.Errorf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	n := binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		return r, fmt.Errorf("option reply length %d", n)
	}
	r.data, err = c.readFull(int(n))
	return r, err
}

// optGo sends NBD_OPT_GO (requesting block sizes) and reads replies up to
// the ACK, recording size and flags.
func (c *nbdClient) optGo(export string) error {
	return c.infoOrGo(optGo, export)
}

func (c *nbdClient) infoOrGo(opt uint32, export string) error {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint16(d, 1)
	d = binary.BigEndian.AppendUint16(d, infoBlockSize)
	if err := c.sendOption(opt, d); err != nil {
		return err
	}
	gotExport := false
	for {
		r, err := c.readOptReply()
		if err != nil {
			return err
		}
		if r.opt != opt {
			return fmt.Errorf("reply for option %d, want %d", r.opt, opt)
		}
		switch r.typ {
		case repAck:
			if !gotExport {
				return errors.New("ACK without NBD_INFO_EXPORT")
			}
			return nil
		case repInfo:
			if len(r.data) >= 12 && binary.BigEndian.Uint16(r.data) == infoExport {
				c.Size = binary.BigEndian.Uint64(r.data[2:])
				c.Flags = binary.BigEndian.Uint16(r.data[10:])
				gotExport = true
			}
		default:
			return &optError{opt: opt, typ: r.typ, msg: string(r.data)}
		}
	}
}

type optError struct {
	opt, typ uint32
	msg      string
}

func (e *optError) Error() string {
	return fmt.Sprintf("option %d: error reply %#x: %s", e.opt, e.typ, e.msg)
}

// Transmission.

func (c *nbdClient) sendRequest(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) error {
	b := make([]byte, 28, 28+len(payload))
	binary.BigEndian.PutUint32(b[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return c.write(append(b, payload...))
}

// readReplyHeader reads one simple reply header.
func (c *nbdClient) readReplyHeader() (errno uint32, cookie uint64, err error) {
	h, err := c.readFull(16)
	if err != nil {
		return 0, 0, fmt.Errorf("read reply: %w", err)
	}
	if m := binary.BigEndian.Uint32(h); m != nbdSimpleReply {
		return 0, 0, fmt.Errorf("reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:]), nil
}

// do sends one request and waits for its reply (no other request may be in
// flight). A read's data is returned when errno is 0.
func (c *nbdClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte, error) {
	c.cookie++
	cookie := c.cookie
	if err := c.sendRequest(typ, flags, cookie, off, length, payload); err != nil {
		return 0, nil, err
	}
	errno, got, err := c.readReplyHeader()
	if err != nil {
		return 0, nil, err
	}
	if got != cookie {
		return errno, nil, fmt.Errorf("reply cookie %d, want %d", got, cookie)
	}
	if typ == cmdRead && errno == 0 {
		data, err := c.readFull(int(length))
		return 0, data, err
	}
	return errno, nil, nil
}

func (c *nbdClient) read(off uint64, n uint32) (uint32, []byte, error) {
	return c.do(cmdRead, 0, off, n, nil)
}

func (c *nbdClient) writeAt(off uint64, p []byte, flags uint16) (uint32, error) {
	errno, _, err := c.do(cmdWrite, flags, off, uint32(len(p)), p)
	return errno, err
}

func (c *nbdClient) flush() (uint32, error) {
	errno, _, err := c.do(cmdFlush, 0, 0, 0, nil)
	return errno, err
}

// mustRead reads and requires success.
func (c *nbdClient) mustRead(off uint64, n uint32) ([]byte, error) {
	errno, data, err := c.read(off, n)
	if err != nil {
		return nil, err
	}
	if errno != 0 {
		return nil, fmt.Errorf("read %d@%d: errno %d", n, off, errno)
	}
	return data, nil
}

// mustWrite writes and requires success.
func (c *nbdClient) mustWrite(off uint64, p []byte, flags uint16) error {
	errno, err := c.writeAt(off, p, flags)
	if err != nil {
		return err
	}
	if errno != 0 {
		return fmt.Errorf("write %d@%d: errno %d", len(p), off, errno)
	}
	return nil
}

// disconnect sends NBD_CMD_DISC and closes.
func (c *nbdClient) disconnect() error {
	err := c.sendRequest(cmdDisc, 0, 0, 0, 0, nil)
	if cerr := c.Close(); err == nil {
		err = cerr
	}
	return err
}

// expectClosed waits for the server to close the connection: EOF or a
// reset, not silence. Bytes the server sends first are ignored.
func (c *nbdClient) expectClosed(timeout time.Duration) error {
	_ = c.nc.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 4096)
	for {
		_, err := c.br.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) {
			return fmt.Errorf("server kept the connection open for %v", timeout)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil
		}
		return fmt.Errorf("waiting for close: %w", err)
	}
}
