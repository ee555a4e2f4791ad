package wan

// HelloDiscardMine is the Hello.Flags bit saying an operator resolved a
// split brain against the sender: its changes since the split are to be
// overwritten by the peer's.
const HelloDiscardMine = uint16(1 << 1)

// HelloCatchUp is the Hello.Flags bit saying the sender understands
// FrameCatchUp. A node without it never receives one; a node older than
// the bit refuses a Hello carrying it as malformed ("hello flags 0x0008"),
// naming the bit, rather than misreading the stream.
const HelloCatchUp = uint16(1 << 3)

// Hello.Flags is split in two halves so that the protocol can grow without
// a version bump. The low byte holds required bits: a receiver that does
// not know one refuses the Hello, because misreading it would corrupt
// data (HelloDiscardMine, say). The high byte holds optional bits: a
// receiver that does not know one ignores it, and the sender, seeing no
// answer in the peer's Hello, falls back to what it did before the bit
// existed. Builds older than this split refuse optional bits too.
const (
	helloRequiredKnown = HelloNeverWritten | HelloDiscardMine | HelloZstd | HelloCatchUp
	// HelloOptional is the mask of the optional bits.
	HelloOptional = uint16(0xff00)
)

// HelloResyncHeld is an optional Hello.Flags bit: the sender is the target
// of an interrupted bitmap resync (a catch-up after Ahead, or a resync
// after a cut) and still holds the undo log of its last consistent image.
// Its Inconsistent disk is that image plus part of the resync, so a bitmap
// resync from the source's bitmap completes it; without the bit an
// Inconsistent peer of the same generation looks like an interrupted
// initial full sync and gets a full one. A peer that ignores the bit does
// exactly that: slower, never wrong.
const HelloResyncHeld = uint16(1 << 8)

// HelloStream is an optional Hello.Flags bit: the sender keeps positions
// in the async write stream (StreamPos). When both Hellos carry it, each
// side sends one FrameStream right after the handshake (ExchangeStream),
// so that a Secondary tells its Primary how much of the stream it holds
// across a disconnect or a restart. Without it on either side no
// FrameStream is sent.
const HelloStream = uint16(1 << 9)
