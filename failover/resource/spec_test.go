package resource

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/rs/zerolog"
	"go.yaml.in/yaml/v3"
)

func testLog(t *testing.T) zerolog.Logger { return zerolog.New(zerolog.NewTestWriter(t)) }

func TestSpecValidate(t *testing.T) {
	for _, tc := range []struct {
		spec  Spec
		field string // "" = valid
	}{
		{Spec{Type: "ip", Address: "10.0.0.100/24", Interface: "eth0"}, ""},
		{Spec{Type: "ip", Address: "fd00::100/64", Interface: "eth0", ARPCount: 5, ARPInterval: time.Second}, ""},
		{Spec{Type: "mount", Device: "/dev/nbd0", Path: "/srv", FSType: "ext4", Options: "noatime", Lazy: true}, ""},
		{Spec{Type: "script", Path: "/etc/mirrord/app.sh", Timeout: 30 * time.Second, Args: []string{"x"}}, ""},
		{Spec{}, "type"},
		{Spec{Type: "vip"}, "type"},
		{Spec{Type: "ip", Interface: "eth0"}, "address"},
		{Spec{Type: "ip", Address: "10.0.0.100", Interface: "eth0"}, "address"},
		{Spec{Type: "ip", Address: "127.0.0.2/8", Interface: "lo"}, "address"},
		{Spec{Type: "ip", Address: "10.0.0.100/24"}, "interface"},
		{Spec{Type: "ip", Address: "10.0.0.100/24", Interface: "a-very-long-interface-name"}, "interface"},
		{Spec{Type: "ip", Address: "10.0.0.100/24", Interface: "eth0", ARPCount: -1}, "arp-count"},
		{Spec{Type: "ip", Address: "10.0.0.100/24", Interface: "eth0", FSType: "ext4"}, "fstype"},
		{Spec{Type: "mount", Path: "/srv", FSType: "ext4"}, "device"},
		{Spec{Type: "mount", Device: "nbd0", Path: "/srv", FSType: "ext4"}, "device"},
		{Spec{Type: "mount", Device: "/dev/nbd0", Path: "/", FSType: "ext4"}, "path"},
		{Spec{Type: "mount", Device: "/dev/nbd0", Path: "/srv"}, "fstype"},
		{Spec{Type: "mount", Device: "/dev/nbd0", Path: "/srv", FSType: "ext4", Interface: "eth0"}, "interface"},
		{Spec{Type: "script", Path: "app.sh"}, "path"},
		{Spec{Type: "script", Path: "/app.sh", Lazy: true}, "lazy"},
		{Spec{Type: "script", Path: "/app.sh", Timeout: -time.Second}, "timeout"},
	} {
		err := tc.spec.Validate(2)
		if tc.field == "" {
			if err != nil {
				t.Errorf("%+v: %v", tc.spec, err)
			}
			continue
		}
		if !errors.Is(err, ErrSpec) || !strings.Contains(err.Error(), "failover.resources[2]."+tc.field+":") {
			t.Errorf("%+v: %v, want an error naming %s", tc.spec, err, tc.field)
		}
	}
}

// The YAML shape of the package doc decodes the way cmd/mirrord decodes
// its config (exact, with duration strings), and unknown keys are errors.
func TestSpecDecode(t *testing.T) {
	const doc = `
resources:
  - {type: mount, device: /dev/nbd0, path: /srv, fstype: ext4, options: noatime}
  - {type: ip, address: 10.0.0.100/24, interface: eth0, arp-interval: 100ms}
  - {type: script, path: /etc/mirrord/app.sh, timeout: 30s, name: app}
`
	decode := func(doc string) ([]Spec, error) {
		var raw map[string]any
		if err := yaml.Unmarshal([]byte(doc), &raw); err != nil {
			t.Fatal(err)
		}
		var out struct {
			Resources []Spec `mapstructure:"resources"`
		}
		d, err := mapstructure.NewDecoder(&mapstructure.DecoderConfig{
			Result: &out, ErrorUnused: true,
			DecodeHook: mapstructure.StringToTimeDurationHookFunc(),
		})
		if err != nil {
			t.Fatal(err)
		}
		return out.Resources, d.Decode(raw)
	}
	specs, err := decode(doc)
	if err != nil {
		t.Fatal(err)
	}
	want := []Spec{
		{Type: "mount", Device: "/dev/nbd0", Path: "/srv", FSType: "ext4", Options: "noatime"},
		{Type: "ip", Address: "10.0.0.100/24", Interface: "eth0", ARPInterval: 100 * time.Millisecond},
		{Type: "script", Path: "/etc/mirrord/app.sh", Timeout: 30 * time.Second, Name: "app"},
	}
	if !reflect.DeepEqual(specs, want) {
		t.Fatalf("decoded %+v", specs)
	}
	c, err := Build(specs, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Names(); !reflect.DeepEqual(got, []string{"mount:/srv", "ip:10.0.0.100/24", "app"}) {
		t.Fatalf("names %v", got)
	}
	if _, err := decode("resources:\n  - {type: ip, adress: 10.0.0.1/24}\n"); err == nil || !strings.Contains(err.Error(), "adress") {
		t.Fatalf("misspelt key: %v", err)
	}
	if _, err := Build(append(specs, specs[1]), testLog(t)); !errors.Is(err, ErrSpec) || !strings.Contains(err.Error(), "resources[3]") {
		t.Fatalf("duplicate: %v", err)
	}
}
