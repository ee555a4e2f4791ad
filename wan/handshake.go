package wan

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"
)

// authLabel separates our MACs from any other use of the same secret.
const authLabel = "mirrord-auth-v1"

// closeGrace bounds the best-effort FrameClose sent when a handshake fails. On TCP the
// small frame lands in the socket buffer at once; the bound only matters when the
// peer is not reading (a synchronous pipe, a wedged peer), and then a dying
// connection must not hold the caller.
const closeGrace = 200 * time.Millisecond

// Close reasons sent when the handshake fails here.
const (
	reasonAuth    = "authentication failed"
	reasonVersion = "unsupported protocol version"
	reasonHello   = "malformed hello"
)

type writeDeadliner interface{ SetWriteDeadline(time.Time) error }

// Handshake performs the versioned, mutually authenticated handshake over the
// connection under r and w, and returns the peer's Hello.
//
// Both sides write their Hello frame and read the peer's; a peer of another version
// is ErrVersion. Then each sends FrameAuth =
//
//	HMAC-SHA256(secret, "mirrord-auth-v1" || peerHello.Nonce || ownHello.Nonce || ownHelloBytes || peerHelloBytes)
//
// — proof of the secret over the peer's fresh challenge, bound to both hellos byte
// for byte so that no field can be altered or spliced from another session — and
// checks the peer's with hmac.Equal. A mismatch is ErrAuth, after a best-effort
// FrameClose "authentication failed"; no frame after the peer's Auth is read, so
// whatever the peer pipelined stays in r. A peer Hello carrying our own nonce is
// ErrAuth before our Auth is sent: it is our Hello reflected back, and both MACs
// would be equal.
//
// Each side writes while it reads, so two peers may start at once even over a
// synchronous transport (net.Pipe). own.Version 0 means ProtocolVersion, and a zero
// own.Nonce is replaced by a random one; callers should leave it zero unless a test
// needs it fixed. An empty secret is ErrNoSecret. w must hold no buffered frames.
//
// Handshake sets no deadline of its own: the caller bounds it with a deadline on the
// connection. On error the connection is unusable and must be closed; Handshake may
// have moved its write deadline to stop a blocked write.
func Handshake(r *Reader, w *Writer, own Hello, secret []byte) (peer Hello, err error) {
	return HandshakeBound(r, w, own, secret, nil)
}

// HandshakeBound is Handshake with both MACs also covering binding, bytes both
// ends derive from the channel the stream runs in (TLSBinding for TLS). A MAC
// relayed from another TLS session, as a man in the middle holding the secret
// but neither certificate would need, then fails. Both sides must pass equal
// bindings (both nil on a plaintext link).
func HandshakeBound(r *Reader, w *Writer, own Hello, secret, binding []byte) (peer Hello, err error) {
	if len(secret) == 0 {
		return Hello{}, ErrNoSecret
	}
	if w.Buffered() != 0 {
		return Hello{}, fmt.Errorf("wan: handshake: writer holds %d buffered bytes", w.Buffered())
	}
	if own.Version == 0 {
		own.Version = ProtocolVersion
	}
	if own.Nonce == ([32]byte{}) {
		_, _ = rand.Read(own.Nonce[:]) // never fails (crypto/rand, Go 1.24+)
	}
	ownBytes, err := own.MarshalBinary()
	if err != nil {
		return Hello{}, fmt.Errorf("wan: handshake: own hello: %w", err)
	}
	r.handshake = true
	defer func() { r.handshake = false }()

	f, err := exchange(r, w, FrameHello, ownBytes)
	if err != nil {
		return Hello{}, err
	}
	// The payload aliases the Reader's buffer, which the next frame overwrites.
	peerBytes := bytes.Clone(f.Payload)
	if err := peer.UnmarshalBinary(peerBytes); err != nil {
		reason := reasonHello
		if errors.Is(err, ErrVersion) {
			reason = reasonVersion
		}
		sendClose(w, reason)
		return Hello{}, err
	}
	if peer.Nonce == own.Nonce {
		sendClose(w, reasonAuth)
		return Hello{}, fmt.Errorf("%w: peer hello carries our own nonce (reflected)", ErrAuth)
	}

	f, err = exchange(r, w, FrameAuth, authMAC(secret, binding, peer.Nonce, own.Nonce, ownBytes, peerBytes))
	if err != nil {
		return Hello{}, err
	}
	if !hmac.Equal(f.Payload, authMAC(secret, binding, own.Nonce, peer.Nonce, peerBytes, ownBytes)) {
		sendClose(w, reasonAuth)
		return Hello{}, fmt.Errorf("%w: node %q", ErrAuth, peer.Node)
	}
	return peer, nil
}

