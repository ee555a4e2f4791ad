// Package tests holds mirrord's end-to-end tests: the real binary, built
// once per run, driven by real NBD clients (nbdinfo, nbdcopy, qemu-io, fio,
// nbdfuse with a loop-mounted ext4) and by raw sockets that misbehave.
//
// The tests need root (loop devices, mounts) and the Debian packages
// libnbd-bin, qemu-utils, fio, fuse3 and e2fsprogs. A missing tool fails the
// test that needs it: a green run always means every client really ran.
//
// E2E_RACE=1 builds the binary with the race detector; a race report in
// a daemon's stderr fails the test that started it.
package tests
