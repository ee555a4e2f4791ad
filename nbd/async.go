package nbd

// asyncWrite is a write started on an AsyncWriter; its Done does what
// handle does after WriteAt returns.
type asyncWrite struct {
	c *conn
	r request
}

// acquire takes n of the connection's budget for a request. Should that
// wait for other requests to be answered, what the device holds back for
// the burst (their frames, their local copies) leaves first.
func (c *conn) acquire(dev AsyncWriter, n int64) {
	if !c.budget.tryAcquire(n) {
		c.unplug(dev)
		c.budget.acquire(n)
	}
}

// writeAsync starts r on dev from the reader, once the budget is taken.
func (c *conn) writeAsync(dev AsyncWriter, r *request) {
	r.cost = max(int64(r.Length), minRequestCost)
	c.acquire(dev, r.cost)
	c.handlers.Add(1)
	c.active.Add(1)
	a := &asyncWrite{c: c, r: *r}
	dev.WriteAsync(*r.buf, int64(r.Offset), c.br.Buffered() >= requestHeaderSize, a)
}

func (a *asyncWrite) Done(err error) {
	c, r := a.c, &a.r
	defer c.handlers.Done()
	defer c.active.Add(-1)
	putBuf(r.buf)
	st := &c.s.stats
	st.writes.Add(1)
	st.bytesWritten.Add(uint64(r.Length))
	c.complete(r, err, nil, true)
}

func (a *asyncWrite) SendHeld() { a.c.flushHeld() }

// tryAcquire is acquire when it would not wait.
func (b *budget) tryAcquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.requestsIn > 0 && b.used+n > b.max {
		return false
	}
	b.used += n
	b.requestsIn++
	return true
}

// unplug releases what the device holds for the reader's burst: sync
// writes held back (AsyncWriter), and the plug of a LocalOnly device.
func (c *conn) unplug(dev AsyncWriter) {
	if dev != nil {
		dev.Unplug()
	}
	if c.plugged {
		c.plugged = false
		c.plugger.UnplugBurst()
	}
}

// plugBurst plugs a Plugger before a request served on the reader while
// more are already read (beyond r's payload, if it is still in the read
// buffer: r.discard).
func (c *conn) plugBurst(r *request) {
	if c.plugger != nil && !c.plugged && c.br.Buffered()-r.discard >= requestHeaderSize {
		c.plugged = true
		c.plugger.PlugBurst()
	}
}
