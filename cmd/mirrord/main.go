// Command mirrord serves a mirrored block device over NBD.
//
//	mirrord run [--config FILE] [--set key=value]...   serve the volume
//	mirrord version                                    print the version
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `mirrord: a block-level mirroring daemon

Usage:
  mirrord run [--config FILE] [--set key=value]...   serve the volume over NBD
  mirrord config [--config FILE] [--set key=value]... print the effective config keys
  mirrord status [--json]                            role, disk, peer, resync progress
  mirrord events                                     stream state changes (JSON lines)
  mirrord promote [--force [--i-accept-data-loss]]   make this node Primary (with failover: the panic button)
  mirrord demote                                     make this node Secondary
  mirrord verify [--json]                            compare digests with the peer
  mirrord connect | disconnect                       leave / enter StandAlone
  mirrord discard-my-data                            resolve a split brain against this node
  mirrord set KEY VALUE                              change peer.rate-limit or peer.resync-share now
  mirrord keygen --out DIR --nodes a,b               make a pair's TLS CA, certificates and keys
  mirrord switchover                                 planned role swap with the peer, zero loss (failover)
  mirrord confirm | deny                             answer the failover agent's announced intent
  mirrord maintenance on|off                         failover agent watches but never acts
  mirrord witness --secret-file FILE [--listen ADDR] run the third vote (on a third host)
  mirrord version                                    print the version

Run 'mirrord COMMAND --help' for a command's flags.
`

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks errors that are the caller's wording, answered with exit 2.
var errUsage = errors.New("usage")

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(args[1:], stderr)
	case "config":
		err = cmdConfig(args[1:], stdout)
	case "status":
		err = cmdStatus(args[1:], stdout)
	case "events":
		err = cmdEvents(args[1:], stdout)
	case "verify":
		err = cmdVerify(args[1:], stdout)
	case "keygen":
		err = cmdKeygen(args[1:], stdout)
	case "set":
		err = cmdSet(args[1:], stdout)
	case "switchover", "confirm", "deny", "maintenance":
		err = cmdFailover(args[0], args[1:], stdout)
	case "promote", "demote", "connect", "disconnect", "discard-my-data":
		err = cmdSimple(args[0], args[1:], stdout)
	case "witness":
		err = cmdWitness(args[1:])
	case "version", "--version":
		fmt.Fprintln(stdout, versionString())
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "mirrord: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "mirrord %s: %v\n", args[0], err)
		if errors.Is(err, errUsage) {
			return 2
		}
		return 1
	}
	return 0
}

func versionString() string {
	rev := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				rev = s.Value
				if len(rev) > 12 {
					rev = rev[:12]
				}
			}
		}
	}
	return fmt.Sprintf("mirrord %s (commit %s, %s, %s/%s)", version, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// newFlagSet returns a flag set that reports errors instead of exiting.
func newFlagSet(name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("mirrord "+name, pflag.ContinueOnError)
	fs.SortFlags = false
	return fs
}

func parseFlags(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", errUsage, fs.Args())
	}
	return nil
}

// newLogger builds the process logger: human-readable on a terminal, JSON
// lines otherwise (for journald and log shippers).
func newLogger(c LogConfig, w *os.File) zerolog.Logger {
	level, _ := zerolog.ParseLevel(c.Level)
	var out io.Writer = w
	console := c.Format == "console"
	if c.Format == "auto" {
		_, err := unix.IoctlGetTermios(int(w.Fd()), unix.TCGETS)
		console = err == nil
	}
	if console {
		out = zerolog.ConsoleWriter{Out: w, TimeFormat: time.TimeOnly}
	}
	return zerolog.New(out).Level(level).With().Timestamp().Logger()
}

func cmdConfig(args []string, stdout io.Writer) error {
	fs := newFlagSet("config")
	var cf configFlags
	cf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c, err := loadConfig(cf)
	if err != nil {
		return err
	}
	if c.Peer.Secret != "" {
		c.Peer.Secret = "(hidden)"
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(c)
}
