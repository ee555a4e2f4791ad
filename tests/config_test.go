package tests

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// runMirrord runs the binary to completion (it must not start serving) and
// returns its exit code and output.
func runMirrord(t *testing.T, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, mirrordBin, args...)
	cmd.Env = childEnv(env)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("mirrord %v still running after 20s (it should have refused to start):\n%s", args, out)
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("mirrord %v: %v", args, err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)
	yaml := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}

	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want []string // the output must contain one of these
		// listen replaces the harness's valid --listen; "-" leaves the
		// flag out.
		listen string
	}{
		{name: "unknown key in file", args: []string{"-c", yaml("a.yaml", "volume:\n  sise: 1GiB\n")}, want: []string{"volume.sise"}},
		{name: "unknown section in file", args: []string{"-c", yaml("b.yaml", "volumes:\n  size: 1GiB\n")}, want: []string{"volumes"}},
		{name: "unknown key via --set", args: []string{"--set", "volume.sise=1"}, want: []string{"volume.sise"}},
		{name: "unknown environment variable", env: []string{"MIRRORD_VOLUME_SISE=1"}, want: []string{"MIRRORD_VOLUME_SISE"}},
		{name: "region size not a power of two", args: []string{"--set", "volume.region-size=1000"}, want: []string{"volume.region-size"}},
		{name: "size not a size", args: []string{"--set", "volume.size=abc"}, want: []string{"volume.size", `"abc"`}},
		{name: "size via env not a size", env: []string{"MIRRORD_VOLUME_SIZE=12xb"}, want: []string{"volume.size", "MIRRORD_VOLUME_SIZE", "12xb"}},
		{name: "bad listen address", listen: "carrier-pigeon", want: []string{"nbd.listen"}},
		{name: "bad listen address via --set", listen: "-", args: []string{"--set", "nbd.listen=tcp:localhost"}, want: []string{"nbd.listen"}},
		{name: "bad log level", args: []string{"--set", "log.level=loud"}, want: []string{"log.level"}},
		{name: "set without value", args: []string{"--set", "volume.size"}, want: []string{"volume.size"}},
		{name: "bad peer mode", args: []string{"--set", "peer.node=other", "--set", "peer.address=127.0.0.1:1", "--set", "peer.secret=s", "--set", "peer.mode=fast"}, want: []string{"peer.mode"}},
		{name: "peer without node", args: []string{"--set", "peer.address=127.0.0.1:1"}, want: []string{"peer.address", "peer.node"}},
		{name: "unknown key in peer section", args: []string{"-c", yaml("c.yaml", "peer:\n  nodes: b\n")}, want: []string{"peer.nodes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			sub := shortTempDir(t)
			path := filepath.Join(sub, "vol.img")
			// Valid path and listener, so that a config the daemon wrongly
			// accepts cannot touch the default /run or /var/lib paths.
			// Own control socket too, for the same reason.
			args := []string{"run", "--path", path, "--set", "control.socket=" + filepath.Join(sub, "ctl.sock")}
			switch tc.listen {
			case "":
				args = append(args, "--listen", "unix:"+filepath.Join(sub, "s.sock"))
			case "-":
			default:
				args = append(args, "--listen", tc.listen)
			}
			args = append(args, tc.args...)
			code, out := runMirrord(t, tc.env, args...)
			if code == 0 {
				t.Fatalf("exit code 0, want an error:\n%s", out)
			}
			found := false
			for _, w := range tc.want {
				found = found || strings.Contains(out, w)
			}
			if !found {
				t.Errorf("exit %d; output names none of %q:\n%s", code, tc.want, out)
			}
			if _, err := os.Stat(path); err == nil {
				t.Errorf("a rejected config still created the backing file %s", path)
			}
		})
	}

	t.Run("existing file of another size", func(t *testing.T) {
		t.Parallel()
		sub := shortTempDir(t)
		path := filepath.Join(sub, "vol.img")
		sum := writeRandomFile(t, newRand(t), path, 64<<20)
		before, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		code, out := runMirrord(t, nil, "run", "--path", path, "--size", "1GiB",
			"--listen", "unix:"+filepath.Join(sub, "s.sock"), "--set", "control.socket="+filepath.Join(sub, "ctl.sock"))
		if code == 0 {
			t.Fatalf("a 64 MiB file was accepted as a 1 GiB volume:\n%s", out)
		}
		if !strings.Contains(out, path) || !strings.Contains(out, "size") {
			t.Errorf("exit %d; want a message naming %s and its size:\n%s", code, path, out)
		}
		after, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) {
			t.Errorf("file changed: size %d -> %d, mtime %v -> %v", before.Size(), after.Size(), before.ModTime(), after.ModTime())
		}
		if got := sha256File(t, path, 0, 64<<20); got != sum {
			t.Errorf("file content changed")
		}
	})

	t.Run("usage errors", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{{"run", "--sizee", "5"}, {"frobnicate"}, {"run", "extra-arg"}} {
			if code, out := runMirrord(t, nil, args...); code != 2 {
				t.Errorf("mirrord %v: exit %d, want 2 (usage):\n%s", args, code, out)
			}
		}
	})

	t.Run("version", func(t *testing.T) {
		t.Parallel()
		for _, arg := range []string{"version", "--version"} {
			code, out := runMirrord(t, nil, arg)
			if code != 0 || !strings.HasPrefix(out, "mirrord ") {
				t.Errorf("mirrord %s: exit %d, output %q; want 0 and \"mirrord ...\"", arg, code, out)
			}
		}
	})

	// Precedence, lowest first: defaults, file, environment, --set; read
	// back from `mirrord config` (JSON).
	t.Run("precedence", func(t *testing.T) {
		t.Parallel()
		file := yaml("p.yaml", "volume:\n  size: 2GiB\n  name: fromfile\nnbd:\n  read-only: true\n")
		type eff struct {
			Size     int64
			Name     string
			ReadOnly bool
		}
		for _, tc := range []struct {
			env  []string
			args []string
			want eff
		}{
			{nil, nil, eff{0, "vol0", false}},
			{nil, []string{"-c", file}, eff{2 << 30, "fromfile", true}},
			{[]string{"MIRRORD_VOLUME_SIZE=3GiB"}, []string{"-c", file}, eff{3 << 30, "fromfile", true}},
			{[]string{"MIRRORD_VOLUME_SIZE=3GiB", "MIRRORD_NBD_READ_ONLY=false"}, []string{"-c", file, "--set", "volume.size=4GiB", "--set", "volume.name=fromset"},
				eff{4 << 30, "fromset", false}},
		} {
			code, out := runMirrord(t, tc.env, append([]string{"config"}, tc.args...)...)
			if code != 0 {
				t.Errorf("mirrord config %v (env %v): exit %d:\n%s", tc.args, tc.env, code, out)
				continue
			}
			var c struct {
				Volume struct {
					Name string
					Size int64
				}
				NBD struct{ ReadOnly bool }
			}
			if err := json.Unmarshal([]byte(out), &c); err != nil {
				t.Fatalf("mirrord config: not JSON (%v):\n%s", err, out)
			}
			if got := (eff{c.Volume.Size, c.Volume.Name, c.NBD.ReadOnly}); got != tc.want {
				t.Errorf("mirrord config %v (env %v): effective %+v, want %+v", tc.args, tc.env, got, tc.want)
			}
		}
	})
}

// TestExistingStoreKeepsItsSize: without --size an existing backing file is
// served at its own size, untouched; the 1 GiB default is only for creating.
func TestExistingStoreKeepsItsSize(t *testing.T) {
	requireTools(t, "nbdinfo")
	dir := shortTempDir(t)
	path := dir + "/existing.img"
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 64<<20); err != nil {
		t.Fatal(err)
	}
	before := sha256File(t, path, 0, 64<<20)
	p := startMirrordWith(t, mirrordOpts{Dir: dir, Path: path, Size: "-"})
	info := runCmd(t, 30*time.Second, "nbdinfo", p.unixURI())
	if !strings.Contains(info, "export-size: 67108864") {
		t.Fatalf("existing 64 MiB store served as:\n%s", info)
	}
	p.stop()
	if fileSize(t, path) != 64<<20 || sha256File(t, path, 0, 64<<20) != before {
		t.Fatal("the existing store was resized or modified")
	}
}
