//go:build !linux

package nbd

import (
	"net"
	"time"
)

// blocking is Linux only: elsewhere connections stay on Go's poller.
func blocking(nc net.Conn, _ time.Duration) (net.Conn, bool) { return nc, false }
