package nbd

import (
	"bytes"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// unhex reads hex written in groups with "|" and spaces between fields.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.NewReplacer(" ", "", "|", "", "\n", "", "\t", "").Replace(s))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestNetlinkRequestGolden pins the bytes of the requests, written out field
// by field from include/uapi/linux/nbd-netlink.h (little-endian host):
// nlmsghdr, genlmsghdr, then the attributes.
func TestNetlinkRequestGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		cmd  uint8
		seq  uint32
		c    linkConfig
		want string
	}{{
		name: "connect",
		cmd:  genlCmdConnect, seq: 1,
		c: linkConfig{
			Index: 0, Size: 1 << 20, BlockSize: 4096,
			Timeout: 30 * time.Second, DeadConnTimeout: 2 * time.Minute,
			ServerFlags: 0x16d, FDs: []int{7, 8}, Backend: "mirrord:vol0",
		},
		want: `
		94000000 1c00 0500 01000000 00000000 | 01 01 0000
		0800 0100 00000000
		0c00 0200 0000100000000000
		0c00 0300 0010000000000000
		0c00 0400 1e00000000000000
		0c00 0800 7800000000000000
		0c00 0500 6d01000000000000
		0c00 0600 0000000000000000
		1100 0a00 6d6972726f72643a766f6c3000 000000
		1c00 0780 | 0c00 0180 0800 0100 07000000 | 0c00 0180 0800 0100 08000000`,
	}, {
		// Reconfigure sends only what it changes: no flags, no zero
		// timeouts; 1.5 s rounds up to 2.
		name: "reconfigure",
		cmd:  genlCmdReconfigure, seq: 2,
		c: linkConfig{Index: 3, Timeout: 1500 * time.Millisecond, FDs: []int{9}},
		want: `
		44000000 1c00 0500 02000000 00000000 | 03 01 0000
		0800 0100 03000000
		0c00 0400 0200000000000000
		0c00 0600 0000000000000000
		1000 0780 | 0c00 0180 0800 0100 09000000`,
	}, {
		name: "status of every device",
		cmd:  genlCmdStatus, seq: 3,
		c:    linkConfig{Index: -1},
		want: `14000000 1c00 0500 03000000 00000000 | 05 01 0000`,
	}} {
		req := newGenlRequest(0x1c, tc.cmd, tc.c.attrs()...)
		req.Seq = tc.seq
		if got, want := req.Serialize(), unhex(t, tc.want); !bytes.Equal(got, want) {
			t.Errorf("%s request:\n got %x\nwant %x", tc.name, got, want)
		}
	}
}

// statusReply is what the kernel sends for two devices: nbd0 connected,
// nbd3 not.
const statusReply = `05 01 0000
	2c00 0980
	  1400 0180 | 0800 0100 00000000 | 0500 0200 01 000000
	  1400 0180 | 0800 0100 03000000 | 0500 0200 00 000000`

func TestParseStatusReply(t *testing.T) {
	got, err := parseStatusReply(unhex(t, statusReply))
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceStatus{{Index: 0, Connected: true}, {Index: 3, Connected: false}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v, want %+v", got, want)
	}
	idx, err := parseConnectReply(unhex(t, `01 01 0000 | 0800 0100 05000000`))
	if err != nil || idx != 5 {
		t.Fatalf("connect reply: %d, %v; want 5", idx, err)
	}
}

func TestParseNetlinkErrors(t *testing.T) {
	for _, tc := range []struct{ name, hex string }{
		{"short header", `0501`},
		{"truncated attribute header", `05010000 2c00`},
		{"attribute longer than the message", `05010000 2c00 0980 0000`},
		{"attribute shorter than its header", `05010000 0200 0980`},
		{"index of 2 bytes", `05010000 0c00 0980 | 0800 0180 | 0600 0100 0000 0000`},
		{"connected flag of 2 bytes", `05010000 1400 0980 | 1000 0180 | 0800 0100 00000000 | 0600 0200 0100 0000`},
		{"item without an index", `05010000 0c00 0980 | 0800 0180 | 0500 0200 01 000000`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseStatusReply(unhex(t, tc.hex))
			if !errors.Is(err, ErrNetlinkMessage) {
				t.Fatalf("got %v, want ErrNetlinkMessage", err)
			}
		})
	}
	if _, err := parseConnectReply(unhex(t, `01010000`)); !errors.Is(err, ErrNetlinkMessage) {
		t.Fatalf("connect reply without index: %v", err)
	}
}

func FuzzParseNetlinkReply(f *testing.F) {
	f.Add(unhex(f, statusReply))
	f.Add(unhex(f, `01 01 0000 | 0800 0100 05000000`))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := parseStatusReply(b)
		if err == nil {
			for _, d := range st {
				if d.Index < 0 {
					t.Fatalf("negative index in %+v", st)
				}
			}
		} else if !errors.Is(err, ErrNetlinkMessage) {
			t.Fatalf("error %v is not ErrNetlinkMessage", err)
		}
		if _, err := parseConnectReply(b); err != nil && !errors.Is(err, ErrNetlinkMessage) {
			t.Fatalf("error %v is not ErrNetlinkMessage", err)
		}
	})
}
