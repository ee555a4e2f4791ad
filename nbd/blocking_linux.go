package nbd

import (
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mirrord/mirrord/internal/busypoll"
)

// blockingConn is a socket read and written with plain blocking syscalls on
// the connection's own thread, as a threaded C server does, not through
// Go's poller, which adds an EAGAIN read, a park of the reader and an
// epoll_wait to every burst that finds the socket empty. The fd is
// blocking, so os.File makes plain syscalls, and it keeps a Close racing a
// blocked Read or a reply's Write safe.
//
// The price is a P: a goroutine blocked in read(2) keeps its P until
// sysmon takes it back, so the server gives listener connections a thread
// of their own only while GOMAXPROCS leaves one P free for everything else
// (ReserveP), and the kernel's connections get Ps of their own from
// cmd/mirrord.
//
// Deadlines: only one in the past is honoured, as "stop reading" (what
// Server.Shutdown asks): shutdown(SHUT_RD) ends a blocked read with EOF
// while replies can still be written.
type blockingConn struct {
	f             *os.File
	poll          *busypoll.Poller // nil: reads only block
	local, remote net.Addr
}

// blocking returns a blockingConn for a connected unix or TCP socket (a dup
// of its fd; nc is closed), or ok false and nc untouched if nc is another
// kind of conn or the dup fails. Its reads poll for up to poll while
// requests are flowing (busypoll).
func blocking(nc net.Conn, poll time.Duration) (_ net.Conn, ok bool) {
	sc, isSock := nc.(syscall.Conn)
	if !isSock {
		return nc, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nc, false
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(s uintptr) { fd, derr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
		return nc, false
	}
	// O_NONBLOCK belongs to the open file, shared with nc's fd, which is
	// closed next and no longer polled.
	if err := unix.SetNonblock(fd, false); err != nil {
		_ = unix.Close(fd)
		return nc, false
	}
	bc := &blockingConn{f: os.NewFile(uintptr(fd), "nbd-conn"), local: nc.LocalAddr(), remote: nc.RemoteAddr()}
	bc.poll = busypoll.New(bc.f, poll)
	_ = nc.Close() // the dup keeps the socket open
	return bc, true
}

func (c *blockingConn) Read(b []byte) (int, error) {
	if c.poll == nil {
		return c.f.Read(b)
	}
	return c.poll.Read(b, c.f.Read)
}
func (c *blockingConn) Write(b []byte) (int, error) { return c.f.Write(b) }

func (c *blockingConn) shutdown(how int) error {
	rc, err := c.f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), how) }); err != nil {
		return err
	}
	return serr
}

func (c *blockingConn) Close() error {
	// Wakes a reader blocked on the fd; the close itself waits for it.
	_ = c.shutdown(unix.SHUT_RDWR)
	return c.f.Close()
}

func (c *blockingConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

func (c *blockingConn) SetReadDeadline(t time.Time) error {
	if !t.IsZero() && !t.After(time.Now()) {
		return c.shutdown(unix.SHUT_RD)
	}
	return nil
}

func (c *blockingConn) SetWriteDeadline(time.Time) error { return nil }
func (c *blockingConn) LocalAddr() net.Addr              { return c.local }
func (c *blockingConn) RemoteAddr() net.Addr             { return c.remote }
