//go:build !linux

package nbd

import "net"

// blocking is Linux only: elsewhere connections stay on Go's poller.
func blocking(nc net.Conn) (net.Conn, bool) { return nc, false }
