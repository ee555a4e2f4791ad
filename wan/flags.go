package wan

// HelloDiscardMine is the Hello.Flags bit saying an operator resolved a
// split brain against the sender: its changes since the split are to be
// overwritten by the peer's.
const HelloDiscardMine = uint16(1 << 1)
