package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mirrord/mirrord/wan"
)

// cmdKeygen writes the TLS key material of a pair: the pair's own CA and a
// certificate and key per node, every file 0600 in a 0700 directory. The CA key
// stays with the operator (it can re-issue a node); each node needs ca.crt and
// its own NODE.crt and NODE.key.
func cmdKeygen(args []string, stdout io.Writer) error {
	fset := newFlagSet("keygen")
	out := fset.String("out", "", "directory to write ca.crt, ca.key, NODE.crt, NODE.key into (created)")
	nodes := fset.StringSlice("nodes", nil, "node names of the pair, as in node.name (e.g. alpha,beta)")
	force := fset.Bool("force", false, "overwrite existing files")
	if err := parseFlags(fset, args); err != nil {
		return err
	}
	if *out == "" || len(*nodes) < 2 {
		return fmt.Errorf("%w: need --out DIR and --nodes with at least two names", errUsage)
	}
	pk, err := wan.GenerateKeys(*nodes, time.Now())
	if err != nil {
		return err
	}
	files := map[string][]byte{"ca.crt": pk.CACert, "ca.key": pk.CAKey}
	for n, k := range pk.Nodes {
		if strings.ContainsAny(n, "/\\") || n == "ca" {
			return fmt.Errorf("%w: node name %q cannot name a file", errUsage, n)
		}
		files[n+".crt"], files[n+".key"] = k.Cert, k.Key
	}
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return err
	}
	if !*force {
		for name := range files {
			if _, err := os.Stat(filepath.Join(*out, name)); !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%s exists: keys of another pair? remove it or pass --force", filepath.Join(*out, name))
			}
		}
	}
	for name, b := range files {
		p := filepath.Join(*out, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			return err
		}
		if err := os.Chmod(p, 0o600); err != nil { // an existing file keeps its mode otherwise
			return err
		}
	}
	fmt.Fprintf(stdout, "wrote the pair's CA and keys for %s in %s\n", strings.Join(*nodes, ", "), *out)
	fmt.Fprintf(stdout, "copy ca.crt, NODE.crt and NODE.key to each node (keep ca.key offline) and set:\n")
	fmt.Fprintf(stdout, "  peer:\n    profile: wan\n    tls:\n      ca: /etc/mirrord/ca.crt\n      cert: /etc/mirrord/NODE.crt\n      key: /etc/mirrord/NODE.key\n")
	return nil
}
