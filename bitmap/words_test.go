package bitmap

import (
	"slices"
	"testing"
)

func TestWordsRange(t *testing.T) {
	b, err := New(300*4096, 4096) // 300 regions: 5 words, the last partial
	if err != nil {
		t.Fatal(err)
	}
	b.Set(0, 4096)
	b.Set(130*4096, 3*4096)
	b.Set(299*4096, 4096)
	all := b.Words()
	for _, tc := range []struct{ first, n, wantLen int64 }{
		{0, 5, 5}, {1, 2, 2}, {3, 10, 2}, {4, 1, 1}, {5, 1, 0}, {-1, 2, 0}, {0, 0, 0},
	} {
		got := b.WordsRange(tc.first, tc.n)
		if int64(len(got)) != tc.wantLen {
			t.Fatalf("WordsRange(%d, %d) has %d words, want %d", tc.first, tc.n, len(got), tc.wantLen)
		}
		if tc.wantLen > 0 && !slices.Equal(got, all[tc.first:tc.first+tc.wantLen]) {
			t.Fatalf("WordsRange(%d, %d) = %x, want %x", tc.first, tc.n, got, all[tc.first:tc.first+tc.wantLen])
		}
	}
}
