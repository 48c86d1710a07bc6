//! `DirtyBitmap`: one bit per granule of a disk, set when the granule was
//! written since the bitmap was created or last cleared.
//!
//! Range rules, decided once here:
//! - A range is `(offset, len)` in bytes. `len == 0` is a no-op.
//! - A range that reaches past the disk size is refused with an `Invalid`
//!   error and changes nothing: the write path checks requests against the
//!   node size first, so such a range is a bug in the caller, and silently
//!   clipping it would hide one. Queries (`next_dirty_area`, `next_clean`,
//!   extents) instead clip their end to the disk size, as QEMU's do.
//! - Setting marks every granule the range touches, partial ones included.
//! - Resetting clears only granules the range covers completely; the last,
//!   partial granule of the disk counts as covered when the range reaches
//!   the disk end. QEMU asserts such alignment; tidemark keeps a partly
//!   covered granule dirty, so a reset never loses a write it did not cover.

use std::fmt;

use bitvec::prelude::{BitVec, Lsb0};

use super::error::{BitmapError, BitmapErrorKind, BitmapResult};
use super::limits::{check_name, granularity_shift, MAX_DISK_SIZE};
use super::state::BitmapState;

/// A dirty bitmap over a disk of `size` bytes at a power-of-two granularity.
///
/// Memory is one bit per granule, rounded up to whole 64-bit words, and
/// nothing else that grows with the disk. Granule `i` is bit `i % 64` of
/// word `i / 64` (`Lsb0`), the layout of QEMU's hbitmap and of the qcow2
/// stream. Bits past the last granule (bitvec's dead bits) are always zero:
/// the hash and the qcow2 format both rely on it.
pub struct DirtyBitmap {
    name: String,
    size: u64,
    shift: u32,
    granules: u64,
    bits: BitVec<u64, Lsb0>,
    /// Recording, busy, inconsistent, persistent, read-only: plain flags that
    /// the rule checks in `state.rs` read.
    pub state: BitmapState,
}

impl DirtyBitmap {
    /// A named, recording, transient bitmap with no dirty granule. The name
    /// and granularity are checked with QEMU's texts.
    pub fn new(name: &str, size: u64, granularity: u64) -> BitmapResult<Self> {
        check_name(name)?;
        let mut bitmap = Self::anonymous(size, granularity)?;
        bitmap.name = name.to_owned();
        Ok(bitmap)
    }

    /// A bitmap loaded from an image under `name`, the name qemu shows for
    /// stored bytes that were checked against qemu's limit when read (the
    /// shown form of bytes that are not UTF-8 is longer than they are).
    pub fn stored(name: &str, size: u64, granularity: u64) -> BitmapResult<Self> {
        let mut bitmap = Self::anonymous(size, granularity)?;
        bitmap.name = name.to_owned();
        Ok(bitmap)
    }

    /// A bitmap without a name, for internal use (a job's copy bitmap, a
    /// successor); otherwise as `new`.
    pub fn anonymous(size: u64, granularity: u64) -> BitmapResult<Self> {
        let shift = granularity_shift(granularity)?;
        if size > MAX_DISK_SIZE {
            return Err(BitmapError::invalid(format!(
                "Disk size {size} exceeds maximum ({MAX_DISK_SIZE} bytes)"
            )));
        }
        let granules = size.div_ceil(1u64 << shift);
        // bitvec allocates infallibly (an abort on failure), so the words
        // are reserved here with try_reserve and handed over without a copy.
        // The granule count fits a usize, so every `as usize` of a granule
        // index in this layer is lossless.
        let n_bits = usize::try_from(granules).map_err(|_| no_memory(granules))?;
        let mut words = Vec::new();
        words
            .try_reserve_exact(n_bits.div_ceil(64))
            .map_err(|_| no_memory(granules))?;
        words.resize(n_bits.div_ceil(64), 0u64);
        let mut bits = BitVec::try_from_vec(words).map_err(|_| no_memory(granules))?;
        bits.truncate(n_bits);
        Ok(DirtyBitmap {
            name: String::new(),
            size,
            shift,
            granules,
            bits,
            state: BitmapState::default(),
        })
    }

    /// The name; empty for an anonymous bitmap.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the bitmap (as QEMU's successor takes its parent's name).
    pub fn set_name(&mut self, name: &str) -> BitmapResult<()> {
        check_name(name)?;
        self.name = name.to_owned();
        Ok(())
    }

