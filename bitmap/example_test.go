package bitmap_test

import (
	"fmt"

	"github.com/mirrord/mirrord/bitmap"
)

// A resync pass: copy each dirty run in bounded chunks, then clear the
// regions copied.
func ExampleBitmap_NextDirty() {
	b, err := bitmap.New(10000, bitmap.DefaultRegionSize) // three regions, the last 1808 bytes
	if err != nil {
		panic(err)
	}
	b.Set(100, 1)   // region 0
	b.Set(5000, 10) // region 1
	b.Set(9999, 1)  // region 2
	for pos := int64(0); ; {
		off, length, ok := b.NextDirty(pos, 8192)
		if !ok {
			break
		}
		fmt.Printf("copy %d+%d\n", off, length)
		b.ClearRegions(off, length)
		pos = off + length
	}
	fmt.Println("dirty:", b.Count())
	// Output:
	// copy 0+8192
	// copy 8192+1808
	// dirty: 0
}
