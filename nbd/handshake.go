package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Handshake errors. A connection that fails the handshake is closed; the
// server keeps serving others.
var (
	ErrBadMagic      = errors.New("nbd: bad magic")
	ErrClientFlags   = errors.New("nbd: unsupported client flags")
	ErrAborted       = errors.New("nbd: client aborted negotiation")
	ErrUnknownExport = errors.New("nbd: unknown export")
	ErrOptionTooBig  = errors.New("nbd: option too large")
)

// negotiation holds the state of one fixed newstyle handshake. It reads
// from r and writes replies to w, flushing after each option so the client
// never waits on a buffered reply.
type negotiation struct {
	r        io.Reader
	w        *bufio.Writer
	exports  []*Export
	noZeroes bool
	buf      []byte
}

// run performs the handshake and returns the export the client chose.
func (n *negotiation) run() (*Export, error) {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], magicNBD)
	binary.BigEndian.PutUint64(hello[8:], magicOption)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := n.w.Write(hello[:]); err != nil {
		return nil, err
	}
	if err := n.w.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.r, cf[:]); err != nil {
		return nil, fmt.Errorf("read client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("%w: %#x", ErrClientFlags, clientFlags)
	}
	n.noZeroes = clientFlags&clientFlagNoZeroes != 0

	for {
		opt, data, err := n.readOption()
		if errors.Is(err, ErrOptionTooBig) {
			if err := n.reply(opt, RepErrTooBig, []byte("option too large")); err != nil {
				return nil, err
			}
			continue
		}
		if err != nil {
			return nil, err
		}
		exp, done, err := n.handleOption(opt, data)
		if err != nil || done {
			return exp, err
		}
	}
}

// readOption reads one option header and its data. An oversized option is
// drained so that parsing can continue, and reported as ErrOptionTooBig.
func (n *negotiation) readOption() (opt uint32, data []byte, err error) {
	var h [16]byte
	if _, err := io.ReadFull(n.r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("read option header: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOption {
		return 0, nil, fmt.Errorf("%w: option magic %#x", ErrBadMagic, m)
	}
	opt = binary.BigEndian.Uint32(h[8:])
	length := binary.BigEndian.Uint32(h[12:])
	if length > maxOptionLength {
		if _, err := io.CopyN(io.Discard, n.r, int64(length)); err != nil {
			return opt, nil, fmt.Errorf("drain option %d: %w", opt, err)
		}
		return opt, nil, ErrOptionTooBig
	}
	if cap(n.buf) < int(length) {
		n.buf = make([]byte, length)
	}
	data = n.buf[:length]
	if _, err := io.ReadFull(n.r, data); err != nil {
		return opt, nil, fmt.Errorf("read option %d data: %w", opt, err)
	}
	return opt, data, nil
}

// handleOption answers one option. done reports that negotiation is over
// (the client chose an export, or aborted).
func (n *negotiation) handleOption(opt uint32, data []byte) (exp *Export, done bool, err error) {
	switch opt {
	case OptExportName:
		exp := n.lookup(string(data))
		if exp == nil {
			// The protocol gives EXPORT_NAME no error reply: closing is the
			// only answer.
			return nil, true, fmt.Errorf("%w: %q", ErrUnknownExport, data)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(exp.Device.Size()))
		binary.BigEndian.PutUint16(b[8:], exp.transmissionFlags())
		out := b[:]
		if n.noZeroes {
			out = b[:10]
		}
		if _, err := n.w.Write(out); err != nil {
			return nil, true, err
		}
		return exp, true, n.w.Flush()
	case OptAbort:
		// Best effort: the client may already have gone.
		_ = n.reply(opt, RepAck, nil)
		return nil, true, ErrAborted
	case OptList:
		if len(data) != 0 {
			return nil, false, n.reply(opt, RepErrInvalid, []byte("LIST takes no data"))
		}
		for _, e := range n.exports {
			b := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
			b = append(b, e.Name...)
			b = append(b, e.Description...)
			if err := n.reply(opt, RepServer, b); err != nil {
				return nil, false, err
			}
		}
		return nil, false, n.reply(opt, RepAck, nil)
	case OptInfo, OptGo:
		return n.infoOrGo(opt, data)
	default:
		// STARTTLS, STRUCTURED_REPLY, meta contexts and anything newer:
		// unsupported, and negotiation goes on.
		return nil, false, n.reply(opt, RepErrUnsup, []byte("option not supported"))
	}
}

func (n *negotiation) infoOrGo(opt uint32, data []byte) (*Export, bool, error) {
	name, infos, ok := parseInfoRequest(data)
	if !ok {
		return nil, false, n.reply(opt, RepErrInvalid, []byte("malformed INFO/GO request"))
	}
	exp := n.lookup(name)
	if exp == nil {
		return nil, false, n.reply(opt, RepErrUnknown, []byte("unknown export "+name))
	}
	b := binary.BigEndian.AppendUint16(nil, InfoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(exp.Device.Size()))
	b = binary.BigEndian.AppendUint16(b, exp.transmissionFlags())
	if err := n.reply(opt, RepInfo, b); err != nil {
		return nil, false, err
	}
	// Block sizes are sent whether asked for or not (the spec allows it):
	// min 1 because we accept any alignment, max MaxPayload.
	b = binary.BigEndian.AppendUint16(b[:0], InfoBlockSize)
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint32(b, PreferredBlockSize)
	b = binary.BigEndian.AppendUint32(b, MaxPayload)
	if err := n.reply(opt, RepInfo, b); err != nil {
		return nil, false, err
	}
	for _, t := range infos {
		var extra []byte
		switch t {
		case InfoName:
			extra = append(binary.BigEndian.AppendUint16(nil, InfoName), exp.Name...)
		case InfoDescription:
			extra = append(binary.BigEndian.AppendUint16(nil, InfoDescription), exp.Description...)
		default:
			continue
		}
		if err := n.reply(opt, RepInfo, extra); err != nil {
			return nil, false, err
		}
	}
	if err := n.reply(opt, RepAck, nil); err != nil {
		return nil, false, err
	}
	if opt == OptGo {
		return exp, true, nil
	}
	return nil, false, nil
}

// parseInfoRequest decodes the INFO/GO payload: u32 name length, name, u16
// count, count u16 info types. Every length must add up exactly.
func parseInfoRequest(data []byte) (name string, infos []uint16, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return "", nil, false
	}
	name = string(data[4 : 4+nl])
	rest := data[4+nl:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*count {
		return "", nil, false
	}
	infos = make([]uint16, count)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return name, infos, true
}

func (n *negotiation) lookup(name string) *Export {
	if name == "" && len(n.exports) > 0 {
		return n.exports[0]
	}
	for _, e := range n.exports {
		if e.Name == name {
			return e
		}
	}
	return nil
}

func (n *negotiation) reply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	if _, err := n.w.Write(h[:]); err != nil {
		return err
	}
	if _, err := n.w.Write(data); err != nil {
		return err
	}
	return n.w.Flush()
}
