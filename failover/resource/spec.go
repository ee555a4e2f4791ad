package resource

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Resource types, as Spec.Type names them.
const (
	TypeIP     = "ip"
	TypeMount  = "mount"
	TypeScript = "script"
)

// Spec is one entry of failover.resources (see the package doc for the
// YAML). Only the keys of its Type may be set.
type Spec struct {
	Type    string        `mapstructure:"type"`
	Name    string        `mapstructure:"name"`
	Timeout time.Duration `mapstructure:"timeout"`
	// ip
	Address     string        `mapstructure:"address"`
	Interface   string        `mapstructure:"interface"`
	ARPCount    int           `mapstructure:"arp-count"`
	ARPInterval time.Duration `mapstructure:"arp-interval"`
	// mount (Path is also the script's)
	Device  string `mapstructure:"device"`
	Path    string `mapstructure:"path"`
	FSType  string `mapstructure:"fstype"`
	Options string `mapstructure:"options"`
	Lazy    bool   `mapstructure:"lazy"`
	// script
	Args []string `mapstructure:"args"`
}

// Validate reports the first invalid field; i is the entry's index, for the
// message.
func (s Spec) Validate(i int) error {
	bad := func(field, format string, a ...any) error {
		return fmt.Errorf("%w: failover.resources[%d].%s: %s", ErrSpec, i, field, fmt.Sprintf(format, a...))
	}
	set := map[string]bool{
		"address": s.Address != "", "interface": s.Interface != "", "arp-count": s.ARPCount != 0,
		"arp-interval": s.ARPInterval != 0, "device": s.Device != "", "path": s.Path != "",
		"fstype": s.FSType != "", "options": s.Options != "", "lazy": s.Lazy, "args": len(s.Args) > 0,
	}
	var keys, required []string
	switch s.Type {
	case TypeIP:
		keys, required = []string{"address", "interface", "arp-count", "arp-interval"}, []string{"address", "interface"}
	case TypeMount:
		keys, required = []string{"device", "path", "fstype", "options", "lazy"}, []string{"device", "path", "fstype"}
	case TypeScript:
		keys, required = []string{"path", "args"}, []string{"path"}
	case "":
		return bad("type", "missing (ip, mount or script)")
	default:
		return bad("type", "unknown type %q (ip, mount or script)", s.Type)
	}
	for _, k := range required {
		if !set[k] {
			return bad(k, "required for type %s", s.Type)
		}
	}
	for k, on := range set {
		if on && !contains(keys, k) {
			return bad(k, "not a key of type %s (its keys: %s)", s.Type, strings.Join(keys, ", "))
		}
	}
	if s.Timeout < 0 {
		return bad("timeout", "%v is negative", s.Timeout)
	}
	switch s.Type {
	case TypeIP:
		p, err := netip.ParsePrefix(s.Address)
		if err != nil {
			return bad("address", "%q is not an address with a prefix length (10.0.0.100/24): %v", s.Address, err)
		}
		if p.Addr() != p.Addr().Unmap() || p.Addr().IsUnspecified() || p.Addr().IsMulticast() || p.Addr().IsLoopback() {
			return bad("address", "%s cannot float", s.Address)
		}
		if len(s.Interface) > 15 {
			return bad("interface", "%q is longer than 15 bytes", s.Interface)
		}
		if s.ARPCount < 0 || s.ARPCount > 100 {
			return bad("arp-count", "%d: 0 (default %d) to 100", s.ARPCount, DefaultARPCount)
		}
		if s.ARPInterval < 0 {
			return bad("arp-interval", "%v is negative", s.ARPInterval)
		}
	case TypeMount:
		if !filepath.IsAbs(s.Path) || filepath.Clean(s.Path) == "/" {
			return bad("path", "%q: an absolute path other than /", s.Path)
		}
		if !filepath.IsAbs(s.Device) {
			return bad("device", "%q: an absolute path", s.Device)
		}
	case TypeScript:
		if !filepath.IsAbs(s.Path) {
			return bad("path", "%q: an absolute path (the agent's working directory is not the operator's)", s.Path)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Resource returns the resource the (valid) spec describes.
func (s Spec) Resource(log zerolog.Logger) Resource {
	switch s.Type {
	case TypeIP:
		return &IP{Address: netip.MustParsePrefix(s.Address), Interface: s.Interface, ARPCount: s.ARPCount, ARPInterval: s.ARPInterval, Log: log}
	case TypeMount:
		return &Mount{Device: s.Device, Path: filepath.Clean(s.Path), FSType: s.FSType, Options: s.Options, Lazy: s.Lazy}
	}
	return &Script{Path: s.Path, Args: s.Args, Timeout: s.timeout()}
}

func (s Spec) timeout() time.Duration {
	if s.Timeout > 0 {
		return s.Timeout
	}
	return DefaultTimeout
}

// scriptGrace is how much longer than a script's own timeout the chain
// waits, so that the script's error (with its output) is what is reported.
const scriptGrace = 2 * time.Second

// Build validates specs and returns their chain, in the order listed. A
// name (given or the default type:address/path) may appear only once.
func Build(specs []Spec, log zerolog.Logger) (*Chain, error) {
	entries := make([]Entry, 0, len(specs))
	names := map[string]int{}
	for i, s := range specs {
		if err := s.Validate(i); err != nil {
			return nil, err
		}
		r := s.Resource(log.With().Str("resource", s.Type).Logger())
		if s.Name != "" {
			r = named{r, s.Name}
		}
		if j, dup := names[r.Name()]; dup {
			return nil, fmt.Errorf("%w: failover.resources[%d]: %s is also resources[%d]", ErrSpec, i, r.Name(), j)
		}
		names[r.Name()] = i
		timeout := s.timeout()
		if s.Type == TypeScript {
			timeout += scriptGrace
		}
		entries = append(entries, Entry{Resource: r, Timeout: timeout})
	}
	return NewChain(log, entries...), nil
}

// named gives a resource the operator's name.
type named struct {
	Resource
	name string
}

func (n named) Name() string { return n.name }
