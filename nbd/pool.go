package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes so that a steady
// stream of requests allocates nothing: 4 KiB up to MaxPayload.
const (
	minClassShift = 12
	maxClassShift = 25 // MaxPayload
)

var pools [maxClassShift - minClassShift + 1]sync.Pool

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length n (n <= MaxPayload). Its contents are
// undefined.
func getBuf(n int) *[]byte {
	c := classOf(n)
	if v := pools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	pools[classOf(cap(*b))].Put(b)
}
