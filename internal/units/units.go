// Package units parses the quantities operators write in configuration and
// on command lines, as network people write them.
package units

import (
	"errors"
	"strconv"
	"strings"
)

// ErrBitRate is wrapped by ParseBits for anything that is not a bit rate.
var ErrBitRate = errors.New("want a bit rate such as 100Mbit, 1.5G or 800kbit/s")

// ParseBits parses a bit rate: a decimal number with an optional k, M or G
// (powers of 1000, as tc counts) and an optional "bit" or "bit/s", case
// insensitive. It returns bits per second.
func ParseBits(s string) (int64, error) {
	num := strings.ToLower(strings.TrimSpace(s))
	num = strings.TrimSuffix(strings.TrimSuffix(num, "/s"), "bit")
	mult := 1.0
	switch {
	case strings.HasSuffix(num, "k"):
		mult = 1e3
	case strings.HasSuffix(num, "m"):
		mult = 1e6
	case strings.HasSuffix(num, "g"):
		mult = 1e9
	}
	if mult != 1 {
		num = num[:len(num)-1]
	}
	f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if err != nil || f < 0 || f*mult > 8e15 {
		return 0, ErrBitRate
	}
	return int64(f * mult), nil
}