    /// Size of the covered disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1u64 << self.shift
    }

    /// log2 of the granularity.
    pub fn granularity_shift(&self) -> u32 {
        self.shift
    }

    /// Number of granules (bits), the last one possibly partial.
    pub fn granules(&self) -> u64 {
        self.granules
    }

    /// The raw words under the bits, granule `i` at bit `i % 64` of word
    /// `i / 64`, dead bits zero.
    pub fn words(&self) -> &[u64] {
        self.bits.as_raw_slice()
    }

    /// The raw words, for word-level fast paths; whoever writes them keeps
    /// the dead bits zero (see `clear_tail`).
    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        self.bits.as_raw_mut_slice()
    }

    /// Checks that `[offset, offset + len)` lies within the disk.
    fn check_range(&self, offset: u64, len: u64) -> BitmapResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BitmapError::invalid(format!(
                "Range (offset {offset}, length {len}) exceeds the size of bitmap '{}' \
                 ({} bytes)",
                self.name, self.size
            ))),
        }
    }

    /// Marks every granule that `[offset, offset + len)` touches as dirty.
    pub fn set_range(&mut self, offset: u64, len: u64) -> BitmapResult<()> {
        self.check_range(offset, len)?;
        if len > 0 {
            let first = (offset >> self.shift) as usize;
            let last = ((offset + len - 1) >> self.shift) as usize;
            self.fill(first, last + 1, true);
        }
        Ok(())
    }

    /// Marks clean every granule that `[offset, offset + len)` covers
    /// completely (see the module notes for the partial granules).
    pub fn reset_range(&mut self, offset: u64, len: u64) -> BitmapResult<()> {
        self.check_range(offset, len)?;
        let first = (offset + self.granularity() - 1) >> self.shift;
        let end = offset + len;
        let stop = if end == self.size {
            self.granules
        } else {
            end >> self.shift
        };
        if first < stop {
            self.fill(first as usize, stop as usize, false);
        }
        Ok(())
    }

    /// Sets granules `[first, stop)` to `value`, `stop <= granules`.
    ///
    /// A masked store to the first and last raw word and a plain fill of
    /// the words between: bitvec's `BitSlice::fill` does the same through
    /// its domain split, which costs ~25% more on the short ranges of guest
    /// writes and of a merge across granularities (benches/README.md).
    pub(crate) fn fill(&mut self, first: usize, stop: usize, value: bool) {
        if first >= stop {
            return;
        }
        let (w0, w1) = (first / 64, (stop - 1) / 64);
        let head = !0u64 << (first % 64);
        let tail = !0u64 >> (63 - (stop - 1) % 64);
        let Some(words) = self.bits.as_raw_mut_slice().get_mut(w0..=w1) else {
            return;
        };
        let apply = |w: &mut u64, mask: u64| {
            if value {
                *w |= mask;
            } else {
                *w &= !mask;
            }
        };
        match words {
            [one] => apply(one, head & tail),
            [first, middle @ .., last] => {
                apply(first, head);
                middle.fill(if value { !0 } else { 0 });
                apply(last, tail);
            }
            [] => {}
        }
    }

    /// Marks every granule clean.
    pub fn clear(&mut self) {
        self.bits.fill(false);
    }

    /// Whether the granule holding byte `offset` is dirty; bytes past the
    /// end are clean.
    pub fn is_dirty(&self, offset: u64) -> bool {
        self.view().is_dirty(offset)
    }

    /// Number of dirty granules.
    pub fn dirty_granules(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// QEMU's `count`: dirty granules times the granularity. A dirty partial
    /// last granule counts as a whole one, so this can exceed the disk size
    /// (checked against qemu-storage-daemon's query-named-block-nodes).
    pub fn count(&self) -> u64 {
        self.dirty_granules() << self.shift
    }

    /// Whether no granule is dirty.
    pub fn is_empty(&self) -> bool {
        // The raw words stop at the first dirty one; bitvec's `not_any`
        // counts every bit and measured half as fast on a clean bitmap.
        self.words().iter().all(|&w| w == 0)
    }

    /// Clears the bits past the last granule, which must stay zero.
    pub(crate) fn clear_tail(&mut self) {
        self.bits.set_uninitialized(false);
    }
}

/// A copy of the words: bitvec's own clone copies through its domain
/// iterator and measured 9x slower (a backup successor is such a clone).
impl Clone for DirtyBitmap {
    fn clone(&self) -> Self {
        let mut bits = match BitVec::try_from_vec(self.words().to_vec()) {
            Ok(bits) => bits,
            // Cannot happen: `self.bits` already holds as many words.
            Err(_) => self.bits.clone(),
        };
        bits.truncate(self.bits.len());
        DirtyBitmap {
            name: self.name.clone(),
            size: self.size,
            shift: self.shift,
            granules: self.granules,
            bits,
            state: self.state,
        }
    }
}

/// Every field; the bits as raw words (dead bits are zero on both sides):
/// bitvec's `==` loads each 64 bits through a bit-slice, 50x slower.
impl PartialEq for DirtyBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.size == other.size
            && self.shift == other.shift
            && self.granules == other.granules
            && self.state == other.state
            && self.words() == other.words()
    }
}

impl Eq for DirtyBitmap {}

/// A summary: the bits of a large disk would flood a log or a test failure.
impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("dirty_granules", &self.dirty_granules())
            .field("state", &self.state)
            .finish()
    }
}

fn no_memory(granules: u64) -> BitmapError {
    BitmapError::new(
        BitmapErrorKind::NoMemory,
        format!("Cannot allocate memory for a bitmap of {granules} bits"),
    )
}
