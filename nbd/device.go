package nbd

// Device is the block device behind an export.
//
// Concurrency: every method may be called from many goroutines at once, from
// one or many connections, with overlapping ranges (NBD leaves the order of
// overlapping in-flight requests to the client; the device only has to keep
// each call atomic with respect to its own buffer).
//
// Buffers: p belongs to the server; the device must not retain it after the
// call returns (the io.WriterAt contract).
//
// Errors: an error fails that one request; the connection stays up. The NBD
// error code is taken from the syscall.Errno the error wraps (EPERM for a
// volume that is not writable here, ENOSPC for a full disk, ESHUTDOWN for a
// volume being closed), and is EIO otherwise. Whether an error fences the
// whole volume is the device's business, not the server's.
type Device interface {
	// Size is the export size in bytes. It is read once per connection.
	Size() int64
	// ReadAt fills p from offset off; the range is within Size.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at off. With fua set the data must be on stable
	// storage when it returns.
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every write that completed before the call stable.
	Flush() error
}

// LocalOnly is implemented by devices that can promise their reads and
// writes never wait on anything but the local disk (no network round
// trip, no held I/O). The server then serves a lone request on the
// connection's reader instead of a new goroutine. The answer must not
// change while the device is served.
type LocalOnly interface {
	LocalOnly() bool
}

// CachedReader is implemented by devices that can serve a read without
// blocking when its data is already in memory (the page cache). The server
// then answers such reads on the connection's reader and only hands reads
// that would wait for the disk to goroutines. ok false means "would block",
// not an error; p may then hold garbage.
type CachedReader interface {
	ReadCached(p []byte, off int64) (ok bool, err error)
}

// Trimmer is implemented by devices that can discard a range. Without it the
// server still advertises TRIM (it is advisory) and answers it as a no-op.
// After a successful Trim the range reads back as zeroes.
type Trimmer interface {
	Trim(off, length int64, fua bool) error
}

// Zeroer is implemented by devices that can zero a range without a data
// buffer. mayUnmap is false when the client sent NO_HOLE. Without it the
// server writes zero buffers through WriteAt.
type Zeroer interface {
	WriteZeroes(off, length int64, mayUnmap, fua bool) error
}

// WriteSplitter is implemented by LocalOnly devices for which a large
// write taken in two parts costs no more than taken whole (a standalone
// volume: two pwrites). The server then serves the part of a payload
// already in its read buffer in place, instead of copying it into a
// request buffer first (see peekHead). A device that replicates would
// ship each part as a frame of its own, and declines.
type WriteSplitter interface {
	SplitWrites() bool
}

// Export is one named volume offered to clients.
type Export struct {
	// Name is what clients ask for; the empty name, which clients send by
	// default, selects the first export.
	Name        string
	Description string
	Device      Device
	// ReadOnly exports refuse WRITE, TRIM and WRITE_ZEROES with EPERM and
	// advertise READ_ONLY.
	ReadOnly bool
}

func (e *Export) transmissionFlags() uint16 {
	f := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim |
		FlagSendWriteZeroes | FlagCanMultiConn
	if e.ReadOnly {
		f |= FlagReadOnly
	}
	return f
}

// AsyncWriter is implemented by devices whose writes wait on more than the
// local disk (a replicated write waits for its peer's acknowledgement).
// The server then starts a buffered (non-FUA) write on the connection's
// reader and learns of its end through WriteDone, instead of parking a
// goroutine per request until the device returns: no goroutine start, no
// wake-up of a parked one, and the writes of a burst can leave together.
// Devices that report LocalOnly are served inline instead.
type AsyncWriter interface {
	// WriteAsync starts writing p at off. It may block while it orders the
	// write behind an overlapping one or writes the local copy, never for
	// a round trip; before any wait that depends on other writes it sends
	// what it holds back. It calls w.Done exactly once, from any goroutine,
	// possibly before it returns; p stays valid until then. more says the
	// client's next request is already read: the device may hold this write
	// back to leave with the next ones, until Unplug.
	WriteAsync(p []byte, off int64, more bool, w WriteDone)
	// Unplug sends whatever WriteAsync held back. The server calls it
	// before it waits for the client.
	Unplug()
}

// WriteDone receives the result of an AsyncWriter's write.
type WriteDone interface {
	// Done answers the write. The reply may be held back to leave with
	// others: the device calls SendHeld after the last Done of a burst it
	// completes on a goroutine of its own (Done called from within
	// WriteAsync needs none; the server's reader sends it).
	Done(err error)
	SendHeld()
}

// Plugger is implemented by LocalOnly devices that can defer work (waking
// a sender goroutine, say) while the server serves a burst of requests on
// the connection's reader. The server calls PlugBurst before it serves a
// write inline with more requests already read, and UnplugBurst once the
// burst is served, before it waits for the client; the two are always
// paired, and several connections may be plugged at once.
type Plugger interface {
	PlugBurst()
	UnplugBurst()
}
