// Package nbd owns the Network Block Device protocol: the fixed newstyle
// handshake, the transmission phase with concurrent, out-of-order replies,
// and the mapping of device errors to NBD error codes. It serves any Device;
// it knows nothing about mirroring.
//
// go-nbd (github.com/pojntfx/go-nbd) supplies the wire constants and structs
// it has; its server is serial and lacks FLUSH, FUA, TRIM and WRITE_ZEROES,
// so the transmission loop here is our own.
package nbd

import (
	"errors"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// Handshake magics and flags (NBD protocol, "Fixed newstyle negotiation").
const (
	magicNBD      = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	magicOption   = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	magicOptReply = protocol.NEGOTIATION_MAGIC_REPLY

	flagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)

	clientFlagFixedNewstyle = uint32(1 << 0)
	clientFlagNoZeroes      = uint32(1 << 1)
)

// Option codes.
const (
	OptExportName     = uint32(1)
	OptAbort          = protocol.NEGOTIATION_ID_OPTION_ABORT
	OptList           = protocol.NEGOTIATION_ID_OPTION_LIST
	OptStartTLS       = uint32(5)
	OptInfo           = protocol.NEGOTIATION_ID_OPTION_INFO
	OptGo             = protocol.NEGOTIATION_ID_OPTION_GO
	OptStructuredRepl = uint32(8)
)

// Option reply types.
const (
	RepAck        = protocol.NEGOTIATION_TYPE_REPLY_ACK
	RepServer     = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	RepInfo       = protocol.NEGOTIATION_TYPE_REPLY_INFO
	RepErrUnsup   = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	RepErrPolicy  = uint32(2 | 1<<31)
	RepErrInvalid = uint32(3 | 1<<31)
	RepErrUnknown = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	RepErrTooBig  = uint32(9 | 1<<31)
)

// Info types carried in RepInfo replies.
const (
	InfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	InfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	InfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	InfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE
)

// Transmission flags advertised per export.
const (
	FlagHasFlags        = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	FlagReadOnly        = uint16(1 << 1)
	FlagSendFlush       = uint16(1 << 2)
	FlagSendFUA         = uint16(1 << 3)
	FlagSendTrim        = uint16(1 << 5)
	FlagSendWriteZeroes = uint16(1 << 6)
	FlagCanMultiConn    = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
)

// Commands.
const (
	CmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	CmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	CmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdWriteZeroes = uint16(6)
)

// Command flags.
const (
	CmdFlagFUA    = uint16(1 << 0)
	CmdFlagNoHole = uint16(1 << 1)
)

// Transmission magics.
const (
	magicRequest = protocol.TRANSMISSION_MAGIC_REQUEST
	magicReply   = protocol.TRANSMISSION_MAGIC_REPLY
)

// NBD error codes (the protocol fixes these numbers; they match Linux errno).
const (
	ErrnoPerm     = uint32(1)
	ErrnoIO       = uint32(5)
	ErrnoNoMem    = uint32(12)
	ErrnoInval    = uint32(22)
	ErrnoNoSpace  = uint32(28)
	ErrnoOverflow = uint32(75)
	ErrnoNotSup   = uint32(95)
	ErrnoShutdown = uint32(108)
)

const (
	// MaxPayload is the largest request we accept, the limit the NBD spec
	// asks every server to honour and that we advertise as the maximum
	// block size.
	MaxPayload = 32 << 20
	// PreferredBlockSize is advertised to clients: the page size, the unit
	// the dirty bitmap tracks by default.
	PreferredBlockSize = 4096

	requestHeaderSize = 28
	replyHeaderSize   = 16
	// maxOptionLength bounds what we read of one handshake option; real
	// options are a few hundred bytes at most (an export name is <= 4096).
	maxOptionLength = 64 << 10
)

// errnoOf maps a device error to the NBD error code sent to the client. A
// device reports a specific code by wrapping a syscall.Errno; anything else
// is an I/O error.
func errnoOf(err error) uint32 {
	var en syscall.Errno
	if !errors.As(err, &en) {
		return ErrnoIO
	}
	switch en {
	case syscall.EPERM, syscall.EROFS, syscall.EACCES:
		return ErrnoPerm
	case syscall.ENOMEM:
		return ErrnoNoMem
	case syscall.EINVAL:
		return ErrnoInval
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
		return ErrnoNoSpace
	case syscall.EOVERFLOW:
		return ErrnoOverflow
	case syscall.ENOTSUP:
		return ErrnoNotSup
	case syscall.ESHUTDOWN:
		return ErrnoShutdown
	default:
		return ErrnoIO
	}
}
