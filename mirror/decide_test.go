package mirror

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestDecide(t *testing.T) {
	const X, Y, Z, W = 0x10, 0x20, 0x30, 0x40
	up := func(name string, r Role, g Generations) nodeState {
		return nodeState{Name: name, Role: r, Disk: DiskUpToDate, Gen: g}
	}
	tests := []struct {
		name   string
		l, p   nodeState
		action Action
		full   bool
	}{
		{"pristine pair", nodeState{Name: "a", Pristine: true, Disk: DiskUpToDate}, nodeState{Name: "b", Pristine: true, Disk: DiskUpToDate}, ActNone, false},
		{"same generation", up("a", RolePrimary, Generations{Current: X}), up("b", RoleSecondary, Generations{Current: X}), ActNone, false},
		{"primary wrote while peer away", up("a", RolePrimary, Generations{Current: Y, Bitmap: X}), up("b", RoleSecondary, Generations{Current: X}), ActSource, false},
		{"peer wrote while we were away", up("a", RoleSecondary, Generations{Current: X}), up("b", RolePrimary, Generations{Current: Y, Bitmap: X}), ActTarget, false},
		{"split brain: both moved on from X", up("a", RoleSecondary, Generations{Current: Y, Bitmap: X}), up("b", RoleSecondary, Generations{Current: Z, Bitmap: X}), ActSplitBrain, false},
		{"split brain, discard mine", func() nodeState {
			n := up("a", RoleSecondary, Generations{Current: Y, Bitmap: X})
			n.DiscardMine = true
			return n
		}(), up("b", RoleSecondary, Generations{Current: Z, Bitmap: X}), ActTarget, false},
		{"split brain, peer discards", up("a", RoleSecondary, Generations{Current: Y, Bitmap: X}), func() nodeState {
			n := up("b", RoleSecondary, Generations{Current: Z, Bitmap: X})
			n.DiscardMine = true
			return n
		}(), ActSource, false},
		{"older generation without bitmap: full", up("a", RolePrimary, Generations{Current: Z, History: [2]uint64{X, W}}), up("b", RoleSecondary, Generations{Current: W}), ActSource, true},
		{"unrelated data", up("a", RoleSecondary, Generations{Current: X}), up("b", RoleSecondary, Generations{Current: Y}), ActUnrelated, false},
		{"both primary", up("a", RolePrimary, Generations{Current: X}), up("b", RolePrimary, Generations{Current: X}), ActBothPrimary, false},
		{"peer new and empty: full", up("a", RolePrimary, Generations{Current: X}), nodeState{Name: "b", Disk: DiskInconsistent}, ActSource, true},
		{"both inconsistent", nodeState{Name: "a", Disk: DiskInconsistent, Gen: Generations{Current: X}}, nodeState{Name: "b", Disk: DiskInconsistent}, ActNoSource, false},
		{"interrupted resync resumes by bitmap", up("a", RolePrimary, Generations{Current: Y, Bitmap: X}), nodeState{Name: "b", Disk: DiskInconsistent, Gen: Generations{Current: X}}, ActSource, false},
		{"interrupted catch-up resumes by bitmap", up("a", RolePrimary, Generations{Current: X}), nodeState{Name: "b", Disk: DiskInconsistent, Gen: Generations{Current: X}, ResyncHeld: true}, ActSource, false},
		{"interrupted initial full sync stays full", up("a", RolePrimary, Generations{Current: X}), nodeState{Name: "b", Disk: DiskInconsistent, Gen: Generations{Current: X}}, ActSource, true},
		{"held resync of another generation: full", up("a", RolePrimary, Generations{Current: Y, History: [2]uint64{X}}), nodeState{Name: "b", Disk: DiskInconsistent, Gen: Generations{Current: X}, ResyncHeld: true}, ActSource, true},
		{"primary behind refuses", up("a", RolePrimary, Generations{Current: X}), up("b", RoleSecondary, Generations{Current: Y, Bitmap: X}), ActPrimaryBehind, false},
		{"returning old primary demoted is target", up("a", RoleSecondary, Generations{Current: X}), up("b", RolePrimary, Generations{Current: Y, Bitmap: X}), ActTarget, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := decide(tc.l, tc.p)
			if d.Action != tc.action || d.Full != tc.full {
				t.Fatalf("decide = %v full=%v (%s), want %v full=%v", d.Action, d.Full, d.Reason, tc.action, tc.full)
			}
			// Both nodes must reach mirrored conclusions on their own.
			r := decide(tc.p, tc.l)
			want := map[Action]Action{ActSource: ActTarget, ActTarget: ActSource, ActPrimaryBehind: ActPeerPrimaryBehind, ActPeerPrimaryBehind: ActPrimaryBehind}[d.Action]
			if want == 0 && d.Action != ActSource {
				want = d.Action
			}
			if r.Action != want || r.Full != d.Full {
				t.Fatalf("reverse decide = %v full=%v, want %v full=%v", r.Action, r.Full, want, d.Full)
			}
		})
	}
}

func TestPrimaryFirstIsAntisymmetric(t *testing.T) {
	a := nodeState{Name: "a", Role: RoleSecondary}
	b := nodeState{Name: "b", Role: RoleSecondary}
	if primaryFirst(a, b) == primaryFirst(b, a) {
		t.Fatal("both or neither chose themselves as source")
	}
	b.Role = RolePrimary
	if primaryFirst(a, b) || !primaryFirst(b, a) {
		t.Fatal("the Primary must be the source")
	}
}

func TestReadCached(t *testing.T) {
	v, err := Open(t.TempDir()+"/img", Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := []byte("cached")
	if err := v.WriteAt(p, 4096, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	ok, err := v.ReadCached(got, 4096)
	if err != nil {
		t.Fatal(err)
	}
	// A page just written is in the page cache; the kernel may still say
	// "would block" (then ok is false and nothing was promised).
	if ok && string(got) != "cached" {
		t.Fatalf("ReadCached = %q", got)
	}
	v.Close()
	if _, err := v.ReadCached(got, 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

// tmpfs refuses RWF_NOWAIT; a volume there is read as always cached, and
// both written data and holes read back right.
func TestReadCachedOnTmpfs(t *testing.T) {
	var st unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("/dev/shm is not a tmpfs here (%v): the test needs one", err)
	}
	dir, err := os.MkdirTemp("/dev/shm", "mirrord-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	v, err := Open(dir+"/img", Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.WriteAt([]byte("cached"), 4096, false); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off  int64
		want string
	}{{4096, "cached"}, {8192, "\x00\x00\x00\x00\x00\x00"}, {4096, "cached"}} {
		got := make([]byte, 6)
		ok, err := v.ReadCached(got, c.off)
		if !ok || err != nil || string(got) != c.want {
			t.Fatalf("ReadCached at %d = %v, %v, %q; want true, nil, %q", c.off, ok, err, got, c.want)
		}
	}
	if m := v.nowait.Load(); m != nowaitMemory {
		t.Fatalf("nowait mode %d, want nowaitMemory", m)
	}
}
