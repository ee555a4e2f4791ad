package resource

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Script is a user script run as `Path start`, `Path stop`, `Path monitor`
// (LifeKeeper's and Pacemaker's convention), with Args after the action.
// Exit status 0 is success; anything else is a *ScriptError carrying the
// status and the tail of the output.
type Script struct {
	Path string
	Args []string
	// Timeout bounds each run; on expiry the script's whole process group
	// is killed, so that a child it left behind cannot keep a resource
	// half up. Zero: the caller's context only.
	Timeout time.Duration
}

// ScriptError is a script that ran and failed.
type ScriptError struct {
	Path, Action string
	// ExitCode is the exit status, -1 if killed by a signal.
	ExitCode int
	Signal   string
	// Output is the tail of stdout and stderr, interleaved.
	Output string
}

func (e *ScriptError) Error() string {
	how := fmt.Sprintf("exit status %d", e.ExitCode)
	if e.Signal != "" {
		how = "killed by " + e.Signal
	}
	out := strings.TrimSpace(e.Output)
	if out == "" {
		return fmt.Sprintf("%s %s: %s", e.Path, e.Action, how)
	}
	return fmt.Sprintf("%s %s: %s: %s", e.Path, e.Action, how, out)
}

// maxOutput bounds the output kept for an error.
const maxOutput = 4 << 10

// Name implements Resource.
func (s *Script) Name() string { return "script:" + s.Path }

// Start implements Resource.
func (s *Script) Start(ctx context.Context) error { return s.Run(ctx, "start") }

// Stop implements Resource.
func (s *Script) Stop(ctx context.Context) error { return s.Run(ctx, "stop") }

// Monitor implements Resource.
func (s *Script) Monitor(ctx context.Context) error { return s.Run(ctx, "monitor") }

// Run runs the script with action. When the timeout (or ctx) ends first,
// the process group is killed and the error wraps ErrTimeout (or ctx's
// error) with the output so far.
func (s *Script) Run(ctx context.Context, action string) error {
	if s.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.Timeout)
		defer cancel()
	}
	// The output goes to an unlinked temporary file, not a pipe: a start
	// script that leaves a daemon behind with the script's stdout would
	// otherwise hold Wait until the daemon exits, or, once we closed the
	// pipe, kill it with SIGPIPE on its next write.
	out, err := os.CreateTemp("", "mirrord-script-")
	if err != nil {
		return fmt.Errorf("run %s %s: %w", s.Path, action, err)
	}
	os.Remove(out.Name())
	defer out.Close()
	cmd := exec.CommandContext(ctx, s.Path, append([]string{action}, s.Args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.Stdout, cmd.Stderr = out, out
	err = cmd.Run()
	if ctx.Err() != nil {
		// Also kill a group whose leader exited on its own but left
		// children running past the deadline.
		unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		cause := ctx.Err()
		if errors.Is(cause, context.DeadlineExceeded) {
			cause = ErrTimeout
		}
		return fmt.Errorf("%s %s: %w (process group killed); output: %s", s.Path, action, cause, strings.TrimSpace(tail(out)))
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		se := &ScriptError{Path: s.Path, Action: action, ExitCode: ee.ExitCode(), Output: tail(out)}
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			se.Signal = ws.Signal().String()
		}
		return se
	}
	if err != nil {
		return fmt.Errorf("run %s %s: %w", s.Path, action, err)
	}
	return nil
}

// tail returns the last maxOutput bytes written to f.
func tail(f *os.File) string {
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(0, fi.Size()-maxOutput)
	b := make([]byte, fi.Size()-off)
	n, _ := f.ReadAt(b, off)
	return string(b[:n])
}
