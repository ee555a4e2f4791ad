package nbd

import (
	"runtime"
	"sync"
)

// parked counts the goroutines, process-wide, that spend their time in
// blocking system calls, each keeping a P until sysmon takes it back (see
// blockingConn). They are held to GOMAXPROCS-1, so that one P always
// stays for everything else: with every P parked, a goroutine made
// runnable waits for sysmon (20 us to 10 ms).
var parked struct {
	mu sync.Mutex
	n  int
}

// ReserveP reserves a P for a goroutine about to park in blocking system
// calls, or reports false if that would leave no P free. The caller
// returns it with ReleaseP once it stops.
func ReserveP() bool {
	parked.mu.Lock()
	defer parked.mu.Unlock()
	if parked.n >= runtime.GOMAXPROCS(0)-1 {
		return false
	}
	parked.n++
	return true
}

// ReleaseP returns a P reserved by ReserveP.
func ReleaseP() {
	parked.mu.Lock()
	parked.n--
	parked.mu.Unlock()
}
