package nbd

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// The kernel side: an export served to Linux's own NBD client, so the volume
// is /dev/nbdN. The kernel only speaks the transmission phase; what the
// handshake would say (size, flags) it is told through netlink (or, on
// kernels without the "nbd" netlink family, ioctls), together with a list
// of sockets. Each socket is one end of a socketpair whose other end this
// process serves.

// AnyDevice asks for the first free /dev/nbdN.
const AnyDevice = -1

// Defaults for KernelOptions.
const (
	// DefaultKernelConnections: the kernel spreads requests over its
	// connections (we advertise CAN_MULTI_CONN), one per hardware queue.
	DefaultKernelConnections = 4
	// DefaultKernelTimeout is the request timeout. With a dead-connection
	// timeout set, a request that times out is retried (on another
	// connection, or on the one a restarted mirrord hands over), not
	// failed; so it only bounds how long a lost request waits.
	DefaultKernelTimeout = 30 * time.Second
	// DefaultDeadConnTimeout is how long the kernel holds I/O while no
	// connection is alive: the window a restarted mirrord has to hand it
	// fresh sockets before the file system above sees errors.
	DefaultDeadConnTimeout = 2 * time.Minute
	// DefaultKernelBlockSize is the logical block size: the page size,
	// what ext4 and xfs use by default.
	DefaultKernelBlockSize = 4096
)

// Interfaces to the kernel's nbd driver.
const (
	InterfaceAuto    = ""        // netlink, else ioctl
	InterfaceNetlink = "netlink" // genetlink family "nbd" (Linux >= 4.12)
	InterfaceIoctl   = "ioctl"   // NBD_SET_SOCK and NBD_DO_IT
)

// Errors of the kernel attach.
var (
	// ErrDeviceInUse: the device is mounted or held open, so detaching it
	// would pull it from under its user.
	ErrDeviceInUse = errors.New("nbd: device in use")
	// ErrDeviceBusy: the device is connected to something else.
	ErrDeviceBusy = errors.New("nbd: device busy")
)

// KernelOptions say how an export becomes /dev/nbdN.
type KernelOptions struct {
	// Index is N in /dev/nbdN, or AnyDevice.
	Index int
	// Connections is the number of sockets (DefaultKernelConnections).
	Connections int
	// BlockSize is the logical block size (DefaultKernelBlockSize).
	BlockSize int64
	// Timeout is the request timeout (DefaultKernelTimeout).
	Timeout time.Duration
	// DeadConnTimeout is how long the kernel holds I/O with no live
	// connection (DefaultDeadConnTimeout); 0 fails I/O at once.
	DeadConnTimeout time.Duration
	// Backend names what the device serves (/sys/block/nbdN/backend). A
	// device found connected with the same name is taken over (a restart);
	// one with another name is refused. Netlink only.
	Backend string
	// Interface is InterfaceAuto, InterfaceNetlink or InterfaceIoctl.
	Interface string
}

func (o *KernelOptions) fill() {
	if o.Connections <= 0 {
		o.Connections = DefaultKernelConnections
	}
	if o.BlockSize <= 0 {
		o.BlockSize = DefaultKernelBlockSize
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultKernelTimeout
	}
	if o.DeadConnTimeout < 0 {
		o.DeadConnTimeout = 0
	}
}

// KernelDevice is an export attached as /dev/nbdN.
type KernelDevice struct {
	index      int
	iface      string
	reattached bool
	log        zerolog.Logger

	gl *genl // netlink

	dev  *os.File   // ioctl: the open device, NBD_DO_IT runs on it
	doIt chan error // ioctl: NBD_DO_IT's result

	mu       sync.Mutex
	detached bool
}

// Index is N in /dev/nbdN.
func (k *KernelDevice) Index() int { return k.index }

// Path is /dev/nbdN.
func (k *KernelDevice) Path() string { return devicePath(k.index) }

// Interface is the kernel interface in use (InterfaceNetlink or
// InterfaceIoctl).
func (k *KernelDevice) Interface() string { return k.iface }

// Reattached reports whether the device was found connected (left attached
// by a previous mirrord) and handed fresh sockets instead of set up anew.
func (k *KernelDevice) Reattached() bool { return k.reattached }

func devicePath(i int) string { return "/dev/nbd" + strconv.Itoa(i) }
func sysBlock(i int) string   { return "/sys/block/nbd" + strconv.Itoa(i) }

