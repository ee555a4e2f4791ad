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
