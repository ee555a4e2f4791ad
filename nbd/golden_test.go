package nbd

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/golden_wire.hex from the current server")

const goldenFile = "golden_wire.hex"

type goldenSection struct {
	title string
	data  []byte
}

// TestGoldenWire runs a fixed session against a fixed export and compares
// every byte the server sends with testdata/golden_wire.hex, so the wire
// format cannot drift silently. Review any change to that file by hand
// against the NBD spec before running with -update.
func TestGoldenWire(t *testing.T) {
	d := newMemDevice(t, 0x12345600)
	srv := newTestServer(t, Export{Name: "golden", Description: "golden export", Device: d},
		Export{Name: "other", Description: "", Device: newMemDevice(t, 4096), ReadOnly: true})
	cli, sc := socketPair(t)
	srv.ServeConn(sc)
	t.Cleanup(func() { _ = srv.Shutdown(t.Context()) })

	var got bytes.Buffer
	c := newRawClient(t, cli)
	c.br = io.TeeReader(bufio.NewReader(cli), &got) // exactly what the client consumed
	var sections []goldenSection
	step := func(title string) {
		sections = append(sections, goldenSection{title, bytes.Clone(got.Bytes())})
		got.Reset()
	}

	c.hello()
	step("server hello: NBDMAGIC IHAVEOPT, flags FIXED_NEWSTYLE|NO_ZEROES")

	c.write(be32(3), encOption(wireOptInfo, encInfoReq("golden", wireInfoName, wireInfoDesc, wireInfoBlock)))
	for _, title := range []string{
		"INFO golden [NAME DESCRIPTION BLOCK_SIZE] -> INFO EXPORT size 0x12345600 flags 0x016d",
		"-> INFO BLOCK_SIZE min 1 preferred 4096 max 32 MiB",
		"-> INFO NAME",
		"-> INFO DESCRIPTION",
		"-> ACK",
	} {
		c.optReply()
		step(title)
	}

	c.write(encOption(wireOptList, nil))
	for _, title := range []string{"LIST -> SERVER golden", "-> SERVER other", "-> ACK"} {
		c.optReply()
		step(title)
	}

	c.write(encOption(42, nil))
	c.expectReply(42, wireRepErrUnsup)
	step("option 42 -> ERR_UNSUP")

	c.write(encOption(wireOptGo, encInfoReq("nope")))
	c.expectReply(wireOptGo, wireRepErrUnknown)
	step("GO nope -> ERR_UNKNOWN")

	c.write(encOption(wireOptGo, encInfoReq("")))
	for _, title := range []string{"GO default -> INFO EXPORT", "-> INFO BLOCK_SIZE", "-> ACK"} {
		c.optReply()
		step(title)
	}

	c.write(encRequest(wireFlagFUA, wireCmdWrite, 0x0102030405060708, 512, 8), []byte("goldengo"))
	c.simpleReply()
	step("WRITE+FUA 8 bytes at 512, cookie 0102030405060708 -> simple reply")

	c.write(encRequest(0, wireCmdRead, 0x1112131415161718, 512, 8))
	c.simpleReply()
	c.read(8)
	step("READ 8 bytes at 512, cookie 1112131415161718 -> simple reply, data")

	c.write(encRequest(0, wireCmdRead, 0x2122232425262728, 0x12345600, 1))
	c.simpleReply()
	step("READ past the end, cookie 2122232425262728 -> EINVAL")

	c.write(encRequest(0, wireCmdWrite, 0x3132333435363738, 0x12345600-4, 8), []byte("overflow"))
	c.simpleReply()
	step("WRITE past the end, cookie 3132333435363738 -> ENOSPC")

	c.disconnect()

	path := filepath.Join("testdata", goldenFile)
	if *update {
		if err := os.WriteFile(path, formatGolden(sections), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", path)
		return
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want, err := parseGolden(raw)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if len(want) != len(sections) {
		t.Fatalf("%s has %d sections, the session %d", path, len(want), len(sections))
	}
	for i, w := range want {
		g := sections[i]
		if w.title != g.title {
			t.Errorf("section %d: title %q, want %q", i, g.title, w.title)
		}
		if !bytes.Equal(w.data, g.data) {
			t.Errorf("section %q differs:\ngot\n%swant\n%s", g.title, hex.Dump(g.data), hex.Dump(w.data))
		}
	}
}

func formatGolden(sections []goldenSection) []byte {
	var b strings.Builder
	b.WriteString("# Bytes the NBD server sends in the session scripted by TestGoldenWire\n")
	b.WriteString("# (golden_test.go), export \"golden\" of 0x12345600 bytes. Hex, 16 bytes a\n")
	b.WriteString("# line; \"## title\" starts a section; '#' lines are comments.\n")
	b.WriteString("# Regenerate: go test ./nbd/ -run TestGoldenWire -update (review the diff!)\n\n")
	for _, s := range sections {
		fmt.Fprintf(&b, "## %s\n", s.title)
		for off := 0; off < len(s.data); off += 16 {
			line := s.data[off:min(off+16, len(s.data))]
			for i := 0; i < len(line); i += 4 {
				if i > 0 {
					b.WriteByte(' ')
				}
				b.WriteString(hex.EncodeToString(line[i:min(i+4, len(line))]))
			}
			b.WriteByte('\n')
		}
	}
	return []byte(b.String())
}

func parseGolden(raw []byte) ([]goldenSection, error) {
	var out []goldenSection
	for i, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "## "):
			out = append(out, goldenSection{title: line[3:]})
		case line == "" || strings.HasPrefix(line, "#"):
		default:
			if len(out) == 0 {
				return nil, fmt.Errorf("line %d: data before the first section", i+1)
			}
			b, err := hex.DecodeString(strings.ReplaceAll(line, " ", ""))
			if err != nil {
				return nil, fmt.Errorf("line %d: %v", i+1, err)
			}
			out[len(out)-1].data = append(out[len(out)-1].data, b...)
		}
	}
	return out, nil
}