// AttachKernel serves export to the kernel's NBD client as /dev/nbdN.
//
// When the device is already connected with the same Backend (a previous
// mirrord left it attached and exited), its dead connections are replaced
// by fresh ones (NBD_CMD_RECONFIGURE) and the I/O the kernel held resumes.
func (s *Server) AttachKernel(export string, o KernelOptions) (*KernelDevice, error) {
	o.fill()
	exp := s.export(export)
	if exp == nil {
		return nil, fmt.Errorf("nbd: no export %q", export)
	}
	k := &KernelDevice{index: o.Index, log: s.log}
	var gl *genl
	if o.Interface != InterfaceIoctl {
		var err error
		gl, err = openGenl()
		if err != nil && (o.Interface == InterfaceNetlink || !errors.Is(err, ErrNoNetlink)) {
			return nil, err
		}
	}
	if gl == nil {
		k.iface = InterfaceIoctl
		if err := k.attachIoctl(s, exp, &o); err != nil {
			return nil, err
		}
		return k, nil
	}
	k.iface, k.gl = InterfaceNetlink, gl
	if err := k.attachNetlink(s, exp, &o); err != nil {
		return nil, err
	}
	return k, nil
}

// socketPairs makes n connected pairs: the kernel's ends as fds, ours as
// files (kept so a refused socket can be seen hung up) and served conns.
type socketPairs struct {
	kernel []int
	ours   []*os.File
}

func newSocketPairs(n int) (*socketPairs, error) {
	p := &socketPairs{}
	for range n {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			p.close()
			return nil, fmt.Errorf("socketpair: %w", err)
		}
		// The send buffers stay at the default (about 200 KiB), which
		// bounds the queue of requests waiting in the socket. Forced to
		// 4 MiB they saved context switches (35-48 against 54-67 per
		// 1 MiB write in a 1-vCPU TCG VM) but cost throughput: the queue
		// of 4 KiB skbs the kernel's client sends grew to megabytes, and
		// mirrord used more CPU per byte to read it. 1 MiB writes in that
		// VM, five rounds each against nbdkit: 1.07-1.15 of nbdkit's rate
		// with the default, 0.96 with 1 or 4 MiB.
		p.kernel = append(p.kernel, fds[0])
		p.ours = append(p.ours, os.NewFile(uintptr(fds[1]), "nbd-kernel"))
	}
	return p, nil
}

// serve hands our ends to the server. Done before the kernel gets its ends:
// the kernel reads the partition table as soon as it is connected.
func (p *socketPairs) serve(s *Server, exp *Export) error {
	for _, f := range p.ours {
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			return fmt.Errorf("socketpair conn: %w", err)
		}
		unix.CloseOnExec(fd)
		// Read with blocking syscalls on the connection's own thread
		// (see blockingConn): the kernel sends nothing but requests.
		f := os.NewFile(uintptr(fd), "nbd-kernel")
		s.serveConn(&blockingConn{f: f, local: kernelAddr{}, remote: kernelAddr{}}, exp)
	}
	return nil
}

type kernelAddr struct{}

func (kernelAddr) Network() string { return "unix" }
func (kernelAddr) String() string  { return "kernel" }

// accepted counts our ends whose kernel end is still open: the kernel
// closes (after we drop our copy) the sockets it did not take.
func (p *socketPairs) accepted() int {
	n := 0
	for _, f := range p.ours {
		pfd := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLRDHUP}}
		if k, err := unix.Poll(pfd, 0); err == nil && k == 0 {
			n++
		}
	}
	return n
}

func (p *socketPairs) closeKernelEnds() {
	for _, fd := range p.kernel {
		_ = unix.Close(fd)
	}
	p.kernel = nil
}

func (p *socketPairs) close() {
	p.closeKernelEnds()
	for _, f := range p.ours {
		_ = f.Close()
	}
	p.ours = nil
}

func (k *KernelDevice) attachNetlink(s *Server, exp *Export, o *KernelOptions) error {
	idx, connected, err := k.findDevice(o)
	if err != nil {
		return err
	}
	pairs, err := newSocketPairs(o.Connections)
	if err != nil {
		return err
	}
	defer pairs.close()
	if err := pairs.serve(s, exp); err != nil {
		return err
	}
	c := &linkConfig{
		Index:           idx,
		Size:            uint64(exp.Device.Size()),
		BlockSize:       uint64(o.BlockSize),
		Timeout:         o.Timeout,
		DeadConnTimeout: o.DeadConnTimeout,
		ServerFlags:     uint64(exp.transmissionFlags()),
		FDs:             pairs.kernel,
		Backend:         o.Backend,
	}
	if connected {
		// Flags cannot change on a live device; the size may (resize).
		c.ServerFlags = 0
		if err := k.gl.reconfigure(c); err != nil {
			return err
		}
		pairs.closeKernelEnds()
		n := pairs.accepted()
		if n == 0 {
			return fmt.Errorf("%w: %s has no dead connection to replace: another process serves it", ErrDeviceBusy, devicePath(idx))
		}
		k.index, k.reattached = idx, true
		k.log.Info().Str("device", k.Path()).Int("connections", n).Msg("kernel device reattached")
		return nil
	}
	got, err := k.gl.connect(c)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%w: %s: %v", ErrDeviceBusy, devicePath(idx), err)
		}
		return err
	}
	k.index = got
	k.log.Info().Str("device", k.Path()).Int("connections", o.Connections).Msg("kernel device attached")
	return nil
}

