package wan

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

// TLS on the replication link.
//
// A pair of nodes shares a private CA made for that pair alone (GenerateKeys):
// trusting it trusts exactly the other node, not a public PKI nor any other pair.
// Each node's certificate names the node (CN and DNS name), and each side checks
// that the peer's certificate names the configured peer node, so a certificate
// stolen from another pair, or the pair's own certificate presented back to it,
// is refused. TLS 1.3 only: no downgrade, no renegotiation, forward secrecy.
//
// The HMAC handshake still runs inside TLS, bound to the TLS session by an
// exporter (TLSBinding): certificates say which machine is at the other end, the
// shared secret says it serves this volume pair (two pairs on the same hosts share
// the CA, not the secret), and the binding makes the HMAC worthless outside the
// TLS session it was computed in.

// ErrPeerCert means the peer's certificate, though signed by the pair's CA, does
// not name the configured peer node.
var ErrPeerCert = errors.New("wan: peer certificate names another node")

// ErrTLSMismatch means one side speaks TLS and the other plaintext.
var ErrTLSMismatch = errors.New("wan: TLS on one side of the link only")

// ErrTLSRejected means this side's TLS refused a record of an established
// stream: a bad record MAC is a stream altered (or corrupted) in transit. Nothing
// of the refused record reaches the caller.
var ErrTLSRejected = errors.New("wan: TLS record rejected (altered or corrupted in transit); connection dropped")

// tlsExporterLabel labels the keying material the handshake MACs bind to.
const tlsExporterLabel = "EXPORTER-mirrord-auth-v1"

// TLSFiles are the PEM files of one node: the pair's CA certificate, and this
// node's certificate and private key.
type TLSFiles struct {
	CA, Cert, Key string
}

// LoadTLS builds the TLS configuration of a node whose peer is peerNode. The same
// configuration serves both ends: the dialing side uses it with tls.Client, the
// accepting side with tls.Server, and both require and verify a certificate from
// the other.
func LoadTLS(f TLSFiles, peerNode string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls ca %s: no PEM certificate in it", f.CA)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("tls cert/key %s, %s: %w", f.Cert, f.Key, err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		// The dialer checks the listener's certificate against this name.
		ServerName: peerNode,
		// The listener has no name to check against in stock verification;
		// this runs on both sides after the chain is verified.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return fmt.Errorf("%w: no certificate", ErrPeerCert)
			}
			leaf := cs.PeerCertificates[0]
			if err := leaf.VerifyHostname(peerNode); err != nil {
				return fmt.Errorf("%w: certificate of %q, %v; configured peer is %q", ErrPeerCert, leaf.Subject.CommonName, leaf.DNSNames, peerNode)
			}
			return nil
		},
	}, nil
}

// TLSBinding returns the keying material both ends of a TLS 1.3 connection derive
// from its session; the handshake MACs cover it (HandshakeBound).
func TLSBinding(c *tls.Conn) ([]byte, error) {
	cs := c.ConnectionState()
	return cs.ExportKeyingMaterial(tlsExporterLabel, nil, 32)
}

// TLSError explains a failed TLS handshake: a peer that spoke plaintext is
// ErrTLSMismatch, with the hint an operator needs.
func TLSError(err error) error {
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return fmt.Errorf("%w: the peer did not answer in TLS (is peer.tls enabled on it?): %v", ErrTLSMismatch, err)
	}
	return err
}

// StreamError explains a read error on an established TLS stream: an alert this
// side raised (Go reports those as a net.OpError with Op "local error") is
// ErrTLSRejected. Other errors are returned as they are.
func StreamError(err error) error {
	if op, ok := errors.AsType[*net.OpError](err); ok && op.Op == "local error" {
		return fmt.Errorf("%w: %v", ErrTLSRejected, err)
	}
	return err
}

// looksLikeTLS reports whether a frame header is in fact the start of a TLS record
// (a handshake record, versions 3.x): what a TLS peer sends a plaintext one.
func looksLikeTLS(hdr []byte) bool {
	return len(hdr) >= 3 && hdr[0] == 0x16 && hdr[1] == 0x03 && hdr[2] <= 0x04
}

// PairKeys is the key material of a pair, PEM-encoded: the CA (its key is kept so
// that a node can be re-issued) and each node's certificate and key.
type PairKeys struct {
	CACert, CAKey []byte
	Nodes         map[string]NodeKeys
}

// NodeKeys is one node's certificate and private key, PEM-encoded.
type NodeKeys struct {
	Cert, Key []byte
}

// KeyValidity is how long generated certificates are valid. A DR pair is re-keyed
// rarely and an expired certificate takes replication down; ten years trades
// rotation discipline for that risk, and `mirrord keygen` can re-issue any time.
const KeyValidity = 10 * 365 * 24 * time.Hour

// GenerateKeys makes a CA for a pair and a certificate for each node (ECDSA P-256,
// usable as TLS client and server). Node names must be non-empty and distinct.
func GenerateKeys(nodes []string, now time.Time) (*PairKeys, error) {
	seen := make(map[string]bool)
	for _, n := range nodes {
		if n == "" || seen[n] {
			return nil, fmt.Errorf("keygen: node names must be non-empty and distinct (got %q)", nodes)
		}
		seen[n] = true
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "mirrord pair CA", Organization: []string{"mirrord"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(KeyValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	pk := &PairKeys{CACert: pemBlock("CERTIFICATE", caDER), Nodes: make(map[string]NodeKeys)}
	if pk.CAKey, err = keyPEM(caKey); err != nil {
		return nil, err
	}
	for _, n := range nodes {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: n, Organization: []string{"mirrord"}},
			DNSNames:     []string{n},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(KeyValidity),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, err
		}
		kp, err := keyPEM(key)
		if err != nil {
			return nil, err
		}
		pk.Nodes[n] = NodeKeys{Cert: pemBlock("CERTIFICATE", der), Key: kp}
	}
	return pk, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127)) // never fails (crypto/rand)
	return n
}

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pemBlock("PRIVATE KEY", der), nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
