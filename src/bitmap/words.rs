//! Bit operations on a slice of 64-bit words, a word at a time.
//!
//! Bit `i` lives in word `i / 64` at position `i % 64` (least significant
//! bit first). Every range is half-open, `[start, end)`, in bits, and the
//! caller guarantees `start <= end <= words.len() * 64`. Nothing here knows
//! about bytes or granularity; `DirtyBitmap` maps those onto bits.

const BITS: u64 = u64::BITS as u64;

/// Words needed to hold `bits` bits.
pub(crate) fn words_for(bits: u64) -> u64 {
    bits.div_ceil(BITS)
}

/// The mask of bits `[lo, hi)` within one word, `lo < hi <= 64`.
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == BITS { !0 } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

/// Calls `f(word, mask)` for every word the range touches, with the mask of
/// the touched bits; whole words get a full mask.
fn for_each_masked(words: &mut [u64], start: u64, end: u64, mut f: impl FnMut(&mut u64, u64)) {
    if start >= end {
        return;
    }
    let first = (start / BITS) as usize;
    let last = ((end - 1) / BITS) as usize;
    let lo = start % BITS;
    let hi = (end - 1) % BITS + 1;
    if first == last {
        f(&mut words[first], mask(lo, hi));
        return;
    }
    f(&mut words[first], mask(lo, BITS));
    for w in &mut words[first + 1..last] {
        f(w, !0);
    }
    f(&mut words[last], mask(0, hi));
}

/// Sets bits `[start, end)`.
pub(crate) fn set(words: &mut [u64], start: u64, end: u64) {
    for_each_masked(words, start, end, |w, m| *w |= m);
}

/// Clears bits `[start, end)`.
pub(crate) fn clear(words: &mut [u64], start: u64, end: u64) {
    for_each_masked(words, start, end, |w, m| *w &= !m);
}

/// Whether bit `i` is set.
pub(crate) fn get(words: &[u64], i: u64) -> bool {
    words[(i / BITS) as usize] >> (i % BITS) & 1 == 1
}

/// Number of set bits in the whole slice.
pub(crate) fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// The first bit in `[start, end)` equal to `value`, skipping whole words
/// that cannot hold one.
fn next_equal(words: &[u64], start: u64, end: u64, value: bool) -> Option<u64> {
    if start >= end {
        return None;
    }
    let flip = if value { 0 } else { !0 };
    let mut w = (start / BITS) as usize;
    let last = ((end - 1) / BITS) as usize;
    // Bits below `start` in the first word do not count.
    let mut bits = (words[w] ^ flip) & mask(start % BITS, BITS);
    loop {
        if bits != 0 {
            let found = w as u64 * BITS + u64::from(bits.trailing_zeros());
            return (found < end).then_some(found);
        }
        if w == last {
            return None;
        }
        w += 1;
        bits = words[w] ^ flip;
    }
}

/// The first set bit in `[start, end)`.
pub(crate) fn next_set(words: &[u64], start: u64, end: u64) -> Option<u64> {
    next_equal(words, start, end, true)
}

/// The first clear bit in `[start, end)`.
pub(crate) fn next_clear(words: &[u64], start: u64, end: u64) -> Option<u64> {
    next_equal(words, start, end, false)
}

/// Words ORed in place: `dst[i] |= src[i]`; both have the same length.
pub(crate) fn or_assign(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_clear_across_word_boundaries() {
        let mut w = vec![0u64; 3];
        set(&mut w, 60, 130);
        assert_eq!(w[0], 0xf << 60);
        assert_eq!(w[1], !0);
        assert_eq!(w[2], 0b11);
        assert_eq!(count(&w), 70);
        clear(&mut w, 62, 129);
        assert_eq!(w, vec![0b11 << 60, 0, 0b10]);
        set(&mut w, 5, 5);
        assert_eq!(count(&w), 3);
    }

    #[test]
    fn full_word_range() {
        let mut w = vec![0u64; 2];
        set(&mut w, 64, 128);
        assert_eq!(w, vec![0, !0]);
        assert_eq!(next_set(&w, 0, 128), Some(64));
        assert_eq!(next_clear(&w, 64, 128), None);
        assert_eq!(next_clear(&w, 10, 128), Some(10));
    }

    #[test]
    fn next_respects_both_ends() {
        let mut w = vec![0u64; 4];
        set(&mut w, 200, 201);
        assert_eq!(next_set(&w, 0, 256), Some(200));
        assert_eq!(next_set(&w, 0, 200), None);
        assert_eq!(next_set(&w, 200, 201), Some(200));
        assert_eq!(next_set(&w, 201, 256), None);
        assert_eq!(next_clear(&w, 200, 201), None);
        assert_eq!(next_clear(&w, 200, 202), Some(201));
        assert_eq!(next_set(&w, 7, 7), None);
    }
}