// findDevice picks the device to attach: the one asked for, or with
// AnyDevice one left connected with our Backend, else -1 (the kernel picks
// a free one). connected says it is to be taken over.
func (k *KernelDevice) findDevice(o *KernelOptions) (idx int, connected bool, err error) {
	st, err := k.gl.status(o.Index)
	if err != nil {
		return 0, false, err
	}
	for _, d := range st {
		if !d.Connected || (o.Index >= 0 && d.Index != o.Index) {
			continue
		}
		backend := readBackend(d.Index)
		if o.Index >= 0 {
			if backend != "" && backend != o.Backend {
				return 0, false, fmt.Errorf("%w: %s is connected to %q, not %q", ErrDeviceBusy, devicePath(d.Index), backend, o.Backend)
			}
			return d.Index, true, nil
		}
		if o.Backend != "" && backend == o.Backend {
			return d.Index, true, nil
		}
	}
	return o.Index, false, nil
}

// readBackend is the backend name the device was connected with, "" if
// none (or the kernel does not show it).
func readBackend(i int) string {
	b, err := os.ReadFile(filepath.Join(sysBlock(i), "backend"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// ioctl numbers (include/uapi/linux/nbd.h: _IO(0xab, n)).
const (
	ioctlSetSock    = 0xab00
	ioctlSetBlksize = 0xab01
	ioctlSetSize    = 0xab02
	ioctlDoIt       = 0xab03
	ioctlClearSock  = 0xab04
	ioctlDisconnect = 0xab08
	ioctlSetTimeout = 0xab09
	ioctlSetFlags   = 0xab0a
)

func ioctl(f *os.File, req, arg uintptr) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, arg)
	if e != 0 {
		return e
	}
	return nil
}

func (k *KernelDevice) attachIoctl(s *Server, exp *Export, o *KernelOptions) error {
	idx := o.Index
	if idx < 0 {
		var err error
		if idx, err = freeIoctlDevice(); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(devicePath(idx), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", devicePath(idx), err)
	}
	pairs, err := newSocketPairs(o.Connections)
	if err != nil {
		_ = f.Close()
		return err
	}
	defer pairs.close()
	steps := []struct {
		name     string
		req, arg uintptr
	}{
		{"NBD_SET_BLKSIZE", ioctlSetBlksize, uintptr(o.BlockSize)},
		{"NBD_SET_SIZE", ioctlSetSize, uintptr(exp.Device.Size())},
		{"NBD_SET_TIMEOUT", ioctlSetTimeout, uintptr(seconds(o.Timeout))},
		{"NBD_SET_FLAGS", ioctlSetFlags, uintptr(exp.transmissionFlags())},
	}
	for _, fd := range pairs.kernel {
		steps = append(steps, struct {
			name     string
			req, arg uintptr
		}{"NBD_SET_SOCK", ioctlSetSock, uintptr(fd)})
	}
	// The kernel takes NBD_SET_SOCK only from the task (thread) that
	// gave the first one ("Device being setup by another task"), and a
	// goroutine may move between threads from one syscall to the next.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for _, st := range steps {
		if err := ioctl(f, st.req, st.arg); err != nil {
			_ = ioctl(f, ioctlClearSock, 0)
			_ = f.Close()
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("%w: %s: %s: %v", ErrDeviceBusy, devicePath(idx), st.name, err)
			}
			return fmt.Errorf("%s %s: %w", st.name, devicePath(idx), err)
		}
	}
	if err := pairs.serve(s, exp); err != nil {
		_ = ioctl(f, ioctlClearSock, 0)
		_ = f.Close()
		return err
	}
	k.index, k.dev, k.doIt = idx, f, make(chan error, 1)
	// NBD_DO_IT runs the device and returns when it is disconnected; it
	// blocks its thread for as long.
	go func() { k.doIt <- ioctl(f, ioctlDoIt, 0) }()
	if err := pollUntil(5*time.Second, func() bool { return readPID(idx) > 0 }); err != nil {
		return fmt.Errorf("%s did not start: %w", devicePath(idx), err)
	}
	k.log.Info().Str("device", k.Path()).Str("interface", InterfaceIoctl).Int("connections", o.Connections).Msg("kernel device attached")
	return nil
}

