package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/mirrord/mirrord/failover/witness"
)

// cmdWitness runs the third vote on a third host (see package witness). It
// has its own flags, not the volume's config: a witness serves many pairs
// and has no volume.
func cmdWitness(args []string) error {
	d := witness.Defaults()
	fs := newFlagSet("witness")
	listen := fs.String("listen", d.Listen, "UDP address to answer votes on")
	secretFile := fs.String("secret-file", "", "file holding the secret shared with the nodes (required)")
	stateDir := fs.String("state-dir", d.StateDir, "directory for the durable state (epochs, outdated nodes)")
	leaseTTL := fs.Duration("lease", d.LeaseTTL, "lease for nodes that name none")
	maxSkew := fs.Duration("max-skew", d.MaxSkew, "refuse requests stamped further than this from the witness's clock")
	logLevel := fs.String("log-level", "info", "log level")
	logFormat := fs.String("log-format", "auto", "log format: auto, json or console")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *secretFile == "" {
		return fmt.Errorf("%w: --secret-file is required (the same file the nodes use)", errUsage)
	}
	log := newLogger(LogConfig{Level: *logLevel, Format: *logFormat}, os.Stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return witness.ListenAndServe(ctx, witness.Config{Listen: *listen, SecretFile: *secretFile, StateDir: *stateDir, LeaseTTL: *leaseTTL, MaxSkew: *maxSkew}, log)
}
