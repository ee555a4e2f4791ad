package tests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The README must stay true: its first command (the demo) runs here, its
// defaults one-liner runs here, and every mirrord verb it shows exists.

func TestREADMEDemoScript(t *testing.T) {
	requireRoot(t)
	requireTools(t, "nbdfuse", "mkfs.ext4", "e2fsck", "losetup", "fusermount3")
	// A free port pair for the two nodes' replication links.
	port := 0
	for range 20 {
		a := freeTCPAddr(t)
		var p int
		if _, err := fmt.Sscanf(a[strings.LastIndex(a, ":")+1:], "%d", &p); err == nil && p < 65000 {
			port = p
			break
		}
	}
	out := runScript(t, 5*time.Minute, append(os.Environ(), fmt.Sprintf("DEMO_PEER_PORT=%d", port)), "../scripts/demo.sh")
	for _, want := range []string{
		"role:Primary", "role:Secondary", "connection:Connected replication:Established",
		"e2fsck: clean", "0 B out of sync", "REPLICAS IDENTICAL",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", out)
	}
}

// TestREADMEDefaults runs `mirrord run` exactly as the README shows: no
// flags, no config, the default paths and ports.
func TestREADMEDefaults(t *testing.T) {
	requireRoot(t)
	requireTools(t, "nbdinfo")
	const img, sock = "/var/lib/mirrord/vol0.img", "/run/mirrord/vol0.sock"
	_, statErr := os.Stat(img)
	created := os.IsNotExist(statErr)
	cmd := exec.Command(mirrordBin, "run")
	cmd.Env = childEnv(nil)
	logf, err := os.CreateTemp("", "mirrord-defaults-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(logf.Name())
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
		if created {
			_ = os.Remove(img)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("mirrord run's log:\n%s", b)
		}
	}()
	waitFor(t, 30*time.Second, "default socket", func() bool {
		select {
		case err := <-exited:
			t.Fatalf("mirrord run exited before serving: %v", err)
		default:
		}
		fi, err := os.Stat(sock)
		return err == nil && fi.Mode()&os.ModeSocket != 0
	})
	info := runCmd(t, 30*time.Second, "nbdinfo", "nbd+unix:///?socket="+sock)
	if !strings.Contains(info, "export-size: 1073741824") {
		t.Fatalf("nbdinfo on the default socket:\n%s", info)
	}
	tcp := runCmd(t, 30*time.Second, "nbdinfo", "nbd://127.0.0.1:10809")
	if !strings.Contains(tcp, `export="vol0"`) {
		t.Fatalf("nbdinfo on the default TCP address:\n%s", tcp)
	}
	status := runCmd(t, 30*time.Second, mirrordBin, "status")
	if !strings.Contains(status, "role:Primary") || !strings.Contains(status, "disk:UpToDate") {
		t.Fatalf("status on defaults:\n%s", status)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("mirrord run exited with %v\n%s", err, b)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("mirrord run did not stop on SIGTERM")
	}
}

// TestREADMEVerbs: every `mirrord VERB` in the README is a command.
func TestREADMEVerbs(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	verbs := map[string]bool{}
	inCode := false
	lineVerb := regexp.MustCompile(`^mirrord ([a-z-]+)`)
	for _, line := range strings.Split(string(readme), "\n") {
		if strings.HasPrefix(line, "```") {
			inCode = !inCode
			continue
		}
		if m := lineVerb.FindStringSubmatch(line); inCode && m != nil {
			verbs[m[1]] = true
		}
	}
	for _, m := range regexp.MustCompile("`mirrord ([a-z-]+)").FindAllStringSubmatch(string(readme), -1) {
		verbs[m[1]] = true
	}
	if len(verbs) < 8 {
		t.Fatalf("found only %d verbs in the README: %v", len(verbs), verbs)
	}
	for v := range verbs {
		out, err := exec.Command(mirrordBin, v, "--help").CombinedOutput()
		if err != nil {
			t.Errorf("mirrord %s --help: %v\n%s", v, err, out)
		}
	}
}

// TestREADMEKernelDevice: the README's /dev/nbdX section shows the config
// and commands that TestKernelDeviceRestart runs in its VM
// (testdata/vm/restart.sh): the YAML verbatim, each command in a line of
// the script.
func TestREADMEKernelDevice(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile("testdata/vm/restart.sh")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(readme), "\n## The volume as /dev/nbdX\n")
	if !ok {
		t.Fatal("README has no section \"The volume as /dev/nbdX\"")
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	blocks := regexp.MustCompile("(?s)```(yaml|sh)\n(.*?)```").FindAllStringSubmatch(sec, -1)
	if len(blocks) < 3 {
		t.Fatalf("the section has %d code blocks, want a yaml and two sh", len(blocks))
	}
	lines := strings.Split(string(script), "\n")
	for _, b := range blocks {
		if b[1] == "yaml" {
			if !strings.Contains(string(script), b[2]) {
				t.Errorf("restart.sh does not use the README's config:\n%s", b[2])
			}
			continue
		}
		for _, cmd := range strings.Split(strings.TrimSpace(b[2]), "\n") {
			cmd, _, _ = strings.Cut(cmd, " #")
			cmd = strings.TrimSpace(cmd)
			found := false
			for _, l := range lines {
				found = found || strings.Contains(l, cmd)
			}
			if !found {
				t.Errorf("README command %q is not run by testdata/vm/restart.sh", cmd)
			}
		}
	}
}

// TestREADMEFailoverExample: the failover section's configuration example
// is accepted as it stands (with the node, volume and peer around it).
func TestREADMEFailoverExample(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "```yaml\nfailover:\n")
	if !ok {
		t.Fatal("no failover YAML example in the README")
	}
	example, _, _ := strings.Cut(rest, "```")
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte("readme-example-secret-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The example's secret file lives in /etc; point it at a test file.
	example = strings.ReplaceAll(example, "/etc/mirrord/witness.secret", secret)
	cfg := filepath.Join(dir, "mirrord.yaml")
	body := fmt.Sprintf("node: {name: a}\nvolume: {name: vol0, path: %s/vol.img}\npeer: {node: b, address: \"10.1.0.2:7789\", secret-file: %s}\nfailover:\n%s",
		dir, secret, example)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(mirrordBin, "config", "-c", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("mirrord config on the README's failover example: %v\n%s\n%s", err, out, body)
	}
	for _, want := range []string{`"ConfirmDefault": "proceed"`, `"Mode": "auto"`, `"Path": "/etc/mirrord/app.sh"`} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("effective configuration lacks %s:\n%s", want, out)
		}
	}
}
