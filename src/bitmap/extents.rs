//! Finding dirty and clean areas, a word at a time: the queries behind
//! NBD block status for `qemu:dirty-bitmap:NAME` and behind backup jobs.
//! All of them clip their end to the disk size and never report bytes
//! outside `[offset, end)`.

use super::dirty::DirtyBitmap;

/// A run of bytes that are all dirty or all clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub dirty: bool,
}

impl DirtyBitmap {
    /// The raw words with the size and granularity, for the queries here.
    pub(super) fn view(&self) -> View<'_> {
        View {
            words: self.words(),
            shift: self.granularity_shift(),
            size: self.size(),
        }
    }

    /// The first dirty granule in `[first, stop)`.
    pub(crate) fn next_set(&self, first: u64, stop: u64) -> Option<u64> {
        next_equal(self.words(), first, stop, true)
    }

    /// The first clean granule in `[first, stop)`.
    pub(crate) fn next_unset(&self, first: u64, stop: u64) -> Option<u64> {
        next_equal(self.words(), first, stop, false)
    }

    /// The first dirty area in `[offset, end)`: its start and length in
    /// bytes, clipped to `[offset, min(end, size))`. QEMU's
    /// bdrv_dirty_bitmap_next_dirty_area without a length cap.
    pub fn next_dirty_area(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        self.view().next_dirty_area(offset, end)
    }

    /// The first clean byte in `[offset, end)`, as QEMU's
    /// bdrv_dirty_bitmap_next_zero.
    pub fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        self.view().next_clean(offset, end)
    }

    /// The dirty areas in `[offset, end)`, in order, each maximal.
    pub fn dirty_extents(&self, offset: u64, end: u64) -> DirtyExtents<'_> {
        DirtyExtents {
            view: self.view(),
            pos: offset,
            end: end.min(self.size()),
        }
    }

    /// `[offset, end)` cut into alternating clean and dirty extents that
    /// cover it exactly (clipped to the disk size), as NBD block status needs.
    pub fn extents(&self, offset: u64, end: u64) -> Extents<'_> {
        Extents {
            view: self.view(),
            pos: offset,
            end: end.min(self.size()),
        }
    }
}

/// A bitmap's raw words, size and granularity. A `BitVec` decodes its
/// packed pointer for every raw view, which cost ~7% per extent when each
/// query took its own (benches/README.md); an iterator takes one view.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    words: &'a [u64],
    shift: u32,
    size: u64,
}

impl View<'_> {
    /// Whether the granule holding byte `offset` is dirty; bytes past the
    /// end are clean.
    pub(super) fn is_dirty(&self, offset: u64) -> bool {
        let g = offset >> self.shift;
        offset < self.size
            && self
                .words
                .get((g / 64) as usize)
                .is_some_and(|w| w >> (g % 64) & 1 == 1)
    }

    /// The granules `[first, stop)` that hold bytes `[offset, end)`, after
    /// clipping `end` to the disk size; `None` when that range is empty.
    fn granule_span(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        if offset >= end {
            return None;
        }
        Some((offset >> self.shift, ((end - 1) >> self.shift) + 1))
    }

    #[inline]
    fn next_dirty_area(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        let (first, stop) = self.granule_span(offset, end)?;
        let dirty = next_equal(self.words, first, stop, true)?;
        let start = (dirty << self.shift).max(offset);
        let area_end = match next_equal(self.words, dirty, stop, false) {
            Some(clean) => (clean << self.shift).min(end),
            None => end,
        };
        Some((start, area_end - start))
    }

    #[inline]
    fn next_clean(&self, offset: u64, end: u64) -> Option<u64> {
        let (first, stop) = self.granule_span(offset, end)?;
        let clean = next_equal(self.words, first, stop, false)?;
        Some((clean << self.shift).max(offset))
    }
}

/// The first bit in `[first, stop)` equal to `value`, scanning the raw words
/// (granule `i` at bit `i % 64` of word `i / 64`). bitvec's `first_one` /
/// `first_zero` on the sub-slice also skip whole words, but slicing and
/// splitting the domain on every call made next_dirty_area about twice as
/// slow and a full extent scan 1.6x slower (benches/README.md), and block
/// status makes such a call per extent.
fn next_equal(words: &[u64], first: u64, stop: u64, value: bool) -> Option<u64> {
    if first >= stop {
        return None;
    }
    let flip = if value { 0 } else { !0 };
    let mut w = (first / 64) as usize;
    // Bits below `first` in its word do not count.
    let mut bits = (words.get(w)? ^ flip) & (!0u64 << (first % 64));
    if bits == 0 {
        // Past the first word, a plain search over the rest.
        let rest = words.get(w + 1..=((stop - 1) / 64) as usize)?;
        let (i, &word) = rest.iter().enumerate().find(|&(_, &x)| x != flip)?;
        w += 1 + i;
        bits = word ^ flip;
    }
    let found = w as u64 * 64 + u64::from(bits.trailing_zeros());
    (found < stop).then_some(found)
}

/// Iterator of `(start, len)` dirty areas; see `DirtyBitmap::dirty_extents`.
pub struct DirtyExtents<'a> {
    view: View<'a>,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let (start, len) = self.view.next_dirty_area(self.pos, self.end)?;
        self.pos = start + len;
        Some((start, len))
    }
}

/// Iterator of alternating extents; see `DirtyBitmap::extents`.
pub struct Extents<'a> {
    view: View<'a>,
    pos: u64,
    end: u64,
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        if self.pos >= self.end {
            return None;
        }
        let offset = self.pos;
        let dirty = self.view.is_dirty(offset);
        let stop = if dirty {
            self.view.next_clean(offset, self.end).unwrap_or(self.end)
        } else {
            self.view
                .next_dirty_area(offset, self.end)
                .map_or(self.end, |(start, _)| start)
        };
        self.pos = stop;
        Some(Extent {
            offset,
            len: stop - offset,
            dirty,
        })
    }
}
