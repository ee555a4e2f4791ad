package resource

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// fake records calls into a shared log.
type fake struct {
	name      string
	log       *callLog
	startErr  error
	stopErr   error
	block     bool // Start blocks until ctx ends
	monitorOK bool
}

type callLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *callLog) add(s string) {
	l.mu.Lock()
	l.calls = append(l.calls, s)
	l.mu.Unlock()
}

func (l *callLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.calls...)
}

func (f *fake) Name() string { return f.name }
func (f *fake) Start(ctx context.Context) error {
	f.log.add("start " + f.name)
	if f.block {
		<-ctx.Done()
		return ctx.Err()
	}
	return f.startErr
}
func (f *fake) Stop(ctx context.Context) error {
	f.log.add("stop " + f.name)
	return f.stopErr
}
func (f *fake) Monitor(ctx context.Context) error {
	if f.monitorOK {
		return nil
	}
	return fmt.Errorf("%s down", f.name)
}

func chainOf(log *callLog, fakes ...*fake) *Chain {
	var es []Entry
	for _, f := range fakes {
		f.log = log
		es = append(es, Entry{Resource: f, Timeout: 200 * time.Millisecond})
	}
	return NewChain(zerolog.Nop(), es...)
}

func TestChainOrder(t *testing.T) {
	log := &callLog{}
	c := chainOf(log, &fake{name: "a", monitorOK: true}, &fake{name: "b"}, &fake{name: "c", monitorOK: true})
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := c.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := []string{"start a", "start b", "start c", "stop c", "stop b", "stop a"}
	if got := log.get(); !reflect.DeepEqual(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
	h := c.Monitor(context.Background())
	if len(h) != 3 || h[0].Err != nil || h[1].Err == nil || h[1].Name != "b" || h[2].Err != nil {
		t.Fatalf("monitor: %+v", h)
	}
	if got := c.Names(); !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Fatalf("names %v", got)
	}
}

// The second resource fails: the first is stopped again, the third never
// started, and the error says all of it.
func TestChainRollback(t *testing.T) {
	log := &callLog{}
	boom := errors.New("boom")
	c := chainOf(log, &fake{name: "a"}, &fake{name: "b", startErr: boom}, &fake{name: "c"})
	err := c.Start(context.Background())
	var se *StartError
	if !errors.As(err, &se) || !errors.Is(err, boom) {
		t.Fatalf("Start: %v, want a *StartError wrapping boom", err)
	}
	if se.Resource != "b" || !reflect.DeepEqual(se.RolledBack, []string{"a"}) || se.RollbackErr != nil {
		t.Fatalf("StartError %+v", se)
	}
	want := []string{"start a", "start b", "stop b", "stop a"}
	if got := log.get(); !reflect.DeepEqual(got, want) {
		t.Fatalf("calls %v, want %v", got, want)
	}
	if msg := err.Error(); !strings.Contains(msg, "start b: boom") || !strings.Contains(msg, "rolled back a") {
		t.Fatalf("message %q", msg)
	}
}

func TestChainRollbackFailure(t *testing.T) {
	log := &callLog{}
	stuck := errors.New("stuck")
	c := chainOf(log, &fake{name: "a", stopErr: stuck}, &fake{name: "b", block: true})
	start := time.Now()
	err := c.Start(context.Background())
	var se *StartError
	if !errors.As(err, &se) || !errors.Is(se.Err, ErrTimeout) || !errors.Is(se.RollbackErr, stuck) {
		t.Fatalf("Start: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("a 200ms timeout took %v", d)
	}
	if !strings.Contains(err.Error(), "ROLLBACK FAILED") {
		t.Fatalf("message %q", err)
	}
}

// Stop carries on past a failure and reports it.
func TestChainStopContinues(t *testing.T) {
	log := &callLog{}
	bad := errors.New("bad")
	c := chainOf(log, &fake{name: "a"}, &fake{name: "b", stopErr: bad}, &fake{name: "c"})
	err := c.Stop(context.Background())
	if !errors.Is(err, bad) || !strings.Contains(err.Error(), "stop b") {
		t.Fatalf("Stop: %v", err)
	}
	if got := log.get(); !reflect.DeepEqual(got, []string{"stop c", "stop b", "stop a"}) {
		t.Fatalf("calls %v", got)
	}
}

// Restart stops the named resource and those after it, in reverse, and
// starts them again in order; those before it are not touched. A failed
// stop does not prevent the start; a failed start rolls the tail back.
func TestChainRestart(t *testing.T) {
	for _, tc := range []struct {
		name    string
		from    string
		stopErr bool // c's stop fails
		failC   bool // c's start fails
		calls   string
		err     string
	}{
		{"middle", "b", false, false, "stop c, stop b, start b, start c", ""},
		{"last", "c", false, false, "stop c, start c", ""},
		{"failed stop", "b", true, false, "stop c, stop b, start b, start c", ""},
		{"failed start", "b", false, true, "stop c, stop b, start b, start c, stop c, stop b", "start c: c refused; rolled back b"},
		{"unknown", "x", false, false, "", "restart x: no such resource in the chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := &callLog{}
			c3 := &fake{name: "c"}
			if tc.stopErr {
				c3.stopErr = errors.New("c stuck")
			}
			if tc.failC {
				c3.startErr = errors.New("c refused")
			}
			c := chainOf(log, &fake{name: "a"}, &fake{name: "b"}, c3)
			err := c.Restart(context.Background(), tc.from)
			if got := fmt.Sprint(err); (tc.err == "" && err != nil) || (tc.err != "" && got != tc.err) {
				t.Fatalf("error %q, want %q", got, tc.err)
			}
			if tc.failC {
				var se *StartError
				if !errors.As(err, &se) || se.Resource != "c" {
					t.Fatalf("%#v is not c's *StartError", err)
				}
			}
			if tc.from == "x" && !errors.Is(err, ErrUnknown) {
				t.Fatalf("%v is not ErrUnknown", err)
			}
			if got := strings.Join(log.get(), ", "); got != tc.calls {
				t.Fatalf("calls %q, want %q", got, tc.calls)
			}
		})
	}
}
