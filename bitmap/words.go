package bitmap

// WordsRange returns a copy of n raw words starting at word first, in the
// layout of Words, clipped to the bitmap. The activity log persists just the
// words of one extent this way instead of copying the whole bitmap.
func (b *Bitmap) WordsRange(first, n int64) []uint64 {
	if first < 0 || n <= 0 || first >= int64(len(b.words)) {
		return nil
	}
	n = min(n, int64(len(b.words))-first)
	out := make([]uint64, n)
	for i := range out {
		out[i] = b.words[first+int64(i)].Load()
	}
	return out
}