// authMAC computes the Auth payload a side with the given challenges and hellos
// sends. A binding is appended to the label, so an unbound MAC (binding nil) is
// byte for byte the version-1 MAC and plaintext peers of older builds still agree.
func authMAC(secret, binding []byte, peerNonce, ownNonce [32]byte, ownHello, peerHello []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(authLabel))
	if len(binding) > 0 {
		m.Write([]byte("/tls"))
		m.Write(binding)
	}
	m.Write(peerNonce[:])
	m.Write(ownNonce[:])
	m.Write(ownHello)
	m.Write(peerHello)
	return m.Sum(nil)
}

// ExchangeStream sends own in a FrameStream while it reads the peer's, after
// a handshake in which both Hellos carried HelloStream. A peer that refuses
// instead (FrameClose) is ErrPeerClosed with its reason.
func ExchangeStream(r *Reader, w *Writer, own StreamPos) (StreamPos, error) {
	b, err := own.MarshalBinary()
	if err != nil {
		return StreamPos{}, err
	}
	f, err := exchange(r, w, FrameStream, b)
	if err != nil {
		return StreamPos{}, err
	}
	var peer StreamPos
	if err := peer.UnmarshalBinary(f.Payload); err != nil {
		return StreamPos{}, err
	}
	return peer, nil
}

// exchange sends one frame while it reads the peer's next one, and requires that to
// be of the same type. Writing in a goroutine lets both peers send first: on a
// synchronous transport two sequential writers would wait for each other forever.
// The Writer is only touched by the goroutine until it is joined.
func exchange(r *Reader, w *Writer, t FrameType, payload []byte) (Frame, error) {
	done := make(chan error, 1)
	go func() {
		err := w.WriteFrame(Header{Type: t}, payload)
		if err == nil {
			err = w.Flush()
		}
		done <- err
	}()
	f, rerr := r.ReadFrame()
	if rerr != nil || f.Type != t {
		// The peer may never read what we are sending; unblock the write so we
		// return now, rather than when the caller's deadline fires.
		if d, ok := w.w.(writeDeadliner); ok {
			_ = d.SetWriteDeadline(time.Unix(1, 0))
		}
	}
	werr := <-done
	switch {
	case rerr != nil:
		return Frame{}, fmt.Errorf("wan: handshake: read %v: %w", t, rerr)
	case f.Type == FrameClose && t == FrameAuth && string(f.Payload) == reasonHello:
		// Its answer to our Hello: say so, so that the caller can retry
		// without the optional flags.
		return Frame{}, fmt.Errorf("%w: %q", ErrHelloRefused, f.Payload)
	case f.Type == FrameClose:
		// Reported ahead of any write error: the peer's reason is the news.
		return Frame{}, fmt.Errorf("%w: %q", ErrPeerClosed, f.Payload)
	case f.Type != t:
		return Frame{}, fmt.Errorf("%w: %v frame where %v was due", ErrMalformed, f.Type, t)
	case werr != nil:
		return Frame{}, fmt.Errorf("wan: handshake: send %v: %w", t, werr)
	}
	return f, nil
}

// sendClose tells the peer why we give up, best effort and briefly: the handshake has
// already failed and its error is what the caller needs.
func sendClose(w *Writer, reason string) {
	if d, ok := w.w.(writeDeadliner); ok {
		_ = d.SetWriteDeadline(time.Now().Add(closeGrace))
	}
	if w.WriteFrame(Header{Type: FrameClose}, []byte(reason)) == nil {
		_ = w.Flush()
	}
}
