package mirror

import (
	"errors"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// writeAsync starts a write and returns its result channel.
func writeAsync(v *Volume, off int64) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- v.WriteAt(make([]byte, 4096), off, false) }()
	return ch
}

func assertHeld(t *testing.T, ch <-chan error) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("write completed (%v) while the volume was fenced with hold", err)
	case <-time.After(100 * time.Millisecond): // a held write must stay held; nothing to poll for
	}
}

func result(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("held write never completed")
	}
	return nil
}

func TestFenceHoldFailAndDemote(t *testing.T) {
	a, b, _ := newPair(t, pairOpts{mode: ModeSync})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	a.v.Fence(FenceHold, "test")
	if st := a.v.Status(); st.Fence != "suspend" {
		t.Fatalf("status fence = %q, want suspend", st.Fence)
	}
	held := writeAsync(a.v, 0)
	assertHeld(t, held)
	a.v.Unfence("test")
	if err := result(t, held); err != nil {
		t.Fatalf("held write after unfence: %v", err)
	}

	a.v.Fence(FenceFail, "test")
	if err := a.v.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, ErrFenced) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("write while fenced with error: %v, want ErrFenced (EIO)", err)
	}

	a.v.Fence(FenceHold, "test")
	held = writeAsync(a.v, 8192)
	assertHeld(t, held)
	if err := a.v.Demote(); err != nil {
		t.Fatal(err)
	}
	if err := result(t, held); !errors.Is(err, ErrNotPrimary) {
		t.Fatalf("held write across Demote: %v, want ErrNotPrimary", err)
	}
	assertIdentical(t, a, b)
}

func TestWatchdogFencesUnlessRenewed(t *testing.T) {
	v, err := Open(filepath.Join(t.TempDir(), "disk.img"), Options{Size: testSize})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	v.ArmWatchdog(time.Hour, FenceFail)
	if err := v.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatalf("write under an armed watchdog: %v", err)
	}
	v.ArmWatchdog(10*time.Millisecond, FenceFail)
	waitFor(t, "watchdog fence", func() bool { m, _ := v.FenceState(); return m == FenceFail })
	if err := v.WriteAt(make([]byte, 4096), 0, false); !errors.Is(err, ErrFenced) {
		t.Fatalf("write after the watchdog fired: %v, want ErrFenced", err)
	}
}

func TestHoldOnDisconnectAndFencedPromotion(t *testing.T) {
	a, b, fault := newPair(t, pairOpts{mode: ModeSync, fenceA: true})
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.Promote(PromoteOptions{}); err != nil {
		t.Fatal(err)
	}
	if m, _ := a.v.FenceState(); m != FenceHold {
		t.Fatalf("fence after promotion = %v, want suspend", m)
	}
	a.v.Unfence("agent: quorum")
	if err := a.v.WriteAt(make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	fault.setCut(true)
	waitFor(t, "hold on disconnect", func() bool { m, _ := a.v.FenceState(); return m == FenceHold })
	held := writeAsync(a.v, 4096)
	assertHeld(t, held)
	a.v.Unfence("agent: witness recorded the peer outdated")
	if err := result(t, held); err != nil {
		t.Fatal(err)
	}
	if a.v.Status().OutOfSyncBytes == 0 {
		t.Fatal("write made without the peer is not marked out of sync")
	}
}

func TestBeaconOverTheReplicationLink(t *testing.T) {
	got := make(chan []byte, 16)
	a, b, _ := newPair(t, pairOpts{mode: ModeSync, beaconB: func(p []byte) {
		select { // OnBeacon must never block the session
		case got <- append([]byte(nil), p...):
		default:
		}
	}})
	if err := a.v.SendBeacon([]byte("x")); err != nil && !errors.Is(err, ErrNotConnected) {
		t.Fatalf("beacon before the session: %v", err)
	}
	waitFor(t, "connection", func() bool { return established(a.v) && established(b.v) })
	if err := a.v.SendBeacon([]byte("hello agent")); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case p := <-got:
			if string(p) == "hello agent" {
				return
			}
		case <-time.After(10 * time.Second):
			t.Fatal("beacon never arrived")
		}
	}
}
