package units

import (
	"errors"
	"testing"
)

func TestParseBits(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  bool
	}{
		{"0", 0, false},
		{"100Mbit", 100e6, false},
		{"100mbit/s", 100e6, false},
		{"100M", 100e6, false},
		{"1.5Gbit", 1.5e9, false},
		{"800kbit", 800e3, false},
		{"fast", 0, true},
		{"-1Mbit", 0, true},
		{"10Xbit", 0, true},
	} {
		got, err := ParseBits(tc.in)
		if (err != nil) != tc.err || got != tc.want || (err != nil && !errors.Is(err, ErrBitRate)) {
			t.Errorf("ParseBits(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}