// freeIoctlDevice is the first /dev/nbdN no process runs (no pid file).
func freeIoctlDevice() (int, error) {
	for i := 0; ; i++ {
		if _, err := os.Stat(sysBlock(i)); err != nil {
			return 0, fmt.Errorf("%w: no free /dev/nbdN (nbds_max reached)", ErrDeviceBusy)
		}
		if readPID(i) == 0 {
			return i, nil
		}
	}
}

func readPID(i int) int {
	b, err := os.ReadFile(filepath.Join(sysBlock(i), "pid"))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

func pollUntil(d time.Duration, ok func() bool) error {
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

// InUse returns an ErrDeviceInUse error naming what holds the device (a
// mount point, a holder such as device-mapper, an exclusive opener), or
// nil when nothing does.
func (k *KernelDevice) InUse() error { return deviceInUse(k.index) }

func deviceInUse(index int) error {
	devs := deviceNumbers(index)
	if f, err := os.Open("/proc/self/mountinfo"); err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			// id parent major:minor root mount-point ...
			fl := strings.Fields(sc.Text())
			if len(fl) >= 5 && devs[fl[2]] {
				return fmt.Errorf("%w: %s is mounted on %s", ErrDeviceInUse, devicePath(index), fl[4])
			}
		}
	}
	if h, _ := os.ReadDir(filepath.Join(sysBlock(index), "holders")); len(h) > 0 {
		return fmt.Errorf("%w: %s is held by %s", ErrDeviceInUse, devicePath(index), h[0].Name())
	}
	fd, err := unix.Open(devicePath(index), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("%w: %s is held open exclusively", ErrDeviceInUse, devicePath(index))
	}
	if err == nil {
		_ = unix.Close(fd)
	}
	return nil
}

// deviceNumbers are the "major:minor" of the disk and its partitions.
func deviceNumbers(index int) map[string]bool {
	out := make(map[string]bool)
	base := sysBlock(index)
	add := func(p string) {
		if b, err := os.ReadFile(p); err == nil {
			out[strings.TrimSpace(string(b))] = true
		}
	}
	add(filepath.Join(base, "dev"))
	parts, _ := filepath.Glob(filepath.Join(base, "nbd*p*", "dev"))
	for _, p := range parts {
		add(p)
	}
	return out
}

// Detach disconnects the device, unless something holds it
// (ErrDeviceInUse): a disconnect under a mounted file system fails its
// I/O. The connections end once the kernel has sent its last requests.
func (k *KernelDevice) Detach() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.detached {
		return nil
	}
	if err := k.InUse(); err != nil {
		return err
	}
	if k.iface == InterfaceIoctl {
		if err := ioctl(k.dev, ioctlDisconnect, 0); err != nil {
			return fmt.Errorf("NBD_DISCONNECT %s: %w", k.Path(), err)
		}
		select {
		case <-k.doIt:
		case <-time.After(30 * time.Second):
			return fmt.Errorf("%s: NBD_DO_IT did not return after NBD_DISCONNECT", k.Path())
		}
		_ = ioctl(k.dev, ioctlClearSock, 0)
		_ = k.dev.Close()
	} else {
		if err := k.gl.disconnect(k.index); err != nil {
			return err
		}
		err := pollUntil(30*time.Second, func() bool {
			st, err := k.gl.status(k.index)
			return err == nil && (len(st) == 0 || !st[0].Connected)
		})
		if err != nil {
			return fmt.Errorf("%s still connected after disconnect: %w", k.Path(), err)
		}
	}
	k.detached = true
	k.log.Info().Str("device", k.Path()).Msg("kernel device detached")
	return nil
}

// Status is the kernel's view of the device.
func (k *KernelDevice) Status() (DeviceStatus, error) {
	if k.iface == InterfaceIoctl {
		return DeviceStatus{Index: k.index, Connected: readPID(k.index) > 0}, nil
	}
	st, err := k.gl.status(k.index)
	if err != nil {
		return DeviceStatus{}, err
	}
	if len(st) == 0 {
		return DeviceStatus{Index: k.index}, nil
	}
	return st[0], nil
}
