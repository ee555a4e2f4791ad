package mirror

import "unsafe"

// unsafePointer keeps the one unsafe conversion (an ioctl argument) in one
// place.
func unsafePointer[T any](p *T) unsafe.Pointer { return unsafe.Pointer(p) }
