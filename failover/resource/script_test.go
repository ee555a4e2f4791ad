package resource

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func writeScript(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "app.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestScriptExitCodes(t *testing.T) {
	p := writeScript(t, `case "$1" in
start) echo "started $2"; exit 0;;
stop) echo "cannot stop" >&2; exit 3;;
monitor) kill -TERM $$;;
esac
`)
	s := &Script{Path: p, Args: []string{"extra"}, Timeout: 5 * time.Second}
	if err := s.Start(context.Background()); err != nil {
		t.Fatalf("start: %v", err)
	}
	err := s.Stop(context.Background())
	var se *ScriptError
	if !errors.As(err, &se) || se.ExitCode != 3 || se.Action != "stop" || !strings.Contains(se.Output, "cannot stop") {
		t.Fatalf("stop: %#v", err)
	}
	if !strings.Contains(err.Error(), "exit status 3: cannot stop") {
		t.Fatalf("message %q", err)
	}
	err = s.Monitor(context.Background())
	if !errors.As(err, &se) || se.Signal != "terminated" {
		t.Fatalf("monitor: %#v", err)
	}
	if err := (&Script{Path: "/nonexistent/script"}).Start(context.Background()); err == nil || !strings.Contains(err.Error(), "/nonexistent/script") {
		t.Fatalf("missing script: %v", err)
	}
}

// On timeout the whole process group dies, including a child the script
// started in the background.
func TestScriptTimeoutKillsGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child.pid")
	p := writeScript(t, `sleep 300 &
echo $! > `+pidFile+`
echo waiting
wait
`)
	s := &Script{Path: p, Timeout: 500 * time.Millisecond}
	start := time.Now()
	err := s.Start(context.Background())
	if !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "waiting") {
		t.Fatalf("start: %v, want ErrTimeout with the output", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("timeout of 500ms took %v", d)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		// The child is reaped by init once its parent is gone; until
		// then it may linger as a zombie, which is dead too.
		if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) || zombie(pid) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("background child %d still alive after the timeout", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(f) > 0 && f[0] == "Z"
}

// Through a chain built from specs, the script's own timeout error (with
// its output) is what the chain reports.
func TestScriptInChain(t *testing.T) {
	p := writeScript(t, `echo "hanging on $1"; sleep 300`)
	c, err := Build([]Spec{{Type: TypeScript, Path: p, Timeout: 300 * time.Millisecond}}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	err = c.Start(context.Background())
	var se *StartError
	if !errors.As(err, &se) || !errors.Is(err, ErrTimeout) || !strings.Contains(err.Error(), "hanging on start") {
		t.Fatalf("Start: %v", err)
	}
}

// A start script that leaves a daemon behind, holding its stdout, returns
// as soon as the script exits, and the daemon lives on.
func TestScriptLeavesDaemon(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "daemon.pid")
	p := writeScript(t, `sleep 300 &
echo $! > `+pidFile+`
echo started
`)
	start := time.Now()
	if err := (&Script{Path: p, Timeout: 10 * time.Second}).Start(context.Background()); err != nil {
		t.Fatalf("start: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("start waited %v for the daemon", d)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	defer unix.Kill(pid, unix.SIGKILL)
	if err := unix.Kill(pid, 0); err != nil || zombie(pid) {
		t.Fatalf("daemon %d gone after the script returned: %v", pid, err)
	}
}
